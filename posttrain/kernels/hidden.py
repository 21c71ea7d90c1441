"""Fused output layer + log-softmax + gather: per-token log-probs straight from hidden states.

Notation: N rows (any leading batch shape, flattened), V vocabulary, H hidden size.
R rows per tile, C vocabulary entries per tile.

    a = hidden @ weight.T (+ bias)           (N, V)  never built: only (R, C) tiles exist
    x = a * logit_scale
    y = softcap * tanh(x / softcap)           if softcap (Gemma's final_logit_softcapping), else x
    z = y / temperature
    logps   = z[index] - logsumexp(z)         (N,)
    entropy = logsumexp(z) - sum_j p_j z_j    (N,)   p = softmax(z)
    is_top1 = z[index] >= max_j z_j           (N,)   ties count as top-1

The log-sum-exp is accumulated across vocabulary tiles with the online softmax recurrence
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"): a running max m, a running
sum s = sum exp(z - m) and, for the entropy, t = sum exp(z - m) (z - m), all rescaled when m grows.

Gradients (g = dL/dlogps, e = dL/dentropy, mu = sum_j p_j z_j):
    dlogp/dz_j    = onehot_j - p_j
    dentropy/dz_j = -p_j (z_j - mu)
    dL/dz_j       = g onehot_j - p_j (g + e (z_j - mu))
then chained through 1 / temperature, the softcap (d/dx c tanh(x / c) = 1 - tanh^2) and logit_scale:
    dhidden = dL/da @ weight, dweight = dL/da.T @ hidden, dbias = sum_rows dL/da
The backward recomputes each tile's logits from hidden and weight (one extra matmul) instead of storing them.

Structure, the same on every device: the tile matmuls are plain `torch.mm` calls (cuBLAS on a GPU, where
they run near the tensor-core peak), and the per-tile work between them, folding a tile into the running
statistics in forward and turning it into dL/da in backward, is one "fold" function: Triton kernels on CUDA
(one read of the tile, or one read and one in-place write), a few torch ops elsewhere. A fully fused Triton
matmul (logits tiles never leaving registers) saves those tile passes but must either atomically add into
dweight or recompute the logits once more per gradient. The price of running at cuBLAS speed, by a count (not
yet a GPU measurement): a tile pass moves 2-4 bytes per bf16 logit where the matmuls do 2H FLOPs (forward) or
6H (backward) per logit; at an H100's ~990 TFLOP/s and 3.35 TB/s that is ~300/H of the forward's matmul time
and ~200/H of the backward's (~30% / 20% at H = 896, ~7% / 5% at H = 4096).

Precision: the matmuls take their operands in the compute dtype (the autocast dtype when autocast is on for
the device, else the input dtype, as `nn.Linear` would) and produce the tile in that dtype, so bf16/fp16
logits are rounded once, exactly like a bf16 `lm_head`; everything after the matmul is float32. In the
backward dL/da is rounded to the compute dtype (as autograd does for a bf16 `lm_head`) and the gradient
matmuls accumulate into float32 dhidden / dweight / dbias without rounding each tile's product (on CUDA
`addmm(out_dtype=float32)`; on the CPU 16-bit operands are upcast), cast to the parameter dtype at the end.
Outputs are float32 (float64 for float64 inputs on the torch path, which gradcheck uses).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch

from ._outputs import select_outputs
from .logits import FP_FUSION, device_of

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None

# Tile sizes: R rows x C vocabulary entries with R * C about TILE_ELEMENTS (C grows when there are fewer
# than R rows). CPU, chosen on 2 cores at N=4096, V=32000, H=896 float32: 2048 x 2048 tiles ran the matmuls
# ~10% slower than one (N, V) matmul, 1024 x 2048 ~25% slower. CUDA: 4096-row tiles keep cuBLAS at its
# large-matrix rate; a 4096 x 8192 bf16 tile is 64 MiB, 1/80 of the 5 GiB of logits at N=16k, V=152k.
ROWS_PER_TILE = {"cpu": 2048, "cuda": 4096}
TILE_ELEMENTS = {"cpu": 2048 * 2048, "cuda": 4096 * 8192}


# ----------------------------------------------------------------------------------------------------------
# Plain torch reference (float64, materialises the (N, V) logits): the test oracle.
# ----------------------------------------------------------------------------------------------------------


def reference_logprobs_from_hidden(
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
):
    """Naive float64 version: hidden (..., H), weight (V, H), index (...), bias (V,), mask (...) bool.

    Returns float64 logps (...) [, entropy (...)] [, is_top1 (...)]; masked rows are 0 / False.
    Differentiable through hidden, weight and bias (use it for gradient references)."""
    z = hidden.double() @ weight.double().T  # (..., V)
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (..., V)
    logps = logp_all.gather(-1, index.long().unsqueeze(-1)).squeeze(-1)  # (...)
    # p log p = 0 where p = 0 (a -inf logit); the where() sits on log p so backward never meets 0 * -inf
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)  # (...)
    is_top1 = z.gather(-1, index.long().unsqueeze(-1)).squeeze(-1) >= z.amax(-1)  # ties count
    if mask is not None:
        mask = mask.bool()
        logps = torch.where(mask, logps, torch.zeros_like(logps))
        entropy = torch.where(mask, entropy, torch.zeros_like(entropy))
        is_top1 = is_top1 & mask
    return select_outputs(logps, entropy, is_top1, return_entropy, return_top1)


# ----------------------------------------------------------------------------------------------------------
# Shared input handling: validate, flatten (..., H) -> (N, H), drop masked rows before any matmul.
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, index, bias, temperature, logit_scale, softcap, mask):
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H); got shape {tuple(weight.shape)}")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden (..., H) must end with H = weight.shape[1] = {weight.shape[1]}; got shape {tuple(hidden.shape)}"
        )
    if tuple(index.shape) != tuple(hidden.shape[:-1]):
        raise ValueError(
            f"index shape {tuple(index.shape)} must equal hidden's leading shape {tuple(hidden.shape[:-1])}"
        )
    if index.dtype.is_floating_point or index.dtype == torch.bool or index.is_complex():
        raise ValueError(f"index must be an integer tensor; got dtype {index.dtype}")
    if not hidden.dtype.is_floating_point or hidden.dtype != weight.dtype:
        raise ValueError(
            f"hidden and weight must share one floating dtype; got hidden {hidden.dtype}, weight {weight.dtype}"
        )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"bias must be (V,) = ({weight.shape[0]},); got shape {tuple(bias.shape)}")
    if mask is not None and tuple(mask.shape) != tuple(index.shape):
        raise ValueError(f"mask shape {tuple(mask.shape)} must equal index shape {tuple(index.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0; got {temperature}")
    if not logit_scale > 0:
        raise ValueError(f"logit_scale must be > 0; got {logit_scale}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None; got {softcap}")


def _flatten_valid(hidden, index, mask):
    """hidden (..., H), index (...), mask (...) -> rows (n,) of the kept positions, hidden (n, H), index (n,)."""
    H = hidden.shape[-1]
    flat_hidden = hidden.reshape(-1, H)  # (N, H)
    flat_index = index.reshape(-1).long()  # (N,)
    if mask is None:
        rows = None
    else:
        # Host sync: the number of kept rows decides the matmul sizes (the index range check is another).
        rows = mask.reshape(-1).bool().nonzero().squeeze(1)  # (n,)
        flat_hidden = flat_hidden.index_select(0, rows)
        flat_index = flat_index.index_select(0, rows)
    return rows, flat_hidden, flat_index


def _check_index_range(index, V, rows):
    """index (n,) of the kept rows; the message names the row in the flattened (N,) input."""
    if index.numel() == 0:
        return
    low, high = torch.stack(torch.aminmax(index)).tolist()  # one host sync for both ends
    if low < 0 or high >= V:
        bad = int(((index < 0) | (index >= V)).nonzero()[0, 0])
        where = bad if rows is None else int(rows[bad])
        raise ValueError(f"index out of range [0, {V}) at flattened row {where}: {int(index[bad])}")


def _unflatten(rows, shape, logps, entropy, is_top1):
    """Scatter the kept rows back to the leading shape; masked rows are 0 / False (and get zero grad)."""
    if rows is not None:
        N = shape.numel()
        logps = logps.new_zeros(N).index_copy(0, rows, logps)
        entropy = None if entropy is None else entropy.new_zeros(N).index_copy(0, rows, entropy)
        is_top1 = None if is_top1 is None else is_top1.new_zeros(N).index_copy(0, rows, is_top1)
    return tuple(None if x is None else x.reshape(shape) for x in (logps, entropy, is_top1))


# ----------------------------------------------------------------------------------------------------------
# Folds, torch: the per-tile math between the matmuls, as torch ops (CPU, float64, any device).
# ----------------------------------------------------------------------------------------------------------


class Transform(NamedTuple):
    """a -> z: x = a * logit_scale, y = softcap tanh(x / softcap) (softcap None: y = x), z = y * inv_t."""

    logit_scale: float
    softcap: float | None
    inv_t: float


def _acc_dtype(x):
    """float32 math, float64 kept for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transform_torch(a, tr: Transform, cap_grad=False):
    """a (R, C) tile of hidden @ weight.T + bias -> z (R, C) float32 tempered logits [, d softcap / dx].

    Works in place when `a` is already in the math dtype (the caller's own tile buffer). The softcap derivative
    1 - tanh^2(x / c) is computed as 1 / cosh^2(x / c) from the uncapped x: 1 - (y / c)^2 from the capped y
    loses all precision once tanh rounds to 1."""
    z = a if a.dtype == _acc_dtype(a) else a.to(_acc_dtype(a))
    if tr.logit_scale != 1.0:
        z *= tr.logit_scale
    dcap = None
    if tr.softcap is not None:
        z /= tr.softcap
        if cap_grad:
            dcap = torch.cosh(z).square_().reciprocal_()  # cosh overflows to inf -> derivative 0, no NaN
        z = z.tanh_().mul_(tr.softcap)
    if tr.inv_t != 1.0:
        z *= tr.inv_t
    return z, dcap


