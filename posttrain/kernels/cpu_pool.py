"""torch's CPU allocator with the large tensors in an address range of their own (cpu_pool.cpp).

Why: torch's default CPU allocator is glibc's malloc, whose main heap holds a training step's large tensors
(activations, gradients, 64 KiB to 32 MiB each) among the ~10,000 small C++ objects autograd makes a step (graph
nodes, tensor handles, under 1 KiB each). A small object placed in a freed tensor's block splits it, so the
next large tensor does not fit there and the heap grows: on benchmarks/reward.py's step, glibc's heap rose
~115 MiB above the live tensors' peak (benchmarks/results.md, session 22), while the same tensor allocations
replayed alone needed 15 MiB above it. Here blocks of MIN_BYTES or more come from a range no small object
enters, best fit, lowest address first, freed neighbours merged; smaller ones stay with glibc.

Freed pages stay resident and are reused, as glibc keeps them under `loop.keep_freed_cpu_memory` (no page
fault or zeroing per step), until more than TRIM_BYTES of them lie above the range's used part, or `release`
hands them back. Tensors report to torch's profiler as under the default allocator (`measure.TensorPeak`).

`install` is called by `loop.keep_freed_cpu_memory` (every loop's `loop.start`); it is process-wide, like
glibc's own settings, and lasts until `uninstall`, after which the pool's tensors still alive return to it
when freed. POSTTRAIN_CPU_POOL=0 leaves torch's allocator alone. Built once per source and compiler into
$POSTTRAIN_CACHE with the C++ compiler (the headers of the installed torch; ~1 s); without one, or off Linux,
`install` returns False and changes nothing. CUDA memory has torch's caching allocator and is not touched.
"""

from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

from posttrain.kernels import native

SOURCE = Path(__file__).with_name("cpu_pool.cpp")
MIN_BYTES = 64 << 10  # blocks this large or larger come from the pool
# free pages kept above the used part before they are handed back (glibc's trim threshold, as loop sets it)
TRIM_BYTES = 1 << 30
ENV = "POSTTRAIN_CPU_POOL"


def enabled() -> bool:
    """POSTTRAIN_CPU_POOL: unset or 1 uses the pool, 0 does not; anything else is an error naming it."""
    value = os.environ.get(ENV, "1")
    if value not in ("0", "1"):
        raise ValueError(f"{ENV}={value!r}: expected 0 (torch's default CPU allocator) or 1 (the pool)")
    return value == "1"


@functools.cache
def library() -> ctypes.CDLL | None:
    """The compiled pool, built on first use; None where it cannot be built or loaded (never raises)."""
    if not sys.platform.startswith("linux"):
        return None
    torch_dir = Path(torch.__file__).parent
    abi = int(torch.compiled_with_cxx11_abi())
    flags = [
        "-O2",
        "-std=c++17",
        "-fPIC",
        "-shared",
        f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
        f"-I{torch_dir / 'include'}",
    ]
    libs = [f"-L{torch_dir / 'lib'}", "-lc10", f"-Wl,-rpath,{torch_dir / 'lib'}"]
    size_t, p = ctypes.c_size_t, ctypes.c_void_p
    try:
        # torch's version in the flags' hash: a build against other headers is another file
        lib = native._build_and_load(SOURCE, [*flags, f"-DPOSTTRAIN_TORCH={torch.__version__}"], cxx=True,
                                     libs=libs, openmp=False)  # fmt: skip
        if lib is None:
            return None
        for name, argtypes, restype in (
            ("cpu_pool_install", [size_t, size_t, size_t], ctypes.c_int),
            ("cpu_pool_uninstall", [], None),
            ("cpu_pool_installed", [], ctypes.c_int),
            ("cpu_pool_stats", [p], None),
            ("cpu_pool_release", [], size_t),
        ):
            function = getattr(lib, name)
            function.argtypes, function.restype = argtypes, restype
    except Exception:
        return None
    return lib


def _physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def install(
    min_bytes: int = MIN_BYTES, trim_bytes: int = TRIM_BYTES, reserve_bytes: int | None = None
) -> bool:
    """Make the pool torch's CPU allocator for tensors of min_bytes or more; True if it now is.

    reserve_bytes: the address range reserved at the first install (default: the machine's physical memory;
    later installs keep the first range). A tensor the range cannot hold comes from torch's default allocator."""
    lib = library() if enabled() else None
    if lib is None:
        return False
    reserve = _physical_memory() if reserve_bytes is None else reserve_bytes
    return bool(lib.cpu_pool_install(reserve, min_bytes, trim_bytes))


def uninstall() -> None:
    """Give torch back its default CPU allocator (the pool's live tensors return to the pool when freed)."""
    lib = library()
    if lib is not None:
        lib.cpu_pool_uninstall()


def installed() -> bool:
    lib = library()
    return lib is not None and bool(lib.cpu_pool_installed())


def stats() -> dict:
    """The pool's state in bytes: base (the range's address; 0 before the first install), reserved, top (the used
    part: every byte above it is free), resident (top's high-water mark since the last hand-back), in_use,
    free_blocks (below top)."""
    lib = library()
    values = (ctypes.c_size_t * 6)()
    if lib is not None:
        lib.cpu_pool_stats(values)
    names = ("base", "reserved", "top", "resident", "in_use", "free_blocks")
    return dict(zip(names, values, strict=True))


def release() -> int:
    """Hand the free pages above the used part back to the kernel; returns their bytes."""
    lib = library()
    return 0 if lib is None else int(lib.cpu_pool_release())
