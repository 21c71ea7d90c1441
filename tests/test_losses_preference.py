"""Preference losses against TRL 1.16's DPOTrainer, and the registry's behaviour.

Reference: TRL's `DPOTrainer.compute_loss` on a tiny Qwen2 policy and its reference model, one batch of 4
pairs, float32, for each loss_type and option. TRL gives the loss, the policy's gradients and its logged
metrics. Our side: TRL's own collated batch (so tokenization cannot differ), per-token log-probs by a plain
forward + log_softmax + gather written here, summed per sequence (or combined by `ld_logps`), fed to
`preference_loss` through the registry, backward. Loss and each parameter's gradient must agree to a
norm-relative error of 1e-5; the metrics (rewards/*, logps/*) to 1e-5 too (TRL 1.16 logs no per-loss
extras). The policy is the reference after 3 AdamW steps on the chosen answers, so the log-ratios are
of order one and of both signs (a policy equal to its reference makes every comparison trivial).
"""

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from _trl_drivers import assert_same_step, trained_policy_and_reference, trl_dpo_step

from posttrain.data import embedded
from posttrain.losses import registry
from posttrain.losses.preference import (
    LossWeightsError,
    bco_update_reward_mean,
    ld_logps,
    needs_reference,
    preference_loss,
    reference_free,
    wpo_weights,
)

trl = pytest.importorskip("trl")

RTOL = 1e-5
# Completions of different lengths (1 to 4 characters + eos), so that ipo, sigmoid_norm, ld_alpha and WPO's
# per-token means see unequal lengths. The policy ranks the pairs' margins log pi(y_w) - log pi(y_l) in
# another order than the reference (the 3+4 pair), so that aot's sorting matters.
ROWS = [
    {"prompt": "24+22=", "chosen": "46", "rejected": "4600"},
    {"prompt": "3+4=", "chosen": "7", "rejected": "x"},
    {"prompt": "25+25=", "chosen": "50", "rejected": "9"},
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
]
METRICS = (
    "rewards/chosen",
    "rewards/rejected",
    "rewards/accuracies",
    "rewards/margins",
    "logps/chosen",
    "logps/rejected",
)
# Options our losses take as keyword inputs under TRL's names; the rest are handled around the loss.
LOSS_INPUTS = ("label_smoothing", "f_divergence_type", "f_alpha_divergence_coef", "discopop_tau")


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    """(policy, reference): see `trained_policy_and_reference`."""
    return trained_policy_and_reference(tokenizer)


def trl_step(models, tokenizer, **dpo_options):
    """TRL's loss, policy gradients, metrics and collated batch for ROWS in one micro-batch."""
    return trl_dpo_step(*models, tokenizer, ROWS, precompute_ref_log_probs=False, **dpo_options)


def token_logps(model, batch):
    """Plain per-token log-probs of the next tokens, the completion mask and log sum_v p_v^2: (N, T-1) each."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logp = logits[:, :-1].float().log_softmax(-1)
    mask = batch["completion_mask"][:, 1:].float()
    token = logp.gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1) * mask
    return token, mask, torch.logsumexp(2 * logp, dim=-1)


def our_step(
    models, batch, *, loss_type, beta=0.1, loss_weights=None, ld_alpha=None, use_weighting=False, **inputs
):
    """Our loss, gradients and metrics on TRL's collated `batch`, through `preference_loss`."""
    policy, ref = models
    model = copy.deepcopy(policy)
    model.train()
    token, mask, log_sum_sq = token_logps(model, batch)
    with torch.no_grad():
        ref_token, _, _ = token_logps(ref, batch)
    b = token.shape[0] // 2  # TRL's batch is [chosen; rejected]
    if ld_alpha is None:
        chosen, rejected = token.sum(1).chunk(2)
        ref_chosen, ref_rejected = ref_token.sum(1).chunk(2)
    else:
        chosen, rejected = ld_logps(token[:b], token[b:], mask[:b], mask[b:], ld_alpha)
        ref_chosen, ref_rejected = ld_logps(ref_token[:b], ref_token[b:], mask[:b], mask[b:], ld_alpha)
    pair_weights = None
    if use_weighting:
        weights = wpo_weights(token, log_sum_sq, mask)
        pair_weights = weights[:b] * weights[b:]
    lengths = batch["completion_mask"].sum(1).float()
    loss, metrics = preference_loss(
        loss_type,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=beta,
        loss_weights=loss_weights,
        pair_weights=pair_weights,
        chosen_lengths=lengths[:b],
        rejected_lengths=lengths[b:],
        chosen_token_logps=token[:b],
        chosen_mask=mask[:b],
        **inputs,
    )
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    margins = (chosen - rejected).detach(), ref_chosen - ref_rejected
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "margins": margins}


