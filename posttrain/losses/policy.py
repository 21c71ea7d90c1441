"""Policy-gradient losses of the online loops (GRPO's family, RLOO), their KL estimators, advantage
estimators and loss aggregations, with the semantics of TRL 1.16's GRPOTrainer and RLOOTrainer.

Notation: N completions (rows), T completion positions, G = num_generations (a prompt's G completions are
adjacent rows), F reward functions. Per token (N, T), zero off the mask:
    logps       log pi_theta(y_t | x, y_<t), the policy being trained (carries the gradient)
    old_logps   the same under the policy that sampled the batch (no gradient; logps.detach() on-policy)
    ref_logps   the same under the frozen reference
    mask        1 on completion tokens, up to and including the stop token
    advantages  (N,) one per completion, broadcast over its tokens

Four registries, each looked up by a config option:

    "policy"     loss(logps, old_logps, advantages, mask, *, importance_sampling_level, **options)
                 -> PolicyTerms: the per-token loss before aggregation (N, T) or, for sequence-level
                 losses, (N, 1), and the importance weight it used (for the clip metrics)
    "kl"         estimator(logps, ref_logps) -> (N, T) per-token estimate of KL(pi_theta || pi_ref)
    "advantage"  estimator(rewards, *, num_generations, **options) -> Advantages
    aggregation  each policy loss names how its per-token losses become one number (`AGGREGATIONS`), the
                 property that tells grpo from bnpo from dr_grpo from dapo

A user adds a policy loss by registering one function and naming its aggregation:

    @register("policy", "my_loss")
    @aggregation("token_mean")
    def my_loss(logps, old_logps, advantages, mask, *, importance_sampling_level, epsilon_low, **_):
        ...
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch

from .registry import register

Tensor = torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# KL estimators (Schulman, "Approximating KL divergence", 2020): r = ref / pi, sampled under pi
# ---------------------------------------------------------------------------------------------------------


@register("kl", "k1")
def k1(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """log pi - log pi_ref: unbiased, can be negative per token (RLOO's penalty, summed per sequence)."""
    return logps - ref_logps


@register("kl", "k2")
def k2(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """(log pi - log pi_ref)^2 / 2: biased, non-negative, low variance."""
    return 0.5 * (logps - ref_logps) ** 2


@register("kl", "k3")
def k3(logps: Tensor, ref_logps: Tensor) -> Tensor:
    """r - log r - 1 with r = pi_ref / pi: unbiased and non-negative (GRPO's per-token KL term)."""
    log_r = ref_logps - logps
    return torch.exp(log_r) - log_r - 1


# ---------------------------------------------------------------------------------------------------------
# Rewards -> advantages
# ---------------------------------------------------------------------------------------------------------


class Advantages(NamedTuple):
    """advantages (N,) float32, 0 for completions no reward function scored; zero_std (N,) bool, the
    completions whose group (or batch, by the scaling) has rewards of zero spread (frac_reward_zero_std)."""

    advantages: Tensor
    zero_std: Tensor


def nanstd(x: Tensor, dim: int | None = None, keepdim: bool = False) -> Tensor:
    """Sample standard deviation (Bessel's correction) over the non-NaN entries; NaN with fewer than two."""
    dims = () if dim is None else (dim,)
    mean = torch.nanmean(x, dim=dims or None, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dims or None, keepdim=True)
    squares = torch.nansum((x - mean) ** 2, dim=dims or None, keepdim=True)
    std = torch.where(count > 1, squares / (count - 1), float("nan")).sqrt()
    return std if keepdim else std.squeeze(dims) if dims else std.reshape(())


def weighted_rewards(rewards_per_func: Tensor, weights: Tensor) -> Tensor:
    """(N, F) rewards (NaN: the function returned None) and (F,) weights -> (N,) sum of the weighted scored
    ones; NaN where no function scored the completion."""
    total = (rewards_per_func * weights).nansum(dim=1)
    return total.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))


