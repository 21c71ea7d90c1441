"""Direct preference optimisation and its family: raise log pi(chosen) - log pi(rejected) relative to a reference.

    1. model and tokenizer (when none is named, the embedded start: `sft.embedded_start`, a short SFT run);
       the reference: a frozen copy of the starting model, another model (`ref_model_name_or_path`), or none
       when every loss is reference-free
    2. data: load, check the preference format, tokenize prompt / chosen / rejected (`data.preference`), cut
       prompts to their last max_prompt_length tokens, drop (and count) the rows whose prompt alone fills
       max_length under keep_start truncation, as TRL 1.16 does
    3. optionally the reference's log-probs of every pair, once, before training (`precompute_ref_log_probs`);
       the reference model is then freed
    4. for each optimizer step: chosen and rejected sequences in ONE forward (a 2B-row batch, chosen first),
       log-probs of the completion tokens only (`rl.logprobs`), summed per sequence (or LD-DPO's
       length-desensitised sums) -> the registered preference losses (`losses.preference`) -> step; TR-DPO
       mixes the policy into the reference every ref_model_sync_steps steps

Metrics (TRL 1.16's names): loss, rewards/chosen, rewards/rejected, rewards/accuracies, rewards/margins,
logps/chosen, logps/rejected, logits/chosen, logits/rejected (the mean logit over the vocabulary, averaged over
the completion tokens, from the kernel's running sums: the (N, V) logits are never built), entropy (over
chosen and rejected completion tokens), mean_token_accuracy (chosen tokens), num_tokens, learning_rate,
grad_norm; loss/<name> per loss when there are several; aux_loss (mixture-of-experts policies: the router's
load-balancing loss, weighted into the loss by router_aux_loss_coef as TRL does); eval_ versions on the
held-out pairs.

Token means (logits/*, entropy, mean_token_accuracy) are TRL's per micro-batch means; a step with several
micro-batches logs their pair-weighted mean (TRL: their plain mean; equal with one micro-batch per step).

The skeleton is shared: `PreferenceConfig` / `ReferenceConfig` hold the options of every offline
preference loop, and `start_offline` / `fit_offline` run one (KTO, CPO and ORPO use them with their own
data, collate, step loss, run defaults and embedded start model).

Departures from TRL 1.16, by choice: a loss set that reads no reference (`sft` alone, or registered losses
marked `reference_free`) loads no reference model and so logs no rewards/* (TRL loads and runs one anyway);
pairs whose chosen and rejected tokens are identical are dropped and counted (`data.preference`);
padding_free works (TRL 1.16 turns it off and pads).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from posttrain.data import collate, embedded, loading, preference
from posttrain.losses import preference as preference_losses
from posttrain.losses import registry
from posttrain.rl import distributed, loop, lora, sft
from posttrain.rl.config import ConfigError, TrainConfig, fill_run_defaults
from posttrain.rl.logprobs import token_logprobs
from posttrain.rl.models import (
    disable_dropout,
    frozen_reference,
    load_causal_lm,
    load_tokenizer,
    mix_into_reference,
    router_aux_loss_coef,
)

# Defaults that depend on the run. The embedded task starts from the online loops' start
# (`sft.embedded_start`, a 16-epoch SFT run: 44.6 % held-out greedy exact match; the 64-epoch `posttrain sft`
# default answers 98.2 % and left DPO nothing to raise) and trains on its preference split, one plausible
# wrong answer per problem.
# Plain sigmoid DPO pushes chosen and rejected answers down together and lowers exact match, so the embedded
# loss adds an NLL term on the chosen answers (sigmoid,sft with weights 1,1: RPO, Pang et al. 2024,
# arXiv:2404.19733). Measured with OMP_NUM_THREADS=1 (seed 42 unless said; batch 32, warmup 10, beta 1;
# held-out exact match at the end, rewards/margins means of the first and last tenth of the steps):
# - the defaults below (16 epochs, 400 steps, lr 2e-4, ~20 s of training): exact match 44.6 % -> 68.8 / 68.8 /
#   69.6 % for seeds 42 / 1 / 7, margins 0.38 -> 2.89 / 0.43 -> 2.74 / 0.40 -> 2.90;
# - lr 1e-4: 4 epochs 45.5 %, 8 epochs 51.8 %, 16 epochs 62.5 / 64.3 / 64.3 % (seeds 42 / 1 / 7), 24 epochs
#   67.0 %, 32 epochs (~40 s) 70.5 %; 16 epochs at lr 3e-4 67.9 %, 12 epochs at 2e-4 64.3 %; batch 8 x 4
#   epochs at 1e-4 50.0 %; beta 0.1 (8 epochs, 1e-4) 58.9 % but margins only 0.01 -> 0.15;
# - plain sigmoid (16 epochs, 2e-4) lowers it to 46.4 % after a dip to 29.5 % (margins 0.54 -> 3.28); the NLL
#   term alone (loss_type sft, same run, no reference) reaches 76.8 %: the NLL term raises exact match, the
#   sigmoid term the margins, at some cost in exact match.
EMBEDDED_MODEL_LEARNING_RATE = 2e-4
PRETRAINED_LEARNING_RATE = 1e-6  # TRL's DPOConfig default
#                              embedded task     any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (32, 8),
    "num_train_epochs": (16.0, 3.0),
    "warmup_steps": (10, 0),
    "max_length": (64, 1024),
    "beta": (1.0, 0.1),
    "loss_type": ("sigmoid,sft", "sigmoid"),
}
TRUNCATION_MODES = ("keep_start", "keep_end")


@dataclass
class PreferenceConfig(TrainConfig):
    """The options every offline preference loop shares (DPO, KTO, CPO, ORPO): the starting model, the
    run-dependent defaults (`run_defaults`: option -> (embedded task, any other data); each loop sets its
    own, with its trainer's learning rates), truncation, dropout, padding-free batches, MoE router loss."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local path or hub id of the causal LM to train (the policy); none: the embedded SFT "
            "model (what `posttrain sft` trains by default; trained once, cached in $POSTTRAIN_CACHE, "
            "default ~/.cache/posttrain)."
        },
    )
    # Redeclared with a `None` default: filled from run_defaults, so an explicit value always wins.
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per micro-batch per process; none: {embedded} on the embedded task, else {other}."
        },
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={
            "help": "Passes over the train set (unless max_steps); none: {embedded} embedded, else {other}."
        },
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of linear warmup from 0; none: {embedded} embedded, else {other}."
        },
    )
    max_length: int | None = field(
        default=-1,
        metadata={
            "help": "Cut each prompt + completion to this many tokens (truncation_mode says which end stays); "
            "-1: {embedded} embedded, else {other}; none: no limit."
        },
    )
    max_prompt_length: int | None = field(
        default=None,
        metadata={
            "help": "Cut prompts to their last this many tokens before max_length applies; none: no cut."
        },
    )
    truncation_mode: str = field(
        default="keep_start",
        metadata={
            "help": "keep_start: keep each sequence's first max_length tokens (rows whose prompt alone fills "
            "max_length are dropped); keep_end: its last ones."
        },
    )
    beta: float | None = field(
        default=None,
        metadata={"help": "The loss's temperature (DPO's beta); none: {embedded} embedded, else {other}."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    padding_free: bool = field(
        default=False, metadata={"help": "Concatenate a batch's sequences into one row without padding."}
    )
    router_aux_loss_coef: float | None = field(
        default=None,
        metadata={
            "help": "Weight of a mixture-of-experts model's router load-balancing loss; none: the model "
            "config's own (0 for other models); 0: off."
        },
    )

    # Each loop sets its own: option -> (embedded task, any other data), and its trainer's learning rates.
    run_defaults: ClassVar[dict]
    embedded_learning_rate: ClassVar[float]
    pretrained_learning_rate: ClassVar[float]

    def __post_init__(self):
        fill_run_defaults(
            self,
            self.run_defaults,
            embedded_learning_rate=self.embedded_learning_rate,
            pretrained_learning_rate=self.pretrained_learning_rate,
        )
        super().__post_init__()
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (or none), got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ConfigError(f"max_prompt_length must be >= 1 (or none), got {self.max_prompt_length}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ConfigError(
                f"truncation_mode must be one of {', '.join(TRUNCATION_MODES)}, got {self.truncation_mode!r}"
            )
        if not self.beta > 0:
            raise ConfigError(f"beta must be > 0, got {self.beta}")

    @property
    def needs_reference(self) -> bool:
        return False

    def embedded_start_model(self) -> str:
        """The model to start from when none is named: the embedded SFT model (cached; trained if absent)."""
        return sft.embedded_sft_model()


@dataclass
class ReferenceConfig(PreferenceConfig):
    """PreferenceConfig plus a frozen reference model: which one, precomputing its log-probs, TR-DPO syncing."""

    ref_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Reference model; none: a frozen copy of the starting model."}
    )
    precompute_ref_log_probs: bool = field(
        default=False,
        metadata={
            "help": "Compute the reference's log-probs of every row once before training, then free it."
        },
    )
    precompute_ref_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per batch of that precomputation; none: per_device_train_batch_size."},
    )
    sync_ref_model: bool = field(
        default=False,
        metadata={
            "help": "TR-DPO: every ref_model_sync_steps steps, ref <- alpha * policy + (1 - alpha) * ref."
        },
    )
    ref_model_mixup_alpha: float = field(default=0.6, metadata={"help": "TR-DPO's alpha."})
    ref_model_sync_steps: int = field(default=512, metadata={"help": "TR-DPO's tau, in optimizer steps."})

    def __post_init__(self):
        super().__post_init__()
        if self.precompute_ref_batch_size is not None and self.precompute_ref_batch_size < 1:
            raise ConfigError(f"precompute_ref_batch_size must be >= 1, got {self.precompute_ref_batch_size}")
        if self.sync_ref_model:
            if self.precompute_ref_log_probs:
                raise ConfigError(
                    "sync_ref_model=true moves the reference during training, so precomputed reference "
                    "log-probs would go stale: turn one of them off"
                )
            if not 0.0 <= self.ref_model_mixup_alpha <= 1.0:
                raise ConfigError(
                    f"ref_model_mixup_alpha must lie in [0, 1], got {self.ref_model_mixup_alpha}"
                )
            if self.ref_model_sync_steps < 1:
                raise ConfigError(f"ref_model_sync_steps must be >= 1, got {self.ref_model_sync_steps}")

    @property
    def needs_reference(self) -> bool:
        return True