ALL_LOSS_TYPES = [
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
]  # fmt: skip
CASES = {name: {"loss_type": [name]} for name in ALL_LOSS_TYPES}
CASES["exo_pair"]["label_smoothing"] = 1e-3  # TRL requires > 0, the EXO paper's suggestion
CASES.update(
    {
        "sigmoid-beta0.5": {"loss_type": ["sigmoid"], "beta": 0.5},
        "sigmoid-label_smoothing": {"loss_type": ["sigmoid"], "label_smoothing": 0.2},  # ignored by both
        "robust-label_smoothing": {"loss_type": ["robust"], "label_smoothing": 0.2},
        "exo_pair-label_smoothing": {"loss_type": ["exo_pair"], "label_smoothing": 0.3, "beta": 0.5},
        "aot-label_smoothing": {"loss_type": ["aot"], "label_smoothing": 0.1},
        "aot_unpaired-label_smoothing": {"loss_type": ["aot_unpaired"], "label_smoothing": 0.1},
        "discopop-tau": {"loss_type": ["discopop"], "discopop_tau": 0.3, "beta": 0.5},
        "sigmoid-forward_kl": {"loss_type": ["sigmoid"], "f_divergence_type": "forward_kl"},
        "sigmoid-js_divergence": {"loss_type": ["sigmoid"], "f_divergence_type": "js_divergence"},
        "sigmoid-alpha_divergence": {
            "loss_type": ["sigmoid"],
            "f_divergence_type": "alpha_divergence",
            "f_alpha_divergence_coef": 0.3,
        },
        "ipo-js_divergence": {"loss_type": ["ipo"], "f_divergence_type": "js_divergence"},
        "sigmoid_norm-alpha_divergence": {
            "loss_type": ["sigmoid_norm"],
            "f_divergence_type": "alpha_divergence",
        },
        "hinge-forward_kl": {"loss_type": ["hinge"], "f_divergence_type": "forward_kl"},
        "sigmoid-use_weighting": {"loss_type": ["sigmoid"], "use_weighting": True},
        "ipo-use_weighting": {"loss_type": ["ipo"], "use_weighting": True},
        "sigmoid-ld_alpha": {"loss_type": ["sigmoid"], "ld_alpha": 0.5},
        "apo_zero-ld_alpha0": {"loss_type": ["apo_zero"], "ld_alpha": 0.0},
        "mpo-loss_weights": {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]},
        # (TRL 1.16 fails on sft with use_weighting: an in-place multiply of an expanded tensor; see
        # test_sft_with_pair_weights for ours)
        "mpo-use_weighting": {
            "loss_type": ["sigmoid", "ipo"],
            "loss_weights": [0.5, 2.0],
            "use_weighting": True,
        },
    }
)


@pytest.mark.parametrize("case", list(CASES))
def test_against_trl(models, tokenizer, case):
    options = CASES[case]
    theirs = trl_step(models, tokenizer, **options)
    ours = our_step(models, theirs["batch"], **options)
    # Not vacuous: the loss is not at a flat point, and policy and reference order the margins differently.
    assert theirs["loss"].abs() > 1e-3
    assert not torch.equal(ours["margins"][0].argsort(), ours["margins"][1].argsort())
    assert_same_step(ours, theirs)
    for key in METRICS:
        assert math.isclose(
            ours["metrics"][key].item(), theirs["metrics"][key], rel_tol=RTOL, abs_tol=1e-6
        ), key


def test_metrics_not_vacuous(models, tokenizer):
    """The fixture's batch has both signs of reward margin (accuracy strictly between 0 and 1)."""
    theirs = trl_step(models, tokenizer, loss_type=["sigmoid"])
    assert 0.0 < theirs["metrics"]["rewards/accuracies"] < 1.0


# --- Registry and error behaviour (no model needed).

B = 4


def logps(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(-5 - torch.rand(B, generator=g) * 3).requires_grad_(i < 2) for i in range(4)]


def test_unknown_loss_type_lists_valid_names():
    with pytest.raises(ValueError, match=r"unknown preference loss_type 'dpo'.*'apo_zero'.*'sigmoid_norm'"):
        preference_loss(["dpo"], *logps(), beta=0.1)


def test_every_trl_loss_type_is_registered():
    assert set(ALL_LOSS_TYPES) <= set(registry.names("preference"))
    assert [name for name in ALL_LOSS_TYPES if not needs_reference(registry.get("preference", name))] == [
        "sft"
    ]


