"""Supervised fine-tuning: maximise log p(completion | prompt) on demonstration data.

    1. model and tokenizer (the embedded tiny model when none is named)
    2. data: load, check the format, tokenize with completion-only / assistant-only masks, pack or pad
    3. for each optimizer step: per-token log-probs of the target tokens -> masked NLL -> step

Metrics (TRL's names): loss, mean_token_accuracy, entropy, num_tokens, learning_rate, grad_norm.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field

import torch

from posttrain.cache import CACHE_ENV, cache_dir  # noqa: F401  (sft.CACHE_ENV: the tests and callers name it so)
from posttrain.data import collate, embedded, loading, tokenization
from posttrain.losses import registry
from posttrain.rl import distributed, loop, lora, models
from posttrain.rl.config import ConfigError, TrainConfig, config_dict, fill_run_defaults, save_config
from posttrain.rl.logprobs import token_logprobs
from posttrain.rl.models import load_causal_lm, load_tokenizer

# Defaults that depend on the run. The embedded model starts from random weights, so it needs a
# pre-training-sized learning rate; the embedded task's rows are ~8 tokens, so large batches, many
# epochs and short packed rows cost little.
# 600 steps, seeds 42/1/7: held-out exact match 0.87/0.70/0.73 at 1e-3, 0.18/0.08/0.13 at 3e-3.
EMBEDDED_MODEL_LEARNING_RATE = 1e-3
PRETRAINED_LEARNING_RATE = 2e-5  # TRL's SFT default
#                              embedded task     any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (32, 8),
    "num_train_epochs": (64.0, 3.0),
    "warmup_steps": (20, 0),
    "max_length": (64, 1024),
}


@dataclass
class SFTConfig(TrainConfig):
    # Redeclared with a `None` default: filled from RUN_DEFAULTS, so an explicit value always wins.
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per micro-batch per process; none: 32 on the embedded task, else 8."},
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the train set (unless max_steps); none: 64 embedded, else 3."},
    )
    warmup_steps: int | None = field(
        default=None, metadata={"help": "Optimizer steps of linear warmup from 0; none: 20 embedded, else 0."}
    )
    max_length: int | None = field(
        default=-1,
        metadata={
            "help": "Truncate tokenized rows to this many tokens (packing: the bin size); -1: 64 embedded, "
            "else 1024; none: no truncation."
        },
    )
    packing: bool = field(
        default=False, metadata={"help": "Pack rows into max_length bins (best-fit decreasing), no padding."}
    )
    padding_free: bool = field(
        default=False, metadata={"help": "Concatenate a batch's rows into one row without padding."}
    )
    completion_only_loss: bool | None = field(
        default=None,
        metadata={
            "help": "Loss on completion tokens only (prompt-completion data); None: yes when there is a prompt."
        },
    )
    assistant_only_loss: bool = field(
        default=False,
        metadata={
            "help": "Loss on assistant turns only (conversational data; the template's generation markers, or any template that renders prefix-consistently)."
        },
    )
    dataset_text_field: str = field(
        default="text", metadata={"help": "Column holding the text of language-modelling data."}
    )
    overlong_prompt: str = field(
        default="drop",
        metadata={"help": "A prompt longer than max_length: 'drop' the row (and count it) or 'error'."},
    )
    loss_type: str = field(
        default="nll", metadata={"help": "SFT loss: " + ", ".join(registry.names("sft")) + "."}
    )

    def __post_init__(self):
        fill_run_defaults(
            self,
            RUN_DEFAULTS,
            embedded_learning_rate=EMBEDDED_MODEL_LEARNING_RATE,
            pretrained_learning_rate=PRETRAINED_LEARNING_RATE,
        )
        super().__post_init__()
        if self.loss_type not in registry.names("sft"):
            raise ConfigError(
                f"loss_type={self.loss_type!r} is not an SFT loss; expected one of {registry.names('sft')}"
            )
        if self.max_length is not None and self.max_length < 2:
            raise ConfigError(f"max_length must be >= 2 (or none), got {self.max_length}")
        if self.packing and self.max_length is None:
            raise ConfigError("packing=true needs a max_length: it is the size of the packed rows")
        if self.overlong_prompt not in ("drop", "error"):
            raise ConfigError(f"overlong_prompt must be 'drop' or 'error', got {self.overlong_prompt!r}")
        if (self.load_in_4bit or self.load_in_8bit) and self.model_name_or_path is None:
            raise ConfigError(models.NOT_QUANTIZABLE)


def load_sft_data(config: SFTConfig, tokenizer):
    """Tokenized train and eval rows (eval may be None) and the dropped-row counts."""
    if config.dataset_name is None:
        train, evaluation = (
            embedded.dataset("prompt_completion", "train"),
            embedded.dataset("prompt_completion", "test"),
        )
    else:
        train, evaluation = loading.config_splits(config)
    tokenize = functools.partial(
        tokenization.tokenize_sft,
        tokenizer=tokenizer,
        max_length=config.max_length,
        completion_only_loss=config.completion_only_loss,
        assistant_only_loss=config.assistant_only_loss,
        overlong_prompt=config.overlong_prompt,
        dataset_text_field=config.dataset_text_field,
    )
    out, info = [], {}
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is None:
            out.append(None)
            continue
        rows, info[split] = tokenize(dataset)
        if config.packing:
            rows = collate.pack(rows, config.max_length)
        out.append(rows)
    return out[0], out[1], info


def make_collate(config: SFTConfig, pad_token_id: int):
    if config.packing:
        return collate.packed_collate
    if config.padding_free:
        return collate.padding_free_collate
    return functools.partial(collate.pad_collate, pad_token_id=pad_token_id)


def sft_step_loss(model, batch, num_items, *, loss_type: str = "nll"):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: input_ids, completion_mask (B, T) [+ attention_mask, position_ids]; num_items: target tokens
    in the whole optimizer step. Returns (loss, {"mean_token_accuracy", "entropy"}): scalars, each a
    sum over this micro-batch's target tokens divided by num_items, so sums over micro-batches and
    ranks are the step's token means.
    """
    mask = batch["completion_mask"]
    out = token_logprobs(model, batch, return_entropy=True, return_top1=True)
    loss = registry.get("sft", loss_type)(out.logps, mask, num_items)
    # token_logprobs already zeroes both outside the mask
    metrics = {
        "mean_token_accuracy": out.is_top1.sum() / num_items,
        "entropy": out.entropy.detach().sum() / num_items,
    }
    return loss, metrics


