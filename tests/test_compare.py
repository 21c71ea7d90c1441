"""`posttrain compare`: the same options through posttrain and TRL 1.16, side by side."""

import json
import re
import sys

import pytest
from _optional import import_or_skip

from posttrain import compare
from posttrain.cli import main
from posttrain.rl import loop, sft

trl = import_or_skip("trl")


def test_compare_sft_on_the_embedded_task_agrees_with_trl_per_step(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the sides' subprocesses: tiny ops, no spinning workers
    out = tmp_path / "cmp"
    assert main(["compare", "sft", "--max_steps", "3", "--output_dir", str(out)]) == 0
    summary = json.loads((out / "compare.json").read_text())
    assert summary["steps"] == 3 and len(summary["ours"]["losses"]) == len(summary["trl"]["losses"]) == 3
    assert summary["max_rel_loss_diff"] <= 1e-5
    for side in ("ours", "trl"):
        assert summary[side]["s_per_step"] > 0 and summary[side]["peak_mib"] > 0
        assert summary[side]["tokens_per_s"] > 0
    # the floor: counted from the tokens our side sent through the model, the same for both sides
    assert summary["ours"]["floor_s"] == summary["trl"]["floor_s"] > 0
    # what each side trained on: our own run folder, and the losses it logged
    ours = [json.loads(line)["loss"] for line in (out / "ours" / "metrics.jsonl").read_text().splitlines()]
    assert ours == summary["ours"]["losses"]
    printed = capsys.readouterr().out
    assert "agreement: largest relative difference" in printed and "| posttrain / TRL |" in printed


def test_trl_reads_the_rows_in_our_epoch_order():
    config = sft.SFTConfig(seed=3)
    sampler = compare._EpochOrder(10, config)
    assert [list(sampler) for _ in range(2)] == [loop.epoch_order(10, 3, epoch) for epoch in (0, 1)]


def test_options_trl_lacks_are_listed_and_run_options_are_not_passed():
    config = sft.SFTConfig(skip_nonfinite_steps=2, output_dir="x", logging_steps=7)
    passed, ours_only = compare.shared_options(config, trl.SFTConfig)
    assert ours_only == ["skip_nonfinite_steps=2"]
    assert passed["learning_rate"] == config.learning_rate and passed["max_length"] == config.max_length
    assert not {"output_dir", "logging_steps", "model_name_or_path", "bf16"} & set(passed)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["grpo"], r"grpo samples its own completions: .* benchmarks/grpo.py"),
        (["ppo"], r"ppo samples its own completions"),
        (["nope"], r"unknown command 'nope'"),
        (["sft", "--train_sampling_strategy", "group_by_length"], r"group_by_length orders rows by their tokenized lengths"),
        (["sft", "--train_sampling_strategy=group_by_length"], r"group_by_length orders rows by their tokenized lengths"),
        (["sft", "--max_stepz", "3"], r"max_stepz"),
    ],
)  # fmt: skip
def test_bad_input_is_named(argv, message, capsys):
    assert main(["compare", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


def test_the_floor_counts_sequences_without_their_padding():
    import torch

    padded = {
        "input_ids": torch.zeros(2, 8, dtype=torch.long),
        "attention_mask": torch.tensor([[1] * 6 + [0] * 2, [1] * 4 + [0] * 4]),
        "position_ids": torch.tensor([[0, 1, 2, 3, 4, 5, 0, 0], [0, 1, 2, 3, 0, 0, 0, 0]]),
    }
    assert compare.document_lengths(padded).tolist() == [6, 4]
    # one packed row of documents of 3, 4 and 1 tokens, no attention mask: each document attends to itself
    packed = {
        "input_ids": torch.zeros(1, 8, dtype=torch.long),
        "position_ids": torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]]),
    }
    assert compare.document_lengths(packed).tolist() == [3, 4, 1]
    rows = {
        "chosen_input_ids": torch.zeros(2, 3, dtype=torch.long),
        "chosen_attention_mask": torch.tensor([[1, 1, 0], [1, 1, 1]]),
    }
    assert compare.document_lengths(rows, "chosen_").tolist() == [2, 3]


def test_the_floor_counts_a_shared_prompt_once(monkeypatch):
    """A DPO-like batch (4 pairs: prompts of 5 tokens, answers of 3, right-padded), through the counter the
    way `token_logprobs(..., share_prompts=True)` runs it: each pair's prompt once, as
    `measure.shared_prompt_step_flops` counts (tokens: 4 x 5 + 8 x 3; attention, in squared lengths: 4 x 5^2
    + 8 x (8^2 - 5^2))."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from posttrain.rl import logprobs

    model = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=50,
            hidden_size=16,
            intermediate_size=24,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )  # fmt: skip
    )
    prompts = torch.randint(3, 50, (4, 5)).repeat_interleave(2, 0)
    ids = torch.cat([prompts, torch.randint(3, 50, (8, 3))], 1)
    mask = torch.zeros_like(ids)
    mask[:, 5:] = 1
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "completion_mask": mask}
    # the counter patches the loops' modules for good (it runs in a subprocess of its own): undone here
    for module in list(sys.modules.values()):
        if (module.__name__ or "").startswith("posttrain.") and hasattr(module, "token_logprobs"):
            monkeypatch.setattr(module, "token_logprobs", module.token_logprobs)
    if "posttrain.rl.reward" in sys.modules:
        reward = sys.modules["posttrain.rl.reward"]
        monkeypatch.setattr(reward, "reward_step_loss", reward.reward_step_loss)
    monkeypatch.setattr(logprobs, "shared_prefix", logprobs.shared_prefix)
    counter = compare._FlopCounter()
    counter.install()
    with torch.no_grad():
        logprobs.token_logprobs(model, batch, share_prompts=True)
        logprobs.token_logprobs(model, batch)  # whole rows
    counter.step()
    (step,) = counter.steps
    assert step["fwd_tokens"] == (4 * 5 + 8 * 3) + 8 * 8
    assert step["fwd_attn"] == (4 * 25 + 8 * (64 - 25)) + 8 * 64
    assert step["fwd_head"] == 2 * 8 * 3


def test_missing_trl_names_the_extra(monkeypatch, capsys):
    find_spec = compare.importlib.util.find_spec
    monkeypatch.setattr(
        compare.importlib.util, "find_spec", lambda name: None if name == "trl" else find_spec(name)
    )
    assert main(["compare", "sft"]) == 2
    assert "pip install 'posttrain[bench]'" in capsys.readouterr().err


def test_an_earlier_comparison_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "ours").mkdir()
    assert main(["compare", "sft", "--output_dir", str(tmp_path)]) == 2
    assert "already holds a comparison" in capsys.readouterr().err
