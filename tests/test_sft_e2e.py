"""End-to-end SFT on the embedded default: it learns, its outputs load, the CLI rejects bad options."""

import json
import subprocess
import sys

import pytest
import torch

from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl.models import load_causal_lm, load_tokenizer
from posttrain.rl.sft import SFTConfig, load_sft_data, make_collate, sft_step_loss, train


def _eval_loss(model, config, tokenizer):
    _, eval_rows, _ = load_sft_data(config, tokenizer)
    batch = make_collate(config, tokenizer.pad_token_id)(list(eval_rows))
    with torch.no_grad():
        loss, _ = sft_step_loss(model, batch, batch["completion_mask"].sum())
    return loss.item()


def _read_metrics(output_dir):
    lines = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], [r for r in lines if "eval_loss" in r]


@pytest.mark.slow
def test_embedded_sft_learns(tmp_path):
    config = SFTConfig(output_dir=str(tmp_path), max_steps=600, save_steps=0, disable_tqdm=True)
    tokenizer = load_tokenizer(None)
    untrained = load_causal_lm(None, seed=config.seed)
    before_loss = _eval_loss(untrained, config, tokenizer)
    before_match = embedded.exact_match(untrained, tokenizer)["exact_match"]

    train(config)

    train_lines, eval_lines = _read_metrics(tmp_path)
    assert [r["step"] for r in train_lines] == list(range(1, 601))
    after = eval_lines[-1]
    assert after["eval_loss"] <= 0.5 * before_loss, (before_loss, after)
    assert after["eval_exact_match"] >= before_match + 0.1, (before_match, after)

    # The final model in output_dir is the trained one, loadable by transformers.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert embedded.exact_match(reloaded, tokenizer)["exact_match"] == pytest.approx(
        after["eval_exact_match"]
    )
    assert _eval_loss(reloaded, config, tokenizer) == pytest.approx(after["eval_loss"], rel=1e-5)


@pytest.mark.parametrize("layout", ["padding_free", "packing"])
def test_sft_runs_with_padding_free_and_packing(tmp_path, layout):
    config = SFTConfig(
        output_dir=str(tmp_path), max_steps=2, max_length=64, save_steps=0, eval_steps=0, disable_tqdm=True
    )
    setattr(config, layout, True)
    out = train(config)
    train_lines, _ = _read_metrics(tmp_path)
    assert len(train_lines) == 2 and all(r["loss"] > 0 for r in train_lines)
    assert out.output_dir == tmp_path


def test_cli_runs_sft(tmp_path):
    cmd = [sys.executable, "-m", "posttrain.cli", "sft", "--max_steps", "2", "--output_dir", str(tmp_path)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert (tmp_path / "config.yaml").exists() and (tmp_path / "model.safetensors").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sft", "--learning_rat", "1e-3"], "learning_rat.*learning_rate"),
        (["sft", "--max_length", "many"], "max_length"),
        (["sft", "--loss_type", "mse"], "loss_type='mse' is not an SFT loss"),
        (["sft", "--packing", "true", "--max_length", "none"], "packing=true needs a max_length"),
        (["sft", "--overlong_prompt", "truncate"], "overlong_prompt must be 'drop' or 'error'"),
        (["tune"], "unknown command 'tune'"),
    ],
)
def test_cli_names_the_bad_option(capsys, argv, message):
    assert main(argv) == 2
    import re

    assert re.search(message, capsys.readouterr().err)
