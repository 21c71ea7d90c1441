"""Shared pieces of the loop tests, and a script that trains once with `loop.fit`.

    python -m torch.distributed.run --nproc_per_node 2 tests/_ddp_worker.py OUT --per_device_train_batch_size 2

runs the same training as `train(...)` in-process; tests/test_loop.py compares their metrics.jsonl.
Independent of the data pipeline: rows are tokenized here by hand, the loss is a plain masked NLL.
"""

from __future__ import annotations

import sys

import torch

from posttrain.data import embedded
from posttrain.rl import loop
from posttrain.rl.config import TrainConfig, parse_config

# Smaller than the embedded default so that a step costs milliseconds.
MODEL_KWARGS = dict(
    hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1
)


def build_model(seed: int = 0, attention_dropout: float = 0.0):
    """attention_dropout > 0 makes training draw from the torch RNG (an exact resume must restore it)."""
    return embedded.build_model(seed=seed, attention_dropout=attention_dropout, **MODEL_KWARGS)


def make_rows(n: int, split: str = "train") -> list[dict]:
    """Tokenized prompt-completion rows of the embedded task (lengths vary: '3+4=' vs '21-17=')."""
    tokenizer = embedded.build_tokenizer()
    rows = []
    for prompt, answer in embedded.problems(split)[:n]:
        p = tokenizer(prompt)["input_ids"]
        c = tokenizer(answer + embedded.EOS_TOKEN)["input_ids"]
        rows.append({"input_ids": p + c, "completion_mask": [0] * len(p) + [1] * len(c)})
    return rows


def collate(rows: list[dict]) -> dict:
    """Right-padded batch (B, T) with attention_mask and completion_mask."""
    T = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.zeros(len(rows), T, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    completion_mask = torch.zeros_like(input_ids)
    for b, r in enumerate(rows):
        n = len(r["input_ids"])
        input_ids[b, :n] = torch.tensor(r["input_ids"])
        attention_mask[b, :n] = 1
        completion_mask[b, :n] = torch.tensor(r["completion_mask"])
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def count_fn(batch) -> torch.Tensor:
    return batch["completion_mask"].sum()


def nll_loss_fn(model, batch, num_items):
    """Σ masked NLL / num_items from the full logits, and token accuracy on the same scale."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)  # (B, T-1, V)
    target = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:]
    token_logp = logp.gather(-1, target[..., None]).squeeze(-1)  # (B, T-1)
    correct = (logp.argmax(-1) == target) & mask.bool()
    return -(token_logp * mask).sum() / num_items, {"mean_token_accuracy": correct.sum() / num_items}


def train(config: TrainConfig, *, num_rows: int = 48, num_eval_rows: int = 0, model=None, eval_fn=None):
    """One `fit` on the hand-tokenized rows; returns (run, model, fit's result)."""
    run = loop.start(config, command="test")
    model = build_model() if model is None else model
    eval_rows = make_rows(num_eval_rows, "test") if num_eval_rows else None
    result = loop.fit(
        run,
        model,
        embedded.build_tokenizer(),
        make_rows(num_rows),
        collate,
        nll_loss_fn,
        count_fn,
        eval_rows=eval_rows,
        eval_fn=eval_fn,
    )
    return run, model, result


if __name__ == "__main__":
    torch.set_num_threads(1)
    out, rest = sys.argv[1], sys.argv[2:]
    train(parse_config(TrainConfig, ["--output_dir", out, *rest]))
