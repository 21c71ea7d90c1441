"""The benchmark scripts' row options: what they parse, and a message naming the bad entry otherwise."""

import argparse
import importlib.util
import os
import re
import sys

import pytest
from _optional import import_or_skip

BENCHMARKS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks")


def _load(name: str):
    """benchmarks/<name>.py under a private module name, its folder on sys.path only while it imports (`common`,
    `kernels` and `rollout` are names other packages use: transformers imports a `kernels` package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", os.path.join(BENCHMARKS, f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    had_common = "common" in sys.modules
    sys.path.insert(0, BENCHMARKS)
    try:
        spec.loader.exec_module(module)
    finally:  # the scripts put their folder on sys.path themselves too
        sys.path[:] = [p for p in sys.path if os.path.abspath(p) != BENCHMARKS]
        if not had_common:
            sys.modules.pop("common", None)
    return module


kernels = _load("kernels")
rollout_bench = _load("rollout")


def test_rollout_batches():
    assert rollout_bench.batch_arg("32") == (32, 1)
    assert rollout_bench.batch_arg("32x8") == (32, 8)
    for bad, message in (
        ("32x", "expected ROWS or ROWSxCOMPLETIONS"),
        ("x8", "expected ROWS or ROWSxCOMPLETIONS"),
        ("eight", "expected ROWS or ROWSxCOMPLETIONS"),
        ("30x8", "rows must be a positive multiple of the completions"),
        ("0", "rows must be a positive multiple of the completions"),
    ):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}': {message}"):
            rollout_bench.batch_arg(bad)


def test_kernels_rows():
    assert kernels.rows_arg("16k,4k") == [16 * 1024, 4 * 1024]
    for bad in ("16", "16q", "0k", "4k,"):
        with pytest.raises(argparse.ArgumentTypeError, match=f"'{bad}': expected row counts like 1k,4k,16k"):
            kernels.rows_arg(bad)


def test_geometry_sweeps_run_end_to_end(monkeypatch, capsys):
    """benchmarks/geometry.py (a GPU script) on the CPU: its sweeps through the interpreter on tiny shapes, each
    configuration checked against float32 torch, the times from a plain clock, so that a sweep that no longer
    matches the kernels' launch arguments fails here rather than in a GPU lease."""
    import time

    import torch

    from posttrain.kernels import hidden as H

    import_or_skip("trl")  # the sweep times TRL's kernels beside ours
    had_kernels = "kernels" in sys.modules
    geometry = _load("geometry")
    if not had_kernels:  # it imported benchmarks/kernels.py as `kernels`, a name transformers looks up
        sys.modules.pop("kernels", None)
    assert hasattr(geometry.bench, "make_inputs")  # benchmarks/kernels.py, not another `kernels`
    make_inputs = geometry.bench.make_inputs
    monkeypatch.setattr(geometry.bench, "make_inputs", lambda *a: make_inputs(*a[:4], torch.device("cpu")))

    def clock_ms(fn):
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3

    monkeypatch.setattr(geometry, "median_ms", clock_ms)
    monkeypatch.setattr(geometry, "BACKWARD", geometry.BACKWARD[:2])
    monkeypatch.setattr(geometry, "TILES", [(4, 64), (8, 128)])
    geometry.logits_sweep(6, 150, 100.0, forward=[(32, 4, None), (64, 2, 2)])
    geometry.hidden_sweep(6, 150)
    assert H.ROWS_PER_TILE["cpu"] == 2048  # the sweep passes its tiles per call, leaving the defaults
    assert geometry.L._launch_config.__module__ == "posttrain.kernels.logits"  # the patches are undone

    _, args = geometry.parse_args(["--vocabs", "152k", "--passes", "fwd", "--blocks", "4096,8192"])
    assert (args.vocabs, args.passes, args.blocks, args.warps) == (["152k"], ["fwd"], [4096, 8192], [4, 8])
    for option, bad, message in (
        ("--vocabs", "64k", r"'64k': unknown \['64k'\]; expected some of 32k, 152k"),
        ("--paths", "logits,kernel", r"unknown \['kernel'\]; expected some of logits, hidden"),
        ("--passes", "back", r"unknown \['back'\]; expected some of fwd, bwd"),
        ("--blocks", "4096,0", r"'4096,0': expected positive integers like 4096,8192"),
        ("--warps", "four", r"'four': expected positive integers"),
    ):
        with pytest.raises(SystemExit):
            geometry.parse_args([option, bad])
        err = capsys.readouterr().err
        assert option in err and re.search(message, err), err
