"""Faults a long run meets besides bad input: a non-finite step, a failed write, a preemption signal.

Each one stops the run with a `RunStopped` whose one-line message says what happened, where, and how to
resume; the CLI prints it and exits with its `exit_code`. What the loop has written stays whole: the
last checkpoint, and metrics.jsonl up to the last step that was applied.

- Non-finite steps: `loop.accumulate` reads the loss and the gradient norm in the one host transfer each
  optimizer step makes anyway, before `optimizer.step()`, so a step whose loss or gradient norm is NaN
  or infinite never reaches the weights. `StepGuard` then stops the run, or, with skip_nonfinite_steps
  N, lets up to N such steps in a row pass as skipped (gradients dropped, optimizer state kept).
- Failed writes: `writing(path)` turns the errors of a failed write (OSError: no space, permission, a
  path that is a file; the I/O errors of safetensors, of the tokenizers library and of torch.save)
  into `WriteFailed` naming the path and the OS error.
- Preemption: `SignalWatch` turns the first SIGTERM / SIGINT into a request to stop after the current
  optimizer step with a checkpoint (`Preempted`, exit status 128 + signal: 143 / 130); a second signal
  ends the process at once.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import threading
import time
from pathlib import Path


class RunStopped(RuntimeError):
    """A run stopped by a fault; the message is one line, `exit_code` the process's exit status."""

    exit_code = 1


class NonFiniteStep(RunStopped):
    pass


class WriteFailed(RunStopped):
    pass


class Preempted(RunStopped):
    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


def resume_command(run) -> str:
    """The command that continues `run` from its newest checkpoint (its options are in config.yaml)."""
    launcher = (
        "posttrain" if run.world_size == 1 else f"torchrun --nproc_per_node {run.world_size} -m posttrain.cli"
    )
    config = shlex.quote(str(Path(run.output_dir) / "config.yaml"))
    return f"{launcher} {run.command} --config {config} --resume_from_checkpoint latest"


def resume_hint(run) -> str:
    """Where the run can be resumed from, and the command that does it."""
    from posttrain.rl.checkpoint import list_checkpoints

    found = list_checkpoints(run.output_dir)
    if not found:
        return "no checkpoint was written: a new run starts from step 0"
    step, path = found[-1]
    return f"the last checkpoint is {str(path)!r} (step {step}); resume with: {resume_command(run)}"


# ---------------------------------------------------------------------------------------------------------
# Non-finite steps
# ---------------------------------------------------------------------------------------------------------


class StepGuard:
    """What `accumulate` needs to decide each optimizer step: skip or stop on non-finite values, and
    whether a signal asked the run to stop (`install` the signal handlers, `restore` them after).

    With skip_nonfinite_steps = N, up to N non-finite steps in a row are skipped: the data moves on (the
    same batch would fail again) but the weights, the optimizer state and the learning-rate schedule
    stay where they were, as transformers' Trainer does for a step its fp16 GradScaler skips (the
    schedule counts applied updates). The next one in a row stops the run. `state()` goes into the
    checkpoint so that a resumed run keeps both counts. `step` is the last optimizer step taken.
    """

    def __init__(self, run, step: int = 0, state: dict | None = None, limit: int | None = None):
        state = state or {}
        self.run = run
        self.step = step
        self.limit = getattr(run.config, "skip_nonfinite_steps", 0) if limit is None else limit
        self.skipped = state.get("skipped_steps", 0)
        self.in_a_row = state.get("nonfinite_steps_in_a_row", 0)
        self.signals = SignalWatch()
        self.stop = False  # every rank's verdict: some rank received a signal

    def install(self) -> StepGuard:
        self.signals.install()
        return self

    def restore(self) -> None:
        self.signals.restore()

    @property
    def stop_requested(self) -> bool:
        """This rank's request to stop (accumulate all-reduces it into `stop`)."""
        return self.signals.received is not None

    def preempted(self, step: int, saved: Path) -> Preempted:
        return self.signals.stop(self.run, step, saved)

    def state(self) -> dict:
        return {"skipped_steps": self.skipped, "nonfinite_steps_in_a_row": self.in_a_row}

    def after_step(self, metrics: dict, finite: bool, stop: bool) -> None:
        """Record a step whose values are in `metrics`; raise NonFiniteStep past the limit.

        Adds `skipped_steps` (the run's total so far) to `metrics` when skipping is enabled.
        """
        self.step += 1
        self.stop = stop
        if finite:
            self.in_a_row = 0
        else:
            self.in_a_row += 1
            if self.in_a_row > self.limit:
                what = f"{self.in_a_row} in a row, skip_nonfinite_steps={self.limit}; " if self.limit else ""
                raise NonFiniteStep(
                    f"step {self.step}: loss {metrics['loss']}, grad_norm {metrics['grad_norm']} are not finite "
                    f"({what}its update was not applied and no model was saved); {resume_hint(self.run)} "
                    "(lower --learning_rate, set --max_grad_norm, or pass --skip_nonfinite_steps N)"
                )
            self.skipped += 1
        if self.limit:
            metrics["skipped_steps"] = self.skipped


