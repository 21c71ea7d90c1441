"""Log-softmax gathering: per-token log-probs (and entropy) without a full float32 (N, V) tensor.

Notation: N rows (any leading batch shape, flattened), V vocabulary, H hidden size.

    logprobs_from_logits(logits (..., V), index (...))            -> logps (...) float32
    logprobs_from_hidden(hidden (..., H), weight (V, H), index)   -> logps (...) float32, logits never built

Both return `logps` alone, or a tuple `(logps, entropy)` / `(logps, is_top1)` / `(logps, entropy, is_top1)`
when `return_entropy` / `return_top1` ask for them. `entropy` is the entropy of the tempered
distribution (float32, differentiable); `is_top1` says whether `index` is the arg-max (bool, no grad).
Rows where `mask` is False cost nothing and return 0 (and False).

Backends: Triton on CUDA tensors (and on the CPU under `TRITON_INTERPRET=1` when forced); a chunked
torch implementation elsewhere. The hidden-state path runs its tile matmuls with `torch.mm` on both and
uses the backend for the per-tile softmax work between them. Force one with `backend="triton" | "torch"`
or the environment variable `POSTTRAIN_KERNEL_BACKEND`.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")


def _backend(requested: str | None, tensor: torch.Tensor) -> str:
    choice = requested or os.environ.get("POSTTRAIN_KERNEL_BACKEND") or None
    if choice is None:
        return "triton" if tensor.is_cuda and _triton_available() else "torch"
    if choice not in BACKENDS:
        source = "backend" if requested else "POSTTRAIN_KERNEL_BACKEND"
        raise ValueError(f"{source}={choice!r} is not a kernel backend; expected one of {BACKENDS}")
    if choice == "triton":
        if not _triton_available():
            raise RuntimeError("backend 'triton' was forced but triton cannot be imported")
        if not tensor.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                "backend 'triton' on a CPU tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
    return choice


def _triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def logprobs_from_logits(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_top1: bool = False,
    inplace_backward: bool = False,
    backend: str | None = None,
):
    """log softmax(logits / temperature)[index] per row; see the module docstring for shapes and outputs.

    inplace_backward: write dlogits into `logits`' own buffer (no second (N, V) tensor); only for
    callers that never read `logits` again after the forward.
    """
    from . import logits as impl

    if _backend(backend, logits) == "triton":
        fn = impl.logprobs_from_logits_triton
    else:
        fn = impl.logprobs_from_logits_torch
    return fn(
        logits,
        index,
        temperature=temperature,
        mask=mask,
        return_entropy=return_entropy,
        return_top1=return_top1,
        inplace_backward=inplace_backward,
    )


def logprobs_from_hidden(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    index: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    logit_scale: float = 1.0,
    softcap: float | None = None,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_top1: bool = False,
    backend: str | None = None,
):
    """log softmax(z / temperature)[index] with z = softcap(logit_scale * (hidden @ weight.T + bias)),
    computed in tiles so the (N, V) logits never exist; see the module docstring for outputs."""
    from . import hidden as impl

    if _backend(backend, hidden) == "triton":
        fn = impl.logprobs_from_hidden_triton
    else:
        fn = impl.logprobs_from_hidden_torch
    return fn(
        hidden,
        weight,
        index,
        bias=bias,
        temperature=temperature,
        logit_scale=logit_scale,
        softcap=softcap,
        mask=mask,
        return_entropy=return_entropy,
        return_top1=return_top1,
    )


__all__ = ["logprobs_from_logits", "logprobs_from_hidden", "BACKENDS"]
