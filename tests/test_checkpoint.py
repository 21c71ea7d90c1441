"""Checkpoint files (posttrain/rl/checkpoint.py): a save killed at any point leaves one whole checkpoint
after start-up recovery; loading names what does not fit; saving draws no transformers progress bar.

The reference for a recovered checkpoint is the uninterrupted run's copy of the same step (resume is
exact, so the old and the new copy of a re-saved step hold the same weights).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch
from _ddp_worker import MODEL_KWARGS, build_model, collate, count_fn, make_rows, nll_loss_fn, train
from safetensors.torch import load_file
from transformers.utils import logging as hf_logging

from posttrain.data import embedded
from posttrain.rl import checkpoint, loop
from posttrain.rl.config import TrainConfig


class Killed(BaseException):
    """The process dies here (BaseException: nothing in the package may catch it)."""


def _config(output_dir, **overrides):
    kwargs = dict(
        output_dir=str(output_dir),
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        max_steps=6,
        warmup_steps=1,
        save_steps=2,
        logging_steps=0,
        disable_tqdm=True,
        report_to="none",
    )
    return TrainConfig(**(kwargs | overrides))


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps, checkpoints at 2, 4, 6."""
    run, _, _ = train(_config(tmp_path_factory.mktemp("straight") / "run"))
    return run.output_dir


def _leftovers(out: Path) -> list[str]:
    return sorted(p.name for p in out.iterdir() if p.suffix in (".tmp", ".old", ".deleted"))


def _assert_loads_as(path: Path, reference: Path) -> None:
    """`path` is a complete checkpoint that load_checkpoint restores, with `reference`'s weights."""
    config = _config(path.parent, resume_from_checkpoint=str(path))
    run = loop.Run(config=config, command="test", output_dir=path.parent, device=torch.device("cpu"))
    model = build_model(seed=1)
    optimizer = loop.build_optimizer(model, config, 3e-3)
    scheduler = loop.build_scheduler(optimizer, config, 6)
    state = checkpoint.load_checkpoint(run, path, model, optimizer, scheduler)
    assert state["global_step"] == int(path.name.split("-")[1])
    expected = load_file(reference / "model.safetensors")
    assert set(expected) <= set(model.state_dict())
    for name, tensor in expected.items():
        assert torch.equal(model.state_dict()[name], tensor), name


# ---------------------------------------------------------------------------------------------------------
# A save killed at each point
# ---------------------------------------------------------------------------------------------------------


def _kill_at(monkeypatch, index: int, when: str, match: str) -> list:
    """Raise Killed at the `index`-th os.replace / shutil.rmtree call on a path containing `match`,
    before the call (`when`='before') or after it did its work ('after'). Returns the calls seen."""
    seen = []
    real = {"replace": os.replace, "rmtree": shutil.rmtree}

    def wrap(name):
        def call(*args, **kwargs):
            if not any(match in str(a) for a in args[:2]):
                return real[name](*args, **kwargs)
            seen.append((name, *map(str, args[:2])))
            if len(seen) - 1 == index and when == "before":
                raise Killed
            result = real[name](*args, **kwargs)
            if len(seen) - 1 == index:
                raise Killed
            return result

        return call

    monkeypatch.setattr(os, "replace", wrap("replace"))
    monkeypatch.setattr(shutil, "rmtree", wrap("rmtree"))
    return seen


def test_resave_killed_at_each_point_leaves_one_whole_checkpoint(straight, tmp_path, monkeypatch):
    """Resuming from checkpoint-2 re-saves checkpoint-4, which exists: kill that save before and after
    each rename and delete it makes; start-up recovery must then leave exactly one checkpoint-4."""
    points = 0
    for index in range(20):
        for when in ("before", "after"):
            out = tmp_path / f"{index}-{when}"
            shutil.copytree(straight, out)
            config = _config(out, resume_from_checkpoint=str(out / "checkpoint-2"))
            seen = _kill_at(monkeypatch, index, when, match="checkpoint-4")
            try:
                train(config)
            except Killed:
                points += 1
            else:
                monkeypatch.undo()
                assert points >= 8, (
                    seen
                )  # rmtree(.tmp), rename of trainer_state, old aside, new in, rmtree(.old)
                return
            finally:
                monkeypatch.undo()
            checkpoint.clean_temporary(out)  # what the next start does first
            assert _leftovers(out) == [], (index, when, seen[index])
            assert [s for s, _ in checkpoint.list_checkpoints(out)] == [2, 4, 6]
            _assert_loads_as(out / "checkpoint-4", straight / "checkpoint-4")
    raise AssertionError("the save never completed")


