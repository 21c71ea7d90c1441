"""Odds-ratio preference optimisation: supervised fine-tuning on the chosen answers plus a penalty on the odds
of the rejected ones, in one stage, with no reference model (Hong et al. 2024, arXiv:2403.07691).

    1. model and tokenizer (the embedded SFT model when none is named); no reference model
    2. data: the DPO loop's paired data (`dpo.load_preference_data`), as CPO's
    3. for each optimizer step: chosen and rejected sequences in ONE forward (`dpo.collate_pairs`, chosen
       first); log-probs at the completion tokens, and on the chosen rows at the prompt tokens too (the NLL
       covers them, as TRL's); per-token means of the completions -> the odds ratio (`losses.cpo`, the
       registered "orpo" loss) -> loss = NLL(chosen) + beta * mean(-log sigma(log OR)) -> step

Metrics (TRL 1.16's names): loss, rewards/chosen, rewards/rejected (beta times the per-token mean log-probs),
rewards/accuracies, rewards/margins, logps/chosen, logps/rejected (per-token means), logits/chosen,
logits/rejected, nll_loss, log_odds_ratio (the mean of log sigma(log OR)), log_odds_chosen (the mean log OR),
entropy, mean_token_accuracy, num_tokens, learning_rate, grad_norm, aux_loss (mixture-of-experts policies);
eval_ versions on the held-out pairs.

As TRL 1.16's ORPOTrainer, the NLL is over every token of the chosen sequence, prompt included, a token mean
over the micro-batch (the paper writes it over the response). Departures, as CPO's (see `rl.cpo`): the DPO
loop's tokens (no BOS added, prompts that fill max_length dropped), logits/* over the completion tokens only,
the router loss of a mixture of experts as in the DPO loop. One addition: loss_type names the registered
odds-ratio term (TRL has no such option; the default is ORPO's), so that a variant is one registered function.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import torch

from posttrain.losses import cpo as cpo_losses
from posttrain.losses import registry
from posttrain.rl import dpo
from posttrain.rl.config import ConfigError
from posttrain.rl.logprobs import sequence_logprobs, token_logprobs


@dataclass
class ORPOConfig(dpo.PreferenceConfig):
    # Embedded task, from the embedded SFT model: the odds-ratio term starts saturated (every pair ranked,
    # log sigma(log OR) ~ -2e-4) while the NLL over the prompts, random sums the SFT model never modelled
    # (~5 nats a token), carries nearly all the gradient; learning them disturbs the answers. Measured
    # (held-out exact match after one epoch, start 0.982): lr 1e-4 0.893 (beta 0.1 or 1), 3e-5 0.964,
    # 1e-5 0.982 on seeds 42 / 1 / 7 (25 steps, under a minute; 2 epochs at 1e-5: 0.973). Any other data:
    # TRL's ORPOConfig defaults.
    #                         embedded task     any other data (TRL's defaults)
    run_defaults = {
        "per_device_train_batch_size": (32, 8),
        "num_train_epochs": (1.0, 3.0),
        "warmup_steps": (10, 0),
        "max_length": (64, 1024),
        "beta": (0.1, 0.1),
    }
    embedded_learning_rate = 1e-5
    pretrained_learning_rate = 1e-6  # TRL's ORPOConfig default

    loss_type: str = field(
        default="odds_ratio",
        metadata={
            "help": "The odds-ratio term, a registered orpo loss: " + ", ".join(registry.names("orpo")) + "."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        valid = registry.names("orpo")
        if self.loss_type not in valid:
            raise ConfigError(f"loss_type {self.loss_type!r} is not an orpo loss; expected one of {valid}")


def chosen_sequence_mask(batch: dict, pairs: int) -> torch.Tensor:
    """The target tokens of one forward in the batch's layout: every token of the chosen sequences but their
    first (prompt and completion, for the NLL), and the completion tokens of the rejected ones. bool."""
    completion = batch["completion_mask"].bool()
    if "sequence_index" in batch:  # padding-free: one row; a sequence's first token is never a target
        whole = (batch["sequence_index"] < pairs) & (batch["sequence_position"] > 0)
    else:
        whole = batch["attention_mask"].bool().clone()
        whole[pairs:] = False
        whole[:, 0] = False
    return whole | completion


def orpo_step_loss(model, batch, num_items, *, config: ORPOConfig, router_aux_loss_coef=0.0):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: from `dpo.collate_pairs` (2B sequences, chosen first); num_items: pairs in the whole optimizer step;
    router_aux_loss_coef: the weight of a mixture-of-experts policy's router loss (0: none). Returns (loss,
    metrics): scalars, each this micro-batch's sum over pairs divided by num_items (module docstring: names).
    """
    pairs = dpo.count_pairs(batch)
    targets = chosen_sequence_mask(batch, pairs)
    out = token_logprobs(
        model, batch, mask=targets, return_entropy=True, return_top1=True, return_mean_logit=True,
        return_router_aux_loss=router_aux_loss_coef != 0,
    )  # fmt: skip
    mask = dpo.by_sequence(batch["completion_mask"], batch).float()  # (2B, T) completion tokens
    token = dpo.by_sequence(out.logps, batch)  # (2B, T)
    _, means = sequence_logprobs(token, mask)
    chosen, rejected = means.chunk(2)
    whole = dpo.by_sequence(targets, batch)[:pairs].float()  # (B, T) prompt + completion of the chosen
    nll = cpo_losses.chosen_nll(token[:pairs], whole)
    loss, metrics = cpo_losses.orpo_loss(
        chosen, rejected, nll, beta=config.beta, loss_type=config.loss_type, num_pairs=num_items
    )
    metrics.update(dpo.token_metrics(out, batch, mask, pairs / num_items))
    if router_aux_loss_coef:
        loss = loss + router_aux_loss_coef * out.aux_loss * (pairs / num_items)
        metrics["aux_loss"] = out.aux_loss.detach() * (pairs / num_items)
    return loss, metrics


def train(config: ORPOConfig):
    """Run ORPO to the end; returns the run (its output_dir holds metrics.jsonl, checkpoints, the model)."""
    offline = dpo.start_offline(config, "orpo", functools.partial(dpo.load_preference_data, command="orpo"))
    step_loss = functools.partial(orpo_step_loss, config=config, router_aux_loss_coef=offline.aux_coef)
    collate_fn = dpo.pair_collator(config, offline.tokenizer, offline.model)
    return dpo.fit_offline(offline, config, collate_fn, step_loss, count_fn=dpo.count_pairs)
