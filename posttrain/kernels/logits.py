"""Per-token log-probs (and entropy, top-1, ...) from full logits, without a float32 copy of the (N, V) logits.

Notation: N rows (any leading shape, flattened), V vocabulary, T the sampling temperature.

    z = logits / T                                   (N, V), math in float32 (float64 for float64 input)
    lse = logsumexp(z)                               (N,)
    logps = z[index] - lse                           (N,)
    entropy = -sum_j p_j log p_j = lse - sum_j p_j z_j,   p = softmax(z)
    is_top1 = index == argmax_j logits_j             (N,) bool; torch.argmax's tie rule: the first index holding
                                                     the maximum, so a target tied with a lower index is not
                                                     top-1 (TRL's mean_token_accuracy; hidden.py the same)
    mean_logit = sum_j z_j / V                       (N,) the mean tempered logit (TRL's logits/chosen, /rejected)
    log_sum_sq = log sum_j p_j^2                     (N,) (WPO's per-token weight, TRL's use_weighting)

Gradients (g = dL/dlogps, gH = dL/dentropy), per row:

    dL/dz_j = g * (onehot_j - p_j) - gH * p_j * (log p_j + entropy)
    dL/dlogits = dL/dz / T

This file holds the three implementations behind `posttrain.kernels.logprobs_from_logits`:
- `reference_logprobs_from_logits`: log_softmax + gather in float64, readable, the test reference;
- `logprobs_from_logits_torch`: chunked rows, an autograd.Function that saves the logits it was given plus
  the per-row entropy and recomputes the softmax chunk by chunk in backward (CPU and any device);
- `logprobs_from_logits_triton`: one Triton program per row, one pass over the row in forward (online
  softmax) and one in backward.

mean_logit and log_sum_sq are metrics and weights, never differentiated: no gradient flows from them, and the
backward is the same whether they were asked for or not.

Conventions shared by all three: outputs `logps`, `entropy`, `mean_logit`, `log_sum_sq` are float32 (float64
for float64 input on the torch path, so `gradcheck` can run), `is_top1` bool; rows where `mask` is False give
0 / False and a zero gradient and cost nothing; a target whose logit is -inf gives logps = -inf; p log p is taken
as 0 where p = 0, so -inf logits never make the entropy NaN (they do make mean_logit -inf, as the mean it is).
A row whose logits are all -inf has no distribution and gives NaN.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os

import torch

from ._outputs import select_outputs

try:
    import triton
    import triton.language as tl
except ImportError:  # triton ships with torch on Linux only; the torch path needs none of it
    triton = None

# Rows per chunk on the torch path: each of its float32 work buffers holds about this many elements
# (2^22 = 16 MiB): few enough chunks that per-op overhead stays small, far below a float32 (N, V) copy.
CHUNK_ELEMENTS = 2**22

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# Shared: input checks and output packing
# ----------------------------------------------------------------------------------------------------


def _check_inputs(logits, index, mask, temperature):
    """Validate arguments; return (logits2d (N, V), index1d (N,), mask1d (N,) bool or None, leading shape)."""
    if not isinstance(logits, torch.Tensor) or logits.ndim < 1:
        raise ValueError("logits must be a tensor of shape (..., V)")
    if logits.dtype not in _DTYPES:
        raise TypeError(f"logits dtype {logits.dtype} is not supported; expected one of {_DTYPES}")
    V = logits.shape[-1]
    lead = logits.shape[:-1]
    if V == 0:
        raise ValueError("logits has an empty vocabulary dimension (V = 0)")
    if not isinstance(index, torch.Tensor) or index.shape != lead:
        shape = tuple(index.shape) if isinstance(index, torch.Tensor) else type(index).__name__
        raise ValueError(f"index has shape {shape}; expected the leading shape of logits {tuple(lead)}")
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise TypeError(f"index dtype {index.dtype} is not an integer dtype")
    if index.device != logits.device:
        raise ValueError(f"index is on {index.device} but logits is on {logits.device}")
    if mask is not None:
        if not isinstance(mask, torch.Tensor) or mask.shape != lead:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"mask has shape {shape}; expected the leading shape of logits {tuple(lead)}")
        if mask.device != logits.device:
            raise ValueError(f"mask is on {mask.device} but logits is on {logits.device}")
        mask = mask.reshape(-1).bool()
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    index = index.reshape(-1).long()
    _check_index_range(index, V, mask)
    return logits.reshape(-1, V), index, mask, lead


def _check_index_range(index, V, mask):
    """An out-of-range index in a kept row would read outside its row in the kernels: stop before any work.

    On the CPU a plain check (one aminmax pass, no sync to pay) that names the first bad row. On a GPU an
    asynchronous device-side assert, so a step keeps no host sync and can be captured in a CUDA graph: the
    error surfaces at the next synchronisation and, like any device assert, ends the CUDA context."""
    kept = index if mask is None else torch.where(mask, index, 0)  # masked rows are never read
    if not _on_host(index):
        torch._assert_async(((kept >= 0) & (kept < V)).all(), f"an index is outside [0, V={V}) in a kept row")
        return
    if kept.numel() == 0:
        return
    low, high = torch.aminmax(kept)
    if low < 0 or high >= V:
        row = int(((kept < 0) | (kept >= V)).nonzero()[0, 0])
        raise IndexError(f"index[{row}] (flattened row {row}) = {int(index[row])} is outside [0, V={V})")


def _on_host(tensor: torch.Tensor) -> bool:
    """Whether reading tensor's values from Python costs no device synchronisation."""
    return tensor.device.type == "cpu"


