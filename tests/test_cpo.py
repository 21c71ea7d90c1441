"""CPO / SimPO / AlphaPO and ORPO besides TRL parity (test_cpo_trl.py): the pure losses against plain float64
formulas written here, the share of a micro-batch, the padding-free layout, start-up checks, and the
`posttrain cpo` / `posttrain orpo` runs on the embedded task."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from posttrain.cli import main
from posttrain.data import embedded, preference
from posttrain.losses import cpo as cpo_losses
from posttrain.losses import registry
from posttrain.rl import cpo, dpo, orpo
from posttrain.rl.config import ConfigError

# Sequence log-probs of 4 pairs (per-token means or sums alike for the pure functions): a confident chosen,
# a pair the policy ranks the wrong way, a near tie, a long unlikely pair.
CHOSEN = [-0.05, -2.0, -0.7, -9.0]
REJECTED = [-3.0, -0.4, -0.69, -12.5]


def tensors(dtype=torch.float32):
    return torch.tensor(CHOSEN, dtype=dtype), torch.tensor(REJECTED, dtype=dtype)


def logsig(x):
    return -math.log1p(math.exp(-x)) if x > 0 else x - math.log1p(math.exp(x))


# ---------------------------------------------------------------------------------------------------------
# The pure losses, against the formulas in float64 by hand
# ---------------------------------------------------------------------------------------------------------


def shaped(logp, alpha):
    return logp if alpha == 0 else (1 - math.exp(logp) ** -alpha) / alpha


def plain_cpo(loss_type, w, r, *, beta, alpha=0.0, gamma=0.5, eps=0.0):
    h = shaped(w, alpha) - shaped(r, alpha)
    if loss_type == "sigmoid":
        return -(1 - eps) * logsig(beta * h) - eps * logsig(-beta * h)
    if loss_type == "hinge":
        return max(0.0, 1 - beta * h)
    if loss_type == "ipo":
        return (h - 1 / (2 * beta)) ** 2
    z = beta * h - gamma  # simpo, alphapo
    return -(1 - eps) * logsig(z) - eps * logsig(-z)


CPO_CASES = [
    ("sigmoid", dict(beta=0.1)),
    ("sigmoid", dict(beta=0.5, eps=0.2, alpha=-0.3)),
    ("hinge", dict(beta=0.7)),
    ("hinge", dict(beta=0.7, alpha=0.1)),
    ("ipo", dict(beta=0.3)),
    ("simpo", dict(beta=2.0, gamma=1.0)),
    ("simpo", dict(beta=2.5, gamma=0.3, eps=0.1)),
    ("alphapo", dict(beta=2.5, gamma=0.5, alpha=0.25)),
]


@pytest.mark.parametrize(("loss_type", "options"), CPO_CASES)
def test_cpo_losses_are_their_formulas(loss_type, options):
    fn = registry.get("cpo", loss_type)
    names = {"gamma": "simpo_gamma", "eps": "label_smoothing"}
    kwargs = {names.get(k, k): v for k, v in options.items()}
    got = fn(*tensors(torch.float64), **kwargs)
    expected = [plain_cpo(loss_type, w, r, **options) for w, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_which_losses_take_per_token_means():
    """As TRL's CPOTrainer (average_log_prob for ipo and simpo, alphapo being simpo there)."""
    means = {name for name in registry.names("cpo") if cpo_losses.uses_token_mean(registry.get("cpo", name))}
    assert means == {"ipo", "simpo", "alphapo"}


def test_alphapo_reward_tends_to_the_log_prob_as_alpha_vanishes():
    logps = torch.tensor(CHOSEN + REJECTED, dtype=torch.float64)
    assert torch.equal(cpo_losses.shaped_rewards(logps, 0.0), logps)
    torch.testing.assert_close(cpo_losses.shaped_rewards(logps, 1e-9), logps, rtol=1e-7, atol=1e-7)
    # alpha = 1: (1 - 1/p) = 1 - exp(-log p); at log p = -0.05 that is 1 - e^0.05 = -0.0512711
    assert cpo_losses.shaped_rewards(torch.tensor([-0.05]), 1.0).item() == pytest.approx(-0.0512711, rel=1e-6)


@pytest.mark.parametrize("x", [-1e-7, -1e-3, -0.5, -math.log(2), -0.9, -5.0, -40.0])
def test_log1mexp_is_exact_on_both_branches(x):
    expected = math.log(-math.expm1(x))
    got = cpo_losses.log1mexp(torch.tensor([x], dtype=torch.float32)).item()
    assert got == pytest.approx(expected, rel=1e-6)


