"""Format detection, format checks, row validation and implicit-prompt extraction (TRL 1.16 semantics)."""

import time

import pytest
from datasets import Dataset

from posttrain.data import embedded
from posttrain.data.formats import (
    DatasetFormat,
    check_format,
    detect_format,
    extract_prompt,
    validate_rows,
    with_explicit_prompt,
)

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
CALL = {"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}


@pytest.mark.parametrize("conversational", [False, True])
@pytest.mark.parametrize(
    "kind", ["prompt_completion", "language_modeling", "preference", "prompt_only", "unpaired_preference"]
)
def test_detect_embedded_formats(kind, conversational):
    ds = embedded.dataset(kind, conversational=conversational).select(range(8))
    fmt = detect_format(ds)
    assert fmt == DatasetFormat(kind, conversational)
    validate_rows(ds, fmt)  # well-formed
    assert detect_format(ds[0]) == fmt  # one example: conversational from its values, like TRL


def test_detect_from_column_names_and_implicit_prompt():
    assert detect_format(["prompt", "completion"]) == DatasetFormat("prompt_completion", None)
    assert detect_format(["text", "id"]).kind == "language_modeling"
    assert detect_format(["content"], text_field="content").columns == ("content",)
    implicit = detect_format(["chosen", "rejected"])
    assert (
        implicit.kind == "preference"
        and implicit.implicit_prompt
        and implicit.columns == ("chosen", "rejected")
    )
    # TRL's maybe_extract_prompt: a string prompt beside conversational chosen/rejected is not their prompt.
    row = {"prompt": "hi", "chosen": [U("hi"), A("a")], "rejected": [U("hi"), A("b")]}
    fmt = detect_format(Dataset.from_list([row]))
    assert fmt.implicit_prompt and fmt.conversational
    explicit = {"prompt": [U("hi")], "chosen": [A("a")], "rejected": [A("b")]}
    assert not detect_format(Dataset.from_list([explicit])).implicit_prompt


def test_no_format_names_columns_and_candidates():
    with pytest.raises(
        ValueError,
        match=r"columns \['chosen', 'foo'\] match no known.*preference \(implicit prompt\) needs \['chosen', 'rejected'\] \(missing \['rejected'\]\)",
    ):
        detect_format(["chosen", "foo"])
    with pytest.raises(
        ValueError,
        match=r"columns \['foo'\] match no known dataset format\. Known formats: .*prompt-completion \(prompt, completion\)",
    ):
        detect_format(["foo"])
    with pytest.raises(TypeError, match="detect_format takes"):
        detect_format(42)


def test_check_format_names_command():
    ds = embedded.dataset("preference").select(range(4))
    assert check_format(ds, ["preference"], "dpo").kind == "preference"
    with pytest.raises(
        ValueError,
        match=r"`sft` accepts prompt-completion \(prompt, completion\); language modelling.*is in the preference format",
    ):
        check_format(ds, ["language_modeling", "prompt_completion"], "sft")
    with pytest.raises(
        ValueError, match=r"`grpo` accepts prompt-only \(prompt\), but the dataset's columns \['x'\]"
    ):
        check_format(Dataset.from_dict({"x": [1]}), ["prompt_only"], "grpo")
    with pytest.raises(ValueError, match="unknown format kinds"):
        check_format(ds, ["pairs"], "dpo")


# Each malformed dataset and the message naming its row and field.
BAD = [
    (
        [{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}],
        r"row 1: field 'completion' is None",
    ),
    ([{"text": "a"}, {"text": ""}], r"row 1: field 'text' is an empty string"),
    ([{"prompt": "a", "completion": 3}], r"row 0: field 'completion' must be a string.*got int64"),
    (
        [{"prompt": "a", "completion": [A("b")]}],
        r"row 0: field 'completion' must be a string.*got a list of messages",
    ),
    (
        [{"prompt": [U("a")], "completion": "b"}],
        r"row 0: field 'completion' must be a list of .*messages.*got string",
    ),
    (
        [{"prompt": [U("a")], "completion": [A("b")]}, {"prompt": [U("a")], "completion": []}],
        r"row 1: field 'completion' is an empty list",
    ),
    (
        [{"messages": [U("a"), A("b")]}, {"messages": [U("a"), {"content": "b"}]}],
        r"row 1: field 'messages', message 1 has no 'role'",
    ),
    (
        [{"messages": [U("a"), A("b")]}, {"messages": [U("a"), {"role": "assistant"}]}],
        r"row 1: field 'messages', message 1 has no 'content' \(only an assistant message with tool_calls",
    ),
    (  # content None is the tool-calling form only with tool_calls
        [{"messages": [U("a"), {"role": "assistant", "content": None, "tool_calls": []}]}],
        r"row 0: field 'messages', message 1 has no 'content'",
    ),
    (
        [{"messages": [{"role": "user", "content": None, "tool_calls": [CALL]}]}],
        r"row 0: field 'messages', message 0 has no 'content'",
    ),
    (
        [{"messages": [{"role": "bot", "content": "x"}]}],
        r"row 0: field 'messages', message 0 has unknown role 'bot'",
    ),
    (
        [{"messages": [{"text": "x"}]}],
        r"row 0: field 'messages', message 0 has no 'role' \(message keys: \['text'\]\)",
    ),
    (
        [
            {"prompt": "a", "completion": "b", "label": True},
            {"prompt": "a", "completion": "b", "label": None},
        ],
        r"row 1: field 'label' is None",
    ),
    ([{"prompt": "a", "completion": "b", "label": 1}], r"row 0: field 'label' must be a bool"),
    (
        [{"chosen": "ab", "rejected": "ac"}, {"chosen": "ab", "rejected": ""}],
        r"row 1: field 'rejected' is an empty string",
    ),
]


@pytest.mark.parametrize("rows,message", BAD)
def test_validate_rows_names_row_and_field(rows, message):
    ds = Dataset.from_list(rows)
    with pytest.raises(ValueError, match=message):
        validate_rows(ds, detect_format(ds))


def test_validate_rows_follows_select_and_shuffle():
    rows = [{"prompt": "a", "completion": "b"}] * 5 + [{"prompt": "a", "completion": None}]
    ds = Dataset.from_list(rows).select([5, 0, 1])
    with pytest.raises(ValueError, match="row 0: field 'completion' is None"):
        validate_rows(ds, detect_format(ds))


def test_validate_rows_is_fast_on_100k_rows():
    rows = embedded.rows("prompt_completion", conversational=True)
    ds = Dataset.from_list(rows * (100_000 // len(rows) + 1))
    fmt = detect_format(ds)
    start = time.perf_counter()
    validate_rows(ds, fmt)
    assert time.perf_counter() - start < 2.0


@pytest.mark.parametrize(
    "chosen,rejected",
    [
        ("The sky is blue.", "The sky is green."),
        ("Answer: yes", "Answer: no"),  # space before the split goes to the completions
        ("abc", "abcd"),  # one side a prefix of the other
        ("same", "same"),
        ("x", "y"),
        ([U("q"), A("a")], [U("q"), A("b")]),
        ([U("q"), A("a")], [U("q"), A("a"), U("more"), A("c")]),
        ([U("q"), A("a"), U("r"), A("b")], [U("q"), A("a"), U("r"), A("c")]),
    ],
)
def test_extract_prompt_matches_trl(chosen, rejected):
    from trl.data_utils import extract_prompt as trl_extract_prompt

    expected = trl_extract_prompt({"chosen": chosen, "rejected": rejected})
    assert extract_prompt(chosen, rejected) == (expected["prompt"], expected["chosen"], expected["rejected"])


def test_extract_prompt_first_element_mismatch_and_empty():
    # TRL reads chosen[-1] here (a trailing space would move the split to the end); we keep an empty prompt.
    assert extract_prompt("ab ", "cd") == ("", "ab ", "cd")
    with pytest.raises(ValueError, match="chosen and rejected must both be non-empty"):
        extract_prompt("", "x")


def test_with_explicit_prompt():
    rows = [{"chosen": [U("q"), A("a")], "rejected": [U("q"), A("b")], "prompt": "q", "id": 7}]
    out = with_explicit_prompt(Dataset.from_list(rows))
    assert out[0] == {"prompt": [U("q")], "chosen": [A("a")], "rejected": [A("b")], "id": 7}
    assert detect_format(out) == DatasetFormat("preference", True)
    explicit = embedded.dataset("preference").select(range(3))
    assert with_explicit_prompt(explicit) is explicit
    no_prompt = Dataset.from_list(
        rows + [{"chosen": [U("x"), A("a")], "rejected": [U("y"), A("b")], "prompt": "", "id": 8}]
    )
    with pytest.raises(ValueError, match="row 1: chosen and rejected differ from their first message"):
        with_explicit_prompt(no_prompt)


def test_messages_column_of_strings_names_row_and_field():
    ds = Dataset.from_dict({"messages": ["hello", "world"]})
    with pytest.raises(
        ValueError, match=r"row 0: field 'messages' must be a list of .*messages, got strings"
    ):
        detect_format(ds)
    with pytest.raises(ValueError, match=r"^`sft` accepts .* but row 0: field 'messages' must be a list"):
        check_format(ds, ["language_modeling"], "sft")
    with pytest.raises(ValueError, match=r"^field 'messages' must be a list of .*messages, got str$"):
        detect_format({"messages": "hello"})
    for value, got in ((["a"], "a list of str"), ([1, "a"], "a list of int and str"), ([], "an empty list")):
        with pytest.raises(ValueError, match=rf"^field 'messages' must be a list of .*messages, got {got}$"):
            detect_format({"messages": value})


def test_message_rows_as_real_datasets_have_them():
    """large_string roles (polars / large-string parquet), tool calls with content None, tool / ipython roles."""
    import pyarrow as pa

    tool_rows = [
        {"messages": [U("1+1?"), {"role": "assistant", "content": None, "tool_calls": [CALL]}]},
        {"messages": [{"role": "tool", "content": "2"}, {"role": "ipython", "content": "2"}, A("2")]},
    ]
    ds = Dataset.from_list(tool_rows)
    validate_rows(ds, detect_format(ds))
    large = pa.large_string()
    message = pa.struct([("role", large), ("content", large)])
    table = pa.table({"messages": pa.array([[U("a"), A("b")]], type=pa.list_(message))})
    ds = Dataset(table)
    assert ds.features.arrow_schema.field("messages").type.value_type.field("role").type == large
    fmt = detect_format(ds)
    assert fmt.conversational
    validate_rows(ds, fmt)
    bad = Dataset(
        pa.table({"messages": pa.array([[{"role": "bot", "content": "b"}]], type=pa.list_(message))})
    )
    with pytest.raises(ValueError, match="row 0: field 'messages', message 0 has unknown role 'bot'"):
        validate_rows(bad, detect_format(bad))


def test_empty_strings_only_where_trl_trains_the_row():
    """TRL 1.16 trains an empty prompt (SFT, DPO, reward, KTO: no prompt tokens) and an empty completion (SFT, KTO:
    eos alone); a prompt-only prompt, a text, a chosen or a rejected must not be empty."""
    allowed = [
        [{"prompt": "a", "completion": ""}, {"prompt": "", "completion": "b"}],
        [{"prompt": "", "chosen": "a", "rejected": "b"}],
        [{"prompt": "", "completion": "", "label": True}],
    ]
    for rows in allowed:
        ds = Dataset.from_list(rows)
        validate_rows(ds, detect_format(ds))
    refused = [
        (
            [{"prompt": "a"}, {"prompt": ""}],
            r"^row 1: field 'prompt' is an empty string \(a prompt-only row is what ",
        ),
        ([{"prompt": "", "chosen": "", "rejected": "b"}], r"^row 0: field 'chosen' is an empty string$"),
        ([{"prompt": "p", "chosen": "a", "rejected": ""}], r"^row 0: field 'rejected' is an empty string$"),
        ([{"text": ""}], r"^row 0: field 'text' is an empty string$"),
    ]
    for rows, message in refused:
        ds = Dataset.from_list(rows)
        with pytest.raises(ValueError, match=message):
            validate_rows(ds, detect_format(ds))
