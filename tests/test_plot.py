"""`posttrain plot` (posttrain/plot.py): the curves of runs' metrics.jsonl as one PNG.

The runs' metrics.jsonl are written by the loops' own `MetricsLogger`, so the format read is the one
written. Checked: the curves read back equal what was logged (train by step, eval lines apart); the figure
has a subplot per metric holding exactly those points, one colour per run; the PNG opened with PIL has the
figure's size and non-blank content in each run's colour; the default output paths; every error named
before the output file is touched.
"""

import json
import math
import sys
from types import SimpleNamespace

import pytest
from _optional import import_or_skip

from posttrain import plot
from posttrain.cli import main
from posttrain.rl.logger import MetricsLogger

# matplotlib's default colour cycle: C0, C1 (tab10's first two)
C0, C1 = (0x1F, 0x77, 0xB4), (0xFF, 0x7F, 0x0E)


def write_run(folder, scale: float, steps: int = 20, eval_every: int = 5):
    """A run folder whose metrics.jsonl MetricsLogger writes: loss, reward and learning_rate per step,
    eval_loss and eval_exact_match every eval_every steps."""
    config = SimpleNamespace(logging_steps=0, report_to="none", disable_tqdm=True)
    folder.mkdir(parents=True)
    run = SimpleNamespace(is_main=True, config=config, output_dir=folder, command="test")
    logger = MetricsLogger(run, steps)
    for step in range(1, steps + 1):
        logger.log_train(
            step,
            {
                "epoch": step / steps,
                "loss": scale * math.exp(-step / 8),
                "reward": scale * step / steps,
                "learning_rate": 1e-3,
                "num_tokens": 100 * step,
            },
        )
        if step % eval_every == 0:
            logger.log_eval(
                step,
                step / steps,
                {"eval_loss": scale * 1.1 * math.exp(-step / 8), "eval_exact_match": step / 40},
            )
    logger.close()
    return folder


@pytest.fixture
def runs(tmp_path):
    return [
        write_run(tmp_path / "runs" / "sft", 1.0),
        write_run(tmp_path / "runs" / "dpo", 2.0, eval_every=10),
    ]


def test_curves_read_back_what_was_logged(runs):
    curves = plot.read_curves(runs[0])
    assert curves.name == "sft"
    steps, loss = curves.train["loss"]
    assert steps == list(range(1, 21))
    assert loss == pytest.approx([math.exp(-s / 8) for s in steps])
    assert curves.eval["loss"] == (
        [5, 10, 15, 20],
        pytest.approx([1.1 * math.exp(-s / 8) for s in (5, 10, 15, 20)]),
    )
    assert curves.eval["exact_match"][1] == pytest.approx([0.125, 0.25, 0.375, 0.5])
    assert "epoch" not in curves.eval and "exact_match" not in curves.train
    assert plot.select_metrics([curves], None) == ["loss", "reward", "learning_rate", "exact_match"]


def test_figure_holds_each_runs_points_in_its_colour(runs):
    import_or_skip("matplotlib")
    from matplotlib.colors import to_rgb

    curves = [plot.read_curves(r) for r in runs]
    fig = plot.figure(curves, ["loss", "exact_match"])
    loss_ax, match_ax = fig.axes
    assert (loss_ax.get_title(), match_ax.get_title()) == ("loss", "exact_match")
    lines = {line.get_label(): line for line in loss_ax.get_lines()}
    assert set(lines) == {"sft", "sft (eval)", "dpo", "dpo (eval)"}
    assert list(lines["dpo"].get_ydata()) == pytest.approx(curves[1].train["loss"][1])
    assert list(lines["dpo (eval)"].get_xdata()) == [10, 20]
    assert lines["sft (eval)"].get_marker() == "o" and lines["sft"].get_marker() in ("None", None, "")
    assert (
        to_rgb(lines["sft"].get_color())
        == to_rgb(lines["sft (eval)"].get_color())
        == tuple(c / 255 for c in C0)
    )
    assert to_rgb(lines["dpo"].get_color()) == tuple(c / 255 for c in C1)
    assert [line.get_label() for line in match_ax.get_lines()] == ["sft (eval)", "dpo (eval)"]
    assert [t.get_text() for t in fig.legends[0].get_texts()] == ["sft", "sft (eval)", "dpo", "dpo (eval)"]


