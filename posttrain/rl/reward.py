"""Reward modelling: train a scalar score r(x, y) so that chosen answers outscore rejected ones.

    1. model and tokenizer: a sequence-classification model with one output (a causal-LM checkpoint gets
       a fresh score head; when none is named, the embedded SFT model, `sft.embedded_sft_model`), dropout off
    2. data: load, check the preference format, tokenize prompt + chosen and prompt + rejected, drop the
       pairs longer than max_length (counted)
    3. for each optimizer step: chosen and rejected sequences in ONE forward (a 2B-row batch, chosen
       first), each scored at its last non-padding token -> Bradley–Terry loss -> step

Metrics (TRL 1.16's names): loss, accuracy (share of pairs with r_chosen > r_rejected), margin (mean
r_chosen - r_rejected), min_reward / mean_reward / max_reward (over both sides), num_tokens,
learning_rate, grad_norm; eval_ versions on the held-out pairs.

TRL logs each micro-batch's min and max reward and averages them over the logging window; here a step's
min_reward / max_reward is the pair-weighted mean of its micro-batches' extremes (the same number with one
micro-batch per step, or micro-batches of equal size). Pairs whose chosen and rejected tokens are identical
are dropped and counted (see `posttrain.data.preference`); TRL trains them.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from posttrain.data import collate, embedded, loading, preference
from posttrain.losses import registry
from posttrain.rl import lean, loop, lora, sft
from posttrain.rl.config import ConfigError, TrainConfig, fill_run_defaults
from posttrain.rl.last_token import sequence_scores
from posttrain.rl.models import disable_dropout, load_reward_model, load_tokenizer

# Defaults that depend on the run. With no model named, the reward model starts from the embedded SFT
# model (`sft.embedded_sft_model`, which already answers ~98% of the held-out problems) with a fresh score
# head; its pairs are ~10 tokens, so many steps cost little. It trains on the five plausible mistakes of
# every problem (off by one or ten, the difference: `embedded.ranked_preference_rows`), the kind of rejected
# answer the held-out pairs hold. 2976 steps of 32 pairs (24 epochs); held-out pair accuracy (eval_accuracy,
# 112 pairs) on an Intel Xeon for seeds 42/1/7/3/5: 0.982/0.973/0.973/0.991/0.982. Held-out accuracy still
# rises at the end of shorter runs: 16 epochs of 32 pairs got 0.973/0.973/0.973/0.946/0.982, 16 of 64 (the
# earlier default, 992 steps) 0.920/0.964 for seeds 42/1 here and 0.982/0.991/0.964 for 42/1/7 on an AMD
# EPYC, whose float rounding gives another SFT start. Also tried (seed 42, 64 pairs a step, AMD): lr 1e-3
# 0.866 (it unlearns the backbone), 1e-4 0.920; 12 rejected per problem (7 random wrong sums: easy, they
# dilute the hard ones), 7 epochs, 0.946 at 3e-4, 0.938 at 1e-4; from random weights 0.82.
EMBEDDED_MODEL_LEARNING_RATE = 3e-4
EMBEDDED_REJECTED_PER_PROMPT = 5
PRETRAINED_LEARNING_RATE = 1e-4  # TRL's RewardConfig default
#                              embedded task     any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (32, 8),
    "num_train_epochs": (24.0, 3.0),
    "warmup_steps": (20, 0),
    "max_length": (64, 1024),
}


@dataclass
class RewardConfig(TrainConfig):
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local path or hub id of a causal LM or sequence-classification model; none: the "
            "embedded SFT model (what `posttrain sft` trains by default; trained once, cached in "
            "$POSTTRAIN_CACHE, default ~/.cache/posttrain)."
        },
    )
    # Redeclared with a `None` default: filled from RUN_DEFAULTS, so an explicit value always wins.
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Pairs per micro-batch per process; none: 32 on the embedded task, else 8."},
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the train set (unless max_steps); none: 24 embedded, else 3."},
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps of linear warmup from 0; none: 20 embedded, else 0."}
    )
    max_length: int | None = field(
        default=-1,
        metadata={
            "help": "Drop (and count) the pairs whose prompt + chosen or prompt + rejected is longer than "
            "this many tokens; -1: 64 embedded, else 1024; none: keep every pair."
        },
    )
    center_rewards_coefficient: float | None = field(
        default=None,
        metadata={
            "help": "Weight of the mean (r_chosen + r_rejected)^2 term that centres rewards; none: off."
        },
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    loss_type: str = field(
        default="bradley_terry",
        metadata={"help": "Reward-model loss: " + ", ".join(registry.names("reward")) + "."},
    )

    def __post_init__(self):
        fill_run_defaults(
            self,
            RUN_DEFAULTS,
            embedded_learning_rate=EMBEDDED_MODEL_LEARNING_RATE,
            pretrained_learning_rate=PRETRAINED_LEARNING_RATE,
        )
        super().__post_init__()
        if self.loss_type not in registry.names("reward"):
            raise ConfigError(
                f"loss_type={self.loss_type!r} is not a reward-model loss; expected one of "
                f"{registry.names('reward')}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (or none), got {self.max_length}")
        if self.center_rewards_coefficient is not None and self.center_rewards_coefficient < 0:
            raise ConfigError(
                f"center_rewards_coefficient must be >= 0 (or none), got {self.center_rewards_coefficient}"
            )


def load_preference_data(config: RewardConfig, tokenizer):
    """Tokenized train and eval pairs (eval may be None) and the dropped-pair counts."""
    if config.dataset_name is None:
        # Train on every plausible mistake of each problem (see `embedded.ranked_preference_rows`);
        # evaluate on the held-out problems' preference split, one pair each.
        from datasets import Dataset

        train = Dataset.from_list(
            embedded.ranked_preference_rows("train", rejected_per_prompt=EMBEDDED_REJECTED_PER_PROMPT)
        )
        evaluation = embedded.dataset("preference", "test")
    else:
        train, evaluation = loading.config_splits(config)
    out, info = [], {}
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is None:
            out.append(None)
            continue
        rows, counts = preference.tokenize_preference(dataset, tokenizer, command="rm")
        rows, counts["dropped_overlong_pairs"] = preference.drop_overlong_pairs(rows, config.max_length)
        out.append(rows)
        info[split] = counts
    return out[0], out[1], info


def collate_pairs(rows, pad_token_id: int) -> dict:
    """B pairs -> one batch of 2B sequences, the chosen ones first, right-padded.

    Returns input_ids, attention_mask (2B, T) and, when the rows have one, margin (B,) float32.
    """
    if not rows:
        raise ValueError("cannot collate an empty list of pairs")
    sequences = [
        {
            "input_ids": r["prompt_ids"] + r[side],
            "completion_mask": [0] * len(r["prompt_ids"]) + [1] * len(r[side]),
        }
        for side in ("chosen_ids", "rejected_ids")
        for r in rows
    ]
    padded = collate.pad_collate(sequences, pad_token_id)
    batch = {"input_ids": padded["input_ids"], "attention_mask": padded["attention_mask"]}
    if "margin" in rows[0]:
        batch["margin"] = torch.tensor([float(r["margin"]) for r in rows], dtype=torch.float32)
    return batch


def reward_step_loss(
    model, batch, num_items, *, loss_type: str = "bradley_terry", center_rewards_coefficient=None
):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: input_ids, attention_mask (2B, T), chosen rows first [+ margin (B,)]; num_items: pairs in the
    whole optimizer step. Returns (loss, {"accuracy", "margin", "min_reward", "mean_reward",
    "max_reward"}): scalars, each a sum over this micro-batch's pairs divided by num_items.
    """
    # the MLPs' activations recomputed, the norms and rotary embedding in C (rl/lean.py): lighter, faster
    with lean.layers(model):
        rewards = sequence_scores(model, batch["input_ids"], batch["attention_mask"]).squeeze(-1)  # (2B,)
    chosen, rejected = rewards.chunk(2)  # (B,), (B,)
    loss = registry.get("reward", loss_type)(
        chosen,
        rejected,
        num_items,
        margin=batch.get("margin"),
        center_rewards_coefficient=center_rewards_coefficient,
    )
    with torch.no_grad():
        pairs = chosen.numel()
        metrics = {
            "accuracy": (chosen > rejected).sum() / num_items,
            "margin": (chosen - rejected).sum() / num_items,
            "min_reward": rewards.min() * pairs / num_items,
            "mean_reward": rewards.sum() / 2 / num_items,
            "max_reward": rewards.max() * pairs / num_items,
        }
    return loss, metrics


