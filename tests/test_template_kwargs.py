"""Per-row `tools` and `chat_template_kwargs` columns reach the chat template in SFT tokenization.

The template below USES both: `enable_thinking=False` inserts an empty think block at every assistant
turn (and at the generation prompt), and `tools` renders a system line naming the tools, so a column that
is dropped or misrouted changes the tokens. References: `tokenizer.apply_chat_template` called here on
each row with its own tools and kwargs (the completion mask from the prompt rendered with the generation
prompt), and TRL 1.16's SFTTrainer dataset preparation, which reads the same two columns.
"""

import json
import tempfile

import pytest
from _optional import import_or_skip
from datasets import Dataset

from posttrain.data import embedded
from posttrain.data.tokenization import tokenize_sft
from posttrain.rl.sft import SFTConfig, load_sft_data

THINK = "<think></think>"
TEMPLATE = (
    "{%- if tools %}{{- '<|im_start|>system\\nTools:' }}"
    "{%- for tool in tools %}{{- ' ' + tool['function']['name'] }}{%- endfor %}"
    "{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- set think = '' if enable_thinking is not defined or enable_thinking else '" + THINK + "' %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' + think }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}{{- '\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' + think }}{%- endif %}"
)


def _tool(name: str) -> dict:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": f"{name} two integers",
            "parameters": {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},
        },
    }


U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}
# Every row names enable_thinking explicitly: a struct column fills a missing key with None, which a
# template reads as "set, and false".
ROWS = [
    {"thinking": False, "tools": [_tool("add")]},
    {"thinking": True, "tools": None},
    {"thinking": False, "tools": None},
    {"thinking": True, "tools": [_tool("add"), _tool("subtract")]},
]


@pytest.fixture(scope="module")
def tokenizer():
    tok = embedded.build_tokenizer()
    tok.chat_template = TEMPLATE
    return tok


def _prompt_completion_rows(tools_as_json: bool = False) -> list[dict]:
    rows = []
    for (prompt, answer), spec in zip(embedded.problems("train"), ROWS, strict=False):
        tools = spec["tools"]
        rows.append(
            {
                "prompt": [U(prompt)],
                "completion": [A(answer)],
                "tools": json.dumps(tools) if tools_as_json else tools,
                "chat_template_kwargs": {"enable_thinking": spec["thinking"]},
            }
        )
    return rows


def _messages_rows() -> list[dict]:
    return [
        {
            "messages": [U(r["prompt"][0]["content"]), *r["completion"]],
            **{k: r[k] for k in ("tools", "chat_template_kwargs")},
        }
        for r in _prompt_completion_rows()
    ]


def _ids(tokenizer, messages, row, **flags) -> dict:
    """apply_chat_template on one conversation with the row's tools and kwargs."""
    return tokenizer.apply_chat_template(
        messages, tools=row["tools"], tokenize=True, return_dict=True, **row["chat_template_kwargs"], **flags
    )


def _reference_prompt_completion(tokenizer, rows) -> list[tuple[list[int], list[int]]]:
    out = []
    for row in rows:
        full = _ids(tokenizer, row["prompt"] + row["completion"], row)["input_ids"]
        prompt = _ids(tokenizer, row["prompt"], row, add_generation_prompt=True)["input_ids"]
        assert full[: len(prompt)] == prompt  # the template is prefix-stable with every kwarg
        out.append((full, [0] * len(prompt) + [1] * (len(full) - len(prompt))))
    return out


def _ours(dataset, tokenizer, **options) -> list[tuple[list[int], list[int]]]:
    rows, _ = tokenize_sft(dataset, tokenizer, max_length=None, **options)
    return [(r["input_ids"], r["completion_mask"]) for r in rows]


def test_prompt_completion_rows_get_their_own_tools_and_kwargs(tokenizer):
    rows = _prompt_completion_rows()
    ours = _ours(Dataset.from_list(rows), tokenizer)
    assert ours == _reference_prompt_completion(tokenizer, rows)

    texts = [tokenizer.decode(ids) for ids, _ in ours]
    for text, spec in zip(texts, ROWS, strict=True):
        assert (THINK in text) == (not spec["thinking"])
        names = [t["function"]["name"] for t in spec["tools"] or []]
        assert ("Tools: " + " ".join(names) in text) == bool(names)
    # The think block sits before the completion: it is prompt, not a target.
    for ids, mask in ours:
        target = tokenizer.decode([t for t, m in zip(ids, mask, strict=True) if m])
        assert THINK not in target and target.endswith("<|im_end|>\n")

    # Without the two columns every row renders as the template's default.
    plain = _ours(
        Dataset.from_list([{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]), tokenizer
    )
    assert [p != o for p, o in zip(plain, ours, strict=True)] == [True, False, True, True]


def test_conversations_get_their_own_tools_and_kwargs(tokenizer):
    rows = _messages_rows()
    dataset = Dataset.from_list(rows)
    full = [_ids(tokenizer, r["messages"], r, return_assistant_tokens_mask=True) for r in rows]
    assert _ours(dataset, tokenizer) == [(f["input_ids"], [1] * len(f["input_ids"])) for f in full]
    assistant_only = _ours(dataset, tokenizer, assistant_only_loss=True)
    assert assistant_only == [(f["input_ids"], f["assistant_masks"]) for f in full]
    assert any(THINK in tokenizer.decode(ids) for ids, _ in assistant_only)


def test_tools_as_json_strings_are_parsed(tokenizer):
    as_lists = _ours(Dataset.from_list(_prompt_completion_rows()), tokenizer)
    as_json = _ours(Dataset.from_list(_prompt_completion_rows(tools_as_json=True)), tokenizer)
    assert as_json == as_lists


def test_sft_data_loading_passes_the_columns_through(tokenizer, tmp_path):
    """The SFT loop's own path: a jsonl file -> load_sft_data -> the same tokens as the reference."""
    rows = _prompt_completion_rows()
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = SFTConfig(dataset_name=str(path), max_length=None)
    train, _, _ = load_sft_data(config, tokenizer)
    assert [(r["input_ids"], r["completion_mask"]) for r in train] == _reference_prompt_completion(
        tokenizer, Dataset.from_list(rows).to_list()
    )


def trl_rows(tokenizer, dataset):
    """TRL's prepared rows: (input_ids, labels != -100), labels from TRL's own collator (before the shift,
    as our completion_mask)."""
    trl = import_or_skip("trl")

    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(output_dir=out, use_cpu=True, bf16=False, report_to=[], shuffle_dataset=False)
        trainer = trl.SFTTrainer(
            model=embedded.build_model(), args=args, train_dataset=dataset, processing_class=tokenizer
        )
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        labels = trainer.data_collator(rows)["labels"]
    return [
        (r["input_ids"], (labels[i, : len(r["input_ids"])] != -100).long().tolist())
        for i, r in enumerate(rows)
    ]


@pytest.mark.parametrize("kind", ["prompt_completion", "messages"])
def test_matches_trl(tokenizer, kind):
    rows = _prompt_completion_rows() if kind == "prompt_completion" else _messages_rows()
    dataset = Dataset.from_list(rows)
    ours, _ = tokenize_sft(dataset, tokenizer, max_length=None)
    ours = [(r["input_ids"], r["completion_mask"]) for r in ours]
    assert ours == trl_rows(tokenizer, dataset)
