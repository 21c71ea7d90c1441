"""CPU kernels in C (native.c), compiled on first use with the system's C compiler: the output layer's folds.

`kernels/hidden.py`'s torch folds run each vocabulary tile through five to nine torch ops (max, subtract, exp,
row sums, arg-max, ...), each a pass over the tile with its own dispatch; at benchmarks/dpo.py's shape (1024 x
1024 tiles, 32 of them a pass) they cost about as much as the tiles' products. native.c does a tile row in two
reads, vectorised and split between threads: a forward fold in ~0.3 ms where the torch ops take 1.2-2.2.

Used by the torch folds for float32 CPU tiles without a softcap (`fold_forward` and `fold_backward` return
False where they do not apply, and the torch ops run). The library is built once per source, compiler and CPU
into $POSTTRAIN_CACHE (`posttrain.cache`) with `$CC -O3 -march=native` (OpenMP where the compiler has it);
without a working compiler, or with POSTTRAIN_NATIVE=0, everything runs as torch ops.
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
from pathlib import Path

import torch

from posttrain.cache import cache_dir

SOURCE = Path(__file__).with_name("native.c")
FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fPIC", "-shared"]

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


def _compile(cc: list[str], out: Path) -> bool:
    """Build native.c into `out` (OpenMP if the compiler has it, else one thread); True on success."""
    for extra in (["-fopenmp"], []):
        try:
            done = subprocess.run([*cc, *FLAGS, *extra, str(SOURCE), "-o", str(out), "-lm"], capture_output=True,
                                  timeout=120)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            return False
        if done.returncode == 0:
            return True
    return False


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built on first use; None where they cannot be built or loaded (never raises: the
    torch ops serve instead)."""
    try:
        return _build_and_load()
    except Exception:  # no home folder, a read-only cache, a compiler that built something else, ...
        return None


def _build_and_load() -> ctypes.CDLL | None:
    # $CC may carry words ("ccache gcc"); else the first compiler on the PATH
    found = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    cc = shlex.split(os.environ.get("CC", "")) or ([found] if found else [])
    if not cc or not SOURCE.exists():
        return None
    key = hashlib.sha256(
        "\0".join([SOURCE.read_text(), *cc, " ".join(FLAGS), platform.machine(), _cpu_identity()]).encode()
    ).hexdigest()[:16]
    cache = cache_dir()
    path = cache / f"native-{key}.so"
    if not path.exists():
        cache.mkdir(parents=True, exist_ok=True)
        # built under a temporary name and renamed: concurrent processes never load a half-written file
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            built = Path(tmp) / path.name
            if not _compile(cc, built):
                return None
            os.replace(built, path)
    lib = ctypes.CDLL(str(path))
    p, i64, f32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float
    lib.fold_forward.argtypes = [p, i64, i64, i64, p, i64, f32, p, p, p, p, p, p, p, ctypes.c_int]
    lib.fold_forward.restype = None
    lib.fold_backward.argtypes = [p, i64, i64, i64, p, i64, f32, f32, p, p, p, p, p, ctypes.c_int]
    lib.fold_backward.restype = None
    return lib


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
