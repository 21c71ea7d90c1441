"""Our reward-model step against TRL 1.16's RewardTrainer: same tiny model, same pairs, float32.

TRL side: `RewardTrainer` tokenizes the pairs (`_prepare_dataset`), `DataCollatorForPreference` builds the
2B-row batch (chosen first), `compute_loss` gives the loss and logs accuracy / margin / min, mean, max
reward in `_metrics`, `backward` the gradients.
Our side: the same rows through `tokenize_preference` / `drop_overlong_pairs` and `collate_pairs`, then
`reward_step_loss` and `backward`. Both take the pair mean.
Token ids and masks must be equal; loss, metrics and every parameter's gradient must agree to a
norm-relative error of 1e-5: in float32 with our side running the model's whole forward as TRL does (op for
op, so float32 rounding matches too), and in float64 with our side's own path, the last layer at the last
token only (`rl/last_token.py`, whose float32 rounding differs from the whole forward's by as much as that
forward's differs from float64: ~5e-5 on a few of this fixture's gradients). Then 10 optimizer steps of
whole-dataset batches, ours through `train()` and TRL's through `trainer.train()`, from the same weights:
per-step losses within 1e-4, on three model families (Qwen2, GPT-2, Gemma 2).
"""

import copy
import json
import tempfile

import pytest
import torch
from _trl_drivers import assert_same_step, family_config, pair_rows
from datasets import Dataset

from posttrain.data import embedded, preference
from posttrain.rl import last_token, reward
from posttrain.rl.loop import count_tokens
from posttrain.rl.models import disable_dropout, load_reward_model, load_tokenizer

trl = pytest.importorskip("trl")

N_PAIRS = 8
RTOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    """The embedded tiny reward model after 3 AdamW steps of the Bradley–Terry loss on other pairs, so
    that rewards are spread out and the pairs are neither all right nor all wrong."""
    model = load_reward_model(None, pad_token_id=tokenizer.pad_token_id, seed=0)
    rows, _ = preference.tokenize_preference(embedded.dataset("preference", "test"), tokenizer)
    batch = reward.collate_pairs(list(rows)[:32], tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(3):
        loss, _ = reward.reward_step_loss(model, batch, 32)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model


def trl_step(model, tokenizer, rows, **options):
    """TRL's loss, gradients, metrics and batch for `rows` in one micro-batch."""
    with tempfile.TemporaryDirectory() as out:
        args = trl.RewardConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to=[],
            per_device_train_batch_size=len(rows),
            **options,
        )
        trainer = trl.RewardTrainer(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        dataset = trainer.train_dataset
        examples = [
            {k: dataset[i][k] for k in ("chosen_ids", "rejected_ids", "margin") if k in dataset.column_names}
            for i in range(len(dataset))
        ]
        batch = trainer.data_collator(examples)
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters()}
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "batch": batch}


def our_batch(tokenizer, rows, max_length=1024):
    tokenized, _ = preference.tokenize_preference(Dataset.from_list(rows), tokenizer)
    tokenized, _ = preference.drop_overlong_pairs(tokenized, max_length)
    return reward.collate_pairs(list(tokenized), tokenizer.pad_token_id)


def our_step(model, batches, **options):
    """Our loss (summed over micro-batches), gradients and metrics, normalised by the whole step's pairs."""
    model = copy.deepcopy(model).train()
    disable_dropout(model)
    num_items = sum(reward.count_pairs(b) for b in batches)
    loss, metrics = 0.0, {}
    for batch in batches:
        part, part_metrics = reward.reward_step_loss(model, batch, num_items, **options)
        part.backward()
        loss = loss + part.detach()
        for k, v in part_metrics.items():
            metrics[k] = metrics.get(k, 0.0) + v.item()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    return {"loss": loss, "grads": grads, "metrics": metrics}


METRICS = ("accuracy", "margin", "min_reward", "mean_reward", "max_reward")
CASES = {
    # name: (conversational, implicit prompt, margin column, center_rewards_coefficient)
    "standard, explicit prompt": (False, False, False, None),
    "standard, implicit prompt": (False, True, False, None),
    "conversational, explicit prompt": (True, False, False, None),
    "conversational, implicit prompt": (True, True, False, None),
    "standard, margin": (False, False, True, None),
    "conversational, centring": (True, False, False, 0.01),
    "standard, margin and centring": (False, True, True, 0.3),
}