def test_custom_loss_by_registering_one_function():
    # The README's snippet: a user registers a loss and names it in loss_type.
    from posttrain.losses.registry import register

    @register("preference", "margin_sigmoid")
    def margin_sigmoid(
        chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, gamma=1.0
    ):
        """DPO with a target margin: -log sigma(beta * (rho_w - rho_l) - gamma). Shapes (B,) -> (B,)."""
        rho_w = chosen_logps - ref_chosen_logps
        rho_l = rejected_logps - ref_rejected_logps
        return -F.logsigmoid(beta * (rho_w - rho_l) - gamma)

    try:
        c, r, rc, rr = logps()
        loss, metrics = preference_loss(["margin_sigmoid"], c, r, rc, rr, beta=0.5, gamma=0.25)
        expected = -F.logsigmoid(0.5 * ((c - rc) - (r - rr)) - 0.25).mean()
        torch.testing.assert_close(loss, expected, rtol=0, atol=0)
        assert registry.get("preference", "margin_sigmoid") is margin_sigmoid
        assert needs_reference(margin_sigmoid)
        torch.testing.assert_close(metrics["rewards/margins"], (0.5 * ((c - rc) - (r - rr))).mean().detach())
    finally:
        registry._REGISTRY["preference"].pop("margin_sigmoid")


def test_custom_reference_free_loss_runs_without_reference():
    @registry.register("preference", "logit_margin")
    @reference_free
    def logit_margin(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
        return -F.logsigmoid(beta * (chosen_logps - rejected_logps))

    try:
        c, r, _, _ = logps()
        loss, metrics = preference_loss(["logit_margin"], c, r, beta=2.0)
        torch.testing.assert_close(loss, -F.logsigmoid(2.0 * (c - r)).mean())
        assert set(metrics) == {"logps/chosen", "logps/rejected"}  # no reference, no rewards
    finally:
        registry._REGISTRY["preference"].pop("logit_margin")


def test_conflicting_registration_raises():
    with pytest.raises(ValueError, match="'sigmoid' is already registered"):
        registry.register("preference", "sigmoid")(lambda *a, **k: None)


def test_loss_weights_of_wrong_length():
    with pytest.raises(LossWeightsError, match=r"loss_weights has 2 values for 3 loss_type"):
        preference_loss(["sigmoid", "bco_pair", "ipo"], *logps(), beta=0.1, loss_weights=[0.5, 0.5])


@pytest.mark.parametrize("value", [0.5, -0.1, 0.7])
def test_robust_label_smoothing_outside_range(value):
    with pytest.raises(ValueError, match=rf"robust needs label_smoothing in \[0, 0.5\), got {value}"):
        preference_loss(["robust"], *logps(), beta=0.1, label_smoothing=value)


def test_exo_pair_needs_positive_label_smoothing():
    with pytest.raises(ValueError, match="exo_pair needs 0 < label_smoothing < 1"):
        preference_loss(["exo_pair"], *logps(), beta=0.1, label_smoothing=0.0)


def test_f_divergence_refused_for_losses_of_the_log_ratios_alone():
    with pytest.raises(
        ValueError, match="f_divergence_type='forward_kl' does not apply to loss_type 'bco_pair'"
    ):
        preference_loss(["sigmoid", "bco_pair"], *logps(), beta=0.1, f_divergence_type="forward_kl")
    with pytest.raises(
        ValueError, match=r"unknown f_divergence_type 'kl'; expected one of \['alpha_divergence'"
    ):
        preference_loss(["bco_pair"], *logps(), beta=0.1, f_divergence_type="kl")


def test_alpha_divergence_near_one_is_reverse_kl():
    a, _ = preference_loss(["sigmoid"], *logps(), beta=0.3, f_divergence_type="alpha_divergence",
                           f_alpha_divergence_coef=1.0)  # fmt: skip
    b, _ = preference_loss(["sigmoid"], *logps(), beta=0.3)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_pair_weights_refused_for_sorting_losses():
    with pytest.raises(ValueError, match="per-pair weights .* do not apply to 'aot'"):
        preference_loss(["aot"], *logps(), beta=0.1, pair_weights=torch.ones(B))


def test_missing_reference_or_input_named():
    c, r, _, _ = logps()
    with pytest.raises(ValueError, match="'sigmoid' needs reference log-probs"):
        preference_loss(["sigmoid"], c, r, beta=0.1)
    with pytest.raises(ValueError, match="'ipo' needs the input 'chosen_lengths'"):
        preference_loss(["ipo"], *logps(), beta=0.1)
    with pytest.raises(ValueError, match="'sft' needs the input 'chosen_token_logps'"):
        preference_loss(["sft"], c, r, beta=0.1)


def test_ld_alpha_outside_unit_interval():
    x = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"ld_alpha must lie in \[0, 1\], got 1.5"):
        ld_logps(x, x, x, x, 1.5)


