"""The process reward model: stepwise data, its tokenization and labels, the loss, the saved model, the
scorer, bad input, and the embedded run.

TRL 1.16 has no PRM trainer to compare with, so the references are plain loops written here from the
behaviour of TRL 0.19's `PRMTrainer.tokenize_row` (each step followed by the separator's tokens, the step's
label on the separator's last token, -100 elsewhere, bos before the prompt when the tokenizer has one) and
of transformers' token-classification loss (cross-entropy summed over labelled tokens, divided by their
number). Float32, relative error <= 1e-5.
"""

import json
import math
from pathlib import Path

import pytest
import torch
import yaml
from datasets import Dataset

from posttrain.cli import main
from posttrain.data import embedded, formats, stepwise
from posttrain.losses.prm import cross_entropy
from posttrain.rl import prm
from posttrain.rl.config import ConfigError

ROWS = [
    {"prompt": "3+14+25=", "completions": ["3+14=17", "17+25=42"], "labels": [True, True]},
    {"prompt": "1+2+3+4=", "completions": ["1+2=3", "3+3=7", "7+4=11"], "labels": [True, False, False]},
    {"prompt": "9+9=", "completions": ["9+9=17"], "labels": [False]},
    {"prompt": "", "completions": ["2+2=4", "4+0=4"], "labels": [True, True]},
]


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def bos_tokenizer():
    """The embedded tokenizer with a bos token, which TRL puts before the prompt."""
    tok = embedded.build_tokenizer()
    tok.add_special_tokens({"bos_token": "<|im_start|>"})
    assert tok.bos_token_id == 1
    return tok


def tokenize(rows, tokenizer, **kwargs):
    return stepwise.tokenize_stepwise(Dataset.from_list(rows), tokenizer, **kwargs)


def reference_row(
    tokenizer, row, sep="\n", last_only=False, max_length=None, max_prompt=None, max_completion=None
):
    """TRL 0.19's tokenization of one row, written out step by step."""
    prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        prompt = [tokenizer.bos_token_id] + prompt
    completion, labels = [], []
    for k, (step, label) in enumerate(zip(row["completions"], row["labels"], strict=True)):
        ids = (
            tokenizer(step, add_special_tokens=False)["input_ids"]
            + tokenizer(sep, add_special_tokens=False)["input_ids"]
        )
        keep = not last_only or k == len(row["completions"]) - 1
        completion += ids
        labels += [-100] * (len(ids) - 1) + [int(label) if keep else -100]
    if max_prompt is not None:
        prompt = prompt[-max_prompt:]
    if max_completion is not None:
        completion, labels = completion[:max_completion], labels[:max_completion]
    ids, labels = prompt + completion, [-100] * len(prompt) + labels
    if max_length is not None:
        ids, labels = ids[:max_length], labels[:max_length]
    return ids, labels


# ---------------------------------------------------------------------------------------------------------
# Data: format, tokenization, labels
# ---------------------------------------------------------------------------------------------------------


def test_stepwise_format_is_detected_and_checked():
    ds = Dataset.from_list(ROWS)
    fmt = formats.detect_format(ds)
    assert (fmt.kind, fmt.conversational, fmt.columns) == (
        "stepwise_supervision",
        False,
        ("prompt", "completions", "labels"),
    )
    formats.validate_rows(ds, fmt)  # well-formed
    with pytest.raises(ValueError, match="row 2: field 'labels' has 2 labels but 'completions' has 1 steps"):
        formats.validate_rows(Dataset.from_list(with_row(2, labels=[False, True])), fmt)
    with pytest.raises(
        ValueError, match=r"`prm` accepts stepwise supervision \(prompt, completions, labels\)"
    ):
        formats.check_format(embedded.dataset("preference"), ("stepwise_supervision",), "prm")


