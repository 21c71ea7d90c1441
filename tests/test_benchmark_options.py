"""The benchmark scripts' row options: what they parse, and a message naming the bad entry otherwise."""

import argparse
import importlib.util
import os
import sys

import pytest

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
