"""Epochs as TRL 1.16's SFTTrainer (transformers 5.24's Trainer) counts them, trained end to end.

12 rows, per_device_train_batch_size 8, 3 epochs, train_sampling_strategy sequential: an epoch is a
step of 8 rows and a step of 4 (TRL keeps the short last micro-batch); with gradient_accumulation_steps
2 an epoch is one step of both micro-batches; packed into 2 bins (fewer than the batch) an epoch is one
step of 2 bins. Both sides start from the same tiny model, in float32, without dropout, and train with
AdamW, linear decay and clipping; our side is `posttrain sft` itself (`sft.train` on a jsonl file and
the saved model). Every step's loss must agree to a relative error of 1e-5, and the step counts exactly.
"""

import json
import tempfile

import pytest
import torch
from _optional import import_or_skip
from datasets import Dataset

from posttrain.data import embedded
from posttrain.rl import sft

trl = import_or_skip("trl")  # a failure under CI, where trl is installed

N_ROWS, BATCH, EPOCHS, LEARNING_RATE = 12, 8, 3, 1e-3
RTOL = 1e-5


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The embedded tiny model (random init, no dropout) and tokenizer in a folder, and 12 rows as jsonl."""
    folder = tmp_path_factory.mktemp("model")
    model = embedded.build_model(seed=0)
    assert model.config.attention_dropout == 0.0
    model.save_pretrained(folder)
    embedded.build_tokenizer().save_pretrained(folder)
    rows = embedded.rows("prompt_completion", "train", seed=0)[:N_ROWS]
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder, data, rows


def trl_losses(folder, rows, **options) -> list[dict]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with tempfile.TemporaryDirectory() as out:
        args = trl.SFTConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to=[],
            save_strategy="no",
            logging_steps=1,
            per_device_train_batch_size=BATCH,
            num_train_epochs=EPOCHS,
            learning_rate=LEARNING_RATE,
            train_sampling_strategy="sequential",
            **options,
        )
        trainer = trl.SFTTrainer(
            model=AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=AutoTokenizer.from_pretrained(folder),
        )
        trainer.train()
        return [h for h in trainer.state.log_history if "loss" in h]


def our_losses(folder, data, out, **options) -> list[dict]:
    config = sft.SFTConfig(
        model_name_or_path=str(folder),
        dataset_name=str(data),
        output_dir=str(out),
        bf16=False,
        save_steps=0,
        logging_steps=0,
        disable_tqdm=True,
        report_to="none",
        learning_rate=LEARNING_RATE,
        train_sampling_strategy="sequential",
        **options,
    )
    assert (config.per_device_train_batch_size, config.num_train_epochs) == (BATCH, EPOCHS)  # TRL's defaults
    sft.train(config)
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r]


CASES = {
    # name: (options on both sides, optimizer steps per epoch)
    "batch 8 + 4": ({}, 2),
    "accumulation 2, one step of 8 + 4": ({"gradient_accumulation_steps": 2}, 1),
    "packed into 2 bins": ({"packing": True, "max_length": 64}, 1),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(CASES))
def test_per_step_losses_equal_trl_over_three_epochs(saved, tmp_path, case):
    folder, data, rows = saved
    options, steps_per_epoch = CASES[case]
    theirs = trl_losses(folder, rows, **options)
    ours = our_losses(folder, data, tmp_path / "ours", **options)
    assert len(theirs) == len(ours) == EPOCHS * steps_per_epoch
    for i, (a, b) in enumerate(zip(ours, theirs, strict=True)):
        assert abs(a["loss"] - b["loss"]) <= RTOL * abs(b["loss"]), (case, i + 1, a["loss"], b["loss"])
        assert a["epoch"] == pytest.approx(b["epoch"], abs=1e-9), (case, i + 1)
        assert a["num_tokens"] == b["num_tokens"], (case, i + 1)
    # the model moved: the later steps compare trajectories, not one model
    assert abs(theirs[0]["loss"] - theirs[steps_per_epoch]["loss"]) > 1e-3