@pytest.mark.parametrize("sep", ["\n", "\n\n", " Step:"])
@pytest.mark.parametrize("tok", ["tokenizer", "bos_tokenizer"])
def test_labels_sit_on_each_separator_as_a_plain_loop_puts_them(request, sep, tok):
    tokenizer = request.getfixturevalue(tok)
    tokenized, info = tokenize(ROWS, tokenizer, step_separator=sep)
    assert info == {"dropped_unlabelled_rows": 0}
    for row, got in zip(ROWS, tokenized, strict=True):
        ids, labels = reference_row(tokenizer, row, sep)
        assert (got["input_ids"], got["labels"]) == (ids, labels)
        # one label per step, on the token that ends its separator
        text_ends = [tokenizer.decode(ids[: i + 1]) for i, y in enumerate(labels) if y != -100]
        assert [t.endswith(step + sep) for t, step in zip(text_ends, row["completions"], strict=True)] == [
            True
        ] * len(row["labels"])
        assert [y for y in labels if y != -100] == [int(x) for x in row["labels"]]


def test_train_on_last_step_only_keeps_the_last_label_in_training_rows_only(tokenizer):
    train, _ = tokenize(ROWS, tokenizer, train_on_last_step_only=True)
    held_out, _ = tokenize(ROWS, tokenizer, train_on_last_step_only=True, is_eval=True)
    for row, got, full in zip(ROWS, train, held_out, strict=True):
        assert got["labels"] == reference_row(tokenizer, row, last_only=True)[1]
        assert sum(y != -100 for y in got["labels"]) == 1
        assert full["labels"] == reference_row(tokenizer, row)[1]  # evaluation keeps every step, as TRL


@pytest.mark.parametrize(
    "limits",
    [
        {"max_prompt_length": 3},
        {"max_completion_length": 9},
        {"max_length": 14},
        {"max_length": 20, "max_prompt_length": 4, "max_completion_length": 12},
    ],
)
def test_truncation_is_trls_and_cut_steps_lose_their_label(tokenizer, limits):
    tokenized, info = tokenize(ROWS, tokenizer, **limits)
    expected = [
        reference_row(
            tokenizer,
            row,
            max_length=limits.get("max_length"),
            max_prompt=limits.get("max_prompt_length"),
            max_completion=limits.get("max_completion_length"),
        )
        for row in ROWS
    ]
    kept = [
        i for i, e in enumerate(expected) if any(y != -100 for y in e[1])
    ]  # a row without a label is dropped
    assert info == {"dropped_unlabelled_rows": len(ROWS) - len(kept)}
    assert [(r["input_ids"], r["labels"]) for r in tokenized] == [expected[i] for i in kept]
    # the limits cut some kept row (each compared with its own untruncated tokenization)
    assert any(len(expected[i][0]) < len(reference_row(tokenizer, ROWS[i])[0]) for i in kept)


def test_rows_left_without_a_label_are_dropped_and_counted(tokenizer):
    rows = [ROWS[0], {"prompt": "1+1+1+1+1+1+1+1=", "completions": ["1+1=2"], "labels": [True]}]
    tokenized, info = tokenize(rows, tokenizer, max_length=17)  # row 1: 16 prompt tokens, then 6
    assert info == {"dropped_unlabelled_rows": 1}
    assert [r["input_ids"] for r in tokenized] == [reference_row(tokenizer, ROWS[0], max_length=17)[0]]
    with pytest.raises(ValueError, match="no row keeps a labelled step after truncation"):
        tokenize(rows[1:], tokenizer, max_length=17)


# ---------------------------------------------------------------------------------------------------------
# Bad input: an error naming the row, field and step, before anything is tokenized
# ---------------------------------------------------------------------------------------------------------


def with_row(i, **changes):
    rows = [dict(r) for r in ROWS]
    rows[i].update(changes)
    return rows


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        (
            with_row(2, labels=[False, True]),
            r"row 2: field 'labels' has 2 labels but 'completions' has 1 steps",
        ),
        (
            with_row(1, completions=["1+2=3", "3+3=7\n7+4=11", "x"]),
            r"row 1: field 'completions', step 1 contains the step_separator '\\n'",
        ),
        (with_row(3, completions=["2+2=4", ""]), r"row 3: field 'completions', step 1 is an empty string"),
        (
            with_row(1, completions=[], labels=[]),
            r"row 1: field 'completions' is an empty list \(no step to label\)",
        ),
        (
            [{**r, "labels": [int(x) for x in r["labels"]]} for r in ROWS],
            r"row 0: field 'labels' must be a list of bools \(one per step\), got list<item: int64>",
        ),
        (with_row(1, labels=[True, None, False]), r"row 1: field 'labels', step 1 is None"),
        (with_row(2, completions=None), r"row 2: field 'completions' is None"),
        (with_row(3, prompt=None), r"row 3: field 'prompt' is None"),
        (
            [{**r, "prompt": [{"role": "user", "content": "1+1="}]} for r in ROWS],
            r"row 0: field 'prompt' is a list of messages; stepwise supervision takes a plain-text prompt",
        ),
        (
            [{**r, "completions": [[s] for s in r["completions"]]} for r in ROWS],
            r"row 0: field 'completions' must be a list of strings \(the steps\)",
        ),
    ],
)
def test_malformed_rows_are_named(tokenizer, rows, message):
    with pytest.raises(ValueError, match=message):
        tokenize(rows, tokenizer)


