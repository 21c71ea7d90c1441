"""Reward-model losses over per-sequence scores.

Notation: B pairs in this micro-batch. Every loss takes
    chosen_rewards    (B,)  r(x, y_w), the model's scalar score of the chosen sequence
    rejected_rewards  (B,)  r(x, y_l), the score of the rejected one
    num_items               the number of pairs in the whole optimizer step (all micro-batches, all ranks)
    margin            (B,)  keyword: the dataset's per-pair `margin` column, or None
    center_rewards_coefficient  keyword: the config's value, or None
and returns the step's share of the loss: a sum over this micro-batch's pairs divided by `num_items`, so
that gradient accumulation and data parallelism give the gradient of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .registry import register
from .sft import _count


@register("reward", "bradley_terry")
def bradley_terry(
    chosen_rewards: torch.Tensor,
    rejected_rewards: torch.Tensor,
    num_items: torch.Tensor | int,
    *,
    margin: torch.Tensor | None = None,
    center_rewards_coefficient: float | None = None,
) -> torch.Tensor:
    """Bradley–Terry pairwise loss (Ouyang et al. 2022, arXiv:2203.02155, eq. 1), pair mean over the step:

        -sum_b log sigmoid(r_w - r_l - m_b) / num_items  [+ c * sum_b (r_w + r_l)^2 / num_items]

    margin (B,): the per-pair margin m_b of Llama 2 (Touvron et al. 2023, arXiv:2307.09288, eq. 2), none: 0.
    center_rewards_coefficient c: the auxiliary term of Eisenstein et al. 2023 (arXiv:2312.09244, sec. 3.1)
    that pulls each pair's summed score toward 0 so rewards stay centred; none: no term (TRL's default).
    """
    logits = chosen_rewards - rejected_rewards
    if margin is not None:
        logits = logits - margin
    loss = -F.logsigmoid(logits).sum()
    if center_rewards_coefficient is not None:
        loss = loss + center_rewards_coefficient * ((chosen_rewards + rejected_rewards) ** 2).sum()
    return loss / _count(num_items)
