"""Preference losses: DPO and its variants, with the semantics of TRL 1.16's DPOTrainer.

Notation: B pairs, T time (completion positions), N sequences. For pair i with prompt x, chosen y_w and
rejected y_l:
    chosen_logps, rejected_logps          (B,)  log pi(y|x) = sum_t log pi(y_t | x, y_<t) under the policy
    ref_chosen_logps, ref_rejected_logps  (B,)  the same under the frozen reference (None where not needed)
    rho_w = chosen_logps - ref_chosen_logps, rho_l = rejected_logps - ref_rejected_logps   (B,)  log-ratios
    s_w, s_l = f'(exp rho) via `f_divergence_scores` (the log-ratios themselves for reverse KL, DPO's case)
    delta = s_w - s_l, z = beta * delta                                                   (B,)
    sigma the logistic function; implicit rewards r_w = beta * rho_w, r_l = beta * rho_l.

Every loss is a registered function with one signature,

    loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, **inputs) -> (B,)

returning one loss per pair (batch-coupled losses, `aot*` and `sft`, say how). What a variant needs beyond
the four log-prob vectors comes as keyword inputs with the same name in every loss that takes them:
    label_smoothing                       float, robust / exo_pair / aot / aot_unpaired
    f_divergence_type, f_alpha_divergence_coef   the sigmoid family's f-divergence (`F_DIVERGENCES`)
    discopop_tau                          float, discopop
    chosen_lengths, rejected_lengths      (B,) completion tokens per sequence, ipo / sigmoid_norm
    chosen_token_logps, chosen_mask       (B, T) per-token log-probs of the chosen completion (0 off the
                                          mask) and its completion mask, sft
    reward_mean                           float or 0-dim tensor, bco_pair's running mean of rewards
`preference_loss` combines several losses with weights (MPO), optional per-pair weights (WPO,
`wpo_weights`), and passes each loss the inputs its signature names, so a loop calls every variant the same
way. Length-desensitised log-probs (LD-DPO) are built before the loss by `ld_logps`. A loss that needs no
reference model is marked with `@reference_free`; `needs_reference(fn)` tells a loop whether to run one.

A user adds a loss by registering one function with this signature:

    @register("preference", "my_loss")
    def my_loss(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
        ...
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from . import registry
from .registry import register

Tensor = torch.Tensor


def reference_free(fn: Callable) -> Callable:
    """Mark a preference loss that reads no reference log-probs (a loop then needs no reference model)."""
    fn.reference_free = True
    return fn


def needs_reference(fn: Callable) -> bool:
    return not getattr(fn, "reference_free", False)


def _sorts_pairs(fn: Callable) -> Callable:
    # Pair i's loss depends on other pairs of the micro-batch (sorting), so per-pair weights would misalign.
    fn.sorts_pairs = True
    return fn


# --- f-divergences: s = f'(t) at t = pi / pi_ref = exp(rho) (Wang et al. 2023, "Beyond Reverse KL",
# arXiv:2309.16240). DPO's reverse KL has f'(t) = log t + 1; the constant cancels in s_w - s_l.


def _alpha_divergence(logratios: Tensor, alpha: float) -> Tensor:
    # f'(t) = (t^(alpha-1) - 1) / (alpha - 1), computed in float32 at least, the exponent capped so that
    # exp stays finite in the input dtype (TRL caps it too); alpha -> 1 is the reverse KL limit.
    if abs(alpha - 1.0) < 1e-6:
        return logratios
    cap = min(80.0, math.log(torch.finfo(logratios.dtype).max))
    t = ((alpha - 1.0) * logratios).float().clamp(max=cap)
    return torch.expm1(t).to(logratios.dtype) / (alpha - 1.0)


F_DIVERGENCES: dict[str, Callable[[Tensor, float], Tensor]] = {
    "reverse_kl": lambda rho, alpha: rho,
    "forward_kl": lambda rho, alpha: 1 - torch.exp(-rho),  # f'(t) = 1 - 1/t
    "js_divergence": lambda rho, alpha: math.log(2) + F.logsigmoid(rho),  # f'(t) = log(2t / (1 + t))
    "alpha_divergence": _alpha_divergence,
}


def f_divergence_scores(
    logratios: Tensor, f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5
) -> Tensor:
    """s = f'(exp(logratios)) for the named f-divergence; logratios (N,) -> (N,). Reverse KL (DPO) gives the
    log-ratios unchanged. f_alpha_divergence_coef is alpha of the alpha-divergence."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; expected one of {sorted(F_DIVERGENCES)}"
        )
    return F_DIVERGENCES[f_divergence_type](logratios, f_alpha_divergence_coef)


