"""Group relative policy optimisation: sample G completions per prompt, score them, and push up the ones
that beat their group (Shao et al. 2024, arXiv:2402.03300; the loss family of TRL 1.16's GRPOTrainer).

    1. model and tokenizer (the embedded RL start when none is named, `sft.embedded_start`); a frozen
       reference only when beta != 0; the reward functions / reward model (`rl.rewards`)
    2. data: prompt rows (any format with a `prompt` column; the other columns go to the reward functions)
    3. every steps_per_generation x num_iterations micro-steps, a generation batch: this rank's prompts x G
       completions from the rollout engine (`rl.rollout`), rewards, advantages (`losses.policy`, registry
       "advantage"), old log-probs when the policy will have moved before the batch is used, reference
       log-probs when beta != 0; shuffled and cut into steps_per_generation micro-batches
    4. each optimizer step: gradient_accumulation_steps micro-batches -> log-probs of the completion
       tokens only (`rl.logprobs`) -> the registered policy loss (registry "policy") aggregated as it says,
       plus beta x the k3 KL, minus entropy_coef x the entropy -> `loop.accumulate`

Options and defaults are TRL 1.16's GRPOConfig's (batch sizes count completions; generation_batch_size is
global). Metrics (TRL's names): loss, reward, reward_std, rewards/<func>/mean|std, frac_reward_zero_std,
completions/mean_length|min_length|max_length|clipped_ratio (on the steps that generated), kl (beta != 0),
entropy, clip_ratio/low_mean|high_mean|region_mean (clipped surrogates), cispo_clip_ratio,
num_tokens (prompt + completion tokens seen), learning_rate, grad_norm, and what reward functions log with
`log_metric`. Every logging_steps, the generation batch's rows go to completions.jsonl (prompt, completion,
rewards, advantage, and the columns reward functions add with `log_extra`).

Departures from TRL 1.16, by choice: a row on which every reward function returns None stops the run with
an error naming it (TRL gives it advantage 0: the issue asks for the error, a silent zero hides a broken
reward); token means over a step with several micro-batches are the mean of the micro-batches' means, as
TRL, but under torchrun each rank's micro-batch counts as one (TRL pools the ranks first); a generation
batch's prompts stay on one rank (per_device_train_batch_size x steps_per_generation must be a multiple of
num_generations), so groups are scored where they were generated.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import dataclass, field

import torch

from posttrain.data import embedded, formats, loading
from posttrain.data.tokenization import is_conversation, tokenize_prompts
from posttrain.losses import policy, registry
from posttrain.rl import checkpoint, distributed, faults, loop, lora, rewards, rollout, sft
from posttrain.rl.config import ConfigError, TrainConfig, fill_run_defaults
from posttrain.rl.logger import MetricsLogger
from posttrain.rl.logprobs import token_logprobs
from posttrain.rl.models import disable_dropout, load_causal_lm, load_tokenizer, mix_into_reference
from posttrain.rl.prm import AGGREGATIONS as PROCESS_REWARD_AGGREGATIONS

# The embedded task: the online loops start from a 16-epoch SFT run (`sft.embedded_start`: 44.6 %
# held-out greedy exact match, 24 % of sampled answers right). The defaults below (64 completions a step, 8 per
# prompt, lr 1e-4, 6 epochs of the 788 train prompts: 588 steps, ~35 s on one thread) raise the reward on the
# train prompts 0.21-0.23 -> 0.39-0.41 (first and last tenth of the steps) and the held-out rate of right
# sampled answers (16 per problem at temperature 1) 24 % -> 31.6 / 31.0 / 33.6 % for seeds 42 / 1 / 7; greedy
# exact match ends at or above the start's (51.8 / 45.5 / 50.0 %), but it moves +-5 points between
# checkpoints (112 problems), so the sampled rate is the measure. 100 steps of 32 prompts x 8 at lr 1e-4 raised
# the train reward 0.28 -> 0.40 and left greedy exact match within that noise (39-50 %); 1 epoch at 3e-5
# barely moves. Above ~3e-4 the sampled reward collapses within 20 steps (at 1e-3 to a near-uniform policy).
EMBEDDED_MODEL_LEARNING_RATE = 1e-4
PRETRAINED_LEARNING_RATE = 1e-6  # TRL's default
#                                     embedded task   any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (64, 8),
    "num_train_epochs": (6.0, 3.0),
    "max_completion_length": (4, 512),
    "reward_funcs": (["exact_match"], None),
}
COMPLETIONS_FILE = "completions.jsonl"


@dataclass
class OnlineConfig(TrainConfig):
    """The options GRPO and RLOO share (TRL 1.16's names): generation, rewards, the clipped ratio, the reference."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local path or hub id of the causal LM to train; none: the embedded RL start (a short "
            "`posttrain sft` run on the embedded task, cached in $POSTTRAIN_CACHE)."
        },
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions per micro-batch per process; none: {embedded} on the embedded task, else {other}."
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Passes over the prompts (unless max_steps); none: {embedded} embedded, else {other}."
        },
    )
    # generation
    num_generations: int = field(default=8, metadata={"help": "Completions per prompt (G), at least 2."})
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "New tokens per completion at most; none: {embedded} embedded, else {other}."},
    )
    max_new_tokens: int | None = field(
        default=None, metadata={"help": "Another name for max_completion_length (older examples use it)."}
    )
    generation_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Completions per generation, over all processes; none: per_device_train_batch_size x "
            "processes x steps_per_generation. Give this or steps_per_generation, not both."
        },
    )
    steps_per_generation: int | None = field(
        default=None,
        metadata={"help": "Micro-steps one generation batch feeds; none: gradient_accumulation_steps."},
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (> 0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold; none: off."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL's repetition penalty (1: off)."})
    stop_token_ids: list[int] | None = field(
        default=None, metadata={"help": "Token ids that end a completion besides eos."}
    )
    # rewards
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: built-in names ("
            + ", ".join(sorted(rewards.BUILTIN))
            + ") or module:function paths; none: exact_match on the embedded task."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A sequence-classification model scoring prompt + completion, as a reward."},
    )
    process_reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A process reward model (`posttrain prm`'s output) scoring each completion's steps, as a reward."
        },
    )
    process_reward_aggregation: str = field(
        default="min",
        metadata={
            "help": "How the process reward model's per-step probabilities become one reward: "
            + ", ".join(PROCESS_REWARD_AGGREGATIONS)
            + "."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={
            "help": "One weight per reward (the reward model, then the process reward model, then the functions, "
            "as TRL's script orders them); none: all 1."
        },
    )
    # loss
    beta: float = field(
        default=0.0, metadata={"help": "Weight of the k3 KL to the reference (0: no reference)."}
    )
    num_iterations: int = field(default=1, metadata={"help": "Optimizer passes over each generation batch."})
    epsilon: float = field(default=0.2, metadata={"help": "Lower clip range of the ratio (1 - epsilon)."})
    epsilon_high: float | None = field(
        default=None,
        metadata={"help": "Upper clip range (1 + epsilon_high); none: epsilon. cispo: the cap on the ratio."},
    )
    mask_truncated_completions: bool = field(
        default=False,
        metadata={"help": "Leave out of the loss the completions cut at max_completion_length."},
    )
    disable_dropout: bool = field(default=False, metadata={"help": "Set every dropout probability to 0."})
    sync_ref_model: bool = field(
        default=False,
        metadata={"help": "Every ref_model_sync_steps steps, ref <- alpha * policy + (1 - alpha) * ref."},
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "That alpha."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "That period, in optimizer steps."})

    run_defaults = RUN_DEFAULTS

    def __post_init__(self):
        if self.max_new_tokens is not None:
            if self.max_completion_length not in (None, self.max_new_tokens):
                raise ConfigError(
                    f"max_new_tokens={self.max_new_tokens} and max_completion_length={self.max_completion_length} "
                    "name the same option: give one"
                )
            self.max_completion_length = self.max_new_tokens
        for name in ("reward_funcs", "reward_weights", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, str):  # names separated by commas, as on the command line
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        if self.reward_funcs is None and self.reward_models:
            self.reward_funcs = []
        fill_run_defaults(
            self,
            self.run_defaults,
            embedded_learning_rate=EMBEDDED_MODEL_LEARNING_RATE,
            pretrained_learning_rate=PRETRAINED_LEARNING_RATE,
        )
        super().__post_init__()
        self._check()

    def _check(self) -> None:
        if not self.reward_funcs and not self.reward_models:
            raise ConfigError(
                "no reward: pass --reward_funcs (built-in names or module:function), --reward_model_name_or_path "
                "or --process_reward_model_name_or_path"
            )
        if self.process_reward_aggregation not in PROCESS_REWARD_AGGREGATIONS:
            raise ConfigError(
                f"process_reward_aggregation must be one of {', '.join(PROCESS_REWARD_AGGREGATIONS)}, got "
                f"{self.process_reward_aggregation!r}"
            )
        if self.num_generations < 2:
            raise ConfigError(
                f"num_generations must be >= 2 (advantages compare a prompt's completions), got {self.num_generations}"
            )
        if self.max_completion_length is None or self.max_completion_length < 1:
            raise ConfigError(f"max_completion_length must be >= 1, got {self.max_completion_length}")
        world = distributed.env_world()[1]
        per_step = self.completions_per_device * world
        if (
            self.generation_batch_size is not None
            and self.steps_per_generation is not None
            # both agreeing is what a saved config.yaml holds (resumed with --config): accepted
            and self.generation_batch_size != per_step * self.steps_per_generation
        ):
            raise ConfigError(
                f"generation_batch_size={self.generation_batch_size} and steps_per_generation="
                f"{self.steps_per_generation} name the same thing and disagree (per_device_train_batch_size x "
                f"processes x steps_per_generation = {per_step * self.steps_per_generation}): give one"
            )
        if self.generation_batch_size is not None:
            if self.generation_batch_size % per_step:
                raise ConfigError(
                    f"generation_batch_size={self.generation_batch_size} must be a multiple of "
                    f"per_device_train_batch_size x processes = {per_step}"
                )
            self.steps_per_generation = self.generation_batch_size // per_step
        if self.steps_per_generation is None:
            self.steps_per_generation = self.gradient_accumulation_steps
        if self.steps_per_generation < 1:
            raise ConfigError(f"steps_per_generation must be >= 1, got {self.steps_per_generation}")
        self.generation_batch_size = per_step * self.steps_per_generation
        local = self.completions_per_device * self.steps_per_generation
        if local % self.num_generations:
            raise ConfigError(
                f"a generation batch of {local} completions per process (per_device_train_batch_size "
                f"{self.per_device_train_batch_size} x steps_per_generation {self.steps_per_generation}) is not "
                f"divisible by num_generations={self.num_generations}: every prompt needs all its completions"
            )
        if self.epsilon_high is None:
            self.epsilon_high = self.epsilon
        if not self.temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {self.temperature}")
        if self.num_iterations < 1:
            raise ConfigError(f"num_iterations must be >= 1, got {self.num_iterations}")
        self._check_beta()
        n_rewards = len(self.reward_funcs) + self.reward_models
        if self.reward_weights is not None and len(self.reward_weights) != n_rewards:
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} values for {n_rewards} rewards: give one per reward"
            )

    def _check_beta(self) -> None:
        if self.beta < 0:
            raise ConfigError(f"beta must be >= 0, got {self.beta}")
        if self.sync_ref_model and self.beta == 0:
            raise ConfigError("sync_ref_model=true but beta=0: there is no reference model to synchronise")

    @property
    def reward_models(self) -> int:
        """How many of the rewards are models (the reward model, the process reward model)."""
        return (self.reward_model_name_or_path is not None) + (
            self.process_reward_model_name_or_path is not None
        )

    @property
    def completions_per_device(self) -> int:
        """Completions per micro-batch per process (GRPO and RLOO count completions in
        per_device_train_batch_size, as TRL; Online DPO counts prompts there, as TRL's)."""
        return self.per_device_train_batch_size

    @property
    def generate_every(self) -> int:
        """Micro-steps between generations."""
        return self.steps_per_generation * self.num_iterations

    @property
    def needs_old_logps(self) -> bool:
        """The policy moves between a generation and a use of its batch (TRL's test)."""
        return self.gradient_accumulation_steps % self.generate_every != 0


