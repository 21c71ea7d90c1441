"""Faults a long run meets: non-finite steps, failed writes, preemption signals (posttrain/rl/faults.py).

The reference for every "the run can go on from here" claim is an uninterrupted run of the same
config: a resumed run must log the same per-step losses (exactly) and end with the same weights.
"""

from __future__ import annotations

import errno
import io
import json
import math
import os
import random
import re
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
import transformers.modeling_utils
from _ddp_worker import build_model, collate, count_fn, make_rows, nll_loss_fn, train

from posttrain.cli import main
from posttrain.rl import checkpoint, faults, loop
from posttrain.rl.config import TrainConfig


def _config(tmp_path, name="run", **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / name),
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        max_steps=6,
        warmup_steps=1,
        save_steps=2,
        logging_steps=0,
        disable_tqdm=True,
        report_to="none",
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(output_dir) if "loss" in r}


def _assert_same_weights(a, b):
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), name


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    """6 steps uninterrupted, checkpoints at 2, 4, 6 (attention dropout on: the RNG must resume too)."""
    tmp_path = tmp_path_factory.mktemp("straight")
    run, model, _ = train(_config(tmp_path), model=build_model(attention_dropout=0.1))
    return run, model


def _loss_fn_poisoned_at(steps: set[int], micro_batches_per_step: int = 1):
    """nll_loss_fn whose loss (and so gradient) is NaN in the first micro-batch of each step in `steps`."""
    calls = []

    def loss_fn(model, batch, num_items):
        calls.append(None)
        loss, metrics = nll_loss_fn(model, batch, num_items)
        step = (len(calls) - 1) // micro_batches_per_step + 1
        if step in steps and (len(calls) - 1) % micro_batches_per_step == 0:
            loss = loss * float("nan")
        return loss, metrics

    return loss_fn


def _fit(config, loss_fn, model=None):
    run = loop.start(config, "test")
    model = build_model() if model is None else model
    return run, model, loop.fit(run, model, None, make_rows(48), collate, loss_fn, count_fn)


# ---------------------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------------------


def test_nonfinite_step_stops_before_its_update(tmp_path):
    """NaN in step 3 (of 2 micro-batches): the run stops naming step 3 and checkpoint-2; the weights are
    exactly those after step 2 (the update was never applied), metrics end at step 2, no final model."""
    config = _config(tmp_path, gradient_accumulation_steps=2, per_device_train_batch_size=2,
                     lr_scheduler_type="constant", warmup_steps=0)  # fmt: skip
    model = build_model()
    with pytest.raises(faults.NonFiniteStep) as caught:
        _fit(config, _loss_fn_poisoned_at({3}, micro_batches_per_step=2), model)
    message = str(caught.value)
    assert re.search(r"^step 3: loss nan, grad_norm nan are not finite", message), message
    assert "checkpoint-2' (step 2); resume with: posttrain test --config" in message
    assert sorted(_losses(config.output_dir)) == [1, 2]
    assert not (Path(config.output_dir) / "model.safetensors").exists()

    reference = _fit(_config(tmp_path, "two", gradient_accumulation_steps=2, per_device_train_batch_size=2,
                             lr_scheduler_type="constant", warmup_steps=0, max_steps=2), nll_loss_fn)[1]  # fmt: skip
    _assert_same_weights(model, reference)


