"""Process reward model (PRM): classify every step of a solution as right or wrong.

    1. model and tokenizer: a token-classification model with two outputs (class 1: the step is right);
       a causal-LM checkpoint gets its architecture's token-classification head, freshly initialised by
       transformers (the lm_head is left out); with no model named, the embedded task's step-by-step
       solver (`embedded_start_model`, a tiny causal LM); dropout off
    2. data: TRL's stepwise-supervision format (`prompt`, `completions` = the steps, `labels` = one bool per
       step), checked, then tokenized as earlier TRL releases' PRMTrainer did (`posttrain.data.stepwise`):
       prompt + each step followed by `step_separator`, each step's label on its separator's last token
    3. for each optimizer step: one forward over the padded batch -> cross-entropy at the labelled tokens
       only, averaged over the step's labelled steps (`posttrain.losses.prm`) -> step

Metrics: loss, accuracy (share of labelled steps classified right, TRL's `compute_accuracy`),
solution_accuracy (share of rows whose every labelled step is classified right), num_tokens, learning_rate,
grad_norm; eval_ versions on the held-out rows, which keep every step's label even with
train_on_last_step_only (as TRL's do). eval_ metrics are exact over the held-out set. In training,
solution_accuracy is each micro-batch's row mean weighted by its share of the step's labelled steps: exact
with one micro-batch per step and process (the embedded default), a close estimate otherwise.

The saved model is a plain `...ForTokenClassification` folder; its config also records the
`step_separator` it was trained with (`prm_step_separator`), which the scorer reads.

The scorer (`process_reward`) turns a trained PRM into a reward function for GRPO / RLOO with the
reward-function calling convention of `posttrain.rl.rewards`: each completion is split into steps at
`step_separator` (pieces that are empty or whitespace only are dropped), the model reads prompt + steps
tokenized exactly as in training, and the per-step probabilities of "right" are aggregated by `min`
(the weakest step, Math-Shepherd's solution score, arXiv:2312.08935), `prod` (the chance that every step
is right, Lightman et al.'s, arXiv:2305.20050) or `last` (the final step's). A completion with no step scores
0. On the command line: `posttrain grpo --process_reward_model_name_or_path runs/prm
--process_reward_aggregation min` (RLOO likewise); in code, `process_reward("runs/prm")` is a reward function.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
from dataclasses import dataclass, field

import torch

from posttrain.cache import cache_dir
from posttrain.data import embedded, formats, loading, stepwise
from posttrain.losses import registry
from posttrain.losses.prm import IGNORE_INDEX, step_logits
from posttrain.rl import distributed, lean, loop, lora, sft
from posttrain.rl.config import ConfigError, TrainConfig, fill_run_defaults
from posttrain.rl.models import NOT_QUANTIZABLE, disable_dropout, load_checked, load_tokenizer

AGGREGATIONS = ("min", "prod", "last")
LABEL_NAMES = {0: "wrong", 1: "right"}

# Defaults that depend on the run. With no model named, the PRM starts from a tiny causal LM that solves the
# embedded task step by step (`embedded_start_model`: 800 SFT steps on the right solutions, trained once and
# cached), so that it only has to compare each written result with the sum that model computes. From random
# weights it must learn the addition table from one bit per step, and the a+b SFT model (`sft.embedded_sft_model`)
# gets only 6% of the steps' sums right inside the longer context: from either, held-out step accuracy
# stayed at 0.75-0.83 after 600-1200 steps (lr 3e-4 to 2e-3; measured while the task still kept the
# steps after a mistake, see `embedded.stepwise_rows`). The start model never sees a held-out step pair (it
# learns from the train split only), yet it writes their sums too (token accuracy 0.998 on the test split's
# right solutions). The PRM then learns the comparison suddenly, after 1 to 5 epochs depending on the seed;
# a long warmup (200 steps) brings that earlier: 4 epochs of 139 steps get, with seeds 42 / 1 / 7, 0.995 /
# 0.985 / 0.979 of all test steps and 0.992 / 0.966 / 0.954 of those on held-out pairs right, where the
# former default (7 epochs, warmup 50: 973 steps) got 0.997 / 0.975 / 0.983 and 0.996 / 0.944 / 0.960.
# From a start model trained with the output layer's folds in C (kernels/native.py: other float rounding, an
# equally good solver) 4 epochs fell short, seeds 42 / 1: 0.933 / 0.928 and 0.846 / 0.848, and 5 epochs (695
# steps, the default since) got, seeds 42 / 1 / 7, 0.983 / 0.954 / 0.986 and 0.964 / 0.904 / 0.974.
# Measured (script outside the repo, OMP_NUM_THREADS=1, held-out accuracy all steps / held-out-pair steps):
#   start model (800 SFT steps of 64 rows, lr 1e-3): test token accuracy 0.998; cheaper ones did worse as
#   start models: 400 steps of 64 (0.977: PRM 0.85 / 0.78 after 4 epochs), 300 of 64 at lr 2e-3 (0.887),
#   800 of 16 (0.975), 600 of 32 (0.982), and 800 of 32 (0.998, yet PRM 0.94 / 0.86 after the former
#   default's 7 epochs with seed 42, 0.95 / 0.88 with seed 1; 0.88 / 0.80 after 3 epochs).
#   from the 800x64 start model, seed 42 unless said: 3 epochs lr 1e-3 warmup 20: 0.78 / 0.66; 2 epochs lr
#   5e-4 warmup 30: 0.86 / 0.82; 3 epochs lr 1.5e-4: 0.95 / 0.91; 3 epochs lr 3e-4 warmup 50: 0.99 / 0.99,
#   but seed 1 0.82 / 0.69; batch 32, 3 epochs: 0.975 / 0.946; batch 16, 3 epochs warmup 100: seed 1 0.95 /
#   0.88, seed 7 0.82 / 0.70; 4 epochs lr 1.5e-4 warmup 50: seed 1 0.95 / 0.90; 3 epochs warmup 200: seed 1
#   0.95 / 0.92, seed 7 0.98 / 0.96 (too little margin over 0.9 for seed 1).
EMBEDDED_SFT_OPTIONS = {
    "learning_rate": 1e-3,
    "max_steps": 800,
    "per_device_train_batch_size": 64,
    "warmup_steps": 20,
}
EMBEDDED_MODEL_LEARNING_RATE = 3e-4
PRETRAINED_LEARNING_RATE = 1e-5  # TRL's PRMConfig default
#                              embedded task     any other data (TRL's defaults)
RUN_DEFAULTS = {
    "per_device_train_batch_size": (64, 8),
    "num_train_epochs": (5.0, 3.0),
    "warmup_steps": (200, 0),
}


@dataclass
class PRMConfig(TrainConfig):
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local path or hub id of a causal LM or token-classification model; none: the tiny "
            "causal LM that solves the embedded task step by step (trained once, cached in $POSTTRAIN_CACHE, "
            "default ~/.cache/posttrain)."
        },
    )
    # Redeclared with a `None` default: filled from RUN_DEFAULTS, so an explicit value always wins.
    per_device_train_batch_size: int | None = field(
        default=None,
        metadata={"help": "Rows per micro-batch per process; none: 64 on the embedded task, else 8."},
    )
    num_train_epochs: float | None = field(
        default=None,
        metadata={"help": "Passes over the train set (unless max_steps); none: 5 embedded, else 3."},
    )
    warmup_steps: int | None = field(
        default=None,
        metadata={"help": "Optimizer steps of linear warmup from 0; none: 200 embedded, else 0."},
    )
    step_separator: str = field(
        default="\n",
        metadata={"help": "Text put after every step; a step's label sits on its last token (TRL's name)."},
    )
    max_length: int | None = field(
        default=1024,
        metadata={
            "help": "Keep the first this many tokens of prompt + steps (later steps lose their label)."
        },
    )
    max_prompt_length: int | None = field(
        default=512, metadata={"help": "Keep the last this many tokens of the prompt; none: all."}
    )
    max_completion_length: int | None = field(
        default=None,
        metadata={"help": "Keep the first this many tokens of the steps (with separators); none: all."},
    )
    train_on_last_step_only: bool = field(
        default=False,
        metadata={"help": "Train on the last step's label only (held-out rows keep every label)."},
    )
    disable_dropout: bool = field(default=True, metadata={"help": "Set every dropout probability to 0."})
    loss_type: str = field(
        default="cross_entropy",
        metadata={"help": "Per-step loss: " + ", ".join(registry.names("prm")) + "."},
    )

    def __post_init__(self):
        fill_run_defaults(
            self,
            RUN_DEFAULTS,
            embedded_learning_rate=EMBEDDED_MODEL_LEARNING_RATE,
            pretrained_learning_rate=PRETRAINED_LEARNING_RATE,
        )
        super().__post_init__()
        if self.loss_type not in registry.names("prm"):
            raise ConfigError(
                f"loss_type={self.loss_type!r} is not a PRM loss; expected one of {registry.names('prm')}"
            )
        if not self.step_separator:
            raise ConfigError("step_separator must be a non-empty string: every step's label sits on it")
        for name in ("max_length", "max_prompt_length", "max_completion_length"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be >= 1 (or none), got {value}")


# ---------------------------------------------------------------------------------------------------------
# Model and data
# ---------------------------------------------------------------------------------------------------------


def load_prm_model(
    model_name_or_path: str | None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    quantization: dict | None = None,
):
    """An `AutoModelForTokenClassification` with two outputs (0 wrong, 1 right) in `dtype`.

    A causal-LM checkpoint gets its architecture's token-classification head, freshly initialised by
    transformers under `seed`; None: the embedded tiny model's architecture with random weights.
    `quantization`: `lora.quantization`'s from_pretrained options (QLoRA), or None.
    """
    from transformers import AutoModelForTokenClassification

    labels = {"num_labels": 2, "id2label": LABEL_NAMES, "label2id": {v: k for k, v in LABEL_NAMES.items()}}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_name_or_path is None:
            if quantization:
                raise ValueError(NOT_QUANTIZABLE)
            config = embedded.tiny_model_config(**labels)
            return AutoModelForTokenClassification.from_config(config, dtype=dtype)
        try:
            return load_checked(
                AutoModelForTokenClassification.from_pretrained,
                model_name_or_path,
                "model",
                dtype=dtype,
                **labels,
                **(quantization or {}),
            )
        except ValueError as err:
            if "Unrecognized configuration class" not in str(err):
                raise
            raise _no_token_classification(model_name_or_path) from None


def _no_token_classification(model_name_or_path: str) -> ValueError:
    return ValueError(
        f"model_name_or_path={model_name_or_path!r}: its architecture has no token-classification model "
        "in transformers (AutoModelForTokenClassification), so it cannot be a process reward model"
    )


def check_token_classification(model_name_or_path: str) -> None:
    """Raise before any work unless the checkpoint's architecture has a token-classification model."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES

    config = load_checked(AutoConfig.from_pretrained, model_name_or_path, "model config")
    if config.model_type not in MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES:
        raise _no_token_classification(model_name_or_path)


