"""Log-softmax gathering kernels side by side: time and peak extra memory, ours against naive torch and TRL.

Notation: N rows, V vocabulary, H hidden size (896, Qwen2.5-0.5B's).

    python benchmarks/kernels.py            # CPU: N in {1k, 4k} x V in {32k, 152k}, both paths
    python benchmarks/kernels.py --full     # N in {1k, 4k, 16k} everywhere (default on a GPU)
    python benchmarks/kernels.py --quick    # smoke run: N = 1k, V = 32k
    python benchmarks/kernels.py --ns 16k,4k --skip compiled   # some rows, in that order; some methods left out

Logits path, input logits (N, V), output per-row log-probs (N,), backward of their sum:
  naive          logits.log_softmax(-1).gather(-1, index)             (the (N, V) log-probs exist)
  compiled       torch.compile of naive (the compile itself is in the warm-up, not in the times)
  trl            trl.trainer.utils.selective_log_softmax (TRL 1.16; on CUDA it runs TRL's Triton kernel)
  trl-entropy    trl.kernels.logprob_entropy.selective_log_softmax_and_entropy (CUDA only, Triton)
  ours           posttrain.kernels.logprobs_from_logits (chunked torch on the CPU, Triton on CUDA)
  ours-inplace   the same with inplace_backward=True: the gradient overwrites the logits buffer
Hidden path, inputs hidden (N, H) and weight (V, H), the logits never built by ours / trl-chunked:
  naive          (hidden @ weight.T).log_softmax(-1).gather(-1, index)
  trl-chunked    trl.kernels.ChunkedLogProbFunction (TRL 1.16; torch tiles on the CPU, Triton on CUDA)
  ours           posttrain.kernels.logprobs_from_hidden (torch.mm tiles; Triton folds on CUDA, torch on the CPU)

Columns: median seconds of the forward and of forward + backward (after warm-up), each next to its floor
(`floor_seconds`: logits path, the bytes it must move at the rate of a copy; hidden path, the matmul FLOPs at
the rate of one matmul; both rates measured in the same process); the peak extra memory of a
no-grad forward and of forward + backward (CPU: the kernel's resident-set high-water mark VmHWM, reset
through /proc/self/clear_refs before the call, minus the resident set before it; CUDA:
torch.cuda.max_memory_allocated minus the allocated memory before), counting everything the call allocates,
the gradient of the inputs included, not the inputs; each ratio to naive in the same cell. On CUDA also the
achieved bandwidth (forward reads the logits once; forward + backward reads them twice and writes the
gradient once) next to a device-to-device copy measured in the same run. A method whose forward + backward
would need more than 60% of the memory prints "skip (mem)" (`peak_bytes`), with no ratio to naive when naive
is the one skipped; on the CPU the hidden path skips N x V above 4k x 152k (16k x 152k: 4.4 TFLOP a forward,
minutes a call). Each (method, cell) runs in its own fresh process (benchmarks/common.py
`run_side`), and its memory is read on a call after the warm-up and timed ones, so one-time initialisation
(thread pools, compilation) is not counted. On the CPU, TRL's selective_log_softmax loops over rows in
Python; it runs only at N = 1k unless --full.
"""

from __future__ import annotations

import argparse
import functools
import gc
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import posttrain.kernels as kernels  # noqa: E402

H = 896
K = 1024  # N = 1k means 1024 rows
VOCABS = {"32k": 32000, "152k": 151936}


# ---------------------------------------------------------------------------------------------------------
# The methods: each builds fresh leaf inputs and returns (forward, forward_backward) closures
# ---------------------------------------------------------------------------------------------------------


def naive_logits(logits, index):
    return logits.log_softmax(-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)


def naive_hidden(hidden, weight, index):
    return naive_logits(hidden @ weight.T, index)


_compiled = None


def compiled_logits(logits, index):
    global _compiled
    if _compiled is None:
        _compiled = torch.compile(naive_logits, dynamic=True)
    return _compiled(logits, index)


def trl_logits(logits, index):
    from trl.trainer.utils import selective_log_softmax

    return selective_log_softmax(logits, index)


def trl_entropy_logits(logits, index):
    from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy

    return selective_log_softmax_and_entropy(logits, index)[0]


def trl_chunked_hidden(hidden, weight, index):
    from trl.kernels import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, index, 1.0, 32768, None, 1.0, ())[0]


def ours_logits(logits, index):
    return kernels.logprobs_from_logits(logits, index)


def ours_inplace_logits(logits, index):
    # the gradient overwrites the logits buffer (the caller's promise: logits are not read after backward)
    from posttrain.kernels import logits as impl

    fn = impl.logprobs_from_logits_triton if logits.is_cuda else impl.logprobs_from_logits_torch
    return fn(logits, index, inplace_backward=True)


