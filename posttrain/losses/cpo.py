"""Reference-free preference losses: CPO and its variants (SimPO, AlphaPO), and ORPO's odds ratio, with the
semantics of TRL 1.16's experimental CPOTrainer and ORPOTrainer.

Notation: B pairs, T time. For pair i with prompt x, chosen y_w and rejected y_l:
    chosen_logps, rejected_logps  (B,)  the policy's sequence log-probs: the sums sum_t log pi(y_t | x, y_<t),
                                        or their per-token means (1/|y|) sum_t ... for a loss marked
                                        `@token_mean` (the loop reads `uses_token_mean(fn)` to know which)
    u_w, u_l = shaped(logps, alpha)     AlphaPO's reward shape (`shaped_rewards`): log p when alpha = 0,
                                        else (1 - p^-alpha) / alpha with p = exp(logps)
    h = u_w - u_l                 (B,)  the margin every CPO loss is a function of
    sigma the logistic function; eps = label_smoothing; implicit rewards r = beta * u (logged only).
No reference model appears: these losses compare the policy's own likelihoods.

Every "cpo" loss is a registered function with one signature,

    loss(chosen_logps, rejected_logps, *, beta, alpha=0.0, **inputs) -> (B,)

inputs being label_smoothing (sigmoid, simpo, alphapo) and simpo_gamma (simpo, alphapo). CPO adds to the mean
of these a behaviour-cloning term, cpo_alpha times the NLL of the chosen completions (`chosen_nll`);
`cpo_loss` combines the two and computes the metrics. ORPO's odds-ratio term is the registered "orpo" kind,

    loss(chosen_logps, rejected_logps) -> (B,)        (per-token mean log-probs)

and `orpo_loss` adds it, weighted by beta (ORPO's lambda), to the chosen NLL over prompt and completion.

Normalisation, as in `losses.preference`: a micro-batch returns its share of the step, sums over its pairs
divided by num_pairs, the pairs of the whole optimizer step. The NLL terms are the micro-batch's token means
(TRL's), weighted by the micro-batch's share of pairs, B / num_pairs: the same as TRL with one micro-batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from . import registry
from .preference import accepted_inputs, smoothed_sigmoid
from .registry import register

Tensor = torch.Tensor


def token_mean(fn: Callable) -> Callable:
    """Mark a loss that takes per-token mean log-probs, (1/|y|) log pi(y|x), rather than sums."""
    fn.token_mean = True
    return fn


def uses_token_mean(fn: Callable) -> bool:
    return getattr(fn, "token_mean", False)


def shaped_rewards(logps: Tensor, alpha: float) -> Tensor:
    """AlphaPO's reward (Gupta et al. 2025, arXiv:2501.03884, eq. 6): (1 - p^-alpha) / alpha with
    p = exp(logps), which tends to log p as alpha -> 0 (then logps is returned unchanged). (B,) -> (B,).
    Computed as -expm1(-alpha * logps) / alpha: the same value, without the cancellation of 1 - p^-alpha."""
    if alpha == 0.0:
        return logps
    return -torch.expm1(-alpha * logps) / alpha


def _margin(chosen_logps: Tensor, rejected_logps: Tensor, alpha: float) -> Tensor:
    return shaped_rewards(chosen_logps, alpha) - shaped_rewards(rejected_logps, alpha)


# --- CPO's preference terms: functions of the margin h.


@register("cpo", "sigmoid")
def sigmoid(chosen_logps, rejected_logps, *, beta, alpha=0.0, label_smoothing=0.0):
    """CPO (Xu et al. 2024, arXiv:2401.08417, eq. 3, the reference dropped from DPO's loss):
    -(1 - eps) log sigma(beta h) - eps log sigma(-beta h), on summed log-probs. Shapes (B,) -> (B,)."""
    return smoothed_sigmoid(beta * _margin(chosen_logps, rejected_logps, alpha), label_smoothing)


@register("cpo", "hinge")
def hinge(chosen_logps, rejected_logps, *, beta, alpha=0.0):
    """SLiC's calibration hinge (Zhao et al. 2023, arXiv:2305.10425) without a reference:
    max(0, 1 - beta h), on summed log-probs. Shapes (B,) -> (B,)."""
    return torch.relu(1 - beta * _margin(chosen_logps, rejected_logps, alpha))


@register("cpo", "ipo")
@token_mean
def ipo(chosen_logps, rejected_logps, *, beta, alpha=0.0):
    """IPO's square loss (Azar et al. 2023, arXiv:2310.12036, eq. 17, beta as tau) without a reference:
    (h - 1 / (2 beta))^2, on per-token mean log-probs (TRL's normalisation, as DPO's ipo). (B,) -> (B,)."""
    return (_margin(chosen_logps, rejected_logps, alpha) - 1 / (2 * beta)) ** 2


@register("cpo", "simpo")
@token_mean
def simpo(chosen_logps, rejected_logps, *, beta, alpha=0.0, simpo_gamma=0.5, label_smoothing=0.0):
    """SimPO (Meng et al. 2024, arXiv:2405.14734, eq. 6): -log sigma(beta h - gamma) on per-token mean
    log-probs, gamma = simpo_gamma the target reward margin; with label smoothing eps, as TRL:
    -(1 - eps) log sigma(beta h - gamma) - eps log sigma(-(beta h - gamma)). Shapes (B,) -> (B,).
    The paper's SimPO has no NLL term: run it with cpo_alpha = 0 (TRL's CPOConfig default is 1, CPO-SimPO)."""
    z = beta * _margin(chosen_logps, rejected_logps, alpha) - simpo_gamma
    return smoothed_sigmoid(z, label_smoothing)


@register("cpo", "alphapo")
@token_mean
def alphapo(chosen_logps, rejected_logps, *, beta, alpha=0.0, simpo_gamma=0.5, label_smoothing=0.0):
    """AlphaPO (Gupta et al. 2025, arXiv:2501.03884, eq. 7): SimPO's loss on the alpha-shaped rewards
    u = (1 - p^-alpha) / alpha of the per-token mean log-probs. Shapes (B,) -> (B,). As TRL 1.16's
    loss_type="alphapo", the loop runs it without the NLL term (cpo_alpha = 0); with TRL's default alpha = 0
    it is SimPO (the paper's experiments use alpha around 0.1 to 0.25)."""
    return simpo(chosen_logps, rejected_logps, beta=beta, alpha=alpha, simpo_gamma=simpo_gamma,
                 label_smoothing=label_smoothing)  # fmt: skip


# --- ORPO's odds-ratio term.


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0 without cancellation (Maechler 2012, "Accurately computing log(1 - exp(-|a|))"):
    log(-expm1(x)) near 0, log1p(-exp(x)) below -log 2."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def log_odds(chosen_logps: Tensor, rejected_logps: Tensor) -> Tensor:
    """log odds(y_w) - log odds(y_l), odds(y) = p / (1 - p), p = exp(per-token mean log-prob) (ORPO,
    Hong et al. 2024, arXiv:2403.07691, eq. 4-5). Shapes (B,) -> (B,)."""
    return (chosen_logps - rejected_logps) - (log1mexp(chosen_logps) - log1mexp(rejected_logps))


@register("orpo", "odds_ratio")
def odds_ratio(chosen_logps, rejected_logps):
    """ORPO's relative-ratio loss (Hong et al. 2024, arXiv:2403.07691, eq. 7): -log sigma(log OR), on
    per-token mean log-probs. Shapes (B,) -> (B,)."""
    return -F.logsigmoid(log_odds(chosen_logps, rejected_logps))


# --- The NLL term and the combinators the loops call.


def chosen_nll(token_logps: Tensor, mask: Tensor) -> Tensor:
    """The chosen sequences' negative log-likelihood, a token mean over the micro-batch (TRL's cross-entropy):
    -sum_{i,t} m_it log p_it / sum_{i,t} m_it. token_logps, mask (B, T) -> 0-dim. CPO's mask is the
    completion tokens, ORPO's every token of prompt and completion (as TRL 1.16)."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


def cpo_loss(
    loss_type: str,
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    nll: Tensor,
    *,
    beta: float,
    cpo_alpha: float,
    num_pairs: Tensor | int | None = None,
    **inputs,
) -> tuple[Tensor, dict[str, Tensor]]:
    """sum_i loss(...)_i / num_pairs + cpo_alpha * nll * B / num_pairs over one micro-batch of B pairs.

    loss_type: a registered "cpo" loss; chosen_logps, rejected_logps (B,): sums or per-token means as
    `uses_token_mean` says for that loss; nll: `chosen_nll` over the chosen completions (0-dim); inputs:
    alpha, label_smoothing, simpo_gamma (each loss gets those its signature names). num_pairs: the pairs in
    the whole optimizer step (default B). Metrics (0-dim, detached, each this micro-batch's share, TRL's
    names): rewards/chosen, rewards/rejected (beta * u), rewards/accuracies, rewards/margins, logps/chosen,
    logps/rejected, nll_loss.
    """
    fn = registry.get("cpo", loss_type)
    n = chosen_logps.shape[0] if num_pairs is None else num_pairs
    share = chosen_logps.shape[0] / n
    per_pair = fn(chosen_logps, rejected_logps, beta=beta, **accepted_inputs(fn, inputs))
    loss = per_pair.sum() / n + cpo_alpha * nll * share
    alpha = inputs.get("alpha", 0.0)
    with torch.no_grad():
        r_w = beta * shaped_rewards(chosen_logps.detach(), alpha)
        r_l = beta * shaped_rewards(rejected_logps.detach(), alpha)
        metrics = _pair_metrics(chosen_logps, rejected_logps, r_w, r_l, n)
        metrics["nll_loss"] = nll.detach() * share
    return loss, metrics


def orpo_loss(
    chosen_logps: Tensor,
    rejected_logps: Tensor,
    nll: Tensor,
    *,
    beta: float,
    loss_type: str = "odds_ratio",
    num_pairs: Tensor | int | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """ORPO (Hong et al. 2024, arXiv:2403.07691, eq. 6): nll * B / num_pairs + beta * sum_i loss(...)_i /
    num_pairs over one micro-batch of B pairs, beta in the role of the paper's lambda.

    chosen_logps, rejected_logps (B,): per-token mean log-probs of the completions; nll: `chosen_nll` over
    the chosen sequences, prompt included (0-dim); loss_type: a registered "orpo" loss. Metrics (0-dim,
    detached, this micro-batch's share, TRL's names): rewards/* (r = beta * mean log-prob), logps/*,
    nll_loss, log_odds_ratio (mean log sigma(log OR), unscaled), log_odds_chosen (mean log OR).
    """
    fn = registry.get("orpo", loss_type)
    n = chosen_logps.shape[0] if num_pairs is None else num_pairs
    share = chosen_logps.shape[0] / n
    loss = nll * share + beta * fn(chosen_logps, rejected_logps).sum() / n
    with torch.no_grad():
        metrics = _pair_metrics(
            chosen_logps, rejected_logps, beta * chosen_logps.detach(), beta * rejected_logps.detach(), n
        )
        odds = log_odds(chosen_logps.detach(), rejected_logps.detach())
        metrics["nll_loss"] = nll.detach() * share
        metrics["log_odds_ratio"] = F.logsigmoid(odds).sum() / n
        metrics["log_odds_chosen"] = odds.sum() / n
    return loss, metrics


def _pair_metrics(chosen_logps, rejected_logps, r_w, r_l, n) -> dict[str, Tensor]:
    """TRL's per-pair metrics, each a sum over the pairs / n (shapes (B,), detached rewards r_w, r_l)."""
    return {
        "rewards/chosen": r_w.sum() / n,
        "rewards/rejected": r_l.sum() / n,
        "rewards/accuracies": (r_w > r_l).float().sum() / n,
        "rewards/margins": (r_w - r_l).sum() / n,
        "logps/chosen": chosen_logps.detach().sum() / n,
        "logps/rejected": rejected_logps.detach().sum() / n,
    }