def _scores(logps, ref_logps, f_divergence_type, f_alpha_divergence_coef):
    return f_divergence_scores(logps - ref_logps, f_divergence_type, f_alpha_divergence_coef)


def _delta(chosen, rejected, ref_chosen, ref_rejected, f_divergence_type, f_alpha_divergence_coef):
    s_w = _scores(chosen, ref_chosen, f_divergence_type, f_alpha_divergence_coef)
    s_l = _scores(rejected, ref_rejected, f_divergence_type, f_alpha_divergence_coef)
    return s_w - s_l


def smoothed_sigmoid(z: Tensor, eps: float) -> Tensor:
    """-(1 - eps) log sigma(z) - eps log sigma(-z): the logistic loss with labels flipped with probability eps
    (z (N,) -> (N,))."""
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


# --- The sigmoid family: functions of delta, any f-divergence.


@register("preference", "sigmoid")
def sigmoid(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """DPO (Rafailov et al. 2023, arXiv:2305.18290, eq. 7): -log sigma(beta * delta). With an f-divergence
    other than reverse KL this is f-DPO (Wang et al. 2023, arXiv:2309.16240). Shapes (B,) -> (B,).
    TRL 1.16's sigmoid ignores label_smoothing (cDPO); use `robust` for noisy labels."""
    delta = _delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   f_divergence_type, f_alpha_divergence_coef)  # fmt: skip
    return -F.logsigmoid(beta * delta)


@register("preference", "hinge")
def hinge(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """SLiC's calibration hinge (Zhao et al. 2023, arXiv:2305.10425; margin 1/beta, scaled by beta) on the
    log-ratio difference: max(0, 1 - beta * delta). Shapes (B,) -> (B,)."""
    delta = _delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                   f_divergence_type, f_alpha_divergence_coef)  # fmt: skip
    return torch.relu(1 - beta * delta)