def load_stepwise_data(config: PRMConfig, tokenizer):
    """Tokenized train and eval rows (eval may be None) and, per split, the dropped-row counts."""
    if config.dataset_name is None:
        from datasets import Dataset

        train, evaluation = (Dataset.from_list(embedded.stepwise_rows(s)) for s in ("train", "test"))
    else:
        train, evaluation = loading.config_splits(config)
    out, info = [], {}
    for split, dataset in (("train", train), ("eval", evaluation)):
        if dataset is None:
            out.append(None)
            continue
        formats.check_format(dataset, ("stepwise_supervision",), "prm")
        rows, info[split] = stepwise.tokenize_stepwise(
            dataset,
            tokenizer,
            step_separator=config.step_separator,
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            max_completion_length=config.max_completion_length,
            train_on_last_step_only=config.train_on_last_step_only,
            is_eval=split == "eval",
        )
        out.append(rows)
    return out[0], out[1], info


def collate_steps(rows, pad_token_id: int) -> dict:
    """B tokenized rows -> input_ids, attention_mask, labels (B, T), right-padded (labels with -100)."""
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    B, T = len(rows), max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        labels[b, :n] = torch.tensor(row["labels"], dtype=torch.long)
        attention_mask[b, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def count_steps(batch) -> torch.Tensor:
    """Labelled steps in a batch: the unit the PRM's loss is averaged over."""
    return (batch["labels"] != IGNORE_INDEX).sum()


# ---------------------------------------------------------------------------------------------------------
# Loss and metrics
# ---------------------------------------------------------------------------------------------------------


def step_outcomes(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(correct (N,) bool per labelled step, solved (B,) bool per row: every labelled step correct).

    logits (B, T, 2), labels (B, T) with -100 where unlabelled; a row without a label counts as solved."""
    z, y = step_logits(logits, labels)
    correct = z.argmax(-1) == y  # (N,)
    wrong = torch.zeros(labels.shape, dtype=torch.long, device=labels.device)
    wrong[labels != IGNORE_INDEX] = (~correct).long()
    return correct, wrong.sum(-1) == 0


def prm_step_loss(model, batch, num_items, *, loss_type: str = "cross_entropy"):
    """One micro-batch's share of the step's loss, and its metrics.

    batch: input_ids, attention_mask, labels (B, T); num_items: labelled steps in the whole optimizer step.
    Returns (loss, {"accuracy", "solution_accuracy"}): the loss and accuracy are sums over this micro-batch's
    labelled steps divided by num_items; solution_accuracy is its row mean times its share of num_items.
    """
    # lighter MLPs, the norms and rotary embedding in one pass (rl/lean.py): the same numbers
    with lean.layers(model):
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits  # (B, T, 2)
    loss = registry.get("prm", loss_type)(logits, batch["labels"], num_items)
    with torch.no_grad():
        correct, solved = step_outcomes(logits, batch["labels"])
        metrics = {
            "accuracy": correct.sum() / num_items,
            "solution_accuracy": solved.float().mean() * correct.numel() / num_items,
        }
    return loss, metrics


@torch.no_grad()
def evaluate_rows(model, rows, *, pad_token_id: int, batch_size: int = 64, loss_type: str = "cross_entropy"):
    """Exact held-out metrics of `rows` (tokenized): {"loss", "accuracy", "solution_accuracy"}.

    The rows are split into contiguous shards over the processes (each evaluates its own, in batches of
    `batch_size`) and the sums are added up over them; call it on every process."""
    rank, world_size, _ = distributed.env_world()
    device = next(model.parameters()).device
    n = len(rows)
    lo, hi = n * rank // world_size, n * (rank + 1) // world_size
    sums = torch.zeros(4, dtype=torch.float64, device=device)  # loss, right steps, steps, solved rows
    for start in range(lo, hi, batch_size):
        batch = loop.to_device(
            collate_steps(
                loop.take_rows(rows, list(range(start, min(start + batch_size, hi)))), pad_token_id
            ),
            device,
        )
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
        correct, solved = step_outcomes(logits, batch["labels"])
        loss_sum = registry.get("prm", loss_type)(logits, batch["labels"], 1)
        counts = [loss_sum, correct.sum(), torch.tensor(correct.numel(), device=device), solved.sum()]
        sums += torch.stack([c.double() for c in counts])
    loss, right, steps, solved = distributed.all_reduce_sum(sums).tolist()
    return {"loss": loss / max(steps, 1), "accuracy": right / max(steps, 1), "solution_accuracy": solved / n}


# ---------------------------------------------------------------------------------------------------------
# The embedded start model
# ---------------------------------------------------------------------------------------------------------


def embedded_start_model() -> str:
    """The folder of a causal LM that writes the embedded task's right solutions step by step: `posttrain sft`
    on {"prompt", "completion": the steps, each followed by "\n"} of the stepwise split's right solutions,
    EMBEDDED_SFT_STEPS steps from random weights (held-out token accuracy ~1.0). Trained once and cached like
    the embedded SFT model (`sft.embedded_sft_model`, whose locking and cache it uses); its data is written
    beside it in $POSTTRAIN_CACHE under a hash of the rows, so a change of the task makes a new model.
    """
    cache = cache_dir()
    splits = {
        split: [
            {"prompt": r["prompt"], "completion": "".join(s + "\n" for s in r["completions"])}
            for r in embedded.stepwise_rows(split)
            if all(r["labels"])
        ]
        for split in ("train", "test")
    }
    text = {split: "\n".join(json.dumps(r) for r in rows) for split, rows in splits.items()}
    data = cache / f"embedded-stepwise-solutions-{hashlib.sha256(json.dumps(text).encode()).hexdigest()[:12]}"
    if not data.is_dir():
        tmp = data.with_name(f"{data.name}.tmp-{os.getpid()}")
        tmp.mkdir(parents=True, exist_ok=True)
        for split, content in text.items():
            (tmp / f"{split}.jsonl").write_text(content)
        try:
            tmp.rename(data)
        except OSError:  # another process wrote the same rows first
            for f in tmp.iterdir():
                f.unlink()
            tmp.rmdir()
    announce = lambda _: print(  # noqa: E731  (sft's own message names its a+b model)
        "[prm] no model named: training the step-by-step solver of the embedded task that the PRM starts from "
        "(SFT on the task's right solutions; once, then cached)"
    )
    return sft.embedded_sft_model(announce, dataset_name=str(data), **EMBEDDED_SFT_OPTIONS)


# ---------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------


def train(config: PRMConfig):
    """Train the PRM to the end; returns the run (its output_dir holds metrics.jsonl, the model)."""
    # Data first: a bad dataset or option stops here, before the run folder is written.
    tokenizer = load_tokenizer(config.model_name_or_path)
    train_rows, eval_rows, info = load_stepwise_data(config, tokenizer)
    loop.plan_steps(len(train_rows), config, distributed.env_world()[1])  # too few rows: stop here
    # No model named: the embedded solver (trained once and cached). The config keeps model_name_or_path
    # None, so the embedded defaults above apply to it.
    start_model = config.model_name_or_path or embedded_start_model()
    check_token_classification(start_model)  # an architecture without the head stops here too
    run = loop.start(config, command="prm")
    dropped = {f"{split}_{key}": value for split, counts in info.items() for key, value in counts.items()}
    run.log_info({"start_model": start_model, **dropped})
    model = load_prm_model(start_model, seed=config.seed, quantization=lora.quantization(run))
    model.config.prm_step_separator = config.step_separator  # saved with the model, read by the scorer
    if config.disable_dropout:
        disable_dropout(model)

    eval_fn = None
    if eval_rows is not None:
        eval_fn = functools.partial(
            evaluate_rows,
            rows=eval_rows,
            pad_token_id=tokenizer.pad_token_id,
            batch_size=config.per_device_eval_batch_size,
            loss_type=config.loss_type,
        )
    loop.fit(
        run,
        model,
        tokenizer,
        train_rows,
        functools.partial(collate_steps, pad_token_id=tokenizer.pad_token_id),
        functools.partial(prm_step_loss, loss_type=config.loss_type),
        count_fn=count_steps,
        eval_fn=eval_fn,
    )
    return run


# ---------------------------------------------------------------------------------------------------------
# The scorer: a trained PRM as a reward function
# ---------------------------------------------------------------------------------------------------------


def split_steps(completion: str, step_separator: str) -> list[str]:
    """The steps of a generated completion: its pieces between separators, empty (or blank) pieces dropped."""
    return [piece for piece in completion.split(step_separator) if piece.strip()]


def aggregate(probabilities: list[float], aggregation: str) -> float:
    """One reward from a completion's per-step probabilities of "right"; 0.0 when it has no step."""
    if not probabilities:
        return 0.0
    if aggregation == "min":
        return min(probabilities)
    if aggregation == "prod":
        return math.prod(probabilities)
    return probabilities[-1]


@torch.no_grad()
def step_probabilities(
    model, tokenizer, prompts: list[str], steps: list[list[str]], step_separator: str, *, batch_size: int = 64
) -> list[list[float]]:
    """P(step is right) for every step of every row: the softmax of the model's two logits at the last token
    of each step's separator, on input tokenized as in training (no truncation). Eval mode, batches of
    `batch_size` rows, right-padded (a row's scores do not depend on its batch)."""
    model.eval()
    device = next(model.parameters()).device
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    sep_ids = stepwise.separator_ids(tokenizer, step_separator)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = []
    for start in range(0, len(prompts), batch_size):
        encoded = stepwise.encode_steps(
            tokenizer, prompts[start : start + batch_size], steps[start : start + batch_size], sep_ids
        )
        rows, ends = [], []
        for i, (prompt_ids, completion_ids, step_ends) in enumerate(encoded):
            ids = prompt_ids + completion_ids
            if limit is not None and len(ids) > limit:
                raise ValueError(
                    f"the batch's row {start + i}: prompt + steps is {len(ids)} tokens, longer than the process "
                    f"reward model's context (max_position_embeddings={limit})"
                )
            rows.append({"input_ids": ids or [pad], "labels": [IGNORE_INDEX] * max(len(ids), 1)})
            ends.append([len(prompt_ids) + e for e in step_ends])
        batch = loop.to_device(collate_steps(rows, pad), device)
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]
        ).logits  # (B, T, 2)
        right = logits.float().softmax(-1)[..., 1].cpu()  # (B, T)
        out.extend([right[b, e].tolist() for e in row_ends] for b, row_ends in enumerate(ends))
    return out


