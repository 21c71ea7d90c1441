"""kernels/cpu_pool: torch's CPU allocator with the large tensors in a range of their own.

The placement checks run in a fresh process (`_SCENARIO`), where the pool is installed before any tensor and
its range is empty, so every address is known: best fit, lowest address first, freed neighbours merged, the
used part's top lowered, pages handed back past the trim threshold, a tensor the range cannot hold served by
torch's default allocator, blocks made by oneDNN's raw allocations, a fork, the profiler's memory events."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from posttrain.kernels import cpu_pool
from posttrain.measure import TensorPeak
from posttrain.rl import loop

pytestmark = pytest.mark.skipif(cpu_pool.library() is None, reason="no C++ compiler / not Linux")

KIB = 1 << 10

_SCENARIO = r"""
import json, os, sys, torch
import torch.nn.functional as F
from posttrain.kernels import cpu_pool
from posttrain.measure import TensorPeak

KIB, MIB = 1 << 10, 1 << 20
out = {"installed": cpu_pool.install(reserve_bytes=64 * MIB, trim_bytes=4 * MIB)}
base = cpu_pool.stats()["base"]

def at(t):  # offset in the range, None outside it
    off = t.data_ptr() - base
    return off if 0 <= off < 64 * MIB else None

def block(kib):
    return torch.empty(kib * KIB, dtype=torch.uint8)

a, b, c, d, e = block(256), block(64), block(128), block(64), block(64)
out["layout"] = [at(t) for t in (a, b, c, d, e)]
out["small"] = at(torch.empty(1000, dtype=torch.uint8))
out["rounded"] = at(block(63)), cpu_pool.stats()["top"]  # 63 KiB: below MIN_BYTES

del a, c  # free: [0, 256) and [320, 448) KiB
f = block(100)  # 100 KiB = 25 pages: the smaller hole fits
g = block(200)  # the larger one
out["best_fit"] = [at(f), at(g)]
del f, g

del b, d  # with a, c freed: [0, 512) KiB free, e still at 512
out["merged"] = at(block(512)), cpu_pool.stats()["free_blocks"]
h = block(512)
out["merged_kept"] = at(h)

