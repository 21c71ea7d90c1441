"""Metric sinks of a run (rank 0 only): metrics.jsonl, the progress bar, printed lines, TensorBoard.

metrics.jsonl holds one JSON object per optimizer step (`step`, `epoch`, `loss`, `learning_rate`,
`grad_norm`, `num_tokens`, `tokens_per_second`, and the loop's metrics) and one per evaluation (`step`,
`epoch` and `eval_`-prefixed keys). Values arrive as Python floats: the loop moves them to the host once
per step, so nothing here synchronises with the device.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


def tensorboard_available() -> bool:
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        return False
    return True


def truncate_metrics(path: Path, last_step: int) -> None:
    """Keep the lines of steps <= last_step (a killed run may have logged past its last checkpoint)."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written when the run was killed
            continue
        if record.get("step", 0) <= last_step:
            kept.append(line)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(line + "\n" for line in kept))
    tmp.replace(path)


def _format(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}" if math.isfinite(value) and value != 0 else str(value)
    return str(value)


class MetricsLogger:
    """Writes a run's metrics; every method is a no-op off rank 0.

    resume_step: the step the run resumes after (0 for a fresh run): metrics.jsonl keeps the lines up
    to it, and a fresh run starts the file empty; TensorBoard's events after it are purged likewise.
    """

    def __init__(self, run, total_steps: int, resume_step: int = 0):
        self.enabled = run.is_main
        self.total_steps = total_steps
        self.logging_steps = run.config.logging_steps
        self.file = self.bar = self.writer = None
        if not self.enabled:
            return
        path = Path(run.output_dir) / METRICS_FILE
        if resume_step > 0:
            truncate_metrics(path, resume_step)
            self.file = path.open("a")
        else:
            self.file = path.open("w")
        if run.config.report_to == "tensorboard" or (
            run.config.report_to == "auto" and tensorboard_available()
        ):
            from torch.utils.tensorboard import SummaryWriter

            log_dir = Path(run.output_dir) / "tensorboard"
            if resume_step == 0:
                # a fresh run starts its events anew, as metrics.jsonl: an earlier run's files go (a purge
                # would depend on the files' name order, which one process's writers do not keep)
                for stale in log_dir.glob("events.out.tfevents.*"):
                    stale.unlink()
            # purge_step makes TensorBoard's readers drop the earlier event files' steps from this one on,
            # as metrics.jsonl drops its lines: the steps a killed run logged after its checkpoint (they
            # are logged again by the resumed run, whose later-named file is read last).
            self.writer = SummaryWriter(log_dir=str(log_dir), purge_step=resume_step + 1)
        from tqdm.auto import tqdm

        self.bar = tqdm(
            total=total_steps,
            initial=resume_step,
            disable=run.config.disable_tqdm,
            desc=run.command,
            dynamic_ncols=True,
        )

    def _write(self, record: dict) -> None:
        from posttrain.rl.faults import writing

        with writing(self.file.name):
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()  # a killed run keeps every line up to its last step

    def print(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def log_train(self, step: int, metrics: dict) -> None:
        """One optimizer step's metrics (floats), `step` counted from 1."""
        if not self.enabled:
            return
        self._write({"step": step, **metrics})
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"train/{name}", value, step)
        self.bar.update(1)
        self.bar.set_postfix(
            loss=f"{metrics.get('loss', float('nan')):.4g}",
            tok_s=f"{metrics.get('tokens_per_second', 0):.0f}",
        )
        if self.logging_steps and (step % self.logging_steps == 0 or step == self.total_steps):
            fields = "  ".join(f"{k} {_format(v)}" for k, v in metrics.items())
            self.print(f"step {step}/{self.total_steps}  {fields}")

    def log_eval(self, step: int, epoch: float, metrics: dict) -> None:
        """Evaluation results (keys already `eval_`-prefixed) after optimizer step `step`."""
        if not self.enabled:
            return
        self._write({"step": step, "epoch": epoch, **metrics})
        if self.writer is not None:
            for name, value in metrics.items():
                self.writer.add_scalar(f"eval/{name.removeprefix('eval_')}", value, step)
        fields = "  ".join(f"{k} {_format(v)}" for k, v in metrics.items())
        self.print(f"eval step {step}  {fields}")

    def close(self) -> None:
        if not self.enabled:
            return
        self.bar.close()
        self.file.close()
        if self.writer is not None:
            self.writer.close()
