"""`posttrain eval` (posttrain/evaluate.py): its numbers against independent computations.

- exact match: equal to `embedded.exact_match` (transformers' `generate`, greedy) on the same model, for the
  embedded SFT model (98 % held-out) and for a blend of it with random weights (about a third right, so
  near-ties between tokens are common and a difference in decoding would show);
- reward functions and the reward model: each completion's value equal to a direct call (the function on
  the completions; the reward model's forward on the text alone), the means those of the direct values;
- KL: exactly 0 against the model itself; against another model equal to a plain per-row computation (full
  logits, log-softmax, gather; float32, 1e-5);
- the JSON file holds the printed numbers; every bad input stops before generation with a one-line message
  naming the option.
"""

import json
import math

import pytest
import torch

from posttrain import evaluate
from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl import rewards, rollout, sft
from posttrain.rl.models import load_causal_lm


@pytest.fixture(scope="module")
def sft_model():
    return sft.embedded_sft_model()


@pytest.fixture(scope="module")
def blended_model(sft_model, tmp_path_factory):
    """0.7 x the SFT model + 0.3 x a random one: 35 % held-out exact match (between 0 and 1, so the
    comparison is not vacuous), saved with the embedded tokenizer."""
    model, other = load_causal_lm(sft_model), embedded.build_model(seed=1)
    with torch.no_grad():
        for p, q in zip(model.parameters(), other.parameters(), strict=True):
            p.mul_(0.7).add_(q, alpha=0.3)
    path = tmp_path_factory.mktemp("blended")
    model.save_pretrained(path)
    embedded.build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def reward_model(tmp_path_factory):
    """A tiny sequence-classification model (one label, random weights) and its tokenizer, saved."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    model = AutoModelForSequenceClassification.from_config(embedded.tiny_model_config(num_labels=1))
    path = tmp_path_factory.mktemp("rm")
    model.save_pretrained(path)
    embedded.build_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture
def no_generation(monkeypatch):
    """Generation fails the test: errors must come before it."""

    def fail(*args, **kwargs):
        raise AssertionError("generation started before the bad input was found")

    monkeypatch.setattr(rollout, "generate", fail)


@pytest.mark.parametrize("which", ["sft_model", "blended_model"])
def test_exact_match_equals_embedded_exact_match(which, request, tmp_path):
    path = request.getfixturevalue(which)
    result = evaluate.run(evaluate.EvalConfig(model_name_or_path=path, output_file=str(tmp_path / "e.json")))
    expected = embedded.exact_match(load_causal_lm(path), embedded.build_tokenizer())["exact_match"]
    assert result.summary["rewards/exact_match/mean"] == pytest.approx(expected, abs=1e-12)
    assert result.summary["num_prompts"] == len(embedded.problems("test")) == 112
    if which == "blended_model":
        assert 0.2 < expected < 0.5
    else:
        assert expected > 0.9


def test_json_holds_the_printed_numbers_and_defaults_to_the_model_folder(blended_model, capsys):
    code = main(
        ["eval", blended_model, "--max_eval_samples", "40", "--ref_model_name_or_path", blended_model]
    )
    assert code == 0
    printed = {}
    for line in capsys.readouterr().out.splitlines():
        parts = line.split()
        if line.startswith("  ") and len(parts) == 2:
            printed[parts[0]] = float(parts[1])
    written = json.loads((evaluate.Path(blended_model) / evaluate.EVAL_FILE).read_text())
    assert set(printed) == {
        "rewards/exact_match/mean", "rewards/exact_match/std", "kl", "kl_std", "completions/mean_length",
        "completions/min_length", "completions/max_length", "completions/clipped_ratio",
    }  # fmt: skip
    for key, value in printed.items():
        assert value == pytest.approx(written[key], rel=1e-5, abs=1e-12), key
    assert written["num_prompts"] == 40 and written["split"] == "test" and written["kl"] == 0.0


def test_rewards_and_reward_model_equal_direct_calls(blended_model, reward_model):
    from transformers import AutoModelForSequenceClassification

    tokenizer = embedded.build_tokenizer()
    rows = evaluate.load_rows(tokenizer, limit=10)
    reward_list = rewards.resolve(
        ["exact_match", "format", "_online_rewards:length"], reward_model_name_or_path=reward_model
    )
    result = evaluate.evaluate(
        load_causal_lm(blended_model), tokenizer, rows, reward_list=reward_list, num_generations=3,
        max_completion_length=4, temperature=1.0, generation_batch_size=6, seed=0,
    )  # fmt: skip
    records = result.records
    assert len(records) == 30
    prompts = [r["prompt"] for r in records]
    completions = [r["completion"] for r in records]
    assert len(set(completions)) > 3  # sampled: the completions vary
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    with torch.no_grad():  # each text alone: no padding, no batching
        rm_scores = [
            float(rm(**tokenizer(p + c, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
            for p, c in zip(prompts, completions, strict=True)
        ]
    direct = {
        "exact_match": [float(embedded.is_correct(p, c)) for p, c in zip(prompts, completions, strict=True)],
        "format": rewards.format(completions=completions),
        "length": [float(len(c)) for c in completions],
        reward_list[0].name: rm_scores,
    }
    for name, values in direct.items():
        got = [r["rewards"][name] for r in records]
        assert got == pytest.approx(values, rel=1e-5, abs=1e-6), name
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        assert result.summary[f"rewards/{name}/mean"] == pytest.approx(mean, rel=1e-5, abs=1e-6), name
        assert result.summary[f"rewards/{name}/std"] == pytest.approx(std, rel=1e-5, abs=1e-6), name
    assert [r["answer"] for r in records[:3]] == [rows[0]["answer"]] * 3  # the columns, per completion


def plain_kl(model, ref, prompt_ids, completion_ids) -> float:
    """sum_t log pi(y_t) - log pi_ref(y_t) over one unpadded row's completion, from the full logits."""
    x = torch.tensor([prompt_ids + completion_ids])
    n = len(completion_ids)
    with torch.no_grad():
        logps = [
            m(input_ids=x).logits[0, :-1].log_softmax(-1).gather(-1, x[0, 1:, None])[-n:, 0]
            for m in (model, ref)
        ]
    return float((logps[0] - logps[1]).sum())


