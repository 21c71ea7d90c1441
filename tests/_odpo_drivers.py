"""Drivers for the Online DPO tests: TRL 1.16's OnlineDPOTrainer on fixed completions, and our pieces on the same.

- `trl_online_dpo_step`: one optimizer step of TRL's trainer (`training_step` per micro-batch) whose model's
  `generate` returns given completions, so that everything after sampling (prompt tokenization, eos
  truncation and masks, rewards, the eos penalty, ranking, log-probs, the loss, the metrics) is TRL's.
- `as_rollout`: completions as our rollout engine returns them.
"""

from __future__ import annotations

import copy
import math
import tempfile

import torch
from _optional import import_or_skip
from _trl_drivers import TRL_CPU
from datasets import Dataset

from posttrain.rl import rollout


def as_rollout(completions: list[list[int]], pad_token_id: int, eos_token_id: int) -> rollout.Rollout:
    """Token lists (N) -> a `rollout.Rollout`: right-padded ids, the mask up to and including eos, sampler
    log-probs 0 (unused by Online DPO), finished where the last token is eos."""
    n, width = len(completions), max(len(c) for c in completions)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, tokens in enumerate(completions):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    finished = torch.tensor([tokens[-1] == eos_token_id for tokens in completions])
    return rollout.Rollout(ids, mask, torch.zeros(n, width), finished)


def lookup_reward_funcs(
    prompts: list[str], texts: list[str], rewards: torch.Tensor, names: list[str]
) -> list:
    """One reward function per column of `rewards` (N, F), under TRL's calling convention, that returns the
    value of row i for the completion `texts[i]` of prompt `prompts[i // 2]` (None where NaN), whatever order
    and batch the trainer scores the rows in (TRL's Online DPO lays a micro-batch out as [firsts; seconds])."""
    table = {(prompts[i // 2], text): i for i, text in enumerate(texts)}
    assert len(table) == len(texts), "each prompt's two completions must differ"

    def make(column, name):
        def reward(prompts, completions, **kwargs):
            values = [column[table[p, c]] for p, c in zip(prompts, completions, strict=True)]
            return [None if math.isnan(v) else v for v in values]

        reward.__name__ = name
        return reward

    return [make(rewards[:, i].tolist(), name) for i, name in enumerate(names)]


def trl_online_dpo_step(
    policy, ref, tokenizer, prompts: list[str], completions: list[list[int]], reward_funcs: list, *,
    reward_processing_classes=None, micro_batches: int = 1, **options,
) -> dict:  # fmt: skip
    """One optimizer step of TRL's OnlineDPOTrainer on FIXED completions.

    completions: 2 per prompt in OUR order (prompt j's pair at rows 2j, 2j + 1, the first sampled first).
    TRL's trainer samples per micro-batch, its B prompts repeated as [all B; all B], so its `generate`
    returns, for micro-batch prompt i, our first completion at row i and our second at row B + i (ties then
    go to our first, on both sides). The prompts are cut into `micro_batches` consecutive micro-batches
    (gradient_accumulation_steps). reward_funcs: TRL's (callables and / or sequence-classification models).

    Returns loss (the step's, as the trainer logs it: the sum of the micro-batches' loss / accumulation),
    grads, metrics (each stat averaged over the micro-batches, as the trainer's `log` does), prompt_ids
    (TRL's tokenization, unpadded) and forwards: per micro-batch, TRL's own per-token log-probs of the policy
    and the reference with the completion mask, (logps, ref_logps, mask) each (B_micro * 2, W) in TRL's row
    order, for the metrics we define over completion tokens only.
    """
    trl = import_or_skip("trl")
    from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

    assert trl is not None and len(completions) == 2 * len(prompts)
    per_micro = len(prompts) // micro_batches
    with tempfile.TemporaryDirectory() as folder:
        args = OnlineDPOConfig(
            output_dir=folder,
            per_device_train_batch_size=per_micro,
            gradient_accumulation_steps=micro_batches,
            **{**TRL_CPU, **options},
        )
        trainer = OnlineDPOTrainer(
            model=copy.deepcopy(policy),
            ref_model=copy.deepcopy(ref),
            reward_funcs=reward_funcs,
            args=args,
            train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
            processing_class=tokenizer,
            reward_processing_classes=reward_processing_classes,
        )
        prompt_ids, forwards, current = [], [], {}

        def generate(input_ids, attention_mask, **kwargs):
            B = input_ids.shape[0] // 2
            rows = current["completions"]
            ordered = [rows[2 * i] for i in range(B)] + [rows[2 * i + 1] for i in range(B)]
            width = max(len(c) for c in ordered)
            out = torch.full((2 * B, width), tokenizer.pad_token_id, dtype=torch.long)
            for i, tokens in enumerate(ordered):
                out[i, : len(tokens)] = torch.tensor(tokens)
            prompt_ids.extend(
                ids[m.bool()].tolist() for ids, m in zip(input_ids[:B], attention_mask[:B], strict=True)
            )
            return torch.cat([input_ids, out], dim=1)

        original_forward = trainer._forward

        def forward(model, prompt_ids_, prompt_mask, completion_ids, completion_mask, *rest):
            logps = original_forward(model, prompt_ids_, prompt_mask, completion_ids, completion_mask, *rest)
            forwards.append((logps.detach().clone(), completion_mask.clone()))
            return logps

        trainer.model.generate = generate
        trainer._forward = forward
        loss = torch.zeros(())
        for m in range(micro_batches):
            part = slice(m * per_micro, (m + 1) * per_micro)
            current["completions"] = completions[2 * part.start : 2 * part.stop]
            loss += trainer.training_step(trainer.model, {"prompt": prompts[part]})
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {name: sum(values) / len(values) for name, values in trainer.stats.items() if values}
    pairs = [(forwards[i][0], forwards[i + 1][0], forwards[i][1]) for i in range(0, len(forwards), 2)]
    return {"loss": loss, "grads": grads, "metrics": metrics, "prompt_ids": prompt_ids, "forwards": pairs}
