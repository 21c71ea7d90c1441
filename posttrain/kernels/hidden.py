"""Fused output layer + log-softmax + gather: per-token log-probs straight from hidden states.

Notation: N rows (any leading batch shape, flattened), V vocabulary, H hidden size.
R rows per tile, C vocabulary entries per tile.

    a = hidden @ weight.T (+ bias)           (N, V)  never built: only (R, C) tiles exist
    u = softcap * tanh(a * logit_scale / softcap)   if softcap (Gemma's final_logit_softcapping), else a
    z = k u,  k = 1 / temperature  (softcap)  or  logit_scale / temperature  (no softcap)
    logps   = z[index] - logsumexp(z)         (N,)
    entropy = logsumexp(z) - sum_j p_j z_j    (N,)   p = softmax(z)
    is_top1 = argmax_j z_j == index           (N,)   torch.argmax's rule: a tie goes to the lowest index
    mean_logit = sum_j z_j / V                (N,)   no gradient (TRL's logits/chosen, /rejected metrics)
    log_sum_sq = log sum_j p_j^2              (N,)   no gradient (WPO's per-token weight)

Everything is kept relative to the row's reference r = max_j u_j, as the logits path does: with d = k (u - r)
(the subtraction first, so it is exact for the entries that matter, then one rounding of a small number),
    logps = k (u[index] - r) - log s,   entropy = log s - t / s,   s = sum_j exp(d_j),  t = sum_j exp(d_j) d_j
so a shift of every logit by 1e4 costs nothing in accuracy (absolute lse and mu would lose an ulp of |z|).
s and t are accumulated across vocabulary tiles with the online softmax recurrence (Milakov & Gimelshein 2018,
"Online normalizer calculation for softmax"): rescaled by exp(k (r_old - r_new)) when the reference grows.
The argmax runs along: a later tile takes it over only with a strictly greater maximum. The two metrics, only
when asked for, run along too: sum_j u_j (mean_logit = k sum_j u_j / V; summed after the softcap, which is not
linear, so never as hidden @ mean(weight)) and sq = sum_j exp(d_j)^2, rescaled by the square of s's factor
(log_sum_sq = log sq - 2 log s).

Gradients (g = dL/dlogps, e = dL/dentropy, mu = sum_j p_j d_j, p_j = exp(d_j) / s):
    dlogp/dz_j    = onehot_j - p_j
    dentropy/dz_j = -p_j (d_j - mu)
    dL/dz_j       = g onehot_j - p_j (g + e (d_j - mu))
then chained through dz/da = logit_scale / temperature, times the softcap's 1 - tanh^2 when there is one:
    dhidden = dL/da @ weight, dweight = dL/da.T @ hidden, dbias = sum_rows dL/da
The backward recomputes each tile's logits from hidden and weight (one extra matmul) instead of storing them,
except on the CPU with one row tile (`_kept_blocks`): there the forward keeps them, with a few rows (at most
about H) at no extra peak memory in the (V, H) tensor that becomes dweight, else in tensors of their own up to
KEEP_BYTES.

Structure, the same on every device: the tile matmuls are plain `torch.mm` calls (cuBLAS on a GPU, where
they run near the tensor-core peak), and the per-tile work between them, folding a tile into the running
statistics in forward and turning it into dL/da in backward, is one "fold" function: Triton kernels on CUDA
(one read of the tile, or one read and one in-place write), a few torch ops elsewhere, except float32 tiles
without softcap on the CPU, which fold in C (`native`: native.c, compiled on first use; 3-4x faster than the
ops). A fully fused Triton matmul (logits tiles never leaving registers) saves those tile passes but must either
atomically add into dweight or recompute the logits once more per gradient. The price of running at cuBLAS
speed, by a count (not yet a GPU measurement): a tile pass moves 2-4 bytes per bf16 logit where the matmuls do 2H FLOPs (forward) or
6H (backward) per logit; at an H100's ~990 TFLOP/s and 3.35 TB/s that is ~300/H of the forward's matmul time
and ~200/H of the backward's (~30% / 20% at H = 896, ~7% / 5% at H = 4096).

Precision: the matmuls take their operands in the compute dtype (the autocast dtype when autocast is on for
the device, else the input dtype, as `nn.Linear` would) and produce the tile in that dtype, so bf16/fp16
logits are rounded once, exactly like a bf16 `lm_head`; everything after the matmul is float32. In the
backward dL/da is rounded to the compute dtype (as autograd does for a bf16 `lm_head`) and the gradient
matmuls accumulate into float32 dhidden / dweight / dbias without rounding each tile's product (`_MIXED_MM`),
cast to the parameter dtype at the end.
Outputs are float32 (float64 for float64 inputs on the torch path, which gradcheck uses).

Host syncs: none on CUDA without a mask (the index range is checked on the device); a mask costs exactly one, the
count of kept rows that sizes the matmuls. Alignment: every tile buffer has a row stride that is a multiple of 256
elements, so the Triton folds read and write 128 bits per access for any V (GPT-2's 50257), row count and ragged
last vocabulary tile.
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
from torch.torch_version import TorchVersion

from . import native
from ._outputs import select_outputs
from .logits import FP_FUSION, device_of

try:
    import triton
    import triton.language as tl
except ImportError:  # the torch path works without triton
    triton = None

# Tile sizes: R rows x C vocabulary entries with R * C about TILE_ELEMENTS (C grows when there are fewer
# than R rows). CPU, 2 cores, float32, forward + backward with entropy: 1M-element tiles (4 MiB, the folds'
# passes stay in cache) against 4M: 0.94x at N=512, H=256 (512 x 2048 tiles), 0.96x at N=2048 (2048 x 512),
# level (1.01x) at N=4096, H=896, V=32000, where fewer rows per tile slowed the matmuls.
# CUDA: 4096-row tiles keep cuBLAS at its large-matrix rate; a 4096 x 8192 bf16 tile is 64 MiB, 1/80 of
# the 5 GiB of logits at N=16k, V=152k.
ROWS_PER_TILE = {"cpu": 2048, "cuda": 4096}
TILE_ELEMENTS = {"cpu": 2048 * 512, "cuda": 4096 * 8192}
# The most the CPU path holds from forward to backward to skip recomputing the logits (`_kept_blocks`), beyond
# what fits in dweight's own buffer. At benchmarks/dpo.py's shape (1024 completion tokens, V = 32000, H = 256:
# 131 MB kept) the output layer's forward + backward took 0.32-0.33 s recomputing, 0.27-0.29 s keeping (its three
# products alone 0.26 s), and DPO's step 6-7 % less time (alternating steps in one process) for ~60 MiB more
# peak memory (the heap reuses the kept tiles' pages: a single 131 MB buffer, mapped afresh each step, cost as
# much in page faults as it saved).
KEEP_BYTES = 256 * 2**20


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
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
):
    """Naive float64 version: hidden (..., H), weight (V, H), index (...), bias (V,), mask (...) bool.

    Returns float64 logps (...) [, entropy (...)] [, is_top1 (...)] [, mean_logit (...)] [, log_sum_sq (...)];
    masked rows are 0 / False. Differentiable through hidden, weight and bias (use it for gradient references)."""
    z = hidden.double() @ weight.double().T  # (..., V)
    if bias is not None:
        z = z + bias.double()
    z = z * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    # top-1 of the model's logits, before the temperature (as the logits path): z / T may round two
    # neighbouring values to one in a lower precision
    is_top1 = z.argmax(-1) == index  # a tie goes to the lowest index
    z = z / temperature
    logp_all = torch.log_softmax(z, dim=-1)  # (..., V)
    logps = logp_all.gather(-1, index.long().unsqueeze(-1)).squeeze(-1)  # (...)
    # p log p = 0 where p = 0 (a -inf logit); the where() sits on log p so backward never meets 0 * -inf
    p = logp_all.exp()
    entropy = -(p * torch.where(p > 0, logp_all, torch.zeros_like(logp_all))).sum(-1)  # (...)
    mean_logit = z.mean(-1)  # (...)
    log_sum_sq = torch.logsumexp(2 * logp_all, dim=-1)  # (...) log sum_j p_j^2
    if mask is not None:
        mask = mask.bool()
        logps, entropy, mean_logit, log_sum_sq = (
            torch.where(mask, x, torch.zeros_like(x)) for x in (logps, entropy, mean_logit, log_sum_sq)
        )
        is_top1 = is_top1 & mask
    wanted = (return_entropy, return_top1, return_mean_logit, return_log_sum_sq)
    return select_outputs(logps, (entropy, is_top1, mean_logit, log_sum_sq), wanted)


# ----------------------------------------------------------------------------------------------------------
# Shared input handling: validate, flatten (..., H) -> (N, H), drop masked rows before any matmul.
# ----------------------------------------------------------------------------------------------------------


def _check_inputs(hidden, weight, index, bias, temperature, logit_scale, softcap, mask):
    if weight.dim() != 2:
        raise ValueError(f"weight must be (V, H); got shape {tuple(weight.shape)}")
    for name, x in (("weight", weight), ("index", index), ("bias", bias), ("mask", mask)):
        if x is not None and x.device != hidden.device:
            raise ValueError(f"{name} is on {x.device} but hidden is on {hidden.device}")
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
        # The one host sync of a masked call, and unavoidable: the count of kept rows sizes every matmul (the
        # alternative, all N rows through the matmuls, costs more than the sync on the batches masks come with).
        rows = mask.reshape(-1).bool().nonzero().squeeze(1)  # (n,)
        flat_hidden = flat_hidden.index_select(0, rows)
        flat_index = flat_index.index_select(0, rows)
    return rows, flat_hidden, flat_index


def _sync_free(device: torch.device) -> bool:
    """Whether checks must stay on the device: on CUDA a host sync stalls the launch queue and breaks graph
    capture; on the CPU there is no queue, and the check can afford to name the row."""
    return device.type == "cuda"


def _check_index_range(index, V, rows):
    """index (n,) of the kept rows; on the CPU the message names the row in the flattened (N,) input."""
    if index.numel() == 0:
        return
    ok = (index >= 0) & (index < V)  # (n,)
    if _sync_free(index.device):
        # Device-side assert, no sync: naming the row would need one. An out-of-range index would not read out of
        # bounds (the folds compare columns with it), but it would silently give a wrong log-prob.
        torch._assert_async(ok.all(), f"index out of range [0, {V}) in logprobs_from_hidden")
        return
    if not ok.all():
        i = int((~ok).nonzero()[0, 0])
        where = i if rows is None else int(rows[i])
        raise ValueError(f"index out of range [0, {V}) at flattened row {where}: {int(index[i])}")


def _unflatten(rows, shape, outputs):
    """Scatter each output's kept rows (n,) back to the leading shape; masked rows are 0 / False (and get zero
    grad). outputs: a tuple of (n,) tensors or None, returned in the same order."""

    def back(x):
        if rows is not None:
            x = x.new_zeros(shape.numel()).index_copy(0, rows, x)
        return x.reshape(shape)

    return tuple(None if x is None else back(x) for x in outputs)


# ----------------------------------------------------------------------------------------------------------
# Folds, torch: the per-tile math between the matmuls, as torch ops (CPU, float64, any device).
# ----------------------------------------------------------------------------------------------------------


class Transform(NamedTuple):
    """a -> u = softcap tanh(a logit_scale / softcap) (softcap None: u = a) -> z = k u (see the module docstring)."""

    logit_scale: float
    softcap: float | None
    inv_t: float

    @property
    def k(self) -> float:
        """dz/du: the factor applied after subtracting the row reference."""
        return self.inv_t if self.softcap is not None else self.logit_scale * self.inv_t


def _acc_dtype(x):
    """float32 math, float64 kept for float64 inputs (gradcheck)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _transform_torch(a, tr: Transform, cap_grad=False, work=None):
    """a (R, C) tile of hidden @ weight.T + bias -> u (R, C) in the math dtype [, du/da / logit_scale].

    Works in place when `a` is already in the math dtype (the caller's own tile buffer), or in `work` (R, C)
    where the caller keeps `a` (the forward's kept logits; a plain u is then `a` itself). The softcap derivative
    1 - tanh^2(x / c) is computed as 1 / cosh^2(x / c) from the uncapped x: 1 - (u / c)^2 from the capped u
    loses all precision once tanh rounds to 1."""
    u = a if a.dtype == _acc_dtype(a) else a.to(_acc_dtype(a))
    dcap = None
    if tr.softcap is not None:
        scale = tr.logit_scale / tr.softcap
        u = u.mul_(scale) if work is None or u is not a else torch.mul(u, scale, out=work)
        if cap_grad:
            dcap = torch.cosh(u).square_().reciprocal_()  # cosh overflows to inf -> derivative 0, no NaN
        u = u.tanh_().mul_(tr.softcap)
    return u, dcap


