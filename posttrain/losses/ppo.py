"""PPO with a learned value model for language models: per-token rewards, GAE, whitening, the clipped policy
and value losses (Schulman et al. 2017, arXiv:1707.06347; GAE: Schulman et al. 2015, arXiv:1506.02438; the
RLHF form of Ziegler et al. 2019, arXiv:1909.08593), with the semantics of TRL's last PPOTrainer.

Notation: N completions (rows), T completion positions (right-padded: row i's tokens are 0 .. L_i - 1, its
stop token last when it stopped, L_i = T possible for one that never stopped). Per token (N, T), zero off the
mask unless said otherwise:
    logps       log pi_theta(y_t | x, y_<t), the policy being trained (carries the gradient)
    old_logps   the same under the policy that sampled the batch (no gradient)
    ref_logps   the same under the frozen reference
    values      V(s_t), the value model's estimate of the state before token t (x, y_<t)
    mask        1 on completion tokens, up to and including the stop token
    scores      (N,) one score per completion (reward model or reward functions)

Three registries, one per piece a user might swap:
    "ppo_advantage"  estimator(rewards, values, mask, *, gamma, lam) -> (advantages, returns), each (N, T)
    "ppo_policy"     loss(logps, old_logps, advantages, mask, *, cliprange) -> Clipped per-token terms
    "ppo_value"      loss(values, old_values, returns, mask, *, cliprange_value) -> Clipped per-token terms
The loop aggregates each per-token loss as TRL does: the masked mean over a micro-batch (`policy.aggregate`'s
"micro_batch_mean").

Where this departs from TRL (each time for the plain semantics, said again in `rl.ppo`): the score is added on
the last real token of the completion (TRL adds it one position after the stop token when the batch is wider
than the completion, which makes the value one past the stop token part of the value loss, and on the last
token otherwise); padding carries no KL, value or advantage (TRL's INVALID_LOGPROB = 1 on both log-probs, so
KL 0 there, and values 0: the same numbers).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .registry import get, register

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Masked statistics (TRL's masked_mean / masked_var / masked_whiten)
# ---------------------------------------------------------------------------------------------------------


def masked_mean(x: Tensor, mask: Tensor) -> Tensor:
    """Mean of x over the mask's entries (any shape, one number)."""
    return (x * mask).sum() / mask.sum()


