"""Epochs and data order as transformers' Trainer (with accelerate) counts them.

References: accelerate's `BatchSamplerShard` (even_batches) over torch's `BatchSampler` for which rows
each rank trains, transformers' step counting (`set_initial_training_values`, `_run_epoch`) written
out plainly, transformers' `get_length_grouped_indices` for group_by_length, an uninterrupted run for
resume, and one process for two.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from _ddp_worker import build_model, collate, count_fn, make_rows, nll_loss_fn
from _epochs_worker import id_rows
from _epochs_worker import train as train_recording

from posttrain.rl import loop
from posttrain.rl.config import ConfigError, TrainConfig


def _config(tmp_path, name="run", **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / name),
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        warmup_steps=0,
        save_steps=0,
        logging_steps=0,
        disable_tqdm=True,
        report_to="none",
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _no_timing(records):
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]


# ---------------------------------------------------------------------------------------------------------
# Which rows each rank trains, step by step
# ---------------------------------------------------------------------------------------------------------


def _reference_steps(order, batch, world_size, rank, accum, drop_last):
    """transformers + accelerate: a BatchSampler over the epoch's order, sharded by BatchSamplerShard
    (even_batches) when there are several processes, cut into optimizer steps of `accum` batches, the
    last step taking the remainder (Trainer._run_epoch)."""
    from accelerate.data_loader import BatchSamplerShard
    from torch.utils.data import BatchSampler, SequentialSampler

    sampler = BatchSampler(SequentialSampler(range(len(order))), batch, drop_last)
    if world_size > 1:
        sampler = BatchSamplerShard(sampler, num_processes=world_size, process_index=rank, even_batches=True)
    batches = [[order[i] for i in b] for b in sampler]
    return [batches[i : i + accum] for i in range(0, len(batches), accum)]


@pytest.mark.parametrize("drop_last", [False, True])
@pytest.mark.parametrize("world_size", [1, 2, 3])
@pytest.mark.parametrize("accum", [1, 2, 3])
def test_steps_and_shards_equal_transformers_and_accelerate(tmp_path, world_size, accum, drop_last):
    for num_rows in (1, 3, 5, 8, 12, 17, 24):
        for batch in (1, 4, 8):
            config = _config(
                tmp_path,
                per_device_train_batch_size=batch,
                gradient_accumulation_steps=accum,
                dataloader_drop_last=drop_last,
                num_train_epochs=2.5,
            )
            order = loop.epoch_order(num_rows, seed=3, epoch=1)
            reference = [
                _reference_steps(order, batch, world_size, r, accum, drop_last) for r in range(world_size)
            ]
            if not reference[0]:  # drop_last with fewer rows than a global micro-batch: nothing would train
                with pytest.raises(ConfigError, match="fewer than one micro-batch"):
                    loop.plan_steps(num_rows, config, world_size)
                continue
            steps_per_epoch, total = loop.plan_steps(num_rows, config, world_size)
            assert steps_per_epoch == len(reference[0]), (num_rows, batch)
            assert total == int(np.ceil(2.5 * steps_per_epoch))
            for rank in range(world_size):
                ours = [loop.step_indices(order, p, config, rank, world_size) for p in range(steps_per_epoch)]
                assert ours == reference[rank], (num_rows, batch, rank)


def test_every_row_trains_every_epoch_and_random_reshuffles(tmp_path):
    # 12 rows, batch 4, accumulation 2: per epoch a step of 8 rows and a short step of 4; 3 epochs.
    config = _config(tmp_path, gradient_accumulation_steps=2, num_train_epochs=3)
    _, result, calls = train_recording(config, 12, 0)
    assert result["global_step"] == 6
    assert [len(c) for c in calls] == [4, 4, 4] * 3
    epochs = [sum(calls[3 * e : 3 * e + 3], []) for e in range(3)]
    for e, rows in enumerate(epochs):
        assert sorted(rows) == list(range(12)), e  # each row once per epoch
        assert rows == loop.epoch_order(12, 42, e)  # the seeded order of that epoch
    assert epochs[0] != epochs[1] != epochs[2] != epochs[0]  # reshuffled every epoch
    records = [r for r in _metrics(config.output_dir) if "loss" in r]
    assert [r["epoch"] for r in records] == [2 / 3, 1, 1 + 2 / 3, 2, 2 + 2 / 3, 3]  # as transformers logs it

    sequential = _config(tmp_path, "sequential", train_sampling_strategy="sequential", num_train_epochs=2)
    _, _, calls = train_recording(sequential, 10, 0)
    assert calls == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]] * 2  # the short last micro-batch trains


def _padding_fraction(calls, rows) -> float:
    """Padding tokens / all tokens of the right-padded micro-batches."""
    lengths = [[len(rows[i]["input_ids"]) for i in ids] for ids in calls]
    return 1 - sum(map(sum, lengths)) / sum(len(ls) * max(ls) for ls in lengths)


def test_group_by_length_cuts_padding_and_visits_every_row(tmp_path):
    # 96 rows of 2 to 40 tokens (a seeded draw), the first token a prompt, the rest the completion
    lengths = np.random.default_rng(0).integers(2, 41, 96).tolist()
    rows = [
        {"input_ids": [3 + i % 90] * n, "completion_mask": [0] + [1] * (n - 1), "id": i}
        for i, n in enumerate(lengths)
    ]
    padding = {}
    for strategy in ("random", "group_by_length"):
        config = _config(
            tmp_path,
            strategy,
            per_device_train_batch_size=8,
            num_train_epochs=2,
            train_sampling_strategy=strategy,
        )
        _, _, calls = train_recording(config, 96, 0, rows=rows)
        for e in range(2):
            assert sorted(sum(calls[12 * e : 12 * e + 12], [])) == list(range(96)), (strategy, e)
        padding[strategy] = _padding_fraction(calls, rows)
    # measured: random 0.41, grouped 0.20 (megabatches of only 3 x 8 rows on a set this small)
    assert padding["group_by_length"] < 0.6 * padding["random"], padding


def test_group_by_length_order_equals_transformers(tmp_path):
    from transformers.trainer_pt_utils import get_length_grouped_indices

    rng = np.random.default_rng(0)
    for num_rows, group in ((7, 2), (40, 4), (1000, 4), (3000, 8)):
        lengths = rng.integers(1, 50, num_rows).tolist()
        for epoch in (0, 1):
            # our permutation is torch.randperm under the (seed, epoch) generator: give transformers the same
            mixed = int(np.random.SeedSequence([5, epoch]).generate_state(1)[0])
            theirs = get_length_grouped_indices(
                lengths, group, generator=torch.Generator().manual_seed(mixed)
            )
            ours = loop.epoch_order(num_rows, 5, epoch, "group_by_length", lengths, group_size=group)
            assert ours == theirs, (num_rows, group, epoch)
            assert lengths[ours[0]] == max(lengths) and sorted(ours) == list(range(num_rows))


def test_group_by_length_reads_the_length_column(tmp_path):
    from datasets import Dataset

    rows = [{"input_ids": [1] * (i + 1), "size": 100 - i} for i in range(6)]
    assert loop.row_lengths(rows, "size") == [100 - i for i in range(6)]
    assert loop.row_lengths(Dataset.from_list(rows), "size") == [100 - i for i in range(6)]
    assert loop.row_lengths(Dataset.from_list(rows), "length") == [1, 2, 3, 4, 5, 6]  # no such column
    with pytest.raises(ConfigError, match=r"neither a length_column_name='size' column nor input_ids"):
        loop.row_lengths([{"tokens": [1, 2]}], "size")
    with pytest.raises(
        ConfigError,
        match=r"train_sampling_strategy must be one of random, sequential, group_by_length, got 'shuffle'",
    ):
        TrainConfig(train_sampling_strategy="shuffle")


# ---------------------------------------------------------------------------------------------------------
# Resume, final evaluation
# ---------------------------------------------------------------------------------------------------------


class Killed(RuntimeError):
    pass


def test_resume_after_a_short_step_continues_exactly(tmp_path, monkeypatch):
    """12 rows, batch 4, accumulation 2: steps of 2 and 1 micro-batches; checkpoint 2 is written right
    after the short step (an epoch boundary); a run killed in step 3 resumes from it exactly."""
    kwargs = dict(gradient_accumulation_steps=2, num_train_epochs=3, save_steps=2)

    def fit(name, model, loss_fn=nll_loss_fn, **extra):
        config = _config(tmp_path, name, **kwargs, **extra)
        state = loop.start(config, "test")
        loop.fit(state, model, None, make_rows(12), collate, loss_fn, count_fn)
        return config

    straight_model = build_model(attention_dropout=0.1)
    straight = fit("straight", straight_model)

    calls = [0]

    def killing(model, batch, num_items):
        calls[0] += 1
        if calls[0] > 4:  # 2 + 1 micro-batches, then one of step 3
            raise Killed
        return nll_loss_fn(model, batch, num_items)

    with pytest.raises(Killed):
        fit("killed", build_model(attention_dropout=0.1), killing)
    out = tmp_path / "killed"
    assert [r["step"] for r in _metrics(out)] == [1, 2]
    resumed_model = build_model(attention_dropout=0.1, seed=1)
    fit("killed", resumed_model, resume_from_checkpoint="latest")
    assert _no_timing(_metrics(out)) == _no_timing(_metrics(straight.output_dir))
    for (name, a), b in zip(
        straight_model.state_dict().items(), resumed_model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_resuming_from_the_final_checkpoint_writes_no_second_final_eval(tmp_path):
    config = _config(tmp_path, max_steps=3, save_steps=3)
    train_recording(config, 12, 5)
    first = _metrics(config.output_dir)
    assert [(r["step"], "eval_loss" in r) for r in first] == [(1, False), (2, False), (3, False), (3, True)]

    again = _config(tmp_path, max_steps=3, save_steps=3, resume_from_checkpoint="latest")
    train_recording(again, 12, 5)
    assert _metrics(config.output_dir) == first

    # Killed between the final checkpoint and the final evaluation: resuming evaluates once.
    path = Path(config.output_dir) / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in first[:-1]))
    train_recording(again, 12, 5)
    after = _metrics(config.output_dir)
    assert len(after) == 4 and after[-1]["eval_loss"] == pytest.approx(first[-1]["eval_loss"], rel=1e-6)


def test_eval_with_fewer_rows_than_processes_sums_to_the_one_process_values(tmp_path):
    """Rank by rank without a process group (the all-reduce is then the sum the test takes): 1 eval row
    over 2 ranks leaves rank 0 empty; it contributes zeros, rank 1 the row's whole values."""
    model, rows = build_model(), make_rows(1, "test")
    one = loop.Run(config=_config(tmp_path), command="test", output_dir=tmp_path, device=torch.device("cpu"))
    single = loop.evaluate(one, model, rows, collate, nll_loss_fn, count_fn)
    ranks = [
        loop.evaluate(
            loop.Run(
                config=one.config,
                command="test",
                output_dir=tmp_path,
                device=one.device,
                rank=r,
                world_size=2,
            ),
            model,
            rows,
            collate,
            nll_loss_fn,
            count_fn,
        )
        for r in range(2)
    ]
    assert ranks[0] == {"eval_loss": 0.0, "eval_mean_token_accuracy": 0.0}
    assert ranks[1] == single and single["eval_loss"] > 0