@register("preference", "ipo")
def ipo(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17, beta in the role of tau):
    (s_w / |y_w| - s_l / |y_l| - 1 / (2 beta))^2. Shapes (B,) -> (B,); lengths (B,) completion tokens.
    Departure from the paper, as TRL: each score is divided by its completion's length (a per-token mean),
    which the paper does not write but its authors confirmed to TRL is what their results used."""
    s_w = _scores(chosen_logps, ref_chosen_logps, f_divergence_type, f_alpha_divergence_coef)
    s_l = _scores(rejected_logps, ref_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    delta = s_w / chosen_lengths.clamp(min=1) - s_l / rejected_lengths.clamp(min=1)
    return (delta - 1 / (2 * beta)) ** 2


@register("preference", "sigmoid_norm")
def sigmoid_norm(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, chosen_lengths, rejected_lengths,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """Length-normalised DPO (the DPO-norm of Tulu 3, Lambert et al. 2024, arXiv:2411.15124):
    -log sigma(beta * (s_w / |y_w| - s_l / |y_l|)). Shapes (B,) -> (B,); lengths (B,) completion tokens."""
    s_w = _scores(chosen_logps, ref_chosen_logps, f_divergence_type, f_alpha_divergence_coef)
    s_l = _scores(rejected_logps, ref_rejected_logps, f_divergence_type, f_alpha_divergence_coef)
    return -F.logsigmoid(beta * (s_w / chosen_lengths.clamp(min=1) - s_l / rejected_lengths.clamp(min=1)))


@register("preference", "exo_pair")
def exo_pair(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """EXO-pref (Ji et al. 2024, arXiv:2402.00856, eq. 16, K = 2): KL(q || p) between q = (sigma(z), sigma(-z))
    and the smoothed labels p = (1 - eps, eps), eps = label_smoothing in (0, 1) (the paper suggests 1e-3):
    sigma(z) (log sigma(z) - log(1 - eps)) + sigma(-z) (log sigma(-z) - log eps). Shapes (B,) -> (B,)."""
    if not 0.0 < label_smoothing < 1.0:
        raise ValueError(
            f"exo_pair needs 0 < label_smoothing < 1 (the paper suggests 1e-3), got {label_smoothing}"
        )
    z = beta * _delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      f_divergence_type, f_alpha_divergence_coef)  # fmt: skip
    win = torch.sigmoid(z) * (F.logsigmoid(z) - math.log1p(-label_smoothing))
    lose = torch.sigmoid(-z) * (F.logsigmoid(-z) - math.log(label_smoothing))
    return win + lose


@register("preference", "robust")
def robust(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing=0.0,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): the unbiased loss when labels flip with
    probability eps = label_smoothing in [0, 0.5):
    ((1 - eps) (-log sigma(z)) - eps (-log sigma(-z))) / (1 - 2 eps). Shapes (B,) -> (B,).
    TRL 1.16 only warns for eps outside [0, 0.5); here it is an error (at 0.5 the loss divides by 0)."""
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust needs label_smoothing in [0, 0.5), got {label_smoothing}")
    z = beta * _delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      f_divergence_type, f_alpha_divergence_coef)  # fmt: skip
    return (-(1 - label_smoothing) * F.logsigmoid(z) + label_smoothing * F.logsigmoid(-z)) / (
        1 - 2 * label_smoothing
    )


@register("preference", "discopop")
def discopop(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, discopop_tau=0.05,
    f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
):  # fmt: skip
    """DiscoPOP's log-ratio modulated loss (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): with
    m = sigma(z / tau), (1 - m) (-log sigma(z)) + m exp(-z). Shapes (B,) -> (B,)."""
    z = beta * _delta(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
                      f_divergence_type, f_alpha_divergence_coef)  # fmt: skip
    m = torch.sigmoid(z / discopop_tau)
    return (1 - m) * -F.logsigmoid(z) + m * torch.exp(-z)


# --- Losses on the log-ratios themselves (reverse KL only: the f-DPO derivation needs the difference).


@register("preference", "nca_pair")
def nca_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """Pairwise NCA (Chen et al. 2024, "Noise Contrastive Alignment", arXiv:2402.05369, the K = 2 case):
    -log sigma(r_w) - 1/2 log sigma(-r_w) - 1/2 log sigma(-r_l). Shapes (B,) -> (B,)."""
    r_w = beta * (chosen_logps - ref_chosen_logps)
    r_l = beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(r_w) - 0.5 * F.logsigmoid(-r_w) - 0.5 * F.logsigmoid(-r_l)


@register("preference", "bco_pair")
def bco_pair(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, reward_mean=0.0):
    """BCO on pairs (Jung et al. 2024, "Binary Classifier Optimization", arXiv:2404.04656): each reward
    classified against the shift delta = reward_mean: -log sigma(r_w - delta) - log sigma(-(r_l - delta)).
    Shapes (B,) -> (B,). The paper's delta is a running mean of past rewards: keep it in the loop with
    `bco_update_reward_mean` and pass it in. Departure, as TRL 1.16: its bco_pair keeps no running mean,
    i.e. delta = 0, the default here."""
    r_w = beta * (chosen_logps - ref_chosen_logps)
    r_l = beta * (rejected_logps - ref_rejected_logps)
    return -F.logsigmoid(r_w - reward_mean) - F.logsigmoid(-(r_l - reward_mean))


