"""TRL's dataset formats: detect which one a dataset is in, check it suits a command, validate its rows.

    kind                 columns                                  used by
    language_modeling    text | messages                          sft
    prompt_completion    prompt, completion                       sft
    prompt_only          prompt                                   grpo, rloo, ppo
    preference           prompt, chosen, rejected                 reward, dpo
                         chosen, rejected  (implicit prompt)
    unpaired_preference  prompt, completion, label                kto
    stepwise_supervision prompt, completions, labels              prm   (standard only; see data.stepwise)

Each is standard (strings) or conversational (lists of `{"role", "content"}` messages). Extra columns are
allowed and ignored. Semantics follow TRL 1.16 (`trl/data_utils.py`: `is_conversational`, `extract_prompt`,
`maybe_extract_prompt`); the code is our own and works on whole Arrow columns, not row by row, so that
validating 100k rows takes milliseconds.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

KINDS = (
    "language_modeling",
    "prompt_completion",
    "prompt_only",
    "preference",
    "unpaired_preference",
    "stepwise_supervision",
)
ROLES = ("system", "developer", "user", "assistant", "tool", "ipython")  # ipython: Llama 3.1's tool results


@dataclass(frozen=True)
class DatasetFormat:
    """What a dataset holds.

    kind: one of `KINDS`. conversational: True for message lists, False for strings, None when only the
    column names were seen. implicit_prompt: preference data whose prompt is the shared start of chosen and
    rejected (turn it explicit with `with_explicit_prompt`). text_field: the column of standard language
    modelling text.
    """

    kind: str
    conversational: bool | None
    implicit_prompt: bool = False
    text_field: str = "text"

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns this format reads, in order."""
        if self.kind == "language_modeling":
            return ("messages",) if self.conversational else (self.text_field,)
        if self.kind == "preference" and self.implicit_prompt:
            return ("chosen", "rejected")
        return _REQUIRED[self.kind]


_REQUIRED = {
    "prompt_completion": ("prompt", "completion"),
    "prompt_only": ("prompt",),
    "preference": ("prompt", "chosen", "rejected"),
    "unpaired_preference": ("prompt", "completion", "label"),
    "stepwise_supervision": ("prompt", "completions", "labels"),
}


def _signatures(text_field: str) -> list[tuple[str, str, tuple[str, ...]]]:
    """(kind, label, required columns), most specific first: the first whose columns are all present wins."""
    return [
        ("preference", "preference", ("prompt", "chosen", "rejected")),
        ("preference", "preference (implicit prompt)", ("chosen", "rejected")),
        ("unpaired_preference", "unpaired preference", ("prompt", "completion", "label")),
        ("stepwise_supervision", "stepwise supervision", ("prompt", "completions", "labels")),
        ("prompt_completion", "prompt-completion", ("prompt", "completion")),
        ("prompt_only", "prompt-only", ("prompt",)),
        ("language_modeling", "language modelling (conversational)", ("messages",)),
        ("language_modeling", "language modelling", (text_field,)),
    ]


def describe_kinds(kinds: Iterable[str], text_field: str = "text") -> str:
    """'prompt-completion (prompt, completion), ...' for the given kinds, for error messages."""
    kinds = set(kinds)
    parts = [f"{label} ({', '.join(cols)})" for kind, label, cols in _signatures(text_field) if kind in kinds]
    return "; ".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Detection
# ---------------------------------------------------------------------------------------------------------


def detect_format(dataset_or_columns, *, text_field: str = "text") -> DatasetFormat:
    """The format of a `datasets.Dataset`, of one example (a dict), or of a list of column names.

    Conversational-ness comes from the Arrow column types of a dataset (a list of structs is a message
    list), from the values of an example, and is None for bare column names.
    """
    columns, is_conv = _columns_and_probe(dataset_or_columns)
    match = next((s for s in _signatures(text_field) if all(c in columns for c in s[2])), None)
    if match is None:
        raise ValueError(_no_format_message(columns, text_field))
    kind, _, required = match
    if kind == "preference":
        chosen = is_conv("chosen")
        # TRL's maybe_extract_prompt: a prompt column that disagrees with chosen on conversational-ness is
        # not the prompt of chosen/rejected (some datasets add a plain-text prompt to full conversations).
        implicit = "prompt" not in columns or (chosen is not None and is_conv("prompt") != chosen)
        return DatasetFormat("preference", chosen, implicit_prompt=implicit, text_field=text_field)
    main = required[0] if kind == "language_modeling" else "prompt"  # the column that decides
    if main == "messages" and is_conv(main) is False:
        raise ValueError(_not_messages(dataset_or_columns, "messages"))
    return DatasetFormat(kind, is_conv(main), text_field=text_field)


