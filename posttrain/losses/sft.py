"""Supervised fine-tuning losses over per-token log-probs.

Notation: B batch, T time. Every loss takes
    logps (B, T)  log p(x_t | x_<t) of the target tokens (0 elsewhere)
    mask  (B, T)  1 on target tokens
    num_items     the number of target tokens in the whole optimizer step (all micro-batches, all ranks)
and returns the step's share of the loss: a sum over this micro-batch divided by `num_items`, so that
gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import torch

from .registry import register


@register("sft", "nll")
def nll(logps: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Negative log-likelihood, token mean over the step: -sum_t m_t log p_t / num_items."""
    return -(logps * mask).sum() / _count(num_items)


@register("sft", "dft")
def dft(logps: torch.Tensor, mask: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Dynamic Fine-Tuning (Wu et al. 2025, arXiv:2508.05629, eq. 8): each token's NLL weighted by its
    probability, with the weight detached: -sum_t m_t sg(p_t) log p_t / num_items."""
    return -(logps * logps.detach().exp() * mask).sum() / _count(num_items)


def _count(num_items: torch.Tensor | int) -> torch.Tensor | int:
    # A step without target tokens gives a finite zero loss, not 0 / 0.
    return num_items.clamp(min=1) if isinstance(num_items, torch.Tensor) else max(num_items, 1)
