"""CPU kernels in C, compiled on first use with the system's C compiler: the output layer's folds (native.c), and
the SwiGLU MLP's elementwise work with torch's own numbers (native_exact.c).

`kernels/hidden.py`'s torch folds run each vocabulary tile through five to nine torch ops (max, subtract, exp,
row sums, arg-max, ...), each a pass over the tile with its own dispatch; at benchmarks/dpo.py's shape (1024 x
1024 tiles, 32 of them a pass) they cost about as much as the tiles' products. native.c does a tile row in two
reads, vectorised and split between threads: a forward fold in ~0.3 ms where the torch ops take 1.2-2.2.

Used by the torch folds for float32 CPU tiles without a softcap (`fold_forward` and `fold_backward` return
False where they do not apply, and the torch ops run). The library is built once per source, compiler and CPU
into $POSTTRAIN_CACHE (`posttrain.cache`) with `$CC -O3 -march=native` (OpenMP where the compiler has it);
without a working compiler, or with POSTTRAIN_NATIVE=0, everything runs as torch ops.

The SwiGLU kernels (`swiglu_forward`, `swiglu_backward`: rl/swiglu.py's MLP, one pass each way where torch makes
two and five) reproduce torch's ops bit for bit, so that a run's numbers do not depend on whether they ran: SLEEF's
exp where torch's vectorised loops use it, libm's in the scalar remainders torch's chunking leaves, the fused
multiply-adds torch's build makes. They are built with -ffp-contract=off and used only after they have matched
torch's ops on lengths that exercise all of that (`exact_library`); on DPO's benchmark step they save 1-3 % of
its 0.45-0.6 s (benchmarks/results.md, session 20).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shlex
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from posttrain.cache import cache_dir

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]
# torch's numbers bit for bit: no multiply-add fused but those the source writes out
EXACT_SOURCE, EXACT_FLAGS = Path(__file__).with_name("native_exact.c"), [*FLAGS, "-ffp-contract=off"]
# torch's vectorised elementwise loops work in blocks of two vectors of floats
_BLOCK = {"AVX512": 32, "AVX2": 16}

# Switched off by POSTTRAIN_NATIVE=0; tests flip it to run the torch ops themselves.
enabled = os.environ.get("POSTTRAIN_NATIVE", "1") != "0"


def _cpu_identity() -> str:
    """The CPU's model and feature flags: a library built with -march=native runs only where they match."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        return platform.processor()
    keep = [ln for ln in lines if ln.split(":")[0].strip() in ("model name", "flags", "Features")]
    return "\n".join(sorted(set(keep)))