def test_png_is_written_with_both_runs_overlaid(runs, tmp_path):
    import_or_skip("matplotlib")
    from PIL import Image

    out = tmp_path / "out" / "curves.png"
    assert (
        main(
            [
                "plot",
                str(runs[0]),
                str(runs[1]),
                "--output",
                str(out),
                "--metrics",
                "loss,eval_exact_match,reward",
            ]
        )
        == 0
    )
    image = Image.open(out).convert("RGB")
    assert image.size == (3 * 450, 320 + 0)  # 3 subplots in one row of 4.5 x 3.2 inches at 100 dpi
    colours = image.getcolors(maxcolors=1 << 20)
    assert len(colours) > 20  # lines, text, grid, antialiasing: far from blank
    counts = {rgb: n for n, rgb in colours}
    assert counts.get(C0, 0) > 200 and counts.get(C1, 0) > 200  # both runs drawn
    white = counts.get((255, 255, 255), 0)
    assert 0.5 < white / (image.size[0] * image.size[1]) < 0.99
    assert not list(out.parent.glob(".*tmp*"))  # the temporary file was renamed


def test_default_output_paths(runs, capsys):
    import_or_skip("matplotlib")
    assert main(["plot", str(runs[0])]) == 0
    assert (runs[0] / plot.CURVES_FILE).is_file()
    assert str(runs[0] / plot.CURVES_FILE) in capsys.readouterr().out
    assert main(["plot", str(runs[0]), str(runs[1])]) == 0  # several runs: their common parent folder
    assert (runs[0].parent / plot.CURVES_FILE).is_file()


def test_help_lists_every_option(capsys):
    assert main(["plot", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: posttrain plot RUN_DIR [RUN_DIR ...]")
    for name in plot.PlotConfig.__dataclass_fields__:
        assert f"--{name} " in text, name


def test_a_killed_runs_half_written_last_line_and_non_finite_values_are_skipped(tmp_path):
    run = write_run(tmp_path / "run", 1.0)
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"step": 21, "loss": math.nan, "reward": 2.0}) + "\n")
        f.write('{"step": 22, "lo')
    curves = plot.read_curves(run)
    assert curves.train["loss"][0][-1] == 20
    assert curves.train["reward"] == (
        list(range(1, 22)),
        pytest.approx([s / 20 for s in range(1, 21)] + [2.0]),
    )


@pytest.mark.parametrize(
    "argv, message",
    [
        (lambda r, t: [], "no RUN_DIR"),
        (lambda r, t: [str(t / "nowhere")], "run folder '{t}/nowhere': no such folder"),
        (lambda r, t: [str(r[0]), str(t)], "run folder '{t}': the folder has no metrics.jsonl"),
        (
            lambda r, t: [str(r[0]), "--metrics", "loss,kl"],
            "metrics: 'kl' is in no run's metrics.jsonl; they have: epoch, loss, ",
        ),
        (lambda r, t: [str(r[0]), "--output", str(t / "c.pdf")], "must end in .png"),
        (lambda r, t: [str(r[0]), "--metrics", ""], "metrics is empty"),
        (lambda r, t: [str(t / "a,b")], "has a comma"),
    ],
)
def test_errors_are_named_and_leave_the_output_alone(argv, message, runs, tmp_path, capsys):
    old = runs[0] / plot.CURVES_FILE
    old.write_bytes(b"an older plot")
    code = main(["plot", *argv(runs, tmp_path)])
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert code == 2
    assert line.startswith("posttrain plot: ") and message.format(t=tmp_path) in line
    assert old.read_bytes() == b"an older plot"


def test_a_malformed_line_is_named(tmp_path):
    run = write_run(tmp_path / "run", 1.0)
    text = (run / "metrics.jsonl").read_text().splitlines()
    text[2] = "not json"
    (run / "metrics.jsonl").write_text("\n".join(text) + "\n")
    with pytest.raises(ValueError, match="metrics.jsonl: line 3 is not JSON"):
        plot.read_curves(run)
    (run / "metrics.jsonl").write_text(json.dumps({"loss": 1.0}) + "\n")
    with pytest.raises(ValueError, match="line 1 is not a metrics record with a step"):
        plot.read_curves(run)


def test_without_matplotlib_the_error_names_the_extra(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    assert main(["plot", str(runs[0])]) == 2
    assert "plotting needs matplotlib: pip install 'posttrain[plot]'" in capsys.readouterr().err
    assert not (runs[0] / plot.CURVES_FILE).exists()