s = cpu_pool.stats()
t = torch.ones(2 * MIB // 4)  # at the top, pages touched
top_with, resident_with = cpu_pool.stats()["top"], cpu_pool.stats()["resident"]
del t
out["top"] = [s["top"], top_with, cpu_pool.stats()["top"], resident_with, cpu_pool.stats()["resident"]]

big = torch.ones(16 * MIB // 4)  # 16 MiB above the top, then freed: past the 4 MiB trim threshold
top_big = cpu_pool.stats()["top"]
del big
out["trimmed"] = [top_big, cpu_pool.stats()["top"], cpu_pool.stats()["resident"]]
u = torch.ones(3 * MIB // 4)  # 3 MiB: under the threshold, kept until `release`
del u
kept = cpu_pool.stats()["resident"] - cpu_pool.stats()["top"]
out["released"] = [kept, cpu_pool.release(), cpu_pool.stats()["resident"] - cpu_pool.stats()["top"]]

huge = torch.full((100 * MIB // 4,), 2.0)  # larger than the 64 MiB range: torch's default allocator
out["fallback"] = [at(huge), float(huge.sum())]
del huge

x, w = torch.randn(8, 256), torch.randn(1024, 256)
if torch.backends.mkldnn.is_available():  # oneDNN's scratch buffers go through raw_allocate / raw_deallocate
    packed = torch.ops.mkldnn._reorder_linear_weight(w, 8)
    y = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
    del packed
    out["onednn"] = float((y - F.linear(x, w)).abs().max())

with TensorPeak() as peak:
    p = torch.empty(3 * MIB, dtype=torch.uint8)
    del p
out["profiled_mib"] = peak.mib

in_use = cpu_pool.stats()["in_use"]
kept_alive = block(256)
cpu_pool.uninstall()
out["uninstalled"] = [cpu_pool.installed(), at(block(256))]
del kept_alive  # made by the pool: returns to it
out["returned"] = cpu_pool.stats()["in_use"] == in_use
out["reinstalled"] = cpu_pool.install()

pid = os.fork()
if pid == 0:  # the child allocates, writes and frees through its copy of the pool
    ok = all(float(torch.ones(MIB).sum()) == MIB for _ in range(3))
    os._exit(0 if ok else 1)
out["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def scenario():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), POSTTRAIN_CPU_POOL="1")
    done = subprocess.run([sys.executable, "-c", _SCENARIO], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_large_tensors_are_laid_out_from_the_start_of_the_range(scenario):
    assert scenario["installed"]
    assert scenario["layout"] == [0, 256 * KIB, 320 * KIB, 448 * KIB, 512 * KIB]
    assert scenario["small"] is None  # under MIN_BYTES: glibc's
    assert scenario["rounded"] == [None, 576 * KIB]


def test_best_fit_takes_the_smallest_hole_that_fits(scenario):
    assert scenario["best_fit"] == [
        320 * KIB,
        0,
    ]  # 100 KiB into the 128 KiB hole, 200 KiB into the 256 KiB one


def test_freed_neighbours_merge(scenario):
    # a, b, c, d freed: one 512 KiB block below e, which a 512 KiB tensor takes whole
    assert scenario["merged"] == [0, 1]
    assert scenario["merged_kept"] == 0


def test_freeing_the_top_block_lowers_the_top_and_keeps_its_pages(scenario):
    before, with_t, after, resident_with, resident_after = scenario["top"]
    assert with_t == before + 2 * (1 << 20) and after == before
    assert resident_after == resident_with  # kept for reuse: under the trim threshold


def test_pages_past_the_trim_threshold_are_handed_back(scenario):
    top_big, top, resident = scenario["trimmed"]
    assert top_big - top == 16 << 20 and resident == top
    kept, released, left = scenario["released"]
    assert kept == 3 << 20 and released == 3 << 20 and left == 0


def test_what_the_range_cannot_hold_comes_from_torch(scenario):
    assert scenario["fallback"] == [None, 2.0 * (100 << 20) // 4]


def test_onednn_raw_blocks_and_the_profiler(scenario):
    if "onednn" in scenario:
        assert scenario["onednn"] < 1e-4
    assert abs(scenario["profiled_mib"] - 3.0) < 1e-6


def test_uninstall_gives_torch_its_allocator_back_and_live_blocks_return(scenario):
    assert scenario["uninstalled"] == [False, None]
    assert scenario["returned"] and scenario["reinstalled"]


def test_a_forked_child_uses_its_copy(scenario):
    assert scenario["fork"] == 0


def test_loop_start_installs_it_and_tensors_compute_as_before(tmp_path):
    from posttrain.rl.config import TrainConfig

    loop.start(TrainConfig(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none"), command="test")
    assert cpu_pool.installed()
    g = torch.Generator().manual_seed(0)
    x, w = torch.randn(64, 512, generator=g), torch.randn(512, 512, generator=g)
    stats = cpu_pool.stats()
    y = x @ w
    assert cpu_pool.stats()["in_use"] >= stats["in_use"] + y.numel() * 4
    torch.testing.assert_close(y.double(), x.double() @ w.double(), rtol=1e-4, atol=1e-4)


def test_the_environment_switch(monkeypatch):
    monkeypatch.setenv(cpu_pool.ENV, "0")
    assert cpu_pool.install() is False
    monkeypatch.setenv(cpu_pool.ENV, "yes")
    with pytest.raises(ValueError, match="POSTTRAIN_CPU_POOL='yes'"):
        cpu_pool.install()
    with pytest.raises(ValueError, match="POSTTRAIN_CPU_POOL"):
        loop.keep_freed_cpu_memory()


def test_the_profiler_sees_pool_tensors():
    assert cpu_pool.install()
    with TensorPeak() as peak:
        t = torch.empty(5 << 20, dtype=torch.uint8)
        del t
    assert abs(peak.mib - 5.0) < 1e-6