@dataclass
class GRPOConfig(OnlineConfig):
    # rewards -> advantages
    multi_objective_aggregation: str = field(
        default="sum_then_normalize",
        metadata={
            "help": "sum_then_normalize, or normalize_then_sum (each reward normalised in its group first)."
        },
    )
    scale_rewards: str = field(
        default="group",
        metadata={"help": "Divide advantages by the reward std of the group, batch, or none."},
    )
    # loss
    loss_type: str = field(
        default="dapo",
        metadata={"help": "Policy loss: " + ", ".join(registry.names("policy")) + "."},
    )
    delta: float | None = field(
        default=None, metadata={"help": "Two-sided clipping: cap the unclipped ratio at delta; none: off."}
    )
    sapo_temperature_neg: float = field(default=1.05, metadata={"help": "SAPO's gate temperature, A < 0."})
    sapo_temperature_pos: float = field(default=1.0, metadata={"help": "SAPO's gate temperature, A > 0."})
    vespo_k_pos: float = field(default=2.0, metadata={"help": "VESPO's k for A >= 0."})
    vespo_lambda_pos: float = field(default=3.0, metadata={"help": "VESPO's lambda for A >= 0."})
    vespo_k_neg: float = field(default=3.0, metadata={"help": "VESPO's k for A < 0."})
    vespo_lambda_neg: float = field(default=2.0, metadata={"help": "VESPO's lambda for A < 0."})
    importance_sampling_level: str = field(
        default="token", metadata={"help": "token, or sequence (GSPO: the sequence's mean log-ratio)."}
    )
    use_bias_correction_kl: bool = field(
        default=True, metadata={"help": "Multiply the KL term by the importance ratio (DeepSeek-V3.2)."}
    )
    top_entropy_quantile: float = field(
        default=1.0, metadata={"help": "Train only on the tokens in this top quantile of entropy (1: all)."}
    )
    entropy_coef: float = field(default=0.0, metadata={"help": "Weight of the entropy bonus (0: off)."})
    off_policy_mask_threshold: float | None = field(
        default=None,
        metadata={"help": "Drop negative-advantage completions whose mean KL from the sampler exceeds this."},
    )

    def _check(self) -> None:
        super()._check()
        if self.loss_type not in registry.names("policy"):
            raise ConfigError(
                f"loss_type {self.loss_type!r} is not a policy loss; expected one of {registry.names('policy')}"
            )
        if self.importance_sampling_level not in policy.IMPORTANCE_SAMPLING_LEVELS:
            raise ConfigError(
                f"importance_sampling_level must be one of {policy.IMPORTANCE_SAMPLING_LEVELS}, got "
                f"{self.importance_sampling_level!r}"
            )
        if self.scale_rewards not in policy.SCALE_REWARDS:
            raise ConfigError(
                f"scale_rewards must be one of {policy.SCALE_REWARDS}, got {self.scale_rewards!r}"
            )
        if self.multi_objective_aggregation not in policy.AGGREGATE_OBJECTIVES:
            raise ConfigError(
                f"multi_objective_aggregation must be one of {policy.AGGREGATE_OBJECTIVES}, got "
                f"{self.multi_objective_aggregation!r}"
            )
        if not 0.0 < self.top_entropy_quantile <= 1.0:
            raise ConfigError(f"top_entropy_quantile must lie in (0, 1], got {self.top_entropy_quantile}")

    def policy_options(self) -> dict:
        return {
            "importance_sampling_level": self.importance_sampling_level,
            "epsilon_low": self.epsilon,
            "epsilon_high": self.epsilon_high,
            "delta": self.delta,
            "sapo_temperature_pos": self.sapo_temperature_pos,
            "sapo_temperature_neg": self.sapo_temperature_neg,
            "vespo_k_pos": self.vespo_k_pos,
            "vespo_lambda_pos": self.vespo_lambda_pos,
            "vespo_k_neg": self.vespo_k_neg,
            "vespo_lambda_neg": self.vespo_lambda_neg,
        }