def _compile(
    cc: list[str], source: Path, flags: list[str], out: Path, libs: Sequence[str], openmp: bool
) -> bool:
    """Build `source` into `out` (OpenMP if asked for and the compiler has it, else one thread); True on success."""
    for extra in (["-fopenmp"], []) if openmp else ([],):
        try:
            done = subprocess.run([*cc, *flags, *extra, str(source), "-o", str(out), *libs], capture_output=True,
                                  timeout=120)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode == 0:
            return True
    return False


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled folds (native.c), built on first use; None where they cannot be built or loaded (never
    raises: the torch ops serve instead)."""
    p, i64, f32, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
    return _load(SOURCE, FLAGS, {
        "fold_forward": [p, i64, i64, i64, p, i64, f32, p, p, p, p, p, p, p, i32],
        "fold_backward": [p, i64, i64, i64, p, i64, f32, f32, p, p, p, p, p, i32],
    })  # fmt: skip


def _load(source: Path, flags: list[str], functions: dict[str, list]) -> ctypes.CDLL | None:
    """`source` built and loaded, its `functions` given their argument types (all return void); None where that
    fails, never an exception: no home folder, a read-only cache, a compiler that built something else, ..."""
    try:
        lib = _build_and_load(source, flags)
        for name, argtypes in () if lib is None else functions.items():
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, None
    except Exception:
        return None
    return lib


def _build_and_load(
    source: Path, flags: list[str], *, cxx: bool = False, libs: Sequence[str] = ("-lm",), openmp: bool = True
) -> ctypes.CDLL | None:
    # $CC / $CXX may carry words ("ccache gcc"); else the first compiler on the PATH
    names = ("c++", "g++", "clang++") if cxx else ("cc", "gcc", "clang")
    found = next(filter(None, map(shutil.which, names)), None)
    cc = shlex.split(os.environ.get("CXX" if cxx else "CC", "")) or ([found] if found else [])
    if not cc or not source.exists():
        return None
    key = hashlib.sha256(
        "\0".join(
            [source.read_text(), *cc, " ".join([*flags, *libs]), platform.machine(), _cpu_identity()]
        ).encode()
    ).hexdigest()[:16]
    cache = cache_dir()
    path = cache / f"{source.stem}-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # built under a temporary name and renamed: concurrent processes never load a half-written file
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / path.name
            if not _compile(cc, source, flags, built, libs, openmp):
                return None
            os.replace(built, path)
    return ctypes.CDLL(str(path))


def available() -> bool:
    """Whether the kernels run in C in this process."""
    return enabled and library() is not None


def _applies(a: torch.Tensor, index: torch.Tensor, softcap, vectors) -> bool:
    """A float32 CPU tile with unit column stride, no softcap, and contiguous float32 / int64 row vectors."""
    return (
        enabled
        and softcap is None
        and a.device.type == "cpu"
        and a.dtype == torch.float32
        and index.dtype == torch.int64
        and (a.stride(1) == 1 or a.shape[1] <= 1)
        and all(x is None or (x.is_contiguous() and x.device.type == "cpu") for x in vectors)
        and library() is not None
    )


def _ptr(x):
    return None if x is None else x.data_ptr()


def fold_forward(a, index, c0, stats, tr, want_entropy) -> bool:
    """`hidden._fold_forward_torch`'s fold of tile a (R, C) into stats (m, s, t, target, arg, u_sum, sq), reading a
    and not writing it; False (nothing done) where it does not apply."""
    m, s, t, target, arg, u_sum, sq = stats
    if not _applies(a, index, tr.softcap, (index, *stats)) or m.dtype != torch.float32 or len(a) == 0:
        return False
    library().fold_forward(
        a.data_ptr(), a.shape[0], a.shape[1], a.stride(0), index.data_ptr(), c0, tr.k,
        *(_ptr(x) for x in (m, s, t if want_entropy else None, target, arg, u_sum, sq)), torch.get_num_threads(),
    )  # fmt: skip
    return True


def fold_backward(a, index, c0, ref, log_s, mu, g, ge, tr) -> bool:
    """`hidden._fold_backward_torch`: tile a (R, C) overwritten with dL/da in place; False where it does not apply."""
    if (
        not _applies(a, index, tr.softcap, (index, ref, log_s, mu, g, ge))
        or ref.dtype != torch.float32
        or len(a) == 0
    ):
        return False
    library().fold_backward(
        a.data_ptr(), a.shape[0], a.shape[1], a.stride(0), index.data_ptr(), c0, tr.k, tr.logit_scale * tr.inv_t,
        *(_ptr(x) for x in (ref, log_s, mu, g, ge)), torch.get_num_threads(),
    )  # fmt: skip
    return True


def exact_library() -> ctypes.CDLL | None:
    """The kernels of native_exact.c, built on first use, where they give torch's numbers: checked against torch's
    ops bit for bit once per thread count (torch's chunking depends on it), on this torch build and CPU. None
    where they cannot be built, loaded or agree."""
    lib = _exact_built()
    return lib if lib is not None and _agrees(lib, torch.get_num_threads()) else None


@functools.cache
def _exact_built() -> ctypes.CDLL | None:
    block = _BLOCK.get(torch.backends.cpu.get_cpu_capability())
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib = None if block is None else _load(EXACT_SOURCE, EXACT_FLAGS, {
        "swiglu_forward": [p, p, p, i64, i32, i32, i32],
        "swiglu_backward": [p, p, p, p, p, i64, i32, i32, i32],
        "rmsnorm_forward": [p, p, p, p, i64, i64, ctypes.c_float, i32],
        "rmsnorm_backward": [p, p, p, p, p, p, p, i64, i64, i32],
        "rope_forward": [p, p, p, p, i64, i64, i64, i64, p, p, i32],
        "rope_backward": [p, p, p, p, i64, i64, i64, i64, p, p, i32],
    })  # fmt: skip
    if lib is not None:
        lib.block = block
    return lib


@functools.cache
def _agrees(lib, threads: int) -> bool:
    """The SwiGLU kernels against torch's ops at `threads` (torch's current count), bit for bit (NaN as NaN):
    - random inputs over exp's whole range and its edges, on lengths of one chunk and of several;
    - inputs whose every element is one where libm's exp and SLEEF's give another silu (about 4 % of floats), on
      lengths that leave remainders of every size, in one chunk and in threads - 1 to threads + 3 chunks: an
      element given the wrong exp, by a chunk or block boundary placed otherwise than torch places it, shows."""
    g = torch.Generator().manual_seed(0)
    nan, inf = float("nan"), float("inf")
    chunked = [
        k * 32768 + r
        for k, r in zip(range(max(threads - 1, 1), threads + 4), (37, 45, 29, 3, 61), strict=False)
    ]
    for n in (*range(6, 129, 7), *chunked):
        x = torch.randn(n, generator=g) * 12
        x[:6] = torch.tensor([0.0, -0.0, 104.5, -104.5, inf, nan])
        if not _same_as_ops(lib, x, torch.randn(n, generator=g), torch.randn(n, generator=g)):
            return False
    sample = torch.randn(32768, generator=g) * 8  # one chunk, every element vectorised
    scalar, vector = torch.empty_like(sample), torch.empty_like(sample)
    for out, block in ((scalar, 1 << 30), (vector, lib.block)):
        lib.swiglu_forward(sample.data_ptr(), torch.ones_like(sample).data_ptr(), out.data_ptr(), len(sample), 1,
                           block, 1)  # fmt: skip
    sensitive = sample[scalar.view(torch.int32) != vector.view(torch.int32)]
    if len(sensitive) < 64:  # the two exps agree nearly everywhere: nothing to place, nothing to check
        return False
    for n in (*range(1, 65), *chunked):
        x = sensitive[torch.arange(n) % len(sensitive)]
        if not _same_as_ops(lib, x, torch.ones(n), torch.ones(n)):
            return False
    return True


def _same_as_ops(lib, x, u, dy) -> bool:
    a = torch.nn.functional.silu(x)
    want = (a * u, torch.ops.aten.silu_backward(dy * u, x), dy * a)
    h = _swiglu_forward(lib, x, u)
    h2, dg, du = _swiglu_backward(lib, x, u, dy.clone())
    _, dg2, du2 = _swiglu_backward(lib, x, u.clone(), dy.clone(), want_h=False, du_into_u=True)
    for got, ref in zip((h, h2, dg, du, dg2, du2), (want[0], *want, *want[1:]), strict=True):
        same = (got.view(torch.int32) == ref.view(torch.int32)) | (got.isnan() & ref.isnan())
        if not bool(same.all()):
            return False
    return True


def _swiglu_forward(lib, g, u):
    h = torch.empty_like(g)
    n, t = g.numel(), torch.get_num_threads()
    lib.swiglu_forward(g.data_ptr(), u.data_ptr(), h.data_ptr(), n, t, lib.block, t)
    return h


def _swiglu_backward(lib, g, u, dh, want_h=True, du_into_u=False):
    h = torch.empty_like(g) if want_h else None
    du = u if du_into_u else torch.empty_like(g)
    n, t = g.numel(), torch.get_num_threads()
    lib.swiglu_backward(
        g.data_ptr(), u.data_ptr(), dh.data_ptr(), None if h is None else h.data_ptr(), du.data_ptr(), n, t,
        lib.block, t,
    )  # fmt: skip
    return h, dh, du


def _exact(*xs: torch.Tensor) -> ctypes.CDLL | None:
    """The exact kernels for `xs`: plain float32 CPU tensors of one shape, contiguous, outside autograd (a backward
    that builds a graph, create_graph, takes the ops), the kernels checked at this thread count; else None."""
    applies = (
        enabled
        and not torch.is_grad_enabled()
        and all(type(x) is torch.Tensor for x in xs)
        and all(x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() for x in xs)
        and all(x.shape == xs[0].shape for x in xs)
        and xs[0].numel() > 0
    )
    return exact_library() if applies else None


def swiglu_forward(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """silu(g) * u (..., I), the numbers of torch's two ops, in one pass; None where it does not apply (float32
    contiguous CPU tensors of one shape, the exact kernels built and agreeing)."""
    lib = _exact(g, u)
    return None if lib is None else _swiglu_forward(lib, g, u)


def swiglu_backward(g: torch.Tensor, u: torch.Tensor, dh: torch.Tensor, *, want_h=True, du_into_u=False):
    """(h, dg, du) = (silu(g) * u, silu_backward(dh * u, g), dh * silu(g)), torch's numbers, in one pass; dg is
    written over dh, which must share memory with nothing else (a fresh product); h is None unless `want_h`; du
    is written over u with `du_into_u` (for a u nothing reads afterwards). None (dh untouched) where it does not
    apply."""
    lib = _exact(g, u, dh)
    return None if lib is None else _swiglu_backward(lib, g, u, dh, want_h, du_into_u)


# The RMSNorm kernels sum rows as torch's inner sums do from 8 floats on; from 2^15 floats a row alone is summed
# by several threads.
NORM_WIDTHS = range(8, 16385)


def _norm_library(x: torch.Tensor, weight: torch.Tensor, *more: torch.Tensor) -> ctypes.CDLL | None:
    """The exact kernels for an RMSNorm over x's last dimension (its rows of n floats) with weight (n,): x and
    `more` plain float32 contiguous CPU tensors of x's shape, weight too (or a Parameter), n in NORM_WIDTHS, the
    kernels agreeing with torch's ops at n; else None."""
    n = x.shape[-1] if x.dim() else 0
    applies = (
        enabled
        and n in NORM_WIDTHS
        and x.numel() > 0
        and all(type(t) is torch.Tensor for t in (x, *more))
        and type(weight) in (torch.Tensor, torch.nn.Parameter)
        and weight.shape == (n,)
        and all(t.shape == x.shape for t in more)
        and all(
            t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()
            for t in (x, weight, *more)
        )
    )
    lib = _exact_built() if applies else None
    return lib if lib is not None and _norm_agrees(lib, n, torch.get_num_threads()) else None