def _local_targets(index, c0, C):
    """index (R,) -> (column of the target within the tile, clamped into it (R, 1); whether it is there (R,))."""
    local = index - c0
    return local.clamp(0, C - 1).unsqueeze(1), (local >= 0) & (local < C)


def _fold_forward_torch(a, index, c0, stats, tr: Transform, want_entropy):
    """Fold tile a (R, C), columns c0 .. c0 + C of the vocabulary, into the running statistics
    stats = (m, s, t, target), each (R,), in place. index (R,): the rows' target columns in the vocabulary."""
    m, s, t, target = stats
    z, _ = _transform_torch(a, tr)
    col, inside = _local_targets(index, c0, z.shape[1])
    torch.where(inside, z.gather(1, col).squeeze(1), target, out=target)
    m_new = torch.maximum(m, z.amax(1))
    ref = torch.where(m_new == float("-inf"), 0.0, m_new)  # a tile of -inf only (-inf bias): shift by 0
    alpha = torch.exp(m - ref)  # 0 on the first tile (m = -inf)
    z -= ref.unsqueeze(1)
    if want_entropy:
        e = torch.exp(z)  # (R, C)
        # t relative to the new max: alpha (t + (m - ref) s); m - ref = -inf only where s = 0
        t.copy_(alpha * (t + torch.where(s > 0, m - ref, 0.0) * s))
        z.masked_fill_(e == 0, 0.0)  # e (z - ref) = 0 where z = -inf, not NaN
        t += torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(-1)  # row-wise dot, no (R, C) temporary
        s.mul_(alpha).add_(e.sum(1))
    else:
        s.mul_(alpha).add_(z.exp_().sum(1))
    m.copy_(m_new)