def in_precision(model, dtype, monkeypatch):
    """`model` in `dtype`; in float32 our side runs the model's whole forward (see the module docstring)."""
    if dtype == torch.float32:
        monkeypatch.setattr(last_token, "supports", lambda model: False)
    model = copy.deepcopy(model).to(dtype)
    assert last_token.supports(model) == (dtype == torch.float64)  # float64 takes the last-token path
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_and_metrics_match_trl(model, tokenizer, case, dtype, monkeypatch):
    conversational, implicit, margin, coefficient = CASES[case]
    rows = pair_rows(conversational, implicit, margin=margin)
    model = in_precision(model, dtype, monkeypatch)
    theirs = trl_step(model, tokenizer, rows, center_rewards_coefficient=coefficient)

    batch = our_batch(tokenizer, rows)
    assert torch.equal(batch["input_ids"], theirs["batch"]["input_ids"])
    assert torch.equal(batch["attention_mask"], theirs["batch"]["attention_mask"])
    if margin:
        assert torch.equal(batch["margin"], theirs["batch"]["margin"]) and batch["margin"].any()
    assert count_tokens(batch) == theirs["metrics"]["num_tokens"]

    ours = our_step(model, [batch], center_rewards_coefficient=coefficient)
    assert_same_step(ours, theirs)
    for name in METRICS:
        assert ours["metrics"][name] == pytest.approx(theirs["metrics"][name], rel=RTOL, abs=1e-7), name
    assert 0 < ours["metrics"]["accuracy"] < 1  # the fixture's scores order some pairs right, some wrong


def test_margin_and_centring_change_the_loss_by_their_formula(model, tokenizer):
    # Independent of TRL: the terms by hand on the scores the model gives.
    rows = pair_rows(False, False, margin=True)
    batch = our_batch(tokenizer, rows)
    with torch.no_grad():
        scores = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits.squeeze(-1)
        loss, _ = reward.reward_step_loss(model, batch, N_PAIRS, center_rewards_coefficient=0.5)
    c, r, m = scores[:N_PAIRS].double(), scores[N_PAIRS:].double(), batch["margin"].double()
    expected = (
        sum(
            -torch.log(1 / (1 + torch.exp(-(c[i] - r[i] - m[i])))) + 0.5 * (c[i] + r[i]) ** 2
            for i in range(N_PAIRS)
        )
        / N_PAIRS
    )
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_overlong_pairs_are_dropped_as_trl_drops_them(model, tokenizer, dtype, monkeypatch):
    # Pairs are 7 to 9 tokens (prompt "a+b=", answer, eos): max_length 8 keeps only some.
    rows = pair_rows(False, False, n=16)
    model = in_precision(model, dtype, monkeypatch)
    theirs = trl_step(model, tokenizer, rows, max_length=8)
    tokenized, _ = preference.tokenize_preference(Dataset.from_list(rows), tokenizer)
    kept, dropped = preference.drop_overlong_pairs(tokenized, 8)
    assert 0 < dropped < 16 and len(kept) == len(theirs["batch"]["input_ids"]) // 2
    batch = reward.collate_pairs(list(kept), tokenizer.pad_token_id)
    assert torch.equal(batch["input_ids"], theirs["batch"]["input_ids"])
    assert_same_step(our_step(model, [batch]), theirs)


def test_micro_batches_sum_to_the_whole_batch(model, tokenizer):
    # Pair normalisation: two micro-batches of one step give the gradient of the whole batch.
    rows = pair_rows(True, False, margin=True)
    whole = our_step(model, [our_batch(tokenizer, rows)], center_rewards_coefficient=0.1)
    halves = our_step(
        model,
        [our_batch(tokenizer, rows[:3]), our_batch(tokenizer, rows[3:])],
        center_rewards_coefficient=0.1,
    )
    assert_same_step(halves, whole)
    for name in ("accuracy", "margin", "mean_reward"):
        assert halves["metrics"][name] == pytest.approx(whole["metrics"][name], rel=RTOL, abs=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Trajectory parity: 10 optimizer steps through both trainers
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2", "gemma2"])
def test_ten_steps_follow_trls_trajectory(tmp_path, tokenizer, family):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    start = AutoModelForSequenceClassification.from_config(family_config(family, tokenizer, num_labels=1))
    start.config.pad_token_id = tokenizer.pad_token_id
    start.save_pretrained(tmp_path / "start")
    tokenizer.save_pretrained(tmp_path / "start")
    rows = pair_rows(True, False, n=16, margin=True)
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    steps, lr = 10, 5e-4
    shared = dict(
        learning_rate=lr,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=len(rows),
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        center_rewards_coefficient=0.01,
        max_length=64,
        seed=0,
    )

    args = trl.RewardConfig(
        output_dir=str(tmp_path / "trl"),
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        **shared,
    )
    # The tokenizer as both sides load it from the folder (transformers 5 picks its class from the model
    # config there, which for the embedded character tokenizer is not the class it was saved as).
    trainer = trl.RewardTrainer(
        model=str(tmp_path / "start"),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(tmp_path / "start")),
    )
    trainer.train()
    theirs = [r["loss"] for r in trainer.state.log_history if "loss" in r]

    config = reward.RewardConfig(
        model_name_or_path=str(tmp_path / "start"),
        dataset_name=str(data),
        output_dir=str(tmp_path / "ours"),
        save_steps=0,
        eval_steps=0,
        disable_tqdm=True,
        **shared,
    )
    reward.train(config)
    records = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    ours = [r["loss"] for r in records if "loss" in r]
    assert len(ours) == len(theirs) == steps
    gap = max(abs(a - b) for a, b in zip(ours, theirs, strict=True))
    assert gap <= 1e-4, (gap, [a - b for a, b in zip(ours, theirs, strict=True)])
    assert theirs[-1] < theirs[0] - 0.05  # the run moves: the comparison covers real updates
