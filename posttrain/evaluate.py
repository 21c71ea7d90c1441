"""Evaluate a model: generate completions for a split's prompts and score them (`posttrain eval MODEL`).

    1. the prompts of a split, loaded as the online loops load them (`grpo.load_prompts`: any format with a
       `prompt` column, the other columns passed on to the reward functions); by default the embedded
       task's held-out problems
    2. completions from the rollout engine (`rl.rollout.generate`): greedy by default, sampled with
       temperature > 0, `num_generations` per prompt
    3. rewards with TRL's calling convention (`rl.rewards`: built-in names, module:function paths, a reward
       model); on the embedded task `exact_match` by default, whose mean over greedy completions is
       `embedded.exact_match(model, tokenizer)`
    4. with a reference model, the KL of each completion to it (below)
    5. the summary, printed and written as JSON; optionally every completion as JSONL

Notation: B prompts, G = num_generations, N = B * G completions, L' the longest completion of a batch.

KL to the reference, the k1 estimator (Schulman 2020, "Approximating KL divergence"): per completion y of
prompt x, sum_t log pi(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t) over its tokens (the stop token
included), both under the models' own distributions (temperature 1, no top-k / top-p / min-p), at the
generated tokens; the summary's `kl` is its mean over completions. Sampled at temperature 1 with no other
processing, that is an unbiased estimate of KL(pi || pi_ref) over whole completions; greedy (the default) or
processed sampling makes it the log-ratio on those completions (how far the reference finds what the model
says unlikely), which can be negative, not a KL estimate.

The summary's keys follow GRPO's metric names: rewards/<name>/mean|std (over the completions the reward
applies to: a function returning None leaves a row out), kl and kl_std, completions/mean_length|
min_length|max_length|clipped_ratio. `Evaluation` carries them and each completion's record for a caller
(the demo) that evaluates several models in one process.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from posttrain.data import embedded
from posttrain.data.loading import MissingSplitError
from posttrain.rl import grpo, rewards, rollout
from posttrain.rl.config import ConfigError
from posttrain.rl.models import (
    frozen_reference,
    load_causal_lm,
    load_checked,
    load_tokenizer,
    local_model_folder,
)

EVAL_FILE = "eval.json"
EMBEDDED_SPLITS = ("train", "test")
# max_completion_length when unset: embedded task (`embedded.exact_match` decodes 4 tokens), other data (GRPO's)
DEFAULT_MAX_COMPLETION_LENGTH = grpo.RUN_DEFAULTS["max_completion_length"]


@dataclass
class EvalConfig:
    """`posttrain eval MODEL [--key value ...]`: the generation options keep GRPO's names and meanings."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "MODEL, the positional argument: local folder or hub id of the causal LM to evaluate."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local file or folder of a dataset with a `prompt` column; none: the embedded task."
        },
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (subset)."}
    )
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "The split whose prompts are evaluated (embedded task: test, the held-out problems, or train)."
        },
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate the split's first this many prompts only; none: all."}
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: built-in names ("
            + ", ".join(sorted(rewards.BUILTIN))
            + ") or module:function paths; none: exact_match on the embedded task, no function otherwise."
        },
    )
    reward_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A sequence-classification model (one label) scoring prompt + completion, as a reward."
        },
    )
    ref_model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "A causal LM to measure the KL to: per completion, the sum over its tokens of log pi - log "
            "pi_ref at the generated tokens (k1 estimator, temperature 1), averaged over completions; an "
            "unbiased KL estimate only when sampling at temperature 1 without top_k / top_p / min_p."
        },
    )
    num_generations: int = field(default=1, metadata={"help": "Completions per prompt (G)."})
    max_completion_length: int | None = field(
        default=None, metadata={"help": "New tokens per completion at most; none: 4 embedded, else 512."}
    )
    temperature: float = field(
        default=0.0, metadata={"help": "Sampling temperature; 0: greedy decoding (argmax), the default."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling mass (1: off)."})
    top_k: int = field(default=0, metadata={"help": "Keep the k most likely tokens (0: off)."})
    min_p: float | None = field(default=None, metadata={"help": "Min-p sampling threshold; none: off."})
    repetition_penalty: float = field(default=1.0, metadata={"help": "CTRL's repetition penalty (1: off)."})
    stop_token_ids: list[int] | None = field(
        default=None, metadata={"help": "Token ids that end a completion besides eos."}
    )
    generation_batch_size: int = field(
        default=128,
        metadata={
            "help": "Completions per call of the rollout engine (a multiple of num_generations); also the rows "
            "per log-prob forward (KL) and per reward-model forward."
        },
    )
    seed: int = field(default=42, metadata={"help": "Seed of the sampling (unused when greedy)."})
    output_file: str | None = field(
        default=None,
        metadata={
            "help": f"Where the JSON summary goes; none: MODEL/{EVAL_FILE} (a hub id MODEL needs this option)."
        },
    )
    completions_file: str | None = field(
        default=None,
        metadata={
            "help": "Also write every completion (prompt, completion, rewards, kl) here as JSONL; none: not."
        },
    )

    def __post_init__(self):
        for name in ("reward_funcs", "stop_token_ids"):
            value = getattr(self, name)
            if isinstance(value, str):  # names separated by commas, as on the command line
                setattr(self, name, [v.strip() for v in value.split(",") if v.strip()])
        embedded_task = self.dataset_name is None
        if self.reward_funcs is None:
            self.reward_funcs = ["exact_match"] if embedded_task else []
        if self.max_completion_length is None:
            self.max_completion_length = DEFAULT_MAX_COMPLETION_LENGTH[0 if embedded_task else 1]
        if self.model_name_or_path is None:
            raise ConfigError("no MODEL: posttrain eval MODEL [--key value ...] (a model folder or hub id)")
        if embedded_task and self.dataset_test_split not in EMBEDDED_SPLITS:
            raise ConfigError(
                f"dataset_test_split must be one of {', '.join(EMBEDDED_SPLITS)} for the embedded task, got "
                f"{self.dataset_test_split!r}"
            )
        problems = [
            (self.num_generations < 1, f"num_generations must be >= 1, got {self.num_generations}"),
            (
                self.max_completion_length < 1,
                f"max_completion_length must be >= 1, got {self.max_completion_length}",
            ),
            (not self.temperature >= 0, f"temperature must be >= 0, got {self.temperature}"),
            (not 0 < self.top_p <= 1, f"top_p must be in (0, 1], got {self.top_p}"),
            (self.top_k < 0, f"top_k must be >= 0, got {self.top_k}"),
            (
                self.min_p is not None and not 0 <= self.min_p <= 1,
                f"min_p must be in [0, 1], got {self.min_p}",
            ),
            (
                not self.repetition_penalty > 0,
                f"repetition_penalty must be > 0, got {self.repetition_penalty}",
            ),
            (
                self.generation_batch_size < 1 or self.generation_batch_size % self.num_generations,
                f"generation_batch_size must be a positive multiple of num_generations={self.num_generations}, "
                f"got {self.generation_batch_size}",
            ),
            (
                self.max_eval_samples is not None and self.max_eval_samples < 1,
                f"max_eval_samples must be >= 1 (or none), got {self.max_eval_samples}",
            ),
            (not 0 <= self.seed < 2**32, f"seed must be in [0, 2**32), got {self.seed}"),
        ]
        for bad, message in problems:
            if bad:
                raise ConfigError(message)


@dataclass
class Evaluation:
    """summary: the numbers printed and written (plus what was evaluated); records: one dict per completion,
    each prompt's G completions adjacent (prompt, completion, completion_ids (the stop token included),
    finished, rewards, kl when a reference was given, and the row's other dataset columns)."""

    summary: dict
    records: list[dict] = field(repr=False)


# ---------------------------------------------------------------------------------------------------------
# The evaluation proper: models and rows in, numbers out
# ---------------------------------------------------------------------------------------------------------


def load_rows(
    tokenizer, dataset_name=None, *, split: str = "test", dataset_config: str | None = None, limit=None
):
    """The prompt rows of `split`, as the online loops load them (`grpo.load_prompts`): the dataset's columns
    plus prompt_ids; the embedded task's prompt-only rows when dataset_name is None. Raises ValueError naming
    the dataset, split or row for a dataset without prompts or a malformed row."""
    source = embedded.rows("prompt_only", split) if dataset_name is None else dataset_name
    spec = SimpleNamespace(
        dataset_name=source,
        dataset_config=dataset_config,
        dataset_train_split="train" if dataset_name is None else split,  # a list of rows is the split "train"
        dataset_test_split=None,
    )
    try:
        rows, _ = grpo.load_prompts(spec, tokenizer, "eval")
    except MissingSplitError as err:
        raise ConfigError(f"dataset_test_split={split!r}: {err}") from None
    return rows[:limit]


def completion_kl(model, ref_model, prompt_ids, ro: rollout.Rollout, *, pad_token_id: int, batch_size: int):
    """(N,) k1 KL of each completion: sum over its tokens of log pi - log pi_ref at the generated tokens, both
    at temperature 1 (see the module docstring)."""
    G = len(ro.completion_ids) // len(prompt_ids)
    batch = rollout.training_batch(prompt_ids, ro, num_generations=G, pad_token_id=pad_token_id)
    logps = grpo.policy_logps(model, batch, 1.0, batch_size)  # (N, P + L')
    ref_logps = grpo.policy_logps(ref_model, batch, 1.0, batch_size)
    return ((logps - ref_logps) * batch["completion_mask"]).sum(-1)


def evaluate(
    model,
    tokenizer,
    rows: list[dict],
    *,
    reward_list: list[rewards.Reward] = (),
    ref_model=None,
    num_generations: int = 1,
    max_completion_length: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    stop_token_ids=(),
    generation_batch_size: int = 128,
    seed: int = 42,
) -> Evaluation:
    """Generate G completions of each row's prompt (`load_rows`' rows) with `model`, score them with
    `reward_list` (`rewards.resolve`'s) and, with `ref_model`, their KL to it. temperature 0: greedy.
    Returns the Evaluation; prints and writes nothing."""
    if not rows:
        raise ValueError("evaluate: no rows to evaluate")
    G = num_generations
    device = model.get_input_embeddings().weight.device
    generator = torch.Generator(device).manual_seed(seed)
    per_call = max(1, generation_batch_size // G)  # prompts per call of the rollout engine
    prompts, completions, ids, lengths, finished, kls = [], [], [], [], [], []
    for start in range(0, len(rows), per_call):
        chunk = rows[start : start + per_call]
        prompt_ids = [row["prompt_ids"] for row in chunk]
        ro = rollout.generate(
            model, prompt_ids, num_generations=G, max_completion_length=max_completion_length,
            temperature=temperature, do_sample=temperature > 0, top_k=top_k or None, top_p=top_p, min_p=min_p,
            repetition_penalty=repetition_penalty, eos_token_id=tokenizer.eos_token_id,
            stop_token_ids=stop_token_ids or (), pad_token_id=tokenizer.pad_token_id, generator=generator,
        )  # fmt: skip
        n = ro.completion_mask.sum(1).tolist()
        ids += [r[: int(k)] for r, k in zip(ro.completion_ids.tolist(), n, strict=True)]
        lengths += n
        finished += ro.finished.tolist()
        prompts += [row["prompt"] for row in chunk for _ in range(G)]
        completions += grpo.completion_texts(tokenizer, [row["prompt"] for row in chunk], ro)
        if ref_model is not None:
            kls += completion_kl(
                model, ref_model, prompt_ids, ro, pad_token_id=tokenizer.pad_token_id,
                batch_size=generation_batch_size,
            ).tolist()  # fmt: skip
    columns = grpo.reward_columns(rows, G)
    names = [r.name for r in reward_list]
    values = torch.zeros(len(prompts), 0)  # (N, F), NaN where a function returned None
    if reward_list:
        values = rewards.score(
            list(reward_list), prompts=prompts, completions=completions, completion_ids=ids, columns=columns,
            trainer_state=rewards.TrainerState(),
        ).values  # fmt: skip
    summary = {}
    for j, name in enumerate(names):
        scored = values[:, j][~values[:, j].isnan()].double()
        summary[f"rewards/{name}/mean"] = float(scored.mean()) if len(scored) else None
        summary[f"rewards/{name}/std"] = float(scored.std(correction=0)) if len(scored) else None
    if ref_model is not None:
        kl = torch.tensor(kls, dtype=torch.float64)
        summary["kl"], summary["kl_std"] = float(kl.mean()), float(kl.std(correction=0))
    length = torch.tensor(lengths, dtype=torch.float64)
    summary["completions/mean_length"] = float(length.mean())
    summary["completions/min_length"] = float(length.min())
    summary["completions/max_length"] = float(length.max())
    summary["completions/clipped_ratio"] = sum(not f for f in finished) / len(finished)
    records = []
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        record = {"prompt": prompt, "completion": completion, "completion_ids": ids[i]}
        record["finished"] = bool(finished[i])
        record["rewards"] = {
            n: None if math.isnan(v) else v for n, v in zip(names, values[i].tolist(), strict=True)
        }
        if ref_model is not None:
            record["kl"] = kls[i]
        record.update({k: v[i] for k, v in columns.items()})
        records.append(record)
    return Evaluation(summary, records)


# ---------------------------------------------------------------------------------------------------------
# The command: load and check everything, evaluate, print, write
# ---------------------------------------------------------------------------------------------------------


def _option_error(option: str, err: Exception) -> ConfigError:
    """A loader's error (its message starts `model_name_or_path=...`) as one naming `option`."""
    message = str(err)
    if message.startswith("model_name_or_path="):
        return ConfigError(option + message.removeprefix("model_name_or_path"))
    return ConfigError(f"{option}: {message}")


def output_path(config: EvalConfig) -> Path:
    """The JSON summary's path (MODEL/eval.json by default), checked before any work: its folder must be one
    (or creatable), and the file itself not a folder."""
    if config.output_file is not None:
        path = Path(config.output_file).expanduser()
    else:
        folder = local_model_folder(config.model_name_or_path)
        if folder is None:
            raise ConfigError(
                f"output_file: MODEL {config.model_name_or_path!r} is a hub id, not a folder to write {EVAL_FILE} "
                "into; pass --output_file"
            )
        path = folder / EVAL_FILE
    for option, p in (("output_file", path), ("completions_file", config.completions_file)):
        if p is None:
            continue
        p = Path(p).expanduser()
        if p.is_dir():
            raise ConfigError(f"{option}={str(p)!r} is a folder; expected a file path")
        parent = next((a for a in p.absolute().parents if a.exists()), None)
        if parent is not None and not parent.is_dir():
            raise ConfigError(f"{option}={str(p)!r}: {str(parent)!r} is a file, not a folder")
    return path


def load_reference(path: str, tokenizer, device):
    """The reference model of the KL, frozen, checked to share the evaluated model's tokenizer."""
    option = "ref_model_name_or_path"
    try:
        ref_tokenizer = load_tokenizer(path)
        ref = load_causal_lm(path)
    except (ValueError, OSError) as err:
        raise _option_error(option, err) from err
    if ref_tokenizer.get_vocab() != tokenizer.get_vocab():
        raise ConfigError(
            f"{option}={path!r}: its tokenizer's vocabulary differs from MODEL's; the KL compares the log-probs "
            "of the same token ids"
        )
    return frozen_reference(ref, None, device)


def evaluate_config(config: EvalConfig) -> Evaluation:
    """Load and check everything `config` names (the model folder, the dataset, the rewards, the reference)
    before generating, then `evaluate`. The summary also says what was evaluated (model, dataset, split,
    counts, decoding, the rewards' names in order). Prints and writes nothing."""
    from transformers import AutoConfig

    tokenizer = load_tokenizer(config.model_name_or_path)  # checks a local model folder in full
    rows = load_rows(
        tokenizer, config.dataset_name, split=config.dataset_test_split, dataset_config=config.dataset_config,
        limit=config.max_eval_samples,
    )  # fmt: skip
    model_config = load_checked(AutoConfig.from_pretrained, config.model_name_or_path, "config")
    context = getattr(model_config.get_text_config(), "max_position_embeddings", None)
    grpo.check_prompt_lengths(rows, context, config.max_completion_length, config.dataset_test_split)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reward_list = []
    if config.reward_funcs or config.reward_model_name_or_path is not None:
        reward_list = rewards.resolve(
            config.reward_funcs, reward_model_name_or_path=config.reward_model_name_or_path, device=device,
            reward_model_batch_size=config.generation_batch_size,
        )  # fmt: skip
    ref = None
    if config.ref_model_name_or_path is not None:
        ref = load_reference(config.ref_model_name_or_path, tokenizer, device)
    model = load_causal_lm(config.model_name_or_path).to(device)
    result = evaluate(
        model, tokenizer, rows, reward_list=reward_list, ref_model=ref, num_generations=config.num_generations,
        max_completion_length=config.max_completion_length, temperature=config.temperature,
        top_k=config.top_k, top_p=config.top_p, min_p=config.min_p, repetition_penalty=config.repetition_penalty,
        stop_token_ids=config.stop_token_ids or (), generation_batch_size=config.generation_batch_size,
        seed=config.seed,
    )  # fmt: skip
    result.summary = {
        "model": config.model_name_or_path,
        "dataset": config.dataset_name,
        "split": config.dataset_test_split,
        "num_prompts": len(rows),
        "num_generations": config.num_generations,
        "num_completions": len(result.records),
        "temperature": config.temperature,
        "max_completion_length": config.max_completion_length,
        "rewards": [r.name for r in reward_list],  # the reward model first when there is one
        "ref_model": config.ref_model_name_or_path,
        **result.summary,
    }
    return result


def run(config: EvalConfig) -> Evaluation:
    """`posttrain eval`: check the output paths, `evaluate_config`, print the summary, write it as JSON (and
    the completions as JSONL when asked). Returns the Evaluation."""
    path = output_path(config)
    result = evaluate_config(config)
    print(format_summary(result.summary))
    _write_atomic(path, json.dumps(result.summary, indent=2) + "\n")
    print(f"summary written to {path}")
    if config.completions_file is not None:
        text = "".join(json.dumps(r, default=str) + "\n" for r in result.records)
        _write_atomic(Path(config.completions_file).expanduser(), text)
        print(f"{len(result.records)} completions written to {config.completions_file}")
    return result


def format_summary(summary: dict) -> str:
    """`evaluate_config`'s summary as text: what was evaluated, then one line per number (rewards, kl,
    completions/*)."""
    dataset = "the embedded task" if summary["dataset"] is None else repr(summary["dataset"])
    temperature = summary["temperature"]
    decoding = "greedy" if temperature == 0 else f"sampled at temperature {temperature}"
    lines = [
        f"eval {summary['model']}: {dataset}, split {summary['split']!r}, {summary['num_prompts']} prompts x "
        f"{summary['num_generations']} ({decoding}, at most {summary['max_completion_length']} tokens)"
    ]
    metrics = [k for k in summary if k.startswith(("rewards/", "kl", "completions/"))]
    width = max(len(k) for k in metrics)
    for k in metrics:
        value = summary[k]
        lines.append(f"  {k:<{width}}  {'n/a (no row applies)' if value is None else format(value, '.6g')}")
    return "\n".join(lines)


def _write_atomic(path: Path, text: str) -> None:
    """Write through a temporary file beside `path`, so that an interrupted write leaves any old file whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