def test_cli_stops_on_a_diverging_run_and_saves_no_nan_model(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["sft", "--learning_rate", "1e38", "--max_grad_norm", "0", "--max_steps", "5", "--save_steps", "2"]
    argv += ["--eval_steps", "0", "--disable_tqdm", "true", "--report_to", "none", "--output_dir", str(out)]
    assert main(argv) == 1
    err = capsys.readouterr().err
    # warmup: step 1 runs at lr 0, step 2 at 5e36 (weights ~1e36 but finite), step 3 overflows.
    assert re.search(r"posttrain sft: step 3: loss nan, grad_norm nan are not finite", err), err
    assert f"the last checkpoint is '{out / 'checkpoint-2'}' (step 2)" in err
    assert sorted(r["step"] for r in _metrics(out)) == [1, 2]
    assert not (out / "model.safetensors").exists()
    from safetensors.torch import load_file

    weights = load_file(out / "checkpoint-2" / "model.safetensors")
    assert all(torch.isfinite(t).all() for t in weights.values())


def test_skip_nonfinite_steps_skips_then_stops(tmp_path):
    """skip_nonfinite_steps 1: step 3 is skipped (no update, optimizer state and schedule kept, data moves
    on); steps 5 and 6 in a row stop the run at 6."""
    snapshots = {}
    poisoned = _loss_fn_poisoned_at({3, 5, 6})

    def loss_fn(model, batch, num_items):
        snapshots[len(snapshots) + 1] = [
            p.detach().clone() for p in model.parameters()
        ]  # at each step's start
        return poisoned(model, batch, num_items)

    config = _config(tmp_path, skip_nonfinite_steps=1, save_steps=4, max_steps=8, warmup_steps=0)
    with pytest.raises(
        faults.NonFiniteStep, match=r"^step 6: loss nan.*\(2 in a row, skip_nonfinite_steps=1"
    ):
        _fit(config, loss_fn)
    records = _metrics(config.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert [r["skipped_steps"] for r in records] == [0, 0, 1, 1, 2]
    assert math.isnan(records[2]["loss"]) and math.isfinite(records[3]["loss"])
    # The skipped step changed no weight; the steps around it did.
    assert all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4], strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[4], snapshots[5], strict=True))
    # The linear schedule counts applied updates: step 4 runs at step 3's rate, step 5 one further on.
    peak, total = 3e-3, 8
    expected = [peak * (total - k) / total for k in (0, 1, 2, 2, 3)]
    assert [r["learning_rate"] for r in records] == pytest.approx(expected, rel=1e-12)
    # Adam's own step count saw 3 updates by the checkpoint at step 4 (steps 1, 2, 4).
    state = torch.load(Path(config.output_dir) / "checkpoint-4" / "optimizer.pt", weights_only=True)
    assert {float(s["step"]) for s in state["state"].values()} == {3.0}
    assert checkpoint.read_trainer_state(Path(config.output_dir) / "checkpoint-4")["skipped_steps"] == 1


def test_accumulate_without_a_guard_refuses_a_nonfinite_step(tmp_path):
    run = loop.Run(config=_config(tmp_path), command="test", output_dir=tmp_path, device=torch.device("cpu"))
    model = build_model()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = loop.build_optimizer(model, run.config, 1e-3)
    scheduler = loop.build_scheduler(optimizer, run.config, total_steps=10)
    with pytest.raises(faults.NonFiniteStep, match=r"loss nan, grad_norm nan are not finite"):
        loop.accumulate(run, model, optimizer, scheduler, [collate(make_rows(4))],
                        _loss_fn_poisoned_at({1}), count_fn)  # fmt: skip
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters(), strict=True))
    assert all(p.grad is None for p in model.parameters()) and scheduler.last_epoch == 0


# ---------------------------------------------------------------------------------------------------------
# Failed writes
# ---------------------------------------------------------------------------------------------------------


def _enospc(path) -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


class _FullDisk:
    """Fails the write of the first file whose path matches `pattern` (after `skip` whole writes to it)
    with ENOSPC: files opened through open() raise from write(); safetensors files (written in Rust)
    raise from transformers' save call."""

    def __init__(self, monkeypatch, pattern: str, skip: int = 0):
        self.pattern, self.hit, self.skip = re.compile(pattern), None, skip
        real_open, real_save_file = io.open, transformers.modeling_utils.safe_save_file

        def failing_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            if any(m in mode for m in "wax") and self._matches(file):
                real_write = f.write

                def write(data):
                    if self.skip > 0:
                        self.skip -= 1
                        return real_write(data)
                    if self.hit is None or self.hit == str(file):
                        self.hit = str(file)
                        raise _enospc(file)
                    return real_write(data)

                f = _Proxy(f, write)
            return f

        def failing_save_file(tensors, filename, *args, **kwargs):
            if self._matches(filename) and self.hit is None:
                self.hit = str(filename)
                raise _enospc(filename)
            return real_save_file(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(io, "open", failing_open)
        monkeypatch.setattr("builtins.open", failing_open)
        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save_file)

    def _matches(self, path) -> bool:
        return isinstance(path, (str, os.PathLike)) and bool(self.pattern.search(str(path)))


