"""Contrastive preference optimisation: raise log pi(chosen) over log pi(rejected) with no reference model,
plus a behaviour-cloning term on the chosen answers; SimPO and AlphaPO are loss types of the same loop.

    1. model and tokenizer (the embedded SFT model when none is named); no reference model
    2. data: the DPO loop's paired data (`dpo.load_preference_data`): tokenized prompt / chosen / rejected,
       prompts cut to max_prompt_length, the rows whose prompt alone fills max_length dropped and counted
    3. for each optimizer step: chosen and rejected sequences in ONE forward (a 2B-row batch from
       `dpo.collate_pairs`, chosen first), log-probs of the completion tokens only (`rl.logprobs`), summed per
       sequence or averaged per token as the loss wants (sigmoid, hinge: sums; ipo, simpo, alphapo: means)
       -> the registered "cpo" loss (`losses.cpo`) + cpo_alpha * NLL of the chosen completions -> step

Metrics (TRL 1.16's names): loss, rewards/chosen, rewards/rejected (beta times the shaped log-probs the loss
compares), rewards/accuracies, rewards/margins, logps/chosen, logps/rejected, logits/chosen, logits/rejected,
nll_loss (0 when cpo_alpha is 0, as TRL logs it), entropy, mean_token_accuracy, num_tokens, learning_rate,
grad_norm, aux_loss (mixture-of-experts policies); eval_ versions on the held-out pairs.

Departures from TRL 1.16's CPOTrainer, by choice:
- tokens: the DPO loop's (`dpo.load_preference_data`, which follows TRL 1.16's DPOTrainer), so the same data
  gives the same tokens in every preference loop: no BOS is added in front of the prompt (CPOTrainer adds
  the tokenizer's BOS when it has one and the prompt lacks it; the tokens are the same for tokenizers
  without one, Qwen2's and the embedded one), and under keep_start the rows whose prompt alone fills
  max_length are dropped and counted (CPOTrainer keeps them with an empty completion, whose per-token mean
  is 0 / 0 = NaN under ipo and simpo); max_prompt_length, truncation_mode and padding_free work as in DPO.
- logits/chosen, logits/rejected: the mean logit over the vocabulary averaged over the completion tokens,
  from the kernel's running sums, as the DPO loop logs them (CPOTrainer averages the full (B, T, V) logits,
  prompt and padding positions included, which only a full logits tensor gives).
- label_smoothing with hinge or ipo, which ignore it, is an error (CPOTrainer warns).
- a mixture-of-experts policy's router loss is weighted in as in the DPO loop (router_aux_loss_coef, none: the
  model config's own); CPOTrainer adds it only when the model config sets output_router_logits.
"""

from __future__ import annotations

import functools
import inspect
import math
from dataclasses import dataclass, field

from posttrain.losses import cpo as cpo_losses
from posttrain.losses import registry
from posttrain.rl import dpo
from posttrain.rl.config import ConfigError
from posttrain.rl.logprobs import sequence_logprobs, token_logprobs


