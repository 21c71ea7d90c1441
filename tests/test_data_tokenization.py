"""SFT tokenization against TRL 1.16's SFTTrainer (dataset preparation + collator labels), and its errors."""

import tempfile

import pytest
from datasets import Dataset

from posttrain.data import embedded
from posttrain.data.tokenization import (
    tokenize_prompt,
    tokenize_prompt_completion,
    tokenize_prompts,
    tokenize_sft,
)

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def model():
    return embedded.build_model()


def trl_reference(model, tokenizer, dataset, **config):
    """TRL's prepared rows: (input_ids, labels != -100) per row, labels from TRL's own collator."""
    from trl import SFTConfig, SFTTrainer

    with tempfile.TemporaryDirectory() as out:
        args = SFTConfig(
            output_dir=out, use_cpu=True, bf16=False, report_to=[], shuffle_dataset=False, **config
        )
        trainer = SFTTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
        rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
        labels = trainer.data_collator(rows)["labels"]
    return [
        (r["input_ids"], (labels[i, : len(r["input_ids"])] != -100).long().tolist())
        for i, r in enumerate(rows)
    ]


# (kind, conversational, options, max_length): lengths chosen so that some prompts overflow (dropped) and some
# completions are cut (truncated) — the test asserts both happen where marked.
CASES = [
    ("prompt_completion", False, {}, 6, True),
    ("prompt_completion", True, {}, 24, True),
    ("prompt_completion", True, {"assistant_only_loss": True}, 25, True),
    ("prompt_completion", False, {"completion_only_loss": False}, 64, False),
    ("language_modeling", True, {"assistant_only_loss": True}, 24, True),
    ("language_modeling", True, {}, 20, False),
    ("language_modeling", False, {}, 6, False),
]


@pytest.mark.parametrize("kind,conversational,options,max_length,drops", CASES)
def test_matches_trl(model, tokenizer, kind, conversational, options, max_length, drops):
    dataset = embedded.dataset(kind, conversational=conversational).select(range(40))
    expected = trl_reference(model, tokenizer, dataset, max_length=max_length, **options)
    ours, info = tokenize_sft(dataset, tokenizer, max_length=max_length, **options)
    assert ours.column_names == ["input_ids", "completion_mask"]
    assert [(r["input_ids"], r["completion_mask"]) for r in ours] == expected
    assert info["dropped_overlong_prompts"] == len(dataset) - len(expected)
    assert (info["dropped_overlong_prompts"] > 0) == drops
    if max_length < 64:
        assert info["truncated"] > 0


def test_matches_trl_multi_turn_system_and_prefill(model, tokenizer):
    S = lambda text: {"role": "system", "content": text}
    rows = [
        {"prompt": [S("Add."), U("1+1=")], "completion": [A("2")]},
        {"prompt": [U("1+1="), A("2"), U("and 2+2=")], "completion": [A("4")]},
        {"prompt": [U("1+1="), A("The answer is")], "completion": [A(" 2")]},  # prefill
        {"prompt": [U("3+3=")], "completion": [A("6"), U("sure?"), A("yes")]},
    ]
    for options in ({}, {"assistant_only_loss": True}):
        expected = trl_reference(model, tokenizer, Dataset.from_list(rows), max_length=None, **options)
        ours, _ = tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=None, **options)
        assert [(r["input_ids"], r["completion_mask"]) for r in ours] == expected


def test_counts_and_masks_by_hand(tokenizer):
    rows = [
        {"prompt": "1+1=", "completion": "2"},  # 4 + 2 tokens: fits in 6
        {"prompt": "10+10=", "completion": "20"},  # prompt alone is 6 tokens: dropped
        {"prompt": "1+2=", "completion": "3333"},  # 4 + 5 tokens: truncated to 6
    ]
    out, info = tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=6)
    assert info == {"dropped_overlong_prompts": 1, "truncated": 1}
    assert out[0]["input_ids"] == tokenizer("1+1=2")["input_ids"] + [tokenizer.eos_token_id]
    assert out["completion_mask"] == [[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 1, 1]]
    with pytest.raises(
        ValueError, match=r"row 1: the prompt has 6 tokens, so max_length=6 leaves no completion"
    ):
        tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=6, overlong_prompt="error")
    with pytest.raises(ValueError, match="every row's prompt fills max_length=3"):
        tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=3)
    untruncated, info = tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=None)
    assert info == {"dropped_overlong_prompts": 0, "truncated": 0} and len(untruncated[2]["input_ids"]) == 9