def bco_update_reward_mean(
    reward_mean: Tensor, count: Tensor, chosen_rewards: Tensor, rejected_rewards: Tensor
) -> tuple[Tensor, Tensor]:
    """The running mean of every reward seen so far (chosen and rejected alike), updated with a batch:
    returns (new_mean, new_count). reward_mean, count 0-dim (start from 0, 0); rewards (B,) = beta * rho,
    detached. Pure: the caller keeps the state (and, under data parallelism, gathers the rewards first)."""
    rewards = torch.cat([chosen_rewards, rejected_rewards]).detach()
    new_count = count + rewards.numel()
    return reward_mean + (rewards.sum() - rewards.numel() * reward_mean) / new_count, new_count


@register("preference", "sppo_hard")
def sppo_hard(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """SPPO with hard win probabilities (Wu et al. 2024, arXiv:2405.00675, eq. 4.7 with P = 1 for the chosen
    and 0 for the rejected): (rho_w - 1/(2 beta))^2 + (rho_l + 1/(2 beta))^2. Shapes (B,) -> (B,).
    The paper estimates soft probabilities with a preference model; this is TRL's hard version."""
    return (chosen_logps - ref_chosen_logps - 0.5 / beta) ** 2 + (
        rejected_logps - ref_rejected_logps + 0.5 / beta
    ) ** 2


@register("preference", "aot")
@_sorts_pairs
def aot(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing=0.0):
    """AOT, paired (Melnyk et al. 2024, "Distributional Preference Alignment via Optimal Transport",
    arXiv:2406.05882): first-order stochastic dominance of the policy's margins over the reference's, via
    sorting: d = sort(log pi(y_w) - log pi(y_l)) - sort(ref margins), loss -(1-eps) log sigma(beta d) -
    eps log sigma(-beta d). Shapes (B,) -> (B,); the i-th loss belongs to the i-th quantile, not pair i, so
    the batch is coupled (no per-pair weights; the loss depends on how pairs are grouped in micro-batches)."""
    d = (
        torch.sort(chosen_logps - rejected_logps).values
        - torch.sort(ref_chosen_logps - ref_rejected_logps).values
    )
    return smoothed_sigmoid(beta * d, label_smoothing)


@register("preference", "aot_unpaired")
@_sorts_pairs
def aot_unpaired(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta, label_smoothing=0.0
):
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): dominance of the chosen log-ratios over the
    rejected ones: d = sort(rho_w) - sort(rho_l), then as `aot`. Shapes (B,) -> (B,), batch-coupled."""
    d = (
        torch.sort(chosen_logps - ref_chosen_logps).values
        - torch.sort(rejected_logps - ref_rejected_logps).values
    )
    return smoothed_sigmoid(beta * d, label_smoothing)


@register("preference", "apo_zero")
def apo_zero(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7), for chosen answers better than the
    model's own: push r_w up and r_l down, 1 - sigma(r_w) + sigma(r_l). Shapes (B,) -> (B,)."""
    r_w = beta * (chosen_logps - ref_chosen_logps)
    r_l = beta * (rejected_logps - ref_rejected_logps)
    return 1 - torch.sigmoid(r_w) + torch.sigmoid(r_l)


@register("preference", "apo_down")
def apo_down(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, beta):
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8), for chosen answers worse than the
    model's own: push r_w down and r_l down more, sigma(r_w) + 1 - sigma(r_w - r_l). Shapes (B,) -> (B,)."""
    r_w = beta * (chosen_logps - ref_chosen_logps)
    r_l = beta * (rejected_logps - ref_rejected_logps)
    return torch.sigmoid(r_w) + 1 - torch.sigmoid(r_w - r_l)