def test_a_step_holding_another_separator_is_named(tokenizer):
    rows = with_row(0, completions=["3+14=17", "17+25=42 Step: done"])
    tokenize(rows, tokenizer)  # "\n" is the separator: fine
    with pytest.raises(
        ValueError, match=r"row 0: field 'completions', step 1 contains the step_separator ' Step:'"
    ):
        tokenize(rows, tokenizer, step_separator=" Step:")


def test_bad_rows_stop_the_cli_before_the_run_folder_is_written(tmp_path, capsys):
    data = tmp_path / "data.jsonl"
    rows = with_row(1, labels=[True])
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "run"
    assert main(["prm", "--dataset_name", str(data), "--output_dir", str(out)]) == 2
    assert "row 1: field 'labels' has 1 labels but 'completions' has 3 steps" in capsys.readouterr().err
    assert not out.exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--step_separator", ""], "step_separator must be a non-empty string"),
        (["--max_length", "0"], "max_length must be >= 1"),
        (["--max_prompt_length", "0"], "max_prompt_length must be >= 1"),
        (
            ["--loss_type", "hinge"],
            r"loss_type='hinge' is not a PRM loss; expected one of \['cross_entropy'\]",
        ),
    ],
)
def test_cli_names_the_bad_option(capsys, argv, message):
    import re

    assert main(["prm", *argv]) == 2
    assert re.search(message, capsys.readouterr().err)


# ---------------------------------------------------------------------------------------------------------
# Loss and metrics against a plain per-step loop
# ---------------------------------------------------------------------------------------------------------


def plain_step_loss(model, tokenizer, rows, sep="\n", last_only=False):
    """Each row alone (no padding), each step's cross-entropy at its separator's last token, in Python."""
    losses, right, solved = [], 0, 0
    for row in rows:
        ids, labels = reference_row(tokenizer, row, sep, last_only=last_only)
        logits = model(input_ids=torch.tensor([ids])).logits[0]  # (T, 2)
        row_right = []
        for t, y in enumerate(labels):
            if y != -100:
                losses.append(-torch.log_softmax(logits[t].double(), -1)[y])
                row_right.append(int(logits[t].argmax()) == y)
        right += sum(row_right)
        solved += all(row_right)
    n = len(losses)
    return torch.stack(losses).sum() / n, right / n, solved / len(rows)


@pytest.mark.parametrize("last_only", [False, True])
def test_loss_accuracy_and_gradient_equal_a_plain_per_step_loop(tokenizer, last_only):
    model = prm.load_prm_model(None, seed=1)
    prm.disable_dropout(model)
    tokenized, _ = tokenize(ROWS, tokenizer, train_on_last_step_only=last_only)
    batch = prm.collate_steps(list(tokenized), tokenizer.pad_token_id)
    assert (batch["attention_mask"] == 0).any()  # padded: the rows differ in length
    num_items = prm.count_steps(batch)
    loss, metrics = prm.prm_step_loss(model, batch, num_items)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    ref_loss, ref_accuracy, ref_solved = plain_step_loss(model, tokenizer, ROWS, last_only=last_only)
    ref_grads = torch.autograd.grad(ref_loss, list(model.parameters()))
    assert int(num_items) == (len(ROWS) if last_only else sum(len(r["labels"]) for r in ROWS))
    assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
    assert metrics["accuracy"].item() == pytest.approx(ref_accuracy, rel=1e-6)
    assert metrics["solution_accuracy"].item() == pytest.approx(ref_solved, rel=1e-6)  # one micro-batch
    for g, r in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, r.float(), rtol=1e-4, atol=1e-6)


