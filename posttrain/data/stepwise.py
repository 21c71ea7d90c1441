"""Stepwise supervision -> token ids and per-token labels, for the process reward model.

A row is TRL's stepwise-supervision format: `prompt` (a string), `completions` (the solution's steps, a
list of strings), `labels` (one bool per step: is this step right). Semantics follow the PRM trainer of
earlier TRL releases (0.19's `PRMTrainer.tokenize_row`; TRL 1.16 has no PRM trainer):

- the prompt and each step are tokenized separately without special tokens; the tokenizer's bos (when it
  has one) goes before the prompt; each step is followed by the tokens of `step_separator`, so the input is
  bos + prompt + step_1 + sep + step_2 + sep + ... + step_S + sep;
- a step's label (1 right, 0 wrong) sits on the last token of its separator, every other position holds
  -100 (ignored); with train_on_last_step_only only the last step's label is kept (training rows only:
  evaluation rows keep every label, as in TRL);
- truncation: the prompt keeps its last max_prompt_length tokens, the completion (all steps and their
  separators) its first max_completion_length, then the whole sequence its first max_length; a step whose
  separator is cut off loses its label.

Rows are checked before anything is tokenized, and each of these raises naming the row (and step):
a conversational prompt (TRL's PRM trainer tokenizes the prompt as text and never supported message
lists), a field of the wrong type or None, no step at all, an empty step, a step that contains the
separator (the steps would not be where the labels say), a number of labels other than the number of steps.
Departure from TRL: a row left with no label after truncation is dropped and counted
(`dropped_unlabelled_rows`); TRL keeps it, where it adds nothing to the loss.
"""

from __future__ import annotations

IGNORE_INDEX = -100
COLUMNS = ("prompt", "completions", "labels")


# ---------------------------------------------------------------------------------------------------------
# Validation: whole Arrow columns at once
# ---------------------------------------------------------------------------------------------------------


def validate_stepwise(dataset, step_separator: str | None = None) -> None:
    """Raise ValueError naming the first malformed row (and step) of a stepwise-supervision dataset;
    step_separator None: a step may hold any separator (not yet chosen)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    from .formats import _first, _is_message_list_type, _is_string_type

    missing = [c for c in COLUMNS if c not in dataset.column_names]
    if missing:
        raise ValueError(
            f"a stepwise-supervision dataset needs columns {list(COLUMNS)}; missing {missing} "
            f"(columns: {dataset.column_names})"
        )
    view = dataset.with_format("arrow")
    prompt, steps, labels = (view[c].combine_chunks() for c in COLUMNS)
    for name, column in zip(COLUMNS, (prompt, steps, labels), strict=True):
        if column.null_count:
            raise ValueError(f"row {_first(column.is_null())}: field {name!r} is None")
    if _is_message_list_type(prompt.type):
        raise ValueError(
            "row 0: field 'prompt' is a list of messages; stepwise supervision takes a plain-text prompt "
            "(TRL's PRM trainer never supported conversational prompts)"
        )
    if not _is_string_type(prompt.type):
        raise ValueError(f"row 0: field 'prompt' must be a string, got {prompt.type}")
    for name, column, want, test in (
        ("completions", steps, "a list of strings (the steps)", _is_string_type),
        ("labels", labels, "a list of bools (one per step)", pa.types.is_boolean),
    ):
        if not (pa.types.is_list(column.type) or pa.types.is_large_list(column.type)) or not test(
            column.type.value_type
        ):
            raise ValueError(f"row 0: field {name!r} must be {want}, got {column.type}")
    n_steps, n_labels = pc.list_value_length(steps), pc.list_value_length(labels)
    row = _first(pc.equal(n_steps, 0))
    if row is not None:
        raise ValueError(f"row {row}: field 'completions' is an empty list (no step to label)")
    row = _first(pc.not_equal(n_steps, n_labels))
    if row is not None:
        raise ValueError(
            f"row {row}: field 'labels' has {n_labels[row].as_py()} labels but 'completions' has "
            f"{n_steps[row].as_py()} steps (one bool per step)"
        )

    def where(column, name: str, i: int) -> str:
        """Row, field and step of item `i` of the flattened list column."""
        parents = pc.list_parent_indices(column).to_numpy()
        starts = column.offsets.to_numpy()[:-1] - column.offsets[0].as_py()
        return f"row {parents[i]}: field {name!r}, step {i - starts[parents[i]]}"

    flat_steps, flat_labels = pc.list_flatten(steps), pc.list_flatten(labels)
    for column, values, name in ((steps, flat_steps, "completions"), (labels, flat_labels, "labels")):
        if values.null_count:
            raise ValueError(f"{where(column, name, _first(values.is_null()))} is None")
    i = _first(pc.equal(pc.utf8_length(flat_steps), 0))
    if i is not None:
        raise ValueError(f"{where(steps, 'completions', i)} is an empty string")
    if step_separator is None:
        return
    hits = np.flatnonzero(pc.match_substring(flat_steps, step_separator).to_numpy(zero_copy_only=False))
    if len(hits):
        raise ValueError(
            f"{where(steps, 'completions', int(hits[0]))} contains the step_separator {step_separator!r}: the steps would "
            "not end where their labels are (split it into two steps, or choose another step_separator)"
        )


# ---------------------------------------------------------------------------------------------------------
# Tokenization
# ---------------------------------------------------------------------------------------------------------


def separator_ids(tokenizer, step_separator: str) -> list[int]:
    """The tokens of `step_separator` (what follows every step); raises if it tokenizes to nothing."""
    ids = tokenizer(step_separator, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(
            f"step_separator={step_separator!r} tokenizes to no tokens: there is nowhere to put a label"
        )
    return ids


def encode_steps(tokenizer, prompts: list[str], steps: list[list[str]], sep_ids: list[int]):
    """Token ids of each row, before truncation: [(prompt_ids, completion_ids, ends)], where
    completion_ids = step_1 + sep + ... + step_S + sep and ends[j] is the index in completion_ids of the
    last token of step j's separator (where its label goes). Two tokenizer calls for the whole batch."""
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt_ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    flat = [s for row in steps for s in row]
    flat = (
        tokenizer(flat, add_special_tokens=False)["input_ids"] if flat else []
    )  # a fast tokenizer fails on []
    out, k = [], 0
    for p, row in zip(prompt_ids, steps, strict=True):
        completion, ends = [], []
        for ids in flat[k : k + len(row)]:
            completion += ids + sep_ids
            ends.append(len(completion) - 1)
        k += len(row)
        out.append((bos + p, completion, ends))
    return out