def _fold_backward_torch(a, index, c0, lse, mu, g, ge, tr: Transform):
    """Overwrite tile a (R, C) with dL/da, in a's dtype. lse, mu, g, ge (R,) float32; mu and ge None without an
    entropy gradient; index and c0 as in the forward fold. Holds at most three float32 (R, C) tiles."""
    z, dcap = _transform_torch(a, tr, cap_grad=True)
    p = z.sub(lse.unsqueeze(1)).exp_()  # (R, C) softmax probabilities
    if ge is not None:
        z -= mu.unsqueeze(1)
        z.masked_fill_(p == 0, 0.0)  # p (z - mu) = 0 where z = -inf
        z *= ge.unsqueeze(1)
        z += g.unsqueeze(1)
        dz = p.mul_(z).neg_()
    else:
        dz = p.mul_(-g.unsqueeze(1))
    del z
    col, inside = _local_targets(index, c0, dz.shape[1])
    dz.scatter_add_(1, col, (g * inside).unsqueeze(1))  # + g at the target column, where it is in this tile
    if dcap is not None:
        dz *= dcap
    if tr.logit_scale * tr.inv_t != 1.0:
        dz *= tr.logit_scale * tr.inv_t  # the chain rule's constant factor
    a.copy_(dz)


# ----------------------------------------------------------------------------------------------------------
# Folds, Triton: the same math in one pass over the tile (CUDA; the CPU under TRITON_INTERPRET=1).
# Plain functions, jitted on first use (`_kernels`), so this module imports without triton.
# ----------------------------------------------------------------------------------------------------------