# ---------------------------------------------------------------------------------------------------------
# Data: prompt rows
# ---------------------------------------------------------------------------------------------------------

PROMPT_KINDS = ("prompt_only", "prompt_completion", "preference", "unpaired_preference")


def load_prompts(config, tokenizer, command: str):
    """(train, eval) lists of rows: the dataset's columns plus prompt_ids (eval None when absent)."""
    if config.dataset_name is None:
        train, evaluation = embedded.rows("prompt_only", "train"), embedded.rows("prompt_only", "test")
    else:
        train, evaluation = loading.load_splits(
            config.dataset_name,
            name=config.dataset_config,
            train_split=config.dataset_train_split,
            eval_split=config.dataset_test_split,
        )
    out = []
    for dataset in (train, evaluation):
        if dataset is None:
            out.append(None)
            continue
        if not hasattr(dataset, "column_names"):
            from datasets import Dataset

            dataset = Dataset.from_list(dataset)
        fmt = formats.check_format(dataset, PROMPT_KINDS, command)
        formats.validate_rows(dataset, fmt)
        rows = dataset.to_list()
        ids = tokenize_prompts(tokenizer, [row["prompt"] for row in rows])
        for row, prompt_ids in zip(rows, ids, strict=True):
            row["prompt_ids"] = prompt_ids
        out.append(rows)
    return out[0], out[1]


