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
    assert before_loss > 4.5 and before_match == 0.0  # ~ln(128) = 4.85: a random model
    # Measured (learning rate 1e-3, epochs that train every row): this run reaches eval_loss 0.24 and exact
    # match 0.87; seeds 1 and 7 (other weights AND data order) reach 0.35-0.36 / 0.70-0.73. The thresholds
    # sit outside that spread; a slower learner fails: at the earlier default learning rate 3e-3 the same
    # 600 steps end at 0.83 / 0.18 (seeds 42, 1, 7: loss 0.82-0.84, exact match 0.08-0.18).
    assert after["eval_loss"] <= 0.45, (before_loss, after)
    assert after["eval_exact_match"] >= 0.6, (before_match, after)

    # The final model in output_dir is the trained one, loadable by transformers.
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert embedded.exact_match(reloaded, tokenizer)["exact_match"] == pytest.approx(
        after["eval_exact_match"]
    )
    assert _eval_loss(reloaded, config, tokenizer) == pytest.approx(after["eval_loss"], rel=1e-5)


@pytest.mark.slow
def test_two_processes_match_one_on_the_same_global_batch(tmp_path):
    """torchrun DDP (gloo) through the real SFT path (fused log-probs, token-normalised accumulation)."""
    common = ["sft", "--max_steps", "3", "--per_device_train_batch_size", "4", "--eval_steps", "0"]
    ddp = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m"]
    runs = {
        "ddp": ddp + ["posttrain.cli", *common, "--output_dir", str(tmp_path / "ddp")],
        "one": [sys.executable, "-m", "posttrain.cli", *common, "--gradient_accumulation_steps", "2"]
        + ["--output_dir", str(tmp_path / "one")],
    }
    for name, cmd in runs.items():
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, (name, done.stderr[-2000:])
    ddp_lines, _ = _read_metrics(tmp_path / "ddp")
    one_lines, _ = _read_metrics(tmp_path / "one")
    for key in ("loss", "grad_norm", "mean_token_accuracy", "entropy", "num_tokens"):
        assert [r[key] for r in ddp_lines] == pytest.approx([r[key] for r in one_lines], rel=1e-5), key


def test_cli_stops_on_a_missing_dataset_before_writing_anything(tmp_path, capsys):
    assert (
        main(["sft", "--dataset_name", str(tmp_path / "nope.jsonl"), "--output_dir", str(tmp_path / "run")])
        == 2
    )
    assert "nope.jsonl' is neither an existing file or folder" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


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


ISSUE_OPTIONS = (
    "model_name_or_path dataset_name output_dir learning_rate lr_scheduler_type warmup_steps "
    "per_device_train_batch_size gradient_accumulation_steps num_train_epochs max_steps max_length packing "
    "padding_free completion_only_loss assistant_only_loss gradient_checkpointing seed logging_steps "
    "save_steps eval_steps"
).split()
# Knobs whose default we choose differently from TRL, and why.
DIFFERENT_ON_PURPOSE = {
    "output_dir",  # TRL: "trainer_output"; ours: runs/<command>
    "bf16",  # TRL turns it on even on CPU; ours: on where the device supports it
    "gradient_checkpointing",  # TRL: on by default; ours: off (the models that need it are asked for it)
    "report_to",  # a different set of integrations
}


def test_sft_options_are_trls_with_trls_defaults():
    import dataclasses

    import trl

    ours = SFTConfig(model_name_or_path="some/model", dataset_name="some/data")  # a real run's defaults
    assert set(ISSUE_OPTIONS) <= {f.name for f in dataclasses.fields(ours)}
    theirs = trl.SFTConfig(output_dir="unused", use_cpu=True, bf16=False)
    shared = {f.name for f in dataclasses.fields(ours)} & {f.name for f in dataclasses.fields(theirs)}
    assert len(shared) >= 25
    different = {
        name for name in shared - DIFFERENT_ON_PURPOSE if getattr(ours, name) != getattr(theirs, name)
    }
    assert different == set(), {n: (getattr(ours, n), getattr(theirs, n)) for n in different}


def test_dropped_overlong_prompts_are_counted_in_run_info(tmp_path):
    # Prompts "a+b=" are 4 to 6 tokens: with max_length 6 the 6-token ones leave no room for the answer.
    config = SFTConfig(output_dir=str(tmp_path), max_length=6, max_steps=1, save_steps=0, eval_steps=0)
    train(config)
    info = json.loads((tmp_path / "run_info.json").read_text())
    six_token_prompts = sum(len(p) >= 6 for p, _ in embedded.problems("train"))
    assert info["train_dropped_overlong_prompts"] == six_token_prompts > 0
    assert info["train_truncated"] > 0  # 5-token prompts keep one answer token