@register("preference", "sft")
@reference_free
def sft(
    chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, *, chosen_token_logps, chosen_mask
):
    """Negative log-likelihood of the chosen completions, the SFT term of MPO (Wang et al. 2024,
    arXiv:2411.10442): -sum_{i,t} m_it log p_it / sum_{i,t} m_it, a token mean over this batch's
    chosen tokens, repeated for each pair. chosen_token_logps, chosen_mask (B, T) -> (B,).
    As TRL: the token mean is the micro-batch's (every pair carries the same value), so under per-pair
    weights each weight multiplies the batch mean."""
    mean = -(chosen_token_logps * chosen_mask).sum() / chosen_mask.sum().clamp(min=1)
    return mean.expand(chosen_token_logps.shape[0])


# --- Inputs built before the loss.


def ld_logps(
    chosen_token_logps: Tensor,
    rejected_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    ld_alpha: float,
) -> tuple[Tensor, Tensor]:
    """LD-DPO's length-desensitised sequence log-probs (Liu et al. 2024, arXiv:2409.06411): the first
    min(|y_w|, |y_l|) completion tokens of each sequence count fully, the longer one's excess tokens by
    ld_alpha in [0, 1] (1 gives the plain sums, DPO). Per-token logps and masks (B, T) -> two (B,).
    Apply to policy and reference alike, then pass the results to any loss."""
    if not 0.0 <= ld_alpha <= 1.0:
        raise ValueError(f"ld_alpha must lie in [0, 1], got {ld_alpha}")
    shared = torch.minimum(chosen_mask.sum(1), rejected_mask.sum(1)).unsqueeze(1)

    def combine(token_logps, mask):
        position = mask.cumsum(1)  # 1 on the first completion token
        weight = torch.where(position <= shared, 1.0, ld_alpha) * mask
        return (token_logps * weight).sum(1)

    return combine(chosen_token_logps, chosen_mask), combine(rejected_token_logps, rejected_mask)


def wpo_weights(token_logps: Tensor, log_sum_sq_probs: Tensor, mask: Tensor) -> Tensor:
    """WPO's sequence weights (Zhou et al. 2024, arXiv:2406.11827, eq. 2, the "aligned" form): the geometric
    mean over completion tokens of p(y_t) / sum_v p(v)^2, i.e. exp(mean_t (log p_t - log sum_v p_v^2)).
    token_logps, log_sum_sq_probs, mask (N, T) -> (N,), detached. A pair's weight is the product of its
    chosen and rejected weights: pass `wpo_weights(chosen...) * wpo_weights(rejected...)` as pair_weights."""
    with torch.no_grad():
        aligned = ((token_logps - log_sum_sq_probs) * mask).sum(1) / mask.sum(1).clamp(min=1)
        return aligned.exp()


# --- The combinator the loops call.


class LossWeightsError(ValueError):
    """loss_weights does not give one weight per loss_type."""


