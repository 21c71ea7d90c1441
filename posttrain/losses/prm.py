"""Process-reward-model losses over per-step classification logits.

Notation: B batch, T time, N labelled steps in this micro-batch. Every loss takes
    logits  (B, T, 2)  the token-classification head's logits (class 1: the step is right)
    labels  (B, T)     1 / 0 on the last separator token of each trained step, -100 elsewhere
    num_items          the number of labelled steps in the whole optimizer step (all micro-batches, all ranks)
and returns the step's share of the loss: a sum over this micro-batch's labelled steps divided by
`num_items`, so that gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register
from .sft import _count

IGNORE_INDEX = -100


def step_logits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The labelled positions only: ((N, 2) float32 logits, (N,) labels in {0, 1}), in row-major order."""
    mask = labels != IGNORE_INDEX
    return logits[mask].float(), labels[mask]


@register("prm", "cross_entropy")
def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, num_items: torch.Tensor | int) -> torch.Tensor:
    """Per-step cross-entropy (Lightman et al. 2023, arXiv:2305.20050, sec. 2.6; Uesato et al. 2022,
    arXiv:2211.14275), mean over the step's labelled steps:

        -sum_n log softmax(z_n)[y_n] / num_items

    z_n the logits at step n's last separator token, y_n its label. What transformers' token-classification
    loss gives TRL's PRM trainer (ignore_index -100, summed and divided by the labelled tokens of the step).
    """
    z, y = step_logits(logits, labels)
    return F.cross_entropy(z, y, reduction="sum") / _count(num_items)