def test_odds_ratio_is_its_formula():
    """-log sigma(log(p_w / (1 - p_w)) - log(p_l / (1 - p_l))), p = exp(mean log-prob)."""

    def log_odds(m):
        p = math.exp(m)
        return math.log(p / (1 - p))

    got = registry.get("orpo", "odds_ratio")(*tensors(torch.float64))
    expected = [-logsig(log_odds(w) - log_odds(r)) for w, r in zip(CHOSEN, REJECTED, strict=True)]
    torch.testing.assert_close(got, torch.tensor(expected, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_combinators_give_the_step_share_and_the_metrics():
    """cpo_loss / orpo_loss over 4 of a step's 8 pairs: the per-pair sum / 8 + the NLL term weighted by
    4 / 8; the metrics likewise (rewards beta * u, accuracies counted, nll_loss weighted)."""
    chosen, rejected = tensors(torch.float64)
    nll = torch.tensor(0.8, dtype=torch.float64)
    loss, m = cpo_losses.cpo_loss("simpo", chosen, rejected, nll, beta=2.0, cpo_alpha=0.5, num_pairs=8,
                                  simpo_gamma=1.0, alpha=0.2)  # fmt: skip
    per_pair = [
        plain_cpo("simpo", w, r, beta=2.0, gamma=1.0, alpha=0.2)
        for w, r in zip(CHOSEN, REJECTED, strict=True)
    ]
    assert loss.item() == pytest.approx(sum(per_pair) / 8 + 0.5 * 0.8 * 4 / 8, rel=1e-12)
    r_w = [2.0 * shaped(w, 0.2) for w in CHOSEN]
    r_l = [2.0 * shaped(v, 0.2) for v in REJECTED]
    assert m["rewards/chosen"].item() == pytest.approx(sum(r_w) / 8, rel=1e-12)
    assert m["rewards/margins"].item() == pytest.approx((sum(r_w) - sum(r_l)) / 8, rel=1e-12)
    assert m["rewards/accuracies"].item() == 2 / 8  # pairs 1 and 4 are ranked right
    assert m["logps/rejected"].item() == pytest.approx(sum(REJECTED) / 8, rel=1e-12)
    assert m["nll_loss"].item() == pytest.approx(0.8 * 4 / 8, rel=1e-12)

    loss, m = cpo_losses.orpo_loss(chosen, rejected, nll, beta=0.25, num_pairs=8)
    ratio = registry.get("orpo", "odds_ratio")(chosen, rejected)
    assert loss.item() == pytest.approx(0.8 * 4 / 8 + 0.25 * ratio.sum().item() / 8, rel=1e-12)
    assert m["log_odds_ratio"].item() == pytest.approx(-ratio.sum().item() / 8, rel=1e-12)
    assert m["rewards/chosen"].item() == pytest.approx(0.25 * sum(CHOSEN) / 8, rel=1e-12)


# ---------------------------------------------------------------------------------------------------------
# The step: micro-batch shares, the ORPO NLL mask, padding-free
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


def pairs(tokenizer, n=6):
    data = embedded.rows("preference", "train", seed=0)[:n]
    data[1]["rejected"] = "1234"  # unequal completion lengths
    out, _ = preference.tokenize_preference(
        Dataset.from_list(data), tokenizer, command="cpo", keep_columns=()
    )
    return list(out)


STEPS = {
    "cpo-sigmoid": (cpo.cpo_step_loss, cpo.CPOConfig, {}),
    "cpo-simpo": (cpo.cpo_step_loss, cpo.CPOConfig, {"loss_type": "simpo", "alpha": 0.2}),
    "orpo": (orpo.orpo_step_loss, orpo.ORPOConfig, {}),
}


def step(name, model, batch, num_items):
    step_loss, config_class, options = STEPS[name]
    model.zero_grad()
    loss, m = step_loss(model, batch, num_items, config=config_class(dataset_name="unused", **options))
    loss.backward()
    return loss.detach(), {k: v.item() for k, v in m.items()}, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(STEPS))
def test_padding_free_gives_the_padded_step(tokenizer, name):
    data = pairs(tokenizer)
    model = embedded.build_model(seed=1)
    padded = step(name, model, dpo.collate_pairs(data, tokenizer.pad_token_id), len(data))
    packed = step(name, model, dpo.collate_pairs(data, tokenizer.pad_token_id, padding_free=True), len(data))
    torch.testing.assert_close(packed[0], padded[0], rtol=1e-5, atol=1e-6)
    assert packed[1].keys() == padded[1].keys()
    for key in padded[1]:
        assert packed[1][key] == pytest.approx(padded[1][key], rel=1e-5, abs=1e-6), key
    for a, b in zip(padded[2], packed[2], strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_orpo_nll_is_over_the_chosen_prompt_and_completion(tokenizer):
    """A plain forward: the token mean of -log p over every chosen token but the first (TRL 1.16's ORPO)."""
    data = pairs(tokenizer, 4)
    model = embedded.build_model(seed=1)
    batch = dpo.collate_pairs(data, tokenizer.pad_token_id)
    _, m = orpo.orpo_step_loss(model, batch, 4, config=orpo.ORPOConfig(dataset_name="unused"))
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logp = logits[:4, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:4, 1:, None]).squeeze(-1)
    mask = batch["attention_mask"][:4, 1:].bool()
    assert mask.sum() > batch["completion_mask"][:4].sum()  # prompt tokens are in
    assert m["nll_loss"].item() == pytest.approx(-logp[mask].mean().item(), rel=1e-5)


@pytest.mark.parametrize("name", ["cpo-simpo", "orpo"])
def test_a_micro_batch_contributes_its_share_of_the_step(tokenizer, name):
    """Every term is this micro-batch's value times pairs / num_items; two micro-batches of a step sum to the
    pair-weighted mean of their own values (the NLL's token mean is a micro-batch's, as TRL's)."""
    data = pairs(tokenizer)
    model = embedded.build_model(seed=1)
    first, second = (dpo.collate_pairs(part, tokenizer.pad_token_id) for part in (data[:2], data[2:]))
    alone = [step(name, model, b, n) for b, n in ((first, 2), (second, 4))]
    shared = [step(name, model, b, 6) for b in (first, second)]
    for (a_loss, a_m, a_g), (s_loss, s_m, s_g), n in zip(alone, shared, (2, 4), strict=True):
        torch.testing.assert_close(s_loss, a_loss * n / 6)
        for key in a_m:
            assert s_m[key] == pytest.approx(a_m[key] * n / 6, rel=1e-5, abs=1e-7), key
        for a, s in zip(a_g, s_g, strict=True):
            torch.testing.assert_close(s, a * n / 6, rtol=1e-4, atol=1e-7)


@cpo_losses.token_mean
def _mean_margin(chosen_logps, rejected_logps, *, beta, alpha=0.0):
    return -beta * (chosen_logps - rejected_logps)


def test_a_registered_loss_is_used_by_the_loop_with_the_log_probs_it_asks_for(tokenizer):
    """A user's "cpo" loss, registered and named by loss_type: the loop feeds it per-token means because it is
    marked `token_mean` (the logps/* metrics are those means), and label_smoothing is refused (it takes none)."""
    registry.register("cpo", "test_mean_margin")(_mean_margin)
    data = pairs(tokenizer, 4)
    batch = dpo.collate_pairs(data, tokenizer.pad_token_id)
    config = cpo.CPOConfig(dataset_name="unused", loss_type="test_mean_margin", beta=0.5, cpo_alpha=0.0)
    loss, m = cpo.cpo_step_loss(embedded.build_model(seed=1), batch, 4, config=config)
    mask = batch["completion_mask"].float()
    lengths = mask.sum(1)
    assert m["logps/chosen"].item() != pytest.approx(0.0)
    assert loss.item() == pytest.approx(-0.5 * (m["logps/chosen"] - m["logps/rejected"]).item(), rel=1e-5)
    with torch.no_grad():
        logits = embedded.build_model(seed=1)(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits
    logp = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    means = (logp * mask[:, 1:]).sum(1) / lengths
    assert m["logps/chosen"].item() == pytest.approx(means[:4].mean().item(), rel=1e-5)
    with pytest.raises(
        ConfigError, match="label_smoothing=0.1 does not apply to loss_type 'test_mean_margin'"
    ):
        cpo.CPOConfig(dataset_name="unused", loss_type="test_mean_margin", label_smoothing=0.1)


# ---------------------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config_class", "options", "message"),
    [
        (cpo.CPOConfig, {"loss_type": "dpo"}, r"loss_type 'dpo' is not a cpo loss; expected one of \['alphapo', 'hinge'"),
        (cpo.CPOConfig, {"loss_type": "hinge", "label_smoothing": 0.1}, r"label_smoothing=0.1 does not apply to loss_type 'hinge'"),
        (cpo.CPOConfig, {"loss_type": "ipo", "label_smoothing": 0.1}, r"does not apply to loss_type 'ipo'"),
        (cpo.CPOConfig, {"label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\)"),
        (cpo.CPOConfig, {"loss_type": "simpo", "label_smoothing": -0.1}, r"label_smoothing must lie in \[0, 0.5\)"),
        (cpo.CPOConfig, {"cpo_alpha": -1.0}, r"cpo_alpha must be >= 0"),
        (cpo.CPOConfig, {"alpha": float("nan")}, r"alpha must be finite"),
        (cpo.CPOConfig, {"simpo_gamma": float("inf")}, r"simpo_gamma must be finite"),
        (cpo.CPOConfig, {"beta": 0.0}, r"beta must be > 0"),
        (orpo.ORPOConfig, {"loss_type": "sigmoid"}, r"loss_type 'sigmoid' is not an orpo loss; expected one of \['odds_ratio'\]"),
        (orpo.ORPOConfig, {"beta": -0.1}, r"beta must be > 0"),
    ],
)  # fmt: skip
def test_bad_options_are_named_at_start_up(config_class, options, message):
    with pytest.raises(ConfigError, match=message):
        config_class(dataset_name="unused", **options)


def test_defaults_are_trls():
    c = cpo.CPOConfig(model_name_or_path="m", dataset_name="d")
    assert (c.loss_type, c.beta, c.label_smoothing, c.cpo_alpha, c.simpo_gamma, c.alpha) == (
        "sigmoid", 0.1, 0.0, 1.0, 0.5, 0.0
    )  # fmt: skip
    assert (c.learning_rate, c.max_length, c.per_device_train_batch_size, c.num_train_epochs) == (
        1e-6,
        1024,
        8,
        3.0,
    )
    assert c.disable_dropout
    o = orpo.ORPOConfig(model_name_or_path="m", dataset_name="d")
    assert (o.beta, o.learning_rate, o.max_length, o.disable_dropout) == (0.1, 1e-6, 1024, True)
    # TRL's CPOConfig turns alphapo into simpo without the NLL term
    assert cpo.CPOConfig(dataset_name="d", loss_type="alphapo", cpo_alpha=0.7).cpo_alpha == 0.0


def test_cli_names_a_bad_option_before_the_run_folder_is_written(capsys, tmp_path):
    out = tmp_path / "o"
    assert main(["cpo", "--loss_type", "hinge", "--label_smoothing", "0.2", "--output_dir", str(out)]) == 2
    assert "posttrain cpo: label_smoothing=0.2 does not apply to loss_type 'hinge'" in capsys.readouterr().err
    assert main(["orpo", "--loss_type", "kto", "--output_dir", str(out)]) == 2
    assert "posttrain orpo: loss_type 'kto' is not an orpo loss" in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------------------------
# The embedded default: `posttrain cpo` / `posttrain orpo` with no arguments
# ---------------------------------------------------------------------------------------------------------


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# "Kept" on 112 held-out problems: at most two lost. A problem is 0.9 points, and which one or two the start
# gets wrong moves with the machine's float rounding (AMD EPYC: 110 right, kept; Intel Xeon: 111 -> 110).
KEPT_WITHIN = 2 / 112 + 1e-9


@pytest.mark.slow
@pytest.mark.parametrize("command", ["cpo", "orpo"])
def test_embedded_default_keeps_its_sft_start(tmp_path, command):
    """The embedded SFT start answers 110 or 111 of the 112 held-out sums (by the machine's float rounding)
    and already ranks every pair; the defaults (see rl/cpo.py and rl/orpo.py) keep that, to within two
    problems, while the loss goes down."""
    out = tmp_path / command
    assert main([command, "--output_dir", str(out), "--disable_tqdm", "true"]) == 0
    records = metrics(out)
    evals = [r for r in records if "eval_exact_match" in r]
    train = [r for r in records if "loss" in r]
    start_accuracy = json.loads((out / "run_info.json").read_text())["start_eval_exact_match"]
    assert start_accuracy > 0.95
    assert evals[-1]["eval_exact_match"] >= start_accuracy - KEPT_WITHIN
    assert evals[-1]["eval_rewards/accuracies"] > 0.95  # held-out pairs ranked, chosen above rejected (0.99)

    def mean(key, part):
        return sum(r[key] for r in part) / len(part)

    assert mean("loss", train[-5:]) < mean("loss", train[:5]) - 0.02  # CPO 0.35 -> 0.31, ORPO 5.2 -> 4.8


@pytest.mark.parametrize("module", [cpo, orpo])
def test_a_format_error_names_the_command(module, tmp_path):
    # Prompt-completion rows are not preference pairs: the message names the loop that was run.
    data = tmp_path / "rows.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in embedded.rows("prompt_completion")[:4]))
    config_class = cpo.CPOConfig if module is cpo else orpo.ORPOConfig
    config = config_class(output_dir=str(tmp_path / "run"), dataset_name=str(data), report_to="none")
    command = module.__name__.rsplit(".", 1)[1]
    with pytest.raises(ValueError, match=rf"^`{command}` accepts preference"):
        module.train(config)
    assert not (tmp_path / "run").exists()