# ---------------------------------------------------------------------------------------------------------
# Two processes (torchrun, gloo on the CPU)
# ---------------------------------------------------------------------------------------------------------


def _torchrun(args, timeout=300):
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *args]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]


COMMON = ["--learning_rate", "3e-3", "--warmup_steps", "0", "--save_steps", "0", "--logging_steps", "0"]
COMMON += ["--disable_tqdm", "--report_to", "none", "--num_train_epochs", "3", "--eval_steps", "2"]
WORKER = str(Path(__file__).parent / "_epochs_worker.py")


@pytest.mark.slow
def test_two_processes_equal_one_on_an_uneven_epoch_with_eval(tmp_path):
    """20 rows over 2 ranks x 4 rows x accumulation 2: per epoch a step of 2 global micro-batches and a
    short one of 1, whose last 4 rows come from the start of the order (even_batches). One process with
    batch 8 on the same 24 rows (sequential) takes the same steps. Eval: 5 rows split over the ranks,
    and 1 row (fewer than the processes), all-reduced equal to one process."""
    options = ["--per_device_train_batch_size", "4", "--gradient_accumulation_steps", "2"]
    options += ["--train_sampling_strategy", "sequential", "--per_device_eval_batch_size", "2"]
    _torchrun([WORKER, str(tmp_path / "ddp"), "20", "5", *COMMON, *options])
    seen = [
        [json.loads(line) for line in (tmp_path / f"ddp_seen_rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    assert seen[0][:3] == [[0, 1, 2, 3], [8, 9, 10, 11], [16, 17, 18, 19]]
    assert seen[1][:3] == [[4, 5, 6, 7], [12, 13, 14, 15], [0, 1, 2, 3]]  # completed from the start

    config = _config(
        tmp_path,
        "one",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
        train_sampling_strategy="sequential",
        num_train_epochs=3,
        eval_steps=2,
        per_device_eval_batch_size=2,
    )
    rows = id_rows(20)
    train_recording(config, 20, 5, rows=rows + rows[:4])
    ddp, one = _metrics(tmp_path / "ddp"), _metrics(tmp_path / "one")
    assert [(r["step"], "eval_loss" in r) for r in ddp] == [(r["step"], "eval_loss" in r) for r in one]
    assert len(ddp) == 6 + 3
    for a, b in zip(ddp, one, strict=True):
        assert a["epoch"] == b["epoch"]
        keys = (
            ("eval_loss", "eval_mean_token_accuracy", "eval_one_row_loss")
            if "eval_loss" in a
            else ("loss", "grad_norm", "mean_token_accuracy", "num_tokens")
        )
        for key in keys:
            assert a[key] == pytest.approx(b[key], rel=1e-5), (a["step"], key)


@pytest.mark.slow
def test_two_processes_reshuffle_every_epoch(tmp_path):
    options = ["--per_device_train_batch_size", "2", "--gradient_accumulation_steps", "2", "--seed", "7"]
    _torchrun([WORKER, str(tmp_path / "ddp"), "10", "0", *COMMON, *options])
    seen = [
        [json.loads(line) for line in (tmp_path / f"ddp_seen_rank{r}.jsonl").read_text().splitlines()]
        for r in range(2)
    ]
    # 10 rows, global micro-batch 4: 3 per epoch (the last completed with 2 rows from the epoch's start)
    assert [len(s) for s in seen] == [9, 9]
    for epoch in range(3):
        order = loop.epoch_order(10, 7, epoch)
        trained = [row for m in range(3 * epoch, 3 * epoch + 3) for rank in range(2) for row in seen[rank][m]]
        assert trained == order + order[:2], epoch
    assert loop.epoch_order(10, 7, 0) != loop.epoch_order(10, 7, 1)


@pytest.mark.slow
def test_sft_under_two_processes_resumes_exactly_across_epoch_boundaries(tmp_path):
    """`posttrain sft` under torchrun, 20 rows, 2 ranks x 4 rows x accumulation 2 (steps of 2 and 1
    global micro-batches), random order, 3 epochs: resumed from checkpoint 1 into another folder, steps
    2..6 (two epoch boundaries, two short steps) and the final weights equal the uninterrupted run's."""
    from safetensors.torch import load_file

    from posttrain.data import embedded

    data = tmp_path / "train.jsonl"
    rows = embedded.rows("prompt_completion", "train", seed=0)[:20]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = ["-m", "posttrain.cli", "sft", "--dataset_name", str(data), "--per_device_train_batch_size", "4"]
    args += ["--gradient_accumulation_steps", "2", "--num_train_epochs", "3", "--save_steps", "1"]
    args += ["--learning_rate", "3e-3", "--disable_tqdm", "--report_to", "none"]
    _torchrun([*args, "--output_dir", str(tmp_path / "full")])
    _torchrun(
        [
            *args,
            "--output_dir",
            str(tmp_path / "resumed"),
            "--resume_from_checkpoint",
            str(tmp_path / "full" / "checkpoint-1"),
        ]
    )
    full, resumed = _metrics(tmp_path / "full"), _metrics(tmp_path / "resumed")
    assert [r["step"] for r in full] == [1, 2, 3, 4, 5, 6]
    assert [r["epoch"] for r in full] == [2 / 3, 1, 1 + 2 / 3, 2, 2 + 2 / 3, 3]
    assert _no_timing(resumed) == _no_timing(full[1:])
    a, b = (
        load_file(tmp_path / "full" / "model.safetensors"),
        load_file(tmp_path / "resumed" / "model.safetensors"),
    )
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_keeps_the_data_order_options(tmp_path):
    config = _config(tmp_path, max_steps=2, save_steps=2, train_sampling_strategy="sequential")
    train_recording(config, 12, 0)
    ckpt = str(Path(config.output_dir) / "checkpoint-2")
    for name, value, saved in (
        ("train_sampling_strategy", "random", "sequential"),
        ("dataloader_drop_last", True, False),
        ("length_column_name", "size", "length"),
    ):
        options = {"train_sampling_strategy": "sequential", name: value}
        changed = _config(tmp_path, "other", max_steps=2, resume_from_checkpoint=ckpt, **options)
        with pytest.raises(
            ConfigError, match=rf"{name}={value} but checkpoint .* with {name}={saved}; resume with the same"
        ):
            loop.start(changed, "test")


def test_resume_refuses_a_checkpoint_with_another_step_count(tmp_path):
    """A checkpoint whose steps_per_epoch differs (an older version dropped an epoch's leftover rows)
    cannot give the same data position: refused instead of resumed at the wrong rows."""
    config = _config(tmp_path, max_steps=2, save_steps=2, train_sampling_strategy="sequential")
    train_recording(config, 12, 0)
    ckpt = Path(config.output_dir) / "checkpoint-2"
    state_path = ckpt / "trainer_state.json"
    state = json.loads(state_path.read_text())
    state["steps_per_epoch"] += 1
    state_path.write_text(json.dumps(state))
    resumed = _config(
        tmp_path, "other", max_steps=3, resume_from_checkpoint=str(ckpt), train_sampling_strategy="sequential"
    )
    with pytest.raises(ValueError, match=r"steps per epoch where this version counts .* start a new run"):
        train_recording(resumed, 12, 0)