def preference_loss(
    loss_types: Sequence[str],
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    ref_chosen_logps: Tensor | None = None,
    ref_rejected_logps: Tensor | None = None,
    *,
    beta: float,
    loss_weights: Sequence[float] | None = None,
    pair_weights: Tensor | None = None,
    num_pairs: Tensor | int | None = None,
    **inputs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_k w_k sum_i p_i loss_k(...)_i / num_pairs, and the metrics, over one micro-batch of B pairs.

    loss_types: registered preference loss names; loss_weights: one weight each (default all 1; several
    losses at once is MPO, Wang et al. 2024, arXiv:2411.10442); pair_weights (B,): per-pair weights such as
    WPO's (default 1); num_pairs: the pairs in the whole optimizer step (default B), so that micro-batch
    losses sum to the step's mean (TRL averages within a micro-batch: the same when the step is one batch).
    inputs: the keyword inputs of the module docstring; each loss gets those its signature names.
    Metrics (0-dim, detached, each a sum over the micro-batch / num_pairs, TRL's names): logps/chosen,
    logps/rejected, and with references rewards/chosen, rewards/rejected, rewards/accuracies (r_w > r_l),
    rewards/margins; loss/<name> per loss when there are several.
    """
    losses = [registry.get("preference", name) for name in loss_types]
    if loss_weights is None:
        loss_weights = [1.0] * len(losses)
    if len(loss_weights) != len(losses):
        raise LossWeightsError(
            f"loss_weights has {len(loss_weights)} values for {len(losses)} loss_type {list(loss_types)}"
        )
    kwargs = dict(inputs, beta=beta)
    for name, fn in zip(loss_types, losses, strict=True):
        _check_inputs(name, fn, kwargs, ref_chosen_logps is not None and ref_rejected_logps is not None)
        if pair_weights is not None and getattr(fn, "sorts_pairs", False):
            raise ValueError(f"per-pair weights (use_weighting) do not apply to {name!r}: it sorts the pairs")
    n = chosen_logps.shape[0] if num_pairs is None else num_pairs

    loss = chosen_logps.new_zeros(())
    metrics = {}
    for name, fn, weight in zip(loss_types, losses, loss_weights, strict=True):
        per_pair = fn(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, **accepted_inputs(fn, kwargs)
        )
        if pair_weights is not None:
            per_pair = per_pair * pair_weights
        term = per_pair.sum() / n
        loss = loss + weight * term
        if len(losses) > 1:
            metrics[f"loss/{name}"] = term.detach()
    metrics.update(
        reward_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, n)
    )
    return loss, metrics


def accepted_inputs(fn: Callable, kwargs: dict) -> dict:
    """The inputs `fn`'s signature names (all of them if it takes **kwargs)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in params}


def _check_inputs(name: str, fn: Callable, kwargs: dict, have_reference: bool) -> None:
    params = inspect.signature(fn).parameters
    if needs_reference(fn) and not have_reference:
        raise ValueError(
            f"preference loss {name!r} needs reference log-probs (ref_chosen_logps, ref_rejected_logps)"
        )
    for param in params.values():
        if param.kind is param.KEYWORD_ONLY and param.default is param.empty and param.name not in kwargs:
            raise ValueError(f"preference loss {name!r} needs the input {param.name!r}")
    check_f_divergence(name, fn, kwargs.get("f_divergence_type", "reverse_kl"))


def check_f_divergence(name: str, fn: Callable, f_divergence_type: str) -> None:
    """Raise unless loss `name` (function `fn`) can use `f_divergence_type`."""
    if f_divergence_type not in F_DIVERGENCES:
        raise ValueError(
            f"unknown f_divergence_type {f_divergence_type!r}; expected one of {sorted(F_DIVERGENCES)}"
        )
    # The f-DPO reparameterisation only cancels log Z(x) in s_w - s_l: losses of the log-ratios alone have
    # no f-divergence form (TRL refuses the same combinations).
    takes_it = "f_divergence_type" in inspect.signature(fn).parameters
    if f_divergence_type != "reverse_kl" and needs_reference(fn) and not takes_it:
        raise ValueError(
            f"f_divergence_type={f_divergence_type!r} does not apply to loss_type {name!r}; use reverse_kl"
        )


def reward_metrics(chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps, beta, num_pairs):
    """TRL's DPO metrics as 0-dim detached tensors, each a sum over the pairs / num_pairs (shapes (B,))."""
    metrics = {
        "logps/chosen": chosen_logps.detach().sum() / num_pairs,
        "logps/rejected": rejected_logps.detach().sum() / num_pairs,
    }
    if ref_chosen_logps is None or ref_rejected_logps is None:
        return metrics
    r_w = beta * (chosen_logps.detach() - ref_chosen_logps)
    r_l = beta * (rejected_logps.detach() - ref_rejected_logps)
    metrics["rewards/chosen"] = r_w.sum() / num_pairs
    metrics["rewards/rejected"] = r_l.sum() / num_pairs
    metrics["rewards/accuracies"] = (r_w > r_l).float().sum() / num_pairs
    metrics["rewards/margins"] = (r_w - r_l).sum() / num_pairs
    return metrics