SCALE_REWARDS = ("group", "batch", "none")
AGGREGATE_OBJECTIVES = ("sum_then_normalize", "normalize_then_sum")


@register("advantage", "group")
def group_relative(
    rewards_per_func: Tensor,
    weights: Tensor,
    *,
    num_generations: int,
    scale_rewards: str = "group",
    multi_objective_aggregation: str = "sum_then_normalize",
    eps: float = 1e-4,
) -> Advantages:
    """GRPO (Shao et al. 2024, arXiv:2402.03300): A_i = (r_i - mean of its group) / (std + eps).

    sum_then_normalize: r = the weighted sum of the functions' rewards; std over the group (`scale_rewards`
    group), over the whole batch (batch; PPO-Lite), or no division (none; Dr. GRPO). normalize_then_sum:
    each function's rewards are normalised within the group first, then weighted and summed, then the sum
    normalised over the batch (GDPO). Statistics skip the completions no function scored; their advantage is 0.
    """
    G = num_generations
    if multi_objective_aggregation == "sum_then_normalize":
        rewards = weighted_rewards(rewards_per_func, weights)
        groups = rewards.view(-1, G)
        mean = torch.nanmean(groups, dim=1).repeat_interleave(G)
        if scale_rewards == "batch":
            std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        else:  # "none" still computes the group std, for frac_reward_zero_std
            std = nanstd(groups, dim=1).repeat_interleave(G)
        advantages = rewards - mean
        if scale_rewards != "none":
            advantages = advantages / (std + eps)
    elif multi_objective_aggregation == "normalize_then_sum":
        grouped = rewards_per_func.view(-1, G, rewards_per_func.shape[1])
        normalised = (grouped - torch.nanmean(grouped, dim=1, keepdim=True)) / (
            nanstd(grouped, dim=1, keepdim=True) + eps
        )
        rewards = (normalised.view_as(rewards_per_func) * weights).nansum(dim=1)
        rewards = rewards.masked_fill(torch.isnan(rewards_per_func).all(dim=1), float("nan"))
        std = nanstd(rewards).expand_as(rewards) if rewards.numel() > 1 else torch.zeros_like(rewards)
        advantages = (rewards - torch.nanmean(rewards)) / (std + eps)
    else:
        raise ValueError(
            f"multi_objective_aggregation must be one of {AGGREGATE_OBJECTIVES}, got {multi_objective_aggregation!r}"
        )
    zero_std = torch.isclose(std, torch.zeros_like(std))
    return Advantages(torch.nan_to_num(advantages, nan=0.0), zero_std)


@register("advantage", "leave_one_out")
def leave_one_out(
    rewards: Tensor, *, num_generations: int, normalize_advantages: bool = False, eps: float = 1e-4
) -> Advantages:
    """RLOO (Ahmadian et al. 2024, arXiv:2402.14740): A_i = r_i - the mean of the other scored rewards of its
    group; optionally normalised over the batch. rewards (N,), NaN where unscored (advantage 0)."""
    G = num_generations
    groups = rewards.view(-1, G)
    scored = (~torch.isnan(groups)).sum(dim=1, keepdim=True)
    baselines = (torch.nansum(groups, dim=1, keepdim=True) - groups) / (scored - 1)  # a lone scored one: NaN
    advantages = rewards - baselines.view(-1)
    if normalize_advantages:
        advantages = (advantages - torch.nanmean(advantages)) / (nanstd(advantages) + eps)
    std = nanstd(groups, dim=1).repeat_interleave(G)
    return Advantages(torch.nan_to_num(advantages, nan=0.0), torch.isclose(std, torch.zeros_like(std)))