# ---------------------------------------------------------------------------------------------------------
# Failed writes
# ---------------------------------------------------------------------------------------------------------


# Rust writers (safetensors, the tokenizers library) report std::io::Error as "... (os error N)"; the
# tokenizers library raises it as a bare Exception, so that is recognised by its text alone.
RUST_IO_ERROR = re.compile(r"\(os error \d+\)$")


def _is_write_error(err: BaseException) -> bool:
    from safetensors import SafetensorError

    return isinstance(err, (OSError, SafetensorError)) or (
        type(err) is Exception and bool(RUST_IO_ERROR.search(str(err)))
    )


def _write_error_in(err: BaseException | None) -> BaseException | None:
    """The write error that `err` is or was raised while handling (torch.save's zip writer answers a
    failed write with its own RuntimeError "unexpected pos" on the way out)."""
    while err is not None and not _is_write_error(err):
        err = err.__cause__ or err.__context__
    return err


@contextlib.contextmanager
def writing(path: str | Path):
    """Turn a failed write inside the block into `WriteFailed` naming the path and the OS error."""
    try:
        yield
    except Exception as raised:
        err = _write_error_in(raised)
        if err is None:
            raise
        target = getattr(err, "filename", None) or path
        reason = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise WriteFailed(f"could not write {str(target)!r}: {reason}") from raised


@contextlib.contextmanager
def quiet_transformers_progress():
    """Hide the progress bars transformers and huggingface_hub draw while saving ("Writing model shards"),
    which would interleave with the run's own; only for the block, and only if they were on."""
    from transformers.utils import logging

    enabled = logging.is_progress_bar_enabled()
    if enabled:
        logging.disable_progress_bar()
    try:
        yield
    finally:
        if enabled:
            logging.enable_progress_bar()


# ---------------------------------------------------------------------------------------------------------
# Preemption
# ---------------------------------------------------------------------------------------------------------


class SignalWatch:
    """Catches SIGTERM and SIGINT between `install()` and `restore()` (main thread only).

    The first one sets `received`; the loop folds it into the step's all-reduce, so every rank stops
    after the same step, writes a checkpoint and raises `Preempted`. A second one ends the process at
    once with that signal's default action, unless it comes within `same_request_s` of the first: then
    it is the first one delivered twice (Slurm signals every process of a job while torchrun also
    forwards the signal to its workers) and is ignored.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self, same_request_s: float = 1.0):
        self.received: int | None = None
        self.same_request_s = same_request_s
        self._at = 0.0
        self._previous: dict = {}

    def install(self) -> SignalWatch:
        if threading.current_thread() is threading.main_thread():
            self._previous = {sig: signal.signal(sig, self._handle) for sig in self.SIGNALS}
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            self.received, self._at = signum, time.monotonic()
            name = signal.Signals(signum).name
            # os.write: print() from a handler can re-enter a print the signal interrupted.
            os.write(
                2,
                f"\n{name}: stopping after this optimizer step with a checkpoint (a second signal stops at once)\n".encode(),
            )
        elif time.monotonic() - self._at > self.same_request_s:
            signal.signal(signum, signal.SIG_DFL)
            signal.raise_signal(signum)

    def stop(self, run, step: int, saved: Path) -> Preempted:
        """The exception that ends the run after `step`'s checkpoint `saved` (SIGTERM's when the request came
        from another rank)."""
        signum = self.received or signal.SIGTERM
        return Preempted(
            f"stopped by {signal.Signals(signum).name} after step {step}, checkpoint {str(saved)!r} written; "
            f"resume with: {resume_command(run)}",
            signum,
        )
