"""The reward-model loop's behaviour besides TRL parity (test_reward_trl.py): bad input, the model it
loads and saves, its options, and the embedded default run."""

import json
import math

import pytest
import torch
from datasets import Dataset

from posttrain.cli import main
from posttrain.data import embedded, preference
from posttrain.rl import reward, sft
from posttrain.rl.models import load_reward_model


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


def rows(n=6, conversational=False):
    return embedded.rows("preference", "train", seed=0, conversational=conversational)[:n]


def tokenize(data, tokenizer):
    return preference.tokenize_preference(Dataset.from_list(data), tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Bad input: an error naming the row / column / option, or a counted skip
# ---------------------------------------------------------------------------------------------------------


def test_pairs_with_identical_chosen_and_rejected_are_dropped_and_counted(tokenizer):
    data = rows(6)
    data[1] = {**data[1], "rejected": data[1]["chosen"]}
    # Implicit prompt: equal full sequences are equal pairs too.
    data[4] = {
        **data[4],
        "rejected": data[4]["chosen"] + tokenizer.eos_token,
    }  # same tokens once eos is added
    tokenized, info = tokenize(data, tokenizer)
    assert info == {"dropped_identical_pairs": 2}
    kept = [data[i]["prompt"] for i in (0, 2, 3, 5)]
    assert [tokenizer.decode(r["prompt_ids"]) for r in tokenized] == kept


def test_only_identical_pairs_is_an_error(tokenizer):
    data = [{**r, "rejected": r["chosen"]} for r in rows(3)]
    with pytest.raises(ValueError, match="every pair's chosen and rejected are identical"):
        tokenize(data, tokenizer)


@pytest.mark.parametrize(
    ("conversational", "field", "empty", "message"),
    [
        (False, "chosen", "", r"row 2: field 'chosen' is an empty string"),
        (False, "rejected", "", r"row 2: field 'rejected' is an empty string"),
        (True, "chosen", [], r"row 2: field 'chosen' is an empty list of messages"),
    ],
)
def test_empty_completions_name_the_row(tokenizer, conversational, field, empty, message):
    data = rows(4, conversational)
    data[2] = {**data[2], field: empty}
    with pytest.raises(ValueError, match=message):
        tokenize(data, tokenizer)


def test_missing_column_names_the_format(tokenizer):
    data = [{"prompt": r["prompt"], "chosen": r["chosen"]} for r in rows(3)]
    with pytest.raises(ValueError, match=r"`rm` accepts preference \(prompt, chosen, rejected\)"):
        tokenize(data, tokenizer)


def test_explicit_prompt_rows_whose_sides_carry_different_prompts_are_an_error(tokenizer):
    data = rows(4, conversational=True)
    # Row 3's rejected answers another question: its context differs from chosen's.
    other = [{"role": "user", "content": "1+1="}]
    data[3] = {**data[3], "rejected": other + data[3]["rejected"]}
    with pytest.raises(ValueError, match="row 3: chosen and rejected start with different non-assistant"):
        tokenize(data, tokenizer)


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ([0.5, None, 1.0], r"row 1: field 'margin' is None"),
        ([0.5, 1.0, math.nan], r"row 2: field 'margin' is nan"),
        ([math.inf, 1.0, 0.5], r"row 0: field 'margin' is inf"),
        (["a", "b", "c"], r"field 'margin' must be a number"),
    ],
)
def test_bad_margins_name_the_row(tokenizer, values, message):
    data = [{**r, "margin": v} for r, v in zip(rows(3), values, strict=True)]
    with pytest.raises(ValueError, match=message):
        tokenize(data, tokenizer)


def test_conversational_pairs_need_a_chat_template(tokenizer):
    plain = embedded.build_tokenizer()
    plain.chat_template = None
    with pytest.raises(ValueError, match="conversational .* has no chat template"):
        tokenize(rows(2, conversational=True), plain)


def test_extra_columns_pass_and_margin_is_kept(tokenizer):
    data = [{**r, "score_chosen": 9.0, "score_rejected": 1.0, "margin": 0.5} for r in rows(3)]
    tokenized, _ = tokenize(data, tokenizer)
    assert sorted(tokenized.column_names) == ["chosen_ids", "margin", "prompt_ids", "rejected_ids"]


