"""Preference data -> token ids: one shared prompt, a chosen and a rejected completion per row.

Used by the reward model and the DPO family. Each row becomes

    prompt_ids    the tokens the two sequences share at the start (the prompt)
    chosen_ids    the rest of tokenize(prompt + chosen)
    rejected_ids  the rest of tokenize(prompt + rejected)

so prompt_ids + chosen_ids is exactly the tokenization of the whole chosen sequence (what TRL 1.16's
RewardTrainer feeds its model) and the split is where TRL's DPOTrainer puts it. Semantics follow TRL 1.16
(`RewardTrainer._prepare_dataset`, `DPOTrainer._prepare_dataset`):

- implicit prompt (only chosen and rejected): the prompt is split out first (`formats.with_explicit_prompt`);
  prompt + chosen is the original chosen again, so the tokens are the same either way.
- standard rows: the tokenizer's eos is appended to chosen and rejected when missing; `tokenizer(prompt)`
  and `tokenizer(prompt + completion)`.
- conversational rows: the chat template on the prompt with the generation prompt, and on prompt + chosen,
  prompt + rejected (with the row's `tools` / `chat_template_kwargs` when the dataset has those columns).
- the prompt ends where the tokenized prompt stops being a prefix of both tokenized sequences (a token
  merged across the boundary moves into the completions).

Rows are checked before anything is tokenized (`formats.check_format` / `validate_rows`: missing columns,
None, empty strings or message lists, unknown roles), and these are raised naming the row:
- explicit-prompt conversational rows whose chosen and rejected carry different context messages before
  their first assistant turn (they would answer different prompts);
- a `margin` column that is not numeric, or holds None or NaN.
Departures from TRL, each counted in the returned info rather than trained:
- a pair whose chosen and rejected tokens are identical is dropped (`dropped_identical_pairs`). It carries
  no preference: both sides get the same score, so its loss is a constant (log 2 for the reward model,
  and for DPO) with zero gradient that only dilutes the step's mean and counts as a wrong answer in the
  accuracy. TRL trains it.
- a conversational prompt whose template renders differently alone than followed by an answer raises
  (from `tokenization.tokenize_prompt_completions`); TRL's reward model never renders the prompt alone and
  its DPO cuts at the common prefix with a warning.
"""

from __future__ import annotations

import math

from .formats import check_format, validate_rows, with_explicit_prompt
from .tokenization import template_kwargs_groups, tokenize_prompt_completions

COLUMNS = ("prompt_ids", "chosen_ids", "rejected_ids")


def tokenize_preference(dataset, tokenizer, *, command: str = "rm", keep_columns=("margin",)):
    """Tokenize a preference dataset (explicit or implicit prompt, standard or conversational).

    Returns (dataset with columns prompt_ids, chosen_ids, rejected_ids — lists of ints — plus those of
    `keep_columns` it has, info {"dropped_identical_pairs": int}). Other columns (e.g. score_chosen)
    are dropped. `command` names the caller in format errors.
    """
    fmt = check_format(dataset, ("preference",), command)
    if fmt.conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the dataset is conversational (message lists) but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template: "
            "use a model whose tokenizer has one, or a dataset of plain strings"
        )
    validate_rows(dataset, fmt)
    if "margin" in keep_columns and "margin" in dataset.column_names:
        _check_margin(dataset)
    if fmt.conversational and not fmt.implicit_prompt:
        _check_shared_context(dataset)
    dataset = with_explicit_prompt(dataset, fmt)
    kept = [c for c in keep_columns if c in dataset.column_names]

    def tokenize_batch(batch, indices):
        n = len(indices)
        out = {name: [] for name in (*COLUMNS, "identical")}
        for group, kwargs in template_kwargs_groups(batch, n):
            prompts = [batch["prompt"][i] for i in group]
            rows = [indices[i] for i in group]
            sides = [
                tokenize_prompt_completions(
                    tokenizer, prompts, [batch[side][i] for i in group], rows=rows, **kwargs
                )
                for side in ("chosen", "rejected")
            ]
            for j, _ in enumerate(group):
                (c_prompt, c_rest), (r_prompt, r_rest) = ((p[j], c[j]) for p, c in sides)
                chosen, rejected = c_prompt + c_rest, r_prompt + r_rest
                shared = min(len(c_prompt), len(r_prompt))  # both are prefixes of one tokenized prompt
                out["prompt_ids"].append(chosen[:shared])
                out["chosen_ids"].append(chosen[shared:])
                out["rejected_ids"].append(rejected[shared:])
                out["identical"].append(chosen == rejected)
        return out

    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=[c for c in dataset.column_names if c not in kept],
        desc="Tokenizing (preference)",
    )
    identical = tokenized.with_format("arrow")["identical"].to_numpy()
    if identical.all():
        raise ValueError("every pair's chosen and rejected are identical: there is no preference to learn")
    info = {"dropped_identical_pairs": int(identical.sum())}
    if info["dropped_identical_pairs"]:
        tokenized = tokenized.filter(lambda flag: not flag, input_columns="identical")
    return tokenized.remove_columns("identical"), info


def drop_overlong_pairs(tokenized, max_length: int | None):
    """Keep the pairs whose prompt + chosen and prompt + rejected both fit in `max_length` tokens (TRL's
    reward-model filter). Returns (dataset, number dropped); raises when nothing is left."""
    if max_length is None:
        return tokenized, 0
    columns = tokenized.with_format("arrow")
    prompt = columns["prompt_ids"].combine_chunks().value_lengths().to_numpy()
    longest = [
        prompt + columns[side].combine_chunks().value_lengths().to_numpy()
        for side in ("chosen_ids", "rejected_ids")
    ]
    keep = (longest[0] <= max_length) & (longest[1] <= max_length)
    if not keep.any():
        raise ValueError(
            f"every pair is longer than max_length={max_length} tokens (the shortest has "
            f"{int(min(longest[0].min(), longest[1].min()))}): raise max_length"
        )
    dropped = int((~keep).sum())
    return (tokenized.select(keep.nonzero()[0]) if dropped else tokenized), dropped


def _check_margin(dataset) -> None:
    import pyarrow as pa

    column = dataset.with_format("arrow")["margin"].combine_chunks()
    if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
        raise ValueError(f"row 0: field 'margin' must be a number, got {column.type}")
    for i, value in enumerate(column.to_pylist()):
        if value is None or not math.isfinite(value):
            raise ValueError(f"row {i}: field 'margin' is {value}; every row needs a finite margin")


def _check_shared_context(dataset) -> None:
    """Explicit-prompt conversational rows: the messages chosen and rejected carry before their first
    assistant turn continue the prompt, so they must be the same on both sides."""

    def context(messages):
        out = []
        for message in messages:
            if message["role"] == "assistant":
                break
            out.append((message["role"], message["content"]))
        return out

    for i, (chosen, rejected) in enumerate(zip(dataset["chosen"], dataset["rejected"], strict=True)):
        if context(chosen) != context(rejected):
            raise ValueError(
                f"row {i}: chosen and rejected start with different non-assistant messages, so the pair "
                "does not share its prompt; put the shared context in 'prompt' and only the answers in "
                "'chosen' / 'rejected'"
            )