def check_prompt_lengths(rows, context: int | None, max_completion_length: int, split: str) -> None:
    """Every prompt leaves room for max_completion_length new tokens in the model's context."""
    if context is None:
        return
    for i, row in enumerate(rows):
        if len(row["prompt_ids"]) + max_completion_length > context:
            raise ConfigError(
                f"{split} row {i}: its prompt has {len(row['prompt_ids'])} tokens, and with "
                f"max_completion_length={max_completion_length} it exceeds the model's context of {context} "
                "positions: shorten the prompt or lower max_completion_length"
            )


# ---------------------------------------------------------------------------------------------------------
# One generation batch
# ---------------------------------------------------------------------------------------------------------


def reward_columns(rows: list[dict], G: int) -> dict[str, list]:
    """The dataset's other columns, each value repeated for its prompt's G completions: the keyword arguments
    a reward function gets besides prompts and completions (TRL's convention)."""
    return {
        name: [row[name] for row in rows for _ in range(G)]
        for name in rows[0]
        if name not in ("prompt", "prompt_ids")
    }


def completion_texts(tokenizer, prompts: list, ro: rollout.Rollout) -> list:
    """Each completion decoded without special tokens; a message list for conversational prompts."""
    ids = [
        row[: int(n)]
        for row, n in zip(ro.completion_ids.tolist(), ro.completion_mask.sum(1).tolist(), strict=True)
    ]
    texts = tokenizer.batch_decode(ids, skip_special_tokens=True)
    G = len(texts) // max(len(prompts), 1)
    return [
        [{"role": "assistant", "content": text}] if is_conversation(prompts[i // G]) else text
        for i, text in enumerate(texts)
    ]


@torch.no_grad()
def policy_logps(model, batch: dict, temperature: float, batch_size: int) -> torch.Tensor:
    """(N, W) per-token log-probs of `batch`'s completion tokens under `model`, in chunks of batch_size rows."""
    module = distributed.unwrap(model)
    was_training = module.training
    module.eval()
    inputs = {
        k: batch[k] for k in ("input_ids", "attention_mask", "position_ids", "completion_mask") if k in batch
    }
    try:
        chunks = [
            token_logprobs(
                module,
                {k: v[i : i + batch_size] for k, v in inputs.items()},
                temperature=temperature,
                share_prompts=True,
            ).logps
            for i in range(0, batch["input_ids"].shape[0], batch_size)
        ]
    finally:
        module.train(was_training)
    return torch.cat(chunks)


def completion_metrics(ro: rollout.Rollout) -> dict:
    """completions/* (TRL's names) of a generation batch."""
    lengths = ro.completion_mask.sum(1).float()
    return {
        "completions/mean_length": lengths.mean(),
        "completions/min_length": lengths.min(),
        "completions/max_length": lengths.max(),
        "completions/clipped_ratio": (~ro.finished).float().mean(),
    }


def reward_metrics(
    rewards_per_func: torch.Tensor, weights: torch.Tensor, zero_std: torch.Tensor, names
) -> dict:
    """reward, reward_std, rewards/<name>/mean|std, frac_reward_zero_std (TRL's names; NaN entries skipped)."""
    out = {}
    for i, name in enumerate(names):
        out[f"rewards/{name}/mean"] = torch.nanmean(rewards_per_func[:, i])
        out[f"rewards/{name}/std"] = policy.nanstd(rewards_per_func[:, i])
    total = policy.weighted_rewards(rewards_per_func, weights)
    out["reward"] = torch.nanmean(total)
    out["reward_std"] = policy.nanstd(total)
    out["frac_reward_zero_std"] = zero_std.float().mean()
    return out


def prepare_batch(
    config: GRPOConfig,
    model,
    ref_model,
    prompt_ids,
    ro: rollout.Rollout,
    rewards_per_func,
    *,
    reward_names,
    pad_token_id,
) -> dict:
    """A generation batch ready for `grpo_step_loss`, from prompts, their completions and their rewards.

    prompt_ids: B lists of token ids; ro: N = B x G rows, each prompt's G completions adjacent;
    rewards_per_func: (N, F) float32, NaN where a function returned None. Returns N-row tensors input_ids,
    attention_mask, position_ids, completion_mask (N, W) [completion_mask zero on truncated rows with
    mask_truncated_completions], advantages (N,), old_logps (N, W) when the policy moves before the batch is
    used, ref_logps (N, W) when beta != 0; and "metrics", the generation side's metrics (0-dim tensors).
    """
    weights = reward_weight_tensor(config, rewards_per_func)
    all_rewards = gather_rows(rewards_per_func)  # every rank's: batch-wide statistics see them all
    adv = registry.get("advantage", "group")(
        all_rewards,
        weights,
        num_generations=config.num_generations,
        scale_rewards=config.scale_rewards,
        multi_objective_aggregation=config.multi_objective_aggregation,
    )
    batch = completion_batch(config, prompt_ids, ro, pad_token_id)
    batch["advantages"] = local_rows(adv.advantages)
    size = config.per_device_train_batch_size
    if config.needs_old_logps:
        batch["old_logps"] = policy_logps(model, batch, config.temperature, size)
    if config.beta != 0:
        batch["ref_logps"] = policy_logps(ref_model, batch, config.temperature, size)
    batch["metrics"] = {
        **reward_metrics(all_rewards, weights, adv.zero_std, reward_names),
        **completion_metrics(ro),
    }
    return batch


def reward_weight_tensor(config, rewards_per_func: torch.Tensor) -> torch.Tensor:
    """reward_weights as an (F,) tensor on the rewards' device; all 1 when not given."""
    F = rewards_per_func.shape[1]
    weights = config.reward_weights if config.reward_weights is not None else [1.0] * F
    return torch.tensor(weights, dtype=torch.float32, device=rewards_per_func.device)


def completion_batch(config, prompt_ids, ro: rollout.Rollout, pad_token_id: int) -> dict:
    """`rollout.training_batch`, with truncated completions masked out when mask_truncated_completions
    (from attention too, as TRL)."""
    if config.mask_truncated_completions:
        ro = ro._replace(completion_mask=ro.completion_mask * ro.finished[:, None])
    return rollout.training_batch(
        prompt_ids, ro, num_generations=config.num_generations, pad_token_id=pad_token_id
    )


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """Every rank's rows, in rank order (batch-wide statistics see the whole generation batch)."""
    if not distributed.is_distributed():
        return values
    rank, world, _ = distributed.env_world()
    full = values.new_zeros((world, *values.shape))
    full[rank] = values.nan_to_num(nan=0.0)
    nan = values.new_zeros((world, *values.shape))
    nan[rank] = torch.isnan(values).to(values.dtype)
    full = distributed.all_reduce_sum(full).masked_fill(distributed.all_reduce_sum(nan) > 0, float("nan"))
    return full.reshape(-1, *values.shape[1:])


def local_rows(values: torch.Tensor) -> torch.Tensor:
    """This rank's slice of `gather_rows`' result."""
    if not distributed.is_distributed():
        return values
    rank, world, _ = distributed.env_world()
    return values.chunk(world)[rank]


def split_batch(batch: dict, k: int, generator: torch.Generator | None = None) -> list[dict]:
    """The generation batch's rows cut into k micro-batches (shuffled first when a generator is given, as
    TRL shuffles them), each marked as one of k in its step ("micro_batches", for the metrics' shares)."""
    N = batch["input_ids"].shape[0]
    order = torch.randperm(N, generator=generator) if generator is not None else torch.arange(N)
    rows = {
        k_: v for k_, v in batch.items() if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == N
    }
    parts = [{name: value[part.to(value.device)] for name, value in rows.items()} for part in order.chunk(k)]
    for part in parts:
        part["micro_batches"] = k  # a step of all k; the loop sets its own count (accumulation x processes)
    return parts


def num_items(config, micro_batches: list[dict]) -> torch.Tensor:
    """The loss normaliser of one optimizer step (this process; `loop.global_count` adds the ranks)."""
    return sum(torch.as_tensor(_units(config, mb)) for mb in micro_batches)


def _units(config, batch: dict):
    how = registry.get("policy", config.loss_type).aggregation
    if how == "token_mean" and "generation_tokens" in batch:
        return batch["generation_tokens"]  # TRL's: the generation batch's tokens spread over its micro-steps
    return policy.units(how, batch["completion_mask"])


# ---------------------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ---------------------------------------------------------------------------------------------------------


def grpo_step_loss(model, batch: dict, num_items, *, config: GRPOConfig):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: a micro-batch of `prepare_batch`'s rows [+ micro_batches: the step's micro-batch count over all
    processes, 1 when absent]. Returns (loss, metrics), scalars; metrics are shares that add up to the step's
    means over the micro-batches.
    """
    mask = batch["completion_mask"].float()
    out = token_logprobs(
        model, batch, temperature=config.temperature, return_entropy=True, share_prompts=True
    )
    logps, entropy = out.logps, out.entropy
    old = batch["old_logps"] if "old_logps" in batch else logps.detach()
    advantages = batch["advantages"]
    share = 1.0 / batch.get("micro_batches", 1)
    fn = registry.get("policy", config.loss_type)
    terms = fn(logps, old, advantages, mask, **config.policy_options())
    per_token = terms.per_token
    if config.off_policy_mask_threshold is not None:
        per_token = per_token * policy.off_policy_mask(
            advantages, logps, old, mask, config.off_policy_mask_threshold
        )
    kept = mask
    if config.top_entropy_quantile < 1.0:
        kept = mask * policy.entropy_mask(entropy.detach(), mask, config.top_entropy_quantile)
        per_token = per_token * kept
    metrics = {}
    if config.beta != 0:
        kl = policy.k3(logps, batch["ref_logps"])
        if config.use_bias_correction_kl:
            kl = kl * torch.exp(
                policy.log_importance_weights(logps, old, mask, config.importance_sampling_level)
            )
        per_token = per_token + config.beta * kl
        metrics["kl"] = masked_mean(kl.detach(), mask) * share
    loss = policy.aggregate(per_token, mask, fn.aggregation, num_items, config.max_completion_length)
    if config.entropy_coef:
        loss = loss - config.entropy_coef * (entropy * kept).sum() / kept.sum().clamp(min=1) * share
    metrics["entropy"] = masked_mean(entropy.detach(), mask) * share
    flags = policy.clip_flags(
        config.loss_type, terms.ratio.detach(), advantages, config.epsilon, config.epsilon_high
    )
    for name, flag in flags.items():
        metrics[name] = masked_mean(flag.float(), mask) * share
    return loss, metrics


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the mask's tokens, or over the rows for a per-sequence (N, 1) value."""
    if x.shape[-1] == 1:
        return x.sum() / x.shape[0]
    return (x * mask).sum() / mask.sum().clamp(min=1)


# ---------------------------------------------------------------------------------------------------------
# The online loop (GRPO, RLOO, Online DPO)
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Algorithm:
    """What tells one online loop from another (GRPO, RLOO, Online DPO): the command, its batch preparation
    and its micro-batch loss."""

    command: str
    prepare_batch: object  # as `prepare_batch`
    step_loss: object  # as `grpo_step_loss`
    units: object  # micro-batch -> its count of the loss's unit (`loop.accumulate`'s count_fn)


def plan(num_prompts: int, config, world_size: int) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps). An epoch visits every prompt once in whole generation batches
    (a last partial batch is left out, as TRL's sampler does), each batch feeding generate_every micro-steps."""
    prompts_per_generation = config.generation_batch_size // config.num_generations
    generations = num_prompts // prompts_per_generation
    if generations == 0:
        raise ConfigError(
            f"{num_prompts} prompts cannot fill one generation batch of {prompts_per_generation} prompts "
            f"(generation_batch_size {config.generation_batch_size} / num_generations {config.num_generations})"
        )
    steps_per_epoch = max(1, generations * config.generate_every // config.gradient_accumulation_steps)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total


def prompt_rows(rows, config, generation: int, rank: int, world: int) -> list[dict]:
    """This rank's prompts of generation batch number `generation`: a slice of the epoch's seeded order."""
    P = config.generation_batch_size // config.num_generations
    per_epoch = len(rows) // P
    epoch, position = divmod(generation, per_epoch)
    order = loop.epoch_order(len(rows), config.seed, epoch)
    chunk = order[position * P : (position + 1) * P]
    per_rank = P // world
    return [rows[i] for i in chunk[rank * per_rank : (rank + 1) * per_rank]]


class Generations:
    """Makes generation batch g: the prompts, G completions each, rewards, `algo.prepare_batch`; keeps the
    current one for the micro-steps it feeds. The sampling seed is a function of (seed, g, rank) alone."""

    def __init__(
        self, run, config, algo: Algorithm, model, ref_model, tokenizer, rows, reward_list, log_rows
    ):
        self.run, self.config, self.algo = run, config, algo
        self.model, self.ref_model, self.tokenizer = model, ref_model, tokenizer
        self.rows, self.rewards, self.log_rows = rows, reward_list, log_rows
        self.index, self.micro_batches = None, None

    def micro_batch(self, micro_step: int, state: rewards.TrainerState) -> tuple[dict, dict]:
        """The micro-batch of micro-step `micro_step`, and the generation metrics when it generated now."""
        config = self.config
        g, position = divmod(micro_step, config.generate_every)
        fresh = {}
        if g != self.index:
            self.index, fresh = g, self._generate(g, state)
        return self.micro_batches[position % config.steps_per_generation], fresh

    def _generate(self, g: int, state) -> dict:
        config, run, tok = self.config, self.run, self.tokenizer
        rows = prompt_rows(self.rows, config, g, run.rank, run.world_size)
        G = config.num_generations
        prompt_ids = [row["prompt_ids"] for row in rows]
        seed = int(
            torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(config.seed * 1_000_003 + g))
        )
        generator = torch.Generator(run.device).manual_seed(seed + run.rank)
        ro = rollout.generate(
            self.model, prompt_ids, num_generations=G, max_completion_length=config.max_completion_length,
            temperature=config.temperature, top_k=config.top_k or None, top_p=config.top_p, min_p=config.min_p,
            repetition_penalty=config.repetition_penalty, eos_token_id=tok.eos_token_id,
            stop_token_ids=config.stop_token_ids or (), pad_token_id=tok.pad_token_id, generator=generator,
        )  # fmt: skip
        prompts = [row["prompt"] for row in rows for _ in range(G)]
        completions = completion_texts(tok, [row["prompt"] for row in rows], ro)
        ids = [
            r[: int(n)]
            for r, n in zip(ro.completion_ids.tolist(), ro.completion_mask.sum(1).tolist(), strict=True)
        ]
        columns = reward_columns(rows, G)
        scored = rewards.score(
            self.rewards, prompts=prompts, completions=completions, completion_ids=ids, columns=columns,
            trainer_state=state, row_offset=run.rank * len(prompts),
        )  # fmt: skip
        values = scored.values.to(run.device)
        batch = self.algo.prepare_batch(
            config, self.model, self.ref_model, prompt_ids, ro, values,
            reward_names=[r.name for r in self.rewards], pad_token_id=tok.pad_token_id,
        )  # fmt: skip
        metrics = batch.pop("metrics")
        tokens = batch["completion_mask"].sum()
        # TRL's token_mean normaliser: the generation batch's tokens (all ranks) spread over its micro-steps
        spread = distributed.all_reduce_sum(tokens.clone()).float() / (
            config.steps_per_generation * run.world_size
        )
        shuffle = torch.Generator().manual_seed(seed)
        self.micro_batches = split_batch(batch, config.steps_per_generation, shuffle)
        for mb in self.micro_batches:
            mb["generation_tokens"] = spread
            mb["micro_batches"] = config.gradient_accumulation_steps * run.world_size
            mb["epoch"] = state.epoch  # when it was generated (Online DPO's beta schedule reads it)
        prompt_tokens = sum(len(p) for p in prompt_ids) * G
        # every token generated and fed to the model, those of completions masked from the loss included
        metrics["num_tokens"] = (
            torch.tensor(float(prompt_tokens), device=run.device) + ro.completion_mask.sum().float()
        )
        for name, values_ in scored.metrics.items():
            metrics[name] = torch.tensor(sum(values_) / max(len(values_), 1), device=run.device)
        # per-completion columns for completions.jsonl: the algorithm's own ("log_columns"), else the advantage
        columns = batch.pop("log_columns", None) or {"advantage": [float(a) for a in batch["advantages"]]}
        self.log_rows(prompts, completions, [r.name for r in self.rewards], scored, columns)
        return metrics


def train_online(config, algo: Algorithm):
    """Run an online loop (GRPO, RLOO, Online DPO) to the end; returns the run."""
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows = load_prompts(config, tokenizer, algo.command)
    # a module:function that does not import stops here, before the run folder is written
    reward_list = rewards.resolve(
        config.reward_funcs,
        reward_model_name_or_path=config.reward_model_name_or_path,
        process_reward_model_name_or_path=config.process_reward_model_name_or_path,
        process_reward_aggregation=config.process_reward_aggregation,
        device=torch.device("cuda", distributed.env_world()[2]) if torch.cuda.is_available() else None,
    )
    if config.process_reward_model_name_or_path is not None and is_conversation(train_rows[0]["prompt"]):
        raise ConfigError(
            "process_reward_model_name_or_path: a process reward model scores plain-text prompts and completions "
            "(as `posttrain prm` trains it), but this dataset's prompts are conversational"
        )
    world = distributed.env_world()[1]
    steps_per_epoch, total_steps = plan(len(train_rows), config, world)
    start_model = config.model_name_or_path or sft.embedded_start()
    from transformers import AutoConfig

    context = getattr(
        AutoConfig.from_pretrained(start_model).get_text_config(), "max_position_embeddings", None
    )
    check_prompt_lengths(train_rows, context, config.max_completion_length, "train")
    run = loop.start(config, command=algo.command)
    if run.resume_from is not None:
        saved = checkpoint.read_trainer_state(run.resume_from).get("num_train_prompts", len(train_rows))
        if saved != len(train_rows):
            raise ConfigError(
                f"checkpoint {str(run.resume_from)!r} was trained on {saved} prompts but the train set now has "
                f"{len(train_rows)}: resume with the same data (it fixes which prompts each step sees)"
            )
    run.log_info({"start_model": start_model, "train_prompts": len(train_rows)})
    model = load_causal_lm(start_model, seed=config.seed, quantization=lora.quantization(run))
    if config.disable_dropout:
        disable_dropout(model)
    ref = None
    if config.beta != 0:  # a frozen copy, or under use_peft the policy with its adapters disabled
        ref = lora.reference_of(model, config, run.device)

    eval_fn = None
    if config.dataset_name is None:
        eval_fn = functools.partial(embedded.exact_match, tokenizer=tokenizer, split="test")
        if run.resume_from is None:
            start = loop.evaluate(run, model.to(run.device), None, None, None, None, eval_fn)
            run.log_info({f"start_{k}": v for k, v in start.items()})

    model = loop.prepare_model(run, model)
    optimizer = loop.build_optimizer(model, config, run.learning_rate)
    scheduler = loop.build_scheduler(optimizer, config, total_steps)
    companions = {"ref_model": ref} if config.sync_ref_model else None
    step, state = 0, None
    if run.resume_from is not None:
        state = checkpoint.load_checkpoint(run, run.resume_from, model, optimizer, scheduler, companions)
        step = state["global_step"]
    completions_log = _CompletionsLog(run, config)
    gens = Generations(
        run, config, algo, model, ref, tokenizer, train_rows, reward_list, completions_log.write
    )
    logger = MetricsLogger(run, total_steps, resume_step=step)
    guard = faults.StepGuard(run, step, state).install()
    num_tokens = state.get("num_tokens", 0) if state else 0
    loss_fn = functools.partial(algo.step_loss, config=config)
    count_fn = functools.partial(algo.units, config)
    last = {}
    try:
        while step < total_steps:
            trainer_state = rewards.TrainerState(
                global_step=step, epoch=step / steps_per_epoch, max_steps=total_steps
            )
            micro, generated = [], {}
            for m in range(
                step * config.gradient_accumulation_steps, (step + 1) * config.gradient_accumulation_steps
            ):
                completions_log.step = step + 1
                mb, fresh = gens.micro_batch(m, trainer_state)
                micro.append(mb)
                generated.update(fresh)
            metrics = loop.accumulate(run, model, optimizer, scheduler, micro, loss_fn, count_fn, guard)
            step += 1
            if ref is not None and config.sync_ref_model and step % config.ref_model_sync_steps == 0:
                mix_into_reference(model, ref, config.ref_model_mixup_alpha)
            record = {"epoch": step / steps_per_epoch}
            for name in ("loss", "learning_rate", "grad_norm"):
                record[name] = metrics.pop(name)
            metrics.pop("num_tokens"), metrics.pop("tokens_per_second")
            if generated:
                names = list(generated)
                values = distributed.all_reduce_sum(torch.stack([generated[n].float() for n in names]))
                values = dict(zip(names, values.tolist(), strict=True))
                num_tokens += int(values.pop("num_tokens"))
                record.update({k: v / run.world_size for k, v in values.items()})
            record["num_tokens"] = num_tokens
            record.update(metrics)
            logger.log_train(step, record)
            last.update(record)
            progress = {"global_step": step, "num_tokens": num_tokens, "num_train_prompts": len(train_rows)}
            end_of_step(run, model, optimizer, scheduler, tokenizer, companions, guard, logger, eval_fn, progress,
                        record["epoch"], last)  # fmt: skip
        end_of_run(run, model, tokenizer, logger, eval_fn, step, step / steps_per_epoch, last)
    except faults.WriteFailed as err:
        raise faults.WriteFailed(f"{err}; the run stopped; {faults.resume_hint(run)}") from err
    finally:
        guard.restore()
        logger.close()
    loop.finish(run)
    return run


def end_of_step(
    run,
    model,
    optimizer,
    scheduler,
    tokenizer,
    companions,
    guard,
    logger,
    eval_fn,
    state: dict,
    epoch: float,
    last,
) -> None:
    """What an online loop does after logging step state["global_step"]: evaluate every eval_steps, write a
    checkpoint every save_steps or when a signal asked the run to stop (and then stop it)."""
    config, step = run.config, state["global_step"]
    if eval_fn is not None and config.eval_steps and step % config.eval_steps == 0:
        results = loop.evaluate(run, model, None, None, None, None, eval_fn)
        logger.log_eval(step, epoch, results)
        last.update(results)
    if guard.stop or (config.save_steps and step % config.save_steps == 0):
        saved = checkpoint.save_checkpoint(
            run, model, optimizer, scheduler,
            {**state, "world_size": run.world_size, **guard.state(),
             **{name: getattr(config, name) for name in loop.DATA_ORDER_OPTIONS}},
            tokenizer, companions,
        )  # fmt: skip
        if guard.stop:
            raise guard.preempted(step, saved)


def end_of_run(run, model, tokenizer, logger, eval_fn, step: int, epoch: float, last) -> None:
    """The last evaluation (unless step `step` just had one) and the final model in output_dir."""
    config = run.config
    evaluated_last = bool(config.eval_steps) and step % config.eval_steps == 0
    if eval_fn is not None and config.eval_steps != 0 and not evaluated_last:
        results = loop.evaluate(run, model, None, None, None, None, eval_fn)
        logger.log_eval(step, epoch, results)
        last.update(results)
    checkpoint.save_model(run, model, tokenizer, run.output_dir)


class _CompletionsLog:
    """completions.jsonl: every logging_steps, each row of the step's generation batch (rank 0's rows)."""

    def __init__(self, run, config):
        self.run, self.config, self.step = run, config, 0
        self.path = run.output_dir / COMPLETIONS_FILE

    def write(self, prompts, completions, names, scored, columns: dict[str, list]) -> None:
        every = self.config.logging_steps or 1
        if not self.run.is_main or (self.step - 1) % every:
            return
        values = scored.values.tolist()
        with open(self.path, "a") as f:
            for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
                record = {
                    "step": self.step,
                    "prompt": prompt,
                    "completion": completion,
                    "rewards": {
                        n: None if math.isnan(v) else v for n, v in zip(names, values[i], strict=True)
                    },
                    **{k: v[i] for k, v in columns.items()},
                    **{k: v[i] for k, v in scored.extras.items() if i < len(v)},
                }
                f.write(json.dumps(record, default=str) + "\n")


def algorithm() -> Algorithm:
    return Algorithm("grpo", prepare_batch, grpo_step_loss, _units)


def train(config: GRPOConfig):
    """Run GRPO to the end; returns the run (its output_dir holds metrics.jsonl, completions.jsonl,
    checkpoints and the model)."""
    return train_online(config, algorithm())