def test_overlong_pairs_dropped_and_counted_in_run_info(tmp_path):
    # Sequences are prompt "a+b=" (4-6 tokens) + answer (1-2) + eos: max_length 7 keeps only the shortest
    # pairs (both sides at most 7 tokens).
    config = reward.RewardConfig(
        output_dir=str(tmp_path), max_length=7, max_steps=1, save_steps=0, eval_steps=0
    )
    reward.train(config)
    info = json.loads((tmp_path / "run_info.json").read_text())

    def length(prompt, answer):
        return len(prompt) + len(answer) + 1

    expected = sum(
        max(length(r["prompt"], r["chosen"]), length(r["prompt"], r["rejected"])) > 7
        for r in embedded.ranked_preference_rows(
            "train", rejected_per_prompt=reward.EMBEDDED_REJECTED_PER_PROMPT
        )
    )
    assert info["train_dropped_overlong_pairs"] == expected > 0
    assert info["train_dropped_identical_pairs"] == 0


def test_every_pair_overlong_is_an_error(tokenizer):
    tokenized, _ = tokenize(rows(3), tokenizer)
    with pytest.raises(ValueError, match="every pair is longer than max_length=3 tokens"):
        preference.drop_overlong_pairs(tokenized, 3)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (
            ["rm", "--loss_type", "hinge"],
            r"loss_type='hinge' is not a reward-model loss; expected one of \['bradley_terry'\]",
        ),
        (["rm", "--center_rewards_coefficient", "-1"], "center_rewards_coefficient must be >= 0"),
        (["rm", "--max_length", "1"], "max_length must be >= 2"),
    ],
)
def test_cli_names_the_bad_option(capsys, argv, message):
    import re

    assert main(argv) == 2
    assert re.search(message, capsys.readouterr().err)


def test_architecture_without_a_score_head_is_an_error(tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM, CodeGenConfig

    config = CodeGenConfig(vocab_size=128, n_embd=32, n_layer=1, n_head=2, n_positions=32, rotary_dim=8)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="its architecture has no sequence-classification model"):
        load_reward_model(str(tmp_path), pad_token_id=0)


# ---------------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------------


def test_score_is_at_the_last_non_padding_token(tokenizer):
    # A sequence's reward is the same alone and right-padded in a batch with a longer one.
    model = load_reward_model(None, pad_token_id=tokenizer.pad_token_id, seed=0).eval()
    tokenized, _ = tokenize(rows(8), tokenizer)
    batch = reward.collate_pairs(list(tokenized), tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()
    with torch.no_grad():
        together = model(**batch_inputs(batch)).logits.squeeze(-1)
        for i, row in enumerate(tokenized):
            alone = reward.collate_pairs([row], tokenizer.pad_token_id)
            scores = model(**batch_inputs(alone)).logits.squeeze(-1)
            assert torch.allclose(scores, together[[i, i + len(tokenized)]], atol=1e-5)


def batch_inputs(batch):
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def test_causal_lm_checkpoint_gets_a_fresh_score_head_as_trl_loads_it(tmp_path, tokenizer):
    import trl

    causal = embedded.build_model(seed=3)
    causal.save_pretrained(tmp_path / "lm")
    ours = load_reward_model(str(tmp_path / "lm"), pad_token_id=tokenizer.pad_token_id, seed=7)
    # The backbone is the checkpoint's; the score head (1, H) is new.
    for name, p in causal.model.named_parameters():
        assert torch.equal(ours.model.get_parameter(name), p), name
    assert ours.score.weight.shape == (1, causal.config.hidden_size)
    assert ours.config.pad_token_id == tokenizer.pad_token_id

    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        report_to=[],
        seed=7,
        activation_checkpointing=False,
    )
    trainer = trl.RewardTrainer(
        model=str(tmp_path / "lm"),
        args=args,
        train_dataset=Dataset.from_list(rows(2)),
        processing_class=tokenizer,
    )
    assert torch.equal(trainer.model.score.weight, ours.score.weight)


