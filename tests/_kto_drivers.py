"""Drivers for the tests that compare our KTO with TRL 1.16's KTOTrainer (see _trl_drivers for the DPO ones).

- `unpaired_rows`: embedded-task unpaired rows, standard or conversational, with an extra column.
- `trl_kto_step`: TRL's KTOTrainer loss, gradients, metrics, collated batches and prepared dataset for some
  rows, in micro-batches of a given size (one optimizer step).
- `our_kto_step`: ours on the same rows through our data pipeline and `kto.kto_step_loss`.
"""

from __future__ import annotations

import copy
import math
import tempfile

import torch
from _optional import import_or_skip
from _trl_drivers import TRL_CPU
from datasets import Dataset

from posttrain.data import embedded, unpaired
from posttrain.rl import dpo, kto
from posttrain.rl.models import disable_dropout


def unpaired_rows(conversational: bool, n: int = 8, offset: int = 0):
    """n unpaired rows of the embedded task (both labels present), with a column TRL and we must ignore."""
    rows = embedded.rows("unpaired_preference", "train", seed=0, conversational=conversational)
    rows = rows[offset : offset + n]
    assert 0 < sum(r["label"] for r in rows) < n
    return [{**r, "source": f"row {i}"} for i, r in enumerate(rows)]


def trl_kto_step(policy, ref, tokenizer, rows, *, batch_size=None, **options):
    """TRL's loss (the optimizer step's: the micro-batches' losses / their number, as the Trainer scales them
    under gradient accumulation), policy gradients, metrics (each averaged over the micro-batches, as its
    `log` does), collated micro-batches and prepared dataset for `rows`, micro-batches of `batch_size` rows
    (default: all) in dataset order (the sequential sampler KTO requires)."""
    trl = import_or_skip("trl")
    with tempfile.TemporaryDirectory() as out:
        size = batch_size or len(rows)
        args = trl.KTOConfig(output_dir=out, per_device_train_batch_size=size, **{**TRL_CPU, **options})
        trainer = trl.KTOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        dataset = trainer.train_dataset
        starts = range(0, len(dataset), size)
        batches = [
            trainer.data_collator([dataset[i] for i in range(s, min(s + size, len(dataset)))]) for s in starts
        ]
        trainer.model.train()
        loss = torch.zeros(())
        for batch in batches:
            part = trainer.compute_loss(trainer.model, dict(batch)) / len(batches)
            part.backward()
            loss += part.detach()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {name: sum(v) / len(v) for name, v in trainer._metrics["train"].items()}
        metrics["num_tokens"] = trainer._total_train_tokens
    return {"loss": loss, "grads": grads, "metrics": metrics, "batches": batches, "dataset": dataset}


def our_rows(tokenizer, rows, config: kto.KTOConfig, ref=None):
    """Our tokenized rows for `rows` under `config` (cut, dropped, mismatched completions; precomputed
    reference log-probs when the config asks and `ref` is given) and the number of rows dropped."""
    tokenized, _ = unpaired.tokenize_unpaired(Dataset.from_list(rows), tokenizer)
    tokenized = dpo.cut_prompts(tokenized, config.max_prompt_length)
    kept, dropped = dpo.drop_filled_prompts(tokenized, config.max_length, config.truncation_mode)
    if config.uses_kl:
        kept = unpaired.add_kl_completions(kept, config.per_device_train_batch_size)
    if config.precompute_ref_log_probs and ref is not None:
        kept = kto.precompute_reference(
            kept, ref, _collate(tokenizer, config), batch_size=config.precompute_ref_batch_size or 3,
            device=torch.device("cpu"), with_kl=config.uses_kl,
        )  # fmt: skip
    return kept, dropped


def _collate(tokenizer, config):
    return lambda rows: unpaired.collate_unpaired(
        rows, tokenizer.pad_token_id, max_length=config.max_length, truncation_mode=config.truncation_mode
    )


def our_batches(tokenizer, rows, config, ref=None):
    kept, dropped = our_rows(tokenizer, rows, config, ref)
    size = config.per_device_train_batch_size
    batches = [_collate(tokenizer, config)(list(kept)[s : s + size]) for s in range(0, len(kept), size)]
    return batches, dropped


def our_kto_step(policy, ref, batches, config, *, num_items=None):
    """Our loss (summed over the micro-batches), policy gradients and metrics (summed) for one optimizer step;
    num_items: the loop's count (default: `kto.count_rows` summed over the batches, clamped as the loop does)."""
    model = copy.deepcopy(policy).train()
    disable_dropout(model)
    if num_items is None:
        num_items = sum(kto.count_rows(b) for b in batches).clamp(min=1)
    loss, metrics = torch.zeros(()), {}
    for batch in batches:
        part, part_metrics = kto.kto_step_loss(
            model, batch, num_items, config=config, ref_model=None if "ref_logps" in batch else ref
        )
        part.backward()
        loss += part.detach()
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss, "grads": grads, "metrics": metrics}


def assert_same_metrics(ours, theirs, batches, rtol=1e-5):
    """Every metric TRL logs, under its name (num_tokens: the loop's count of the batches)."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    assert tokens == theirs["metrics"]["num_tokens"]
    for key, value in theirs["metrics"].items():
        if key == "num_tokens":
            continue
        assert key in ours["metrics"], f"{key} missing from our metrics {sorted(ours['metrics'])}"
        assert math.isclose(ours["metrics"][key], value, rel_tol=rtol, abs_tol=1e-6), (
            key,
            ours["metrics"][key],
            value,
        )
