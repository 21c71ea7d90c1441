"""Drivers shared by the tests that compare our preference loops with TRL 1.16's trainers.

- `rel_err`, `assert_same_step`: loss and gradients of one step, norm-relative.
- `pair_rows`: embedded-task preference rows in any of TRL's preference layouts.
- `trained_policy_and_reference`: a tiny policy a few steps away from its reference.
- `trl_dpo_step`: TRL's DPOTrainer loss, gradients, metrics and collated batch for some rows.
- `family_config`: tiny Qwen2 / GPT-2 / Gemma 2 configs (causal LM or one-label classifier).
- `TRL_CPU`, `TRL_TRAIN`: the TrainingArguments every TRL run here needs on the CPU.
"""

from __future__ import annotations

import copy
import json
import tempfile

import torch
from _optional import import_or_skip
from datasets import Dataset

from posttrain.data import embedded
from posttrain.rl.models import disable_dropout

RTOL = 1e-5
# TRL 1.16 on the CPU: bf16 defaults to True even with use_cpu, activation checkpointing defaults to on.
TRL_CPU = dict(use_cpu=True, bf16=False, activation_checkpointing=False, report_to=[])
TRL_TRAIN = dict(TRL_CPU, save_strategy="no", disable_tqdm=True)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b|| (b the reference)."""
    return ((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-30)).item()


def assert_same_step(ours, theirs, rtol: float = RTOL):
    """Loss and gradients within rtol, norm-relative, over all parameters together and per parameter; as in
    test_sft_trl, the per-parameter reference norm is floored at 1e-3 x the largest one (the query / key
    projections of the nearly uniform attention layers get gradients ~1e-3 of the others, where float32
    rounding alone gives relative errors ~1e-4 whatever the order of operations)."""
    assert rel_err(ours["loss"], theirs["loss"]) <= rtol, (ours["loss"], theirs["loss"])
    assert ours["grads"].keys() == theirs["grads"].keys()
    names = list(theirs["grads"])
    flat = [torch.cat([g[n].flatten() for n in names]) for g in (ours["grads"], theirs["grads"])]
    assert rel_err(*flat) <= rtol
    floor = 1e-3 * max(g.norm().item() for g in theirs["grads"].values())
    for name in names:
        a, b = ours["grads"][name].double(), theirs["grads"][name].double()
        error = (a - b).norm().item() / max(b.norm().item(), floor)
        assert error <= rtol, f"{name}: gradient relative error {error:.2e}"


def pair_rows(conversational: bool, implicit: bool, n: int = 8, margin: bool = False):
    """n preference rows of the embedded task, with ultrafeedback-style extra columns."""
    rows = embedded.rows("preference", "train", seed=0, conversational=conversational)[:n]
    out = []
    for i, row in enumerate(rows):
        if implicit:
            row = {"chosen": row["prompt"] + row["chosen"], "rejected": row["prompt"] + row["rejected"]}
        row = {**row, "score_chosen": 8.0, "score_rejected": 2.0}
        if margin:
            row["margin"] = 0.25 * (i % 4)
        out.append(row)
    return out


def trained_policy_and_reference(tokenizer, reference=None):
    """(policy, reference): the reference is `reference` (default: the random tiny Qwen2), dropout off, the
    policy that model after 3 AdamW steps of next-token cross-entropy on other problems' prompts + chosen
    answers."""
    ref = embedded.build_model(seed=0) if reference is None else reference
    disable_dropout(ref)
    policy = copy.deepcopy(ref)
    texts = [r["prompt"] + r["completion"] + tokenizer.eos_token for r in embedded.rows()[:32]]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-2)
    for _ in range(3):
        policy(**enc, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return policy, ref


def trl_dpo_step(policy, ref, tokenizer, rows, **dpo_options):
    """TRL's loss, policy gradients, metrics (each metric's last value) and collated batch for `rows` in one
    micro-batch; also the prepared dataset (`trainer.train_dataset`, after any filtering and precompute)."""
    trl = import_or_skip("trl")
    with tempfile.TemporaryDirectory() as out:
        args = trl.DPOConfig(
            output_dir=out, per_device_train_batch_size=len(rows), **{**TRL_CPU, **dpo_options}
        )
        trainer = trl.DPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        dataset = trainer.train_dataset
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {name: values[-1] for name, values in trainer._metrics["train"].items()}
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "batch": batch, "dataset": dataset}


def family_config(family: str, tokenizer, num_labels: int | None = None):
    """A tiny config of `family` ("qwen2", "gpt2", "gemma2", "qwen2_moe") over the embedded tokenizer's ids;
    with `num_labels`, for a sequence-classification head."""
    from transformers import AutoConfig

    labels = {} if num_labels is None else {"num_labels": num_labels}
    common = dict(vocab_size=128, pad_token_id=tokenizer.pad_token_id, **labels)
    if family == "qwen2":
        return embedded.tiny_model_config(**labels)
    if family == "gpt2":  # learned positions, LayerNorm, dropout 0.1 by default (disabled on both sides)
        return AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=64, **common)
    if family == "qwen2_moe":  # mixture of experts: a router load-balancing loss, router_aux_loss_coef 0.001
        return AutoConfig.for_model(
            "qwen2_moe",
            hidden_size=64,
            intermediate_size=128,
            moe_intermediate_size=32,
            shared_expert_intermediate_size=64,
            num_experts=4,
            num_experts_per_tok=2,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=64,
            **common,
        )
    return AutoConfig.for_model(  # gemma2: logit soft-capping in attention (and the output), sliding window
        "gemma2",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=64,
        **common,
    )


def write_jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def logged(metrics_jsonl, key: str | None = "loss") -> list:
    """`key` of every record of one of our runs' metrics.jsonl that has it (key None: the records)."""
    records = [json.loads(line) for line in metrics_jsonl.read_text().splitlines()]
    return records if key is None else [r[key] for r in records if key in r]