def count_pairs(batch) -> int:
    """Pairs in a batch: the unit the reward model's loss is averaged over."""
    return batch["input_ids"].shape[0] // 2


def train(config: RewardConfig):
    """Train the reward model to the end; returns the run (its output_dir holds metrics.jsonl, the model)."""
    # Data first: a bad dataset or option stops here, before the run folder is written (and before the
    # embedded SFT model is trained; it has the embedded tokenizer, which load_tokenizer(None) builds).
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows, info = load_preference_data(config, tokenizer)
    # No model named: the embedded SFT model (`posttrain sft` defaults, trained once and cached). The config
    # keeps model_name_or_path None, so the embedded defaults above apply to it.
    start_model = config.model_name_or_path or sft.embedded_sft_model()
    run = loop.start(config, command="rm")
    dropped = {f"{split}_{key}": value for split, counts in info.items() for key, value in counts.items()}
    run.log_info({"start_model": start_model, **dropped})
    model = load_reward_model(
        start_model,
        pad_token_id=tokenizer.pad_token_id,
        seed=config.seed,
        quantization=lora.quantization(run),
    )
    if config.disable_dropout:
        disable_dropout(model)

    loop.fit(
        run,
        model,
        tokenizer,
        train_rows,
        functools.partial(collate_pairs, pad_token_id=tokenizer.pad_token_id),
        functools.partial(
            reward_step_loss,
            loss_type=config.loss_type,
            center_rewards_coefficient=config.center_rewards_coefficient,
        ),
        count_fn=count_pairs,
        eval_rows=eval_rows,
    )
    return run
