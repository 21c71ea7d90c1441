"""TensorBoard for real: a short embedded SFT run writes events that hold exactly the scalars and steps of
its metrics.jsonl, also after a resume that repeats steps a killed run had already logged.

The events are read back with TensorBoard's own reader (`EventAccumulator`), which stores scalars as
float32: values are compared at float32 precision.
"""

import json
import math
import shutil
import time

import pytest
from _optional import import_or_skip

from posttrain.rl.sft import SFTConfig, train

import_or_skip("tensorboard")  # in the test extra: a failure under CI
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402


def _jsonl_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    """metrics.jsonl as {tensorboard tag: [(step, value)]}: train keys under train/, eval_x under eval/x."""
    out: dict[str, list[tuple[int, float]]] = {}
    for line in (output_dir / "metrics.jsonl").read_text().splitlines():
        record = json.loads(line)
        step = record.pop("step")
        is_eval = any(key.startswith("eval_") for key in record)
        for key, value in record.items():
            if is_eval and key == "epoch":
                continue  # the step already places an evaluation; its epoch is in metrics.jsonl only
            tag = f"eval/{key.removeprefix('eval_')}" if is_eval else f"train/{key}"
            out.setdefault(tag, []).append((step, value))
    return out


def _event_scalars(output_dir) -> dict[str, list[tuple[int, float]]]:
    events = EventAccumulator(str(output_dir / "tensorboard"), size_guidance={"scalars": 0})  # 0: keep all
    events.Reload()
    return {tag: [(e.step, e.value) for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def _assert_same(events, expected):
    assert sorted(events) == sorted(expected)
    for tag, points in expected.items():
        assert [step for step, _ in events[tag]] == [step for step, _ in points], tag
        for (_, got), (_, want) in zip(events[tag], points, strict=True):
            assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-30), (tag, got, want)  # float32 storage


@pytest.mark.slow
def test_events_hold_the_metrics_of_metrics_jsonl(tmp_path):
    config = dict(
        output_dir=str(tmp_path),
        max_steps=3,
        save_steps=2,
        eval_steps=2,
        report_to="tensorboard",
        disable_tqdm=True,
        per_device_train_batch_size=8,
    )
    train(SFTConfig(**config))
    expected = _jsonl_scalars(tmp_path)
    assert {"train/loss", "train/mean_token_accuracy", "train/num_tokens", "eval/loss"} <= set(expected)
    assert [s for s, _ in expected["train/loss"]] == [1, 2, 3] and [s for s, _ in expected["eval/loss"]] == [
        2,
        3,
    ]
    _assert_same(_event_scalars(tmp_path), expected)

    # A killed run resumed from checkpoint-2 logs step 3 again: TensorBoard must show it once, as
    # metrics.jsonl does (its lines after the checkpoint are dropped at resume).
    # Event files are read in name order, "events.out.tfevents.<second>.<host>.<pid>.<counter>": a resumed
    # run is a later process, so its file sorts last; in this one process, a later second does the same
    # (the counter alone compares as text: "10" < "9").
    time.sleep(1.1)
    train(SFTConfig(**config, resume_from_checkpoint=str(tmp_path / "checkpoint-2")))
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 2
    resumed = _jsonl_scalars(tmp_path)
    assert [s for s, _ in resumed["train/loss"]] == [1, 2, 3]
    _assert_same(_event_scalars(tmp_path), resumed)

    # A fresh run in the same folder (its checkpoints removed) starts metrics.jsonl anew: TensorBoard too
    # (the earlier event files are removed).
    for path in tmp_path.glob("checkpoint-*"):
        shutil.rmtree(path)
    train(SFTConfig(**{**config, "max_steps": 2, "save_steps": 0}))
    fresh = _jsonl_scalars(tmp_path)
    assert [s for s, _ in fresh["train/loss"]] == [1, 2]
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_same(_event_scalars(tmp_path), fresh)
