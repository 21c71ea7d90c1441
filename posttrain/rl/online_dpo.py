"""Online DPO: sample two completions per prompt from the policy, let a reward rank them, and take a DPO step
on that fresh pair (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback",
arXiv:2402.04792; the semantics of TRL 1.16's experimental OnlineDPOTrainer).

GRPO's loop (`rl.grpo.train_online`: prompts, the rollout engine, rewards, generation batches, logging,
checkpoints) with Online DPO's two pieces:
    prepare_batch   each prompt's 2 completions scored: the weighted sum of the rewards (reward model and / or
                    reward functions, `reward_weights`), minus missing_eos_penalty for a completion that did not
                    stop; the higher-scored one is chosen (a tie: the first sampled, as TRL); the pair's rows
                    prompt + completion (prompts left-cut to fit max_length) and the reference's summed
                    log-probs of each completion (a frozen copy of the start, or under use_peft the policy
                    with its adapters disabled)
    step_loss       chosen and rejected in ONE forward, log-probs of the completion tokens only
                    (`rl.logprobs`, temperature 1: the policy's own distribution, not the sampler's), summed
                    per sequence -> the registered preference loss `loss_type` (`losses.preference`: sigmoid
                    or ipo), mean over the step's pairs

One generation per optimizer step: the step's prompts (per_device_train_batch_size prompts per micro-batch,
as TRL counts them, x gradient_accumulation_steps x processes) are sampled together by the current policy,
so every pair is on-policy, as TRL's (which samples per micro-batch with the same weights).

Metrics (TRL's names and reductions, means over the step's pairs or completions): loss, objective/kl (the
summed log-ratio policy / reference of a completion), objective/entropy (minus its summed log-prob: a
one-sample estimate of the sequence entropy), objective/non_score_reward (-beta x kl), objective/rlhf_reward
(score + non_score_reward), objective/scores (the completions' scores after the eos penalty),
objective/scores_margin (chosen - rejected score), rewards/chosen, rewards/rejected (beta x the summed
log-ratio), rewards/margins, rewards/accuracies, logps/chosen, logps/rejected, val/contain_eos_token (the
fraction of completions that stopped), beta, num_tokens, learning_rate, grad_norm. completions.jsonl holds
each completion's score and whether it was chosen.

Departures from TRL 1.16, by choice:
- objective/kl, objective/entropy (and the two objectives built on kl) sum over the completion's tokens;
  TRL sums over every completion position of the padded batch, adding the log-probs of the pad tokens that
  follow a completion's eos (a batch whose completions all have one length logs the same numbers).
- With gradient_accumulation_steps > 1 the gradient is that of the loss logged (the mean over the step's
  pairs); TRL 1.16 back-propagates each micro-batch's mean unscaled, so its gradient (and grad_norm, and what
  max_grad_norm clips) is gradient_accumulation_steps times that, while it logs the mean.
- A list of betas (one per epoch, the last for the rest) takes the entry of the epoch the step is in; TRL
  1.16 indexes its list with the trainer's float epoch, which raises from the second step on.
- With gradient_accumulation_steps > 1, max_length cuts the prompts of the whole step's generation batch
  to one width (TRL cuts each micro-batch's to its own); it only matters for prompts that do not fit.
- A row no reward scores stops the run naming it (`rewards.score`); TRL scores it 0.

Timing a step against TRL's (a benchmark, as benchmarks/grpo.py times GRPO): run `train` with max_steps =
warmup + steps on a jsonl of the prompts and stamp each `loop.accumulate` (the optimizer step). Between two
stamps the loop does exactly one step's work: `rollout.generate` (2 completions per prompt), the rewards,
`prepare_batch` (ranking, the reference's forward through `grpo.policy_logps`), then `loop.accumulate` (the
policy's forward and backward over chosen + rejected, AdamW). TRL's step is `training_step` per micro-batch
(generate, the policy's and the reference's forwards, rewards, loss, backward) and its optimizer step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from posttrain.losses import policy
from posttrain.losses import preference as preference_losses
from posttrain.rl import grpo, rollout
from posttrain.rl.config import ConfigError
from posttrain.rl.logprobs import token_logprobs

LOSS_TYPES = ("sigmoid", "ipo")  # TRL's OnlineDPOConfig choices, both registered preference losses
# The embedded task, from the same cached SFT start as GRPO (`sft.embedded_start`: 44.6 % held-out greedy
# exact match, ~0.33 of sampled answers right). With exact_match, 64 % of the pairs tie (measured over the
# first 20 steps: 23 % two identical completions, which give no gradient, 41 % two different answers of equal
# reward, which DPO still ranks, first over second, as TRL); adding the `format` reward breaks ~3 % more (97 %
# of the completions are bare numerals), so the default is exact_match alone. A tie-free reward (closeness
# of the number) did not learn faster. What makes the score rise is the step's size and beta: at TRL's
# beta 0.1, lr 1e-4 drops held-out exact match to 10 % within 3 steps and lr 1e-5 to 3e-5 leaves the
# sampled score flat over 150 steps; at beta 1 (its sigmoid saturates sooner, pair by pair), 64 prompts a
# step and lr 1e-4 after 10 warmup steps, 50 epochs of the 788 train prompts (600 steps; 81 s of CPU time,
# 2.7 min wall here) raise objective/scores 0.33 -> 0.45 (means of 100 steps) and held-out exact match
# 44.6 % -> 56.2 % (58.9 % at step 400, after a dip to 43 % at step 100); 25 epochs: 0.33 -> 0.41 and
# 50.9 %. Held-out greedy exact match moves by +-5 points from step to step (112 problems, answers that
# differ by a digit).
EMBEDDED_MODEL_LEARNING_RATE = 1e-4
PRETRAINED_LEARNING_RATE = 5e-7  # TRL's OnlineDPOConfig default
#                                     embedded task   any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (64, 8),  # prompts (2 completions each), as TRL counts them
    "num_train_epochs": (50.0, 3.0),
    "max_completion_length": (4, 64),  # TRL: max_new_tokens 64
    "reward_funcs": (["exact_match"], None),
    "beta": (1.0, 0.1),
    "warmup_steps": (10, 0),
}
SEQUENCE_KEYS = ("input_ids", "attention_mask", "position_ids", "completion_mask")


# why GRPO's options below are fixed here
ONE_STEP = "online_dpo trains each generation batch's pairs for one optimizer step (on-policy, as TRL's)"
NO_RATIO = "online_dpo's loss clips no probability ratio"


@dataclass
class OnlineDPOConfig(grpo.OnlineConfig):
    """Online DPO's options (TRL 1.16's OnlineDPOConfig names and defaults) on top of the online loops'."""

    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Prompts per micro-batch per process (2 completions each, as TRL's Online DPO counts); "
            "none: 64 on the embedded task, else 8."
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Passes over the prompts (unless max_steps); none: 50 on the embedded task, else 3."
        },
    )
    num_generations: int = field(default=2, metadata={"help": "Completions per prompt: 2 (a pair), fixed."})
    temperature: float = field(default=0.9, metadata={"help": "Sampling temperature (> 0)."})
    beta: list[float] | float | None = field(
        default=None,
        metadata={
            "help": "DPO's beta (IPO's tau): one value, or one per epoch (the last for the epochs after); "
            "none: 1 on the embedded task, else 0.1."
        },
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of linear warmup from 0; none: 10 on the embedded task, else 0."},
    )
    loss_type: str = field(
        default="sigmoid", metadata={"help": "Preference loss: " + ", ".join(LOSS_TYPES) + "."}
    )
    missing_eos_penalty: float | None = field(
        default=None,
        metadata={"help": "Subtracted from the score of a completion that did not stop (no eos); none: off."},
    )
    max_length: int | None = field(
        default=512,
        metadata={
            "help": "Prompt + completion tokens the log-probs see at most: longer prompts lose their first "
            "tokens (generation saw them whole); none: no limit."
        },
    )
    reward_model_path: str | None = field(
        default=None, metadata={"help": "TRL's name for reward_model_name_or_path: give one."}
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    # GRPO's options that have no meaning here are not options (not in --help; naming one is an error that says
    # why): each pair trains one on-policy step, and no probability ratio is clipped.
    num_iterations: int = field(default=1, init=False, metadata={"fixed": ONE_STEP})
    steps_per_generation: int | None = field(default=None, init=False, metadata={"fixed": ONE_STEP})
    generation_batch_size: int | None = field(default=None, init=False, metadata={"fixed": ONE_STEP})
    epsilon: float = field(default=0.2, init=False, metadata={"fixed": NO_RATIO})
    epsilon_high: float | None = field(default=None, init=False, metadata={"fixed": NO_RATIO})
    mask_truncated_completions: bool = field(
        default=False,
        init=False,
        metadata={"fixed": "online_dpo ranks a completion that did not stop by missing_eos_penalty instead"},
    )

    run_defaults = RUN_DEFAULTS

    def __post_init__(self):
        if self.reward_model_path is not None:
            if self.reward_model_name_or_path not in (None, self.reward_model_path):
                raise ConfigError(
                    f"reward_model_path={self.reward_model_path!r} and reward_model_name_or_path="
                    f"{self.reward_model_name_or_path!r} name the same option: give one"
                )
            self.reward_model_name_or_path = self.reward_model_path
        if self.learning_rate is None:  # before the online loops' defaults fill it with GRPO's
            embedded_start = self.model_name_or_path is None
            self.learning_rate = EMBEDDED_MODEL_LEARNING_RATE if embedded_start else PRETRAINED_LEARNING_RATE
        super().__post_init__()

    def _check(self) -> None:
        if self.num_generations != 2:
            raise ConfigError(
                f"num_generations must be 2 for online_dpo (each prompt's pair), got {self.num_generations}"
            )
        super()._check()
        if self.loss_type not in LOSS_TYPES:
            raise ConfigError(f"loss_type must be one of {', '.join(LOSS_TYPES)}, got {self.loss_type!r}")
        if self.missing_eos_penalty is not None and not self.missing_eos_penalty >= 0:
            raise ConfigError(f"missing_eos_penalty must be >= 0, got {self.missing_eos_penalty}")
        if self.max_length is not None and not self.max_length > self.max_completion_length:
            raise ConfigError(
                f"max_length={self.max_length} must exceed max_completion_length={self.max_completion_length}: "
                "the prompt would be cut away entirely"
            )

    def _check_beta(self) -> None:
        if isinstance(self.beta, str):
            self.beta = [float(v) for v in self.beta.split(",")]
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        if not betas or not all(b > 0 for b in betas):
            raise ConfigError(f"beta must be > 0 (every value of a per-epoch list), got {self.beta}")

    @property
    def completions_per_device(self) -> int:
        return 2 * self.per_device_train_batch_size

    @property
    def needs_old_logps(self) -> bool:
        return False  # the pair is used once, by the policy that sampled it

    def beta_at(self, epoch: float) -> float:
        """beta during `epoch` (fractional: steps done / steps per epoch): a list's entry for it, the last after."""
        betas = self.beta if isinstance(self.beta, list) else [self.beta]
        return float(betas[min(int(epoch), len(betas) - 1)])


# ---------------------------------------------------------------------------------------------------------
# The generation batch: rank each pair, the reference's log-probs
# ---------------------------------------------------------------------------------------------------------


def scores_of(config: OnlineDPOConfig, rewards_per_func: torch.Tensor, stopped: torch.Tensor) -> torch.Tensor:
    """(N, F) rewards (NaN: not scored by that function) and (N,) bool `stopped` -> (N,) scores: the weighted
    sum of the scored rewards, minus missing_eos_penalty where the completion did not stop."""
    scores = policy.weighted_rewards(rewards_per_func, grpo.reward_weight_tensor(config, rewards_per_func))
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~stopped).to(scores.dtype)
    return scores