def _prm_scores(model, tokenizer, step_separator, aggregation, batch_size, prompts, completions):
    """One reward per completion: its steps' probabilities of "right", aggregated."""
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise ValueError(
                f"the batch's row {i}: a process reward model scores plain-text prompts and completions (as it "
                f"was trained), got {type(prompt).__name__} and {type(completion).__name__}"
            )
    steps = [split_steps(c, step_separator) for c in completions]
    probabilities = step_probabilities(
        model, tokenizer, list(prompts), steps, step_separator, batch_size=batch_size
    )
    return [aggregate(p, aggregation) for p in probabilities]


def process_reward(
    model_name_or_path: str,
    *,
    aggregation: str = "min",
    step_separator: str | None = None,
    device=None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
):
    """A trained PRM (and its own tokenizer) as a reward function `fn(prompts, completions, **kwargs) ->
    list[float]`, named `<folder name>_<aggregation>` (as TRL names a reward model by its folder).

    aggregation: min, prod or last (see the module docstring). step_separator: where completions are split
    into steps; none: the one the model was trained with (its config's `prm_step_separator`), else "\\n".
    Raises ConfigError for an unknown aggregation, and for a model that is not a trained
    `...ForTokenClassification` with two labels (its head would be random or of another task).
    """
    option = f"process reward model {model_name_or_path!r}"
    if aggregation not in AGGREGATIONS:
        raise ConfigError(f"aggregation={aggregation!r}: expected one of {', '.join(AGGREGATIONS)}")
    try:
        tokenizer = load_tokenizer(model_name_or_path)
        model = load_prm_model(model_name_or_path, dtype=dtype)
    except (ValueError, OSError) as e:
        raise ConfigError(f"{option}: {e}") from e
    architectures = model.config.architectures or []
    if not any(a.endswith("ForTokenClassification") for a in architectures):
        raise ConfigError(
            f"{option}: not a trained process reward model (its config's architectures are {architectures}, not "
            "a ...ForTokenClassification): its classification head would be random"
        )
    if step_separator is None:
        step_separator = getattr(model.config, "prm_step_separator", "\n")
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)

    def reward(prompts, completions, **kwargs):
        return _prm_scores(model, tokenizer, step_separator, aggregation, batch_size, prompts, completions)

    reward.__name__ = f"{model.config._name_or_path.rstrip('/').split('/')[-1]}_{aggregation}"
    return reward
