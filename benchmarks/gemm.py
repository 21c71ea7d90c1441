"""The CPU's float32 matmul rate by library: torch's default (MKL's sgemm) against oneDNN, on the benchmarks' shapes.

    python benchmarks/gemm.py            # the SFT benchmark model's training and decode shapes, two threads
    python benchmarks/gemm.py --threads 1

Every compute floor in benchmarks/ (`posttrain.measure`) divides a step's FLOPs by the rate of `torch.mm`, which
on the CPU is MKL's sgemm. This script asks whether that rate is the machine's: each product x (M, K) @ W.T,
W (N, K), is timed three ways, each the median of `--repeats` calls after warm-up, in the same process:

    mkl          torch.mm(x, W.T): what nn.Linear, autograd and the floors run;
    onednn       torch.ops.mkldnn._linear_pointwise(x, W): oneDNN's matmul (the library torch's inductor uses for
                 CPU linears) on the plain weight, reordered on every call;
    onednn packed  the same on a weight reordered once for M rows (`torch.ops.mkldnn._reorder_linear_weight`),
                 the form an inference loop would keep (the reorder's own time is printed beside it).

Both oneDNN ops are private to torch (no stability promise): the script only measures, and says so when they are
missing. The largest relative difference of each oneDNN product against a float64 product is printed (float32
rounding: ~1e-6).

Shapes (the SFT benchmark's Qwen2: H = 256, I = 1024, V = 32000): the body's linear maps at 768 and 2048 rows
(the online loops' and the SFT step's tokens), forward and both backward products; the fused log-prob kernel's
output-layer tile (256 rows x 4096 vocabulary entries); a decode step's products at 8 and 32 rows, its output
layer included.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

H, FFN, V = 256, 1024, 32000  # FFN: I in the notation
SHAPES = [  # (what, M, K, N)
    ("body fwd: x @ W_up.T", 768, H, FFN),
    ("body fwd: x @ W_down.T", 768, FFN, H),
    ("body bwd: dY.T @ X (dW of W_down)", H, 768, FFN),
    ("body bwd: dY.T @ X (dW of W_up)", FFN, 768, H),
    ("SFT body fwd: x @ W_up.T", 2048, H, FFN),
    ("head tile: h @ W_tile.T", 256, H, 4096),
    ("decode: x @ W_up.T", 8, H, FFN),
    ("decode: x @ W_down.T", 8, FFN, H),
    ("decode: output layer", 8, H, V),
    ("decode: x @ W_up.T", 32, H, FFN),
    ("decode: output layer", 32, H, V),
]


def median_ms(fn, repeats: int) -> float:
    return common.median(common.time_steps(fn, repeats, warmup=3)) * 1e3


def cpu_line() -> str:
    flags = ""
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            info = f.read()
        model = next(
            (line.split(":", 1)[1].strip() for line in info.splitlines() if "model name" in line), "?"
        )
        flags = f"{model}; avx512f {'yes' if ' avx512f' in info else 'no'}, avx2 {'yes' if ' avx2' in info else 'no'}"
    blas = "MKL" if torch.backends.mkl.is_available() else "not MKL"
    return (
        f"{platform.machine()} {flags}; torch's BLAS: {blas}; oneDNN: {torch.backends.mkldnn.is_available()}"
    )


def compare(what: str, M: int, K: int, N: int, repeats: int) -> list[str]:
    """One table row: x (M, K) @ W.T, W (N, K), by MKL, oneDNN and oneDNN on a packed weight."""
    ops = torch.ops.mkldnn
    x, W = torch.randn(M, K), torch.randn(N, K)
    exact = x.double() @ W.double().T
    t0 = time.perf_counter()
    packed = ops._reorder_linear_weight(W, M)
    reorder_ms = (time.perf_counter() - t0) * 1e3

    def onednn(w):
        return ops._linear_pointwise(x, w, None, "none", [], "")

    def err(y):
        return float((y.double() - exact).abs().max() / exact.abs().max())

    mkl = median_ms(lambda: torch.mm(x, W.T), repeats)
    plain = median_ms(lambda: onednn(W), repeats)
    fast = median_ms(lambda: onednn(packed), repeats)
    gflop = 2 * M * K * N / 1e9
    return [
        what, f"{M} x {K} x {N}", f"{mkl:.3f} ({gflop / mkl * 1e3:.0f})", f"{plain:.3f} ({gflop / plain * 1e3:.0f})",
        f"{fast:.3f} ({gflop / fast * 1e3:.0f})", f"{reorder_ms:.2f}", f"{mkl / plain:.2f}", f"{mkl / fast:.2f}",
        f"{err(onednn(W)):.1e} / {err(onednn(packed)):.1e}",
    ]  # fmt: skip


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(common.machine_line())
    print(cpu_line())
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        print("oneDNN's linear op is not in this torch build: nothing to compare")
        return
    torch.manual_seed(0)
    rows = [compare(what, M, K, N, args.repeats) for what, M, K, N in SHAPES]
    header = [
        "product", "M x K x N", "mkl ms (GFLOP/s)", "onednn ms (GFLOP/s)", "onednn packed ms (GFLOP/s)",
        "reorder ms", "mkl / onednn", "mkl / packed", "rel. error onednn / packed",
    ]  # fmt: skip
    print(common.markdown_table(header, rows))


if __name__ == "__main__":
    main()