def test_loss_is_the_registered_cross_entropy_over_labelled_tokens():
    # logits (B=1, T=3, 2); labels on positions 0 and 2: -(log softmax([0, ln 3])[1] + log softmax([0, 0])[0]) / 2
    logits = torch.tensor([[[0.0, math.log(3.0)], [5.0, -5.0], [0.0, 0.0]]])
    labels = torch.tensor([[1, -100, 0]])
    expected = -(math.log(3 / 4) + math.log(1 / 2)) / 2
    assert cross_entropy(logits, labels, 2).item() == pytest.approx(expected, rel=1e-6)
    assert cross_entropy(logits, labels, 4).item() == pytest.approx(expected / 2, rel=1e-6)  # step's share


def test_eval_metrics_are_exact_over_micro_batches(tokenizer):
    model = prm.load_prm_model(None, seed=2).eval()
    tokenized, _ = tokenize(ROWS * 3, tokenizer)
    with torch.no_grad():
        got = prm.evaluate_rows(model, tokenized, pad_token_id=tokenizer.pad_token_id, batch_size=5)
        loss, accuracy, solved = plain_step_loss(model, tokenizer, ROWS * 3)
    assert got["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(accuracy, rel=1e-9)
    assert got["solution_accuracy"] == pytest.approx(solved, rel=1e-9)


# ---------------------------------------------------------------------------------------------------------
# The model, its saved folder and the scorer
# ---------------------------------------------------------------------------------------------------------


def test_causal_lm_checkpoint_gets_a_fresh_two_way_head(tmp_path):
    causal = embedded.build_model(seed=3)
    causal.save_pretrained(tmp_path)
    model = prm.load_prm_model(str(tmp_path), seed=5)
    for name, p in causal.model.named_parameters():
        assert torch.equal(model.model.get_parameter(name), p), name
    assert model.score.weight.shape == (2, causal.config.hidden_size)
    assert model.config.id2label == {0: "wrong", 1: "right"}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A short PRM run on a small stepwise dataset (its own eval split): the saved folder and the config."""
    folder = tmp_path_factory.mktemp("prm-run")
    embedded.build_model(seed=0).save_pretrained(folder / "lm")  # a causal LM to start from
    embedded.build_tokenizer().save_pretrained(folder / "lm")
    for split, n in (("train", 64), ("test", 24)):
        rows = embedded.stepwise_rows(split)[:n]
        (folder / "data").mkdir(exist_ok=True)
        (folder / "data" / f"{split}.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    config = prm.PRMConfig(
        model_name_or_path=str(folder / "lm"),
        dataset_name=str(folder / "data"),
        output_dir=str(folder / "run"),
        max_steps=4,
        learning_rate=1e-3,
        per_device_train_batch_size=16,
        save_steps=0,
        report_to="none",
        disable_tqdm=True,
    )
    prm.train(config)
    return folder / "run", config


def test_saved_model_reloads_and_gives_the_same_scores(trained, tokenizer):
    from transformers import AutoModelForTokenClassification

    output_dir, config = trained
    reloaded = AutoModelForTokenClassification.from_pretrained(output_dir).eval()
    assert type(reloaded).__name__ == "Qwen2ForTokenClassification" and reloaded.config.num_labels == 2
    assert reloaded.config.prm_step_separator == "\n"
    _, eval_rows, _ = prm.load_stepwise_data(config, tokenizer)
    with torch.no_grad():
        again = prm.evaluate_rows(reloaded, eval_rows, pad_token_id=tokenizer.pad_token_id)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    final = [r for r in records if "eval_loss" in r][-1]
    assert final["step"] == 4
    assert again["loss"] == pytest.approx(final["eval_loss"], rel=1e-5)
    assert again["accuracy"] == final["eval_accuracy"]
    assert again["solution_accuracy"] == final["eval_solution_accuracy"]


def plain_scores(model, tokenizer, prompt, completion):
    """P(right) of each step, the completion split at "\n" by hand and each step scored in its own forward."""
    steps = [s for s in completion.split("\n") if s.strip()]
    ids, ends = tokenizer(prompt)["input_ids"], []
    for step in steps:
        ids = ids + tokenizer(step)["input_ids"] + tokenizer("\n")["input_ids"]
        ends.append(len(ids) - 1)
    with torch.no_grad():
        probs = model(input_ids=torch.tensor([ids])).logits[0].softmax(-1)[:, 1]
    return [probs[e].item() for e in ends]


def test_scorer_aggregates_per_step_probabilities_like_a_plain_computation(trained, tokenizer):
    from transformers import AutoModelForTokenClassification

    output_dir, _ = trained
    model = AutoModelForTokenClassification.from_pretrained(output_dir).eval()
    prompts = ["3+14+25=", "1+2+3+4=", "9+9=", "5+5+5="]
    completions = ["3+14=17\n17+25=42", "1+2=3\n3+3=7\n7+4=11\n", "9+9=18", "\n \n"]  # the last: no step
    steps = [plain_scores(model, tokenizer, p, c) for p, c in zip(prompts, completions, strict=True)]
    assert [len(s) for s in steps] == [2, 3, 1, 0]
    expected = {
        "min": [min(s) if s else 0.0 for s in steps],
        "prod": [math.prod(s) if s else 0.0 for s in steps],
        "last": [s[-1] if s else 0.0 for s in steps],
    }
    for aggregation, values in expected.items():
        reward = prm.process_reward(str(output_dir), aggregation=aggregation, batch_size=3)
        assert reward.__name__ == f"run_{aggregation}"
        got = reward(prompts=prompts, completions=completions, completion_ids=[[1]] * 4, answer=["x"] * 4)
        assert got == pytest.approx(values, rel=1e-5, abs=1e-7)


def test_scorer_works_through_grpo_reward_resolution(trained, tmp_path, monkeypatch):
    from posttrain.rl import rewards

    output_dir, _ = trained
    (tmp_path / "my_prm_rewards.py").write_text(
        f"from posttrain.rl.prm import process_reward\nprm_min = process_reward({str(output_dir)!r})\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    [resolved] = rewards.resolve(["my_prm_rewards:prm_min"])
    assert resolved.name == "run_min"
    prompts, completions = ["9+9=", "9+9=", "2+3+4="], ["9+9=18", "9+9=17", "2+3=5\n5+4=9"]
    scored = rewards.score(
        [resolved],
        prompts=prompts,
        completions=completions,
        completion_ids=[[1]] * 3,
        columns={"answer": ["18", "18", "9"]},
        trainer_state=rewards.TrainerState(),
    )
    direct = prm.process_reward(str(output_dir))(prompts=prompts, completions=completions)
    assert scored.values[:, 0].tolist() == pytest.approx(direct, rel=1e-6)


def test_scorer_bad_input_is_named(trained, tmp_path):
    output_dir, _ = trained
    with pytest.raises(ConfigError, match=r"aggregation='mean': expected one of min, prod, last"):
        prm.process_reward(str(output_dir), aggregation="mean")
    embedded.build_model().save_pretrained(tmp_path / "lm")
    embedded.build_tokenizer().save_pretrained(tmp_path / "lm")
    with pytest.raises(ConfigError, match=r"not a trained process reward model .*Qwen2ForCausalLM"):
        prm.process_reward(str(tmp_path / "lm"))
    reward = prm.process_reward(str(output_dir))
    with pytest.raises(
        ValueError, match="the batch's row 1: a process reward model scores plain-text prompts"
    ):
        reward(prompts=["1+1=", [{"role": "user", "content": "1+1="}]], completions=["1+1=2", "2"])
    with pytest.raises(ValueError, match=r"the batch's row 0: prompt \+ steps is \d+ tokens, longer than"):
        reward(prompts=["1" * 300], completions=["1+1=2"])


# ---------------------------------------------------------------------------------------------------------
# The embedded task and run
# ---------------------------------------------------------------------------------------------------------


def test_embedded_stepwise_split_is_deterministic_disjoint_and_labelled_by_checking_each_step():
    train, test = embedded.stepwise_rows("train"), embedded.stepwise_rows("test")
    assert train == embedded.stepwise_rows("train") and test == embedded.stepwise_rows("test")
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    solutions = {}  # prompt -> (number of steps, is the last one wrong) of each of its solutions
    for row in train + test:
        operands = [int(x) for x in row["prompt"].rstrip("=").split("+")]
        assert len(operands) in (3, 4) and all(0 <= x <= 9 for x in operands)
        value = operands[0]
        for k, (step, label) in enumerate(zip(row["completions"], row["labels"], strict=True)):
            left, result = step.split("=")
            x, y = map(int, left.split("+"))
            assert (x, y) == (value, operands[k + 1])  # carries on from the previous result
            assert label == (int(result) == x + y)
            if (
                not label
            ):  # a plausible mistake: off by one or ten, or the difference; the solution ends there
                assert (
                    int(result) in (x + y + 1, x + y - 1, x + y + 10, x + y - 10, abs(x - y))
                    and int(result) >= 0
                )
                assert k == len(row["labels"]) - 1
            value = int(result)
        solutions.setdefault(row["prompt"], []).append((len(row["labels"]), not row["labels"][-1]))
    # every problem: its right solution and one ending at a mistake at each step, so the prompt alone never
    # tells the labels
    assert all(s == [(len(s) - 1, False), *((k, True) for k in range(1, len(s)))] for s in solutions.values())
    assert len(solutions) == 2560 and len({r["prompt"] for r in test}) == 160
    labels = [x for r in test for x in r["labels"]]
    assert 0.6 < sum(labels) / len(labels) < 0.7


def step_pair(step):
    """(x, y) of a step "x+y=z"."""
    return tuple(int(x) for x in step.split("=")[0].split("+"))


def step_pairs_of(row):
    return {step_pair(step) for step in row["completions"]}


def test_embedded_stepwise_test_steps_are_unseen_in_training():
    # a step's label depends only on its text, so a held-out step must be one no training row has
    held_out = embedded.held_out_step_pairs()
    assert held_out == embedded.held_out_step_pairs() != embedded.held_out_step_pairs(seed=1)
    assert len(held_out) == 280 // 8  # one pair in 8 of x in 0..27, y in 0..9
    train, test = embedded.stepwise_rows("train"), embedded.stepwise_rows("test")
    assert not any(step_pairs_of(r) & held_out for r in train)  # right or wrong version
    right_solutions = [r for r in test if all(r["labels"]) and len(r["labels"]) == r["prompt"].count("+")]
    assert len(right_solutions) == 160 and all(step_pairs_of(r) & held_out for r in right_solutions)
    train_steps = {s for r in train for s in r["completions"]}
    test_steps = [s for r in test for s in r["completions"]]
    unseen = [s for s in test_steps if step_pair(s) in held_out]
    assert not set(unseen) & train_steps and len(unseen) > 0.4 * len(test_steps)
    for seed in (1, 2):  # the invariant holds under any seed, not just the default's draw
        held = embedded.held_out_step_pairs(seed)
        assert not any(step_pairs_of(r) & held for r in embedded.stepwise_rows("train", seed))
        assert all(
            step_pairs_of(r) & held
            for r in embedded.stepwise_rows("test", seed)
            if len(r["labels"]) == r["prompt"].count("+")
        )


# TRL 0.19's PRMConfig (the last release with a PRM trainer): its names and defaults, which ours keep for any
# model other than the embedded one.
TRL_PRM_DEFAULTS = {
    "learning_rate": 1e-5,
    "max_length": 1024,
    "max_prompt_length": 512,
    "max_completion_length": None,
    "disable_dropout": True,
    "step_separator": "\n",
    "train_on_last_step_only": False,
}


def test_prm_options_are_trl_0_19s_with_its_defaults():
    ours = prm.PRMConfig(model_name_or_path="some/model", dataset_name="some/data")  # a real run's
    assert {name: getattr(ours, name) for name in TRL_PRM_DEFAULTS} == TRL_PRM_DEFAULTS


def read_run(out):
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "loss" in r], [r for r in records if "eval_loss" in r]


def held_out_metrics(out):
    """Exact metrics of the saved model on the embedded held-out rows, computed here from the reloaded folder."""
    from transformers import AutoModelForTokenClassification

    tokenizer = embedded.build_tokenizer()
    rows, _ = stepwise.tokenize_stepwise(
        Dataset.from_list(embedded.stepwise_rows("test")), tokenizer, is_eval=True
    )
    model = AutoModelForTokenClassification.from_pretrained(out).eval()
    return prm.evaluate_rows(model, rows, pad_token_id=tokenizer.pad_token_id)


def held_out_pair_accuracy(out):
    """Step accuracy of the saved model on the test steps whose pair (x, y) no training row has."""
    from transformers import AutoModelForTokenClassification

    model = AutoModelForTokenClassification.from_pretrained(out)
    rows, held_out = embedded.stepwise_rows("test"), embedded.held_out_step_pairs()
    probs = prm.step_probabilities(
        model, embedded.build_tokenizer(), [r["prompt"] for r in rows], [r["completions"] for r in rows], "\n"
    )
    right = [
        (p > 0.5) == label
        for r, ps in zip(rows, probs, strict=True)
        for step, label, p in zip(r["completions"], r["labels"], ps, strict=True)
        if step_pair(step) in held_out
    ]
    return sum(right) / len(right)


@pytest.mark.slow
def test_embedded_default_end_to_end_reaches_the_held_out_step_accuracy_the_issue_asks(tmp_path):
    # `posttrain prm` with no arguments but a run folder: 5 epochs of 139 steps from the step-by-step solver
    # (the start model, trained once per test session into the session's POSTTRAIN_CACHE), data, training,
    # exact held-out metrics, the saved model. About two held-out steps in three are right, so always answering
    # "right" scores ~0.65; the issue's target is >= 0.9, on steps the PRM has not seen (those on held-out
    # pairs) as on all test steps.
    out = tmp_path / "run"
    assert main(["prm", "--output_dir", str(out), "--disable_tqdm", "true", "--report_to", "none"]) == 0
    train_lines, evals = read_run(out)
    assert [r["step"] for r in train_lines] == list(range(1, 696)) and [r["step"] for r in evals] == [695]
    assert train_lines[0]["loss"] == pytest.approx(math.log(2), abs=0.05)  # fresh head: a coin flip
    assert {"accuracy", "solution_accuracy", "num_tokens", "grad_norm"} <= set(train_lines[-1])
    again = held_out_metrics(out)
    assert again["loss"] == pytest.approx(evals[-1]["eval_loss"], rel=1e-5)
    assert again["solution_accuracy"] == evals[-1]["eval_solution_accuracy"]
    # On all test steps / those with a held-out pair, seed 42 gave 0.995 / 0.992 on an AMD EPYC and 0.969 /
    # 0.932 on an Intel Xeon (MKL rounds differently there, so the start model and the run differ); seeds 1
    # and 7 on the EPYC 0.985 / 0.966 and 0.979 / 0.954 (4 epochs, the folds as torch ops). With the folds in C,
    # 5 epochs on the Xeon: seeds 42 / 1 / 7 0.983 / 0.964, 0.954 / 0.904, 0.986 / 0.974 (rl/prm.py). So: 0.95 on
    # all steps, the issue's 0.9 on unseen ones.
    assert again["accuracy"] == evals[-1]["eval_accuracy"] >= 0.95
    assert held_out_pair_accuracy(out) >= 0.9
    info = json.loads((out / "run_info.json").read_text())
    assert info["start_model"] == prm.embedded_start_model()  # the cached folder: not trained again
    # the start model learnt from the train split's right solutions only: no held-out step pair
    start_data = yaml.safe_load((Path(info["start_model"]) / "config.yaml").read_text())["dataset_name"]
    solutions = [json.loads(line) for line in (Path(start_data) / "train.jsonl").read_text().splitlines()]
    assert len(solutions) == embedded.STEPWISE_TRAIN_PROBLEMS
    held_out = embedded.held_out_step_pairs()
    assert not any(step_pair(s) in held_out for r in solutions for s in r["completion"].splitlines())
    assert info["train_dropped_unlabelled_rows"] == 0 == info["eval_dropped_unlabelled_rows"]


def test_grpo_scores_with_a_process_reward_model(trained, tmp_path):
    # --process_reward_model_name_or_path: the PRM's aggregated step probabilities are a reward, after the
    # reward model and before the functions (TRL's script order), weighted and logged like any other.
    from posttrain.cli import main

    output_dir, _ = trained
    rows = [{"prompt": p, "answer": "0"} for p in ("2+3+4=", "1+1+5=", "7+2+1=", "3+3+3=")]
    data = tmp_path / "prompts.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "grpo"
    argv = ["grpo", "--model_name_or_path", str(output_dir.parent / "lm"), "--dataset_name", str(data),
            "--output_dir", str(out), "--process_reward_model_name_or_path", str(output_dir),
            "--process_reward_aggregation", "prod", "--reward_funcs", "format", "--reward_weights", "2.0,0.5",
            "--max_completion_length", "6", "--per_device_train_batch_size", "8", "--num_generations", "4",
            "--max_steps", "1", "--logging_steps", "1", "--save_steps", "0", "--disable_tqdm", "true",
            "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert len(logged) == 8
    scorer = prm.process_reward(str(output_dir), aggregation="prod")
    direct = scorer(prompts=[r["prompt"] for r in logged], completions=[r["completion"] for r in logged])
    assert [r["rewards"]["run_prod"] for r in logged] == pytest.approx(direct, rel=1e-5, abs=1e-7)
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    assert record["reward"] == pytest.approx(
        2.0 * record["rewards/run_prod/mean"] + 0.5 * record["rewards/format/mean"], rel=1e-5, abs=1e-7
    )


def test_grpo_process_reward_options_are_checked(tmp_path):
    from posttrain.rl import grpo

    with pytest.raises(
        ConfigError, match=r"process_reward_aggregation must be one of min, prod, last, got 'mean'"
    ):
        grpo.GRPOConfig(
            output_dir=str(tmp_path), process_reward_model_name_or_path="x", process_reward_aggregation="mean"
        )
    with pytest.raises(ConfigError, match=r"reward_weights has 1 values for 2 rewards"):
        grpo.GRPOConfig(output_dir=str(tmp_path), process_reward_model_name_or_path="x", reward_funcs=["format"],
                        reward_weights=[1.0])  # fmt: skip
    only_prm = grpo.GRPOConfig(output_dir=str(tmp_path), process_reward_model_name_or_path="x")
    assert only_prm.reward_funcs == []  # no exact_match default when a model scores
    with pytest.raises(ConfigError, match=r"process reward model '.*missing'"):
        grpo.train(
            grpo.GRPOConfig(
                output_dir=str(tmp_path / "run"), process_reward_model_name_or_path=str(tmp_path / "missing")
            )
        )
    assert not (tmp_path / "run").exists()


def test_grpo_refuses_a_process_reward_model_on_conversational_prompts(trained, tmp_path):
    # Found before any work: the scorer reads plain text, so a conversational dataset would fail at the
    # first reward call, after a whole generation.
    from posttrain.rl import grpo

    output_dir, _ = trained
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in embedded.rows("prompt_only", conversational=True)[:8]))
    config = grpo.GRPOConfig(
        output_dir=str(tmp_path / "run"), model_name_or_path=str(output_dir.parent / "lm"), dataset_name=str(data),
        process_reward_model_name_or_path=str(output_dir), report_to="none",
    )  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"process_reward_model_name_or_path: .* prompts are conversational"
    ):
        grpo.train(config)
    assert not (tmp_path / "run").exists()


def test_an_architecture_without_a_token_classification_head_stops_before_the_run_folder(tmp_path):
    from transformers import OPTConfig, OPTForCausalLM

    config = OPTConfig(vocab_size=128, hidden_size=16, num_hidden_layers=1, ffn_dim=32, num_attention_heads=2,
                       max_position_embeddings=64, word_embed_proj_dim=16)  # fmt: skip
    OPTForCausalLM(config).save_pretrained(tmp_path / "opt")
    embedded.build_tokenizer().save_pretrained(tmp_path / "opt")
    data = tmp_path / "data.jsonl"
    data.write_text("\n".join(json.dumps(r) for r in embedded.stepwise_rows("train")[:16]))
    run = prm.PRMConfig(model_name_or_path=str(tmp_path / "opt"), dataset_name=str(data),
                        output_dir=str(tmp_path / "run"), report_to="none")  # fmt: skip
    with pytest.raises(ValueError, match=r"no token-classification model in transformers"):
        prm.train(run)
    assert not (tmp_path / "run").exists()
