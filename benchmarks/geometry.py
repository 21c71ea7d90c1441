"""Launch-geometry sweep of the log-prob kernels on a GPU: which shapes move the bytes fastest.

    python benchmarks/geometry.py                  # N = 16k, V in {32k, 152k}, bf16
    python benchmarks/geometry.py --ns 4k --vocabs 32k
    python benchmarks/geometry.py --paths logits --passes fwd --blocks 4096,8192 --warps 2,4 --stages 1,2,3,4

Logits path (posttrain/kernels/logits.py): the forward over (BLOCK_V, num_warps) with and without entropy,
and the backward over (BLOCK_V, num_warps), each in GB/s
of the logits' bytes it must move (forward: one read; backward: one read and one write) next to a
device-to-device copy and TRL 1.16's Triton kernels (`selective_log_softmax`, `selective_log_softmax_and_entropy`)
timed the same way. Hidden path (hidden.py): forward + backward over the tile shape (rows x vocabulary
entries), as a multiple of its matmul floor (6 N V H FLOPs at the rate of one bf16 matmul of the cell's shape),
next to TRL's `ChunkedLogProbFunction`.

Every configuration's outputs are checked against float32 torch in the same run (`err` columns: the largest
absolute difference of the log-probs, or of the gradient scaled by its largest entry), so a faster shape that
computes something else shows. Times: `triton.testing.do_bench` medians (CUDA events, L2 flushed between
calls). CUDA only.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import kernels as bench  # noqa: E402  (benchmarks/kernels.py: inputs, TRL's methods, the copy rate)

from posttrain.kernels import hidden as H_impl  # noqa: E402
from posttrain.kernels import logits as L  # noqa: E402

FORWARD = list(itertools.product((1024, 2048, 4096, 8192), (4, 8, 16)))  # (BLOCK_V, num_warps)
BACKWARD = list(itertools.product((1024, 2048, 4096), (4, 8)))  # (BLOCK_V, num_warps)
TILES = list(itertools.product((2048, 4096, 8192), (4096, 8192, 16384)))  # (rows, vocabulary entries)


def median_ms(fn) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, return_mode="median")


def grad_of(logps, logits):
    """The backward alone: d sum(logps) / d logits, the graph kept for the next call."""
    return torch.autograd.grad(logps, logits, torch.ones_like(logps), retain_graph=True)


class Staged:
    """A jitted kernel whose launches also pass num_stages (software pipelining depth of the row loop)."""

    def __init__(self, kernel, stages):
        self.kernel, self.stages = kernel, stages

    def __getitem__(self, grid):
        launch = self.kernel[grid]
        return lambda *args, **kwargs: launch(*args, num_stages=self.stages, **kwargs)


@contextlib.contextmanager
def patched(block, warps, stages=None):
    """The logits kernels, forward and backward, launched with this geometry (stages: triton's default)."""
    saved = L._launch_config, L._kernels
    L._launch_config = lambda V, backward=False: (block, warps)
    if stages is not None:
        kernels = saved[1]()
        L._kernels = lambda: tuple(Staged(k, stages) for k in kernels)
    try:
        yield
    finally:
        L._launch_config, L._kernels = saved


def logits_sweep(N, V, copy_gbs, forward=None, passes=("fwd", "bwd")):
    """forward: (BLOCK_V, num_warps, num_stages or None) to time, FORWARD at triton's stages by default."""
    forward = forward or [(block, warps, None) for block, warps in FORWARD]
    logits, index = bench.make_inputs("logits", N, V, torch.bfloat16, torch.device("cuda"))
    x = logits.detach()
    gb = N * V * x.element_size() / 1e9
    ref_logp = torch.log_softmax(x.float(), -1).gather(-1, index[:, None])[:, 0]
    ref_grad = torch.autograd.grad(
        torch.log_softmax(logits.float(), -1).gather(-1, index[:, None]).sum(), logits
    )[0]
    scale = ref_grad.abs().max().item()
    print(f"\n## logits path, N x V = {N} x {V}, bf16 ({gb:.2f} GB of logits; copy {copy_gbs:.0f} GB/s)")
    print("| pass | method | BLOCK_V | warps | stages | ms | GB/s | of copy | err |")
    print("|---|---|---|---|---|---|---|---|---|")

    def row(kind, method, block, warps, ms, moved, err, stages=None):
        gbs = moved / (ms / 1e3)
        print(
            f"| {kind} | {method} | {block} | {warps} | {stages or '-'} | {ms:.3f} | {gbs:.0f}"
            f" | {gbs / copy_gbs:.0%} | {err:.1e} |"
        )

    with torch.no_grad():
        for entropy in (False, True) if "fwd" in passes else ():
            kind = "fwd + entropy" if entropy else "fwd"
            for block, warps, stages in forward:
                with patched(block, warps, stages):
                    fn = functools.partial(L.logprobs_from_logits_triton, x, index, return_entropy=entropy)
                    out = fn()
                    err = ((out[0] if entropy else out) - ref_logp).abs().max().item()
                    row(kind, "ours", block, warps, median_ms(fn), gb, err, stages)
            from trl.kernels.logprob_entropy import selective_log_softmax_and_entropy
            from trl.trainer.utils import selective_log_softmax

            fn = (
                (lambda: selective_log_softmax_and_entropy(x, index))
                if entropy
                else (lambda: selective_log_softmax(x, index))
            )
            out = fn()
            err = ((out[0] if entropy else out) - ref_logp).abs().max().item()
            row(kind, "TRL", 1024, 4, median_ms(fn), gb, err)

    if "bwd" not in passes:
        return
    for block, warps in BACKWARD:
        with patched(block, warps):
            logps = L.logprobs_from_logits_triton(logits, index)
            fn = functools.partial(grad_of, logps, logits)
            err = (fn()[0].float() - ref_grad).abs().max().item() / scale
            row("bwd", "ours", block, warps, median_ms(fn), 2 * gb, err)
    from trl.trainer.utils import selective_log_softmax

    fn = functools.partial(grad_of, selective_log_softmax(logits, index), logits)
    err = (fn()[0].float() - ref_grad).abs().max().item() / scale
    row("bwd", "TRL", 1024, 4, median_ms(fn), 2 * gb, err)


def hidden_sweep(N, V):
    hidden, weight, index = bench.make_inputs("hidden", N, V, torch.bfloat16, torch.device("cuda"))
    a, b = hidden.detach(), weight.detach()
    floor_ms = 3 * median_ms(lambda: a @ b.T)  # forward + backward: three products of this shape
    ref = torch.log_softmax((a @ b.T).float(), -1).gather(-1, index[:, None])[:, 0]
    print(f"\n## hidden path, N x V x H = {N} x {V} x {hidden.shape[1]}, bf16 (floor {floor_ms:.2f} ms f+b)")
    print("| method | rows / tile | vocab / tile | f+b ms | / floor | logp err |")
    print("|---|---|---|---|---|---|")

    def f_b(fn):
        def run():
            logps = fn()
            torch.autograd.grad(logps.sum(), (hidden, weight))

        return run

    for rows, cols in TILES:
        fn = functools.partial(
            H_impl.logprobs_from_hidden_triton, hidden, weight, index, rows_per_tile=rows, vocab_per_tile=cols
        )
        err = (fn() - ref).abs().max().item()
        ms = median_ms(f_b(fn))
        print(f"| ours | {rows} | {cols} | {ms:.2f} | {ms / floor_ms:.2f} | {err:.1e} |")
    fn = lambda: bench.trl_chunked_hidden(hidden, weight, index)  # noqa: E731
    err = (fn() - ref).abs().max().item()
    ms = median_ms(f_b(fn))
    print(f"| TRL chunked | - | 32768 | {ms:.2f} | {ms / floor_ms:.2f} | {err:.1e} |")


def positive_ints(text: str) -> list[int]:
    """`--blocks` / `--warps` / `--stages`: comma-separated positive integers, "4096,8192" -> [4096, 8192]."""
    parts = text.split(",")
    if not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"{text!r}: expected positive integers like 4096,8192")
    return [int(p) for p in parts]