def test_kl_is_zero_to_itself_and_the_plain_sum_to_another(sft_model, blended_model):
    tokenizer = embedded.build_tokenizer()
    rows = evaluate.load_rows(tokenizer, split="train", limit=12)
    model, ref = load_causal_lm(sft_model), load_causal_lm(blended_model)
    options = dict(num_generations=2, max_completion_length=4, temperature=1.0, generation_batch_size=8)
    itself = evaluate.evaluate(model, tokenizer, rows, ref_model=model, **options)
    assert [r["kl"] for r in itself.records] == [0.0] * 24
    assert itself.summary["kl"] == 0.0
    other = evaluate.evaluate(model, tokenizer, rows, ref_model=ref, **options)
    assert [r["completion_ids"] for r in other.records] == [
        r["completion_ids"] for r in itself.records
    ]  # seeded
    expected = [
        plain_kl(model, ref, rows[i // 2]["prompt_ids"], r["completion_ids"])
        for i, r in enumerate(other.records)
    ]
    assert [r["kl"] for r in other.records] == pytest.approx(expected, rel=1e-5, abs=1e-5)
    assert other.summary["kl"] == pytest.approx(sum(expected) / len(expected), rel=1e-5)
    assert other.summary["kl"] > 1.0  # the blend finds the SFT model's answers unlikely


def test_completions_file_holds_every_completion(sft_model, tmp_path):
    out, completions = tmp_path / "e.json", tmp_path / "sub" / "c.jsonl"
    main(["eval", sft_model, "--max_eval_samples", "5", "--num_generations", "2", "--temperature", "1",
          "--output_file", str(out), "--completions_file", str(completions)])  # fmt: skip
    lines = [json.loads(line) for line in completions.read_text().splitlines()]
    assert len(lines) == 10 and json.loads(out.read_text())["num_completions"] == 10
    assert {"prompt", "completion", "completion_ids", "finished", "rewards", "answer"} <= set(lines[0])
    assert sum(r["rewards"]["exact_match"] for r in lines) / 10 == pytest.approx(
        json.loads(out.read_text())["rewards/exact_match/mean"]
    )


def test_help_lists_every_option_and_every_command(capsys):
    assert main(["eval", "--help"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: posttrain eval MODEL")
    for name in evaluate.EvalConfig.__dataclass_fields__:
        assert f"--{name} " in text, name
    assert "k1 estimator" in text
    assert main(["--help"]) == 0
    lines = capsys.readouterr().out.splitlines()
    from posttrain.cli import COMMANDS, TOOLS

    for command in [*COMMANDS, *TOOLS, "compare"]:
        (line,) = [x for x in lines if x.split()[:1] == [command]]
        description = line.split(maxsplit=1)[1]
        assert description[0].isupper() and "et al" not in description and "`" not in description, line
    assert any(line.split()[:3] == ["eval", "Evaluate", "a"] for line in lines)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def two_label_model(tmp_path):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(embedded.tiny_model_config(num_labels=2))
    model.save_pretrained(tmp_path / "two")
    embedded.build_tokenizer().save_pretrained(tmp_path / "two")
    return str(tmp_path / "two")


def other_vocabulary_model(tmp_path):
    tokenizer = embedded.build_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    embedded.build_model().save_pretrained(tmp_path / "vocab")
    tokenizer.save_pretrained(tmp_path / "vocab")
    return str(tmp_path / "vocab")


ERRORS = [
    (lambda m, t: [], "no MODEL"),
    (lambda m, t: [str(t / "missing")], "model_name_or_path='" + "{t}/missing': no such file or folder"),
    (lambda m, t: [m, m], "expected one MODEL, got 2"),
    (lambda m, t: [m, "--model_name_or_path", m], "MODEL given both as a positional argument"),
    (lambda m, t: ["org/name"], "output_file: MODEL 'org/name' is a hub id"),
    (lambda m, t: [m, "--output_file", str(t)], "is a folder; expected a file path"),
    (lambda m, t: [m, "--reward_funcs", "nope"], "reward_funcs: unknown reward 'nope'"),
    (lambda m, t: [m, "--reward_funcs", "_online_rewards:absent"], "has no 'absent'"),
    (
        lambda m, t: [m, "--reward_model_name_or_path", two_label_model(t)],
        "its head has 2 labels; a reward model gives one score",
    ),
    (lambda m, t: [m, "--reward_model_name_or_path", m], "not a trained reward model"),
    (lambda m, t: [m, "--ref_model_name_or_path", str(t / "nothere")], "ref_model_name_or_path='"),
    (lambda m, t: [m, "--ref_model_name_or_path", other_vocabulary_model(t)], "vocabulary differs"),
    (
        lambda m, t: [
            m,
            "--dataset_name",
            write_jsonl(t / "lm.jsonl", [{"text": "1+1=2"}]),
            "--dataset_test_split",
            "train",
        ],
        "`eval` accepts",
    ),
    (lambda m, t: [m, "--dataset_test_split", "validation"], "dataset_test_split must be one of train, test"),
    (
        lambda m, t: [m, "--num_generations", "2", "--generation_batch_size", "3"],
        "multiple of num_generations=2",
    ),
    (lambda m, t: [m, "--temperature", "-1"], "temperature must be >= 0"),
    (lambda m, t: [m, "--max_completion_length", "300"], "exceeds the model's context of 256"),
]


@pytest.mark.parametrize("argv, message", ERRORS, ids=[m for _, m in ERRORS])
def test_bad_input_is_named_before_generation(argv, message, sft_model, tmp_path, capsys, no_generation):
    code = main(["eval", *argv(sft_model, tmp_path)])
    err = capsys.readouterr().err
    assert code == 2
    (line,) = [x for x in err.splitlines() if x.startswith("posttrain eval: ")]  # besides progress bars
    assert message.format(t=tmp_path) in line
    assert not (
        evaluate.Path(sft_model) / evaluate.EVAL_FILE
    ).exists()  # nothing written (no test writes there)


def test_conversational_dataset_file_scored_through_the_reward_models_template(
    sft_model, reward_model, tmp_path
):
    from transformers import AutoModelForSequenceClassification

    rows = embedded.rows("prompt_only", "test", conversational=True)[:6]
    config = evaluate.EvalConfig(
        model_name_or_path=sft_model, dataset_name=write_jsonl(tmp_path / "chat.jsonl", rows),
        dataset_test_split="train", reward_funcs=["exact_match"], reward_model_name_or_path=reward_model,
        max_completion_length=4,
    )  # fmt: skip
    result = evaluate.evaluate_config(config)
    tokenizer = embedded.build_tokenizer()
    rm = AutoModelForSequenceClassification.from_pretrained(reward_model).eval()
    assert result.summary["rewards"] == [evaluate.Path(reward_model).name, "exact_match"]
    for row, record in zip(rows, result.records, strict=True):
        assert record["prompt"] == row["prompt"] and record["answer"] == row["answer"]
        (message,) = record["completion"]  # a conversational prompt gets an assistant message
        assert message["role"] == "assistant"
        text = tokenizer.apply_chat_template(row["prompt"] + record["completion"], tokenize=False)
        with torch.no_grad():
            score = float(rm(**tokenizer(text, return_tensors="pt", add_special_tokens=False)).logits[0, 0])
        assert record["rewards"][evaluate.Path(reward_model).name] == pytest.approx(score, rel=1e-5, abs=1e-6)
        right = embedded.is_correct(row["prompt"][0]["content"], message["content"])
        assert record["rewards"]["exact_match"] == float(right)