def _empty(shape, dtype, device) -> torch.Tensor:
    """Uninitialised output or gradient buffer that the code must fill completely (tests poison it with NaN)."""
    return torch.empty(shape, dtype=dtype, device=device)


# ----------------------------------------------------------------------------------------------------
# Reference: the readable definition, float64
# ----------------------------------------------------------------------------------------------------


def reference_logprobs_from_logits(
    logits: torch.Tensor,
    index: torch.Tensor,
    *,
    temperature: float = 1.0,
    mask: torch.Tensor | None = None,
    return_entropy: bool = False,
    return_top1: bool = False,
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
):
    """log_softmax(logits / temperature) gathered at `index`, in float64, whole (N, V) at once.

    logits (..., V), index (...) long, mask (...) bool -> logps (...) float64 [, entropy (...), is_top1 (...),
    mean_logit (...), log_sum_sq (...)]. Differentiable with respect to `logits`. Memory-hungry on purpose: it is the
    test reference.
    """
    z = logits.double() / temperature  # (..., V)
    logp_all = torch.log_softmax(z, dim=-1)  # (..., V)
    logps = logp_all.gather(-1, index.long().unsqueeze(-1)).squeeze(-1)  # (...)
    p = logp_all.exp()
    # p log p = 0 where p = 0; the where() sits on log p (not on the product) so -inf never meets 0 in backward
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)  # (...)
    # top-1 on the untempered logits; torch.argmax gives the first index holding the maximum
    top1 = logits.argmax(-1) == index  # (...)
    mean_logit = z.mean(-1)  # (...)
    log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)  # (...) log sum_j p_j^2
    if mask is not None:
        keep = mask.bool()
        logps, entropy, mean_logit, log_sum_sq = (
            torch.where(keep, x, torch.zeros_like(x)) for x in (logps, entropy, mean_logit, log_sum_sq)
        )
        top1 = top1 & keep
    wanted = (return_entropy, return_top1, return_mean_logit, return_log_sum_sq)
    return select_outputs(logps, (entropy, top1, mean_logit, log_sum_sq), wanted)


# ----------------------------------------------------------------------------------------------------
# Torch: chunked rows, softmax recomputed in backward
# ----------------------------------------------------------------------------------------------------