def test_prune_killed_midway_leaves_no_half_deleted_checkpoint(tmp_path, monkeypatch):
    out = tmp_path / "run"
    seen = _kill_at(monkeypatch, 1, "before", match="checkpoint-1.deleted")  # 0: the rename, 1: the delete
    with pytest.raises(Killed):
        train(_config(out, max_steps=3, save_steps=1, save_total_limit=2))
    monkeypatch.undo()
    assert [name for name, *_ in seen] == ["replace", "rmtree"] and _leftovers(out) == [
        "checkpoint-1.deleted"
    ]
    checkpoint.clean_temporary(out)
    assert _leftovers(out) == [] and [s for s, _ in checkpoint.list_checkpoints(out)] == [2, 3]


def test_recovery_promotes_the_newest_whole_copy_and_deletes_the_rest(straight, tmp_path):
    def copy(step: int, name: str, whole: bool = True):
        shutil.copytree(straight / f"checkpoint-{step}", tmp_path / name)
        if not whole:
            (tmp_path / name / checkpoint.TRAINER_STATE).unlink()

    copy(2, "checkpoint-2.old")  # only the old copy survived: promoted
    copy(4, "checkpoint-4.tmp")  # both whole: the .tmp is the newer copy
    copy(2, "checkpoint-4.old")
    copy(6, "checkpoint-6")  # the checkpoint exists: leftovers go, even whole ones
    copy(6, "checkpoint-6.tmp")
    copy(6, "checkpoint-8.tmp", whole=False)  # killed while writing: deleted
    copy(6, "checkpoint-8.old", whole=False)
    checkpoint.clean_temporary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for step in (2, 4, 6):
        _assert_loads_as(tmp_path / f"checkpoint-{step}", straight / f"checkpoint-{step}")


def test_start_recovers_before_resolving_latest(straight, tmp_path):
    """A kill between moving the old copy aside and the new one in: 'latest' is the promoted copy."""
    out = tmp_path / "run"
    shutil.copytree(straight, out)
    os.replace(out / "checkpoint-6", out / "checkpoint-6.tmp")
    run = loop.start(_config(out, resume_from_checkpoint="latest"), "test")
    assert run.resume_from == out / "checkpoint-6" and _leftovers(out) == []


# ---------------------------------------------------------------------------------------------------------
# Named errors when loading
# ---------------------------------------------------------------------------------------------------------


def _resume(checkpoint_dir: Path, tmp_path: Path, model):
    run = loop.start(_config(tmp_path / "resumed", resume_from_checkpoint=str(checkpoint_dir)), "test")
    return loop.fit(run, model, None, make_rows(48), collate, nll_loss_fn, count_fn)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"num_hidden_layers": 3}, r"do not fit the model: missing \['model\.layers\.2\..*unexpected \[\]"),
        ({"hidden_size": 48}, r"do not fit the model: shapes \(checkpoint vs model\) \['model\.embed_tokens\.weight \(\d+, 32\) vs \(\d+, 48\)"),
    ],
)  # fmt: skip
def test_checkpoint_weights_that_do_not_fit_the_model(straight, tmp_path, change, message):
    model = embedded.build_model(seed=0, **(MODEL_KWARGS | change))
    with pytest.raises(ValueError, match=r"checkpoint weights " + message):
        _resume(straight / "checkpoint-2", tmp_path, model)


@pytest.mark.parametrize(
    "missing", ["model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state_rank0.pt"]
)
def test_missing_checkpoint_files(straight, tmp_path, missing):
    damaged = tmp_path / "checkpoint-2"
    shutil.copytree(straight / "checkpoint-2", damaged)
    (damaged / missing).unlink()
    with pytest.raises(ValueError, match=rf"^checkpoint '{damaged}' is missing {missing}"):
        _resume(damaged, tmp_path, build_model())


# ---------------------------------------------------------------------------------------------------------
# Progress bars while saving
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("user_setting", [True, False])
def test_saving_draws_no_transformers_progress_bar_and_keeps_the_users_setting(tmp_path, capfd, user_setting):
    model = build_model()
    run = loop.Run(config=_config(tmp_path), command="test", output_dir=tmp_path, device=torch.device("cpu"))
    (hf_logging.enable_progress_bar if user_setting else hf_logging.disable_progress_bar)()
    try:
        model.save_pretrained(tmp_path / "direct")
        direct = capfd.readouterr().err
        checkpoint.save_model(run, model, embedded.build_tokenizer(), tmp_path / "ours")
        ours = capfd.readouterr().err
        assert hf_logging.is_progress_bar_enabled() is user_setting
    finally:
        hf_logging.enable_progress_bar()
    assert ("Writing model shards" in direct) is user_setting  # the bar the save hides exists
    assert "Writing model shards" not in ours
    assert (tmp_path / "ours" / "model.safetensors").is_file()