# ---------------------------------------------------------------------------------------------------------
# Loss aggregation: how per-token losses (N, T) become one number
# ---------------------------------------------------------------------------------------------------------
#
# The loop splits an optimizer step into micro-batches and calls the loss once per micro-batch with
# `num_items`, the step's total of the aggregation's unit (`units`), so that the micro-batch losses add up
# to the step's loss however the step is split (`rl.loop`). The units, and what the loss divides by:
#
#   sequence_mean      rows          sum over rows of (the row's token mean) / num_items        (grpo, sapo)
#   sequence_sum       rows          sum over rows of (the row's token sum) / num_items         (luspo)
#   micro_batch_mean   micro-batches (this micro-batch's token mean) / num_items                (bnpo)
#   constant_length    rows          token sum / (num_items * max_completion_length)           (dr_grpo)
#   token_mean         tokens        token sum / num_items                                     (dapo, cispo,
#                                    (the generation batch's tokens spread over its steps, TRL's)  vespo)
#   row_mean           rows          sum of the (N, 1) per-sequence losses / num_items           (rloo)

AGGREGATIONS = (
    "sequence_mean",
    "sequence_sum",
    "micro_batch_mean",
    "constant_length",
    "token_mean",
    "row_mean",
)


def aggregation(name: str) -> Callable[[Callable], Callable]:
    """Decorator: the aggregation (one of `AGGREGATIONS`) a policy loss uses."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown aggregation {name!r}; expected one of {AGGREGATIONS}")

    def mark(fn: Callable) -> Callable:
        fn.aggregation = name
        return fn

    return mark


def aggregate(
    per_token: Tensor,
    mask: Tensor,
    how: str,
    num_items: Tensor | int,
    max_completion_length: int | None = None,
) -> Tensor:
    """This micro-batch's share of the step's loss: per_token (N, T) (or (N, 1), broadcast over the
    mask) aggregated as `how` says, num_items the step's total of that aggregation's unit."""
    if how == "row_mean":
        return per_token.sum() / num_items
    masked = per_token * mask
    if how == "sequence_mean":
        return (masked.sum(-1) / mask.sum(-1).clamp(min=1)).sum() / num_items
    if how == "sequence_sum":
        return masked.sum() / num_items
    if how == "micro_batch_mean":
        return masked.sum() / mask.sum().clamp(min=1) / num_items
    if how == "constant_length":
        return masked.sum() / (num_items * max_completion_length)
    if how == "token_mean":
        return masked.sum() / num_items
    raise ValueError(f"unknown aggregation {how!r}; expected one of {AGGREGATIONS}")


def units(how: str, mask: Tensor) -> Tensor | int:
    """What one micro-batch adds to num_items under aggregation `how` (token_mean's loops override it with
    the generation batch's spread, `rl.grpo`)."""
    if how == "micro_batch_mean":
        return 1
    if how == "token_mean":
        return mask.sum()
    return mask.shape[0]


# ---------------------------------------------------------------------------------------------------------
# Policy losses
# ---------------------------------------------------------------------------------------------------------


class PolicyTerms(NamedTuple):
    """per_token: (N, T) or (N, 1) loss before aggregation (masking included by `aggregate`); ratio: the
    importance weight pi_theta / pi_old the loss used, (N, T) or (N, 1), for the clip metrics."""

    per_token: Tensor
    ratio: Tensor


IMPORTANCE_SAMPLING_LEVELS = ("token", "sequence")


def log_importance_weights(logps: Tensor, old_logps: Tensor, mask: Tensor, level: str) -> Tensor:
    """log pi_theta / pi_old per token (N, T), or (GSPO, Zheng et al. 2025, arXiv:2507.18071) the sequence's
    mean of it (N, 1)."""
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1)).unsqueeze(-1)
    raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_SAMPLING_LEVELS}, got {level!r}")


def _surrogate(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    importance_sampling_level,
    epsilon_low,
    epsilon_high,
    delta=None,
    **_,
):
    """PPO's clipped surrogate -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A), the unclipped w capped at
    delta first when given (two-sided clipping, INTELLECT-2); the ratio returned is that capped w."""
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    clipped = ratio.clamp(1 - epsilon_low, 1 + epsilon_high)
    if delta is not None:
        ratio = ratio.clamp(max=delta)
    A = advantages[:, None]
    return PolicyTerms(-torch.min(ratio * A, clipped * A), ratio)


