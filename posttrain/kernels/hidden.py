"""Fused output layer + log-softmax + gather: per-token log-probs straight from hidden states.

Notation: N rows (any leading batch shape, flattened), V vocabulary, H hidden size.
R rows per tile, C vocabulary entries per tile.

    z = hidden @ weight.T (+ bias)           (N, V)  never built: only (R, C) tiles exist
    z = z * logit_scale
    z = softcap * tanh(z / softcap)           if softcap (Gemma's final_logit_softcapping)
    z = z / temperature
    logps   = z[index] - logsumexp(z)         (N,)
    entropy = logsumexp(z) - sum_j p_j z_j    (N,)   p = softmax(z)
    is_top1 = z[index] == max_j z_j           (N,)   ties count as top-1

The log-sum-exp is accumulated across vocabulary tiles with the online softmax recurrence
(Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"): a running max m, a running
sum s = sum exp(z - m) and, for the entropy, t = sum exp(z - m) (z - m), all rescaled when m grows.

Gradients (g = dL/dlogps, e = dL/dentropy, mu = sum_j p_j z_j):
    dlogp/dz_j    = onehot_j - p_j
    dentropy/dz_j = -p_j (z_j - mu)
    dL/dz_j       = g onehot_j - p_j (g + e (z_j - mu))
then chained through 1 / temperature, the softcap (d/dx c tanh(x / c) = 1 - tanh^2) and logit_scale:
    dhidden = dL/da @ weight, dweight = dL/da.T @ hidden, dbias = sum_rows dL/da     (a = hidden @ weight.T + bias)
The backward recomputes each tile's logits from hidden and weight (one extra matmul) instead of storing them.

Precision: matmuls take their operands in the input dtype (as nn.Linear does; on GPU the tensor-core
path) and accumulate in float32; everything after the matmul is float32. The torch path's tile matmul
returns the input dtype (`(h @ w.T).float()`), so its bf16/fp16 logits are rounded once, exactly like a
bf16 `lm_head`; the Triton kernels keep the fp32 accumulator and skip that rounding. In the backward dz is
rounded to the input dtype before the gradient matmuls (as autograd does for a bf16 `lm_head`), the
dhidden / dweight / dbias sums accumulate in float32 and are cast to the parameter dtype at the end.
Outputs are float32 (float64 for float64 inputs on the torch path, which gradcheck uses).
"""

from __future__ import annotations

import torch

from ._outputs import select_outputs

try:
    import triton
    import triton.language as tl

    _jit = triton.jit
except ImportError:  # the torch path works without triton
    triton = tl = None
    _jit = lambda fn: fn

# Default tiles of the torch path, picked on CPU: R = 2048 rows and C = TILE_ELEMENTS // R vocabulary entries
# (more when there are fewer rows). A float32 tile is 16 MB and the backward holds at most three, whatever
# N and V are. At N=4096, V=32000, H=896 float32 on 2 CPU cores the tile matmuls ran ~10% slower than one
# (N, V) matmul, 1024 x 2048 tiles ~25% slower. Against naive `(hidden @ W.T).log_softmax(-1).gather`
# there: forward 1.14x the CPU time with 7% of its extra memory; forward + backward 1.45x (the backward
# recomputes the logits: 4 matmuls instead of 3) with 11% of its extra memory, gradients included.
TORCH_ROWS_PER_TILE = 2048
TORCH_TILE_ELEMENTS = 2048 * 2048


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
    entropy = -(logp_all.exp() * logp_all).sum(-1)  # (...)
    is_top1 = z.argmax(-1) == index
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
    if index.numel() and (int(index.min()) < 0 or int(index.max()) >= V):
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
# Torch path: chunked autograd.Function.
# ----------------------------------------------------------------------------------------------------------