def count_targets(batch) -> torch.Tensor:
    """Target tokens in a batch: the unit SFT's loss is averaged over."""
    return batch["completion_mask"].sum()


def train(config: SFTConfig):
    """Run SFT to the end; returns the run (its output_dir holds metrics.jsonl, checkpoints, the model)."""
    # Data first: a bad dataset or option stops here, before the run folder is written.
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows, info = load_sft_data(config, tokenizer)
    loop.plan_steps(len(train_rows), config, distributed.env_world()[1])  # too few rows: stop here
    run = loop.start(config, command="sft")
    run.log_info({f"{split}_{key}": value for split, counts in info.items() for key, value in counts.items()})
    model = load_causal_lm(config.model_name_or_path, seed=config.seed, quantization=lora.quantization(run))

    eval_fn = None
    if config.dataset_name is None:
        # The embedded task has checkable answers: report held-out exact-match accuracy too.
        eval_fn = functools.partial(embedded.exact_match, tokenizer=tokenizer, split="test")
    loop.fit(
        run,
        model,
        tokenizer,
        train_rows,
        collate.for_attention(
            make_collate(config, tokenizer.pad_token_id), model.config._attn_implementation
        ),
        functools.partial(sft_step_loss, loss_type=config.loss_type),
        count_fn=count_targets,
        eval_rows=eval_rows,
        eval_fn=eval_fn,
    )
    return run


# ---------------------------------------------------------------------------------------------------------
# The embedded SFT models: where the later loops start when no model is named
# ---------------------------------------------------------------------------------------------------------