def _not_messages(obj, field: str) -> str:
    """The error for a column named like message lists whose values are something else."""
    from datasets import Dataset

    if isinstance(obj, Dataset):
        got, row = obj.features.arrow_schema.field(field).type, 0  # one Arrow type: row 0 already differs
        got = "strings" if _is_string_type(got) else str(got)
    else:
        got, row = _python_type_name(obj[field]), None
    where = f"row {row}: field {field!r}" if row is not None else f"field {field!r}"
    return f"{where} must be a list of {{'role', 'content'}} messages, got {got}"


def _python_type_name(value) -> str:
    """'str', 'a list of str', 'a list of int and str', 'an empty list': what an in-memory field holds."""
    if not isinstance(value, list):
        return type(value).__name__
    if not value:
        return "an empty list"
    return "a list of " + " and ".join(sorted({type(v).__name__ for v in value}))


def _columns_and_probe(obj):
    """The column names of `obj` and a function column -> conversational (bool, or None if unknown)."""
    from datasets import Dataset, DatasetDict

    if isinstance(obj, DatasetDict):
        raise TypeError(f"pass one split, not a DatasetDict (splits: {list(obj)})")
    if isinstance(obj, Dataset):
        schema = obj.features.arrow_schema
        return obj.column_names, lambda col: _is_message_list_type(schema.field(col).type)
    if isinstance(obj, Mapping):
        return list(obj), lambda col: _is_message_list_value(obj[col])
    if isinstance(obj, Sequence) and not isinstance(obj, str) and all(isinstance(c, str) for c in obj):
        return list(obj), lambda col: None
    raise TypeError(
        f"detect_format takes a datasets.Dataset, one example (dict) or a list of column names, got {type(obj)}"
    )


def _is_message_list_type(arrow_type) -> bool:
    import pyarrow as pa

    return (pa.types.is_list(arrow_type) or pa.types.is_large_list(arrow_type)) and pa.types.is_struct(
        arrow_type.value_type
    )


def _is_message_list_value(value) -> bool:
    # TRL's is_conversational: a list whose first element is a dict with a "role".
    return isinstance(value, list) and bool(value) and isinstance(value[0], dict) and "role" in value[0]


def _no_format_message(columns: list[str], text_field: str) -> str:
    present = set(columns)
    candidates = []
    for _, label, required in _signatures(text_field):
        have = [c for c in required if c in present]
        if have:
            missing = [c for c in required if c not in present]
            candidates.append((len(missing), label, required, missing))
    candidates.sort(key=lambda c: c[0])
    if candidates:
        hint = "; ".join(
            f"{label} needs {list(req)} (missing {missing})" for _, label, req, missing in candidates[:3]
        )
        hint = f"Closest formats: {hint}."
    else:
        hint = f"Known formats: {describe_kinds(KINDS, text_field)}."
    return f"the dataset's columns {columns} match no known dataset format. {hint}"


def check_format(dataset, allowed_kinds: Iterable[str], command: str, *, text_field: str = "text"):
    """Detect the format of `dataset` and raise unless its kind is one `command` accepts. Returns the format."""
    allowed_kinds = tuple(allowed_kinds)
    unknown = [k for k in allowed_kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"unknown format kinds {unknown}; known: {list(KINDS)}")
    accepts = describe_kinds(allowed_kinds, text_field)
    try:
        fmt = detect_format(dataset, text_field=text_field)
    except ValueError as e:
        raise ValueError(f"`{command}` accepts {accepts}, but {e}") from None
    if fmt.kind not in allowed_kinds:
        columns = dataset.column_names if hasattr(dataset, "column_names") else list(dataset)
        raise ValueError(
            f"`{command}` accepts {accepts}; the dataset (columns {columns}) is in the "
            f"{fmt.kind.replace('_', ' ')} format"
        )
    return fmt


