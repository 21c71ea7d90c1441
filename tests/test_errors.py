"""Named errors that no other test triggered (every `raise` in posttrain/ outside kernels/ was grepped
against tests/): each is raised by the input that should raise it, with its message naming the row,
field or option. Errors of the kernels, checkpoints, model loading and evaluation are tested with those."""

import pytest
import torch
from datasets import Dataset, DatasetDict

from posttrain.data import collate, embedded, formats, loading, tokenization
from posttrain.rl import loop, sft
from posttrain.rl.config import ConfigError, TrainConfig

U = lambda text: {"role": "user", "content": text}
A = lambda text: {"role": "assistant", "content": text}


# ---------------------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------------------


def test_best_fit_decreasing_rejects_items_that_fit_no_bin():
    with pytest.raises(ValueError, match=r"item 1 has length 0, outside \[1, 4\]"):
        collate.best_fit_decreasing([3, 0], 4)
    with pytest.raises(ValueError, match=r"item 0 has length 5, outside \[1, 4\]"):
        collate.best_fit_decreasing([5, 1], 4)


def test_embedded_task_names_bad_split_and_kind():
    with pytest.raises(ValueError, match=r"split must be 'train' or 'test', got 'dev'"):
        embedded.problems("dev")
    with pytest.raises(ValueError, match=r"unknown kind 'chat': expected one of prompt_completion"):
        embedded.rows("chat")


def test_detect_format_wants_one_split():
    splits = DatasetDict({"train": Dataset.from_list([{"text": "a"}])})
    with pytest.raises(TypeError, match=r"pass one split, not a DatasetDict \(splits: \['train'\]\)"):
        formats.detect_format(splits)


@pytest.mark.parametrize(
    ("message", "error"),
    [
        (
            {"role": 1, "content": "x"},
            r"row 0: field 'messages', message 0: 'role' must be a string, got int64",
        ),
        (
            {"role": "user", "content": 3},
            r"row 0: field 'messages', message 0: 'content' must be a string \(text-only messages\), got int64",
        ),
    ],
)
def test_message_fields_must_be_strings(message, error):
    dataset = Dataset.from_list([{"messages": [message]}])
    fmt = formats.check_format(dataset, ["language_modeling"], "sft")
    with pytest.raises(ValueError, match=error):
        formats.validate_rows(dataset, fmt)


def test_implicit_prompt_extraction_names_the_row():
    rows = [{"chosen": "1+1=2", "rejected": "1+1=3"}, {"chosen": "", "rejected": "x"}]
    with pytest.raises(ValueError, match=r"row 1: chosen and rejected must both be non-empty"):
        formats.with_explicit_prompt(Dataset.from_list(rows))


def test_data_files_only_for_folders_and_hub(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n')
    with pytest.raises(
        ValueError, match=r"data_files is for Hub ids and folders; .*rows.jsonl.* is a single file"
    ):
        loading.load_splits(str(path), data_files="other.jsonl")


def test_list_of_rows_with_mixed_column_types():
    with pytest.raises(
        ValueError, match=r"row 1: field 'a' is a str but row 0 has a int; a column holds one type"
    ):
        loading.load_splits([{"a": 1}, {"a": "x"}])
    # Same Python type, incompatible Arrow types: the generic message, with Arrow's reason
    with pytest.raises(ValueError, match=r"could not build a dataset from the list of rows: "):
        loading.load_splits([{"a": [1]}, {"a": [[1]]}])


def test_assistant_masks_need_conversations():
    tokenizer = embedded.build_tokenizer()
    with pytest.raises(ValueError, match=r"assistant_masks needs conversational data"):
        tokenization.tokenize_prompt_completions(tokenizer, ["1+1="], ["2"], assistant_masks=True)


def test_row_without_completion_tokens():
    # A template that renders assistant turns as an empty header: the completion adds no token.
    tokenizer = embedded.build_tokenizer()
    tokenizer.chat_template = (
        "{%- for m in messages %}{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
        "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
        "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    )
    rows = [{"prompt": [U("1+1=")], "completion": [A("2")]}]
    with pytest.raises(ValueError, match=r"row 0: no completion tokens to train on after tokenization"):
        tokenization.tokenize_sft(Dataset.from_list(rows), tokenizer)


# ---------------------------------------------------------------------------------------------------------
# Loop and config
# ---------------------------------------------------------------------------------------------------------


def _run(tmp_path, **overrides) -> loop.Run:
    config = TrainConfig(output_dir=str(tmp_path), learning_rate=1e-3, report_to="none", **overrides)
    return loop.Run(config=config, command="test", output_dir=tmp_path, device=torch.device("cpu"))


def test_gradient_checkpointing_on_a_model_without_it(tmp_path):
    model = torch.nn.Linear(4, 4)  # no supports_gradient_checkpointing
    with pytest.raises(ConfigError, match=r"gradient_checkpointing=true but Linear does not support it"):
        loop.prepare_model(_run(tmp_path, gradient_checkpointing=True), model)


def test_no_trainable_parameters(tmp_path):
    model = embedded.build_model(num_hidden_layers=1).requires_grad_(False)
    with pytest.raises(ValueError, match=r"the model has no trainable parameters"):
        loop.build_optimizer(model, _run(tmp_path).config)


def test_build_optimizer_without_learning_rate(tmp_path):
    config = TrainConfig(output_dir=str(tmp_path), learning_rate=None)
    with pytest.raises(ConfigError, match=r"^learning_rate is not set$"):
        loop.build_optimizer(embedded.build_model(num_hidden_layers=1), config)


def test_train_set_smaller_than_one_micro_batch_with_drop_last(tmp_path):
    """Without drop_last a short epoch still trains (tests/test_epochs.py); with it, 788 rows under a
    micro-batch of 800 leave nothing: a named error before the run folder is written."""
    config = sft.SFTConfig(
        output_dir=str(tmp_path / "run"),
        per_device_train_batch_size=800,
        dataloader_drop_last=True,
        report_to="none",
        disable_tqdm=True,
    )
    message = (
        r"the train set has 788 rows, fewer than one micro-batch on all processes \(per_device_train_batch_size "
        r"800 x processes 1 = 800\): dataloader_drop_last=true drops every micro-batch of the epoch"
    )
    with pytest.raises(ConfigError, match=message):
        sft.train(config)
    assert not (tmp_path / "run").exists()  # raised before the run folder is written


def test_sft_max_length_below_two():
    with pytest.raises(ConfigError, match=r"max_length must be >= 2 \(or none\), got 1"):
        sft.SFTConfig(max_length=1)