@register("policy", "grpo")
@aggregation("sequence_mean")
def grpo(logps, old_logps, advantages, mask, **options):
    """The clipped surrogate, token mean per sequence, then mean over sequences (GRPO)."""
    return _surrogate(logps, old_logps, advantages, mask, **options)


@register("policy", "bnpo")
@aggregation("micro_batch_mean")
def bnpo(logps, old_logps, advantages, mask, **options):
    """The clipped surrogate, token mean per micro-batch (TRL's bnpo: normalised by the local batch)."""
    return _surrogate(logps, old_logps, advantages, mask, **options)


@register("policy", "dr_grpo")
@aggregation("constant_length")
def dr_grpo(logps, old_logps, advantages, mask, **options):
    """The clipped surrogate over rows x max_completion_length (Dr. GRPO, Liu et al. 2025, arXiv:2503.20783)."""
    return _surrogate(logps, old_logps, advantages, mask, **options)


@register("policy", "dapo")
@aggregation("token_mean")
def dapo(logps, old_logps, advantages, mask, **options):
    """The clipped surrogate, token mean over the step (DAPO, Yu et al. 2025, arXiv:2503.14476)."""
    return _surrogate(logps, old_logps, advantages, mask, **options)


@register("policy", "luspo")
@aggregation("sequence_sum")
def luspo(logps, old_logps, advantages, mask, **options):
    """The clipped surrogate summed over each sequence (LUSPO: GSPO scaled by length, arXiv:2602.05261)."""
    return _surrogate(logps, old_logps, advantages, mask, **options)


@register("policy", "cispo")
@aggregation("token_mean")
def cispo(logps, old_logps, advantages, mask, *, importance_sampling_level, epsilon_high, **_):
    """-sg(min(w, eps_high)) A log pi: the weight clipped and detached, the gradient through log pi
    (MiniMax-M1, arXiv:2506.13585). Here epsilon_high is the cap on w itself (TRL's convention)."""
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    weight = ratio.clamp(max=epsilon_high).detach()
    return PolicyTerms(-weight * advantages[:, None] * logps, ratio)


@register("policy", "sapo")
@aggregation("sequence_mean")
def sapo(
    logps,
    old_logps,
    advantages,
    mask,
    *,
    importance_sampling_level,
    sapo_temperature_pos,
    sapo_temperature_neg,
    **_,
):
    """-(4 / tau) sigmoid(tau (w - 1)) A: a soft gate in place of the clip, tau by the advantage's sign
    (SAPO, arXiv:2511.20347)."""
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    A = advantages[:, None]
    tau = torch.where(A > 0, sapo_temperature_pos, sapo_temperature_neg)
    return PolicyTerms(-torch.sigmoid(tau * (ratio - 1)) * 4 / tau * A, ratio)


@torch.no_grad()
def gamma_weights(
    advantages: Tensor,
    log_ratio: Tensor,
    mask: Tensor,
    *,
    k_pos: float,
    lambda_pos: float,
    k_neg: float,
    lambda_neg: float,
) -> Tensor:
    """VESPO's weight phi(w) = e^lambda w^k e^(-lambda w) (phi(1) = 1) of the sequence ratio
    w = exp(sum of the clamped per-token log-ratios), k and lambda by the advantage's sign; (N, 1), detached."""
    low = math.log(1e-8)
    log_w = (log_ratio.clamp(-20.0, 20.0) * mask).sum(-1, keepdim=True).clamp(low, 20.0)
    positive = advantages[:, None] >= 0
    k = torch.where(positive, k_pos, k_neg)
    lam = torch.where(positive, lambda_pos, lambda_neg).clamp(min=1e-4)
    return torch.exp(lam + k * log_w - lam * torch.exp(log_w)).nan_to_num(nan=0.0, posinf=0.0, neginf=0.0)