def _fold_forward_kernel(
    tile_ptr,  # (R, C) compute dtype, row stride stride_r, unit column stride
    stride_r,
    index_ptr,  # (R,) int64: target columns in the vocabulary
    c0,  # the tile's first vocabulary column
    m_ptr,  # (R,) float32 in/out: running max
    s_ptr,  # (R,) float32 in/out: sum exp(z - m)
    t_ptr,  # (R,) float32 in/out: sum exp(z - m) (z - m), only when WANT_ENTROPY
    target_ptr,  # (R,) float32 in/out: z[index], written by the tile holding it
    C,
    logit_scale,
    softcap,
    inv_t,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """One program per row: stream the row of the tile in BLOCK_C blocks, online max / sum (see the module
    docstring), starting from and writing back the running statistics."""
    # int64 before the stride multiply: row * stride_r overflows int32 once a tile passes 2^31 elements
    row = tl.program_id(0).to(tl.int64)
    row_ptr = tile_ptr + row * stride_r
    local = tl.load(index_ptr + row) - c0
    target = tl.load(target_ptr + row)
    m = tl.load(m_ptr + row)
    s = tl.load(s_ptr + row)
    t = 0.0
    if WANT_ENTROPY:
        t = tl.load(t_ptr + row)
    for start in range(0, C, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        x = tl.load(row_ptr + cols, mask=cols < C, other=0.0).to(tl.float32) * logit_scale
        if HAS_SOFTCAP:
            # tanh from q = exp(-2|u|) <= 1: no overflow at large |u|
            q = tl.exp(-2.0 * tl.abs(x / softcap))
            x = tl.where(x < 0, -softcap, softcap) * (1.0 - q) / (1.0 + q)
        z = tl.where(cols < C, x * inv_t, float("-inf"))
        if (local >= start) & (local < start + BLOCK_C):  # the block holding the target: same program-wide
            target = tl.sum(tl.where(cols == local, z, 0.0), axis=0)
        m_new = tl.maximum(m, tl.max(z, axis=0))
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: shift by 0, no -inf - -inf
        alpha = tl.exp(m - ref)
        e = tl.exp(z - ref)
        if WANT_ENTROPY:
            shift = tl.where(s > 0, m - ref, 0.0) * s  # 0 while s = 0 (m = -inf: no -inf * 0)
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0, z - ref, 0.0), axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(target_ptr + row, target)
    if WANT_ENTROPY:
        tl.store(t_ptr + row, t)


def _fold_backward_kernel(
    tile_ptr,  # (R, C) compute dtype, row stride stride_r; overwritten with dL/da
    stride_r,
    index_ptr,  # (R,) int64
    c0,
    lse_ptr,  # (R,) float32
    mu_ptr,  # (R,) float32, read only when HAS_GE
    g_ptr,  # (R,) float32 dL/dlogps
    ge_ptr,  # (R,) float32 dL/dentropy, read only when HAS_GE
    C,
    logit_scale,
    softcap,
    inv_t,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (R, cdiv(C, BLOCK_C)): each program turns one block of one row into
    dL/da = (g onehot - p (g + e (z - mu))) * dcap * logit_scale / T, read and written in place (the programs'
    blocks are disjoint)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C
    ptrs = tile_ptr + row * stride_r + cols
    x = tl.load(ptrs, mask=ok, other=0.0).to(tl.float32) * logit_scale
    dcap = 1.0
    if HAS_SOFTCAP:
        # the forward's tanh, and 1 - tanh^2 = 4 q / (1 + q)^2 from the same q: no overflow, no cancellation
        q = tl.exp(-2.0 * tl.abs(x / softcap))
        x = tl.where(x < 0, -softcap, softcap) * (1.0 - q) / (1.0 + q)
        dcap = 4.0 * q / ((1.0 + q) * (1.0 + q))
    z = x * inv_t
    p = tl.exp(z - tl.load(lse_ptr + row))
    g = tl.load(g_ptr + row)
    coef = g
    if HAS_GE:
        # p (z - mu) = 0 where p = 0: z = -inf there would make it NaN
        coef = g + tl.load(ge_ptr + row) * tl.where(p > 0, z - tl.load(mu_ptr + row), 0.0)
    dz = tl.where(cols == tl.load(index_ptr + row) - c0, g, 0.0) - p * coef
    dz = dz * dcap * (logit_scale * inv_t)
    tl.store(ptrs, dz.to(tile_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _kernels():
    """(forward fold, backward fold), jitted."""
    return triton.jit(_fold_forward_kernel), triton.jit(_fold_backward_kernel)


# BLOCK_C and num_warps: the forward streams a row in 2048-wide blocks with 8 warps (8 elements per thread per
# block: one 128-bit load of bf16), the backward is one 1024-wide block per program. Not yet timed on a GPU;
# the interpreter gets small blocks so CPU tests cross block edges.
FOLD_LAUNCH = {"cuda": ((2048, 8), (1024, 4)), "interpret": ((32, 1), (32, 1))}


def _fold_forward_triton(a, index, c0, stats, tr: Transform, want_entropy):
    (block, warps), _ = FOLD_LAUNCH["cuda" if a.is_cuda else "interpret"]
    m, s, t, target = stats
    forward, _ = _kernels()
    with device_of(a):
        forward[(a.shape[0],)](
            a, a.stride(0), index, c0, m, s, t if want_entropy else s, target, a.shape[1], *_scalars(tr),
            HAS_SOFTCAP=tr.softcap is not None, WANT_ENTROPY=want_entropy, BLOCK_C=block,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def _fold_backward_triton(a, index, c0, lse, mu, g, ge, tr: Transform):
    _, (block, warps) = FOLD_LAUNCH["cuda" if a.is_cuda else "interpret"]
    _, backward = _kernels()
    with device_of(a):
        backward[(a.shape[0], triton.cdiv(a.shape[1], block))](
            a, a.stride(0), index, c0, lse, lse if mu is None else mu, g, g if ge is None else ge, a.shape[1],
            *_scalars(tr), HAS_SOFTCAP=tr.softcap is not None, HAS_GE=ge is not None, BLOCK_C=block,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def _scalars(tr: Transform):
    """The kernels' float arguments; softcap is unused (any value) when it is None."""
    return float(tr.logit_scale), float(tr.softcap or 1.0), float(tr.inv_t)


FOLDS = {
    "torch": (_fold_forward_torch, _fold_backward_torch),
    "triton": (_fold_forward_triton, _fold_backward_triton),
}


# ----------------------------------------------------------------------------------------------------------
# The tile loop, shared by both backends. Vocabulary tiles outside, row tiles inside: each weight slice is read
# (and, under autocast, cast) once per pass, and dweight is finished one slice at a time.
# ----------------------------------------------------------------------------------------------------------


def _compute_dtype(x):
    """The matmul dtype: autocast's when it is on for x's device (as nn.Linear would run; autocast leaves
    float64 alone), else x's own."""
    if x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _tile_matmul(h, w, b, out):
    """out (R, C) = h (R, H) @ w (C, H).T + b (C,), written into the caller's buffer."""
    if b is None:
        return torch.mm(h, w.T, out=out)
    return torch.addmm(b, h, w.T, out=out)


# addmm with out_dtype (16-bit operands, float32 result): CUDA, torch >= 2.8
_MM_OUT_DTYPE = torch.__version__ >= "2.8"


def _add_mm(acc, a, b):
    """acc += a @ b for a float32 (or float64) acc, without rounding a @ b to a's dtype first (a bf16 product
    rounded per tile and then summed drifts, as TRL's chunked kernel notes)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif acc.is_cuda and _MM_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
    else:  # no mixed-dtype addmm here: 16-bit products are exact in float32
        acc.addmm_(a.to(acc.dtype), b.to(acc.dtype))


def _row_tiles(n, rows):
    """Row tile starts and sizes: ceil(n / rows) tiles of near-equal height (no one-row tail tile)."""
    count = -(-n // rows)
    size = -(-n // count) if count else 0
    return [(r0, min(size, n - r0)) for r0 in range(0, n, size)] if n else []


class _HiddenLogProbs(torch.autograd.Function):
    """hidden (n, H), weight (V, H), bias (V,) or None, index (n,) -> logps (n,), entropy (n,), is_top1 (n,).

    Saves hidden, weight, bias, index and per-row lse (n,) and mu = sum_j p_j z_j (n,): O(n + V H) memory.
    Extra memory: one (R, C) tile in the compute dtype and what the fold needs (torch: up to three float32
    tiles, Triton: none); in backward also float32 dhidden (n, H), dweight in the weight's dtype (float32
    accumulated, through a (C, H) float32 buffer for 16-bit weights with more than one row tile)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, options):
        backend, tr, want_entropy, rows, cols = options
        n, V = hidden.shape[0], weight.shape[0]
        fold_forward, _ = FOLDS[backend]
        dtype = _compute_dtype(hidden)
        f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
        m = torch.full((n,), float("-inf"), **f)
        s, t, target = (torch.zeros(n, **f) for _ in range(3))
        tiles = _row_tiles(n, rows)
        buf = torch.empty(tiles[0][1] if tiles else 0, min(cols, V), device=hidden.device, dtype=dtype)
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            h_all = hidden.to(dtype)
            for c0 in range(0, V, cols):
                w = weight[c0 : c0 + cols].to(dtype)  # (C, H)
                b = None if bias is None else bias[c0 : c0 + cols].to(dtype)
                for r0, R in tiles:
                    a = _tile_matmul(h_all[r0 : r0 + R], w, b, buf[:R, : w.shape[0]])  # (R, C)
                    stats = tuple(x[r0 : r0 + R] for x in (m, s, t, target))
                    fold_forward(a, index[r0 : r0 + R], c0, stats, tr, want_entropy)
            ref = torch.where(m == float("-inf"), 0.0, m)
            lse = ref + torch.log(s)
            logps = target - lse
            is_top1 = target >= m
            mu = entropy = None
            if want_entropy:
                mu = ref + t / s
                entropy = lse - mu
        ctx.save_for_backward(hidden, weight, bias, index, lse, mu)
        ctx.options = options
        ctx.dtype = dtype
        ctx.mark_non_differentiable(is_top1)
        ctx.set_materialize_grads(False)
        return logps, entropy, is_top1

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_top1):
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        hidden, weight, bias, index, lse, mu = ctx.saved_tensors
        backend, tr, _, rows, cols = ctx.options
        _, fold_backward = FOLDS[backend]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, V = hidden.shape[0], weight.shape[0]
        dtype = ctx.dtype
        f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
        g = g_logp.to(f["dtype"]).contiguous() if g_logp is not None else torch.zeros(n, **f)
        ge = None if g_ent is None else g_ent.to(f["dtype"]).contiguous()
        mu = None if ge is None else mu
        tiles = _row_tiles(n, rows)
        buf = torch.empty(tiles[0][1] if tiles else 0, min(cols, V), device=hidden.device, dtype=dtype)
        dhidden = torch.zeros(n, hidden.shape[1], **f) if need_h else None  # (n, H) float32
        dweight = dbias = dw = None
        if need_w:
            # float32 weights accumulate in place; 16-bit ones through a float32 (C, H) buffer per vocabulary
            # tile, unless one row tile makes the product a single term (rounded once, as autograd's would be)
            direct = weight.dtype == f["dtype"] or (len(tiles) == 1 and weight.dtype == dtype)
            # accumulated in place (float32: starts at zero) or written slice by slice (16-bit)
            new = torch.zeros if weight.dtype == f["dtype"] else torch.empty
            dweight = new(weight.shape, device=weight.device, dtype=weight.dtype)
            dw = None if direct else torch.empty(min(cols, V), weight.shape[1], **f)
        if need_b:
            dbias = torch.zeros(V, **f)  # (V,) float32
        with torch.autocast(hidden.device.type, enabled=False):  # even for a backward called inside autocast
            h_all = hidden.to(dtype)
            for c0 in range(0, V, cols):
                w = weight[c0 : c0 + cols].to(dtype)  # (C, H)
                b = None if bias is None else bias[c0 : c0 + cols].to(dtype)
                C = w.shape[0]
                acc = None
                if need_w:
                    acc = dweight[c0 : c0 + C] if dw is None else dw[:C].zero_()
                for r0, R in tiles:
                    h = h_all[r0 : r0 + R]
                    rs = slice(r0, r0 + R)
                    a = _tile_matmul(h, w, b, buf[:R, :C])  # (R, C) logits, then dL/da in place
                    fold_backward(a, index[rs], c0, lse[rs], None if mu is None else mu[rs], g[rs],
                                  None if ge is None else ge[rs], tr)  # fmt: skip
                    if need_h:
                        _add_mm(dhidden[rs], a, w)
                    if need_w:
                        if acc.dtype == a.dtype and acc.dtype != f["dtype"]:
                            torch.mm(a.T, h, out=acc)  # the single row tile of a 16-bit weight
                        else:
                            _add_mm(acc, a.T, h)
                    if need_b:
                        dbias[c0 : c0 + C] += a.sum(0, dtype=dbias.dtype)
                if dw is not None:
                    dweight[c0 : c0 + C].copy_(acc)
        return (
            None if dhidden is None else dhidden.to(hidden.dtype),
            dweight,
            None if dbias is None else dbias.to(bias.dtype),
            None,  # index
            None,  # options
        )


def _tiles(device, n, rows_per_tile, vocab_per_tile):
    """(rows, cols) per tile: the device's defaults, C filling the element budget when n < R."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    rows = ROWS_PER_TILE[kind] if rows_per_tile is None else rows_per_tile
    if rows < 1 or (vocab_per_tile is not None and vocab_per_tile < 1):
        raise ValueError(
            f"rows_per_tile and vocab_per_tile must be >= 1; got {rows_per_tile}, {vocab_per_tile}"
        )
    if vocab_per_tile is not None:
        return rows, vocab_per_tile
    # a multiple of 256 columns, so every tile row starts 16-byte aligned and the folds' loads vectorise
    return rows, max(1, TILE_ELEMENTS[kind] // max(1, min(rows, n)) // 256) * 256


def _logprobs_from_hidden(backend, hidden, weight, index, bias, temperature, logit_scale, softcap, mask,
                          return_entropy, return_top1, rows_per_tile, vocab_per_tile):  # fmt: skip
    _check_inputs(hidden, weight, index, bias, temperature, logit_scale, softcap, mask)
    rows, h, idx = _flatten_valid(hidden, index, mask)
    _check_index_range(idx, weight.shape[0], rows)
    tile_rows, tile_cols = _tiles(hidden.device, h.shape[0], rows_per_tile, vocab_per_tile)
    tr = Transform(float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature))
    # every row masked still goes through the Function: zero gradients for weight and bias, not None, so DDP
    # sees every parameter used on a rank whose micro-batch has no target token
    options = (backend, tr, return_entropy, tile_rows, tile_cols)
    logps, entropy, is_top1 = _HiddenLogProbs.apply(h, weight, bias, idx, options)
    logps, entropy, is_top1 = _unflatten(rows, index.shape, logps, entropy, is_top1)
    return select_outputs(logps, entropy, is_top1, return_entropy, return_top1)


def logprobs_from_hidden_torch(
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
    rows_per_tile: int | None = None,
    vocab_per_tile: int | None = None,
):
    """Tiles with torch folds: hidden (..., H), weight (V, H), index (...) -> float32 logps (...) [, entropy]
    [, is_top1]. Any device and dtype (float64 included).

    Never builds the (N, V) logits: extra memory is one (rows_per_tile, vocab_per_tile) tile in the compute dtype
    and at most two float32 ones, plus the float32 gradient accumulators dhidden (N, H) and dweight (V, H) for
    the inputs that need them. Defaults: ROWS_PER_TILE / TILE_ELEMENTS for the device."""
    return _logprobs_from_hidden(
        "torch", hidden, weight, index, bias, temperature, logit_scale, softcap, mask,
        return_entropy, return_top1, rows_per_tile, vocab_per_tile,
    )  # fmt: skip


def logprobs_from_hidden_triton(
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
    rows_per_tile: int | None = None,
    vocab_per_tile: int | None = None,
):
    """Tiles with Triton folds: the same inputs and outputs as `logprobs_from_hidden_torch`, float32 / bfloat16 /
    float16. CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. Extra memory: one tile in the compute
    dtype (the folds work in registers), plus the gradient accumulators."""
    if triton is None:
        raise RuntimeError("logprobs_from_hidden_triton needs triton, which cannot be imported")
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"the triton backend takes float32/bfloat16/float16 hidden and weight; got {hidden.dtype}"
        )
    if not hidden.is_cuda and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("logprobs_from_hidden_triton on a CPU tensor needs TRITON_INTERPRET=1")
    return _logprobs_from_hidden(
        "triton", hidden, weight, index, bias, temperature, logit_scale, softcap, mask,
        return_entropy, return_top1, rows_per_tile, vocab_per_tile,
    )  # fmt: skip