@dataclass
class CPOConfig(dpo.PreferenceConfig):
    # Embedded task, from the embedded SFT model (110 of the 112 held-out sums right): its chosen answers
    # already have log-prob ~ -0.03 and its rejected ones ~ -12, so every pair is ranked from the start and
    # CPO can only keep the policy where it is (no reference ties it there; the NLL term does). Measured
    # (seeds 42 / 1 / 7, held-out exact match after the run): lr 5e-5 for 2 epochs keeps 0.982 on all three
    # (~50 steps, under a minute); lr 1e-4 loses one sum (0.973) in 4 of the 6 runs tried (1 or 2 epochs,
    # beta 0.1 or 1, three seeds); SimPO (loss_type simpo, cpo_alpha 0) at lr 1e-4 for 1 epoch loses three
    # (0.955). Any other data: TRL's CPOConfig defaults.
    #                         embedded task     any other data (TRL's defaults)
    run_defaults = {
        "per_device_train_batch_size": (32, 8),
        "num_train_epochs": (2.0, 3.0),
        "warmup_steps": (10, 0),
        "max_length": (64, 1024),
        "beta": (0.1, 0.1),
    }
    embedded_learning_rate = 5e-5
    pretrained_learning_rate = 1e-6  # TRL's CPOConfig default

    loss_type: str = field(
        default="sigmoid",
        metadata={
            "help": "Preference loss: "
            + ", ".join(registry.names("cpo"))
            + " (alphapo runs with cpo_alpha 0, as TRL's; SimPO is simpo with cpo_alpha 0)."
        },
    )
    label_smoothing: float = field(
        default=0.0, metadata={"help": "Label-flip probability in [0, 0.5) of sigmoid, simpo and alphapo."}
    )
    cpo_alpha: float = field(
        default=1.0, metadata={"help": "Weight of the NLL of the chosen completions (behaviour cloning)."}
    )
    simpo_gamma: float = field(
        default=0.5, metadata={"help": "SimPO's target reward margin gamma (simpo, alphapo)."}
    )
    alpha: float = field(
        default=0.0,
        metadata={
            "help": "AlphaPO's reward shape, any loss: r = (1 - p^-alpha) / alpha; 0: r = log p (the default)."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        valid = registry.names("cpo")
        if self.loss_type not in valid:
            raise ConfigError(f"loss_type {self.loss_type!r} is not a cpo loss; expected one of {valid}")
        for name in ("cpo_alpha", "simpo_gamma", "alpha", "label_smoothing"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name} must be finite, got {getattr(self, name)}")
        if self.cpo_alpha < 0:
            raise ConfigError(f"cpo_alpha must be >= 0, got {self.cpo_alpha}")
        # A loss reads label_smoothing if its signature names it (sigmoid, simpo, alphapo; TRL ignores it
        # with a warning for hinge and ipo).
        if "label_smoothing" in inspect.signature(registry.get("cpo", self.loss_type)).parameters:
            if not 0.0 <= self.label_smoothing < 0.5:
                raise ConfigError(f"label_smoothing must lie in [0, 0.5), got {self.label_smoothing}")
        elif self.label_smoothing != 0.0:
            raise ConfigError(
                f"label_smoothing={self.label_smoothing} does not apply to loss_type {self.loss_type!r} "
                "(its loss takes none): set it to 0"
            )
        if self.loss_type == "alphapo":
            self.cpo_alpha = 0.0  # TRL 1.16's CPOConfig turns alphapo into simpo without the NLL term

    def loss_options(self) -> dict:
        """The hyperparameters the registered "cpo" losses may read, by the names their signatures use."""
        return {"alpha": self.alpha, "label_smoothing": self.label_smoothing, "simpo_gamma": self.simpo_gamma}


def cpo_step_loss(model, batch, num_items, *, config: CPOConfig, router_aux_loss_coef=0.0):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: from `dpo.collate_pairs` (2B sequences, chosen first); num_items: pairs in the whole optimizer step;
    router_aux_loss_coef: the weight of a mixture-of-experts policy's router loss (0: none), added per
    micro-batch as TRL adds it. Returns (loss, metrics): scalars, each this micro-batch's sum over pairs
    divided by num_items (see the module docstring for the names).
    """
    out = token_logprobs(
        model, batch, return_entropy=True, return_top1=True, return_mean_logit=True,
        return_router_aux_loss=router_aux_loss_coef != 0, share_prompts=True,
    )  # fmt: skip
    mask = dpo.by_sequence(batch["completion_mask"], batch).float()  # (2B, T)
    token = dpo.by_sequence(out.logps, batch)  # (2B, T)
    sums, means = sequence_logprobs(token, mask)  # (2B,) each
    fn = registry.get("cpo", config.loss_type)
    chosen, rejected = (means if cpo_losses.uses_token_mean(fn) else sums).chunk(2)
    pairs = chosen.shape[0]
    # TRL computes no NLL when cpo_alpha is 0 (and logs nll_loss 0)
    nll = cpo_losses.chosen_nll(token[:pairs], mask[:pairs]) if config.cpo_alpha else token.new_zeros(())
    loss, metrics = cpo_losses.cpo_loss(
        config.loss_type, chosen, rejected, nll, beta=config.beta, cpo_alpha=config.cpo_alpha,
        num_pairs=num_items, **config.loss_options(),
    )  # fmt: skip
    metrics.update(dpo.token_metrics(out, batch, mask, pairs / num_items))
    if router_aux_loss_coef:
        loss = loss + router_aux_loss_coef * out.aux_loss * (pairs / num_items)
        metrics["aux_loss"] = out.aux_loss.detach() * (pairs / num_items)
    return loss, metrics


def train(config: CPOConfig):
    """Run CPO to the end; returns the run (its output_dir holds metrics.jsonl, checkpoints, the model)."""
    offline = dpo.start_offline(config, "cpo", functools.partial(dpo.load_preference_data, command="cpo"))
    step_loss = functools.partial(cpo_step_loss, config=config, router_aux_loss_coef=offline.aux_coef)
    collate_fn = dpo.pair_collator(config, offline.tokenizer, offline.model)
    return dpo.fit_offline(offline, config, collate_fn, step_loss, count_fn=dpo.count_pairs)