def choices_arg(allowed):
    """A comma-separated subset of `allowed`, in the order given; the message names what is not allowed."""

    def parse(text: str) -> list[str]:
        names = text.split(",")
        unknown = [n for n in names if n not in allowed]
        if unknown:
            raise argparse.ArgumentTypeError(
                f"{text!r}: unknown {unknown}; expected some of {', '.join(allowed)}"
            )
        return names

    return parse


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ns", type=bench.rows_arg, default=[16 * bench.K])
    parser.add_argument("--vocabs", type=choices_arg(list(bench.VOCABS)), default=list(bench.VOCABS))
    parser.add_argument("--paths", type=choices_arg(["logits", "hidden"]), default=["logits", "hidden"])
    parser.add_argument(
        "--passes", type=choices_arg(["fwd", "bwd"]), default=["fwd", "bwd"], help="logits path"
    )
    parser.add_argument(
        "--blocks", type=positive_ints, help="forward sweep over these BLOCK_V (with --warps, --stages)"
    )
    parser.add_argument("--warps", type=positive_ints, default=[4, 8])
    parser.add_argument("--stages", type=positive_ints, help="num_stages values (default: triton's)")
    return parser, parser.parse_args(argv)


def main():
    parser, args = parse_args()
    forward = None
    if args.blocks:
        forward = list(itertools.product(args.blocks, args.warps, args.stages or [None]))
    if not torch.cuda.is_available():
        parser.error("the sweep times GPU kernels: no CUDA device here")
    device = torch.device("cuda")
    print(f"# launch geometry, {torch.cuda.get_device_name(device)}, torch {torch.__version__}")
    copy_gbs = bench.copy_bandwidth_gbs(device)
    for N in args.ns:
        for name in args.vocabs:
            if "logits" in args.paths:
                logits_sweep(N, bench.VOCABS[name], copy_gbs, forward, args.passes)
            if "hidden" in args.paths:
                hidden_sweep(N, bench.VOCABS[name])
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