def test_ld_logps_by_hand():
    # chosen: 2 completion tokens, rejected: 4 (one prompt position in front); shared length 2, so the
    # rejected's last two tokens count by alpha = 0.25: -1 -2 + 0.25 * (-3 - 4) = -4.75.
    chosen = torch.tensor([[0.0, -1.0, -2.0, 0.0, 0.0]])
    rejected = torch.tensor([[0.0, -1.0, -2.0, -3.0, -4.0]])
    chosen_mask = torch.tensor([[0.0, 1, 1, 0, 0]])
    rejected_mask = torch.tensor([[0.0, 1, 1, 1, 1]])
    c, r = ld_logps(chosen, rejected, chosen_mask, rejected_mask, 0.25)
    assert c.tolist() == [-3.0] and r.tolist() == [-4.75]


def test_bco_running_mean_and_shift():
    """The running mean equals the plain mean of every reward seen; bco_pair with the shift matches the
    paper's formula written out here."""
    g = torch.Generator().manual_seed(3)
    batches = [(torch.randn(4, generator=g), torch.randn(4, generator=g)) for _ in range(3)]
    mean, count = torch.zeros(()), torch.zeros(())
    for chosen, rejected in batches:
        mean, count = bco_update_reward_mean(mean, count, chosen, rejected)
    everything = torch.cat([torch.cat(pair) for pair in batches])
    torch.testing.assert_close(mean, everything.mean())
    assert count.item() == 24

    c, r, rc, rr = logps()
    loss, _ = preference_loss(["bco_pair"], c, r, rc, rr, beta=0.5, reward_mean=mean)
    expected = (-F.logsigmoid(0.5 * (c - rc) - mean) - F.logsigmoid(-(0.5 * (r - rr) - mean))).mean()
    torch.testing.assert_close(loss, expected)


def test_accuracy_counts_ties_as_wrong():
    """rewards/accuracies counts r_w > r_l strictly, as TRL: a policy equal to its reference scores 0."""
    c, r, _, _ = logps()
    _, metrics = preference_loss(["sigmoid"], c, r, c.detach(), r.detach(), beta=0.1)
    assert metrics["rewards/accuracies"].item() == 0.0 and metrics["rewards/margins"].item() == 0.0


def test_loss_taking_kwargs_gets_every_input():
    @registry.register("preference", "scaled_sigmoid")
    def scaled_sigmoid(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, **inputs):
        return inputs["scale"] * -F.logsigmoid(beta * (chosen_logps - rejected_logps))

    try:
        c, r, rc, rr = logps()
        loss, _ = preference_loss(["scaled_sigmoid"], c, r, rc, rr, beta=0.1, scale=3.0)
        torch.testing.assert_close(loss, 3.0 * -F.logsigmoid(0.1 * (c - r)).mean())
    finally:
        registry._REGISTRY["preference"].pop("scaled_sigmoid")


def test_micro_batches_sum_to_the_step_loss():
    """With num_pairs = the step's pairs, two micro-batches' losses and metrics add up to the whole batch's."""
    c, r, rc, rr = logps()
    whole, whole_metrics = preference_loss(["sigmoid", "ipo"], c, r, rc, rr, beta=0.1, chosen_lengths=torch.ones(B) * 3,
                                           rejected_lengths=torch.ones(B) * 2)  # fmt: skip
    parts = [
        preference_loss(
            ["sigmoid", "ipo"],
            c[s],
            r[s],
            rc[s],
            rr[s],
            beta=0.1,
            num_pairs=B,
            chosen_lengths=torch.ones(2) * 3,
            rejected_lengths=torch.ones(2) * 2,
        )  # fmt: skip
        for s in (slice(0, 2), slice(2, 4))
    ]
    torch.testing.assert_close(parts[0][0] + parts[1][0], whole)
    for key, value in whole_metrics.items():
        torch.testing.assert_close(parts[0][1][key] + parts[1][1][key], value)


def test_sft_with_pair_weights():
    """sft repeats the batch's chosen-token mean NLL for every pair, so per-pair weights scale it by their
    mean (what TRL 1.16 means to compute; it raises on this combination instead)."""
    token = -torch.rand(B, 5, generator=torch.Generator().manual_seed(4))
    mask = torch.tensor([[1.0, 1, 0, 0, 0], [1, 1, 1, 1, 1], [0, 1, 0, 0, 0], [1, 1, 1, 0, 0]])
    weights = torch.tensor([0.5, 1.0, 2.0, 0.1])
    c, r, _, _ = logps()
    loss, _ = preference_loss(
        ["sft"], c, r, beta=0.1, pair_weights=weights, chosen_token_logps=token, chosen_mask=mask
    )
    torch.testing.assert_close(loss, -token[mask.bool()].mean() * weights.mean())
