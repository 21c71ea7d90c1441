"""PPO's pure functions (`posttrain.losses.ppo`) against a plain per-row, per-timestep Python loop written here,
in float64: whitening, the KL estimators, the per-token rewards, GAE, the clipped policy and value losses (values
and gradients). The batch has completions of different lengths, one that never stopped (it fills all T
positions) and one of a single token."""

import math

import pytest
import torch

from posttrain.losses import ppo, registry

LENGTHS = [6, 3, 1, 5]  # row 0 never stopped (T = 6), row 2 is its stop token alone
N, T = len(LENGTHS), 6


def mask_of(lengths=LENGTHS):
    return torch.tensor([[1.0 if t < n else 0.0 for t in range(T)] for n in lengths], dtype=torch.float64)


def rand(seed, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(N, T, generator=g, dtype=torch.float64) * scale


def masked_entries(x, lengths=LENGTHS):
    return [float(x[i, t]) for i, n in enumerate(lengths) for t in range(n)]


def loop_mean(values):
    return sum(values) / len(values)


def loop_var(values, unbiased=True):
    m = loop_mean(values)
    return sum((v - m) ** 2 for v in values) / (len(values) - (1 if unbiased else 0))


# ---------------------------------------------------------------------------------------------------------
# Statistics
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shift_mean", [True, False])
def test_masked_whiten_is_the_masked_entries_standardised(shift_mean):
    x, mask = rand(0, 3.0) + 1.5, mask_of()
    entries = masked_entries(x)
    mean, var = loop_mean(entries), loop_var(entries)  # unbiased, as TRL's masked_var
    got = ppo.masked_whiten(x, mask, shift_mean=shift_mean)
    for i in range(N):
        for t in range(T):  # every entry is transformed, the masked ones too (the caller zeroes them)
            want = (float(x[i, t]) - mean) / math.sqrt(var + 1e-8) + (0.0 if shift_mean else mean)
            assert float(got[i, t]) == pytest.approx(want, rel=1e-12, abs=1e-12)
    kept = mask.bool()
    assert float(got[kept].mean()) == pytest.approx(0.0 if shift_mean else mean, abs=1e-12)
    assert float(got[kept].std()) == pytest.approx(1.0, rel=1e-7)


def test_masked_var_needs_two_entries():
    with pytest.raises(ValueError, match="1 masked entries, an unbiased variance needs at least 2"):
        ppo.masked_var(rand(0), mask_of([1, 0, 0, 0]))


def test_explained_variance_is_cleanrls_formula():
    returns, values, mask = rand(1, 2.0), rand(2), mask_of()
    r, v = masked_entries(returns), masked_entries(values)
    want = 1 - loop_var([a - b for a, b in zip(r, v, strict=True)], False) / loop_var(r, False)
    assert float(ppo.explained_variance(values, returns, mask)) == pytest.approx(want, rel=1e-12)
    assert float(ppo.explained_variance(returns, returns, mask)) == 1.0  # a perfect value model
    constant = torch.full_like(returns, loop_mean(r))
    assert float(ppo.explained_variance(constant, returns, mask)) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------------------
# KL estimators and per-token rewards
# ---------------------------------------------------------------------------------------------------------


def loop_kl(logp, ref, estimator):
    log_r = ref - logp  # Schulman's r = pi_ref / pi, sampled under pi (TRL's logr)
    return -log_r if estimator == "k1" else (math.exp(log_r) - 1) - log_r


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_the_registered_kl_estimators_are_trls(estimator):
    logps, ref = -rand(3).abs(), -rand(4).abs()
    got = registry.get("kl", estimator)(logps, ref)
    for i in range(N):
        for t in range(T):
            assert float(got[i, t]) == pytest.approx(
                loop_kl(float(logps[i, t]), float(ref[i, t]), estimator), rel=1e-12
            )


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_token_rewards_put_the_score_on_the_last_token(estimator):
    logps, ref, mask = -rand(5).abs(), -rand(6).abs(), mask_of()
    scores = torch.tensor([1.0, -0.5, 2.0, 0.25], dtype=torch.float64)
    kl_coef = 0.05
    out = ppo.token_rewards(logps, ref, scores, mask, kl_coef=kl_coef, kl_estimator=estimator)
    for i, n in enumerate(LENGTHS):
        for t in range(T):
            kl = loop_kl(float(logps[i, t]), float(ref[i, t]), estimator) if t < n else 0.0
            reward = -kl_coef * kl + (float(scores[i]) if t == n - 1 else 0.0)
            assert float(out.kl[i, t]) == pytest.approx(kl, rel=1e-12, abs=1e-15)
            assert float(out.non_score[i, t]) == pytest.approx(-kl_coef * kl, rel=1e-12, abs=1e-15)
            assert float(out.rewards[i, t]) == pytest.approx(reward, rel=1e-12, abs=1e-15)


# ---------------------------------------------------------------------------------------------------------
# GAE
# ---------------------------------------------------------------------------------------------------------


def loop_gae(rewards, values, lengths, gamma, lam):
    """Per row, backwards from its last token; nothing after it (no bootstrap past the stop token or past T)."""
    advantages = [[0.0] * T for _ in lengths]
    returns = [[0.0] * T for _ in lengths]
    for i, n in enumerate(lengths):
        following = 0.0
        for t in reversed(range(n)):
            next_value = float(values[i, t + 1]) if t + 1 < n else 0.0
            delta = float(rewards[i, t]) + gamma * next_value - float(values[i, t])
            following = delta + gamma * lam * following
            advantages[i][t] = following
            returns[i][t] = following + float(values[i, t])
    return torch.tensor(advantages, dtype=torch.float64), torch.tensor(returns, dtype=torch.float64)


@pytest.mark.parametrize(("gamma", "lam"), [(1.0, 0.95), (0.9, 0.5), (1.0, 1.0), (0.99, 0.0)])
def test_gae_equals_the_per_timestep_loop(gamma, lam):
    rewards, values, mask = rand(7), rand(8), mask_of()
    # what lies off the mask must not leak in: fill it with garbage
    rewards, values = rewards + 100 * (1 - mask), values - 50 * (1 - mask)
    advantages, returns = registry.get("ppo_advantage", "gae")(rewards, values, mask, gamma=gamma, lam=lam)
    want_adv, want_ret = loop_gae(rewards, values, LENGTHS, gamma, lam)
    torch.testing.assert_close(advantages, want_adv, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(returns, want_ret, rtol=1e-12, atol=1e-12)


def test_gae_pinned_numbers():
    # one row of 3 tokens, gamma = 1, lam = 0.5: rewards [0, 0, 1], values [0.5, 0.25, 0.75]
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0]], dtype=torch.float64)
    values = torch.tensor([[0.5, 0.25, 0.75, 9.0]], dtype=torch.float64)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]], dtype=torch.float64)
    advantages, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.5)
    # delta_2 = 1 - 0.75 = 0.25; delta_1 = 0 + 0.75 - 0.25 = 0.5; delta_0 = 0 + 0.25 - 0.5 = -0.25
    # A_2 = 0.25; A_1 = 0.5 + 0.5 * 0.25 = 0.625; A_0 = -0.25 + 0.5 * 0.625 = 0.0625
    torch.testing.assert_close(advantages, torch.tensor([[0.0625, 0.625, 0.25, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(returns, torch.tensor([[0.5625, 0.875, 1.0, 0.0]], dtype=torch.float64))


def test_gae_with_lam_one_and_gamma_one_gives_reward_to_go_returns():
    rewards, values, mask = rand(9), rand(10), mask_of()
    _, returns = ppo.gae(rewards, values, mask, gamma=1.0, lam=1.0)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            assert float(returns[i, t]) == pytest.approx(
                sum(float(rewards[i, k]) for k in range(t, n)), rel=1e-12
            )


# ---------------------------------------------------------------------------------------------------------
# Losses: values and gradients
# ---------------------------------------------------------------------------------------------------------


def loop_policy_loss(logps, old, adv, lengths, eps):
    """The micro-batch's masked mean of max(-A w, -A clip(w)), one token at a time; and the clip fraction."""
    terms, clipped = [], []
    for i, n in enumerate(lengths):
        for t in range(n):
            w = torch.exp(logps[i, t] - old[i, t])
            a = -adv[i, t] * w
            b = -adv[i, t] * torch.clamp(w, 1 - eps, 1 + eps)
            terms.append(torch.maximum(a, b))
            clipped.append(float(b > a))
    return sum(terms) / len(terms), sum(clipped) / len(clipped)


def loop_value_loss(v, old, ret, lengths, c):
    terms, clipped = [], []
    for i, n in enumerate(lengths):
        for t in range(n):
            vc = torch.clamp(v[i, t], old[i, t] - c, old[i, t] + c)
            a, b = (v[i, t] - ret[i, t]) ** 2, (vc - ret[i, t]) ** 2
            terms.append(torch.maximum(a, b))
            clipped.append(float(b > a))
    return 0.5 * sum(terms) / len(terms), sum(clipped) / len(clipped)


def aggregated(terms, mask):
    from posttrain.losses import policy

    return policy.aggregate(terms.per_token, mask, "micro_batch_mean", 1)


@pytest.mark.parametrize("cliprange", [0.2, 0.05])
def test_clipped_policy_loss_and_gradient_equal_the_loop(cliprange):
    mask = mask_of()
    old = -rand(11).abs()
    logps = (old + rand(12, 0.3)).requires_grad_()  # ratios spread around 1: both branches taken
    adv = rand(13) * mask
    fn = registry.get("ppo_policy", "clipped")
    terms = fn(logps, old, adv, mask, cliprange=cliprange)
    loss = aggregated(terms, mask)
    (grad,) = torch.autograd.grad(loss, logps)

    ref_logps = logps.detach().clone().requires_grad_()
    want, want_clipfrac = loop_policy_loss(ref_logps, old, adv, LENGTHS, cliprange)
    (want_grad,) = torch.autograd.grad(want, ref_logps)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert float(ppo.masked_mean(terms.clipped.double(), mask)) == pytest.approx(want_clipfrac)
    assert 0 < want_clipfrac < 1  # both branches were exercised
    assert (grad * (1 - mask)).abs().max() == 0  # padding gets no gradient


def test_clipped_policy_loss_pinned_numbers():
    # ratio e with A = 1: the clipped branch 1.2 wins the min of the objective, so the loss is -1.2, no gradient
    logps = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 2, dtype=torch.float64)
    adv = torch.tensor([[1.0, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.float64)
    terms = ppo.clipped_policy(logps, old, adv, mask, cliprange=0.2)
    # token 0: max(-e, -1.2) = -1.2 (clipped); token 1: ratio 1, max(1, 1) = 1 (not clipped, gradient -A w = 1)
    torch.testing.assert_close(terms.per_token, torch.tensor([[-1.2, 1.0]], dtype=torch.float64))
    assert terms.clipped.tolist() == [[True, False]]
    terms.per_token.sum().backward()
    torch.testing.assert_close(logps.grad, torch.tensor([[0.0, 1.0]], dtype=torch.float64))


@pytest.mark.parametrize("cliprange_value", [0.2, 1.0])
def test_clipped_value_loss_and_gradient_equal_the_loop(cliprange_value):
    mask = mask_of()
    old, returns = rand(14), rand(15, 2.0)
    values = (old + rand(16, 0.4)).requires_grad_()
    fn = registry.get("ppo_value", "clipped")
    terms = fn(values, old, returns, mask, cliprange_value=cliprange_value)
    loss = aggregated(terms, mask)
    (grad,) = torch.autograd.grad(loss, values)

    ref_values = values.detach().clone().requires_grad_()
    want, want_clipfrac = loop_value_loss(ref_values, old, returns, LENGTHS, cliprange_value)
    (want_grad,) = torch.autograd.grad(want, ref_values)
    assert loss.item() == pytest.approx(want.item(), rel=1e-12)
    torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-15)
    assert float(ppo.masked_mean(terms.clipped.double(), mask)) == pytest.approx(want_clipfrac)
    assert (grad * (1 - mask)).abs().max() == 0


def test_the_whole_pipeline_equals_the_loop():
    """Rewards -> GAE -> whitened advantages -> policy loss, end to end, against the loops chained by hand."""
    mask = mask_of()
    old, ref, values = -rand(17).abs(), -rand(18).abs(), rand(19)
    scores = torch.tensor([1.0, 0.0, -1.0, 0.5], dtype=torch.float64)
    rewards = ppo.token_rewards(old, ref, scores, mask, kl_coef=0.1, kl_estimator="k3").rewards
    advantages, _ = ppo.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    advantages = ppo.masked_whiten(advantages, mask) * mask
    logps = (old + rand(20, 0.2)).requires_grad_()
    loss = aggregated(ppo.clipped_policy(logps, old, advantages, mask, cliprange=0.2), mask)

    loop_rewards = torch.zeros(N, T, dtype=torch.float64)
    for i, n in enumerate(LENGTHS):
        for t in range(n):
            kl = loop_kl(float(old[i, t]), float(ref[i, t]), "k3")
            loop_rewards[i, t] = -0.1 * kl + (float(scores[i]) if t == n - 1 else 0.0)
    loop_adv, _ = loop_gae(loop_rewards, values, LENGTHS, 1.0, 0.95)
    entries = masked_entries(loop_adv)
    mean, std = loop_mean(entries), math.sqrt(loop_var(entries) + 1e-8)
    whitened = (loop_adv - mean) / std * mask
    want, _ = loop_policy_loss(logps, old, whitened, LENGTHS, 0.2)
    assert loss.item() == pytest.approx(want.item(), rel=1e-10)