def _local_targets(index, c0, C):
    """index (R,) -> (column of the target within the tile, clamped into it (R, 1); whether it is there (R,))."""
    local = index - c0
    return local.clamp(0, C - 1).unsqueeze(1), (local >= 0) & (local < C)


def _row_ref(m):
    """The row reference r from the running max m (R,): 0 while nothing finite was seen (no -inf - -inf)."""
    return torch.where(m == float("-inf"), 0.0, m)


def _fold_forward_torch(a, index, c0, stats, tr: Transform, want_entropy, work=None):
    """Fold tile a (R, C), columns c0 .. c0 + C of the vocabulary, into the running statistics
    stats = (m, s, t, target, arg, u_sum, sq), each (R,), in place (t only with want_entropy, arg (int64) only when
    top-1 is asked for, u_sum = sum u and sq = sum exp(d)^2 only when mean_logit and log_sum_sq are, else None).
    index (R,): the rows' target columns in the vocabulary. m, target and u_sum are in u units. The fold works in
    place in a, or in `work` (R, C) where the caller keeps a. A float32 CPU tile without softcap folds in C
    (`native`), reading a only."""
    if native.fold_forward(a, index, c0, stats, tr, want_entropy):
        return
    m, s, t, target, arg, u_sum, sq = stats
    u, _ = _transform_torch(a, tr, work=work)
    if u_sum is not None:
        u_sum += u.sum(1)  # before u is shifted in place below
    col, inside = _local_targets(index, c0, u.shape[1])
    torch.where(inside, u.gather(1, col).squeeze(1), target, out=target)
    if arg is None:
        tile_max = u.amax(1)
    elif _sync_free(u.device):
        tile_max, tile_arg = u.max(1)  # the first column holding the maximum
        # strictly greater: an equal maximum in an earlier tile keeps its lower index, as torch.argmax does
        torch.where(tile_max > m, tile_arg + c0, arg, out=arg)
    else:
        # On the CPU an arg-max costs ~10x the max alone (1M-element tile: 0.83 against 0.07 ms), so it runs
        # only on the rows this tile takes the lead of (strictly greater, as above): all rows on the first
        # tile, then ~1 / (k + 1) of them on the k-th, ~4 tiles' worth in all over 32 tiles, for one host sync.
        tile_max = u.amax(1)
        lead = (tile_max > m).nonzero().squeeze(1)
        if len(lead):
            rows = u if len(lead) == len(u) else u.index_select(0, lead)
            arg.index_copy_(0, lead, rows.argmax(1) + c0)
    m_new = torch.maximum(m, tile_max)
    ref = _row_ref(m_new)
    alpha = torch.exp((m - ref) * tr.k)  # 0 on the first tile (m = -inf)
    # exact where it matters (u near ref), then one rounding of a small number
    d = u.sub_(ref.unsqueeze(1)) if work is None or u is not a else torch.sub(u, ref.unsqueeze(1), out=work)
    if tr.k != 1.0:
        d *= tr.k
    if want_entropy:
        e = torch.exp(d)  # (R, C)
        # t relative to the new reference: alpha (t + k (m - ref) s); m - ref = -inf only where s = 0
        t.copy_(alpha * (t + torch.where(s > 0, (m - ref) * tr.k, 0.0) * s))
        d.clamp_(min=torch.finfo(d.dtype).min)  # e d = 0, not NaN, where d = -inf (one pass, no mask tile)
        # row-wise dot, in place in d (not read again): a cascade sum, ~4x faster on the CPU than a bmm of R
        # (1, C) x (C, 1) products and nearer float64 (tile 256 x 4096: 1.5 -> 0.35 ms, 1.5e-6 -> 1.1e-7)
        t += d.mul_(e).sum(1)
    else:
        e = d.exp_()
    s.mul_(alpha).add_(e.sum(1))
    if sq is not None:
        # e is no longer needed: squared in place, then summed (a cascade sum: a float32 dot over a 150k-column tile
        # was measured 2e-4 off in log_sum_sq)
        sq.mul_(alpha.square()).add_(e.square_().sum(1))
    m.copy_(m_new)


