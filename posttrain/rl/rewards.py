"""Rewards for the online loops (GRPO, RLOO, PPO): reward functions, a reward model, and scoring a batch.

A reward function follows TRL 1.16's calling convention: it is called with keyword arguments only,

    fn(prompts=[...], completions=[...], completion_ids=[[...], ...], trainer_state=state,
       log_metric=f, log_extra=g, **columns) -> list of N floats (None: "not applicable to this row")

where `columns` are the dataset's other columns (`answer`, ...), one value per row. It may be `async`.
N counts completions: each prompt is already repeated `num_generations` times. Prompts and completions
are strings (standard rows) or lists of `{"role", "content"}` messages (conversational rows).

`resolve` turns `--reward_model_name_or_path` and `--reward_funcs` (built-in names or import paths) into
`Reward`s named and ordered as TRL's GRPO script does; `score` calls them on a batch and
returns an (N, F) table, NaN where a function returned None.

Where this departs from TRL 1.16 (`GRPOTrainer._calculate_rewards` and `__init__`), each time to stop on
what TRL lets through:
- a row on which every function returned None is an error; TRL logs a warning, leaves the row out of its
  group's baseline and gives it advantage 0;
- a NaN reward is an error (TRL reads it as None), an infinite one too (TRL carries it into the advantages);
- two rewards of one name, and a `log_extra` column of the wrong length or logged twice, are errors (TRL's
  metrics and completions table would mix them up);
- a reward model must be a trained `...ForSequenceClassification` (TRL loads a causal LM with a random
  score head), and a text longer than its context is an error.
Async functions run in a fresh event loop per call (`asyncio.run`), not in one loop kept alive in a thread
as TRL does: an async function that keeps a client bound to a loop between calls must create it per call.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import importlib
import inspect
import math
import numbers
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from posttrain.data import embedded
from posttrain.rl.config import ConfigError
from posttrain.rl.last_token import sequence_scores

# The keyword arguments every reward function gets besides the dataset's columns.
RESERVED = ("prompts", "completions", "completion_ids", "trainer_state", "log_metric", "log_extra")
# Columns TRL does not pass on: they arrive as `prompts` / `completions` / `completion_ids`.
DROPPED_COLUMNS = ("prompt", "completion", "completion_ids")


@dataclass
class TrainerState:
    """What reward functions get as `trainer_state` (the attributes of TRL's `TrainerState` they read)."""

    global_step: int = 0
    epoch: float = 0.0
    max_steps: int = 0


@dataclass
class Reward:
    """A named reward: `name` as TRL names it (a function's `__name__`, a reward model's folder name)."""

    name: str
    fn: Callable = field(repr=False)


@dataclass
class Scored:
    """A batch's rewards. values: (N, F) float32, NaN where a function returned None; metrics: what the
    functions passed to `log_metric` (name -> values in call order); extras: `log_extra` columns (N values)."""

    values: torch.Tensor
    metrics: dict[str, list[float]] = field(default_factory=dict)
    extras: dict[str, list] = field(default_factory=dict)


class RewardError(ValueError):
    """A reward function failed on a batch: it raised, returned the wrong thing, or no function scored a row."""


# ---------------------------------------------------------------------------------------------------------
# Built-in rewards for the embedded task (prompts "a+b=", answers decimal)
# ---------------------------------------------------------------------------------------------------------

_EMBEDDED_PROMPT = re.compile(r"\s*[0-9]+\+[0-9]+=\s*")
_NUMERAL = re.compile(r"[0-9]+")  # ASCII digits only: str.isdigit() also accepts "²"


def _text(value, what: str, row: int) -> str:
    """A standard row's string, or the content of a conversational row's last message."""
    if isinstance(value, str):
        return value
    if (
        isinstance(value, list)
        and value
        and isinstance(value[-1], dict)
        and isinstance(value[-1].get("content"), str)
    ):
        return value[-1]["content"]
    raise ValueError(
        f"the batch's row {row}: {what} is neither a string nor a list of messages with string content: {value!r}"
    )


def exact_match(prompts, completions, **kwargs) -> list[float | None]:
    """1.0 when the completion (whitespace stripped) is the sum the prompt asks for, else 0.0; None for a
    prompt that is not an embedded-task prompt: the reward does not apply there (TRL's meaning of None), so
    it can share a mixed dataset with other rewards, and a row no reward applies to is still an error."""
    out = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        prompt, completion = _text(prompt, "the prompt", i), _text(completion, "the completion", i)
        if _EMBEDDED_PROMPT.fullmatch(prompt) is None:
            out.append(None)
        else:
            out.append(1.0 if embedded.is_correct(prompt, completion) else 0.0)
    return out


def format(completions, **kwargs) -> list[float]:  # noqa: A001 (the reward's name, as users select it)
    """1.0 when the completion (whitespace stripped) is a bare decimal numeral, else 0.0."""
    return [
        1.0 if _NUMERAL.fullmatch(_text(c, "the completion", i).strip()) else 0.0
        for i, c in enumerate(completions)
    ]


BUILTIN: dict[str, Callable] = {"exact_match": exact_match, "format": format}


# ---------------------------------------------------------------------------------------------------------
# A reward model as a reward
# ---------------------------------------------------------------------------------------------------------


def reward_model_texts(tokenizer, prompts: list, completions: list, chat_template_kwargs=None) -> list[str]:
    """What the reward model reads, as TRL builds it: conversational rows through the reward model's chat
    template (prompt + completion messages, no generation prompt), standard rows concatenated."""
    if prompts and isinstance(prompts[0], list):
        return [
            tokenizer.apply_chat_template(p + c, tokenize=False, **(chat_template_kwargs or {}))
            for p, c in zip(prompts, completions, strict=True)
        ]
    return [p + c for p, c in zip(prompts, completions, strict=True)]


def reward_model_scores(model, tokenizer, texts: list[str], *, batch_size: int = 64) -> torch.Tensor:
    """(N,) float32 rewards: `logits[:, 0]` of a sequence-classification model on each text, which the model
    reads at the text's last non-padding token (its config's pad_token_id must be the tokenizer's).

    Tokenized without added special tokens and padded on the right, as TRL does; in eval mode, no grad, in
    batches of `batch_size` texts (a text's score does not depend on its batch: padding is masked out).
    """
    model.eval()
    device = next(model.parameters()).device
    limit = getattr(model.config.get_text_config(), "max_position_embeddings", None)
    scores = []
    for start in range(0, len(texts), batch_size):
        enc = tokenizer(
            texts[start : start + batch_size],
            return_tensors="pt",
            padding=True,
            padding_side="right",
            add_special_tokens=False,
        ).to(device)
        if limit is not None and enc["input_ids"].shape[1] > limit:
            lengths = enc["attention_mask"].sum(1)
            i = int((lengths > limit).nonzero()[0, 0])
            raise ValueError(
                f"the batch's row {start + i}: prompt + completion is {int(lengths[i])} tokens, longer than the reward "
                f"model's context (max_position_embeddings={limit})"
            )
        with torch.inference_mode():
            scores.append(sequence_scores(model, **enc)[:, 0].float())  # every input the tokenizer made
    return torch.cat(scores) if scores else torch.zeros(0)


def _score_with_model(model, tokenizer, batch_size, chat_template_kwargs, *, prompts, completions, **kwargs):
    """A reward model under the reward-function calling convention (the other arguments are ignored)."""
    texts = reward_model_texts(tokenizer, prompts, completions, chat_template_kwargs)
    return reward_model_scores(model, tokenizer, texts, batch_size=batch_size).tolist()


def check_reward_model(path: str, option: str = "reward_model_name_or_path") -> None:
    """Before loading: `path` has a config naming a sequence classifier with one label (its score). A causal LM
    would load with a freshly initialised score head (random rewards, silently); a classifier of several
    labels would fail to load with a message about mismatched weights. Errors name `option`."""
    from transformers import AutoConfig

    from posttrain.rl.models import load_checked

    try:
        config = load_checked(AutoConfig.from_pretrained, path, "config")
    except (ValueError, OSError) as err:  # messages start `model_name_or_path=...`: name the option instead
        message = " ".join(str(err).split())
        if message.startswith("model_name_or_path="):
            raise ConfigError(option + message.removeprefix("model_name_or_path")) from err
        raise ConfigError(f"{option}={path!r}: {message}") from err
    architectures = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ConfigError(
            f"{option}={path!r}: not a trained reward model (its config's architectures are {architectures}, not "
            "a ...ForSequenceClassification): its score head would be random"
        )
    if config.num_labels != 1:
        raise ConfigError(
            f"{option}={path!r}: its head has {config.num_labels} labels; a reward model gives one score "
            "(num_labels=1)"
        )


def reward_model_reward(
    model_name_or_path: str,
    *,
    device=None,
    dtype: torch.dtype = torch.float32,
    batch_size: int = 64,
    chat_template_kwargs: dict | None = None,
) -> Reward:
    """A trained sequence-classification model (and its own tokenizer) as a `Reward`, named as TRL names it
    (the last part of its path or hub id)."""
    from posttrain.rl.models import load_reward_model, load_tokenizer

    option = f"reward_model_name_or_path={model_name_or_path!r}"
    check_reward_model(model_name_or_path)
    try:
        tokenizer = load_tokenizer(model_name_or_path)
        model = load_reward_model(model_name_or_path, pad_token_id=tokenizer.pad_token_id, dtype=dtype)
    except (ValueError, OSError) as e:  # their messages start `model_name_or_path=...`: name this option
        message = str(e)
        message = "reward_" + message if message.startswith("model_name_or_path=") else f"{option}: {message}"
        raise ConfigError(message) from e
    if device is not None:
        model.to(device)
    model.eval().requires_grad_(False)
    name = model.config._name_or_path.rstrip("/").split("/")[-1]
    fn = functools.partial(_score_with_model, model, tokenizer, batch_size, chat_template_kwargs)
    return Reward(name, fn)


# ---------------------------------------------------------------------------------------------------------
# Resolving `--reward_funcs` / `--reward_model_name_or_path`
# ---------------------------------------------------------------------------------------------------------


def callable_name(fn: Callable) -> str:
    """TRL's name for a reward function: its `__name__` (through `functools.partial`), else its class name."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


def is_async(fn: Callable) -> bool:
    """Whether calling `fn` returns a coroutine: an `async def`, a partial of one, or an object whose
    `__call__` is one (inspect.iscoroutinefunction alone misses the last)."""
    while isinstance(fn, functools.partial):
        fn = fn.func
    return inspect.iscoroutinefunction(fn) or (callable(fn) and inspect.iscoroutinefunction(fn.__call__))


def _import(entry: str) -> Callable:
    """The callable an import path names: `package.module:function` (the function part may be dotted), or
    TRL's `package.module.function`. The working folder is searched last, as TRL's script searches it (a
    console script does not have it on sys.path)."""
    module_name, _, attr = entry.partition(":") if ":" in entry else entry.rpartition(".")
    where = f"reward_funcs: {entry!r}"
    if not module_name or not attr:
        raise ConfigError(
            f"{where} is not an import path 'package.module:function' (a reward model goes in "
            "reward_model_name_or_path)"
        )
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    try:
        obj = importlib.import_module(module_name)
    except Exception as e:  # a module may fail to import in any way
        raise ConfigError(f"{where}: module {module_name!r} does not import: {type(e).__name__}: {e}") from e
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ConfigError(
                f"{where}: {type(obj).__name__} {getattr(obj, '__name__', obj)!r} has no {part!r}"
            )
        obj = getattr(obj, part)
    if not callable(obj):
        raise ConfigError(f"{where} is a {type(obj).__name__}, not a function")
    return obj


def resolve(
    reward_funcs: list,
    *,
    reward_model_name_or_path: str | None = None,
    process_reward_model_name_or_path: str | None = None,
    process_reward_aggregation: str = "min",
    device=None,
    reward_model_batch_size: int = 64,
    chat_template_kwargs: dict | None = None,
) -> list[Reward]:
    """The rewards a run scores with, in TRL's script's order: the reward model when one is named, the process
    reward model (`rl.prm.process_reward`, its per-step probabilities aggregated by `process_reward_aggregation`)
    when one is named, then each of `reward_funcs` (a built-in name, an import path `package.module:function` or TRL's
    `package.module.function`, or a callable). Raises ConfigError for an entry that is unknown or does not
    import, for no reward at all, and for two rewards of one name (their metrics and logged columns would
    merge)."""
    rewards = []
    if reward_model_name_or_path is not None:
        rewards.append(
            reward_model_reward(
                reward_model_name_or_path,
                device=device,
                batch_size=reward_model_batch_size,
                chat_template_kwargs=chat_template_kwargs,
            )
        )
    if process_reward_model_name_or_path is not None:
        from posttrain.rl import prm  # token-classification models: imported only when one is named

        fn = prm.process_reward(
            process_reward_model_name_or_path,
            aggregation=process_reward_aggregation,
            device=device,
            batch_size=reward_model_batch_size,
        )
        rewards.append(Reward(callable_name(fn), fn))
    for entry in reward_funcs:
        if callable(entry):
            fn = entry
        elif not isinstance(entry, str):
            raise ConfigError(f"reward_funcs: {entry!r} is neither a name, an import path nor a callable")
        elif entry.strip() in BUILTIN:
            fn = BUILTIN[entry.strip()]
        elif ":" in entry or "." in entry:
            fn = _import(entry.strip())
        else:
            raise ConfigError(
                f"reward_funcs: unknown reward {entry!r}; built-ins: {', '.join(BUILTIN)}, or an import path "
                "'package.module:function' (a reward model goes in reward_model_name_or_path)"
            )
        rewards.append(Reward(callable_name(fn), fn))
    if not rewards:
        raise ConfigError(
            "reward_funcs is empty and no reward_model_name_or_path is set: nothing to reward with"
        )
    names = [r.name for r in rewards]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"reward_funcs: two rewards are named {name!r}; their metrics would merge")
    return rewards


# ---------------------------------------------------------------------------------------------------------
# Scoring a batch
# ---------------------------------------------------------------------------------------------------------


def _short(value, limit: int = 200) -> str:
    """repr(value), cut to `limit` characters: an error message stays one readable line."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


def _checked(name: str, output, n: int, row_offset: int) -> list[float]:
    """A function's output as N floats (None -> NaN), or a RewardError naming the function and the row."""
    if getattr(output, "ndim", None) == 1 and hasattr(output, "tolist"):  # a torch or numpy vector
        output = output.tolist()
    if not isinstance(output, list | tuple):
        raise RewardError(
            f"reward function {name!r} returned a {type(output).__name__}; expected a list of {n} floats"
        )
    if len(output) != n:
        raise RewardError(
            f"reward function {name!r} returned {len(output)} rewards for {n} rows "
            f"({row_offset}..{row_offset + n - 1}); expected one per completion"
        )
    values = []
    for i, v in enumerate(output):
        if v is None:
            values.append(math.nan)
            continue
        if isinstance(v, torch.Tensor) and v.numel() == 1:
            v = v.item()
        if not isinstance(v, numbers.Real):
            raise RewardError(
                f"reward function {name!r} returned {_short(v)} ({type(v).__name__}) for row {row_offset + i}; "
                "expected a float or None"
            )
        if not math.isfinite(v):
            raise RewardError(
                f"reward function {name!r} returned {v} for row {row_offset + i}; expected a finite float"
            )
        values.append(float(v))
    return values


def score(
    rewards: list[Reward],
    *,
    prompts: list,
    completions: list,
    completion_ids: list[list[int]],
    columns: dict[str, list],
    trainer_state: TrainerState,
    row_offset: int = 0,
) -> Scored:
    """Every reward on N rows -> Scored(values (N, F) float32, metrics, extras).

    Each function gets prompts=, completions=, completion_ids=, trainer_state=, log_metric=, log_extra= and
    the columns as keyword arguments (without `prompt` / `completion` / `completion_ids`, as TRL). Sync
    functions run first, in order, each output checked before the next runs; then the async ones, awaited
    together in one event loop. `row_offset`: index of the first row in the run's batch, for messages.

    Raises RewardError naming the function and the row(s): a function raised (rows a..b), returned a
    non-list or the wrong length, returned a non-number, NaN or inf; or no function scored a row.
    """
    if not rewards:
        raise ValueError("score: no rewards to score with")
    n = len(prompts)
    rows = f"rows {row_offset}..{row_offset + n - 1}"
    for what, values in (("completions", completions), ("completion_ids", completion_ids), *columns.items()):
        if len(values) != n:
            raise ValueError(f"score: {what} has {len(values)} rows, prompts has {n}")
    columns = {k: v for k, v in columns.items() if k not in DROPPED_COLUMNS}
    clash = [c for c in columns if c in RESERVED]
    if clash:
        raise ValueError(f"score: dataset column {clash[0]!r} has the name of a reward-function argument")

    metrics: dict[str, list[float]] = {}
    extras: dict[str, list] = {}

    def kwargs_for(name: str) -> dict:
        # Callbacks bound to the function, so that a bad call names it.
        def log_metric(metric: str, value: float) -> None:
            if isinstance(value, torch.Tensor) and value.numel() == 1:
                value = value.item()
            if not isinstance(value, numbers.Real):
                raise RewardError(
                    f"reward function {name!r}: log_metric({metric!r}, {_short(value)}) is not a number"
                )
            metrics.setdefault(metric, []).append(float(value))

        def log_extra(column: str, values: list) -> None:
            if len(values) != n or column in extras:
                why = (
                    f"{len(values)} values for {n} rows"
                    if len(values) != n
                    else "the column was already logged"
                )
                raise RewardError(f"reward function {name!r}: log_extra({column!r}, ...): {why}")
            extras[column] = list(values)

        return dict(
            prompts=prompts,
            completions=completions,
            completion_ids=completion_ids,
            trainer_state=trainer_state,
            log_metric=log_metric,
            log_extra=log_extra,
            **columns,
        )

    @contextlib.contextmanager
    def naming(name: str):
        """A function's exception as a RewardError naming it and the rows (the original chained)."""
        try:
            yield
        except RewardError:  # from its log_metric / log_extra: already named
            raise
        except Exception as e:
            raise RewardError(f"reward function {name!r} raised on {rows}: {type(e).__name__}: {e}") from e

    table: list[list[float] | None] = [None] * len(rewards)
    for j, reward in enumerate(rewards):
        if not is_async(reward.fn):
            with naming(reward.name):
                output = reward.fn(**kwargs_for(reward.name))
            table[j] = _checked(reward.name, output, n, row_offset)

    async def run_one(j: int, reward: Reward) -> None:
        with naming(reward.name):
            output = await reward.fn(**kwargs_for(reward.name))
        table[j] = _checked(reward.name, output, n, row_offset)

    async def run_async() -> None:
        await asyncio.gather(*(run_one(j, r) for j, r in enumerate(rewards) if is_async(r.fn)))

    if any(is_async(r.fn) for r in rewards):
        _run_coroutine(run_async)

    values = torch.tensor(table, dtype=torch.float32).T.reshape(n, len(rewards))
    unscored = torch.isnan(values).all(dim=1).nonzero()
    if len(unscored):
        i = int(unscored[0, 0])
        raise RewardError(
            f"row {row_offset + i}: every reward function returned None "
            f"({', '.join(r.name for r in rewards)}); prompt: {_short(prompts[i])}"
        )
    return Scored(values, metrics, extras)


def _run_coroutine(make) -> None:
    """Run `make()` to completion in a fresh event loop; in a helper thread when this thread already runs
    one (a notebook), where `asyncio.run` would refuse."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        asyncio.run(make())
        return
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, make()).result()