@dataclass
class DPOConfig(ReferenceConfig):
    run_defaults = RUN_DEFAULTS
    embedded_learning_rate = EMBEDDED_MODEL_LEARNING_RATE
    pretrained_learning_rate = PRETRAINED_LEARNING_RATE

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local path or hub id of the causal LM to train (the policy); none: the embedded start, "
            "a short `posttrain sft` run on the embedded task (the online loops' start; trained once, cached "
            "in $POSTTRAIN_CACHE, default ~/.cache/posttrain)."
        },
    )
    loss_type: list[str] | None = field(
        default=None,
        metadata={
            "help": "Preference loss(es), several summed with loss_weights (MPO): "
            + ", ".join(registry.names("preference"))
            + "; none: {embedded} embedded, else {other}."
        },
    )
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "One weight per loss_type; none: all 1."}
    )
    label_smoothing: float = field(
        default=0.0,
        metadata={"help": "Label-flip probability of robust / exo_pair / aot / aot_unpaired."},
    )
    ld_alpha: float | None = field(
        default=None,
        metadata={"help": "LD-DPO: weight in [0, 1] of the longer completion's excess tokens; none: off."},
    )
    f_divergence_type: str = field(
        default="reverse_kl",
        metadata={
            "help": "f-divergence of the sigmoid family: "
            + ", ".join(preference_losses.F_DIVERGENCES)
            + " (reverse_kl is DPO)."
        },
    )
    f_alpha_divergence_coef: float = field(default=0.5, metadata={"help": "alpha of alpha_divergence."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO's per-pair weights."})
    discopop_tau: float = field(default=0.05, metadata={"help": "Temperature of discopop's mixing."})

    def __post_init__(self):
        self._default_loss_type = self.loss_type is None  # named in errors about loss_weights
        super().__post_init__()  # fills an unset loss_type from RUN_DEFAULTS
        if isinstance(self.loss_type, str):  # one name, or names separated by commas (as on the command line)
            self.loss_type = [name.strip() for name in self.loss_type.split(",") if name.strip()]
        self._check_losses()

    def _check_losses(self) -> None:
        """Every option a loss reads is checked here, at start-up, rather than at the first step."""
        valid = registry.names("preference")
        if not self.loss_type:
            raise ConfigError(f"loss_type is empty; expected one or more of {valid}")
        for name in self.loss_type:
            if name not in valid:
                raise ConfigError(f"loss_type {name!r} is not a preference loss; expected one of {valid}")
        if self.loss_weights is not None and len(self.loss_weights) != len(self.loss_type):
            raise ConfigError(
                f"loss_weights has {len(self.loss_weights)} values for {len(self.loss_type)} loss_type "
                f"{self.loss_type}"
                + (" (the embedded task's default loss_type)" if self._default_loss_type else "")
                + ": give one weight per loss"
            )
        if "robust" in self.loss_type and not 0.0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"label_smoothing must lie in [0, 0.5) for robust, got {self.label_smoothing}")
        if "exo_pair" in self.loss_type and not 0.0 < self.label_smoothing < 1.0:
            raise ConfigError(
                f"label_smoothing must lie in (0, 1) for exo_pair (the paper suggests 1e-3), got "
                f"{self.label_smoothing}"
            )
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ConfigError(f"ld_alpha must lie in [0, 1] (or none), got {self.ld_alpha}")
        for name in self.loss_type:
            fn = registry.get("preference", name)
            try:
                preference_losses.check_f_divergence(name, fn, self.f_divergence_type)
            except ValueError as err:
                raise ConfigError(str(err)) from None
            if self.use_weighting and getattr(fn, "sorts_pairs", False):
                raise ConfigError(f"use_weighting does not apply to loss_type {name!r}: it sorts the pairs")

    def loss_options(self) -> dict:
        """The hyperparameters the registered losses may read, by the names their signatures use."""
        return {
            "label_smoothing": self.label_smoothing,
            "f_divergence_type": self.f_divergence_type,
            "f_alpha_divergence_coef": self.f_alpha_divergence_coef,
            "discopop_tau": self.discopop_tau,
        }

    @property
    def needs_reference(self) -> bool:
        return any(preference_losses.needs_reference(registry.get("preference", n)) for n in self.loss_type)

    def embedded_start_model(self) -> str:
        """The model to start from when none is named: the online loops' weaker start (`sft.embedded_start`),
        which leaves DPO room to raise held-out exact match (see RUN_DEFAULTS)."""
        return sft.embedded_start()


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_preference_data(config: PreferenceConfig, tokenizer, *, command: str = "dpo"):
    """Tokenized train and eval pairs (eval may be None) and the dropped-pair counts; `command` names the
    loop in format errors."""
    if config.dataset_name is None:
        train, evaluation = embedded.dataset("preference", "train"), embedded.dataset("preference", "test")
    else:
        train, evaluation = loading.config_splits(config)
    out, info = [], {}
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is None:
            out.append(None)
            continue
        rows, counts = preference.tokenize_preference(dataset, tokenizer, command=command, keep_columns=())
        rows = cut_prompts(rows, config.max_prompt_length)
        rows, counts["dropped_prompt_fills_max_length"] = drop_filled_prompts(
            rows, config.max_length, config.truncation_mode
        )
        out.append(rows)
        info[split] = counts
    return out[0], out[1], info


def cut_prompts(rows, max_prompt_length: int | None):
    """Each prompt cut to its last `max_prompt_length` tokens (the end, which the answer follows, stays)."""
    if max_prompt_length is None:
        return rows
    return rows.map(
        lambda ids: {"prompt_ids": ids[-max_prompt_length:]},
        input_columns="prompt_ids",
        desc="Cutting prompts to max_prompt_length",
    )


def drop_filled_prompts(rows, max_length: int | None, truncation_mode: str):
    """Under keep_start, drop the rows whose prompt alone has max_length tokens or more: truncation would
    leave them no completion token (TRL drops them too). Returns (rows, number dropped); raises if none is left."""
    if max_length is None or truncation_mode != "keep_start":
        return rows, 0
    lengths = rows.with_format("arrow")["prompt_ids"].combine_chunks().value_lengths().to_numpy()
    keep = lengths < max_length
    if not keep.any():
        raise ValueError(
            f"every prompt has max_length={max_length} tokens or more, so no completion token would be left: "
            "raise max_length, set max_prompt_length, or use truncation_mode=keep_end"
        )
    dropped = int((~keep).sum())
    return (rows.select(keep.nonzero()[0]) if dropped else rows), dropped


def collate_pairs(
    rows, pad_token_id: int, *, max_length: int | None = None, truncation_mode: str = "keep_start",
    padding_free: bool = False,
) -> dict:  # fmt: skip
    """B pairs -> one batch of 2B sequences, the chosen ones first, each cut to max_length tokens.

    Padded (default): input_ids, attention_mask, completion_mask, position_ids (2B, T), right-padded.
    padding_free: input_ids, completion_mask, position_ids (1, total tokens), plus sequence_index and
    sequence_position (1, total) mapping each token to its (sequence, position) in the padded layout, and
    sequence_shape (2B, T) (a tuple). Either way completion_lengths (2B,) float32, the completion tokens of
    each (cut) sequence, and ref_chosen_logps / ref_rejected_logps (B,) float32 when
    the rows carry precomputed reference log-probs.
    """
    if not rows:
        raise ValueError("cannot collate an empty list of pairs")
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    cut = slice(None)
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    sequences = []
    for side in ("chosen_ids", "rejected_ids"):
        for r in rows:
            ids = r["prompt_ids"] + r[side]
            mask = [0] * len(r["prompt_ids"]) + [1] * len(r[side])
            sequences.append({"input_ids": ids[cut], "completion_mask": mask[cut]})
    # Completion tokens per sequence, the first token of a row included although nothing predicts it: the
    # lengths ipo and sigmoid_norm divide by (TRL counts them so).
    lengths = torch.tensor([sum(s["completion_mask"]) for s in sequences], dtype=torch.float32)
    if padding_free:
        batch = collate.padding_free_collate(sequences)
        sizes = torch.tensor([len(s["input_ids"]) for s in sequences])
        batch["sequence_index"] = torch.repeat_interleave(torch.arange(len(sequences)), sizes)[None]
        batch["sequence_position"] = batch["position_ids"].clone()
        batch["sequence_shape"] = (len(sequences), int(sizes.max()))
    else:
        batch = collate.pad_collate(sequences, pad_token_id)
    batch["completion_lengths"] = lengths
    if "ref_chosen_logps" in rows[0]:
        for key in ("ref_chosen_logps", "ref_rejected_logps"):
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    return batch


def pair_collator(config: PreferenceConfig, tokenizer, model):
    """`collate_pairs` with the config's truncation and layout, laid out for the model's attention."""
    return collate.for_attention(
        functools.partial(
            collate_pairs,
            pad_token_id=tokenizer.pad_token_id,
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
            padding_free=config.padding_free,
        ),
        model.config._attn_implementation,
    )


def count_pairs(batch) -> int:
    """Pairs in a batch: the unit the preference losses are averaged over."""
    if "sequence_shape" in batch:
        return batch["sequence_shape"][0] // 2
    return batch["input_ids"].shape[0] // 2


def by_sequence(values: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token values in the batch's layout -> (2B, T), one row per sequence (padding-free batches are
    unpacked; differentiable)."""
    if "sequence_index" not in batch:
        return values
    rows = values.new_zeros(batch["sequence_shape"])
    return rows.index_put((batch["sequence_index"][0], batch["sequence_position"][0]), values[0])


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def sequence_logps(token_logps: torch.Tensor, mask: torch.Tensor, ld_alpha: float | None):
    """Per-token log-probs and completion mask (2B, T), chosen rows first -> (chosen, rejected) (B,) each:
    plain sums, or LD-DPO's length-desensitised sums when ld_alpha is set."""
    if ld_alpha is None:
        return (token_logps * mask).sum(1).chunk(2)
    chosen, rejected = token_logps.chunk(2)
    chosen_mask, rejected_mask = mask.chunk(2)
    return preference_losses.ld_logps(chosen, rejected, chosen_mask, rejected_mask, ld_alpha)


@torch.no_grad()
def reference_logps(ref_model, batch: dict, ld_alpha: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The reference's (chosen, rejected) sequence log-probs (B,) each, for a batch from `collate_pairs`."""
    out = token_logprobs(ref_model, batch, share_prompts=True)
    mask = by_sequence(batch["completion_mask"], batch).float()
    return sequence_logps(by_sequence(out.logps, batch), mask, ld_alpha)


def dpo_step_loss(model, batch, num_items, *, config: DPOConfig, ref_model=None, router_aux_loss_coef=0.0):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: from `collate_pairs` (2B sequences, chosen first) [+ ref_chosen_logps, ref_rejected_logps (B,)];
    num_items: pairs in the whole optimizer step; ref_model: the live reference (None when the batch
    carries precomputed reference log-probs, or no loss needs one); router_aux_loss_coef: the weight of a
    mixture-of-experts policy's router loss (`models.router_aux_loss_coef`; 0: none), added per micro-batch
    as TRL adds it. Returns (loss, metrics): scalars, each a sum over this micro-batch's pairs divided by
    num_items (see the module docstring for the names).
    """
    out = token_logprobs(
        model, batch, return_entropy=True, return_top1=True, return_mean_logit=True,
        return_log_sum_sq=config.use_weighting, return_router_aux_loss=router_aux_loss_coef != 0,
        share_prompts=True,
    )  # fmt: skip
    mask = by_sequence(batch["completion_mask"], batch).float()  # (2B, T)
    token = by_sequence(out.logps, batch)
    chosen, rejected = sequence_logps(token, mask, config.ld_alpha)
    pairs = chosen.shape[0]

    ref_chosen = ref_rejected = None
    if config.needs_reference:
        if "ref_chosen_logps" in batch:
            ref_chosen, ref_rejected = batch["ref_chosen_logps"], batch["ref_rejected_logps"]
        elif ref_model is not None:
            ref_chosen, ref_rejected = reference_logps(ref_model, batch, config.ld_alpha)
        else:
            raise ValueError(
                f"loss_type {config.loss_type} needs reference log-probs, but the batch carries none "
                "(precompute_ref_log_probs) and there is no reference model"
            )

    pair_weights = None
    if config.use_weighting:
        weights = preference_losses.wpo_weights(token, by_sequence(out.log_sum_sq, batch), mask)
        pair_weights = weights[:pairs] * weights[pairs:]
    lengths = batch["completion_lengths"]
    loss, metrics = preference_losses.preference_loss(
        config.loss_type,
        chosen,
        rejected,
        ref_chosen,
        ref_rejected,
        beta=config.beta,
        loss_weights=config.loss_weights,
        pair_weights=pair_weights,
        num_pairs=num_items,
        chosen_lengths=lengths[:pairs],
        rejected_lengths=lengths[pairs:],
        chosen_token_logps=token[:pairs],
        chosen_mask=mask[:pairs],
        **config.loss_options(),
    )
    metrics.update(token_metrics(out, batch, mask, pairs / num_items))
    if router_aux_loss_coef:
        loss = loss + router_aux_loss_coef * out.aux_loss * (pairs / num_items)
        metrics["aux_loss"] = out.aux_loss.detach() * (pairs / num_items)
    return loss, metrics


@torch.no_grad()
def token_metrics(out, batch: dict, mask: torch.Tensor, share) -> dict:
    """This micro-batch's token means (TRL's), weighted by its share of the step's pairs."""
    chosen_mask, rejected_mask = mask.chunk(2)

    def mean(values, m):
        return (values * m).sum() / m.sum().clamp(min=1) * share

    mean_logit = by_sequence(out.mean_logit, batch)
    chosen_logit, rejected_logit = mean_logit.chunk(2)
    return {
        "logits/chosen": mean(chosen_logit, chosen_mask),
        "logits/rejected": mean(rejected_logit, rejected_mask),
        "entropy": mean(by_sequence(out.entropy.detach(), batch), mask),
        "mean_token_accuracy": mean(by_sequence(out.is_top1, batch).chunk(2)[0].float(), chosen_mask),
    }


# ---------------------------------------------------------------------------------------------------------
# The reference model
# ---------------------------------------------------------------------------------------------------------


def load_reference(config: ReferenceConfig, policy, device):
    """The frozen reference: `ref_model_name_or_path`, or the policy as it starts (a frozen copy; under
    use_peft the policy itself with its adapters disabled, `lora.AdapterDisabled`, no copy); None when no
    loss needs one."""
    if not config.needs_reference:
        return None
    if config.ref_model_name_or_path is None:
        return lora.reference_of(policy, config, device)
    ref = load_causal_lm(config.ref_model_name_or_path, dtype=next(policy.parameters()).dtype)
    if config.disable_dropout:
        disable_dropout(ref)
    return frozen_reference(ref, config, device)


def precompute_reference(rows, ref_model, collate_fn, *, batch_size: int, device, ld_alpha):
    """rows with two float32 columns added, ref_chosen_logps and ref_rejected_logps: the reference's
    sequence log-probs of each pair, computed in batches of `batch_size` pairs. Every rank computes all
    rows (the reference forward is the cheap half of a step, and the rows then stay identical across ranks)."""
    chosen, rejected = [], []
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        batch = loop.to_device(collate_fn(loop.take_rows(rows, indices)), device)
        c, r = reference_logps(ref_model, batch, ld_alpha)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    chosen, rejected = torch.cat(chosen).tolist(), torch.cat(rejected).tolist()
    return rows.add_column("ref_chosen_logps", chosen).add_column("ref_rejected_logps", rejected)


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def _model_config(model_name_or_path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(model_name_or_path)


@dataclass
class Offline:
    """What every offline preference loop (DPO, KTO, CPO, ORPO) starts from (`start_offline`)."""

    run: loop.Run
    tokenizer: object
    model: torch.nn.Module
    ref_model: torch.nn.Module | None  # None unless config.needs_reference
    train_rows: object  # datasets.Dataset, tokenized
    eval_rows: object | None
    aux_coef: float  # weight of a mixture-of-experts policy's router loss (0: none)


def start_offline(config: PreferenceConfig, command: str, load_data) -> Offline:
    """Tokenizer, data, run folder, policy and reference, in the order that stops on bad input before the run
    folder is written. load_data(config, tokenizer) -> (train_rows, eval_rows or None, {split: {count: n}})."""
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows, info = load_data(config, tokenizer)
    loop.plan_steps(len(train_rows), config, distributed.env_world()[1])  # too few rows: stop here
    if getattr(config, "ref_model_name_or_path", None) is not None:
        load_tokenizer(config.ref_model_name_or_path)  # a missing reference stops here too
    # No model named: the loop's embedded SFT model (trained once and cached); the config keeps
    # model_name_or_path None, so the embedded defaults apply.
    start_model = config.model_name_or_path or config.embedded_start_model()
    aux_coef = router_aux_loss_coef(_model_config(start_model), config.router_aux_loss_coef)
    run = loop.start(config, command=command)
    dropped = {f"{split}_{key}": value for split, counts in info.items() for key, value in counts.items()}
    run.log_info({"start_model": start_model, **dropped})
    model = load_causal_lm(start_model, seed=config.seed, quantization=lora.quantization(run))
    if config.disable_dropout:
        disable_dropout(model)
    ref = load_reference(config, model, run.device)
    return Offline(run, tokenizer, model, ref, train_rows, eval_rows, aux_coef)


def sync_reference_hook(config: ReferenceConfig, ref_model):
    """TR-DPO's on_step for loop.fit (every ref_model_sync_steps steps the policy is mixed into the
    reference), or None when sync_ref_model is off or there is no live reference."""
    if not config.sync_ref_model or ref_model is None:
        return None

    def on_step(step, policy):
        if step % config.ref_model_sync_steps == 0:
            mix_into_reference(policy, ref_model, config.ref_model_mixup_alpha)

    return on_step


def fit_offline(offline: Offline, config: PreferenceConfig, collate_fn, step_loss, *, count_fn, on_step=None):
    """loop.fit with step_loss(model, batch, num_items) -> (loss, metrics); on the embedded task, held-out
    exact match is logged at the start (start_exact_match) and at every evaluation, so the log shows what
    the loop added to its starting model. A live reference moved by on_step is checkpointed with the run."""
    run, model, tokenizer = offline.run, offline.model, offline.tokenizer
    eval_fn = None
    if config.dataset_name is None:
        eval_fn = functools.partial(embedded.exact_match, tokenizer=tokenizer, split="test")
        if run.resume_from is None:
            start = loop.evaluate(run, model.to(run.device), None, collate_fn, None, None, eval_fn)
            run.log_info({f"start_{k}": v for k, v in start.items()})
    companions = (
        {"ref_model": offline.ref_model} if on_step is not None and offline.ref_model is not None else None
    )
    loop.fit(
        run,
        model,
        tokenizer,
        offline.train_rows,
        collate_fn,
        step_loss,
        count_fn=count_fn,
        eval_rows=offline.eval_rows,
        eval_fn=eval_fn,
        on_step=on_step,
        companions=companions,
    )
    return run


def train(config: DPOConfig):
    """Run DPO to the end; returns the run (its output_dir holds metrics.jsonl, checkpoints, the model)."""
    offline = start_offline(config, "dpo", load_preference_data)
    collate_fn = pair_collator(config, offline.tokenizer, offline.model)
    ref = offline.ref_model
    if config.precompute_ref_log_probs and ref is not None:
        size = config.precompute_ref_batch_size or config.per_device_train_batch_size
        precompute = functools.partial(
            precompute_reference, ref_model=ref, collate_fn=collate_fn, batch_size=size,
            device=offline.run.device, ld_alpha=config.ld_alpha,
        )  # fmt: skip
        offline.train_rows = precompute(offline.train_rows)
        if offline.eval_rows is not None:
            offline.eval_rows = precompute(offline.eval_rows)
        ref = offline.ref_model = None  # freed: the rows carry what the loss reads
    step_loss = functools.partial(
        dpo_step_loss, config=config, ref_model=ref, router_aux_loss_coef=offline.aux_coef
    )
    return fit_offline(
        offline, config, collate_fn, step_loss, count_fn=count_pairs, on_step=sync_reference_hook(config, ref)
    )