# ---------------------------------------------------------------------------------------------------------
# Row validation: whole Arrow columns at once
# ---------------------------------------------------------------------------------------------------------


def validate_rows(dataset, fmt: DatasetFormat) -> None:
    """Raise ValueError naming the first malformed row and field of `dataset` for format `fmt`.

    Checks: no None, no empty text or message list, no empty string except where TRL trains the row
    (`MAY_BE_EMPTY`), the right type (a string, a message list, a bool label), every message has a
    known `role` and a string `content` (or, for an assistant message, `tool_calls` and content None: the
    OpenAI tool-calling form), and that prompt and completions agree on conversational-ness (except for an
    implicit prompt). Works on Arrow columns (no Python loop over rows), so it is cheap enough to run on
    every dataset before training.
    """
    if fmt.kind == "stepwise_supervision":  # list columns: checked in data.stepwise
        from .stepwise import validate_stepwise

        return validate_stepwise(dataset)
    view = dataset.with_format("arrow")  # applies any select/shuffle indices, keeps Arrow types
    for field in fmt.columns:
        column = view[field].combine_chunks()
        if field == "label":
            _check_label(column)
        elif fmt.conversational and not (field == "prompt" and fmt.implicit_prompt):
            _check_messages(column, field)
        else:
            _check_strings(column, field, allow_empty=field in MAY_BE_EMPTY.get(fmt.kind, ()), kind=fmt.kind)


# Standard fields that may be an empty string, per format: where TRL 1.16 tokenizes and trains such a row. SFT,
# DPO, reward and KTO tokenize an empty prompt as no tokens (or just bos) and train what follows; SFT and KTO append
# eos to an empty completion and train it. Not: a prompt-only prompt (generation starts from it: there would be no
# context at all), a language-modelling text (nothing to train), nor an empty chosen / rejected (TRL would train its
# eos alone; an empty answer in a preference pair is far likelier a broken row, so it stays an error here).
MAY_BE_EMPTY = {
    "prompt_completion": ("prompt", "completion"),
    "preference": ("prompt",),
    "unpaired_preference": ("prompt", "completion"),
}


def _first(mask) -> int | None:
    """Index of the first True in an Arrow boolean array (nulls count as False), or None."""
    import numpy as np

    hits = np.flatnonzero(mask.fill_null(False).to_numpy(zero_copy_only=False))
    return int(hits[0]) if len(hits) else None


def _null_row(column, field: str) -> None:
    if column.null_count:
        raise ValueError(f"row {_first(column.is_null())}: field {field!r} is None")


def _check_label(column) -> None:
    import pyarrow as pa

    if not pa.types.is_boolean(column.type):
        raise ValueError(f"row 0: field 'label' must be a bool (True = desirable), got {column.type}")
    _null_row(column, "label")


def _is_string_type(arrow_type) -> bool:
    import pyarrow as pa

    return pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type)


def _check_strings(column, field: str, allow_empty: bool, kind: str = "") -> None:
    import pyarrow as pa
    import pyarrow.compute as pc

    _null_row(column, field)
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        kind = "a list of messages" if _is_message_list_type(column.type) else str(column.type)
        raise ValueError(
            f"row 0: field {field!r} must be a string like the other fields of this standard dataset, got {kind}"
        )
    row = None if allow_empty else _first(pc.equal(pc.utf8_length(column), 0))
    if row is not None:
        why = " (a prompt-only row is what generation starts from)" if kind == "prompt_only" else ""
        raise ValueError(f"row {row}: field {field!r} is an empty string{why}")


