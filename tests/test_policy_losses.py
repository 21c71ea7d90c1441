"""losses/policy.py against plain per-row / per-group loops written here (TRL parity: test_grpo_trl.py)."""

import math
import statistics

import pytest
import torch

from posttrain.losses import policy, registry

G = 4


def _rewards(seed=0, n_groups=3, F=2, nan_rows=()):
    g = torch.Generator().manual_seed(seed)
    r = torch.randn(n_groups * G, F, generator=g)
    for row, col in nan_rows:
        r[row, col] = float("nan")
    return r


def _std(values):
    return statistics.stdev(values) if len(values) > 1 else float("nan")


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_relative_sum_then_normalize(scale):
    r = _rewards(nan_rows=[(1, 0), (5, 1)])
    w = torch.tensor([0.7, 1.3])
    out = registry.get("advantage", "group")(r, w, num_generations=G, scale_rewards=scale)
    totals = [sum(float(w[j] * r[i, j]) for j in range(2) if not math.isnan(r[i, j])) for i in range(len(r))]
    for i in range(len(r)):
        group = totals[(i // G) * G : (i // G + 1) * G]
        expected = totals[i] - statistics.fmean(group)
        if scale == "group":
            expected /= _std(group) + 1e-4
        elif scale == "batch":
            expected /= _std(totals) + 1e-4
        assert out.advantages[i].item() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_group_relative_normalize_then_sum():
    r = _rewards(seed=1)
    w = torch.tensor([2.0, 0.5])
    out = policy.group_relative(r, w, num_generations=G, multi_objective_aggregation="normalize_then_sum")
    per = torch.zeros(len(r))
    for i in range(len(r)):
        lo = (i // G) * G
        for j in range(2):
            col = [float(r[k, j]) for k in range(lo, lo + G)]
            per[i] += w[j] * (r[i, j] - statistics.fmean(col)) / (_std(col) + 1e-4)
    expected = (per - per.mean()) / (_std(per.tolist()) + 1e-4)
    torch.testing.assert_close(out.advantages, expected, rtol=1e-5, atol=1e-6)


def test_zero_std_groups_flagged_and_unscored_rows_get_zero():
    r = torch.tensor([[1.0], [1.0], [1.0], [1.0], [0.0], [1.0], [float("nan")], [0.0]])
    out = policy.group_relative(r, torch.ones(1), num_generations=G)
    assert out.zero_std.tolist() == [True] * 4 + [False] * 4
    assert out.advantages[6].item() == 0.0
    assert out.advantages[:4].abs().max().item() == 0.0


@pytest.mark.parametrize("normalize", [False, True])
def test_leave_one_out(normalize):
    r = torch.tensor([1.0, 2.0, 4.0, 7.0, 0.5, float("nan"), 1.5, 2.5])
    out = policy.leave_one_out(r, num_generations=G, normalize_advantages=normalize)
    expected = []
    for i in range(len(r)):
        lo = (i // G) * G
        others = [float(r[k]) for k in range(lo, lo + G) if k != i and not math.isnan(r[k])]
        expected.append(float("nan") if math.isnan(r[i]) else float(r[i]) - statistics.fmean(others))
    if normalize:
        kept = [e for e in expected if not math.isnan(e)]
        expected = [(e - statistics.fmean(kept)) / (_std(kept) + 1e-4) for e in expected]
    expected = [0.0 if math.isnan(e) else e for e in expected]
    assert out.advantages.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-6)


def test_kl_estimators():
    lp, ref = torch.tensor([-1.0, -0.2]), torch.tensor([-0.5, -0.9])
    r = [math.exp(float(b - a)) for a, b in zip(lp, ref, strict=True)]
    assert policy.k1(lp, ref).tolist() == pytest.approx([-0.5, 0.7])
    assert policy.k2(lp, ref).tolist() == pytest.approx([0.125, 0.245])
    assert policy.k3(lp, ref).tolist() == pytest.approx([x - math.log(x) - 1 for x in r])


def _per_token_inputs(seed=0, N=6, T=5):
    g = torch.Generator().manual_seed(seed)
    logps = -torch.rand(N, T, generator=g) * 2
    old = logps + 0.3 * torch.randn(N, T, generator=g)
    mask = torch.ones(N, T)
    mask[0, 3:] = 0
    mask[2, 1:] = 0
    adv = torch.randn(N, generator=g)
    return logps, old, adv, mask


OPTIONS = dict(
    importance_sampling_level="token", epsilon_low=0.2, epsilon_high=0.28, delta=None,
    sapo_temperature_pos=1.0, sapo_temperature_neg=1.05,
    vespo_k_pos=2.0, vespo_lambda_pos=3.0, vespo_k_neg=3.0, vespo_lambda_neg=2.0,
)  # fmt: skip


def _token_loss(name, lp, old, a, options):
    """One token's loss, written out per loss type (token-level importance sampling)."""
    w = math.exp(lp - old)
    lo, hi = options["epsilon_low"], options["epsilon_high"]
    if name in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        capped = min(w, options["delta"]) if options["delta"] is not None else w
        return -min(capped * a, min(max(w, 1 - lo), 1 + hi) * a)
    if name == "cispo":
        return -min(w, hi) * a * lp
    if name == "sapo":
        tau = options["sapo_temperature_pos"] if a > 0 else options["sapo_temperature_neg"]
        return -4 / tau / (1 + math.exp(-tau * (w - 1))) * a
    raise AssertionError(name)


@pytest.mark.parametrize("name", ["grpo", "bnpo", "dr_grpo", "dapo", "luspo", "cispo", "sapo"])
@pytest.mark.parametrize("delta", [None, 1.1])
def test_token_level_losses_and_aggregations(name, delta):
    logps, old, adv, mask = _per_token_inputs()
    options = {**OPTIONS, "delta": delta}
    fn = registry.get("policy", name)
    terms = fn(logps, old, adv, mask, **options)
    L = 7
    per_row = [
        [
            _token_loss(name, float(logps[i, t]), float(old[i, t]), float(adv[i]), options)
            for t in range(5)
            if mask[i, t]
        ]
        for i in range(len(adv))
    ]
    n_tokens = sum(len(r) for r in per_row)
    expected = {
        "sequence_mean": sum(statistics.fmean(r) for r in per_row) / len(per_row),
        "sequence_sum": sum(sum(r) for r in per_row) / len(per_row),
        "micro_batch_mean": sum(sum(r) for r in per_row) / n_tokens,
        "constant_length": sum(sum(r) for r in per_row) / (len(per_row) * L),
        "token_mean": sum(sum(r) for r in per_row) / n_tokens,
    }[fn.aggregation]
    num_items = policy.units(fn.aggregation, mask)
    got = policy.aggregate(terms.per_token, mask, fn.aggregation, num_items, L)
    assert got.item() == pytest.approx(expected, rel=1e-5)


def test_aggregations_of_the_named_losses():
    got = {name: registry.get("policy", name).aggregation for name in registry.names("policy")}
    assert got == {
        "grpo": "sequence_mean", "sapo": "sequence_mean", "bnpo": "micro_batch_mean",
        "dr_grpo": "constant_length", "dapo": "token_mean", "cispo": "token_mean", "vespo": "token_mean",
        "luspo": "sequence_sum", "rloo": "row_mean",
    }  # fmt: skip


def test_sequence_level_ratio_is_the_mean_log_ratio():
    logps, old, adv, mask = _per_token_inputs(seed=3)
    terms = policy.grpo(logps, old, adv, mask, **{**OPTIONS, "importance_sampling_level": "sequence"})
    for i in range(len(adv)):
        n = int(mask[i].sum())
        w = math.exp(sum(float(logps[i, t] - old[i, t]) for t in range(n)) / n)
        a = float(adv[i])
        assert terms.ratio[i, 0].item() == pytest.approx(w, rel=1e-5)
        assert terms.per_token[i, 0].item() == pytest.approx(
            -min(w * a, min(max(w, 0.8), 1.28) * a), rel=1e-5
        )


def test_vespo_gamma_weight():
    logps, old, adv, mask = _per_token_inputs(seed=4)
    terms = policy.vespo(logps, old, adv, mask, **OPTIONS)
    for i in range(len(adv)):
        log_w = sum(float(logps[i, t] - old[i, t]) for t in range(5) if mask[i, t])
        k, lam = (2.0, 3.0) if adv[i] >= 0 else (3.0, 2.0)
        phi = math.exp(lam + k * log_w - lam * math.exp(log_w))
        for t in range(5):
            assert terms.per_token[i, t].item() == pytest.approx(
                -phi * float(adv[i]) * float(logps[i, t]), rel=1e-4
            )


def test_rloo_sequence_ratio():
    logps, old, adv, mask = _per_token_inputs(seed=5)
    terms = policy.rloo(logps, old, adv, mask, epsilon_low=0.2, epsilon_high=0.2)
    for i in range(len(adv)):
        w = math.exp(sum(float(logps[i, t] - old[i, t]) for t in range(5) if mask[i, t]))
        a = float(adv[i])
        assert terms.per_token[i, 0].item() == pytest.approx(-min(w * a, min(max(w, 0.8), 1.2) * a), rel=1e-5)


def test_clip_flags_count_the_tokens_whose_gradient_the_clip_removes():
    ratio = torch.tensor([[0.5, 1.0, 1.5]])
    flags = policy.clip_flags("dapo", ratio, torch.tensor([-1.0]), 0.2, 0.2)
    assert flags["clip_ratio/low_mean"].tolist() == [[True, False, False]]
    assert flags["clip_ratio/high_mean"].tolist() == [[False, False, False]]
    flags = policy.clip_flags("dapo", ratio, torch.tensor([1.0]), 0.2, 0.2)
    assert flags["clip_ratio/region_mean"].tolist() == [[False, False, True]]


def test_entropy_mask_keeps_the_top_quantile():
    entropy = torch.tensor([[0.1, 0.9, 0.5, 7.0], [0.3, 0.7, 0.2, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]])
    kept = policy.entropy_mask(entropy, mask, 0.5)
    values = sorted(float(e) for e, m in zip(entropy.flatten(), mask.flatten(), strict=True) if m)
    threshold = torch.quantile(torch.tensor(values), 0.5).item()
    expected = [
        [bool(m) and float(e) >= threshold for e, m in zip(re, rm, strict=True)]
        for re, rm in zip(entropy, mask, strict=True)
    ]
    assert kept.tolist() == expected
    assert not kept[0, 3]  # the masked token, though its entropy is the largest


def test_off_policy_mask():
    logps = torch.zeros(3, 2)
    old = torch.tensor([[1.0, 1.0], [1.0, 1.0], [0.0, 0.1]])
    mask = torch.ones(3, 2)
    keep = policy.off_policy_mask(torch.tensor([1.0, -1.0, -1.0]), logps, old, mask, 0.5)
    assert keep.flatten().tolist() == [
        1.0,
        0.0,
        1.0,
    ]  # positive advantage kept; negative with mean KL 1 dropped


def test_a_registered_policy_loss_is_found_by_name():
    @registry.register("policy", "test_plain_pg")
    @policy.aggregation("token_mean")
    def plain(logps, old_logps, advantages, mask, **_):
        return policy.PolicyTerms(-advantages[:, None] * logps, torch.exp(logps - old_logps))

    try:
        assert "test_plain_pg" in registry.names("policy")
        assert registry.get("policy", "test_plain_pg").aggregation == "token_mean"
    finally:
        registry._REGISTRY["policy"].pop("test_plain_pg")
    with pytest.raises(ValueError, match="unknown aggregation"):
        policy.aggregation("mean_of_nothing")