def _fold_backward_torch(a, index, c0, ref, log_s, mu, g, ge, tr: Transform):
    """Overwrite tile a (R, C) with dL/da, in a's dtype. ref, log_s, g, mu, ge (R,) in the math dtype (mu and ge
    None without an entropy gradient); index and c0 as in the forward fold. Without an entropy gradient a float32
    tile is worked on in place (a 16-bit one through one float32 copy); with it, one more float32 tile holds p.
    A float32 CPU tile without softcap is worked on in C (`native`), in place."""
    if native.fold_backward(a, index, c0, ref, log_s, mu, g, ge, tr):
        return
    u, dcap = _transform_torch(a, tr, cap_grad=True)
    f = tr.logit_scale * tr.inv_t  # dz/da without the softcap's derivative
    d = u.sub_(ref.unsqueeze(1))
    if tr.k != 1.0:
        d *= tr.k
    inv_s = torch.exp(-log_s)  # p = exp(d) / s: the row factors go into the one per-row multiply
    if ge is None:
        dz = d.exp_().mul_((-g * f * inv_s).unsqueeze(1))  # -f g p
    else:
        p = torch.exp(d)  # (R, C), p s
        d -= mu.unsqueeze(1)
        d.masked_fill_(p == 0, 0.0)  # p (d - mu) = 0 where d = -inf
        d.mul_((-ge * f * inv_s).unsqueeze(1)).sub_((g * f * inv_s).unsqueeze(1))
        dz = d.mul_(p)  # -f p (g + ge (d - mu))
    col, inside = _local_targets(index, c0, dz.shape[1])
    # + f g at the target column, where it is in this tile
    dz.scatter_add_(1, col, (g * f * inside).unsqueeze(1))
    if dcap is not None:
        dz *= dcap
    # a 16-bit tile: one rounding of dL/da (in-place ops return their own tensor, so float32 skips this)
    if dz is not a:
        a.copy_(dz)