def rmsnorm_applies(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether `rmsnorm_forward` runs for these tensors (and `rmsnorm_backward` then, outside grad mode)."""
    return _norm_library(x, weight) is not None


def rmsnorm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float):
    """(y, r): y = weight * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)) (..., n), the numbers of those
    torch ops, and r (..., 1) the rsqrt; None where it does not apply (`rmsnorm_applies`)."""
    lib = _norm_library(x, weight)
    return None if lib is None else _rmsnorm_forward(lib, x, weight, eps)


def rmsnorm_backward(
    dy: torch.Tensor, x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor, weight_grad: bool
):
    """The gradients autograd gives through `rmsnorm_forward`'s ops, given dy: x's in its two parts (through
    x * r, then through x.pow(2): autograd adds them into x's gradient in that order) and the weight's (None
    unless `weight_grad`). None where it does not apply, and in grad mode (create_graph)."""
    lib = None if torch.is_grad_enabled() else _norm_library(x, weight, dy)
    return None if lib is None else _rmsnorm_backward(lib, dy, x, r, weight, weight_grad)


def _rmsnorm_forward(lib, x, weight, eps):
    n = x.shape[-1]
    y, r = torch.empty_like(x), x.new_empty((*x.shape[:-1], 1))
    lib.rmsnorm_forward(x.data_ptr(), weight.data_ptr(), y.data_ptr(), r.data_ptr(), x.numel() // n, n, eps,
                        torch.get_num_threads())  # fmt: skip
    return y, r


def _rmsnorm_backward(lib, dy, x, r, weight, weight_grad):
    n = x.shape[-1]
    dx_mul, dx_pow = torch.empty_like(x), torch.empty_like(x)
    # dy * (x * r), summed over the rows as autograd sums it
    prod = torch.empty_like(x) if weight_grad else None
    lib.rmsnorm_backward(dy.data_ptr(), x.data_ptr(), r.data_ptr(), weight.data_ptr(), dx_mul.data_ptr(),
                         dx_pow.data_ptr(), _ptr(prod), x.numel() // n, n, torch.get_num_threads())  # fmt: skip
    return dx_mul, dx_pow, None if prod is None else prod.sum_to_size(weight.shape)


@functools.cache
def _norm_agrees(lib, n: int, threads: int) -> bool:
    """The RMSNorm kernels against torch's ops at row width n, bit for bit: the forward, and x's and the weight's
    gradients as autograd sums them, x's after a later use of x (a residual connection's) has given its part."""
    g = torch.Generator().manual_seed(0)
    x, dy, later = (torch.randn(3, 5, n, generator=g, dtype=torch.float32) * 3 for _ in range(3))
    weight = torch.randn(n, generator=g, dtype=torch.float32)
    with torch.enable_grad():
        xr, wr = x.clone().requires_grad_(), weight.clone().requires_grad_()
        want = wr * (xr * torch.rsqrt(xr.pow(2).mean(-1, keepdim=True) + 1e-6))
        torch.autograd.backward([want, xr * later], [dy, torch.ones_like(x)])
    y, r = _rmsnorm_forward(lib, x, weight, 1e-6)
    dx_mul, dx_pow, dweight = _rmsnorm_backward(lib, dy, x, r, weight, True)
    pairs = ((y, want.detach()), ((later + dx_mul) + dx_pow, xr.grad), (dweight, wr.grad))
    return all(torch.equal(a.view(torch.int32), b.view(torch.int32)) for a, b in pairs)


def _rope_library(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> ctypes.CDLL | None:
    """The exact kernels for the rotary embedding of x (b, h, t, d) by cos, sin (b or 1, t, d): float32 CPU tensors,
    x (a plain tensor) dense in memory (`_dense`: the output takes its strides) with unit stride over d, d even,
    cos and sin alike with unit stride over d; else None."""
    applies = (
        enabled
        and x.dim() == 4
        and cos.dim() == 3
        and x.shape[-1] % 2 == 0
        and x.numel() > 0
        and type(x) is torch.Tensor
        and all(
            type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32
            for t in (x, cos, sin)
        )
        and cos.shape == sin.shape
        and cos.stride() == sin.stride()
        and cos.shape[0] in (1, x.shape[0])
        and cos.shape[1:] == x.shape[2:]
        and x.stride(-1) == 1
        and _dense(x)
        and cos.stride(-1) == 1
    )
    lib = _exact_built() if applies else None
    return lib if lib is not None and _rope_agrees(lib) else None


def _dense(x: torch.Tensor) -> bool:
    """x's elements fill its memory once each, in any order of its dimensions (torch.empty_like keeps its
    strides): no gaps (a slice of a wider tensor), no element twice (an expanded one)."""
    expected = 1
    for size, stride in sorted(
        ((n, s) for n, s in zip(x.shape, x.stride(), strict=True) if n != 1), key=lambda t: t[1]
    ):
        if stride != expected:
            return False
        expected *= size
    return True


def rope_applies(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return _rope_library(x, cos, sin) is not None


def _cos_strides(cos, x):
    return (ctypes.c_int64 * 2)(cos.stride(0) if cos.shape[0] == x.shape[0] else 0, cos.stride(1))


def rope_forward(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x * cos + rotate_half(x) * sin (b, h, t, d), cos and sin (b or 1, t, d) broadcast over h, the numbers of
    those torch ops and their layout (x's); None where it does not apply (`rope_applies`)."""
    lib = _rope_library(x, cos, sin)
    return None if lib is None else _rope_forward(lib, x, cos, sin)