class _Proxy:
    """A file object whose write is replaced (io's file objects do not take attribute assignment)."""

    def __init__(self, f, write):
        self._f, self.write = f, write

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


SEP = re.escape(os.sep)
WRITES = {  # each write of the save sequence: the checkpoint at step 4, the final model, a metrics line
    "weights": rf"checkpoint-4\.tmp{SEP}model\.safetensors$",
    "model config": rf"checkpoint-4\.tmp{SEP}config\.json$",
    "tokenizer": rf"checkpoint-4\.tmp{SEP}tokenizer_config\.json$",
    "optimizer": rf"checkpoint-4\.tmp{SEP}optimizer\.pt$",
    "scheduler": rf"checkpoint-4\.tmp{SEP}scheduler\.pt$",
    "rng": rf"checkpoint-4\.tmp{SEP}rng_state_rank0\.pt$",
    "trainer state": rf"checkpoint-4\.tmp{SEP}trainer_state\.json\.part$",
    "final model": rf"run{SEP}model\.safetensors$",
    "metrics line": rf"run{SEP}metrics\.jsonl$",
}


@pytest.mark.parametrize("what", list(WRITES))
def test_failed_write_stops_keeps_the_last_checkpoint_and_resumes_exactly(
    what, straight, tmp_path, monkeypatch
):
    run_a, model_a = straight
    config = _config(tmp_path)
    disk = _FullDisk(monkeypatch, WRITES[what], skip=2 if what == "metrics line" else 0)  # metrics: step 3
    with pytest.raises(faults.WriteFailed) as caught:
        train(config, model=build_model(attention_dropout=0.1))
    monkeypatch.undo()
    out = Path(config.output_dir)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"could not write {disk.hit!r}: No space left on device; the run stopped;"), (
        message
    )
    last = 6 if what == "final model" else 2
    assert (
        f"the last checkpoint is '{out / f'checkpoint-{last}'}' (step {last}); resume with: posttrain test"
        in message
    )
    assert not list(out.glob("*.tmp")) and not list(out.glob("*.old"))
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == ([2, 4, 6] if last == 6 else [2])

    if what == "final model":
        return  # the training itself is complete; only the final model's write failed
    resumed = _config(tmp_path, resume_from_checkpoint="latest")
    run_b, model_b, _ = train(resumed, model=build_model(attention_dropout=0.1, seed=1))
    assert _losses(run_b.output_dir) == _losses(run_a.output_dir)
    _assert_same_weights(model_a, model_b)