def test_saved_model_loads_and_gives_the_same_scores(tmp_path, tokenizer):
    from transformers import AutoModelForSequenceClassification

    config = reward.RewardConfig(output_dir=str(tmp_path), max_steps=3, save_steps=0)  # one eval at the end
    reward.train(config)
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    # The same weights as the trained model: rebuild the batch and compare with the eval our loop computes.
    _, eval_rows, _ = reward.load_preference_data(config, tokenizer)
    batch = reward.collate_pairs(list(eval_rows), tokenizer.pad_token_id)
    with torch.no_grad():
        loss, metrics = reward.reward_step_loss(reloaded, batch, len(eval_rows))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    final_eval = [r for r in records if "eval_loss" in r][-1]
    assert loss.item() == pytest.approx(final_eval["eval_loss"], rel=1e-5)
    assert metrics["margin"].item() == pytest.approx(final_eval["eval_margin"], rel=1e-5, abs=1e-7)
    assert reloaded.config.num_labels == 1 and reloaded.config.pad_token_id == tokenizer.pad_token_id


# ---------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------

# Knobs whose default we choose differently from TRL, and why.
DIFFERENT_ON_PURPOSE = {
    "output_dir",  # TRL: "trainer_output"; ours: runs/<command>
    "bf16",  # TRL turns it on even on CPU; ours: on where the device supports it
    "gradient_checkpointing",  # TRL: on by default; ours: off
    "report_to",  # a different set of integrations
}


def test_reward_options_are_trls_with_trls_defaults():
    import dataclasses

    import trl

    ours = reward.RewardConfig(model_name_or_path="some/model", dataset_name="some/data")  # a real run's
    theirs = trl.RewardConfig(output_dir="unused", use_cpu=True, bf16=False)
    names = {f.name for f in dataclasses.fields(ours)}
    assert {"max_length", "center_rewards_coefficient", "disable_dropout", "learning_rate"} <= names
    shared = names & {f.name for f in dataclasses.fields(theirs)}
    assert len(shared) >= 25
    different = {n for n in shared - DIFFERENT_ON_PURPOSE if getattr(ours, n) != getattr(theirs, n)}
    assert different == set(), {n: (getattr(ours, n), getattr(theirs, n)) for n in different}


# ---------------------------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_ranks_held_out_pairs_as_the_issue_asks(tmp_path):
    # `posttrain rm` with no arguments but a run folder, through the CLI. It starts from the embedded SFT
    # model (trained once per test session into the session's POSTTRAIN_CACHE, tests/conftest.py) with a
    # fresh score head, so held-out pair accuracy starts near chance (0.5); the issue's target is >= 0.95.
    assert main(["rm", "--output_dir", str(tmp_path), "--disable_tqdm", "true"]) == 0
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "eval_accuracy" in r]
    # 788 problems x 5 rejected answers = 3940 pairs, 124 steps of 32 pairs per epoch, 24 epochs
    assert len(train_lines) == 2976 and [r["step"] for r in eval_lines] == [2976]  # one eval, at the end
    assert train_lines[0]["loss"] > 0.6 and max(r["loss"] for r in train_lines[-20:]) < 0.2
    info = json.loads((tmp_path / "run_info.json").read_text())
    assert info["start_model"] == sft.embedded_sft_model()  # the cached folder: not trained again
    assert info["train_dropped_overlong_pairs"] == 0 == info["eval_dropped_overlong_pairs"]
    # The embedded defaults apply although a trained model is loaded: the config still names none.
    config = (tmp_path / "config.yaml").read_text()
    assert "model_name_or_path: null" in config and "learning_rate: 0.0003" in config

    # Held-out accuracy of the saved model on the test split's pairs (one per problem).
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(tmp_path).eval()
    tokenizer = embedded.build_tokenizer()
    held_out, _ = preference.tokenize_preference(embedded.dataset("preference", "test"), tokenizer)
    batch = reward.collate_pairs(list(held_out), tokenizer.pad_token_id)
    with torch.no_grad():
        _, metrics = reward.reward_step_loss(model, batch, len(held_out))
    assert metrics["accuracy"].item() == pytest.approx(eval_lines[0]["eval_accuracy"])
    assert eval_lines[0]["eval_accuracy"] >= 0.95, eval_lines  # 0.982 (112 pairs; see reward.RUN_DEFAULTS)