def test_custom_text_field_and_existing_eos(tokenizer):
    ds = Dataset.from_dict({"body": ["ab", "cd<|im_end|>"]})
    out, _ = tokenize_sft(ds, tokenizer, dataset_text_field="body")
    assert out["input_ids"] == [
        tokenizer("ab<|im_end|>")["input_ids"],
        tokenizer("cd<|im_end|>")["input_ids"],
    ]


def test_building_blocks(tokenizer):
    prompt, completion = [U("1+1=")], [A("2")]
    p_ids, c_ids = tokenize_prompt_completion(tokenizer, prompt, completion)
    assert p_ids == tokenize_prompt(tokenizer, prompt)
    assert (
        p_ids
        == tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
    )
    assert (
        p_ids + c_ids
        == tokenizer.apply_chat_template(prompt + completion, tokenize=True, return_dict=True)["input_ids"]
    )
    assert tokenizer.decode(c_ids) == "2<|im_end|>\n"
    # A prompt ending on an assistant message is continued, not closed.
    prefill = tokenize_prompt(tokenizer, [U("1+1="), A("The answer is")])
    assert tokenizer.decode(prefill).endswith("<|im_start|>assistant\nThe answer is")
    # ... but in a prompt-completion pair the completion is a new turn (TRL's SFT): the prefill is closed.
    p_ids, c_ids = tokenize_prompt_completion(tokenizer, [U("1+1="), A("The answer is")], [A("2")])
    assert tokenizer.decode(p_ids).endswith("The answer is<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(c_ids) == "2<|im_end|>\n"
    batch = tokenize_prompts(tokenizer, [[U("a")], [U("b"), A("c")], [U("d")]])
    assert [tokenizer.decode(x)[-2:] for x in batch] == ["t\n", "\nc", "t\n"]
    # Standard strings: eos appended to the completion (not twice).
    assert tokenize_prompt_completion(tokenizer, "1+1=", "2") == (
        tokenizer("1+1=")["input_ids"],
        tokenizer("2<|im_end|>")["input_ids"],
    )
    assert (
        tokenize_prompt_completion(tokenizer, "1+1=", "2<|im_end|>")[1]
        == tokenizer("2<|im_end|>")["input_ids"]
    )


def test_per_row_template_kwargs(tokenizer):
    rows = embedded.rows("prompt_completion", conversational=True)[:4]
    plain, _ = tokenize_sft(Dataset.from_list(rows), tokenizer)
    with_kwargs = [dict(r, chat_template_kwargs={"unused": "x"}) for r in rows]
    out, _ = tokenize_sft(Dataset.from_list(with_kwargs), tokenizer)
    assert out.to_list() == plain.to_list()


def test_template_not_prefix_stable(tokenizer):
    tok = embedded.build_tokenizer()
    # The generation prompt opens a think block that the rendered conversation does not contain.
    tok.chat_template = embedded.CHAT_TEMPLATE.replace(
        "{{- '<|im_start|>assistant\\n' }}{%- endif %}",
        "{{- '<|im_start|>assistant\\n<think>' }}{%- endif %}",
    )
    with pytest.raises(ValueError, match=r"row 0: the chat template is not prefix-stable.*ends in '<think>'"):
        tokenize_prompt_completion(tok, [U("1+1=")], [A("2")])
    with pytest.raises(ValueError, match=r"row 0: the chat template is not prefix-stable"):
        tokenize_sft(embedded.dataset("prompt_completion", conversational=True).select(range(2)), tok)


def test_option_errors(tokenizer):
    pc = embedded.dataset("prompt_completion").select(range(4))
    messages = embedded.dataset("language_modeling", conversational=True).select(range(4))
    with pytest.raises(ValueError, match=r"overlong_prompt must be one of \('drop', 'error'\), got 'cut'"):
        tokenize_sft(pc, tokenizer, overlong_prompt="cut")
    with pytest.raises(ValueError, match="max_length must be a positive int or None, got 0"):
        tokenize_sft(pc, tokenizer, max_length=0)
    with pytest.raises(ValueError, match="assistant_only_loss=True needs a conversational dataset"):
        tokenize_sft(pc, tokenizer, assistant_only_loss=True)
    with pytest.raises(ValueError, match="completion_only_loss=True needs a prompt-completion dataset"):
        tokenize_sft(messages, tokenizer, completion_only_loss=True)
    with pytest.raises(ValueError, match=r"`sft` accepts .*is in the preference format"):
        tokenize_sft(embedded.dataset("preference").select(range(2)), tokenizer)
    plain = embedded.build_tokenizer()
    plain.chat_template = None
    with pytest.raises(
        ValueError,
        match=r"the dataset is conversational \(field 'messages' holds message lists\) but the tokenizer "
        r".* has no chat template \(tokenizer.chat_template is None\): use a model_name_or_path",
    ):
        tokenize_sft(messages, plain)


def test_row_errors(tokenizer):
    no_assistant = Dataset.from_list([{"messages": [U("a"), A("b")]}, {"messages": [U("a")]}])
    with pytest.raises(ValueError, match="row 1: no assistant tokens to train on"):
        tokenize_sft(no_assistant, tokenizer, assistant_only_loss=True)
    with pytest.raises(ValueError, match="row 1: field 'completion' is None"):
        tokenize_sft(
            Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": None}]),
            tokenizer,
        )
    no_eos = embedded.build_tokenizer()
    no_eos.eos_token = None
    with pytest.raises(ValueError, match="the tokenizer has no eos_token"):
        tokenize_sft(Dataset.from_dict({"text": ["ab"]}), no_eos)


def test_empty_prompt_or_completion_matches_trl(model, tokenizer):
    """TRL trains a row with an empty completion (prompt + eos) or an empty prompt; so do we, token for token."""
    rows = [
        {"prompt": "1+1=", "completion": ""},
        {"prompt": "", "completion": "2"},
        {"prompt": "3+3=", "completion": "6"},
    ]
    for options in ({}, {"completion_only_loss": False}):
        expected = trl_reference(model, tokenizer, Dataset.from_list(rows), max_length=None, **options)
        ours, _ = tokenize_sft(Dataset.from_list(rows), tokenizer, max_length=None, **options)
        assert [(r["input_ids"], r["completion_mask"]) for r in ours] == expected
    assert ours[0]["input_ids"] == tokenizer("1+1=")["input_ids"] + [tokenizer.eos_token_id]
    conversational = [{"prompt": [U("1+1=")], "completion": [A("")]}]
    expected = trl_reference(model, tokenizer, Dataset.from_list(conversational), max_length=None)
    ours, _ = tokenize_sft(Dataset.from_list(conversational), tokenizer, max_length=None)
    assert [(r["input_ids"], r["completion_mask"]) for r in ours] == expected


def test_messages_of_strings_and_unrenderable_rows(tokenizer):
    with pytest.raises(
        ValueError, match=r"but row 0: field 'messages' must be a list of .*messages, got strings"
    ):
        tokenize_sft(Dataset.from_dict({"messages": ["hello", "world"]}), tokenizer)
    strict = embedded.build_tokenizer()
    strict.chat_template = (
        "{{ raise_exception('roles must alternate') if messages[-1]['role'] == 'user' }}"
        + (embedded.CHAT_TEMPLATE)
    )
    rows = Dataset.from_list([{"messages": [U("a"), A("b")]}, {"messages": [U("a"), A("b"), U("c")]}])
    for options in ({}, {"assistant_only_loss": True}):
        with pytest.raises(
            ValueError,
            match=r"row 1: the chat template cannot render this conversation: roles must alternate",
        ):
            tokenize_sft(rows, strict, **options)


def test_large_string_messages_tokenize_as_strings(tokenizer):
    """Parquet written with large strings (polars) holds the same rows: same tokens and masks."""
    import pyarrow as pa

    rows = embedded.rows("language_modeling", conversational=True)[:6]
    large = pa.large_string()
    message = pa.struct([("role", large), ("content", large)])
    table = pa.table({"messages": pa.array([r["messages"] for r in rows], type=pa.list_(message))})
    for options in ({}, {"assistant_only_loss": True}):
        plain, _ = tokenize_sft(Dataset.from_list(rows), tokenizer, **options)
        ours, _ = tokenize_sft(Dataset(table), tokenizer, **options)
        assert ours.to_list() == plain.to_list()
