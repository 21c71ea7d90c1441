"""Log-softmax gathering: per-token log-probs (and entropy, ...) without a full float32 (N, V) tensor.

Notation: N rows (any leading batch shape, flattened), V vocabulary, H hidden size; z (..., V) the logits the
softmax sees: logits / temperature, or softcap(logit_scale * (hidden @ weight.T + bias)) / temperature.

    logprobs_from_logits(logits (..., V), index (...))            -> logps (...) float32
    logprobs_from_hidden(hidden (..., H), weight (V, H), index)   -> logps (...) float32, logits never built

Both return `logps` alone, or the tuple `(logps, [entropy], [is_top1], [mean_logit], [log_sum_sq])` of the
outputs asked for, always in that order (`return_entropy`, `return_top1`, `return_mean_logit`, `return_log_sum_sq`;
`_outputs.select_outputs`), each of logps' shape:
- `entropy`: the entropy of softmax(z) (float32, differentiable);
- `is_top1`: whether `index` is the arg-max of the logits (before the temperature) with torch.argmax's tie rule,
  the first index holding the maximum, as TRL's `mean_token_accuracy` counts it: a target tied with a lower index
  is not top-1 (bool, no grad);
- `mean_logit`: sum_v z_v / V, the mean of z over the whole vocabulary, temperature included (TRL's
  `mean_logits`, which its DPO logs as `logits/chosen` and `logits/rejected`) (float32, no grad);
- `log_sum_sq`: log sum_v softmax(z)_v^2 (TRL's `log_sum_sq_probs`, the per-token term of DPO's
  `use_weighting`, WPO) (float32, no grad).
The last two are metrics and weights: no gradient flows from them, the backward is the one without them, and
when they are not asked for the kernels do none of their work.
Rows where `mask` is False cost nothing and return 0 (and False).

Backends: Triton on CUDA tensors of the dtypes it serves (float32, bfloat16, float16; and on the CPU under
`TRITON_INTERPRET=1` when forced); a chunked torch implementation elsewhere (float64 included). The
hidden-state path runs its tile matmuls with `torch.mm` on both and uses the backend for the per-tile
softmax work between them. Force one with `backend="triton" | "torch"` or the environment variable
`POSTTRAIN_KERNEL_BACKEND`; `choose_backend` is the whole decision.
"""

from __future__ import annotations

import os

import torch

BACKENDS = ("triton", "torch")
# The dtypes the Triton kernels serve; any other (float64) goes to the torch path, which serves every float dtype.
TRITON_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def choose_backend(
    requested: str | None,
    env: str | None,
    device_type: str,
    dtype: torch.dtype,
    *,
    triton_available: bool,
    interpreting: bool,
) -> str:
    """The backend for one call, as a pure function of what decides it (so every case is testable on a CPU).

    requested: the `backend` argument; env: POSTTRAIN_KERNEL_BACKEND; device_type: "cuda", "cpu", ...; dtype: the
    input's; interpreting: TRITON_INTERPRET=1. Unforced: Triton for a CUDA tensor of a dtype it serves when
    triton imports, torch otherwise. Forced: that backend, or a named error when it cannot run the call.
    """
    choice = requested or env or None
    if choice is None:
        serves = device_type == "cuda" and dtype in TRITON_DTYPES and triton_available
        return "triton" if serves else "torch"
    if choice not in BACKENDS:
        source = "backend" if requested else "POSTTRAIN_KERNEL_BACKEND"
        raise ValueError(f"{source}={choice!r} is not a kernel backend; expected one of {BACKENDS}")
    if choice == "triton":
        if not triton_available:
            raise RuntimeError("backend 'triton' was forced but triton cannot be imported")
        if device_type != "cuda" and not interpreting:
            raise RuntimeError(
                f"backend 'triton' on a {device_type} tensor needs TRITON_INTERPRET=1 set before triton is imported"
            )
        if dtype not in TRITON_DTYPES:
            raise TypeError(
                f"backend 'triton' was forced but it does not serve {dtype} (only {TRITON_DTYPES}); "
                "use backend='torch'"
            )
    return choice


def _backend(requested: str | None, tensor: torch.Tensor) -> str:
    return choose_backend(
        requested,
        os.environ.get("POSTTRAIN_KERNEL_BACKEND"),
        _device_type(tensor),
        tensor.dtype,
        triton_available=_triton_available(),
        interpreting=os.environ.get("TRITON_INTERPRET") == "1",
    )


def _device_type(tensor: torch.Tensor) -> str:
    return tensor.device.type


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
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
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
        return_mean_logit=return_mean_logit,
        return_log_sum_sq=return_log_sum_sq,
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
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
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
        return_mean_logit=return_mean_logit,
        return_log_sum_sq=return_log_sum_sq,
    )


__all__ = ["logprobs_from_logits", "logprobs_from_hidden", "choose_backend", "BACKENDS", "TRITON_DTYPES"]