def _acc_dtype(x):
    """float32 accumulation, float64 kept for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _tile_logits(h, w, b, logit_scale, softcap, temperature, cap_grad=False):
    """h (R, H), w (C, H), b (C,) or None -> z (R, C) float32 tempered logits [, d softcap / dx (R, C)].

    The softcap derivative 1 - tanh^2(x / c) is computed as 1 / cosh^2(x / c) from the uncapped x:
    1 - (y / c)^2 from the capped y loses all precision once tanh rounds to 1."""
    z = (h @ w.T).to(_acc_dtype(h))  # (R, C): matmul in the input dtype, float32 from here on
    if b is not None:
        z += b
    if logit_scale != 1.0:
        z *= logit_scale
    dcap = None
    if softcap is not None:
        z /= softcap
        if cap_grad:
            dcap = torch.cosh(z).square_().reciprocal_()  # cosh overflows to inf -> derivative 0, no NaN
        z = z.tanh_().mul_(softcap)
    if temperature != 1.0:
        z /= temperature
    return (z, dcap) if cap_grad else z


def _add_mm(out, a, b):
    """out += a @ b, in place (no product temporary) when the dtypes allow it."""
    if out.dtype == a.dtype:
        out.addmm_(a, b)
    else:
        out += a @ b  # 16-bit operands: the product is rounded once, then accumulated in float32


class _HiddenLogProbs(torch.autograd.Function):
    """hidden (n, H), weight (V, H), bias (V,) or None, index (n,) -> logps (n,), entropy (n,), is_top1 (n,).

    Saves hidden, weight, bias, index and per-row lse (n,) and mu = sum_j p_j z_j (n,): O(n + V H) memory."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, options):
        temperature, logit_scale, softcap, want_entropy, rows, cols = options
        n, V = hidden.shape[0], weight.shape[0]
        f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
        lse = torch.empty(n, **f)
        mu = torch.empty(n, **f) if want_entropy else None
        target = torch.empty(n, **f)  # z[index]
        top = torch.empty(n, **f)  # max_j z_j
        for r0 in range(0, n, rows):
            h, idx = hidden[r0 : r0 + rows], index[r0 : r0 + rows]  # (R, H), (R,)
            R = h.shape[0]
            m = torch.full((R,), float("-inf"), **f)  # running max
            s = torch.zeros(R, **f)  # sum exp(z - m)
            t = torch.zeros(R, **f) if want_entropy else None  # sum exp(z - m) (z - m)
            tz = torch.zeros(R, **f)
            for c0 in range(0, V, cols):
                w = weight[c0 : c0 + cols]  # (C, H)
                b = None if bias is None else bias[c0 : c0 + cols]
                z = _tile_logits(h, w, b, logit_scale, softcap, temperature)  # (R, C)
                C = z.shape[1]
                # 1. target logit if index falls in this tile
                local = idx - c0
                inside = (local >= 0) & (local < C)
                picked = z.gather(1, local.clamp(0, C - 1).unsqueeze(1)).squeeze(1)
                tz = torch.where(inside, picked, tz)
                # 2. online max / sum rescale (Milakov & Gimelshein 2018); in-place passes over the tile
                # (measured faster on CPU than the fused log_softmax kernel plus a max)
                m_new = torch.maximum(m, z.amax(1))
                alpha = torch.exp(m - m_new)  # 0 on the first tile (m = -inf, m_new finite)
                z -= m_new.unsqueeze(1)
                if want_entropy:
                    # t relative to m_new: alpha (t + (m - m_new) s); m - m_new = -inf only where s = 0
                    t = alpha * (t + torch.where(s > 0, m - m_new, 0.0) * s)
                    e = torch.exp(z)  # (R, C)
                    s = alpha * s + e.sum(1)
                    t = t + torch.bmm(e.unsqueeze(1), z.unsqueeze(2)).view(R)  # row-wise dot, no (R, C) temp
                    del e
                else:
                    s = alpha * s + z.exp_().sum(1)
                m = m_new
                del z
            lse[r0 : r0 + R] = m + torch.log(s)
            if want_entropy:
                mu[r0 : r0 + R] = m + t / s
            target[r0 : r0 + R] = tz
            top[r0 : r0 + R] = m
        logps = target - lse
        entropy = lse - mu if want_entropy else None
        is_top1 = target >= top
        ctx.save_for_backward(hidden, weight, bias, index, lse, mu)
        ctx.conf = (temperature, logit_scale, softcap, rows, cols)
        ctx.mark_non_differentiable(is_top1)
        ctx.set_materialize_grads(False)
        return logps, entropy, is_top1

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_top1):
        hidden, weight, bias, index, lse, mu = ctx.saved_tensors
        temperature, logit_scale, softcap, rows, cols = ctx.conf
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, V = hidden.shape[0], weight.shape[0]
        f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        g = g_logp.to(f["dtype"]) if g_logp is not None else torch.zeros(n, **f)
        dweight = torch.zeros(V, weight.shape[1], **f) if need_w else None  # (V, H) float32
        dbias = torch.zeros(V, **f) if need_b else None  # (V,) float32
        dhidden = torch.zeros(n, hidden.shape[1], **f) if need_h else None  # (n, H) float32
        # chain rule for z = y / T, y = c tanh(x / c), x = logit_scale * a: the constant factor
        # logit_scale / T is folded into the per-row g and e, the tanh derivative is applied per element
        scale = logit_scale / temperature
        g = g * scale
        for r0 in range(0, n, rows):
            h, idx, gr = hidden[r0 : r0 + rows], index[r0 : r0 + rows], g[r0 : r0 + rows]
            R = h.shape[0]
            ge = None if g_ent is None else (g_ent[r0 : r0 + R].to(f["dtype"]) * scale).unsqueeze(1)  # (R, 1)
            lse_r = lse[r0 : r0 + R].unsqueeze(1)  # (R, 1)
            mu_r = None if mu is None else mu[r0 : r0 + R].unsqueeze(1)
            for c0 in range(0, V, cols):
                w = weight[c0 : c0 + cols]
                b = None if bias is None else bias[c0 : c0 + cols]
                z, cap = _tile_logits(h, w, b, logit_scale, softcap, temperature, cap_grad=True)  # (R, C)
                C = z.shape[1]
                # dL/dz = g onehot - p (g + e (z - mu)), built in place to keep at most three (R, C) tiles
                if ge is not None:
                    p = (z - lse_r).exp_()  # (R, C) softmax probabilities
                    z -= mu_r
                    z *= ge
                    z += gr.unsqueeze(1)
                    dz = p.mul_(z).neg_()
                else:
                    dz = z.sub_(lse_r).exp_().mul_(gr.neg().unsqueeze(1))
                del z
                # + g at the target column, for rows whose target falls in this tile (no host sync)
                local = idx - c0
                inside = (local >= 0) & (local < C)
                dz.scatter_add_(1, local.clamp(0, C - 1).unsqueeze(1), (gr * inside).unsqueeze(1))
                if cap is not None:
                    dz *= cap
                da = dz.to(hidden.dtype)  # (R, C) in the matmul dtype
                if need_h:
                    _add_mm(dhidden[r0 : r0 + R], da, w)
                if need_w:
                    _add_mm(dweight[c0 : c0 + C], da.T, h)
                if need_b:
                    dbias[c0 : c0 + C] += dz.sum(0)
                del dz, da, cap
        return (
            None if dhidden is None else dhidden.to(hidden.dtype),
            None if dweight is None else dweight.to(weight.dtype),
            None if dbias is None else dbias.to(bias.dtype),
            None,  # index
            None,  # options
        )


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
    rows_per_tile: int = TORCH_ROWS_PER_TILE,
    vocab_per_tile: int | None = None,
):
    """Chunked torch path: hidden (..., H), weight (V, H), index (...) -> float32 logps (...) [, entropy] [, is_top1].

    Never builds the (N, V) logits: extra memory is at most three (rows_per_tile, vocab_per_tile) float32
    tiles (vocab_per_tile defaults to TORCH_TILE_ELEMENTS // rows), plus the float32 gradient accumulators
    dhidden (N, H) and dweight (V, H) for the inputs that need them."""
    _check_inputs(hidden, weight, index, bias, temperature, logit_scale, softcap, mask)
    if rows_per_tile < 1 or (vocab_per_tile is not None and vocab_per_tile < 1):
        raise ValueError(
            f"rows_per_tile and vocab_per_tile must be >= 1; got {rows_per_tile}, {vocab_per_tile}"
        )
    rows, h, idx = _flatten_valid(hidden, index, mask)
    _check_index_range(idx, weight.shape[0], rows)
    if vocab_per_tile is None:  # fill the tile budget when there are fewer rows than rows_per_tile
        vocab_per_tile = max(256, TORCH_TILE_ELEMENTS // max(1, min(rows_per_tile, h.shape[0])))
    options = (
        float(temperature),
        float(logit_scale),
        None if softcap is None else float(softcap),
        return_entropy,
        rows_per_tile,
        vocab_per_tile,
    )
    logps, entropy, is_top1 = _HiddenLogProbs.apply(h, weight, bias, idx, options)
    logps, entropy, is_top1 = _unflatten(rows, index.shape, logps, entropy, is_top1)
    return select_outputs(logps, entropy, is_top1, return_entropy, return_top1)


# ----------------------------------------------------------------------------------------------------------
# Triton path.
#
#   forward   _fwd_kernel      grid (row blocks, vocabulary splits): each program runs the online softmax over
#                              its slice of V for BLOCK_N rows and writes partial (m, s, t, target); a few
#                              (splits, n) torch ops merge the partials (splitting V keeps the GPU busy when N
#                              is small).
#   backward  _bwd_dh_kernel   grid (row blocks): recomputes every logits tile of its rows, forms dz in
#                              registers and accumulates dhidden = dz @ W into an fp32 (n, H) buffer it owns.
#             _bwd_dw_kernel   grid (vocabulary blocks): recomputes every logits tile of its columns and
#                              accumulates dweight = dz.T @ hidden (and dbias) into the fp32 rows it owns.
# Two backward kernels, each owning its output rows, instead of one kernel with atomic adds on dweight:
# deterministic results and no (V, H) atomic traffic, for one extra recompute of the logits (a third
# matmul of the same size). Each is launched only if its input needs a gradient.
# Not measured on a GPU yet: both backward kernels re-read and re-write their fp32 output rows once per
# tile of the other dimension, which may make them bandwidth-bound at large H; if so, the alternative is
# the torch path's structure (cuBLAS matmuls per chunk) with dz formed by a Triton elementwise kernel.
# ----------------------------------------------------------------------------------------------------------

# (BLOCK_N, BLOCK_V, BLOCK_H, num_warps). The CUDA values are a reasonable starting point, not tuned (no GPU
# was available when this was written); the interpreter values keep CPU tests fast and still cross tiles.
TRITON_BLOCKS_CUDA = (64, 128, 64, 8)
TRITON_BLOCKS_INTERPRET = (16, 32, 16, 1)


@_jit
def _dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """acc + a @ b with fp32 accumulation. DOT_PRECISION "upcast": the Triton interpreter multiplies bfloat16
    operands as raw integers (triton 3.9), so there they go through fp32; bf16 x bf16 products are exact in
    fp32, so the result is the one tensor cores give."""
    if DOT_PRECISION == "upcast":
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@_jit
def _logits_tile(
    h_ptr,
    w_ptr,
    b_ptr,
    rows,
    cols,
    row_ok,
    col_ok,
    H,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Tempered logits z (BLOCK_N, BLOCK_V) fp32, -inf on columns past V, and d softcap / dx (1 without softcap)."""
    # 1. x = hidden @ weight.T over K = H chunks, fp32 accumulation
    acc = tl.zeros((BLOCK_N, BLOCK_V), dtype=tl.float32)
    for k0 in range(0, H, BLOCK_H):
        ks = k0 + tl.arange(0, BLOCK_H)
        k_ok = ks < H
        h = tl.load(h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptr + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)
        acc = _dot(h, tl.trans(w), acc, DOT_PRECISION)
    # 2. bias, scale, softcap, temperature
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    x = acc * logit_scale
    if HAS_SOFTCAP:
        # tanh and 1 - tanh^2 = 4 e / (1 + e)^2 from e = exp(-2|u|) <= 1: no overflow, no cancellation
        u = x / softcap
        e = tl.exp(-2.0 * tl.abs(u))
        th = (1.0 - e) / (1.0 + e)
        x = softcap * tl.where(u < 0, -th, th)
        dcap = 4.0 * e / ((1.0 + e) * (1.0 + e))
    else:
        dcap = tl.full((BLOCK_N, BLOCK_V), 1.0, tl.float32)
    z = tl.where(col_ok[None, :], x * inv_temp, float("-inf"))
    return z, dcap


@_jit
def _fwd_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    m_ptr,
    s_ptr,
    t_ptr,
    tgt_ptr,
    n,
    V,
    H,
    v_per_split,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    # int64 row/column ids: rows * H and split * n overflow int32 at LLM sizes (cf. Liger's cross-entropy fix)
    pid = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)  # running max
    s = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m)
    t = tl.zeros((BLOCK_N,), tl.float32)  # sum exp(z - m) (z - m)
    tgt = tl.zeros((BLOCK_N,), tl.float32)  # z[index] if index is in this split
    v_start = split * v_per_split
    v_end = tl.minimum(v_start + v_per_split, V)
    for c0 in range(v_start, v_end, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        col_ok = cols < v_end
        z, _ = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, logit_scale, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        # 3. target logit (only a valid column can match: past v_end z is -inf)
        hit = (cols[None, :] == idx[:, None]) & col_ok[None, :]
        tgt += tl.sum(tl.where(hit, z, 0.0), axis=1)
        # 4. online max / sum (Milakov & Gimelshein 2018), t rescaled to the new max
        m_new = tl.maximum(m, tl.max(z, axis=1))
        alpha = tl.exp(m - m_new)  # 0 on the first tile
        zc = tl.where(col_ok[None, :], z - m_new[:, None], 0.0)  # finite everywhere: no 0 * -inf below
        e = tl.where(col_ok[None, :], tl.exp(zc), 0.0)
        if WANT_ENTROPY:
            shift = tl.where(s > 0, m - m_new, 0.0) * s  # m = -inf before the first tile
            t = alpha * (t + shift) + tl.sum(e * zc, axis=1)
        s = alpha * s + tl.sum(e, axis=1)
        m = m_new
    out = split * n + rows
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(tgt_ptr + out, tgt, mask=row_ok)
    if WANT_ENTROPY:
        tl.store(t_ptr + out, t, mask=row_ok)


@_jit
def _dz_tile(z, dcap, cols, row_ok, col_ok, idx, lse, mu, g, ge, scale, HAS_GE: tl.constexpr):
    """dL/da (BLOCK_N, BLOCK_V) fp32 for a = hidden @ weight.T + bias: g onehot - p (g + e (z - mu)), chained."""
    ok = row_ok[:, None] & col_ok[None, :]
    z = tl.where(ok, z, 0.0)  # finite past V, so no 0 * -inf below
    p = tl.where(ok, tl.exp(z - lse[:, None]), 0.0)
    coef = g[:, None]
    if HAS_GE:
        coef = coef + ge[:, None] * (z - mu[:, None])
    dz = -p * coef
    dz = tl.where(ok & (cols[None, :] == idx[:, None]), dz + g[:, None], dz)
    return dz * dcap * scale  # softcap derivative, logit_scale / temperature


@_jit
def _bwd_dh_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    lse_ptr,
    mu_ptr,
    g_ptr,
    ge_ptr,
    dh_ptr,
    n,
    V,
    H,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_ok = rows < n
    idx = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
    mu = lse
    ge = g
    if HAS_GE:
        mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
        ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
    for c0 in range(0, V, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V).to(tl.int64)
        col_ok = cols < V
        z, dcap = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, logit_scale, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        dz = _dz_tile(z, dcap, cols, row_ok, col_ok, idx, lse, mu, g, ge, logit_scale * inv_temp, HAS_GE)
        dz = dz.to(h_ptr.dtype.element_ty)  # the matmul runs in the input dtype, as the forward's
        # dhidden[rows] += dz @ weight[cols]: this program owns these rows of the fp32 buffer
        for k0 in range(0, H, BLOCK_H):
            ks = k0 + tl.arange(0, BLOCK_H)
            k_ok = ks < H
            w = tl.load(
                w_ptr + cols[:, None] * H + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0
            )
            dh_ptrs = dh_ptr + rows[:, None] * H + ks[None, :]
            dh_ok = row_ok[:, None] & k_ok[None, :]
            acc = tl.load(dh_ptrs, mask=dh_ok, other=0.0)
            acc = _dot(dz, w, acc, DOT_PRECISION)
            tl.store(dh_ptrs, acc, mask=dh_ok)


@_jit
def _bwd_dw_kernel(
    h_ptr,
    w_ptr,
    b_ptr,
    idx_ptr,
    lse_ptr,
    mu_ptr,
    g_ptr,
    ge_ptr,
    dw_ptr,
    db_ptr,
    n,
    V,
    H,
    logit_scale,
    softcap,
    inv_temp,
    HAS_BIAS: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GE: tl.constexpr,
    WANT_DW: tl.constexpr,
    WANT_DB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_H: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cols = pid * BLOCK_V + tl.arange(0, BLOCK_V)
    col_ok = cols < V
    db = tl.zeros((BLOCK_V,), tl.float32)
    for r0 in range(0, n, BLOCK_N):
        rows = r0 + tl.arange(0, BLOCK_N).to(tl.int64)
        row_ok = rows < n
        idx = tl.load(idx_ptr + rows, mask=row_ok, other=-1)
        lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
        g = tl.load(g_ptr + rows, mask=row_ok, other=0.0)
        mu = lse
        ge = g
        if HAS_GE:
            mu = tl.load(mu_ptr + rows, mask=row_ok, other=0.0)
            ge = tl.load(ge_ptr + rows, mask=row_ok, other=0.0)
        z, dcap = _logits_tile(
            h_ptr, w_ptr, b_ptr, rows, cols, row_ok, col_ok, H, logit_scale, softcap, inv_temp,
            HAS_BIAS, HAS_SOFTCAP, BLOCK_N, BLOCK_V, BLOCK_H, DOT_PRECISION,
        )  # fmt: skip
        dz = _dz_tile(z, dcap, cols, row_ok, col_ok, idx, lse, mu, g, ge, logit_scale * inv_temp, HAS_GE)
        if WANT_DB:
            db += tl.sum(dz, axis=0)
        if WANT_DW:
            dzt = tl.trans(dz.to(h_ptr.dtype.element_ty))  # (BLOCK_V, BLOCK_N)
            # dweight[cols] += dz.T @ hidden[rows]: this program owns these rows of the fp32 buffer
            for k0 in range(0, H, BLOCK_H):
                ks = k0 + tl.arange(0, BLOCK_H)
                k_ok = ks < H
                h = tl.load(
                    h_ptr + rows[:, None] * H + ks[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0
                )
                dw_ptrs = dw_ptr + cols[:, None] * H + ks[None, :]
                dw_ok = col_ok[:, None] & k_ok[None, :]
                acc = tl.load(dw_ptrs, mask=dw_ok, other=0.0)
                acc = _dot(dzt, h, acc, DOT_PRECISION)
                tl.store(dw_ptrs, acc, mask=dw_ok)
    if WANT_DB:
        tl.store(db_ptr + cols, db, mask=col_ok)


def _triton_conf(x):
    """(BLOCK_N, BLOCK_V, BLOCK_H, num_warps, dot precision) for this device and dtype."""
    blocks = TRITON_BLOCKS_CUDA if x.is_cuda else TRITON_BLOCKS_INTERPRET
    # fp32 inputs: exact fp32 products ("ieee"), not TF32, to match the torch path
    if x.dtype == torch.float32:
        precision = "ieee"
    elif x.dtype == torch.bfloat16 and not x.is_cuda:
        precision = "upcast"  # interpreter work-around, see _dot
    else:
        precision = "tf32"  # ignored for 16-bit operands: native tensor-core dot
    return (*blocks, precision)


def _vocab_splits(n_row_blocks, V, block_v, device):
    """Columns per forward split, a multiple of BLOCK_V: enough programs to fill the device, every split non-empty."""
    if device.type == "cuda":
        target = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        target = 2  # the interpreter: still exercise the split-merge path
    splits = max(1, min(triton.cdiv(target, n_row_blocks), triton.cdiv(V, block_v)))
    per_split = triton.cdiv(triton.cdiv(V, splits), block_v) * block_v
    return per_split, triton.cdiv(V, per_split)


class _TritonHiddenLogProbs(torch.autograd.Function):
    """hidden (n, H), weight (V, H), bias (V,) or None, index (n,) -> logps (n,), entropy (n,), is_top1 (n,)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, options):
        temperature, logit_scale, softcap, want_entropy = options
        n, H = hidden.shape
        V = weight.shape[0]
        hidden, weight, index = hidden.contiguous(), weight.contiguous(), index.contiguous()
        bias = None if bias is None else bias.contiguous()
        BN, BV, BH, warps, precision = _triton_conf(hidden)
        per_split, splits = _vocab_splits(triton.cdiv(n, BN), V, BV, hidden.device)
        part = torch.empty(4, splits, n, device=hidden.device)  # m, s, t, target per split
        m, s, t, tgt = part.unbind(0)
        _fwd_kernel[(triton.cdiv(n, BN), splits)](
            hidden, weight, bias if bias is not None else hidden, index, m, s, t, tgt,
            n, V, H, per_split, logit_scale, softcap or 1.0, 1.0 / temperature,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, WANT_ENTROPY=want_entropy,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, DOT_PRECISION=precision, num_warps=warps,
        )  # fmt: skip
        # 5. merge the splits: lse = M + log sum_k s_k e^(m_k - M), t shifted to M the same way as in the kernel
        M = m.amax(0)  # (n,)
        scale = torch.exp(m - M)  # (splits, n)
        S = (s * scale).sum(0)
        lse = M + torch.log(S)
        target = tgt.sum(0)  # only the split holding index adds a non-zero value
        logps = target - lse
        is_top1 = target >= M
        mu = entropy = None
        if want_entropy:
            T = (scale * (t + (m - M) * s)).sum(0)
            mu = M + T / S
            entropy = lse - mu
        ctx.save_for_backward(hidden, weight, bias, index, lse, mu)
        ctx.conf = (temperature, logit_scale, softcap)
        ctx.mark_non_differentiable(is_top1)
        ctx.set_materialize_grads(False)
        return logps, entropy, is_top1

    @staticmethod
    def backward(ctx, g_logp, g_ent, _g_top1):
        hidden, weight, bias, index, lse, mu = ctx.saved_tensors
        temperature, logit_scale, softcap = ctx.conf
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        n, H = hidden.shape
        V = weight.shape[0]
        BN, BV, BH, warps, precision = _triton_conf(hidden)
        g = g_logp.float().contiguous() if g_logp is not None else torch.zeros_like(lse)
        has_ge = g_ent is not None
        ge = g_ent.float().contiguous() if has_ge else g
        mu = mu if has_ge else lse
        common = dict(
            HAS_BIAS=bias is not None, HAS_SOFTCAP=softcap is not None, HAS_GE=has_ge,
            BLOCK_N=BN, BLOCK_V=BV, BLOCK_H=BH, DOT_PRECISION=precision, num_warps=warps,
        )  # fmt: skip
        scalars = (n, V, H, logit_scale, softcap or 1.0, 1.0 / temperature)
        b_arg = bias if bias is not None else hidden
        dhidden = dweight = dbias = None
        if need_h:
            dh = torch.zeros(n, H, device=hidden.device)  # fp32 accumulator
            _bwd_dh_kernel[(triton.cdiv(n, BN),)](
                hidden, weight, b_arg, index, lse, mu, g, ge, dh, *scalars, **common
            )
            dhidden = dh.to(hidden.dtype)
        if need_w or need_b:
            dw = torch.zeros(V, H, device=hidden.device) if need_w else lse  # fp32 accumulator
            db = torch.zeros(V, device=hidden.device) if need_b else lse
            _bwd_dw_kernel[(triton.cdiv(V, BV),)](
                hidden, weight, b_arg, index, lse, mu, g, ge, dw, db, *scalars,
                WANT_DW=need_w, WANT_DB=need_b, **common,
            )  # fmt: skip
            dweight = dw.to(weight.dtype) if need_w else None
            dbias = db.to(bias.dtype) if need_b else None
        return dhidden, dweight, dbias, None, None  # no gradient for index and options


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
):
    """Triton path: hidden (..., H), weight (V, H), index (...) -> float32 logps (...) [, entropy] [, is_top1].

    CUDA tensors, or CPU tensors under TRITON_INTERPRET=1. float32 / bfloat16 / float16 inputs."""
    if triton is None:
        raise RuntimeError("logprobs_from_hidden_triton needs triton, which cannot be imported")
    _check_inputs(hidden, weight, index, bias, temperature, logit_scale, softcap, mask)
    if hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise ValueError(
            f"the triton backend takes float32/bfloat16/float16 hidden and weight; got {hidden.dtype}"
        )
    rows, h, idx = _flatten_valid(hidden, index, mask)
    _check_index_range(idx, weight.shape[0], rows)
    if h.shape[0] == 0:  # every row masked: nothing to launch
        logps, entropy, is_top1 = (h.new_zeros(0, dtype=torch.float32),) * 2 + (
            idx.new_zeros(0, dtype=torch.bool),
        )
        logps = logps + 0.0 * h.sum()  # keep the graph so backward gives zero gradients
    else:
        options = (
            float(temperature),
            float(logit_scale),
            None if softcap is None else float(softcap),
            return_entropy,
        )
        logps, entropy, is_top1 = _TritonHiddenLogProbs.apply(h, weight, bias, idx, options)
    if not return_entropy:
        entropy = None
    logps, entropy, is_top1 = _unflatten(rows, index.shape, logps, entropy, is_top1)
    return select_outputs(logps, entropy, is_top1, return_entropy, return_top1)