def masked_var(x: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance of x over the mask's entries; unbiased: Bessel's n / (n - 1)."""
    variance = masked_mean((x - masked_mean(x, mask)) ** 2, mask)
    if unbiased:
        n = mask.sum()
        if n < 2:
            raise ValueError(f"masked_var: {int(n)} masked entries, an unbiased variance needs at least 2")
        variance = variance * n / (n - 1)
    return variance


def masked_whiten(x: Tensor, mask: Tensor, shift_mean: bool = True, eps: float = 1e-8) -> Tensor:
    """(x - mean) / sqrt(var + eps), mean and unbiased variance over the mask; with shift_mean=False the mean is
    added back (only the scale changes: TRL's choice for rewards). Every entry is transformed, masked or not."""
    mean = masked_mean(x, mask)
    whitened = (x - mean) * torch.rsqrt(masked_var(x, mask) + eps)
    return whitened if shift_mean else whitened + mean


def explained_variance(values: Tensor, returns: Tensor, mask: Tensor) -> Tensor:
    """1 - Var(returns - values) / Var(returns) over the mask (cleanRL / OpenRLHF): 1 a perfect value model,
    0 no better than a constant, negative worse; NaN when the returns do not vary."""
    return 1 - masked_var(returns - values, mask, unbiased=False) / masked_var(returns, mask, unbiased=False)


# ---------------------------------------------------------------------------------------------------------
# Rewards per token
# ---------------------------------------------------------------------------------------------------------


class TokenRewards(NamedTuple):
    """rewards (N, T): -kl_coef x KL per token, plus the score on each row's last token; kl (N, T) the
    per-token KL estimate; non_score (N, T) = -kl_coef x kl. All zero off the mask."""

    rewards: Tensor
    kl: Tensor
    non_score: Tensor


def last_token_index(mask: Tensor) -> Tensor:
    """(N,) the position of each row's last masked token (0 for a row with none)."""
    return (mask.sum(-1) - 1).clamp(min=0).long()


def token_rewards(
    logps: Tensor, ref_logps: Tensor, scores: Tensor, mask: Tensor, *, kl_coef: float, kl_estimator: str
) -> TokenRewards:
    """r_t = -kl_coef x KL_t + [t = L - 1] x score (Ziegler et al. 2019, eq. 2, per token as TRL).

    KL_t is the registered estimator `kl_estimator` of the sampled tokens' log-probs (k1: log pi - log pi_ref;
    k3: (ratio - 1) - log ratio with ratio = pi_ref / pi). logps, ref_logps, mask (N, T); scores (N,)."""
    mask = mask.to(logps.dtype)
    kl = get("kl", kl_estimator)(logps, ref_logps) * mask
    non_score = -kl_coef * kl
    last = torch.nn.functional.one_hot(last_token_index(mask), mask.shape[1]).to(logps.dtype) * mask
    return TokenRewards(non_score + scores[:, None] * last, kl, non_score)


# ---------------------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------------------


@register("ppo_advantage", "gae")
def gae(rewards: Tensor, values: Tensor, mask: Tensor, *, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation (Schulman et al. 2015, eq. 16), backwards over the completion:

        delta_t = r_t + gamma V_{t+1} - V_t,   A_t = delta_t + gamma lam A_{t+1},   returns_t = A_t + V_t

    with V and r zero past a row's last token, so A_T = V_T = 0: a row that stops gets no bootstrap after its
    stop token, and one that never stopped none after position T - 1 (as TRL). rewards, values, mask (N, T)
    -> advantages, returns (N, T), zero off the mask (not whitened)."""
    mask = mask.to(rewards.dtype)
    rewards, values = rewards * mask, values * mask
    last = torch.zeros_like(rewards[:, 0])
    next_value = torch.zeros_like(rewards[:, 0])
    advantages = []
    for t in reversed(range(rewards.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        last = delta + gamma * lam * last
        advantages.append(last)
        next_value = values[:, t]
    advantages = torch.stack(advantages[::-1], dim=1) * mask
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------------------
# Losses
# ---------------------------------------------------------------------------------------------------------


class Clipped(NamedTuple):
    """per_token (N, T): the loss before aggregation (masking included by the aggregation); clipped (N, T)
    bool: where the clipped branch is the larger (TRL's clipfrac); ratio (N, T) pi_theta / pi_old (policy
    loss only; None for the value loss)."""

    per_token: Tensor
    clipped: Tensor
    ratio: Tensor | None = None


@register("ppo_policy", "clipped")
def clipped_policy(logps: Tensor, old_logps: Tensor, advantages: Tensor, mask: Tensor, *, cliprange: float):
    """PPO's clipped surrogate per token (Schulman et al. 2017, eq. 7), written as a loss:

        max(-A_t w_t, -A_t clip(w_t, 1 - eps, 1 + eps)),   w_t = exp(log pi_theta - log pi_old)

    advantages (N, T) per token (whitened by the caller)."""
    ratio = torch.exp((logps - old_logps) * mask)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    return Clipped(torch.maximum(unclipped, clipped), clipped > unclipped, ratio)


@register("ppo_value", "clipped")
def clipped_value(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, *, cliprange_value: float
):
    """The clipped value loss (OpenAI baselines' PPO2, as TRL): the new value may move at most cliprange_value
    from the rollout's value before its error stops counting,

        0.5 x max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)

    values (N, T) with gradient; old_values, returns (N, T) from the rollout."""
    clipped_values = torch.clamp(values, old_values - cliprange_value, old_values + cliprange_value)
    unclipped = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    return Clipped(0.5 * torch.maximum(unclipped, clipped), clipped > unclipped)
