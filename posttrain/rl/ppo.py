"""Proximal policy optimisation with a learned value model (Schulman et al. 2017, arXiv:1707.06347; the RLHF
recipe of Ziegler et al. 2019, arXiv:1909.08593): the option names and semantics of TRL's last PPOTrainer,
which TRL 1.16 no longer ships (published recipes still use them).

    1. models: the policy (model_name_or_path / sft_model_path; the embedded RL start when none is named), its
       frozen reference (`lora.reference_of`: a copy, or the policy with its adapters off under use_peft), the
       value model (a sequence-classification head on a causal-LM backbone, read at every position:
       value_model_path; none: the reward model, head included, as TRL's script loads it, or with reward
       functions only the policy's start model with a fresh head), the scorer (reward_model_path, or
       reward_funcs scoring the whole completion, weighted by reward_weights: `rl.rewards`); dropout off in the
       policy and value models, the LoRA adapters' included (TRL disables it after wrapping)
    2. data: prompt rows (`grpo.load_prompts`), each update taking this rank's per_device_train_batch_size x
       gradient_accumulation_steps of them in a seeded order (`grpo.prompt_rows`), one completion each
    3. experience (`make_experience`, no gradient): completions from the rollout engine, ending after the stop
       token; the policy's, the reference's log-probs and the value model's values at the completion tokens
       (in chunks of local_rollout_forward_batch_size rows); scores, minus missing_eos_penalty where the
       completion has no eos; per-token rewards -kl_coef x KL + the score on the last token; GAE(gamma, lam);
       advantages whitened over the batch (`losses.ppo`)
    4. the update (`train_on`): num_ppo_epochs passes over num_mini_batches shuffled mini-batches, each one
       optimizer step over policy and value together (one AdamW, as TRL's PolicyAndValueWrapper) through
       `loop.accumulate`, a micro-batch of per_device_train_batch_size rows at a time: the clipped policy
       loss + vf_coef x the clipped value loss, each the micro-batch's masked token mean (TRL's)

One logged step is one update (TRL's global_step); the learning rate is constant within an update and follows
the schedule over updates, as TRL steps its scheduler once per update. Metrics (TRL's names, per update):
objective/kl, objective/entropy, objective/non_score_reward, objective/rlhf_reward, objective/scores (sums
over each completion's tokens, means over completions), policy/approxkl_avg, policy/clipfrac_avg,
policy/entropy_avg, loss/policy_avg, loss/value_avg, val/clipfrac_avg, val/ratio, val/ratio_var (means and
variance over the update's micro-batches), val/num_eos_tokens (completions holding an eos, all processes),
val/explained_variance (of the rollout's values for the returns, 1 - Var(returns - values) / Var(returns)),
episode; and loss, grad_norm (means over the update's optimizer steps), learning_rate, num_tokens,
rewards/<func>/mean, completions/*. Every logging_steps, the update's rows go to completions.jsonl (prompt,
completion, rewards, and as "advantage" the completion's mean whitened advantage).

Departures from TRL, by choice: the score lands on the completion's last token (TRL puts it one position past
the stop token whenever the batch is wider than the completion, so a value past the stop token is trained);
approxkl, ratio and entropy are means over completion tokens (TRL averages them over padding too, where they
are 0, 1 and the entropy after the completion); objective/entropy sums over completion tokens only (TRL adds
-1 per padding position, its INVALID_LOGPROB); temperature is used as given (TRL adds 1e-7); each mini-batch
is one optimizer step (TRL's accelerate steps every gradient_accumulation_steps micro-batches, which with
num_mini_batches > 1 spans mini-batches); the embedded task stops at eos by default (stop_token "eos"); the
gradient norm of policy and value together is clipped at max_grad_norm (1.0 by default, as every loop here and as
the embedded defaults were measured; TRL's PPOTrainer never clips: pass --max_grad_norm 0 for TRL's behaviour).

With no arguments PPO runs on the embedded task from the embedded RL start, scored by the exact_match reward
function: no embedded reward model is cached anywhere (`posttrain rm` writes one into its own run folder), so
there is none to default to; pass --reward_model_path runs/rm to use one.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import functools
import math
from dataclasses import dataclass, field

import torch

from posttrain.data import embedded
from posttrain.losses import policy as policy_losses
from posttrain.losses import ppo as ppo_losses
from posttrain.losses import registry
from posttrain.rl import checkpoint, distributed, faults, grpo, lean, loop, lora, rewards, rollout, sft
from posttrain.rl.config import ConfigError, TrainConfig, fill_run_defaults
from posttrain.rl.logger import MetricsLogger
from posttrain.rl.logprobs import token_logprobs
from posttrain.rl.models import disable_dropout, load_causal_lm, load_reward_model, load_tokenizer

# The embedded task (prompts "a+b=", answers of one or two digits then eos) from the embedded RL start
# (`sft.embedded_start`: 44.6 % held-out greedy exact match). Measured with OMP_NUM_THREADS=1 on the shared
# 2-core machine: the defaults below (124 updates of 128 prompts, ~90 s) raise the sampled score, means over
# sixths of the run, 0.41 -> 0.47 -> 0.49 -> 0.52 -> 0.54 -> 0.55, and held-out exact match to 55.4 %, with KL
# to the reference <= 0.4 nats per completion and explained variance ~0.2 by the end. 32 or 64 prompts per
# update rise less in the same time; at 32 prompts per update lr 1e-4 drops the score to ~0.2 within 5 updates (warmup does not save
# it), 3e-4 collapses. The first ~10 updates dip a little while the fresh value head learns the score's scale
# (explained variance < 0 until then).
EMBEDDED_MODEL_LEARNING_RATE = 3e-5
PRETRAINED_LEARNING_RATE = 5e-5  # TrainingArguments' default, which TRL's PPOConfig kept
#                                     embedded task   any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (128, 8),
    "num_train_epochs": (20.0, 3.0),
    "response_length": (4, 53),
    "stop_token": ("eos", None),
    "reward_funcs": (["exact_match"], None),
}
KL_ESTIMATORS = ("k1", "k3")
STOP_TOKENS = ("eos",)
VALUE_DIR = "value_model"  # the value model's folder inside output_dir (and a checkpoint's companion name)


@dataclass
class PPOConfig(TrainConfig):
    """TRL's PPOConfig's options and defaults (the run-dependent ones filled from RUN_DEFAULTS)."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "The policy's start (TRL: sft_model_path); none: the embedded RL start (a short `posttrain "
            "sft` run on the embedded task, cached in $POSTTRAIN_CACHE)."
        },
    )
    sft_model_path: str | None = field(
        default=None, metadata={"help": "Another name for model_name_or_path (TRL's)."}
    )
    reward_model_path: str | None = field(
        default=None,
        metadata={
            "help": "A trained reward model (sequence classification, one label) scoring prompt + completion "
            "with its own tokenizer; none: reward_funcs."
        },
    )
    value_model_path: str | None = field(
        default=None,
        metadata={
            "help": "The value model's start (a causal LM gets a fresh one-label head); none: reward_model_path "
            "(as TRL's script), else the policy's start. Its tokenizer must be the policy's."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions scoring the whole completion (as GRPO's): built-in names ("
            + ", ".join(sorted(rewards.BUILTIN))
            + ") or module:function; none: exact_match on the embedded task."
        },
    )
    reward_weights: list[float] | None = field(
        default=None,
        metadata={"help": "One weight per reward (the reward model first, then the functions); none: all 1."},
    )
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Prompts per micro-batch per process; none: 128 on the embedded task, else 8."},
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the prompts when total_episodes is unset; none: 20 embedded, else 3."},
    )
    total_episodes: int | None = field(
        default=None,
        metadata={"help": "Completions to train on, all processes; none: num_train_epochs x the prompts."},
    )
    num_ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of experience."})
    num_mini_batches: int = field(
        default=1,
        metadata={"help": "Mini-batches (optimizer steps) per pass; must divide the batch of experience."},
    )
    local_rollout_forward_batch_size: int = field(
        default=64, metadata={"help": "Rows per no-gradient forward while making experience."}
    )
    response_length: int | None = field(
        default=None, metadata={"help": "New tokens per completion at most; none: 4 embedded, else 53."}
    )
    max_completion_length: int | None = field(
        default=None, metadata={"help": "Another name for response_length."}
    )
    stop_token: str | None = field(
        default=None,
        metadata={
            "help": "'eos': completions end at the tokenizer's eos; none: 'eos' embedded, else no stop."
        },
    )
    stop_token_id: int | None = field(
        default=None, metadata={"help": "The token id that ends a completion (instead of stop_token)."}
    )
    temperature: float = field(default=0.7, metadata={"help": "Sampling temperature (> 0)."})
    missing_eos_penalty: float | None = field(
        default=None, metadata={"help": "Subtracted from the score of a completion without eos (>= 0)."}
    )
    kl_coef: float = field(
        default=0.05, metadata={"help": "Weight of the per-token KL penalty in the reward."}
    )
    kl_estimator: str = field(
        default="k1", metadata={"help": "k1 (log pi - log pi_ref) or k3 ((r - 1) - log r, r = pi_ref / pi)."}
    )
    cliprange: float = field(default=0.2, metadata={"help": "Clip range of the policy ratio."})
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Clip range of the value around the old one."}
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount factor."})
    lam: float = field(default=0.95, metadata={"help": "GAE's lambda."})
    whiten_rewards: bool = field(
        default=False, metadata={"help": "Scale the per-token rewards to unit variance over the batch."}
    )

    run_defaults = RUN_DEFAULTS
    num_generations = 1  # one completion per prompt (read by `grpo.prompt_rows`)
    # always on, not an option (TRL's PPO has none): ratios of 1 on-policy and values that are functions of
    # the tokens need a deterministic forward. `lora.wrap` reads it to zero the adapters' lora_dropout too,
    # which it adds after `train` has disabled the models' own dropout.
    disable_dropout = True

    def __post_init__(self):
        for name, alias in (
            ("response_length", "max_completion_length"),
            ("model_name_or_path", "sft_model_path"),
        ):
            given = getattr(self, alias)
            if given is not None:
                if getattr(self, name) not in (None, given):
                    raise ConfigError(
                        f"{alias}={given!r} and {name}={getattr(self, name)!r} name the same option: give one"
                    )
                setattr(self, name, given)
        for name in ("reward_funcs", "reward_weights"):
            value = getattr(self, name)
            if isinstance(value, str):  # names separated by commas, as on the command line
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        if self.reward_funcs is None and self.reward_model_path is not None:
            self.reward_funcs = []
        if self.stop_token_id is not None and self.stop_token is None:
            self.stop_token = "none"  # so that the embedded default does not add a second stop token
        fill_run_defaults(
            self,
            self.run_defaults,
            embedded_learning_rate=EMBEDDED_MODEL_LEARNING_RATE,
            pretrained_learning_rate=PRETRAINED_LEARNING_RATE,
        )
        if self.stop_token == "none":
            self.stop_token = None
        super().__post_init__()
        self._check()

    def _check(self) -> None:
        if not self.reward_funcs and self.reward_model_path is None:
            raise ConfigError(
                "no reward: pass --reward_model_path or --reward_funcs (built-in names or module:function)"
            )
        n_rewards = len(self.reward_funcs) + (self.reward_model_path is not None)
        if self.reward_weights is not None and len(self.reward_weights) != n_rewards:
            raise ConfigError(
                f"reward_weights has {len(self.reward_weights)} values for {n_rewards} rewards: give one per reward"
            )
        if self.stop_token is not None and self.stop_token_id is not None:
            raise ConfigError(
                f"stop_token={self.stop_token!r} and stop_token_id={self.stop_token_id}: give one"
            )
        if self.stop_token is not None and self.stop_token not in STOP_TOKENS:
            raise ConfigError(
                f"stop_token must be 'eos' or none (then stop_token_id, or no stop), got {self.stop_token!r}"
            )
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(
                f"kl_estimator must be one of {', '.join(KL_ESTIMATORS)}, got {self.kl_estimator!r}"
            )
        checks = [
            ("response_length", self.response_length >= 1, ">= 1"),
            ("num_ppo_epochs", self.num_ppo_epochs >= 1, ">= 1"),
            ("num_mini_batches", self.num_mini_batches >= 1, ">= 1"),
            ("local_rollout_forward_batch_size", self.local_rollout_forward_batch_size >= 1, ">= 1"),
            ("temperature", self.temperature > 0, "> 0"),
            ("kl_coef", self.kl_coef >= 0, ">= 0"),
            ("cliprange", self.cliprange > 0, "> 0"),
            ("cliprange_value", self.cliprange_value > 0, "> 0"),
            ("vf_coef", self.vf_coef >= 0, ">= 0"),
            ("gamma", 0 <= self.gamma <= 1, "in [0, 1]"),
            ("lam", 0 <= self.lam <= 1, "in [0, 1]"),
            ("total_episodes", self.total_episodes is None or self.total_episodes >= 1, ">= 1 (or none)"),
            ("missing_eos_penalty", self.missing_eos_penalty is None or self.missing_eos_penalty >= 0, ">= 0 (or none)"),
        ]  # fmt: skip
        for name, ok, requirement in checks:
            if not ok:  # `not ok`: NaN fails every check
                raise ConfigError(f"{name} must be {requirement}, got {getattr(self, name)!r}")
        # TRL's batch sizes: a batch of experience is per_device_train_batch_size x gradient_accumulation_steps
        # prompts per process, cut into num_mini_batches mini-batches of whole micro-batches
        world = distributed.env_world()[1]
        self.world_size = world
        self.local_batch_size = self.per_device_train_batch_size * self.gradient_accumulation_steps
        self.batch_size = self.local_batch_size * world
        if self.local_batch_size % self.num_mini_batches:
            raise ConfigError(
                f"num_mini_batches={self.num_mini_batches} does not divide the batch of {self.local_batch_size} "
                f"prompts per process (per_device_train_batch_size {self.per_device_train_batch_size} x "
                f"gradient_accumulation_steps {self.gradient_accumulation_steps})"
            )
        self.local_mini_batch_size = self.local_batch_size // self.num_mini_batches
        if self.local_mini_batch_size % self.per_device_train_batch_size:
            raise ConfigError(
                f"a mini-batch of {self.local_mini_batch_size} prompts (the batch of {self.local_batch_size} / "
                f"num_mini_batches {self.num_mini_batches}) is not a whole number of micro-batches of "
                f"per_device_train_batch_size {self.per_device_train_batch_size}: make gradient_accumulation_steps "
                "a multiple of num_mini_batches"
            )
        self.generation_batch_size = self.batch_size  # prompts per update, all processes (`grpo.prompt_rows`)

    @property
    def steps_per_update(self) -> int:
        """Optimizer steps per batch of experience."""
        return self.num_ppo_epochs * self.num_mini_batches


