"""Unpaired preference losses: KTO and its relatives, with the semantics of TRL 1.16's KTOTrainer.

Notation: B rows (one prompt x and one completion y each, labelled desirable or undesirable).
    logps, ref_logps          (B,)   log pi(y|x) = sum_t log pi(y_t | x, y_<t) under the policy / the reference
    rho = logps - ref_logps   (B,)   the log-ratio; r = beta * rho is the implicit reward
    labels                    (B,)   bool, True = desirable
    kl_logps, ref_kl_logps    (B,)   the same sums for MISMATCHED pairs (x_i, y_{i-1}): the batch's
                                     completions rotated by one within the micro-batch (`data.unpaired`)
    z0                        0-dim  the KL reference point, max(0, mean_i(kl_logps - ref_kl_logps)), detached
    sigma the logistic function; w_D, w_U the desirable / undesirable weights.

Every loss is a registered function of kind "kto" with one signature,

    loss(logps, ref_logps, labels, z0, *, beta, desirable_weight, undesirable_weight) -> (B,)

returning one (weighted) loss per row; a loop divides their sum by the rows of the whole optimizer step. A
loss that reads no reference point is marked `@no_reference_point`: the loop then builds no mismatched pairs
and runs no forward on them (TRL's `calculate_KL` is False for it), and z0 comes as None.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .registry import register

Tensor = torch.Tensor


def no_reference_point(fn: Callable) -> Callable:
    """Mark a KTO-kind loss that does not read the KL reference point z0."""
    fn.no_reference_point = True
    return fn


def needs_reference_point(fn: Callable) -> bool:
    return not getattr(fn, "no_reference_point", False)


@torch.no_grad()
def kl_reference_point(kl_logps: Tensor, ref_kl_logps: Tensor, world_mean: Callable | None = None) -> Tensor:
    """z0 = max(0, mean over processes of mean_i (kl_logps - ref_kl_logps)), a detached 0-dim tensor.

    KTO paper (Ethayarajh et al. 2024, arXiv:2402.01306) section 4.1: the reference point is a biased
    estimate of KL(pi || pi_ref) over the batch, from mismatched pairs, with no gradient through it.
    kl_logps, ref_kl_logps: (B,) this process's micro-batch; world_mean(0-dim) -> its mean over the data-
    parallel processes (TRL gathers it so: every process then uses the same z0); None: one process. The
    clamp comes after the mean over processes, as in TRL.
    """
    z0 = (kl_logps.float() - ref_kl_logps.float()).mean()
    if world_mean is not None:
        z0 = world_mean(z0)
    return z0.clamp(min=0)


@register("kto", "kto")
def kto(logps, ref_logps, labels, z0, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """KTO (Ethayarajh et al. 2024, arXiv:2402.01306, eq. 7 with the value v(x, y) of eq. 6), per row:

        desirable:    w_D * (1 - sigma(beta * (rho - z0)))
        undesirable:  w_U * (1 - sigma(beta * (z0 - rho)))

    z0 is detached (no gradient flows through the reference point).
    """
    rho = logps - ref_logps
    desirable = 1 - F.sigmoid(beta * (rho - z0))
    undesirable = 1 - F.sigmoid(beta * (z0 - rho))
    return _weighted(labels, desirable, undesirable, desirable_weight, undesirable_weight)


@register("kto", "apo_zero_unpaired")
@no_reference_point
def apo_zero_unpaired(logps, ref_logps, labels, z0, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """APO-zero for unpaired data (D'Oosterlinck et al. 2024, arXiv:2408.06266, the unpaired form of eq. 7):
    raise the likelihood of desirable outputs, lower that of undesirable ones, with no reference point:

        desirable:    w_D * (1 - sigma(beta * rho))
        undesirable:  w_U * sigma(beta * rho)

    Use it when the desirable outputs are better than what the model produces by default.
    """
    rho = logps - ref_logps
    z = beta * rho
    return _weighted(labels, 1 - F.sigmoid(z), F.sigmoid(z), desirable_weight, undesirable_weight)


def _weighted(labels: Tensor, desirable: Tensor, undesirable: Tensor, w_d: float, w_u: float) -> Tensor:
    # each row takes the branch its label names; the other branch is computed and discarded (B is small)
    return torch.where(labels, w_d * desirable, w_u * undesirable)