def rank_pairs(scores: torch.Tensor) -> torch.Tensor:
    """(2B,) scores, each prompt's two completions adjacent -> (B, 2) row indices (chosen, rejected) of each
    pair: the higher score is chosen, a tie goes to the first completion (TRL's `>=`)."""
    first, second = scores.view(-1, 2).unbind(1)
    second_wins = (first < second).long()  # the negation of TRL's first >= second, NaN-free scores
    base = 2 * torch.arange(first.shape[0], device=scores.device)
    return torch.stack([base + second_wins, base + 1 - second_wins], dim=1)


def cut_prompts(
    prompt_ids: list[list[int]], max_length: int | None, completion_width: int
) -> list[list[int]]:
    """Each prompt's last max_length - completion_width tokens (all of them when that is more, or no limit):
    TRL's left cut of the padded batch, row by row."""
    if max_length is None:
        return prompt_ids
    keep = max_length - completion_width
    return [p[-keep:] if len(p) > keep else p for p in prompt_ids]


def prepare_batch(
    config: OnlineDPOConfig, model, ref_model, prompt_ids, ro: rollout.Rollout, rewards_per_func, *,
    reward_names, pad_token_id,
) -> dict:  # fmt: skip
    """A generation batch ready for `online_dpo_step_loss`, from B prompts, their 2 completions each (N = 2B
    rows of `ro`, a prompt's two adjacent) and their rewards (N, F).

    Returns B-row tensors, index 1 being (chosen, rejected): input_ids, attention_mask, position_ids,
    completion_mask (B, 2, W); ref_logps (B, 2), the reference's summed completion log-probs; scores (B, 2);
    stopped (B, 2) float, 1 where the completion ended on eos / a stop token; "metrics" (none here: the step
    loss computes them all, so that they are means over the step's pairs) and "log_columns" (completions.jsonl's
    per-completion score and chosen flag, in sampling order).
    """
    scores = scores_of(config, rewards_per_func, ro.finished)
    pairs = rank_pairs(scores)  # (B, 2)
    width = ro.completion_ids.shape[1]
    rows = rollout.training_batch(
        cut_prompts(prompt_ids, config.max_length, width), ro, num_generations=2, pad_token_id=pad_token_id
    )  # (N, P + W) each
    ref = grpo.policy_logps(ref_model, rows, 1.0, config.completions_per_device)  # (N, P + W)
    ref_sums = (ref * rows["completion_mask"]).sum(1)
    batch = {key: rows[key][pairs] for key in SEQUENCE_KEYS}
    batch["ref_logps"] = ref_sums[pairs]
    batch["scores"] = scores[pairs]
    batch["stopped"] = ro.finished.float()[pairs]
    chosen = torch.zeros_like(ro.finished)
    chosen[pairs[:, 0]] = True
    batch["log_columns"] = {"score": scores.tolist(), "chosen": chosen.tolist()}
    batch["metrics"] = {}
    return batch