# ---------------------------------------------------------------------------------------------------------
# Models
# ---------------------------------------------------------------------------------------------------------


class PolicyAndValue(torch.nn.Module):
    """The two trained models as one module, so that one optimizer, one gradient clip and one `loop.accumulate`
    cover both (TRL's PolicyAndValueWrapper); each keeps its own forward (`token_logprobs`, `token_values`)."""

    def __init__(self, policy: torch.nn.Module, value: torch.nn.Module):
        super().__init__()
        self.policy, self.value = policy, value

    @contextlib.contextmanager
    def no_sync(self):
        """Both DDP wrappers' no_sync (what `distributed.no_sync` enters on all but a step's last micro-batch)."""
        with contextlib.ExitStack() as stack:
            for module in (self.policy, self.value):
                stack.enter_context(distributed.no_sync(module, skip=True))
            yield


def token_values(value_model, batch: dict) -> torch.Tensor:
    """(B, T) the value model's V(s_t) aligned to tokens as `token_logprobs` aligns log-probs: entry t is the score
    head read at position t - 1 (the state before token t); 0 off batch["completion_mask"].

    The model runs its own forward (through any DDP wrapper); a hook takes its score head's output at every
    position before the model pools it at the last token."""
    captured = {}
    handle = distributed.unwrap(value_model).score.register_forward_hook(
        lambda module, args, output: captured.update(scores=output)
    )
    try:
        with lean.layers(value_model):  # in training: the same numbers, lighter and faster (rl/lean.py)
            value_model(
                input_ids=batch["input_ids"],
                attention_mask=batch["attention_mask"],
                position_ids=batch["position_ids"],
                use_cache=False,
            )
    finally:
        handle.remove()
    scores = captured["scores"][..., 0].float()  # (B, T)
    return torch.nn.functional.pad(scores[:, :-1], (1, 0)) * batch["completion_mask"]


