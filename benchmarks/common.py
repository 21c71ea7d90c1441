"""Shared helpers for the side-by-side benchmarks: step timing, peak memory, the compute floor.

Notation: B batch, T time, H hidden, V vocab, I MLP intermediate size, L layers, N rows through the
output layer.

Each side of a comparison runs in its own fresh subprocess (`run_side`), so neither inherits the other's
allocator caches or imported modules, and its peak memory is read from the kernel's own high-water mark
(VmHWM, reset through /proc/self/clear_refs before the steps) rather than sampled.

The compute floor is the time the matrix multiplications a step cannot avoid take at the matmul rate
measured on this machine, in this run (`compute_floor`). `measured / floor` says how much of a step is
spent on anything else: skipped work done anyway, memory traffic, Python, the optimizer.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time

import torch

from posttrain.measure import (  # noqa: F401  (the benchmarks call them as common.<name>)
    TensorPeak,
    attention_width,
    compute_floor,
    last_token_score_flops,
    layer_shapes,
    linear_forward_seconds,
    linear_fwd_bwd_seconds,
    linear_params_per_layer,
    optimizer_state_mib,
    peak_rss_mib,
    reset_peak_rss,
    rss_mib,
    shared_prompt_step_flops,
    step_flops,
)

# ---------------------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------------------


def time_steps(step, steps: int, warmup: int) -> list[float]:
    """Call `step()` warmup + steps times; wall-clock seconds of the last `steps` calls.

    On the CPU every op is synchronous, so wall-clock time around the call is the step's time."""
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


# ---------------------------------------------------------------------------------------------------------
# One side per subprocess
# ---------------------------------------------------------------------------------------------------------

RESULT_PREFIX = "BENCH_RESULT "


def emit_result(result: dict) -> None:
    """Called by a side's subprocess: hand its result dict to the parent on stdout."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_side(script: str, args: list[str]) -> dict:
    """Run `python script *args` in a fresh interpreter and return the dict it passed to `emit_result`.

    The child's stderr (warnings, progress bars) is passed through; a failure raises with its output."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run([sys.executable, script, *args], capture_output=True, text=True, env=env)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(
            f"benchmark side {args} failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


def machine_line() -> str:
    """torch version, thread count and the 1-minute load average (other work on the machine skews times)."""
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads, {os.cpu_count()} cpus, load {load:.2f}"


def markdown_table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in rows]
    return "\n".join(lines)


def print_comparison(results: dict) -> None:
    """The side-by-side table (median / min s per step, floor, ratio, peak memory, ours / TRL) and, when
    `results[side]` = {"times", "floor_s", "peak_mib"} has "losses", their per-step agreement."""
    rows = []
    for side in ("ours", "trl"):
        t = median(results[side]["times"])
        rows.append(
            [
                "posttrain" if side == "ours" else "TRL 1.16",
                f"{t:.3f}",
                f"{min(results[side]['times']):.3f}",
                f"{results[side]['floor_s']:.3f}",
                f"{t / results[side]['floor_s']:.2f}",
                f"{results[side]['peak_mib']:.0f}",
            ]
        )
    t_ours, t_trl = (median(results[s]["times"]) for s in ("ours", "trl"))
    m_ours, m_trl = (results[s]["peak_mib"] for s in ("ours", "trl"))
    rows.append(["ours / TRL", f"{t_ours / t_trl:.2f}", "", "", "", f"{m_ours / m_trl:.2f}"])
    header = ["side", "median s/step", "min s/step", "floor s", "measured / floor", "peak MiB"]
    print(markdown_table(header, rows))
    if "losses" not in results["ours"]:  # sides that sample their own data have no losses to compare
        return
    # Same initial weights, batches and optimizer: the per-step losses must agree along the whole run.
    ours_l, trl_l = results["ours"]["losses"], results["trl"]["losses"]
    worst = max(abs(a - b) / abs(b) for a, b in zip(ours_l, trl_l, strict=True))
    print(
        f"agreement: loss per step, ours vs TRL, {len(trl_l)} steps: max relative difference {worst:.1e} "
        f"(first step {ours_l[0]:.6f} vs {trl_l[0]:.6f}, last {ours_l[-1]:.6f} vs {trl_l[-1]:.6f})"
    )
