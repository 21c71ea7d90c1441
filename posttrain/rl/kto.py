"""Kahneman-Tversky optimisation (KTO): learn from completions labelled desirable or undesirable, one at a time.

    1. model and tokenizer (the embedded SFT model when none is named); the reference: a frozen copy of the
       starting model or another model (`ref_model_name_or_path`), as DPO (`dpo.start_offline`)
    2. data: load unpaired rows (prompt, completion, label), or preference pairs unpaired as TRL does;
       tokenize (`data.unpaired`), drop (and count) the rows whose prompt alone fills max_length; for losses
       with a KL reference point, give each row a mismatched completion: the completions of each block of
       per_device_train_batch_size rows rotated by one. The rows are visited in order
       (train_sampling_strategy sequential, as TRL requires), so each micro-batch re-pairs its own completions
    3. optionally the reference's log-probs of every row and its mismatched pair, once, before training
       (`precompute_ref_log_probs`); the reference model is then freed
    4. for each micro-batch: the policy's log-probs of the completions (`rl.logprobs`, completion tokens
       only), of the mismatched completions without gradient, and the reference's of both in one forward ->
       the KL reference point z0 = max(0, mean(policy - reference) over the mismatched pairs), averaged
       over processes -> the registered KTO loss (`losses.kto`) -> step; TR-DPO's reference mixing optional

Metrics (TRL 1.16's names): loss, kl (z0), rewards/chosen, rewards/rejected (the mean beta * log-ratio of
the desirable / undesirable rows), rewards/margins (their difference), logps/chosen, logps/rejected,
logits/chosen, logits/rejected (the mean logit over the vocabulary, averaged over the desirable /
undesirable completion tokens), entropy (over all completion tokens), num_tokens, learning_rate, grad_norm;
aux_loss for mixture-of-experts policies; eval_ versions on the held-out rows.

Averaging. TRL computes each metric per micro-batch as a sum over the processes' rows divided by their
count (the desirable rows for rewards/chosen, the desirable completion tokens for logits/chosen, ...) and
logs the plain mean of those per-micro-batch values. Here the sum and the count run over the whole
optimizer step (all micro-batches and processes: `count_rows` gives the loop the counts, see
`kto_step_loss`): the same with one micro-batch per step, and with several the pooled mean rather than the
mean of means. A step without a desirable (undesirable) row logs 0 for rewards/chosen, logps/chosen and
logits/chosen (the rejected ones) where TRL logs nothing, and rewards/margins is then not a margin.

Data order. TRL 1.16 asks for train_sampling_strategy sequential whenever the loss reads z0, because the
mismatched completions are fixed per row before training; the loop's sequential order is the same as
TRL's (the dataset's order, per_device_train_batch_size x processes rows per micro-batch step), so the
micro-batches and their mismatched pairs are TRL's. apo_zero_unpaired reads no z0 and may use any order.

Departures from TRL 1.16: the reference runs the completions and their mismatched pairs in one forward
(TRL: two); a conversational prompt whose template renders differently alone raises (TRL cuts at the
common prefix with a warning); max_prompt_length and truncation_mode keep_end work here (TRL's KTOConfig
has neither: it keeps each sequence's first max_length tokens); evaluation computes z0 per process (TRL
gathers it there too, but the evaluation micro-batches of the processes need not line up).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass, field
from typing import ClassVar

import torch

from posttrain.data import collate, embedded, loading, unpaired
from posttrain.losses import kto as kto_losses
from posttrain.losses import registry
from posttrain.rl import distributed, dpo, loop
from posttrain.rl.config import ConfigError
from posttrain.rl.logprobs import token_logprobs

SEQUENCE_KEYS = ("input_ids", "attention_mask", "completion_mask", "position_ids")


@dataclass
class KTOConfig(dpo.ReferenceConfig):
    # Defaults that depend on the run. The embedded task starts from the embedded SFT model (98% held-out exact
    # match) and trains against its unpaired split: each problem once, with the right sum (desirable, 393 rows)
    # or a plausible wrong one (undesirable, 395). Unlike DPO's pairs, an undesirable answer's tokens are not
    # offset by a desirable answer to the same prompt, so pushing "45" down also pushes down the "4" that
    # starts the right "46": at lr 1e-4 (beta 0.5, 1 or 2) held-out exact match fell to 95.5-96.4%, at
    # 5e-5 to 97.3% (also with desirable_weight 1.33). beta 2 at 3e-5 keeps it at 98.2% while the margins grow
    # (train 0 -> ~1.5, held-out 1.2 after 4 epochs, 100 steps, ~1-2 min on 2 shared CPU cores). From an SFT
    # start trained with the output layer's folds in C (kernels/native.py: other rounding, as good a start, 111
    # of 112), 3e-5 and 2e-5, seed 42 or 1, desirable_weight 1.33, all end at 108 of 112 (held-out margins
    # 0.8-1.1); 1e-5 at 109, but with held-out margins of 0.44.
    run_defaults: ClassVar[dict] = {
        #                              embedded task     any other data (TRL's defaults)
        "per_device_train_batch_size": (32, 8),
        "num_train_epochs": (4.0, 3.0),
        "warmup_steps": (10, 0),
        "max_length": (64, 1024),
        "beta": (2.0, 0.1),
    }
    embedded_learning_rate: ClassVar[float] = 3e-5
    pretrained_learning_rate: ClassVar[float] = 1e-6  # TRL's KTOConfig default

    train_sampling_strategy: str = field(
        default="sequential",
        metadata={
            "help": "Order of the rows in each epoch; sequential (TRL's KTO default) is required by every "
            "loss that reads the KL reference point (its mismatched pairs are fixed per row), random or "
            "group_by_length only for apo_zero_unpaired."
        },
    )
    loss_type: str = field(
        default="kto",
        metadata={"help": "The unpaired preference loss: " + ", ".join(registry.names("kto")) + "."},
    )
    desirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the desirable rows' losses (w_D of the KTO paper)."}
    )
    undesirable_weight: float = field(
        default=1.0, metadata={"help": "Weight of the undesirable rows' losses (w_U of the KTO paper)."}
    )

    def __post_init__(self):
        super().__post_init__()
        valid = registry.names("kto")
        if self.loss_type not in valid:
            raise ConfigError(f"loss_type {self.loss_type!r} is not a KTO loss; expected one of {valid}")
        for name in ("desirable_weight", "undesirable_weight"):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.desirable_weight == 0 and self.undesirable_weight == 0:
            raise ConfigError("desirable_weight and undesirable_weight are both 0: nothing would train")
        if self.padding_free:
            raise ConfigError(
                "padding_free is not supported by kto (TRL's KTOTrainer pads too): set it false"
            )
        if self.uses_kl:
            if self.train_sampling_strategy != "sequential":
                raise ConfigError(
                    f"loss_type {self.loss_type!r} reads the KL reference point, whose mismatched pairs are "
                    "built from neighbouring rows before training: it needs train_sampling_strategy="
                    f"sequential, got {self.train_sampling_strategy!r}"
                )
            if self.per_device_train_batch_size < 2:
                raise ConfigError(
                    f"per_device_train_batch_size must be >= 2 for loss_type {self.loss_type!r}: with one row "
                    "per micro-batch its mismatched pair is the row itself, and the KL term equals the reward"
                )

    @property
    def uses_kl(self) -> bool:
        """The loss reads the KL reference point (so rows get mismatched completions)."""
        return kto_losses.needs_reference_point(registry.get("kto", self.loss_type))


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def load_unpaired_data(config: KTOConfig, tokenizer):
    """Tokenized train and eval rows (eval may be None) and their counts: {split: {name: int}}."""
    if config.dataset_name is None:
        splits = [embedded.dataset("unpaired_preference", split) for split in ("train", "test")]
    else:
        splits = loading.config_splits(config)
    out, info = [], {}
    for split, dataset in zip(("train", "eval"), splits, strict=True):
        if dataset is None:
            out.append(None)
            continue
        rows, counts = unpaired.tokenize_unpaired(dataset, tokenizer, command="kto")
        rows = dpo.cut_prompts(rows, config.max_prompt_length)
        rows, counts["dropped_prompt_fills_max_length"] = dpo.drop_filled_prompts(
            rows, config.max_length, config.truncation_mode
        )
        if config.uses_kl:  # TRL rotates the eval rows in blocks of the train batch size too
            rows = unpaired.add_kl_completions(rows, config.per_device_train_batch_size)
        out.append(rows)
        info[split] = counts
    labels = out[0].with_format("arrow")["label"].combine_chunks()
    desirable = labels.true_count
    for message in unpaired.label_warnings(
        desirable, len(labels) - desirable, config.desirable_weight, config.undesirable_weight
    ):
        warnings.warn(message, UserWarning, stacklevel=1)
    return out[0], out[1], info


def count_rows(batch: dict) -> torch.Tensor:
    """The loop's count for a batch from `collate_unpaired`: (5,) int64, the rows, the desirable rows, the
    undesirable rows, and the completion tokens of each (the predicted ones). `kto_step_loss` divides by
    their sums over the optimizer step, so that its loss is the step's row mean and each metric the
    step's mean over the rows or tokens it is about."""
    labels = batch["label"]
    tokens = batch["completion_mask"].sum(1)
    return torch.stack(
        [
            torch.tensor(labels.numel(), device=labels.device),
            labels.sum(),
            (~labels).sum(),
            tokens[labels].sum(),
            tokens[~labels].sum(),
        ]
    ).long()


