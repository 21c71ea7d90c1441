"""The return convention shared by every log-prob kernel entry point."""

from __future__ import annotations

import torch


def select_outputs(
    logps: torch.Tensor,
    entropy: torch.Tensor | None,
    is_top1: torch.Tensor | None,
    return_entropy: bool,
    return_top1: bool,
    shape: torch.Size | tuple | None = None,
):
    """`logps` alone, or `(logps, entropy)`, `(logps, is_top1)`, `(logps, entropy, is_top1)` per the flags,
    each reshaped to `shape` when given."""
    out = [logps]
    if return_entropy:
        out.append(entropy)
    if return_top1:
        out.append(is_top1)
    if shape is not None:
        out = [x.reshape(shape) for x in out]
    return out[0] if len(out) == 1 else tuple(out)