# ---------------------------------------------------------------------------------------------------------
# The loss of one micro-batch
# ---------------------------------------------------------------------------------------------------------


def online_dpo_step_loss(model, batch: dict, num_items, *, config: OnlineDPOConfig):
    """One micro-batch's share of the step's loss (pairs in the step: num_items), and its metrics (each a sum
    over this micro-batch divided by the step's pairs or completions, so that the micro-batches add up to the
    step's means). batch: B pairs of `prepare_batch` [+ epoch: when it was generated, for beta]."""
    flat = {
        key: torch.cat([batch[key][:, 0], batch[key][:, 1]]) for key in SEQUENCE_KEYS
    }  # (2B, T) chosen first
    mask = flat["completion_mask"].float()
    logps = (token_logprobs(model, flat, share_prompts=True).logps * mask).sum(1)  # (2B,)
    chosen, rejected = logps.chunk(2)
    ref = batch["ref_logps"]
    beta = config.beta_at(batch.get("epoch", 0.0))
    ones = torch.ones_like(chosen)  # TRL's online IPO: summed log-ratios, not per-token means
    loss, metrics = preference_losses.preference_loss(
        [config.loss_type], chosen, rejected, ref[:, 0], ref[:, 1], beta=beta, num_pairs=num_items,
        chosen_lengths=ones, rejected_lengths=ones,
    )  # fmt: skip
    completions = 2 * num_items
    kl = logps.detach() - torch.cat([ref[:, 0], ref[:, 1]])  # (2B,) summed log-ratio of each completion
    scores = batch["scores"]
    metrics.update(
        {
            "objective/kl": kl.sum() / completions,
            "objective/entropy": -logps.detach().sum() / completions,
            "objective/non_score_reward": -beta * kl.sum() / completions,
            "objective/rlhf_reward": (scores.sum() - beta * kl.sum()) / completions,
            "objective/scores": scores.sum() / completions,
            "objective/scores_margin": (scores[:, 0] - scores[:, 1]).sum() / num_items,
            "val/contain_eos_token": batch["stopped"].sum() / completions,
            "beta": beta * chosen.shape[0] / num_items,
        }
    )
    return loss, metrics


def units(config, batch: dict) -> int:
    """A micro-batch's pairs (the loss is a mean over the step's pairs)."""
    return batch["input_ids"].shape[0]


def algorithm() -> grpo.Algorithm:
    return grpo.Algorithm("online_dpo", prepare_batch, online_dpo_step_loss, units)


def train(config: OnlineDPOConfig):
    """Run Online DPO to the end; returns the run (its output_dir holds metrics.jsonl, completions.jsonl,
    checkpoints and the model)."""
    return grpo.train_online(config, algorithm())