def _step_counts(num_items, batch: dict) -> torch.Tensor:
    """num_items as (5,) counts; a scalar (the step's rows alone) takes the label and token counts from this
    batch, which is exact when the batch is the whole step (one micro-batch, one process)."""
    counts = torch.as_tensor(num_items, device=batch["label"].device)
    if counts.ndim == 0:
        counts = torch.cat([counts.reshape(1).long(), count_rows(batch)[1:]])
    return counts.clamp(min=1).to(torch.float64)


def _kl_batch(batch: dict) -> dict:
    return {key: batch[f"kl_{key}"] for key in SEQUENCE_KEYS}


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def _sums(logps: torch.Tensor, batch: dict) -> torch.Tensor:
    """Per-token log-probs (B, T) -> per-sequence sums over the completion tokens (B,)."""
    return (logps * batch["completion_mask"]).sum(1)


@torch.no_grad()
def reference_logps(ref_model, batch: dict, with_kl: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference's sequence log-probs of the completions and (with_kl) of the mismatched completions,
    (B,) each, in one forward over the 2B sequences (`collate_unpaired` pads both to one width), where each
    prompt comes twice (its completion and a mismatched one): the columns they share run once
    (`rl.logprobs.shared_prefix`)."""
    if not with_kl:
        return _sums(token_logprobs(ref_model, batch).logps, batch), None
    both = {key: torch.cat([batch[key], batch[f"kl_{key}"]]) for key in SEQUENCE_KEYS}
    return _sums(token_logprobs(ref_model, both, share_prompts=True).logps, both).chunk(2)


def _world_mean(value: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce_sum(value.clone()) / torch.distributed.get_world_size()


def kto_step_loss(model, batch, num_items, *, config: KTOConfig, ref_model=None, router_aux_loss_coef=0.0):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: from `unpaired.collate_unpaired` (B rows, with their mismatched sequences when the loss reads z0)
    [+ ref_logps, ref_kl_logps (B,)]; num_items: `count_rows` summed over the whole optimizer step (the loop
    passes it), or just the step's row count (then the label and token counts are this batch's: exact when
    it is the whole step); ref_model: the live reference (None when the batch carries precomputed reference
    log-probs); router_aux_loss_coef: the weight of a mixture-of-experts policy's router loss (0: none).
    Returns (loss, metrics): the sum of this micro-batch's row losses / the step's rows, and the metrics of
    the module docstring as this micro-batch's sums / the step's counts.
    """
    loss_fn = registry.get("kto", config.loss_type)
    with_kl = kto_losses.needs_reference_point(loss_fn)
    rows, desirable, undesirable, desirable_tokens, undesirable_tokens = _step_counts(num_items, batch)
    labels = batch["label"]

    out = token_logprobs(
        model, batch, return_entropy=True, return_mean_logit=True,
        return_router_aux_loss=router_aux_loss_coef != 0,
    )  # fmt: skip
    logps = _sums(out.logps, batch)
    if with_kl:
        with torch.no_grad():  # the reference point carries no gradient (TRL runs this forward so too)
            kl = _kl_batch(batch)
            kl_logps = _sums(token_logprobs(model, kl).logps, kl)

    if "ref_logps" in batch:
        ref_logps, ref_kl_logps = batch["ref_logps"], batch.get("ref_kl_logps")
    elif ref_model is not None:
        ref_logps, ref_kl_logps = reference_logps(ref_model, batch, with_kl)
    else:
        raise ValueError(
            "kto needs reference log-probs, but the batch carries none (precompute_ref_log_probs) and there "
            "is no reference model"
        )

    z0 = None
    if with_kl:
        # Every process uses the same z0 during training, as TRL gathers it; evaluation keeps its own (the
        # processes' evaluation micro-batches need not line up, so a collective here could wait forever).
        gather = model.training and distributed.is_distributed()
        z0 = kto_losses.kl_reference_point(kl_logps, ref_kl_logps, _world_mean if gather else None)
    per_row = loss_fn(
        logps, ref_logps, labels, z0, beta=config.beta,
        desirable_weight=config.desirable_weight, undesirable_weight=config.undesirable_weight,
    )  # fmt: skip
    loss = per_row.sum() / rows.to(per_row.dtype)  # the counts are float64 for the metrics

    with torch.no_grad():
        share = labels.numel() / rows.to(per_row.dtype)  # this micro-batch's part of the step's rows
        rewards = config.beta * (logps - ref_logps)
        mask = batch["completion_mask"]
        mean_logit = out.mean_logit * mask
        metrics = {
            "kl": (z0 if z0 is not None else logps.new_zeros(())) * share,
            "rewards/chosen": rewards[labels].sum() / desirable,
            "rewards/rejected": rewards[~labels].sum() / undesirable,
            "logps/chosen": logps[labels].sum() / desirable,
            "logps/rejected": logps[~labels].sum() / undesirable,
            "logits/chosen": mean_logit[labels].sum() / desirable_tokens,
            "logits/rejected": mean_logit[~labels].sum() / undesirable_tokens,
            "entropy": (out.entropy * mask).sum() / (desirable_tokens + undesirable_tokens),
        }
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
    if router_aux_loss_coef:
        loss = loss + router_aux_loss_coef * out.aux_loss * share
        metrics["aux_loss"] = out.aux_loss.detach() * share
    return loss, metrics


# ---------------------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------------------


def precompute_reference(rows, ref_model, collate_fn, *, batch_size: int, device, with_kl: bool):
    """rows with float32 columns ref_logps (and, with_kl, ref_kl_logps): the reference's sequence log-probs
    of each row's completion and mismatched completion, computed in batches of `batch_size` rows. Every
    process computes all rows (as `dpo.precompute_reference`)."""
    logps, kl_logps = [], []
    for start in range(0, len(rows), batch_size):
        indices = list(range(start, min(start + batch_size, len(rows))))
        batch = loop.to_device(collate_fn(loop.take_rows(rows, indices)), device)
        ref, ref_kl = reference_logps(ref_model, batch, with_kl)
        logps.append(ref.float().cpu())
        if with_kl:
            kl_logps.append(ref_kl.float().cpu())
    rows = rows.add_column("ref_logps", torch.cat(logps).tolist())
    if with_kl:
        rows = rows.add_column("ref_kl_logps", torch.cat(kl_logps).tolist())
    return rows


def train(config: KTOConfig):
    """Run KTO to the end; returns the run (its output_dir holds metrics.jsonl, checkpoints, the model)."""
    offline = dpo.start_offline(config, "kto", load_unpaired_data)
    collate_fn = collate.for_attention(
        functools.partial(
            unpaired.collate_unpaired,
            pad_token_id=offline.tokenizer.pad_token_id,
            max_length=config.max_length,
            truncation_mode=config.truncation_mode,
        ),
        offline.model.config._attn_implementation,
    )
    ref = offline.ref_model
    if config.precompute_ref_log_probs:
        precompute = functools.partial(
            precompute_reference, ref_model=ref, collate_fn=collate_fn, device=offline.run.device,
            batch_size=config.precompute_ref_batch_size or config.per_device_train_batch_size,
            with_kl=config.uses_kl,
        )  # fmt: skip
        offline.train_rows = precompute(offline.train_rows)
        if offline.eval_rows is not None:
            offline.eval_rows = precompute(offline.eval_rows)
        ref = offline.ref_model = None  # freed: the rows carry what the loss reads
    step_loss = functools.partial(
        kto_step_loss, config=config, ref_model=ref, router_aux_loss_coef=offline.aux_coef
    )
    return dpo.fit_offline(
        offline,
        config,
        collate_fn,
        step_loss,
        count_fn=count_rows,
        on_step=dpo.sync_reference_hook(config, ref),
    )