def embedded_sft_config(output_dir, **overrides) -> SFTConfig:
    """What `posttrain sft` with no arguments (and `overrides`) trains, writing only its final model into
    `output_dir` (no checkpoints, progress bar or TensorBoard: they do not change the weights)."""
    return SFTConfig(
        output_dir=str(output_dir), save_steps=0, disable_tqdm=True, report_to="none", **overrides
    )


def embedded_sft_key(**overrides) -> str:
    """12 hex digits naming the embedded SFT model: a hash of all that fixes it (the posttrain version,
    SFTConfig's defaults, the tiny model's config, the tokenizer's vocabulary and chat template, the
    task's training rows; `overrides` of SFTConfig's options), so that a cached model made by other code or
    other defaults is never reused."""
    import posttrain

    tokenizer = embedded.build_tokenizer()
    what = {
        "version": posttrain.__version__,
        "defaults": config_dict(SFTConfig(**overrides)),
        "model": embedded.tiny_model_config().to_dict(),
        "vocab": tokenizer.get_vocab(),
        "chat_template": tokenizer.chat_template,
        "rows": embedded.rows("prompt_completion", "train"),
    }
    return hashlib.sha256(json.dumps(what, sort_keys=True, default=str).encode()).hexdigest()[:12]


def embedded_sft_model(log=None, **overrides) -> str:
    """The folder of the model and tokenizer that `posttrain sft` trains with its defaults (the embedded
    task) and `overrides` (SFTConfig options, e.g. a shorter run as the online loops' start): the cached
    one, or trained now (~30 s on a CPU) and cached. `log(text)` (default print) says so.

    The cache is $POSTTRAIN_CACHE/embedded-sft-<embedded_sft_key()>. It is trained into a temporary folder
    beside it and renamed when complete, under an exclusive lock on a file beside it: concurrent processes
    train it once (the others wait, then reuse it), and a half-written folder (a killed run) is never
    reused but removed by the next process to train. Under torchrun (WORLD_SIZE > 1) it is not trained:
    the processes cannot train one model before their process group exists, so a missing cache is an
    error that says how to make it with one process.
    """
    import fcntl

    log = print if log is None else log
    cache = cache_dir()
    final = cache / f"embedded-sft-{embedded_sft_key(**overrides)}"
    if final.is_dir():  # only a complete folder ever gets this name
        return str(final)
    if distributed.env_world()[1] > 1:
        raise ConfigError(
            f"no model named, and the embedded SFT model it defaults to is not cached ({final}); under "
            'torchrun it is not trained: make it first with one process, `python -c "from posttrain.rl.sft '
            'import embedded_sft_model; embedded_sft_model()"` (same POSTTRAIN_CACHE), or pass '
            "--model_name_or_path"
        )
    cache.mkdir(parents=True, exist_ok=True)
    with open(cache / f"{final.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also if the process dies
        if final.is_dir():  # another process trained it while this one waited
            return str(final)
        for stale in cache.glob(f"{final.name}.tmp-*"):  # the lock holder alone writes these: killed runs
            shutil.rmtree(stale)
        tmp = cache / f"{final.name}.tmp-{os.getpid()}"
        log(
            f"no model named: training the embedded SFT model first (posttrain sft defaults, ~30 s) into {final}"
        )
        config = embedded_sft_config(tmp, **overrides)
        train(config)
        save_config(dataclasses.replace(config, output_dir=str(final)), tmp / "config.yaml")  # where it lives
        tmp.rename(final)
    return str(final)


def embedded_start() -> str:
    """Where the loops that need room to improve start on the embedded task (DPO and the online loops;
    `posttrain rm`, KTO, CPO and ORPO start from `embedded_sft_model()`): a 16-epoch `posttrain sft` run
    (cached; 44.6 % held-out greedy exact match, 24 % of sampled answers right)."""
    return embedded_sft_model(num_train_epochs=EMBEDDED_START_EPOCHS)


EMBEDDED_START_EPOCHS = 16.0
