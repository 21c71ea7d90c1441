"""The shared hot path's bookkeeping: exact step counts past float32's 2^24, and token_logprobs' row
selection (flat positions, first column never a target) against the per-row reference."""

import os
import subprocess
import sys

import pytest
import torch

from posttrain.data import embedded
from posttrain.rl import logprobs as lp
from posttrain.rl import loop
from posttrain.rl.config import TrainConfig

BIG = 2**24  # float32 counts by ones only up to here: 2^24 + 1 rounds back to 2^24


def _run(tmp_path) -> loop.Run:
    config = TrainConfig(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none")
    return loop.Run(config=config, command="test", output_dir=tmp_path, device=torch.device("cpu"))


def test_global_count_is_exact_past_2_24(tmp_path):
    run = _run(tmp_path)
    batches = [{"n": torch.tensor(BIG)}, {"n": torch.tensor(1)}, {"n": torch.tensor(1)}]
    total = loop.global_count(run, batches, lambda b: b["n"])
    # a float32 sum gives 2^24 here: each +1 rounds away
    assert total.dtype == torch.int64 and total.item() == BIG + 2
    # fractional counts add in float64
    total = loop.global_count(run, [{"n": float(BIG)}, {"n": 0.5}, {"n": 0.5}], lambda b: b["n"])
    assert total.dtype == torch.float64 and total.item() == BIG + 1
    # no loss unit at all: clamped to 1 (a zero loss, not 0 / 0)
    assert loop.global_count(run, [{"n": 0}], lambda b: b["n"]).item() == 1


def test_forward_backward_normalises_and_counts_exactly_past_2_24(tmp_path):
    """The loss function gets the exact step count, and the num_tokens metric sums exactly."""
    run = _run(tmp_path)
    weight = torch.nn.Parameter(torch.ones(()))
    seen = []

    def loss_fn(model, batch, num_items):
        seen.append(num_items)
        return weight * batch["units"] / num_items, {}

    micro_batches = [
        {"units": torch.tensor(BIG + 1), "num_tokens": torch.tensor(BIG)},
        {"units": torch.tensor(2), "num_tokens": torch.tensor(1)},
    ]
    sums = loop.forward_backward(run, weight, micro_batches, loss_fn, lambda b: b["units"])
    assert [n.item() for n in seen] == [BIG + 3, BIG + 3]
    assert sums["num_tokens"].item() == BIG + 1
    # the step's loss is units / count = 1, so d loss / d weight = 1
    assert abs(weight.grad.item() - 1.0) < 1e-6 and abs(sums["loss"].item() - 1.0) < 1e-6


def test_token_logprobs_ignores_the_first_column_of_a_mask():
    """Token 0 of a row has no prediction: a mask that marks it changes nothing, in any row (a flat index
    taken from the whole mask would read the previous row's last position instead)."""
    model = embedded.build_model(seed=0, num_hidden_layers=1)
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, model.config.vocab_size, (3, 9), generator=g)
    mask = torch.zeros(3, 9, dtype=torch.long)
    mask[0, 4:] = 1
    mask[1, 1:3] = 1
    mask[2, 7:] = 1
    batch = {"input_ids": input_ids, "completion_mask": mask}
    marked = mask.clone()
    marked[:, 0] = 1
    every = dict(return_entropy=True, return_top1=True, return_mean_logit=True, return_log_sum_sq=True)
    ours = lp.token_logprobs(model, batch, **every)
    first_marked = lp.token_logprobs(model, batch, mask=marked, **every)
    for a, b in zip(ours[:-1], first_marked[:-1], strict=True):  # all but aux_loss (not a MoE model)
        assert torch.equal(a, b)
    # and row by row, each row alone gives the same values (the flat positions do not mix rows)
    for r in range(3):
        alone = lp.token_logprobs(
            model, {"input_ids": input_ids[r : r + 1], "completion_mask": mask[r : r + 1]}
        )
        torch.testing.assert_close(alone.logps[0], ours.logps[r], rtol=1e-5, atol=1e-5)
    assert (ours.logps[mask == 0] == 0).all() and (ours.logps[mask == 1] < 0).all()


_FAULTS = """
import ctypes, resource, sys, torch
from posttrain.rl import loop
if sys.argv[1] == "keep":
    assert loop.keep_freed_cpu_memory()
else:  # glibc's initial mmap threshold, fixed (its later adaptation depends on the heap's layout)
    assert ctypes.CDLL(None).mallopt(-3, 128 << 10)
def step():  # a step's tensors: 24 of 4 MiB (96 MiB), written, then freed
    xs = [torch.ones(1 << 20) for _ in range(24)]
    del xs
step(), step()
faults = []
for _ in range(5):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    step()
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(min(faults))  # the fewest of five steps: the machine may reclaim pages at any moment
"""


@pytest.mark.skipif(
    not hasattr(os, "confstr") or "glibc" not in (os.confstr("CS_GNU_LIBC_VERSION") or ""),
    reason="glibc only",
)
def test_freed_cpu_memory_is_reused_without_page_faults():
    """After keep_freed_cpu_memory (loop.start calls it), a step's large tensors reuse freed memory instead
    of faulting fresh pages in. Control: with glibc's initial 128 KiB mmap threshold each 4 MiB tensor is
    mapped afresh and unmapped when freed, so all ~24,000 pages fault again at every step (glibc raises
    the threshold as blocks are freed, but whether a step then reuses memory depends on the heap's layout)."""
    pages = (96 << 20) // os.sysconf("SC_PAGE_SIZE")

    def faults(mode):
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
        out = subprocess.run(
            [sys.executable, "-c", _FAULTS, mode], capture_output=True, text=True, env=env, check=True
        )
        return int(out.stdout.split()[-1])

    assert faults("control") > pages // 2
    assert faults("keep") < pages // 100