# ----------------------------------------------------------------------------------------------------------
# Folds, Triton: the same math in one pass over the tile (CUDA; the CPU under TRITON_INTERPRET=1).
# Plain functions, jitted on first use (`_kernels`), so this module imports without triton.
# ----------------------------------------------------------------------------------------------------------


def _fold_forward_kernel(
    tile_ptr,  # (R, C) compute dtype, row stride stride_r (a multiple of 256), unit column stride
    stride_r,
    index_ptr,  # (R,) int64: target columns in the vocabulary
    c0,  # the tile's first vocabulary column
    m_ptr,  # (R,) float32 in/out: running max of u
    s_ptr,  # (R,) float32 in/out: sum exp(k (u - m))
    t_ptr,  # (R,) float32 in/out: sum exp(k (u - m)) k (u - m), only when WANT_ENTROPY
    target_ptr,  # (R,) float32 in/out: u[index], written by the tile holding it
    arg_ptr,  # (R,) int64 in/out: first column of the running max, only when WANT_TOP1
    u_sum_ptr,  # (R,) float32 in/out: sum u, only when WANT_MEAN_LOGIT
    sq_ptr,  # (R,) float32 in/out: sum exp(k (u - m))^2, only when WANT_LOG_SUM_SQ
    C,  # the tile's width
    C_pad,  # C rounded up to 16: the loads run to it, so their mask is uniform over 16 columns (128-bit accesses)
    logit_scale,
    softcap,
    k,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    WANT_MEAN_LOGIT: tl.constexpr,
    WANT_LOG_SUM_SQ: tl.constexpr,
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
    arg = 0
    if WANT_TOP1:
        arg = tl.load(arg_ptr + row)
    u_sum = 0.0
    if WANT_MEAN_LOGIT:
        u_sum = tl.load(u_sum_ptr + row)
    sq = 0.0
    if WANT_LOG_SUM_SQ:
        sq = tl.load(sq_ptr + row)
    for start in range(0, C_pad, BLOCK_C):
        cols = start + tl.arange(0, BLOCK_C)
        # columns C .. C_pad hold whatever the buffer held (inside its row): loaded, then zeroed in registers
        x = tl.load(row_ptr + cols, mask=cols < C_pad, other=0.0).to(tl.float32)
        x = tl.where(cols < C, x, 0.0)
        if HAS_SOFTCAP:
            # tanh from q = exp(-2|x|) <= 1: no overflow at large |x|
            x = x * (logit_scale / softcap)
            q = tl.exp(-2.0 * tl.abs(x))
            x = tl.where(x < 0, -softcap, softcap) * (1.0 - q) / (1.0 + q)
        if WANT_MEAN_LOGIT:
            u_sum += tl.sum(x, axis=0)  # x is 0 in columns C .. C_pad (the softcap keeps 0 at 0)
        u = tl.where(cols < C, x, float("-inf"))
        if (local >= start) & (local < start + BLOCK_C):  # the block holding the target: same program-wide
            target = tl.sum(tl.where(cols == local, u, 0.0), axis=0)
        block_max = tl.max(u, axis=0)
        if WANT_TOP1:
            first = tl.min(tl.where(u == block_max, cols, C_pad), axis=0)  # first column holding the maximum
            arg = tl.where(block_max > m, c0 + first, arg)  # strictly greater: ties keep the lower index
        m_new = tl.maximum(m, block_max)
        ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing finite yet: shift by 0, no -inf - -inf
        alpha = tl.exp((m - ref) * k)
        d = (u - ref) * k
        e = tl.exp(d)
        if WANT_ENTROPY:
            shift = tl.where(s > 0, (m - ref) * k, 0.0) * s  # 0 while s = 0 (m = -inf: no -inf * 0)
            t = alpha * (t + shift) + tl.sum(e * tl.where(e > 0, d, 0.0), axis=0)
        if WANT_LOG_SUM_SQ:
            sq = sq * (alpha * alpha) + tl.sum(e * e, axis=0)
        s = s * alpha + tl.sum(e, axis=0)
        m = m_new
    tl.store(m_ptr + row, m)
    tl.store(s_ptr + row, s)
    tl.store(target_ptr + row, target)
    if WANT_ENTROPY:
        tl.store(t_ptr + row, t)
    if WANT_TOP1:
        tl.store(arg_ptr + row, arg)
    if WANT_MEAN_LOGIT:
        tl.store(u_sum_ptr + row, u_sum)
    if WANT_LOG_SUM_SQ:
        tl.store(sq_ptr + row, sq)


def _fold_backward_kernel(
    tile_ptr,  # (R, C) compute dtype, row stride stride_r; overwritten with dL/da
    stride_r,
    index_ptr,  # (R,) int64
    c0,
    ref_ptr,  # (R,) float32: the row reference r (u units)
    log_s_ptr,  # (R,) float32: log sum_j exp(d_j)
    mu_ptr,  # (R,) float32 sum_j p_j d_j, read only when HAS_GE
    g_ptr,  # (R,) float32 dL/dlogps
    ge_ptr,  # (R,) float32 dL/dentropy, read only when HAS_GE
    C,  # the tile's width
    C_pad,  # C rounded up to 16, as in the forward: columns C .. C_pad are written, but lie outside the tile
    logit_scale,
    softcap,
    k,
    HAS_SOFTCAP: tl.constexpr,
    HAS_GE: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    """Grid (R, cdiv(C_pad, BLOCK_C)): each program turns one block of one row into
    dL/da = (g onehot - p (g + e (d - mu))) * dcap * logit_scale / T, read and written in place (the programs'
    blocks are disjoint)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    ok = cols < C_pad
    ptrs = tile_ptr + row * stride_r + cols
    x = tl.where(cols < C, tl.load(ptrs, mask=ok, other=0.0).to(tl.float32), 0.0)
    dcap = 1.0
    if HAS_SOFTCAP:
        # the forward's tanh, and 1 - tanh^2 = 4 q / (1 + q)^2 from the same q: no overflow, no cancellation
        x = x * (logit_scale / softcap)
        q = tl.exp(-2.0 * tl.abs(x))
        x = tl.where(x < 0, -softcap, softcap) * (1.0 - q) / (1.0 + q)
        dcap = 4.0 * q / ((1.0 + q) * (1.0 + q))
    d = (x - tl.load(ref_ptr + row)) * k
    p = tl.exp(d - tl.load(log_s_ptr + row))
    g = tl.load(g_ptr + row)
    coef = g
    if HAS_GE:
        # p (d - mu) = 0 where p = 0: d = -inf there would make it NaN
        coef = g + tl.load(ge_ptr + row) * tl.where(p > 0, d - tl.load(mu_ptr + row), 0.0)
    dz = tl.where(cols == tl.load(index_ptr + row) - c0, g, 0.0) - p * coef
    scale = k  # dz/da without the softcap's derivative: logit_scale / T
    if HAS_SOFTCAP:
        scale = logit_scale * k
    dz = dz * dcap * scale
    tl.store(ptrs, dz.to(tile_ptr.dtype.element_ty), mask=ok)


@functools.cache
def _kernels():
    """(forward fold, backward fold), jitted."""
    return triton.jit(_fold_forward_kernel), triton.jit(_fold_backward_kernel)


# BLOCK_C and num_warps: the forward streams a row in 2048-wide blocks with 8 warps (8 elements per thread per
# block: one 128-bit load of bf16), the backward is one 1024-wide block per program. Not yet timed on a GPU;
# the interpreter gets small blocks so CPU tests cross block edges.
FOLD_LAUNCH = {"cuda": ((2048, 8), (1024, 4)), "interpret": ((32, 1), (32, 1))}


def _pad16(C):
    return -(-C // 16) * 16


def _fold_forward_triton(a, index, c0, stats, tr: Transform, want_entropy, work=None):
    """The torch fold's signature; `work` is not needed: the kernel only reads the tile."""
    (block, warps), _ = FOLD_LAUNCH["cuda" if a.is_cuda else "interpret"]
    m, s, t, target, arg, u_sum, sq = stats
    forward, _ = _kernels()
    with device_of(a):
        forward[(a.shape[0],)](
            a, a.stride(0), index, c0, m, s, t if want_entropy else s, target, index if arg is None else arg,
            s if u_sum is None else u_sum, s if sq is None else sq, a.shape[1], _pad16(a.shape[1]), *_scalars(tr),
            HAS_SOFTCAP=tr.softcap is not None, WANT_ENTROPY=want_entropy, WANT_TOP1=arg is not None,
            WANT_MEAN_LOGIT=u_sum is not None, WANT_LOG_SUM_SQ=sq is not None, BLOCK_C=block, num_warps=warps,
            enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def _fold_backward_triton(a, index, c0, ref, log_s, mu, g, ge, tr: Transform):
    _, (block, warps) = FOLD_LAUNCH["cuda" if a.is_cuda else "interpret"]
    _, backward = _kernels()
    C_pad = _pad16(a.shape[1])
    with device_of(a):
        backward[(a.shape[0], triton.cdiv(C_pad, block))](
            a, a.stride(0), index, c0, ref, log_s, log_s if mu is None else mu, g, g if ge is None else ge,
            a.shape[1], C_pad, *_scalars(tr), HAS_SOFTCAP=tr.softcap is not None, HAS_GE=ge is not None, BLOCK_C=block,
            num_warps=warps, enable_fp_fusion=FP_FUSION,
        )  # fmt: skip


def _scalars(tr: Transform):
    """The kernels' float arguments (logit_scale, softcap, k); softcap is unused (any value) when it is None."""
    return float(tr.logit_scale), float(tr.softcap or 1.0), float(tr.k)


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


# Row strides of the tile buffers are multiples of this many elements (512 bytes in bf16): every tile row starts
# 16-byte aligned, so the Triton folds' loads and stores vectorise to 128 bits whatever V and the row count are.
ROW_ALIGN = 256


def _tile_buffer(rows, cols, V, device, dtype):
    """(rows, C) tile buffer, C = min(cols, V), as a view of a (rows, C rounded up to ROW_ALIGN) allocation."""
    C = min(cols, V)
    return torch.empty(rows, -(-C // ROW_ALIGN) * ROW_ALIGN, device=device, dtype=dtype)[:, :C]


@functools.cache
def _mixed_mm_form(device_type: str, version: str) -> str:
    """How acc (float32) += a @ b (16-bit a, b) runs without rounding a @ b to 16 bits first (a bf16 product rounded
    per tile and then summed drifts, as TRL's chunked kernel notes):

    'mm_out_dtype': acc += torch.mm(a, b, out_dtype=float32), on CUDA from torch 2.8 (aten::mm.dtype). Not
        addmm(acc, a, b, out_dtype=float32, out=acc), which saves the temporary but which torch 2.8 and 2.9 reject
        for a float32 acc ("self and mat2 must have the same dtype", relaxed later by pytorch#167931);
    'upcast': acc += a.float() @ b.float() (16-bit products are exact in float32): the CPU, which has no mm.dtype
        kernel, and CUDA before 2.8.
    `version` is torch.__version__, compared as a version ("2.10" > "2.8"), pre-releases of 2.8 below it."""
    if device_type == "cuda" and TorchVersion(version) >= (2, 8):
        return "mm_out_dtype"
    return "upcast"


_MIXED_MM = {
    "mm_out_dtype": lambda acc, a, b: acc.add_(torch.mm(a, b, out_dtype=acc.dtype)),
    "upcast": lambda acc, a, b: acc.addmm_(a.to(acc.dtype), b.to(acc.dtype)),
}


def _add_mm(acc, a, b):
    """acc += a @ b for a float32 (or float64) acc, a and b in acc's dtype or 16-bit."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        _MIXED_MM[_mixed_mm_form(acc.device.type, torch.__version__)](acc, a, b)


def _row_tiles(n, rows):
    """Row tile starts and sizes: ceil(n / rows) tiles of near-equal height (no one-row tail tile)."""
    count = -(-n // rows)
    size = -(-n // count) if count else 0
    return [(r0, min(size, n - r0)) for r0 in range(0, n, size)] if n else []


def _kept_blocks(backend, ctx, hidden, weight, tiles, cols, dtype):
    """Where the forward keeps its logits for the backward, which otherwise recomputes them: ([(c0, offset)]
    per vocabulary tile, overlay), or None. On the CPU (the torch folds), when the rows are one row tile and
    the tiles, the weight and the accumulators share one dtype, and some input wants a gradient, tile c0's (n, C)
    logits are kept for the backward:
    - overlay: as a block at `offset` (rows ROW_ALIGN-aligned, as in the tile buffer) of the (V, H) tensor that
      the backward returns as dweight, when the weight's gradient is wanted, the blocks fit (about n <= H) and
      writing dweight's rows c0.. (elements H c0 on) overwrites no block of an earlier tile. Peak memory is
      unchanged (otherwise dweight is allocated at the backward's start, with the forward's activations all
      still held). The backward reads every block (dL/dlogits in place, dhidden, dbias), then writes dweight
      tile by tile from the last.
    - else in tensors of their own, one per tile, laid out as the tile buffer, held from the forward to the
      backward, if they take at most KEEP_BYTES together.
    Either way the backward does two products instead of three (one instead of two for a frozen weight), with
    the same numbers (the kept tile is the product it would recompute: tests/test_kernels_hidden.py compares bit
    for bit). benchmarks/grpo.py's training step (n = 256 completion tokens, V = 32000, H = 256, overlay):
    forward + backward + AdamW 0.237 / 0.242 -> 0.210 / 0.215 s, peak 306 / 311 -> 309 / 312 MiB (two runs
    each, alternating)."""
    (n, H), V = hidden.shape, weight.shape[0]
    if not (
        backend == "torch"
        and hidden.device.type == "cpu"
        and any(ctx.needs_input_grad[:3])
        and len(tiles) == 1
        and dtype == weight.dtype == _acc_dtype(hidden)
    ):
        return None
    blocks, offset, overlay = [], 0, ctx.needs_input_grad[1]
    for c0 in range(0, V, cols):
        overlay = overlay and offset <= H * c0
        blocks.append((c0, offset))
        offset += n * -(-min(cols, V - c0) // ROW_ALIGN) * ROW_ALIGN
    if overlay and offset <= V * H:
        return blocks, True
    # own tensors: one tile buffer's layout each (the last one, however ragged, as wide as the others)
    own = len(blocks) * n * -(-min(cols, V) // ROW_ALIGN) * ROW_ALIGN
    return (blocks, False) if own * hidden.element_size() <= KEEP_BYTES else None


def _block(kept, n, c0, offset, V, cols):
    """The (n, C) logits of vocabulary tile c0 in the kept buffer (see `_kept_blocks`)."""
    C = min(cols, V - c0)
    return kept.view(-1)[offset : offset + n * -(-C // ROW_ALIGN) * ROW_ALIGN].view(n, -1)[:, :C]


class _HiddenLogProbs(torch.autograd.Function):
    """hidden (n, H), weight (V, H), bias (V,) or None, index (n,) -> logps (n,), entropy (n,) or None,
    is_top1 (n,) or None, mean_logit (n,) or None, log_sum_sq (n,) or None (the last two without gradient).

    Saves hidden, weight, bias, index and per-row ref, log s (n,) and mu (n,): O(n + V H) memory.
    Extra memory: one (R, C) tile in the compute dtype and what the fold needs (torch: up to two float32
    tiles, Triton: none); in backward also float32 dhidden (n, H), dweight in the weight's dtype (float32
    accumulated, through a (C, H) float32 buffer for 16-bit weights with more than one row tile), and for 16-bit
    tiles the float32 temporaries of the mixed-dtype gradient matmuls (freed at once; see _mixed_mm_form). Where
    `_kept_blocks` applies, the forward holds the logits until the backward: in dweight, allocated in the
    forward, or in tensors of their own (at most KEEP_BYTES)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, index, options):
        backend, tr, want_entropy, want_top1, want_mean, want_sum_sq, rows, cols, recorded = options
        n, V = hidden.shape[0], weight.shape[0]
        fold_forward, _ = FOLDS[backend]
        dtype = _compute_dtype(hidden)
        f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
        m = torch.full((n,), float("-inf"), **f)
        s, t, target = (torch.zeros(n, **f) for _ in range(3))
        arg = torch.zeros(n, device=hidden.device, dtype=torch.long) if want_top1 else None
        u_sum = torch.zeros(n, **f) if want_mean else None
        sq = torch.zeros(n, **f) if want_sum_sq else None
        tiles = _row_tiles(n, rows)
        buf = _tile_buffer(tiles[0][1] if tiles else 0, cols, V, hidden.device, dtype)
        keep = _kept_blocks(backend, ctx, hidden, weight, tiles, cols, dtype) if recorded else None
        kept = overlaid = None  # (n, C) logits per vocabulary tile for the backward; dweight's (V, H) buffer
        if keep is not None:
            blocks, overlay = keep
            if overlay:
                overlaid = torch.empty_like(weight, memory_format=torch.contiguous_format)
                kept = [_block(overlaid, n, c0, offset, V, cols) for c0, offset in blocks]
            else:  # a tensor per tile, each under glibc's mmap threshold: steps reuse the heap's pages
                kept = [
                    _tile_buffer(n, cols, V, hidden.device, dtype)[:, : min(cols, V - c0)] for c0, _ in blocks
                ]
        with torch.autocast(hidden.device.type, enabled=False):  # dtypes are explicit below
            h_all = hidden.to(dtype)
            for c0 in range(0, V, cols):
                w = weight[c0 : c0 + cols].to(dtype)  # (C, H)
                b = None if bias is None else bias[c0 : c0 + cols].to(dtype)
                for r0, R in tiles:
                    tile = buf[:R, : w.shape[0]]
                    # kept: the logits go straight into the kept tile, and the fold works in the tile buffer
                    a = _tile_matmul(h_all[r0 : r0 + R], w, b, tile if kept is None else kept[c0 // cols])
                    stats = tuple(
                        None if x is None else x[r0 : r0 + R] for x in (m, s, t, target, arg, u_sum, sq)
                    )
                    work = None if kept is None else tile
                    fold_forward(a, index[r0 : r0 + R], c0, stats, tr, want_entropy, work=work)
            ref = _row_ref(m)
            log_s = torch.log(s)
            logps = (target - ref) * tr.k - log_s
            is_top1 = None if arg is None else arg == index
            mu = entropy = None
            if want_entropy:
                mu = t / s
                entropy = log_s - mu
            mean_logit = None if u_sum is None else u_sum * (tr.k / V)
            log_sum_sq = None if sq is None else torch.log(sq) - 2 * log_s
        ctx.save_for_backward(hidden, weight, bias, index, ref, log_s, mu)
        ctx.kept = None if kept is None else (kept, overlaid)
        ctx.options = options
        ctx.dtype = dtype
        ctx.mark_non_differentiable(*(x for x in (is_top1, mean_logit, log_sum_sq) if x is not None))
        ctx.set_materialize_grads(False)
        return logps, entropy, is_top1, mean_logit, log_sum_sq

    @staticmethod
    def backward(ctx, g_logp, g_ent, *_non_differentiable):
        if g_logp is None and g_ent is None:
            return None, None, None, None, None
        hidden, weight, bias, index, ref, log_s, mu = ctx.saved_tensors
        kept, ctx.kept = ctx.kept, None  # a second backward (retain_graph) recomputes: this one overwrites it
        backend, tr, _, _, _, _, rows, cols, _ = ctx.options
        _, fold_backward = FOLDS[backend]
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        n, V = hidden.shape[0], weight.shape[0]
        dtype = ctx.dtype
        f = dict(device=hidden.device, dtype=_acc_dtype(hidden))
        g = g_logp.to(f["dtype"]).contiguous() if g_logp is not None else torch.zeros(n, **f)
        ge = None if g_ent is None else g_ent.to(f["dtype"]).contiguous()
        mu = None if ge is None else mu
        tiles = _row_tiles(n, rows)
        buf = _tile_buffer(tiles[0][1] if tiles else 0, cols, V, hidden.device, dtype)
        # A gradient's first term is written rather than added to zeros (a (V, H) fill less) wherever the
        # tile's product is already in the accumulator's dtype; elsewhere it starts at zero.
        writes_first = bool(tiles) and dtype == f["dtype"]
        new = torch.empty if writes_first else torch.zeros
        dhidden = new(n, hidden.shape[1], **f) if need_h else None  # (n, H) float32
        dweight = dbias = dw = None
        if need_w and (kept is None or kept[1] is None):  # else the kept logits' buffer becomes dweight
            # float32 weights accumulate in place; 16-bit ones through a float32 (C, H) buffer per vocabulary
            # tile, unless one row tile makes the product a single term (rounded once, as autograd's would be)
            direct = weight.dtype == f["dtype"] or (len(tiles) == 1 and weight.dtype == dtype)
            # accumulated in place, or written slice by slice (16-bit, or the single term of one row tile)
            new = (
                torch.zeros
                if not tiles or (weight.dtype == f["dtype"] and dtype != f["dtype"])
                else torch.empty
            )
            dweight = new(weight.shape, device=weight.device, dtype=weight.dtype)
            dw = None if direct else torch.empty(min(cols, V), weight.shape[1], **f)
        if need_b:
            dbias = torch.zeros(V, **f)  # (V,) float32
        if kept is not None:
            return _backward_from_kept(*kept, hidden, weight, bias, index, ref, log_s, mu, g, ge, dhidden, dweight,
                                       dbias, buf, fold_backward, tr, cols)  # fmt: skip
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
                    fold_backward(a, index[rs], c0, ref[rs], log_s[rs], None if mu is None else mu[rs], g[rs],
                                  None if ge is None else ge[rs], tr)  # fmt: skip
                    if need_h:
                        if c0 == 0 and writes_first:
                            torch.mm(a, w, out=dhidden[rs])
                        else:
                            _add_mm(dhidden[rs], a, w)
                    if need_w:
                        if r0 == 0 and acc.dtype == a.dtype:
                            torch.mm(a.T, h, out=acc)  # the first row tile (the only one of a 16-bit weight)
                        else:
                            _add_mm(acc, a.T, h)
                    if need_b:
                        dbias[c0 : c0 + C] += a.sum(0, dtype=dbias.dtype)
                if dw is not None:
                    dweight[c0 : c0 + C].copy_(acc)
        return _gradients(dhidden, dweight, dbias, hidden, bias)


def _gradients(dhidden, dweight, dbias, hidden, bias):
    """`_HiddenLogProbs.backward`'s return: the gradients of (hidden, weight, bias, index, options)."""
    return (
        None if dhidden is None else dhidden.to(hidden.dtype),
        dweight,
        None if dbias is None else dbias.to(bias.dtype),
        None,  # index
        None,  # options
    )


def _backward_from_kept(kept, overlaid, hidden, weight, bias, index, ref, log_s, mu, g, ge, dhidden, dweight, dbias,
                        buf, fold_backward, tr, cols):  # fmt: skip
    """`_HiddenLogProbs.backward` from the kept logits (`_kept_blocks`): the same folds and products on the same
    tiles, in two passes over the vocabulary. Returns its gradients; overlaid, dweight is that buffer itself.
    (The kept path has one row tile in the accumulators' dtype, so dhidden's first term is written, as the other
    path does.)"""
    h_all = hidden.to(kept[0].dtype)
    with torch.autocast(hidden.device.type, enabled=False):
        for i, a in enumerate(kept):  # in order, as dhidden sums them; a: (n, C) logits, then dL/da in place
            c0 = i * cols
            w = weight[c0 : c0 + cols]
            fold_backward(a, index, c0, ref, log_s, mu, g, ge, tr)
            if dhidden is not None:
                if c0 == 0:
                    torch.mm(a, w, out=dhidden)
                else:
                    _add_mm(dhidden, a, w)
            if dbias is not None:
                dbias[c0 : c0 + w.shape[0]] += a.sum(0, dtype=dbias.dtype)
        if overlaid is not None:
            dweight = overlaid  # returned as it is, not as a view: autograd takes it as .grad without a copy
            # (and nothing else holds it: rl/logprobs.TiedWeight adds a tied embedding's rows into it in place)
        # overlaid, from the last tile: dweight's rows c0.. overlay this tile's block and later ones, never
        # earlier ones, so each block is first copied to the tile buffer; a tile of its own is read in place
        for i, a in reversed(list(enumerate(kept))) if dweight is not None else ():
            if overlaid is not None:
                a = buf[: a.shape[0], : a.shape[1]].copy_(a)
            torch.mm(a.T, h_all, out=dweight[i * cols : i * cols + a.shape[1]])
    return _gradients(dhidden, dweight, dbias, hidden, bias)


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
    # a multiple of ROW_ALIGN columns, so every vocabulary tile starts at an aligned column of the weight too
    return rows, max(1, TILE_ELEMENTS[kind] // max(1, min(rows, n)) // ROW_ALIGN) * ROW_ALIGN


def _logprobs_from_hidden(backend, hidden, weight, index, bias, temperature, logit_scale, softcap, mask, wanted,
                          rows_per_tile, vocab_per_tile):  # fmt: skip
    """wanted: (return_entropy, return_top1, return_mean_logit, return_log_sum_sq), as select_outputs takes them."""
    _check_inputs(hidden, weight, index, bias, temperature, logit_scale, softcap, mask)
    rows, h, idx = _flatten_valid(hidden, index, mask)
    _check_index_range(idx, weight.shape[0], rows)
    tile_rows, tile_cols = _tiles(hidden.device, h.shape[0], rows_per_tile, vocab_per_tile)
    tr = Transform(float(logit_scale), None if softcap is None else float(softcap), 1.0 / float(temperature))
    # every row masked still goes through the Function: zero gradients for weight and bias, not None, so DDP
    # sees every parameter used on a rank whose micro-batch has no target token
    # recorded: the call is on autograd's tape (a forward runs with grad mode off: it cannot tell otherwise)
    options = (backend, tr, *wanted, tile_rows, tile_cols, torch.is_grad_enabled())
    outputs = _unflatten(rows, index.shape, _HiddenLogProbs.apply(h, weight, bias, idx, options))
    return select_outputs(outputs[0], outputs[1:], wanted)


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
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
    rows_per_tile: int | None = None,
    vocab_per_tile: int | None = None,
):
    """Tiles with torch folds: hidden (..., H), weight (V, H), index (...) -> float32 logps (...) [, entropy]
    [, is_top1] [, mean_logit] [, log_sum_sq]. Any device and dtype (float64 included).

    Never builds the (N, V) logits: extra memory is one (rows_per_tile, vocab_per_tile) tile in the compute dtype
    and at most two float32 ones, plus the float32 gradient accumulators dhidden (N, H) and dweight (V, H) for
    the inputs that need them. Defaults: ROWS_PER_TILE / TILE_ELEMENTS for the device."""
    return _logprobs_from_hidden(
        "torch", hidden, weight, index, bias, temperature, logit_scale, softcap, mask,
        (return_entropy, return_top1, return_mean_logit, return_log_sum_sq), rows_per_tile, vocab_per_tile,
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
    return_mean_logit: bool = False,
    return_log_sum_sq: bool = False,
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
        (return_entropy, return_top1, return_mean_logit, return_log_sum_sq), rows_per_tile, vocab_per_tile,
    )  # fmt: skip
