"""Drivers shared by the tests that compare our preference loops with TRL 1.16's trainers.

- `rel_err`, `assert_same_step`: loss and gradients of one step, norm-relative.
- `pair_rows`: embedded-task preference rows in any of TRL's preference layouts.
- `trained_policy_and_reference`: a tiny policy a few steps away from its reference.
- `trl_dpo_step`: TRL's DPOTrainer loss, gradients, metrics and collated batch for some rows.
- `family_config`: tiny Qwen2 / GPT-2 / Gemma 2 configs (causal LM or one-label classifier).
- `trl_online_step`: TRL's GRPOTrainer / RLOOTrainer loss, gradients and metrics on given completions and rewards.
- `TRL_CPU`, `TRL_TRAIN`: the TrainingArguments every TRL run here needs on the CPU.
"""

from __future__ import annotations

import copy
import json
import math
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
    """Loss and gradients within rtol, norm-relative, over all parameters together and per parameter. Per
    parameter the reference norm is floored at 2e-3 x the largest one: the query / key projections of the nearly
    uniform attention layers get gradients ~1e-3 of the others, where float32 rounding alone gives relative
    errors ~1e-4 whatever the order of operations. Over tests/test_grpo_trl.py's 66 steps the worst parameter
    (always a key projection) was 8.4e-6 of a 1e-3 floor with the output layer's folds as torch ops and 1.01e-5
    with them in C (kernels/native.py), whose log-probs and gradients are as near float64's as the ops' are: rounding
    noise either way."""
    assert rel_err(ours["loss"], theirs["loss"]) <= rtol, (ours["loss"], theirs["loss"])
    assert ours["grads"].keys() == theirs["grads"].keys()
    names = list(theirs["grads"])
    flat = [torch.cat([g[n].flatten() for n in names]) for g in (ours["grads"], theirs["grads"])]
    assert rel_err(*flat) <= rtol
    floor = 2e-3 * max(g.norm().item() for g in theirs["grads"].values())
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


def fixed_reward_funcs(rewards: torch.Tensor, names: list[str]) -> list:
    """One reward function per column of `rewards` (N, F) under TRL's calling convention, each returning its
    column (None where NaN) whatever the completions: the rewards are part of the test's input."""

    def make(column, name):
        def reward(prompts, completions, **kwargs):
            assert len(completions) == len(column)
            return [None if math.isnan(v) else v for v in column]

        reward.__name__ = name  # TRL names the function's metrics rewards/<__name__>/...
        return reward

    return [make(rewards[:, i].tolist(), name) for i, name in enumerate(names)]


def trl_online_step(
    algo: str,
    policy,
    ref,
    tokenizer,
    prompts: list[str],
    completions: list[list[int]],
    rewards: torch.Tensor,
    reward_names: list[str],
    *,
    updated=None,
    micro_batches: int = 1,
    sampler_logps: list[list[float]] | None = None,
    **options,
) -> dict:
    """One optimizer step of TRL's GRPOTrainer (`algo` "grpo") or RLOOTrainer ("rloo") on one generation batch
    of FIXED completions: the trainer's generation step is replaced by one returning `completions` (N = B * G
    token lists, each prompt's G adjacent, as TRL's RepeatSampler orders them), so that its
    `_generate_and_score_completions` (tokenized prompts, masks, old / reference log-probs, rewards from
    `fixed_reward_funcs(rewards, reward_names)`, advantages, generation metrics) and `compute_loss` run on them.

    The generation batch is split into `micro_batches` micro-batches in row order (the trainer's loop shuffles
    them first; not shuffling keeps the rows comparable) that make one optimizer step
    (`gradient_accumulation_steps` = `steps_per_generation` = micro_batches). With `updated`, its weights replace
    the policy's between generation and loss: the second iteration of `num_iterations` 2, after an optimizer
    update, with the old log-probs of the generation batch (pass num_iterations=2 so that TRL computes them).
    `sampler_logps` are returned by the generation step as a vLLM or `rollout_func` backend would (GRPO only;
    TRL's transformers path returns None). `ref` is saved to a temporary folder named by the policy's config:
    TRL loads its reference model from there when beta != 0.

    Returns loss (the step's: the sum of the micro-batches' losses as the trainer back-propagates them; RLOO
    returns a per-micro-batch mean that the Trainer divides by gradient_accumulation_steps, done here),
    grads (every parameter's), metrics (each metric's values averaged, NaN dropped, as the trainers' `log`
    does), batch (the scored generation batch) and prompt_ids (TRL's tokenization of `prompts`).
    """
    trl = import_or_skip("trl")
    from trl.trainer.utils import split_tensor_dict

    n = len(completions)
    group = n // len(prompts)
    config_class, trainer_class = {
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer),
        "rloo": (trl.RLOOConfig, trl.RLOOTrainer),
    }[algo]
    with tempfile.TemporaryDirectory() as folder:
        ref.save_pretrained(folder)
        model = copy.deepcopy(policy)
        model.config._name_or_path = folder
        args = config_class(
            output_dir=f"{folder}/run",
            num_generations=group,
            per_device_train_batch_size=n // micro_batches,
            gradient_accumulation_steps=micro_batches,
            **{**TRL_CPU, **options},
        )
        trainer = trainer_class(
            model=model,
            reward_funcs=fixed_reward_funcs(rewards, reward_names),
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
        )
        seen = []

        def generate(prompt_ids, *args, **kwargs):
            seen.extend(prompt_ids)
            return (completions, sampler_logps) if algo == "grpo" else completions

        trainer._generate_single_turn = generate
        trainer.model.train()
        trainer.current_gradient_accumulation_steps = micro_batches  # set per step by the Trainer's loop
        batch = trainer._generate_and_score_completions(
            [{"prompt": p} for p in prompts for _ in range(group)]
        )
        if updated is not None:
            with torch.no_grad():
                for p, q in zip(trainer.model.parameters(), updated.parameters(), strict=True):
                    p.copy_(q)
        loss = torch.zeros(())
        for micro in split_tensor_dict(batch, micro_batches):
            micro_loss = trainer.compute_loss(trainer.model, micro)
            if algo == "rloo":
                micro_loss = micro_loss / micro_batches
            micro_loss.backward()
            loss += micro_loss.detach()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {}
        for name, values in trainer._metrics["train"].items():
            valid = [v for v in values if not math.isnan(v)]
            metrics[name] = sum(valid) / len(valid) if valid else None
    return {"loss": loss, "grads": grads, "metrics": metrics, "batch": batch, "prompt_ids": seen[::group]}
