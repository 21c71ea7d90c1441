"""Plot training curves: each run's metrics.jsonl as one PNG, a subplot per metric, runs overlaid (`posttrain plot`).

A run folder's metrics.jsonl (`rl.logger`) holds a line per optimizer step (`step`, `loss`, ...) and a line
per evaluation (`step`, `epoch`, `eval_`-prefixed keys). A metric's subplot shows its training values by
step as a line and its evaluation values (`eval_<metric>`) as dots joined by a dashed line, in the run's
colour; a metric only evaluated (`eval_exact_match`) gets a subplot of its own under its bare name. The
legend names each run by its folder.

matplotlib is an optional dependency (`pip install 'posttrain[plot]'`); the figure is drawn on the Agg
canvas (no display, no pyplot state), so plotting works on a headless machine and inside a notebook without
touching its backend.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.rl.config import ConfigError
from posttrain.rl.logger import METRICS_FILE

CURVES_FILE = "curves.png"
EVAL_PREFIX = "eval_"
# Bookkeeping, not curves: left out unless named in --metrics.
NOT_PLOTTED = ("step", "epoch", "num_tokens", "tokens_per_second")
COLUMNS = 3  # subplots per row
MISSING = "plotting needs matplotlib: pip install 'posttrain[plot]'"


@dataclass
class PlotConfig:
    """`posttrain plot RUN_DIR [RUN_DIR ...] [--key value ...]`."""

    run_dirs: list[str] | None = field(
        default=None,
        metadata={"help": "RUN_DIR ..., the positional arguments: run folders holding a metrics.jsonl."},
    )
    output: str | None = field(
        default=None,
        metadata={
            "help": f"The PNG to write; none: RUN_DIR/{CURVES_FILE} for one run, the runs' common parent "
            f"folder/{CURVES_FILE} for several."
        },
    )
    metrics: list[str] | None = field(
        default=None,
        metadata={
            "help": "Metrics to plot, comma-separated (loss,reward; eval_loss and loss are one subplot); "
            f"none: every numeric one but {', '.join(NOT_PLOTTED)}."
        },
    )

    def __post_init__(self):
        for name in ("run_dirs", "metrics"):
            value = getattr(self, name)
            if isinstance(value, str):
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        if not self.run_dirs:
            raise ConfigError(
                "no RUN_DIR: posttrain plot RUN_DIR [RUN_DIR ...] (run folders with a metrics.jsonl)"
            )
        if self.metrics is not None and not self.metrics:
            raise ConfigError("metrics is empty; leave it unset (none) for every metric")
        if self.output is not None and Path(self.output).suffix.lower() != ".png":
            raise ConfigError(f"output={self.output!r} must end in .png (the figure is written as a PNG)")


@dataclass
class Curves:
    """One run's metrics: name -> (steps, values) of its training lines and of its evaluation lines (the
    `eval_` prefix dropped)."""

    name: str
    train: dict[str, tuple[list[float], list[float]]]
    eval: dict[str, tuple[list[float], list[float]]]


def read_curves(run_dir, name: str | None = None) -> Curves:
    """The curves in `run_dir`/metrics.jsonl (numeric values only; a truncated last line, as a killed run
    leaves, is skipped). Raises FileNotFoundError naming the folder when there is no metrics.jsonl, and
    ValueError naming the line for a line that is not a JSON object with a `step`."""
    path = Path(run_dir) / METRICS_FILE
    if not path.is_file():
        what = "no such folder" if not Path(run_dir).is_dir() else f"the folder has no {METRICS_FILE}"
        raise FileNotFoundError(f"run folder {str(run_dir)!r}: {what} (is it a posttrain run's output_dir?)")
    curves = Curves(name or Path(run_dir).resolve().name, {}, {})
    lines = path.read_text().splitlines()
    for number, line in enumerate(lines, 1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            if number == len(lines):  # the line being written when the run was killed
                continue
            raise ValueError(f"{path}: line {number} is not JSON: {line[:80]!r}") from None
        if not isinstance(record, dict) or not isinstance(record.get("step"), int | float):
            raise ValueError(f"{path}: line {number} is not a metrics record with a step: {line[:80]!r}")
        is_eval = any(key.startswith(EVAL_PREFIX) for key in record)
        for key, value in record.items():
            if key == "step" or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            if not math.isfinite(value):  # a skipped step's NaN loss: a gap rather than a broken axis
                continue
            if is_eval and not key.startswith(EVAL_PREFIX):
                continue  # the epoch of an evaluation line
            target = curves.eval if is_eval else curves.train
            steps, values = target.setdefault(key.removeprefix(EVAL_PREFIX), ([], []))
            steps.append(record["step"])
            values.append(float(value))
    return curves


def available_metrics(runs: list[Curves]) -> list[str]:
    """Every metric of the runs, in order of first appearance (training metrics first)."""
    names = {}
    for curves in runs:
        names.update(dict.fromkeys(curves.train))
    for curves in runs:
        names.update(dict.fromkeys(curves.eval))
    return list(names)


def select_metrics(runs: list[Curves], metrics: list[str] | None) -> list[str]:
    """The subplots: `metrics` (an `eval_` prefix dropped), each checked to be in some run; by default every
    metric but the bookkeeping ones (NOT_PLOTTED)."""
    found = available_metrics(runs)
    if metrics is None:
        chosen = [m for m in found if m not in NOT_PLOTTED]
        if not chosen:
            raise ValueError(f"the runs' {METRICS_FILE} hold no metric to plot (found: {found or 'none'})")
        return chosen
    chosen = list(dict.fromkeys(m.removeprefix(EVAL_PREFIX) for m in metrics))
    unknown = [m for m in chosen if m not in found]
    if unknown:
        raise ConfigError(
            f"metrics: {unknown[0]!r} is in no run's {METRICS_FILE}; they have: {', '.join(found)}"
        )
    return chosen


def figure(runs: list[Curves], metrics: list[str]):
    """A matplotlib Figure (on the Agg canvas) of `metrics`, one subplot each, every run overlaid."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(MISSING) from None

    rows = math.ceil(len(metrics) / COLUMNS)
    cols = min(len(metrics), COLUMNS)
    fig = Figure(figsize=(4.5 * cols, 3.2 * rows), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        for curves, colour in zip(runs, colours, strict=True):
            if metric in curves.train:
                ax.plot(*curves.train[metric], color=colour, linewidth=1.2, label=curves.name)
            if metric in curves.eval:
                ax.plot(*curves.eval[metric], color=colour, linestyle="--", marker="o", markersize=4,
                        label=f"{curves.name} (eval)")  # fmt: skip
        ax.set_title(metric, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    handles = {}
    for ax in fig.axes:  # one legend for the figure: every run (and its eval marker) once
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            handles.setdefault(label, handle)
    labels = list(handles)
    fig.legend([handles[lab] for lab in labels], labels, loc="outside lower center", ncols=min(len(labels), 4),
               fontsize=8)  # fmt: skip
    return fig


def run_names(run_dirs: list) -> list[str]:
    """Legend names: each run's folder name, or its path as given where two runs share a folder name."""
    names = [Path(d).resolve().name for d in run_dirs]
    return [str(d) if names.count(n) > 1 else n for d, n in zip(run_dirs, names, strict=True)]


def default_output(run_dirs: list) -> Path:
    """RUN_DIR/curves.png for one run; the runs' common parent folder's curves.png for several."""
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / CURVES_FILE
    return Path(os.path.commonpath([Path(d).resolve().parent for d in run_dirs])) / CURVES_FILE


def plot_runs(run_dirs: list, output=None, metrics: list[str] | None = None) -> Path:
    """Draw the runs' curves (`figure`) and write them as a PNG to `output` (`default_output` when None),
    through a temporary file so that a failed write leaves an older plot whole. Returns the path. Everything
    is checked (matplotlib, every folder, every metric) before the file is touched."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING) from None
    runs = [read_curves(d, name) for d, name in zip(run_dirs, run_names(run_dirs), strict=True)]
    chosen = select_metrics(runs, metrics)
    path = Path(output) if output is not None else default_output(run_dirs)
    return _save(figure(runs, chosen), path)


SUMMARY_PANELS = (  # the demo's summary figure: (row key, title, whether the untrained model's bar is shown)
    ("greedy_exact_match", "held-out exact match, greedy", True),
    ("sampled_exact_match", "held-out exact match, sampled (T = 1)", True),
    # the untrained model's score and KL (about -3 and 15 nats) would flatten every other bar: the table has them
    ("rm_score", "reward-model score, sampled", False),
    ("kl_to_sft", "KL to the SFT model (nats / completion), sampled", False),
)


def summary_figure(rows: list[dict], path) -> Path:
    """The demo's summary (`posttrain.demo`): a bar per model in each of SUMMARY_PANELS, written as a PNG."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ConfigError(MISSING) from None
    fig = Figure(figsize=(11, 6.5), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    # a model keeps its colour in every panel
    colours = {r["stage"]: f"C{i % 10}" for i, r in enumerate(rows)}
    for k, (key, title, with_base) in enumerate(SUMMARY_PANELS):
        ax = fig.add_subplot(2, 2, k + 1)
        shown = [r for r in rows if r.get(key) is not None and (with_base or r["stage"] != "base")]
        bars = ax.bar(
            [r["stage"] for r in shown], [r[key] for r in shown], color=[colours[r["stage"]] for r in shown]
        )
        ax.bar_label(bars, fmt="%.2f", fontsize=7)
        ax.set_title(title, fontsize=10)
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    return _save(fig, Path(path))


def _save(fig, path: Path) -> Path:
    """Write `fig` as a PNG at `path` through a temporary file, so that a failed write leaves an older plot whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, format="png")
    tmp.replace(path)
    return path


def run(config: PlotConfig) -> Path:
    """`posttrain plot`: write the PNG and say where."""
    path = plot_runs(config.run_dirs, config.output, config.metrics)
    print(f"curves of {len(config.run_dirs)} run(s) written to {path}")
    return path