@register("policy", "vespo")
@aggregation("token_mean")
def vespo(
    logps, old_logps, advantages, mask, *, importance_sampling_level, vespo_k_pos, vespo_lambda_pos,
    vespo_k_neg, vespo_lambda_neg, **_,
):  # fmt: skip
    """-phi(w) A log pi with VESPO's gamma weight of the sequence ratio (`gamma_weights`, arXiv:2602.10693)."""
    phi = gamma_weights(
        advantages, logps - old_logps, mask,
        k_pos=vespo_k_pos, lambda_pos=vespo_lambda_pos, k_neg=vespo_k_neg, lambda_neg=vespo_lambda_neg,
    )  # fmt: skip
    ratio = torch.exp(log_importance_weights(logps, old_logps, mask, importance_sampling_level))
    return PolicyTerms(-phi * advantages[:, None] * logps, ratio)


@register("policy", "rloo")
@aggregation("row_mean")
def rloo(logps, old_logps, advantages, mask, *, epsilon_low, epsilon_high, **_):
    """The clipped surrogate of whole sequences, w = pi_theta(y|x) / pi_old(y|x) (TRL 1.16's RLOOTrainer):
    -min(w A, clip(w, 1 - eps_low, 1 + eps_high) A) per completion, (N, 1)."""
    ratio = torch.exp(((logps - old_logps) * mask).sum(-1, keepdim=True))
    A = advantages[:, None]
    return PolicyTerms(-torch.min(ratio * A, ratio.clamp(1 - epsilon_low, 1 + epsilon_high) * A), ratio)


def clip_flags(name: str, ratio: Tensor, advantages: Tensor, epsilon_low: float, epsilon_high: float) -> dict:
    """The clip metrics' indicators, (N, T) or (N, 1) bool each, under TRL's names for loss `name`:
    clip_ratio/low|high|region for the clipped surrogates (a token counts when its clip removes the
    gradient: below 1 - eps_low with A < 0, above 1 + eps_high with A > 0), cispo_clip_ratio for cispo."""
    A = advantages[:, None]
    if name == "cispo":
        return {"cispo_clip_ratio": (ratio > epsilon_high) & (A > 0)}
    if name in ("sapo", "vespo"):
        return {}
    low = (ratio < 1 - epsilon_low) & (A < 0)
    high = (ratio > 1 + epsilon_high) & (A > 0)
    return {"clip_ratio/low_mean": low, "clip_ratio/high_mean": high, "clip_ratio/region_mean": low | high}


def entropy_mask(entropy: Tensor, mask: Tensor, quantile: float) -> Tensor:
    """The tokens whose entropy is at least the (1 - quantile) quantile of the masked entropies (N, T) bool:
    'Beyond the 80/20 rule' (Wang et al. 2025, arXiv:2506.01939) trains only on the top `quantile`."""
    values = entropy[mask.bool()].float()
    if values.numel() == 0:
        return torch.zeros_like(mask, dtype=torch.bool)
    threshold = torch.quantile(values, 1 - quantile)
    return (entropy * mask >= threshold) & mask.bool()


def off_policy_mask(
    advantages: Tensor, logps: Tensor, old_logps: Tensor, mask: Tensor, threshold: float
) -> Tensor:
    """DeepSeek-V3.2's off-policy sequence mask (arXiv:2512.02556), (N, 1): drop a sequence whose advantage
    is negative and whose mean per-token log pi_old - log pi_theta exceeds `threshold`."""
    kl = ((old_logps - logps.detach()) * mask).sum(-1, keepdim=True) / mask.sum(-1, keepdim=True).clamp(min=1)
    return ((advantages[:, None] >= 0) | (kl <= threshold)).to(mask.dtype)