@torch.no_grad()
def _chunked(fn, model, batch: dict, size: int) -> torch.Tensor:
    """fn(model, rows) over `batch` in chunks of `size` rows, in eval mode, no gradient."""
    module = distributed.unwrap(model)
    was_training = module.training
    module.eval()
    try:
        N = batch["input_ids"].shape[0]
        return torch.cat(
            [fn(model, {k: v[i : i + size] for k, v in batch.items()}) for i in range(0, N, size)]
        )
    finally:
        module.train(was_training)


def value_model_source(config: PPOConfig, start_model: str) -> tuple[str, str]:
    """(path, option that named it): value_model_path, else the reward model (as TRL's script), else the start."""
    if config.value_model_path is not None:
        return config.value_model_path, "value_model_path"
    if config.reward_model_path is not None:
        return config.reward_model_path, "value_model_path (default: reward_model_path)"
    return start_model, "value_model_path (default: the policy's start)"


def check_value_model(path: str, option: str, tokenizer, start_model: str) -> None:
    """The value model is a sequence classifier reading the policy's token ids: its architecture must have one,
    its tokenizer must be the policy's, and a trained head must have one label."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    try:
        value_config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option}={path!r}: {' '.join(str(err).split())}") from err
    if value_config.model_type not in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES:
        raise ConfigError(
            f"{option}={path!r}: its architecture ({value_config.model_type}) has no sequence-classification model "
            "in transformers (AutoModelForSequenceClassification), so it cannot be a value model"
        )
    if path == start_model:
        return
    try:
        value_tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{option}={path!r}: {' '.join(str(err).split())}") from err
    classifier = any(a.endswith("ForSequenceClassification") for a in value_config.architectures or [])
    if classifier and value_config.num_labels != 1:
        raise ConfigError(
            f"{option}={path!r}: its head has {value_config.num_labels} labels; a value model has one"
        )
    differences = []
    if value_tokenizer.get_vocab() != tokenizer.get_vocab():
        differences.append(f"vocabulary of {len(value_tokenizer)} tokens vs the policy's {len(tokenizer)}")
    for name in ("pad_token_id", "eos_token_id", "bos_token_id"):
        if getattr(value_tokenizer, name) != getattr(tokenizer, name):
            differences.append(
                f"{name} {getattr(value_tokenizer, name)} vs the policy's {getattr(tokenizer, name)}"
            )
    if differences:
        raise ConfigError(
            f"{option}={path!r}: its tokenizer is not the policy's ({'; '.join(differences)}): the value model reads "
            "the policy's token ids"
        )


def stop_token_of(config: PPOConfig, tokenizer) -> int | None:
    """The token id that ends a completion (None: none does), checked against the tokenizer."""
    if config.stop_token == "eos":
        if tokenizer.eos_token_id is None:
            raise ConfigError("stop_token='eos' but the tokenizer has no eos token: pass --stop_token_id")
        return tokenizer.eos_token_id
    if config.stop_token_id is not None and not 0 <= config.stop_token_id < len(tokenizer):
        raise ConfigError(
            f"stop_token_id={config.stop_token_id} is not a token of the tokenizer (ids 0 .. {len(tokenizer) - 1})"
        )
    return config.stop_token_id


# ---------------------------------------------------------------------------------------------------------
# Experience
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Experience:
    """A batch of experience: `batch` holds N-row tensors input_ids, attention_mask, position_ids, completion_mask
    (N, P + W) and old_logps, old_values, advantages, returns (N, W) over the completion columns; `metrics` the
    rollout's metrics (0-dim tensors); prompts, completions, scored and scores (N,) for the completions log;
    ref_logps and token_rewards (N, W), the reference's log-probs and the per-token rewards GAE took (whitened when
    whiten_rewards), for inspection (the update does not read them)."""

    batch: dict
    metrics: dict
    prompts: list
    completions: list
    scored: rewards.Scored
    scores: torch.Tensor
    ref_logps: torch.Tensor
    token_rewards: torch.Tensor


def make_experience(
    config: PPOConfig, models: PolicyAndValue, ref_model, tokenizer, reward_list, rows, *, stop_token_id,
    generator=None, trainer_state=None, row_offset: int = 0, autocast=contextlib.nullcontext,
) -> Experience:  # fmt: skip
    """One completion per row of `rows` (dicts with prompt, prompt_ids and the reward functions' columns),
    scored, with its per-token log-probs, values, rewards, advantages and returns (no gradient). `autocast`:
    the context the training forwards run in (`Run.autocast`), so that the old log-probs and values are
    computed in the precision the update recomputes them in (a ratio of exactly 1 on-policy)."""
    prompt_ids = [row["prompt_ids"] for row in rows]
    ro = rollout.generate(
        models.policy, prompt_ids, max_completion_length=config.response_length, temperature=config.temperature,
        eos_token_id=stop_token_id, pad_token_id=tokenizer.pad_token_id, generator=generator,
    )  # fmt: skip
    batch = rollout.training_batch(prompt_ids, ro, num_generations=1, pad_token_id=tokenizer.pad_token_id)
    W = ro.completion_ids.shape[1]
    mask = ro.completion_mask.to(torch.float32)
    size = config.local_rollout_forward_batch_size
    logps_of = functools.partial(_logps, temperature=config.temperature)
    with autocast():
        old_logps = _chunked(logps_of, models.policy, batch, size)[:, -W:]
        ref_logps = _chunked(logps_of, ref_model, batch, size)[:, -W:]
        old_values = _chunked(token_values, models.value, batch, size)[:, -W:]

    prompts = [row["prompt"] for row in rows]
    completions = grpo.completion_texts(tokenizer, prompts, ro)
    ids = [r[: int(n)] for r, n in zip(ro.completion_ids.tolist(), mask.sum(1).tolist(), strict=True)]
    columns = {name: [row[name] for row in rows] for name in rows[0] if name not in ("prompt", "prompt_ids")}
    scored = rewards.score(
        reward_list, prompts=prompts, completions=completions, completion_ids=ids, columns=columns,
        trainer_state=trainer_state or rewards.TrainerState(), row_offset=row_offset,
    )  # fmt: skip
    values_per_func = scored.values.to(mask.device)
    weights = grpo.reward_weight_tensor(config, values_per_func)
    scores = policy_losses.weighted_rewards(values_per_func, weights)
    has_eos = ((ro.completion_ids == tokenizer.eos_token_id) & ro.completion_mask.bool()).any(-1)
    if config.missing_eos_penalty is not None:
        scores = scores - config.missing_eos_penalty * (~has_eos).float()

    reward = ppo_losses.token_rewards(
        old_logps, ref_logps, scores, mask, kl_coef=config.kl_coef, kl_estimator=config.kl_estimator
    )
    token_rewards = reward.rewards
    if config.whiten_rewards:
        token_rewards = ppo_losses.masked_whiten(token_rewards, mask, shift_mean=False) * mask
    advantages, returns = registry.get("ppo_advantage", "gae")(
        token_rewards, old_values, mask, gamma=config.gamma, lam=config.lam
    )
    advantages = ppo_losses.masked_whiten(advantages, mask) * mask
    batch.update(old_logps=old_logps, old_values=old_values, advantages=advantages, returns=returns)

    non_score = reward.non_score.sum(1).mean()
    metrics = {
        "objective/kl": reward.kl.sum(1).mean(),
        "objective/entropy": (-old_logps * mask).sum(1).mean(),
        "objective/non_score_reward": non_score,
        "objective/rlhf_reward": non_score + scores.mean(),
        "objective/scores": scores.mean(),
        "val/num_eos_tokens": has_eos.float().sum(),
        "val/explained_variance": ppo_losses.explained_variance(old_values, returns, mask),
        **grpo.completion_metrics(ro),
        **{f"rewards/{r.name}/mean": torch.nanmean(values_per_func[:, i]) for i, r in enumerate(reward_list)},
        # every token generated and fed to the model
        "num_tokens": torch.tensor(float(sum(len(p) for p in prompt_ids))) + mask.sum(),
    }
    return Experience(batch, metrics, prompts, completions, scored, scores, ref_logps, token_rewards)


def _logps(model, batch: dict, *, temperature: float) -> torch.Tensor:
    return token_logprobs(model, batch, temperature=temperature).logps


# ---------------------------------------------------------------------------------------------------------
# The update
# ---------------------------------------------------------------------------------------------------------


def ppo_step_loss(models, batch: dict, num_items, *, config: PPOConfig):
    """One micro-batch's share of its optimizer step's loss (num_items: the step's micro-batches, all processes),
    and its metrics' shares: pg_loss + vf_coef x vf_loss, each the micro-batch's masked token mean (TRL's)."""
    W = batch["old_logps"].shape[1]
    mask = batch["completion_mask"][:, -W:].float()
    out = token_logprobs(models.policy, batch, temperature=config.temperature, return_entropy=True)
    logps, entropy = out.logps[:, -W:], out.entropy[:, -W:]
    values = token_values(models.value, batch)[:, -W:]
    pg = registry.get("ppo_policy", "clipped")(
        logps, batch["old_logps"], batch["advantages"], mask, cliprange=config.cliprange
    )
    vf = registry.get("ppo_value", "clipped")(
        values, batch["old_values"], batch["returns"], mask, cliprange_value=config.cliprange_value
    )
    pg_loss = policy_losses.aggregate(pg.per_token, mask, "micro_batch_mean", num_items)
    vf_loss = policy_losses.aggregate(vf.per_token, mask, "micro_batch_mean", num_items)
    with torch.no_grad():
        # the micro-batch's mean ratio as its distance from 1, in float64: ratios lie within ~1e-3 of 1, so
        # float32 ratios (and their squares) would leave nothing of val/ratio_var's ~1e-8 after cancellation
        log_ratio = ((logps - batch["old_logps"]) * mask).double()
        deviation = ppo_losses.masked_mean(torch.expm1(log_ratio), mask.double())
        shares = {
            "policy/approxkl_avg": 0.5 * ppo_losses.masked_mean((logps - batch["old_logps"]) ** 2, mask),
            "policy/clipfrac_avg": ppo_losses.masked_mean(pg.clipped.float(), mask),
            "policy/entropy_avg": ppo_losses.masked_mean(entropy, mask),
            "val/clipfrac_avg": ppo_losses.masked_mean(vf.clipped.float(), mask),
            "_ratio_deviation": deviation,  # val/ratio - 1, and val/ratio_var with its square
            "_ratio_deviation_squared": deviation**2,
        }
        metrics = {name: value / num_items for name, value in shares.items()}
        metrics["loss/policy_avg"], metrics["loss/value_avg"] = pg_loss.detach(), vf_loss.detach()
    return pg_loss + config.vf_coef * vf_loss, metrics


def train_on(
    run, models: PolicyAndValue, optimizer, scheduler, batch: dict, config: PPOConfig, guard, seed: int
):
    """num_ppo_epochs passes over num_mini_batches shuffled mini-batches of `batch`, one optimizer step each;
    returns the update's metrics (means over its optimizer steps, val/ratio_var over its micro-batches)."""
    shuffle = torch.Generator().manual_seed(seed)
    N = batch["input_ids"].shape[0]
    micro = config.per_device_train_batch_size
    loss_fn = functools.partial(ppo_step_loss, config=config)
    totals: dict[str, float] = {}
    for _ in range(config.num_ppo_epochs):
        order = torch.randperm(N, generator=shuffle)
        for start in range(0, N, config.local_mini_batch_size):
            rows = order[start : start + config.local_mini_batch_size]
            micro_batches = [
                {k: v[rows[i : i + micro].to(v.device)] for k, v in batch.items()}
                for i in range(0, len(rows), micro)
            ]
            metrics = loop.accumulate(run, models, optimizer, scheduler, micro_batches, loss_fn, _one, guard)
            for name, value in metrics.items():
                totals[name] = totals.get(name, 0.0) + value
    steps = config.steps_per_update
    out = {name: value / steps for name, value in totals.items()}
    out["learning_rate"] = metrics["learning_rate"]  # constant within an update
    # TRL's val/ratio_var: the unbiased variance of the update's per-micro-batch mean ratios (all processes),
    # here from the float64 sums of their deviations d from 1 and of d^2 (`accumulate` sums in float64)
    n = steps * (config.local_mini_batch_size // micro) * run.world_size  # micro-batches in the update
    mean, mean_square = out.pop("_ratio_deviation"), out.pop("_ratio_deviation_squared")
    out["val/ratio"] = 1.0 + mean
    out["val/ratio_var"] = max(mean_square - mean**2, 0.0) * n / (n - 1) if n > 1 else 0.0
    for name in ("num_tokens", "tokens_per_second"):
        out.pop(name)
    return out


def _one(batch) -> int:
    return 1  # TRL's aggregation: the mean of the micro-batches' masked means


def update_schedule(optimizer, config: PPOConfig, total_updates: int):
    """LambdaLR over optimizer steps whose learning rate is constant within an update and follows
    `loop.lr_multiplier` over updates (TRL steps its scheduler once per update)."""
    per_update = config.steps_per_update
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: loop.lr_multiplier(step // per_update, config, total_updates)
    )


def ppo_update(run, models, ref_model, optimizer, scheduler, tokenizer, reward_list, rows, config, *,
               stop_token_id, update: int, guard=None, trainer_state=None) -> tuple[Experience, dict]:  # fmt: skip
    """One PPO update on `rows` (this rank's prompts): experience, then num_ppo_epochs x num_mini_batches optimizer
    steps. The sampling and shuffling seeds are functions of (config.seed, update, rank) alone, so a resumed run
    repeats them. Returns the experience and the update's training metrics. (What a benchmark times.)"""
    seed = int(
        torch.randint(0, 2**62, (), generator=torch.Generator().manual_seed(config.seed * 1_000_003 + update))
    )
    generator = torch.Generator(run.device).manual_seed(seed + run.rank)
    experience = make_experience(
        config, models, ref_model, tokenizer, reward_list, rows, stop_token_id=stop_token_id,
        generator=generator, trainer_state=trainer_state, row_offset=run.rank * len(rows), autocast=run.autocast,
    )  # fmt: skip
    metrics = train_on(run, models, optimizer, scheduler, experience.batch, config, guard, seed + run.rank)
    return experience, metrics


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def train(config: PPOConfig):
    """Run PPO to the end; returns the run (output_dir: metrics.jsonl, completions.jsonl, checkpoints, the
    policy, and the value model in output_dir/value_model)."""
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, _ = grpo.load_prompts(config, tokenizer, "ppo")
    stop_token_id = stop_token_of(config, tokenizer)
    if config.missing_eos_penalty is not None and tokenizer.eos_token_id is None:
        raise ConfigError("missing_eos_penalty is set but the tokenizer has no eos token")
    if config.reward_model_path is not None:
        rewards.check_reward_model(config.reward_model_path, "reward_model_path")
    # a module:function that does not import stops here, before the run folder is written
    reward_list = rewards.resolve(
        config.reward_funcs,
        reward_model_name_or_path=config.reward_model_path,
        device=torch.device("cuda", distributed.env_world()[2]) if torch.cuda.is_available() else None,
    )
    episodes = config.total_episodes or int(config.num_train_epochs * len(train_rows))
    total_updates = config.max_steps if config.max_steps > 0 else math.ceil(episodes / config.batch_size)
    if len(train_rows) < config.batch_size:
        raise ConfigError(
            f"{len(train_rows)} prompts cannot fill one batch of {config.batch_size} (per_device_train_batch_size "
            f"x gradient_accumulation_steps x processes)"
        )
    start_model = config.model_name_or_path or sft.embedded_start()
    value_path, value_option = value_model_source(config, start_model)
    check_value_model(value_path, value_option, tokenizer, start_model)
    from transformers import AutoConfig

    context = getattr(
        AutoConfig.from_pretrained(start_model).get_text_config(), "max_position_embeddings", None
    )
    grpo.check_prompt_lengths(train_rows, context, config.response_length, "train")

    run = loop.start(config, command="ppo")
    if run.resume_from is not None:
        saved = checkpoint.read_trainer_state(run.resume_from).get("num_train_prompts", len(train_rows))
        if saved != len(train_rows):
            raise ConfigError(
                f"checkpoint {str(run.resume_from)!r} was trained on {saved} prompts but the train set now has "
                f"{len(train_rows)}: resume with the same data (it fixes which prompts each update sees)"
            )
    run.log_info({"start_model": start_model, "value_model": value_path, "train_prompts": len(train_rows)})
    policy = load_causal_lm(start_model, seed=config.seed, quantization=lora.quantization(run))
    value = load_reward_model(value_path, pad_token_id=tokenizer.pad_token_id, seed=config.seed)
    if not hasattr(value, "score"):
        raise ConfigError(
            f"{value_option}={value_path!r}: {type(value).__name__} has no `score` head to read values from"
        )
    for module in (policy, value):  # as TRL: PPO's ratios and values assume a deterministic forward
        disable_dropout(module)
    ref = lora.reference_of(policy, config, run.device)

    eval_fn = None
    if config.dataset_name is None:
        eval_fn = functools.partial(embedded.exact_match, tokenizer=tokenizer, split="test")
        if run.resume_from is None:
            start = loop.evaluate(run, policy.to(run.device), None, None, None, None, eval_fn)
            run.log_info({f"start_{k}": v for k, v in start.items()})

    policy = loop.prepare_model(run, policy)
    # the value model trains in full (LoRA, when asked, is the policy's: TRL's peft_config)
    value = loop.prepare_model(dataclasses.replace(run, config=_without_peft(config)), value)
    models = PolicyAndValue(policy, value)
    optimizer = loop.build_optimizer(models, config, run.learning_rate)
    scheduler = update_schedule(optimizer, config, total_updates)
    companions = {VALUE_DIR: distributed.unwrap(value)}
    step, state = 0, None
    if run.resume_from is not None:
        state = checkpoint.load_checkpoint(run, run.resume_from, policy, optimizer, scheduler, companions)
        step = state["global_step"]
    completions_log = grpo._CompletionsLog(run, config)
    logger = MetricsLogger(run, total_updates, resume_step=step)
    guard = faults.StepGuard(run, step, state).install()
    num_tokens = state.get("num_tokens", 0) if state else 0
    last = {}
    try:
        while step < total_updates:
            rows = grpo.prompt_rows(train_rows, config, step, run.rank, run.world_size)
            trainer_state = rewards.TrainerState(
                global_step=step, epoch=step * config.batch_size / len(train_rows), max_steps=total_updates
            )
            experience, metrics = ppo_update(
                run, models, ref, optimizer, scheduler, tokenizer, reward_list, rows, config,
                stop_token_id=stop_token_id, update=step, guard=guard, trainer_state=trainer_state,
            )  # fmt: skip
            step += 1
            completions_log.step = step
            mask = experience.batch["completion_mask"][:, -experience.batch["advantages"].shape[1] :]
            mean_advantage = (experience.batch["advantages"] * mask).sum(1) / mask.sum(1).clamp(min=1)
            completions_log.write(
                experience.prompts, experience.completions, [r.name for r in reward_list], experience.scored,
                {"advantage": mean_advantage.tolist()},
            )  # fmt: skip
            names = list(experience.metrics)
            reduced = distributed.all_reduce_sum(
                torch.stack([experience.metrics[n].float().to(run.device) for n in names])
            )
            rollout_metrics = dict(zip(names, reduced.tolist(), strict=True))
            num_tokens += int(rollout_metrics.pop("num_tokens"))
            eos = rollout_metrics.pop("val/num_eos_tokens")  # a count: summed over processes, not averaged
            record = {
                "episode": step * config.batch_size,
                "epoch": step * config.batch_size / len(train_rows),
            }
            record.update({k: v / run.world_size for k, v in rollout_metrics.items()})
            record["val/num_eos_tokens"] = eos
            record.update(metrics)
            record["num_tokens"] = num_tokens
            logger.log_train(step, record)
            last.update(record)
            progress = {"global_step": step, "num_tokens": num_tokens, "num_train_prompts": len(train_rows)}
            grpo.end_of_step(run, policy, optimizer, scheduler, tokenizer, companions, guard, logger, eval_fn,
                             progress, record["epoch"], last)  # fmt: skip
        grpo.end_of_run(
            run, policy, tokenizer, logger, eval_fn, step, step * config.batch_size / len(train_rows), last
        )
        checkpoint.save_model(run, value, tokenizer, run.output_dir / VALUE_DIR)
    except faults.WriteFailed as err:
        raise faults.WriteFailed(f"{err}; the run stopped; {faults.resume_hint(run)}") from err
    finally:
        guard.restore()
        logger.close()
    loop.finish(run)
    run.info["last_metrics"] = last
    return run


def _without_peft(config: PPOConfig) -> PPOConfig:
    """The config the value model is prepared with: the same, without LoRA (a copy: no __post_init__ rerun)."""
    value_config = copy.copy(config)
    value_config.use_peft = False
    return value_config