def ours_hidden(hidden, weight, index):
    return kernels.logprobs_from_hidden(hidden, weight, index)


def logits_methods(cuda: bool):
    methods = {"naive": naive_logits, "compiled": compiled_logits, "trl": trl_logits}
    if cuda:
        methods["trl-entropy"] = trl_entropy_logits
    methods["ours"] = ours_logits
    methods["ours-inplace"] = ours_inplace_logits
    return methods


def hidden_methods():
    return {"naive": naive_hidden, "trl-chunked": trl_chunked_hidden, "ours": ours_hidden}


# ---------------------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------------------


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_call(fn, device, warmup: int, repeats: int, slow_s: float = 3.0) -> float:
    """Median seconds of `repeats` calls after `warmup` calls; a timed call slower than slow_s is the only one."""
    times = []
    for i in range(warmup + repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if times[-1] > slow_s and i >= warmup:
            return times[-1]
    return statistics.median(times[warmup:])


def peak_extra_mib(fn, device) -> float:
    """Peak memory the call adds above what was allocated before it, in MiB."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    before = common.rss_mib()
    common.reset_peak_rss()
    fn()
    # glibc may return heap pages freed during the call below the starting resident set: report 0 then
    return max(0.0, common.peak_rss_mib() - before)


def measure(method, inputs, device, warmup, repeats):
    """(forward s, forward + backward s, peak extra MiB of a no-grad forward, of forward + backward)."""
    leaves = [x for x in inputs if x.is_floating_point()]

    def forward():
        with torch.no_grad():
            method(*inputs)

    def forward_backward():
        method(*inputs).sum().backward()
        for x in leaves:
            x.grad = None

    fwd = time_call(forward, device, warmup, repeats)
    fwd_bwd = time_call(forward_backward, device, warmup, repeats)
    return fwd, fwd_bwd, peak_extra_mib(forward, device), peak_extra_mib(forward_backward, device)


def make_inputs(kind, N, V, dtype, device, seed=0):
    # drawn on the device: 16k x 152k float32 logits drawn on the host took ~20 s a process
    gen = torch.Generator(device).manual_seed(seed)
    draw = dict(generator=gen, device=device)
    index = torch.randint(0, V, (N,), **draw)
    if kind == "logits":
        logits = (torch.randn(N, V, **draw) * 2).to(dtype).requires_grad_()
        return [logits, index]
    hidden = torch.randn(N, H, **draw).to(dtype).requires_grad_()
    weight = (torch.randn(V, H, **draw) / H**0.5).to(dtype).requires_grad_()
    return [hidden, weight, index]


# (N, V)-sized tensors a method's forward + backward holds at its peak, inputs included: naive holds the logits,
# the log-probs, their gradient and the input gradient (+ one for temporaries); the chunked methods hold the
# input logits and their gradient (ours-inplace: one buffer for both), the hidden-path ones none.
NV_COPIES = {
    "logits": {"naive": 5, "compiled": 4, "trl": 4, "trl-entropy": 3, "ours": 2.2, "ours-inplace": 1.2},
    "hidden": {"naive": 5, "trl-chunked": 0.2, "ours": 0.1},
}


def peak_bytes(kind, name, N, V, dtype) -> float:
    """Rough peak memory of one method's forward + backward on a cell, to skip what cannot fit."""
    elem = torch.finfo(dtype).bits // 8
    return NV_COPIES[kind][name] * N * V * elem + (3 * V * H * 4 if kind == "hidden" else 0)


def total_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def copy_bandwidth_gbs(device) -> float:
    """Copy of 1 GiB (GPU) or 256 MiB (CPU) within the device: bytes read + written per second."""
    src = torch.ones(2**28 if device.type == "cuda" else 2**26, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    seconds = time_call(lambda: dst.copy_(src), device, warmup=2, repeats=10)
    return 2 * src.numel() * 4 / seconds / 1e9


# ---------------------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------------------


def worker(kind, name, N, V, dtype_name, warmup, repeats):
    """One (method, cell) in this fresh process; hands (fwd s, fwd+bwd s, peak MiB) to the parent."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    methods = logits_methods(device.type == "cuda") if kind == "logits" else hidden_methods()
    if name.startswith("trl"):  # import TRL (seconds) before anything is timed
        import trl.kernels  # noqa: F401
        import trl.trainer.utils  # noqa: F401
    dtype = getattr(torch, dtype_name)
    inputs = make_inputs(kind, N, V, dtype, device)
    fwd, fwd_bwd, fwd_mem, mem = measure(methods[name], inputs, device, warmup, repeats)
    floor_fwd, floor_fwd_bwd = floor_seconds(kind, N, V, dtype, device)
    result = {"fwd": fwd, "fwd_bwd": fwd_bwd, "fwd_mem": fwd_mem, "mem": mem}
    common.emit_result(result | {"floor_fwd": floor_fwd, "floor_fwd_bwd": floor_fwd_bwd})


def floor_seconds(kind, N, V, dtype, device) -> tuple[float, float]:
    """(forward, forward + backward) floor for the cell, from rates measured now in this process.

    Logits path, memory-bound: the forward must read the (N, V) logits once, forward + backward read them twice
    and write the gradient once; seconds = those bytes / the rate of a device copy (bytes read + written per s).
    Hidden path, compute-bound: 2 N V H FLOPs forward, 6 N V H forward + backward (the logits, then dhidden and
    dweight), at the best rate of (rows, H) @ (cols, H).T matmuls of the cell's dtype (rows up to 4096, cols
    2k-8k). A
    method that does not keep the logits (ours, trl-chunked) recomputes them in backward, 8 N V H: 1.33x this
    floor is its best forward + backward."""
    elem = torch.finfo(dtype).bits // 8
    if kind == "logits":
        bytes_per_s = copy_bandwidth_gbs(device) * 1e9
        return N * V * elem / bytes_per_s, 3 * N * V * elem / bytes_per_s
    # an lm_head's layout, hidden (rows, H) @ weight (cols, H).T, into a reused buffer (a fresh 32 MiB result
    # costs page faults on every CPU call); the fastest of 5 calls, and the best over 2k-8k columns (the rate
    # moves with the shape on a CPU): a floor is a best case
    a = torch.randn(min(N, 4096), H, device=device).to(dtype)
    flops_per_s = 0.0
    for cols in (2048, 4096, 8192):
        w = torch.randn(min(V, cols), H, device=device).to(dtype)
        out = torch.empty(a.shape[0], w.shape[0], device=device, dtype=dtype)
        call = functools.partial(torch.mm, a, w.T, out=out)
        seconds = min(time_call(call, device, warmup=1 if i == 0 else 0, repeats=1) for i in range(5))
        flops_per_s = max(flops_per_s, 2 * a.shape[0] * H * w.shape[0] / seconds)
    return 2 * N * V * H / flops_per_s, 6 * N * V * H / flops_per_s


def rows_arg(text: str) -> list[int]:
    """`--ns`: comma-separated row counts in thousands of 1024, "16k,4k" -> [16384, 4096]."""
    parts = text.split(",")
    if not all(p.endswith("k") and p[:-1].isdigit() and int(p[:-1]) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected row counts like 1k,4k,16k")
    return [int(p[:-1]) * K for p in parts]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small cell per path (smoke run)")
    parser.add_argument("--full", action="store_true", help="N in {1k, 4k, 16k} for both paths (GPU default)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--dtype", choices=["float32", "bfloat16"], default=None, help="CPU: float32, GPU: bfloat16"
    )
    parser.add_argument(
        "--ns", type=rows_arg, help="rows to run, in this order, e.g. 16k,4k (default: per --quick / --full)"
    )
    parser.add_argument("--skip", default="", help="comma-separated method names to leave out")
    parser.add_argument("--paths", default="logits,hidden", help="which paths to run: logits, hidden or both")
    parser.add_argument(
        "--worker", nargs=5, metavar=("KIND", "METHOD", "N", "V", "DTYPE"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    unknown = set(args.paths.split(",")) - {"logits", "hidden"}
    if unknown:
        parser.error(f"--paths: unknown path(s) {sorted(unknown)}; expected logits, hidden or both")
    if args.worker:
        kind, name, N, V, dtype_name = args.worker
        return worker(kind, name, int(N), int(V), dtype_name, args.warmup, args.repeats)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.type == "cuda"
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    full = args.full or cuda
    ns = [K] if args.quick else [K, 4 * K, 16 * K] if full else [K, 4 * K]
    ns = args.ns or ns
    vocabs = {"32k": VOCABS["32k"]} if args.quick else VOCABS
    hidden_ns = ns
    skip = set(filter(None, args.skip.split(",")))
    budget = 0.6 * total_memory(device)

    print(f"# log-softmax gathering, {device.type}, {dtype}")
    print(common.machine_line())
    if cuda:
        print(f"device: {torch.cuda.get_device_name(device)}")
        copy_gbs = copy_bandwidth_gbs(device)
        print(f"device-to-device copy: {copy_gbs:.0f} GB/s (read + write)")
    print(
        f"warm-up {args.warmup}, median of {args.repeats} (one timed call when a call takes > 3 s);"
        f" one fresh process per method and cell; memory budget per method: {budget / 2**30:.1f} GiB\n"
    )

    header = [
        "path",
        "method",
        "N",
        "V",
        "fwd s",
        "f+b s",
        "fwd floor s",
        "f+b floor s",
        "fwd MiB",
        "f+b MiB",
    ]
    header += ["fwd s / floor", "f+b s / floor"]
    header += ["fwd s / naive", "f+b s / naive", "fwd MiB / naive", "f+b MiB / naive"]
    if cuda:
        header += ["fwd GB/s", "f+b GB/s"]
    rows = []

    def add(row):
        rows.append(row + [""] * (len(header) - len(row)))
        print(" | ".join(str(x) for x in row), flush=True)

    paths = (("logits", logits_methods(cuda), ns), ("hidden", hidden_methods(), hidden_ns))
    for kind, methods, kind_ns in (p for p in paths if p[0] in args.paths.split(",")):
        for N in kind_ns:
            for vname, V in vocabs.items():
                cell = [f"{N // K}k", vname]
                if kind == "hidden" and not cuda and N * V > 4 * K * VOCABS["152k"]:
                    add([kind, "all", *cell, "skip (slow: over 4 TFLOP a call on the CPU)"])
                    continue
                base = None
                for name in methods:
                    if name in skip:
                        continue
                    if peak_bytes(kind, name, N, V, dtype) > budget:
                        add([kind, name, *cell, "skip (mem)"])
                        continue
                    if name == "trl" and not cuda and N > K and not args.full:
                        add(
                            [
                                kind,
                                name,
                                *cell,
                                "skip (slow: a Python loop over rows on the CPU; --full runs it)",
                            ]
                        )
                        continue
                    argv = ["--worker", kind, name, str(N), str(V), str(dtype).removeprefix("torch.")]
                    argv += ["--warmup", str(args.warmup), "--repeats", str(args.repeats)]
                    try:
                        r = common.run_side(os.path.abspath(__file__), argv)
                    except RuntimeError as err:  # a baseline that cannot run here is reported, not fatal
                        last = [line for line in str(err).splitlines() if line.strip()][-1]
                        add([kind, name, *cell, f"error: {last[:100]}"])
                        continue
                    got = (r["fwd"], r["fwd_bwd"], r["fwd_mem"], r["mem"])
                    if name == "naive":
                        base = got
                    ratio = ["", "", "", ""]
                    if base:
                        ratio = [f"{a / b:.2f}" if b > 0 else "" for a, b in zip(got, base, strict=True)]
                    fwd, fwd_bwd, fwd_mem, mem = got
                    row = [
                        kind,
                        name,
                        *cell,
                        f"{fwd:.4f}",
                        f"{fwd_bwd:.4f}",
                        f"{r['floor_fwd']:.4f}",
                        f"{r['floor_fwd_bwd']:.4f}",
                        f"{fwd_mem:.0f}",
                        f"{mem:.0f}",
                        f"{fwd / r['floor_fwd']:.2f}",
                        f"{fwd_bwd / r['floor_fwd_bwd']:.2f}",
                        *ratio,
                    ]
                    if cuda:
                        logit_bytes = N * V * (torch.finfo(dtype).bits // 8)
                        row += [f"{logit_bytes / fwd / 1e9:.0f}", f"{3 * logit_bytes / fwd_bwd / 1e9:.0f}"]
                    add(row)
    print()
    print(common.markdown_table(header, rows))
    print(
        "\nnotes: MiB columns are peak extra memory on a call after the warm-up and timed ones: 'fwd' a no-grad"
        " forward\n(reference-model log-probs), 'f+b' forward + backward, which counts the gradient of the inputs"
        " (logits path:\nan (N, V) tensor in the input dtype, a floor for every method but ours-inplace, which writes"
        " it into the logits;\nhidden path: the (V, H) and (N, H) gradients). Ours adds float32 work buffers of"
        f" {kernels_chunk_mib():.0f} MiB each on the logits torch path;\non the CPU glibc keeps such"
        " buffers in its heap between calls, so a later call's resident-set peak may not show them.\nTimes on a"
        " shared CPU vary run to run: compare within a cell."
    )
    if cuda:
        print(
            "GB/s: logits bytes moved / time (forward: 1 read; forward + backward: 2 reads + 1 write); hidden-path"
            f" rows count only that logits-sized traffic, so they are not bandwidth numbers. copy: {copy_gbs:.0f} GB/s"
        )
    print("load at the end:", common.machine_line())


def kernels_chunk_mib() -> float:
    from posttrain.kernels import logits

    return logits.CHUNK_ELEMENTS * 4 / 2**20


if __name__ == "__main__":
    main()