def labelled_ids(
    prompt_ids: list[int],
    completion_ids: list[int],
    ends: list[int],
    labels: list[int],
    *,
    max_length: int | None,
    max_prompt_length: int | None,
    max_completion_length: int | None,
) -> tuple[list[int], list[int]]:
    """(input_ids, per-token labels) of one row, truncated as TRL does (see the module docstring).
    labels: one int per step, 0, 1 or IGNORE_INDEX (a step not trained)."""
    token_labels = [IGNORE_INDEX] * len(completion_ids)
    for end, label in zip(ends, labels, strict=True):
        token_labels[end] = label
    if max_prompt_length is not None:
        prompt_ids = prompt_ids[len(prompt_ids) - max_prompt_length :] if max_prompt_length else []
    if max_completion_length is not None:
        completion_ids, token_labels = (
            completion_ids[:max_completion_length],
            token_labels[:max_completion_length],
        )
    input_ids = prompt_ids + completion_ids
    token_labels = [IGNORE_INDEX] * len(prompt_ids) + token_labels
    if max_length is not None:
        input_ids, token_labels = input_ids[:max_length], token_labels[:max_length]
    return input_ids, token_labels


def tokenize_stepwise(
    dataset,
    tokenizer,
    *,
    step_separator: str = "\n",
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    train_on_last_step_only: bool = False,
    is_eval: bool = False,
):
    """Check and tokenize a stepwise-supervision dataset.

    Returns (dataset with columns input_ids, labels — lists of ints of one length per row —, info
    {"dropped_unlabelled_rows": int}). Raises naming the row for malformed rows, and when no row keeps a label.
    """
    validate_stepwise(dataset, step_separator)
    sep_ids = separator_ids(tokenizer, step_separator)
    last_only = train_on_last_step_only and not is_eval

    def tokenize_batch(batch):
        out = {"input_ids": [], "labels": []}
        encoded = encode_steps(tokenizer, batch["prompt"], batch["completions"], sep_ids)
        for (prompt_ids, completion_ids, ends), labels in zip(encoded, batch["labels"], strict=True):
            labels = [int(x) for x in labels]
            if last_only:
                labels = [IGNORE_INDEX] * (len(labels) - 1) + labels[-1:]
            ids, token_labels = labelled_ids(
                prompt_ids,
                completion_ids,
                ends,
                labels,
                max_length=max_length,
                max_prompt_length=max_prompt_length,
                max_completion_length=max_completion_length,
            )
            out["input_ids"].append(ids)
            out["labels"].append(token_labels)
        return out

    from datasets import Features, List, Value

    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        remove_columns=dataset.column_names,
        # declared: `labels` would otherwise keep the input column's type and turn -100 / 0 / 1 into bools
        features=Features({"input_ids": List(Value("int64")), "labels": List(Value("int64"))}),
        desc="Tokenizing (stepwise)",
    )
    labelled = [any(x != IGNORE_INDEX for x in row) for row in tokenized["labels"]]
    if not any(labelled):
        raise ValueError(
            "no row keeps a labelled step after truncation (max_length / max_prompt_length / "
            "max_completion_length cut every step's separator)"
        )
    info = {"dropped_unlabelled_rows": len(labelled) - sum(labelled)}
    if info["dropped_unlabelled_rows"]:
        tokenized = tokenized.select([i for i, keep in enumerate(labelled) if keep])
    return tokenized, info