def _chunk_rows(V: int) -> int:
    """Rows per chunk so one float32 (rows, V) work buffer holds about CHUNK_ELEMENTS elements."""
    return max(1, CHUNK_ELEMENTS // V)


def _row_chunks(N: int, rows: torch.Tensor | None, V: int):
    """Yield row selectors of at most _chunk_rows(V) rows: slices when every row is kept, index tensors otherwise."""
    step = _chunk_rows(V)
    if rows is None:
        for start in range(0, N, step):
            yield slice(start, min(start + step, N))
    else:
        yield from rows.split(step)


def _chunk_in_math_dtype(logits2d, sel, buf):
    """logits2d[sel] as a (n, V) tensor of buf's dtype: a view when that needs no conversion, else copied into
    buf (read-only either way: a view aliases the caller's logits)."""
    chunk = logits2d[sel]
    if chunk.dtype == buf.dtype and isinstance(sel, slice):
        return chunk
    return buf[: chunk.shape[0]].copy_(chunk)


def _tempered(x: torch.Tensor, T: float, buf: torch.Tensor) -> torch.Tensor:
    """z = x / T, written into buf unless T == 1 (then x itself, which may alias the caller's logits)."""
    return x if T == 1.0 else torch.mul(x, 1.0 / T, out=buf[: x.shape[0]])


def _log_softmax_into(z: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """log_softmax(z, -1) written into buf: ATen's fused row kernel (one read and one write per element)."""
    return torch.ops.aten._log_softmax.out(z, -1, False, out=buf[: z.shape[0]])


def _softmax_into(z: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """softmax(z, -1) written into buf, fused like _log_softmax_into."""
    return torch.ops.aten._softmax.out(z, -1, False, out=buf[: z.shape[0]])


class _ChunkedLogProbs(torch.autograd.Function):
    """logits2d (N, V) -> logps (N,), entropy (N,) or None, is_top1 (N,) bool, mean_logit (N,) or None,
    log_sum_sq (N,) or None (the last two without gradient).

    Saves the logits it was given (no copy), index, and the per-row entropy. Forward and backward walk the
    rows in chunks through (chunk, V) work buffers allocated once per call (fresh pages for every chunk cost
    more than the arithmetic on a CPU) and use ATen's fused (log-)softmax row kernels; backward recomputes
    softmax(z) per chunk and fills a gradient allocated once.

    Departure from the usual recipe (save lse, backward p = exp(z - lse)): backward recomputes the normaliser
    too, because on a CPU ATen's fused softmax (max, exp and sum in one row kernel) measured faster than the
    separate subtract and exp passes that reuse a saved lse would need. The Triton path saves it.
    """

    @staticmethod
    def forward(ctx, logits2d, index, rows, options):
        temperature, with_entropy, with_top1, with_mean, with_sum_sq, inplace_backward = options
        N, V = logits2d.shape
        T = temperature
        dev = logits2d.device
        math_dtype = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
        # masked rows are never visited, so their outputs start at 0; otherwise every row is written
        new = torch.zeros if rows is not None else _empty
        logps = new(N, dtype=math_dtype, device=dev)
        entropy = new(N, dtype=math_dtype, device=dev) if with_entropy else None
        top1 = (torch.zeros if rows is not None or not with_top1 else _empty)(N, dtype=torch.bool, device=dev)
        mean_logit = new(N, dtype=math_dtype, device=dev) if with_mean else None
        log_sum_sq = new(N, dtype=math_dtype, device=dev) if with_sum_sq else None
        n_rows = N if rows is None else rows.numel()
        shape = (min(_chunk_rows(V), n_rows), V)
        # torch.empty maps pages without touching them: a buffer a call never uses costs no memory
        buf_x, buf_z, buf_l, buf_p = (torch.empty(shape, dtype=math_dtype, device=dev) for _ in range(4))
        for sel in _row_chunks(N, rows, V):
            # 1. z = logits / T for the chunk in the math dtype (a view of the input when nothing to convert)
            x = _chunk_in_math_dtype(logits2d, sel, buf_x)  # (n, V)
            z = _tempered(x, T, buf_z)  # (n, V)
            idx = index[sel].unsqueeze(-1)  # (n, 1)
            # 2. top-1 (an extra pass, so only when asked), on the untempered logits: dividing by T may round two
            #    neighbouring float32 logits to one value, and argmax takes the first of a tie
            if with_top1:
                top1[sel] = x.argmax(-1) == index[sel]
            # 3. log p for the whole chunk, then the target's; a target at -inf gives -inf
            logp = _log_softmax_into(z, buf_l)  # (n, V)
            logps[sel] = logp.gather(-1, idx).squeeze(-1)
            # 4. entropy = -sum_j p_j log p_j; clamping log p = -inf to the lowest float makes p log p = 0 there
            if with_entropy or with_sum_sq:
                p = _softmax_into(z, buf_p)
            if with_entropy:
                logp.clamp_(min=torch.finfo(math_dtype).min)
                entropy[sel] = -logp.mul_(p).sum(-1)  # sum(), not a dot: its cascade keeps V = 152k accurate
            # 5. the metrics, each an extra pass, so only when asked: log sum_j p_j^2 (terms in [0, 1], no
            #    overflow; the sum is at least 1/V, so underflowing tiny terms cost nothing) and the mean of z.
            #    buf_l is free again: log p was gathered, and the entropy has consumed it
            if with_sum_sq:
                log_sum_sq[sel] = torch.mul(p, p, out=buf_l[: p.shape[0]]).sum(-1).log_()
            if with_mean:
                mean_logit[sel] = z.mean(-1)
        ctx.save_for_backward(logits2d, index, entropy, rows)
        ctx.temperature = T
        ctx.inplace_backward = inplace_backward
        ctx.mark_non_differentiable(*(x for x in (top1, mean_logit, log_sum_sq) if x is not None))
        ctx.set_materialize_grads(False)
        return logps, entropy, top1, mean_logit, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_non_differentiable):
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None
        logits2d, index, entropy, rows = ctx.saved_tensors
        N, V = logits2d.shape
        T = ctx.temperature
        dev = logits2d.device
        math_dtype = torch.float64 if logits2d.dtype == torch.float64 else torch.float32
        if ctx.inplace_backward:
            grad = logits2d  # the caller promised the logits are not read again
            if rows is not None:
                masked = torch.ones(N, dtype=torch.bool, device=dev)
                masked[rows] = False
                grad[masked] = 0
        elif rows is None:
            grad = _empty((N, V), logits2d.dtype, dev)
        else:
            grad = torch.zeros((N, V), dtype=logits2d.dtype, device=dev)
        n_rows = N if rows is None else rows.numel()
        shape = (min(_chunk_rows(V), n_rows), V)
        buf_x, buf_z, buf_l, buf_p = (torch.empty(shape, dtype=math_dtype, device=dev) for _ in range(4))
        for sel in _row_chunks(N, rows, V):
            # 1. recompute z and p = softmax(z) for the chunk
            z = _tempered(_chunk_in_math_dtype(logits2d, sel, buf_x), T, buf_z)  # (n, V)
            p = _softmax_into(z, buf_p)  # (n, V)
            # 2. entropy term gH p_j (log p_j + H); log p = -inf clamped so that p log p = 0 where p = 0
            if grad_entropy is not None:
                term = _log_softmax_into(z, buf_l).clamp_(min=torch.finfo(math_dtype).min)
                term.add_(entropy[sel].unsqueeze(-1)).mul_(p).mul_(grad_entropy[sel].unsqueeze(-1))
            # 3. dz = g (onehot - p) - term
            if grad_logps is not None:
                g = grad_logps[sel].unsqueeze(-1)  # (n, 1)
                dz = p.mul_(-g).scatter_add_(-1, index[sel].unsqueeze(-1), g)
                if grad_entropy is not None:
                    dz.sub_(term)
            else:
                dz = term.neg_()
            # 4. chain rule through z = logits / T, then one write in the logits' dtype
            if T != 1.0:
                dz.mul_(1.0 / T)
            if isinstance(sel, slice):
                grad[sel].copy_(dz)
            else:
                grad.index_copy_(0, sel, dz.to(grad.dtype))
        return grad, None, None, None  # no gradient for index, rows and options


def logprobs_from_logits_torch(
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
):
    """Chunked torch log-softmax gathering: logits (..., V), index (...) -> logps (...) float32 [, entropy, is_top1,
    mean_logit, log_sum_sq].

    Peak extra memory beyond the input is one to four float32 (chunk, V) work buffers (CHUNK_ELEMENTS each) plus the
    gradient, which has the shape and dtype of `logits` and is allocated once. With `inplace_backward=True` the
    gradient is written into the logits buffer itself (the caller promises not to read the logits again).
    A layout that `reshape(-1, V)` cannot view costs one copy of the logits in their own dtype.
    """
    logits2d, index1d, mask1d, lead = _check_inputs(logits, index, mask, temperature)
    rows = None if mask1d is None else mask1d.nonzero().squeeze(-1)  # (n_valid,) the rows that cost anything
    wanted = (return_entropy, return_top1, return_mean_logit, return_log_sum_sq)
    options = (float(temperature), *wanted, inplace_backward)
    outputs = _ChunkedLogProbs.apply(logits2d, index1d, rows, options)
    return select_outputs(outputs[0], outputs[1:], wanted, lead)


# ----------------------------------------------------------------------------------------------------
# Triton: one program per row; forward is one online-softmax pass, backward one recompute pass
# ----------------------------------------------------------------------------------------------------
# The kernels are plain functions jitted on first use (`_kernels`), so this module imports without triton.
# On a CPU they run under the interpreter, which needs TRITON_INTERPRET=1 before triton is first imported.


def _forward_kernel(
    logits_ptr,  # (N, V) fp32/bf16/fp16, row stride stride_n, unit column stride
    stride_n,
    index_ptr,  # (N,) int64
    mask_ptr,  # (N,) int8, read only when HAS_MASK
    logps_ptr,  # (N,) float32 out
    max_ptr,  # (N,) float32 out: max_j z_j (0 for a row of all -inf), saved for backward
    log_norm_ptr,  # (N,) float32 out: log sum_j exp(z_j - max), saved for backward; lse = max + log_norm
    entropy_ptr,  # (N,) float32 out, written only when HAS_ENTROPY
    top1_ptr,  # (N,) int8 out
    mean_logit_ptr,  # (N,) float32 out, written only when HAS_MEAN_LOGIT
    log_sum_sq_ptr,  # (N,) float32 out, written only when HAS_LOG_SUM_SQ
    V,
    inv_t,
    HAS_MASK: tl.constexpr,
    HAS_ENTROPY: tl.constexpr,
    HAS_MEAN_LOGIT: tl.constexpr,
    HAS_LOG_SUM_SQ: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """Online softmax (Milakov & Gimelshein 2018, "Online normalizer calculation for softmax",
    arXiv:1805.02867): one pass keeps a running max m and a running sum d = sum_j exp(z_j - m), rescaling d
    by exp(m_old - m_new) when the max grows. For the entropy it also keeps s = sum_j exp(z_j - m) (z_j - m),
    rescaled the same way, so H = log d - s / d stays relative to the max (no lse - sum p z cancellation); for
    log sum_j p_j^2 = log q - 2 log d it keeps q = sum_j exp(z_j - m)^2, rescaled by the square of d's factor."""
    # 1. This program's row. program_id is int32: cast before multiplying by the row stride, or
    #    row * stride_n wraps once N * V > 2^31 (triton-lang/triton#1058; Liger's cross-entropy guards the same way).
    row = tl.program_id(0).to(tl.int64)

    # 2. Masked rows: outputs 0 / False, nothing read
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            tl.store(logps_ptr + row, 0.0)
            tl.store(max_ptr + row, 0.0)
            tl.store(log_norm_ptr + row, 0.0)
            tl.store(top1_ptr + row, 0)
            if HAS_ENTROPY:
                tl.store(entropy_ptr + row, 0.0)
            if HAS_MEAN_LOGIT:
                tl.store(mean_logit_ptr + row, 0.0)
            if HAS_LOG_SUM_SQ:
                tl.store(log_sum_sq_ptr + row, 0.0)
            return

    # 3. One pass over the row in BLOCK_V blocks, fp32 statistics. While the row has been all -inf so far,
    #    shift by 0 instead of the max (-inf - -inf is NaN); exp(-inf) = 0 then zeroes the old sums.
    row_ptr = logits_ptr + row * stride_n
    m = float("-inf")
    d = 0.0
    s = 0.0
    q = 0.0
    z_sum = 0.0
    x_max = float("-inf")  # running max of the untempered logits
    arg = 0  # its first column: torch.argmax's tie rule (0 for a row of all -inf, as torch.argmax)
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32)  # untempered here
        # first arg-max on the untempered logits (dividing by T may round neighbouring logits to one value):
        # the block's lowest column holding its max, taken only when the block raises the row's max, so an
        # equal max in a later block keeps the earlier column
        block_max = tl.max(z, axis=0)
        block_arg = tl.min(tl.where(z == block_max, cols, V), axis=0)
        arg = tl.where(block_max > x_max, block_arg, arg)
        x_max = tl.maximum(x_max, block_max)
        z = z * inv_t
        if HAS_MEAN_LOGIT:
            z_sum += tl.sum(tl.where(cols < V, z, 0.0), axis=0)  # the tail past V was loaded as -inf
        # x -> fl(x * inv_t) is monotone, so the tempered max is fl(x_max * inv_t): no second reduction
        m_new = x_max * inv_t
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m - ref)
        e = tl.exp(z - ref)
        if HAS_ENTROPY:
            # old s is relative to m: sum e_j (z_j - m) -> alpha * (s + (m - ref) d) relative to ref;
            # e (z - ref) is 0 where e is 0 (z = -inf, or the masked tail of the last block)
            shift = (tl.where(d > 0, m, ref) - ref) * d  # 0 while d = 0 (m = -inf: no -inf * 0)
            s = alpha * (s + shift) + tl.sum(e * tl.where(e > 0, z - ref, 0.0), axis=0)
        if HAS_LOG_SUM_SQ:
            q = q * (alpha * alpha) + tl.sum(e * e, axis=0)
        d = d * alpha + tl.sum(e, axis=0)
        m = m_new

    # 4. The target's log-prob as (z_t - max) - log d: z_t - max is exact for nearby values, where
    #    z_t - lse would lose ~ulp(|z|) (1e-3 at |z| ~ 1e4) to cancellation. Top-1: the target is the first arg-max.
    ref = tl.where(m == float("-inf"), 0.0, m)
    log_norm = tl.log(d)
    target = tl.load(index_ptr + row)
    z_t = tl.load(row_ptr + target).to(tl.float32) * inv_t
    tl.store(logps_ptr + row, (z_t - ref) - log_norm)
    tl.store(max_ptr + row, ref)
    tl.store(log_norm_ptr + row, log_norm)
    tl.store(top1_ptr + row, (arg == target).to(tl.int8))
    if HAS_ENTROPY:
        tl.store(entropy_ptr + row, log_norm - s / d)
    if HAS_MEAN_LOGIT:
        tl.store(mean_logit_ptr + row, z_sum / V)
    if HAS_LOG_SUM_SQ:
        tl.store(log_sum_sq_ptr + row, tl.log(q) - 2.0 * log_norm)


def _backward_kernel(
    logits_ptr,  # (N, V) row stride stride_n, unit column stride
    stride_n,
    grad_ptr,  # (N, V) out, row stride grad_stride_n, unit column stride; may alias logits_ptr (in-place)
    grad_stride_n,
    index_ptr,  # (N,) int64
    mask_ptr,  # (N,) int8, read only when HAS_MASK
    max_ptr,  # (N,) float32 from forward
    log_norm_ptr,  # (N,) float32 from forward
    entropy_ptr,  # (N,) float32 from forward, read only when HAS_GRAD_ENTROPY
    grad_logps_ptr,  # (N,) float32, read only when HAS_GRAD_LOGPS
    grad_entropy_ptr,  # (N,) float32, read only when HAS_GRAD_ENTROPY
    V,
    inv_t,
    HAS_MASK: tl.constexpr,
    HAS_GRAD_LOGPS: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    """dlogits_j = (g (onehot_j - p_j) - gH p_j (log p_j + H)) / T, p recomputed from the saved
    max and log-normaliser as exp((z - max) - log_norm).
    Each block is loaded before it is stored, so grad_ptr may be logits_ptr."""
    # 1. Row, int64 before the stride multiply (see the forward kernel)
    row = tl.program_id(0).to(tl.int64)
    grad_row = grad_ptr + row * grad_stride_n

    # 2. Masked rows: zero gradient
    if HAS_MASK:
        if tl.load(mask_ptr + row) == 0:
            for start in range(0, V, BLOCK_V):
                cols = start + tl.arange(0, BLOCK_V)
                zero = tl.zeros([BLOCK_V], dtype=tl.float32).to(grad_ptr.dtype.element_ty)
                tl.store(grad_row + cols, zero, mask=cols < V)
            return

    # 3. Per-row scalars
    row_ptr = logits_ptr + row * stride_n
    row_max = tl.load(max_ptr + row)
    log_norm = tl.load(log_norm_ptr + row)
    target = tl.load(index_ptr + row)
    g = 0.0
    if HAS_GRAD_LOGPS:
        g = tl.load(grad_logps_ptr + row)
    if HAS_GRAD_ENTROPY:
        g_h = tl.load(grad_entropy_ptr + row)
        h = tl.load(entropy_ptr + row)

    # 4. One pass: recompute log p and p, write the gradient in the logits' dtype
    for start in range(0, V, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        z = tl.load(row_ptr + cols, mask=cols < V, other=float("-inf")).to(tl.float32) * inv_t
        logp = (z - row_max) - log_norm
        p = tl.exp(logp)
        dz = tl.zeros([BLOCK_V], dtype=tl.float32)
        if HAS_GRAD_LOGPS:
            dz = tl.where(cols == target, g - g * p, -g * p)
        if HAS_GRAD_ENTROPY:
            # p log p = 0 where p = 0: log p = -inf there would make -inf * 0 = NaN
            dz -= g_h * p * (tl.where(p > 0, logp, 0.0) + h)
        dz = dz * inv_t
        tl.store(grad_row + cols, dz.to(grad_ptr.dtype.element_ty), mask=cols < V)


# Fused multiply-add in the kernels, stated rather than left to triton's default (on in 3.9, off from 3.10):
# the same numerics whichever triton is installed.
FP_FUSION = True


def device_of(tensor: torch.Tensor):
    """Context that makes tensor's GPU the current one while a kernel is launched (triton launches on the current
    device and its stream, which need not be the tensor's: a model split over GPUs); nothing on the CPU."""
    return torch.cuda.device(tensor.device) if tensor.is_cuda else contextlib.nullcontext()


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _kernels():
    """(forward, backward) jitted kernels."""
    return triton.jit(_forward_kernel), triton.jit(_backward_kernel)


def _launch_config(V: int, backward: bool = False) -> tuple[int, int]:
    """(BLOCK_V, num_warps). One row per program, streamed in 4096-wide blocks. Timed on an H200 at 16k rows,
    bf16, V = 32k and 152k (benchmarks/geometry.py; results.md "Session 16"): the forward, which reduces every
    block (max, first arg-max, sums), runs fastest with 4 warps (75 % of copy bandwidth at 152k; 8 warps 65 %,
    16 warps 48 %); the backward, one elementwise pass, with 8 (96 %; 4 warps 82 % at this block). Splitting
    a row's backward over several programs (a 2-D grid, tried and removed) gained nothing."""
    block = min(triton.next_power_of_2(V), 4096)
    return block, 8 if backward and block >= 2048 else 4


class _TritonLogProbs(torch.autograd.Function):
    """logits2d (N, V) -> logps (N,) float32, entropy (N,) float32 or None, is_top1 (N,) bool, mean_logit (N,)
    float32 or None, log_sum_sq (N,) float32 or None (the last two without gradient)."""

    @staticmethod
    def forward(ctx, logits2d, index, mask_i8, options):
        temperature, with_entropy, with_mean, with_sum_sq, inplace_backward = options
        N, V = logits2d.shape
        dev = logits2d.device
        logps = _empty(N, torch.float32, dev)
        row_max = _empty(N, torch.float32, dev)
        log_norm = _empty(N, torch.float32, dev)
        entropy = _empty(N, torch.float32, dev) if with_entropy else None
        top1 = _empty(N, torch.int8, dev)
        mean_logit = _empty(N, torch.float32, dev) if with_mean else None
        log_sum_sq = _empty(N, torch.float32, dev) if with_sum_sq else None
        block, warps = _launch_config(V)
        if N > 0:
            forward_kernel, _ = _kernels()
            with device_of(logits2d):
                forward_kernel[(N,)](
                    logits2d,
                    logits2d.stride(0),
                    index,
                    mask_i8 if mask_i8 is not None else top1,
                    logps,
                    row_max,
                    log_norm,
                    entropy if with_entropy else logps,
                    top1,
                    mean_logit if with_mean else logps,
                    log_sum_sq if with_sum_sq else logps,
                    V,
                    1.0 / temperature,
                    HAS_MASK=mask_i8 is not None,
                    HAS_ENTROPY=with_entropy,
                    HAS_MEAN_LOGIT=with_mean,
                    HAS_LOG_SUM_SQ=with_sum_sq,
                    BLOCK_V=block,
                    num_warps=warps,
                    enable_fp_fusion=FP_FUSION,
                )
        ctx.save_for_backward(logits2d, index, mask_i8, row_max, log_norm, entropy)
        ctx.temperature = temperature
        ctx.inplace_backward = inplace_backward
        top1 = top1.view(torch.bool)  # 0/1 bytes reinterpreted, no copy
        ctx.mark_non_differentiable(*(x for x in (top1, mean_logit, log_sum_sq) if x is not None))
        ctx.set_materialize_grads(False)
        return logps, entropy, top1, mean_logit, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, *_non_differentiable):
        if grad_logps is None and grad_entropy is None:
            return None, None, None, None
        logits2d, index, mask_i8, row_max, log_norm, entropy = ctx.saved_tensors
        N, V = logits2d.shape
        if ctx.inplace_backward:
            grad = logits2d  # the caller promised the logits are not read again
            # the kernel writes behind autograd's back: bump the version counter as an in-place torch op would,
            # so a node that saved these logits for its own backward raises instead of reading the gradient
            torch.autograd.graph.increment_version(logits2d)
        else:
            grad = _empty((N, V), logits2d.dtype, logits2d.device)
        block, warps = _launch_config(V, backward=True)
        if N > 0:
            _, backward_kernel = _kernels()
            with device_of(logits2d):
                backward_kernel[(N,)](
                    logits2d,
                    logits2d.stride(0),
                    grad,
                    grad.stride(0),
                    index,
                    mask_i8 if mask_i8 is not None else row_max,
                    row_max,
                    log_norm,
                    entropy if entropy is not None else row_max,
                    grad_logps.contiguous() if grad_logps is not None else row_max,
                    grad_entropy.contiguous() if grad_entropy is not None else row_max,
                    V,
                    1.0 / ctx.temperature,
                    HAS_MASK=mask_i8 is not None,
                    HAS_GRAD_LOGPS=grad_logps is not None,
                    HAS_GRAD_ENTROPY=grad_entropy is not None,
                    BLOCK_V=block,
                    num_warps=warps,
                    enable_fp_fusion=FP_FUSION,
                )
        return grad, None, None, None  # no gradient for index, mask and options


def logprobs_from_logits_triton(
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
):
    """Triton log-softmax gathering: logits (..., V), index (...) -> logps (...) float32 [, entropy, is_top1,
    mean_logit, log_sum_sq].

    Reads the logits once in forward and once in backward, writes the gradient once (in the logits' dtype,
    into the logits buffer itself with `inplace_backward=True`). Any row stride is read in place; a layout
    that `reshape(-1, V)` cannot view, or a vocabulary axis with stride != 1, costs one copy. Runs on CUDA, or
    on the CPU with TRITON_INTERPRET=1.
    The row stride is the caller's: padding it for 128-bit accesses (V = 50257) would copy all the logits, which
    costs more than the narrower accesses it would save.
    """
    if triton is None:
        raise RuntimeError("logprobs_from_logits_triton needs triton, which cannot be imported")
    logits2d, index1d, mask1d, lead = _check_inputs(logits, index, mask, temperature)
    if logits2d.dtype == torch.float64:
        raise TypeError(
            "logits dtype torch.float64 is not supported by the triton backend; use backend='torch'"
        )
    if not logits2d.is_cuda and not _interpreting():
        raise RuntimeError("logprobs_from_logits_triton on a CPU tensor needs TRITON_INTERPRET=1")
    if logits2d.stride(1) != 1:
        # the kernels read rows as contiguous runs (coalesced); a strided vocabulary axis is copied once
        logits2d = logits2d.contiguous()
    mask_i8 = None if mask1d is None else mask1d.contiguous().view(torch.int8)
    options = (float(temperature), return_entropy, return_mean_logit, return_log_sum_sq, inplace_backward)
    outputs = _TritonLogProbs.apply(logits2d, index1d.contiguous(), mask_i8, options)
    wanted = (return_entropy, return_top1, return_mean_logit, return_log_sum_sq)
    return select_outputs(outputs[0], outputs[1:], wanted, lead)