def test_cli_names_a_path_that_is_a_file(tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint-1.tmp").write_text("a file where the checkpoint's folder goes")
    argv = ["sft", "--max_steps", "1", "--save_steps", "1", "--eval_steps", "0", "--disable_tqdm", "true"]
    assert main([*argv, "--report_to", "none", "--output_dir", str(out)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert re.match(rf"posttrain sft: could not write '{re.escape(str(out))}/checkpoint-1\.tmp.*': ", err), (
        err
    )
    assert "no checkpoint was written: a new run starts from step 0" in err


# ---------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------


def test_sigint_stops_after_the_step_with_a_checkpoint_and_resumes_exactly(straight, tmp_path):
    run_a, model_a = straight
    calls = []

    def interrupted(model, batch, num_items):
        calls.append(None)
        if len(calls) == 3:  # during step 3
            os.kill(os.getpid(), signal.SIGINT)
        return nll_loss_fn(model, batch, num_items)

    config = _config(tmp_path, save_steps=4)
    handler = signal.getsignal(signal.SIGINT)
    with pytest.raises(faults.Preempted) as caught:
        _fit(config, interrupted, build_model(attention_dropout=0.1))
    assert signal.getsignal(signal.SIGINT) is handler  # restored
    assert caught.value.exit_code == 130
    out = Path(config.output_dir)
    assert str(caught.value) == (
        f"stopped by SIGINT after step 3, checkpoint '{out / 'checkpoint-3'}' written; "
        f"resume with: posttrain test --config {out / 'config.yaml'} --resume_from_checkpoint latest"
    )
    assert sorted(_losses(out)) == [1, 2, 3]
    run_b, model_b, _ = train(_config(tmp_path, save_steps=4, resume_from_checkpoint="latest"),
                              model=build_model(attention_dropout=0.1))  # fmt: skip
    assert _losses(out) == _losses(run_a.output_dir)
    _assert_same_weights(model_a, model_b)


def test_the_same_signal_again_ends_the_process_at_once(tmp_path):
    script = textwrap.dedent("""
        import time
        from posttrain.rl.faults import SignalWatch
        watch = SignalWatch(same_request_s=0.5).install()
        print("ready", flush=True)
        while True:
            time.sleep(0.05)
    """)
    proc = subprocess.Popen(
        [sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    assert "SIGTERM: stopping after this optimizer step" in _read_until(proc.stderr, "a second signal")
    proc.send_signal(signal.SIGTERM)  # within 0.5 s: the same request delivered twice, ignored
    with pytest.raises(subprocess.TimeoutExpired):
        proc.wait(timeout=0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=30) == -signal.SIGINT  # killed by the signal's default action


def _read_until(stream, text: str) -> str:
    seen = ""
    while text not in seen:
        line = stream.readline()
        assert line, seen
        seen += line
    return seen


def _subprocess_env() -> dict:
    """This checkout first on the path (torchrun's workers run a script, not `-m` from the repository root)."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    return env


# Long enough that a signal sent once the first steps are logged lands well before the end (a tiny-model step
# takes milliseconds: with 8 steps the run could finish between the poll and the signal).
SFT_STEPS = 200


def _sft_cmd(out: Path, nproc: int) -> list[str]:
    argv = ["sft", "--max_steps", str(SFT_STEPS), "--save_steps", "1000", "--eval_steps", "0"]
    argv += ["--logging_steps", "0"]
    argv += [
        "--per_device_train_batch_size",
        str(8 // nproc),
        "--disable_tqdm",
        "true",
        "--report_to",
        "none",
    ]
    if nproc == 1:
        return [sys.executable, "-m", "posttrain.cli", *argv, "--output_dir", str(out)]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    return [*torchrun, "-m", "posttrain.cli", *argv, "--output_dir", str(out)]


def _worker_pid(launcher_pid: int, rank: int) -> int:
    """The pid of torchrun's worker `rank`: a child of the launcher with RANK in its environment."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        for proc in Path("/proc").iterdir():
            try:
                ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
                env = (proc / "environ").read_bytes().split(b"\0") if ppid == launcher_pid else []
            except (OSError, ValueError, IndexError):  # not a process, or one that just ended
                continue
            if f"RANK={rank}".encode() in env:
                return int(proc.name)
        time.sleep(0.2)
    raise AssertionError("torchrun started no worker")


def _runnable(printed: str) -> list[str]:
    """The printed resume command, run with this interpreter (no console script or torchrun on PATH needed)."""
    words = shlex.split(printed)
    if words[0] == "posttrain":
        return [sys.executable, "-m", "posttrain.cli", *words[1:]]
    assert words[:2] == ["torchrun", "--nproc_per_node"]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", *words[1:]]


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_sigterm_at_a_random_step_then_resume_gives_the_same_losses(nproc, tmp_path):
    env = _subprocess_env()
    after = random.Random().randint(1, 4)  # signal once this many steps are logged
    out = tmp_path / "stopped"
    log = (tmp_path / "stderr").open("w+")
    proc = subprocess.Popen(_sft_cmd(out, nproc), env=env, stdout=subprocess.DEVNULL, stderr=log, text=True)
    target = proc.pid if nproc == 1 else _worker_pid(proc.pid, rank=1)  # one rank only: the flag must spread
    metrics = out / "metrics.jsonl"
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= after):
        assert proc.poll() is None, Path(log.name).read_text()[-3000:]
        time.sleep(0.05)
    os.kill(target, signal.SIGTERM)
    code = proc.wait(timeout=300)
    err = Path(log.name).read_text()
    stops = re.findall(
        r"stopped by SIGTERM after step (\d+), checkpoint '([^']+)' written; resume with: (.*)", err
    )
    # Every rank stopped after the same step (torchrun may end a rank before it prints: >= 1 message).
    assert 1 <= len(stops) <= nproc and len({step for step, _, _ in stops}) == 1, err[-3000:]
    step, saved, command = int(stops[0][0]), Path(stops[0][1]), stops[0][2]
    assert code == (143 if nproc == 1 else 1), err[-3000:]  # torchrun exits 1 when its workers fail
    assert after <= step < SFT_STEPS and saved == out / f"checkpoint-{step}"
    assert [p.name for p in sorted(saved.glob("rng_state_rank*.pt"))] == [
        f"rng_state_rank{r}.pt" for r in range(nproc)
    ]
    assert sorted(_losses(out)) == list(range(1, step + 1))

    resumed = subprocess.run(_runnable(command), env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = subprocess.run(_sft_cmd(tmp_path / "straight", nproc), env=env, capture_output=True, text=True,
                              timeout=600)  # fmt: skip
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert _losses(out) == _losses(tmp_path / "straight"), (nproc, after, step)


@pytest.mark.slow
def test_a_failed_write_on_one_rank_stops_every_rank(tmp_path):
    """Under torchrun, rank 1 cannot write its RNG file into checkpoint-4: both ranks stop (no hang, no
    checkpoint-4 committed by rank 0), and checkpoint-2 stays."""
    out = tmp_path / "ddp"
    options = ["--per_device_train_batch_size", "2", "--learning_rate", "3e-3", "--max_steps", "6"]
    options += ["--save_steps", "2", "--logging_steps", "0", "--disable_tqdm", "true", "--report_to", "none"]
    env = _subprocess_env()
    worker = str(Path(__file__).parent / "_faults_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    pattern = rf"checkpoint-4\.tmp{SEP}rng_state_rank1\.pt$"
    done = subprocess.run([*cmd, "1", pattern, str(out), *options], env=env, capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode != 0
    lost = out / "checkpoint-4.tmp" / "rng_state_rank1.pt"
    assert f"rank 1: could not write '{lost}': No space left on device; the run stopped" in done.stderr
    assert f"rank 0: another process could not write into '{out}'; the run stopped" in done.stderr
    assert f"the last checkpoint is '{out / 'checkpoint-2'}' (step 2)" in done.stderr
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2] and not list(out.glob("*.tmp"))


def _mount_tmpfs(path: Path, size: str) -> None:
    path.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.decode().strip()}")


# A checkpoint of the test model takes ~320 KB. With transformers 5.24 these sizes fill the disk in
# checkpoint-4's model.safetensors (safetensors' error), a json file, tokenizer.json (the tokenizers
# library's bare Exception), optimizer.pt (torch.save's RuntimeError over the OSError), the RNG file, and
# in checkpoint-6; the test holds for any file the disk fills on.
@pytest.mark.parametrize("size", ["436k", "444k", "452k", "460k", "660k", "680k"])
def test_a_full_filesystem_stops_the_run_with_the_os_error(size, straight, tmp_path):
    """The real thing on a tiny filesystem: whichever file the disk fills on (safetensors, tokenizer.json
    from Rust, torch.save, json), the run stops naming it and ENOSPC; earlier checkpoints resume exactly."""
    run_a, model_a = straight
    _mount_tmpfs(tmp_path / "small", size)
    try:
        config = _config(tmp_path / "small", "run")
        with pytest.raises(faults.WriteFailed) as caught:
            train(config, model=build_model(attention_dropout=0.1))
        out = Path(config.output_dir)
        found = re.match(rf"could not write '{re.escape(str(out))}/checkpoint-(\d)\.tmp.*No space left on device",
                         str(caught.value))  # fmt: skip
        assert found, str(caught.value)
        step = int(found.group(1))
        assert [s for s, _ in checkpoint.list_checkpoints(out)] == list(range(2, step, 2))
        assert not list(out.glob("*.tmp"))
        shutil.copytree(out, tmp_path / "moved")
    finally:
        subprocess.run(["umount", str(tmp_path / "small")], check=True)
    if step > 2:
        run_b, model_b, _ = train(_config(tmp_path, "moved", resume_from_checkpoint="latest"),
                                  model=build_model(attention_dropout=0.1))  # fmt: skip
        assert _losses(run_b.output_dir) == _losses(run_a.output_dir)
        _assert_same_weights(model_a, model_b)


def test_skip_nonfinite_steps_must_not_be_negative():
    from posttrain.rl.config import ConfigError

    with pytest.raises(ConfigError, match=r"skip_nonfinite_steps must be >= 0"):
        TrainConfig(skip_nonfinite_steps=-1)
