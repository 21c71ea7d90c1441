"""The return convention shared by every log-prob kernel entry point.

An entry point returns `logps` alone, or the tuple `(logps, *wanted)` of `logps` followed by the optional outputs
asked for, always in the order of OPTIONAL_OUTPUTS. A new optional output is appended at the end of that order, so
every existing caller's unpacking stays valid.
"""

from __future__ import annotations

import torch

# entropy: differentiable; is_top1: bool; mean_logit and log_sum_sq: float, no gradient (see the package docstring)
OPTIONAL_OUTPUTS = ("entropy", "is_top1", "mean_logit", "log_sum_sq")


def select_outputs(
    logps: torch.Tensor,
    optional: tuple[torch.Tensor | None, ...],
    wanted: tuple[bool, ...],
    shape: torch.Size | tuple | None = None,
):
    """`logps` alone when nothing is wanted, else `(logps, *the wanted ones of optional)`, each reshaped to `shape`
    when given. optional and wanted: one entry per name in OPTIONAL_OUTPUTS (a tensor or None, a bool)."""
    out = [logps] + [x for x, want in zip(optional, wanted, strict=True) if want]
    if shape is not None:
        out = [x.reshape(shape) for x in out]
    return out[0] if len(out) == 1 else tuple(out)