def _check_messages(column, field: str) -> None:
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    _null_row(column, field)
    if not _is_message_list_type(column.type):
        raise ValueError(
            f"row 0: field {field!r} must be a list of {{'role', 'content'}} messages like the other fields "
            f"of this conversational dataset, got {column.type}"
        )
    row = _first(pc.equal(pc.list_value_length(column), 0))
    if row is not None:
        raise ValueError(f"row {row}: field {field!r} is an empty list of messages")

    messages = pc.list_flatten(column)  # StructArray, one entry per message of every row
    rows = pc.list_parent_indices(column).to_numpy()
    starts = column.offsets.to_numpy()[:-1] - column.offsets[0].as_py()

    def where(i: int) -> str:
        return f"row {rows[i]}: field {field!r}, message {i - starts[rows[i]]}"

    struct_type = messages.type
    for key in ("role", "content"):
        if struct_type.get_field_index(key) < 0:
            raise ValueError(f"{where(0)} has no {key!r} (message keys: {[f.name for f in struct_type]})")
    role, content = messages.field("role"), messages.field("content")
    for key, values in (("role", role), ("content", content)):
        # null: every value None (content of tool-call-only messages), checked below
        if not (_is_string_type(values.type) or (key == "content" and pa.types.is_null(values.type))):
            what = "a string (text-only messages)" if key == "content" else "a string"
            raise ValueError(f"{where(0)}: {key!r} must be {what}, got {values.type}")
    if role.null_count:
        raise ValueError(f"{where(_first(role.is_null()))} has no 'role'")
    # OpenAI tool-calling form: an assistant message may have content None when it carries tool_calls.
    no_content = content.is_null()
    if struct_type.get_field_index("tool_calls") >= 0:
        calls = messages.field("tool_calls")
        has_calls = pc.invert(calls.is_null())
        if pa.types.is_list(calls.type) or pa.types.is_large_list(calls.type):
            has_calls = pc.and_(has_calls, pc.greater(pc.list_value_length(calls), 0))
        no_content = pc.and_(no_content, pc.invert(pc.and_(has_calls, pc.equal(role, "assistant"))))
    i = _first(no_content)
    if i is not None:
        raise ValueError(
            f"{where(i)} has no 'content' (only an assistant message with tool_calls may omit it)"
        )
    unknown = np.flatnonzero(
        ~pc.is_in(role.cast(pa.string()), value_set=pa.array(ROLES)).to_numpy(zero_copy_only=False)
    )
    if len(unknown):
        i = int(unknown[0])
        raise ValueError(f"{where(i)} has unknown role {role[i].as_py()!r}; expected one of {list(ROLES)}")


# ---------------------------------------------------------------------------------------------------------
# Implicit prompts
# ---------------------------------------------------------------------------------------------------------


def extract_prompt(chosen, rejected):
    """Split an implicit-prompt preference pair into (prompt, chosen, rejected), by TRL's rule.

    The prompt is the longest common prefix of chosen and rejected — whole messages for conversational
    pairs, characters for strings — except that (as TRL's `extract_prompt`) a string prompt that ends in a
    space gives that space to the completions, and when one side is a prefix of the other the last shared
    element goes to the completions so neither is empty. Departure: TRL, on a mismatch at the very first
    element, reads element -1 (the last one) for the space rule; here the prompt is then simply empty.
    """
    n = min(len(chosen), len(rejected))
    if n == 0:
        raise ValueError("chosen and rejected must both be non-empty to extract a prompt")
    idx = next((i for i in range(n) if chosen[i] != rejected[i]), None)
    if idx is None:
        idx = n - 1
    elif idx > 0 and chosen[idx - 1] == " ":
        idx -= 1
    return chosen[:idx], chosen[idx:], rejected[idx:]


def with_explicit_prompt(dataset, fmt: DatasetFormat | None = None):
    """Return `dataset` with prompt/chosen/rejected split out when its preference prompt is implicit.

    Other datasets come back unchanged. A conversational pair whose first messages already differ has no
    prompt: that raises, naming the row.
    """
    fmt = fmt or detect_format(dataset)
    if fmt.kind != "preference" or not fmt.implicit_prompt:
        return dataset

    def split(batch, indices):
        out = {"prompt": [], "chosen": [], "rejected": []}
        for i, chosen, rejected in zip(indices, batch["chosen"], batch["rejected"], strict=True):
            try:
                prompt, c, r = extract_prompt(chosen, rejected)
            except ValueError as e:
                raise ValueError(f"row {i}: {e}") from None
            if fmt.conversational and not prompt:
                raise ValueError(f"row {i}: chosen and rejected differ from their first message: no prompt")
            out["prompt"].append(prompt)
            out["chosen"].append(c)
            out["rejected"].append(r)
        return out

    drop = ["prompt"] if "prompt" in dataset.column_names else []
    return dataset.remove_columns(drop).map(split, batched=True, with_indices=True)