def rope_backward(g: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor | None:
    """x's gradient through `rope_forward`'s ops given g (b, h, t, d), contiguous as autograd's; None where it does
    not apply, and in grad mode (create_graph)."""
    lib = None if torch.is_grad_enabled() else _rope_library(g, cos, sin)
    return None if lib is None else _rope_backward(lib, g, cos, sin)


def _rope_forward(lib, x, cos, sin):
    # as torch's product, laid out as x (a transposed view of the projection's output)
    out = torch.empty_like(x)
    lib.rope_forward(x.data_ptr(), cos.data_ptr(), sin.data_ptr(), out.data_ptr(), *x.shape,
                     (ctypes.c_int64 * 3)(*x.stride()[:3]), _cos_strides(cos, x), torch.get_num_threads())  # fmt: skip
    return out


def _rope_backward(lib, g, cos, sin):
    gx = torch.empty(g.shape, dtype=torch.float32)  # contiguous, as autograd's
    lib.rope_backward(g.data_ptr(), cos.data_ptr(), sin.data_ptr(), gx.data_ptr(), *g.shape,
                      (ctypes.c_int64 * 3)(*g.stride()[:3]), _cos_strides(cos, g), torch.get_num_threads())  # fmt: skip
    return gx


def rope_ops(x, cos, sin):
    """The rotary embedding as transformers' Llama family writes it (cos and sin unsqueezed at dimension 1)."""
    half = x.shape[-1] // 2
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return (x * cos) + (torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin)


@functools.cache
def _rope_agrees(lib) -> bool:
    """The rotary kernels against torch's ops, bit for bit (signed zeros too): on x laid out as a projection's
    transposed output, cos broadcast over the batch and per row, gradients with and without zeros."""
    g = torch.Generator().manual_seed(0)
    for b_cos in (1, 3):
        x = torch.randn(3, 7, 4, 10, generator=g, dtype=torch.float32).transpose(1, 2)
        cos, sin = (torch.randn(b_cos, 7, 10, generator=g, dtype=torch.float32) for _ in range(2))
        dout = torch.randn(3, 4, 7, 10, generator=g, dtype=torch.float32)
        dout[torch.rand(dout.shape, generator=g) < 0.3] = -0.0
        sin[:, :, ::3] = 0.0
        with torch.enable_grad():
            xr = x.detach().requires_grad_()
            want = rope_ops(xr, cos, sin)
            (dx,) = torch.autograd.grad(want, xr, dout)
        for a, b in (
            (_rope_forward(lib, x, cos, sin), want.detach()),
            (_rope_backward(lib, dout, cos, sin), dx),
        ):
            if a.stride() != b.stride() or not torch.equal(a.view(torch.int32), b.view(torch.int32)):
                return False
    return True
