"""KTO besides TRL parity (test_kto_trl.py): the losses against a plain per-row loop, the KL reference point,
the data helpers, the step's counts, every bad input and option, max_prompt_length, resume, two processes
under torchrun (the reference point gathered), and `posttrain kto` end to end (the embedded default too)."""

import json
import math
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from posttrain.cli import main
from posttrain.data import embedded, unpaired
from posttrain.losses import kto as kto_losses
from posttrain.losses import registry
from posttrain.rl import kto
from posttrain.rl.config import ConfigError


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    """A tiny causal LM and its tokenizer saved to a folder (random weights)."""
    path = tmp_path_factory.mktemp("start")
    embedded.build_model(seed=0).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def write_rows(path, data):
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def rows(n=8, conversational=False):
    return embedded.rows("unpaired_preference", "train", seed=0, conversational=conversational)[:n]


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


# ---------------------------------------------------------------------------------------------------------
# The losses
# ---------------------------------------------------------------------------------------------------------


def plain_loss(name, logps, ref_logps, labels, z0, beta, w_d, w_u):
    """The per-row losses written out one row at a time, in float64 (the papers' formulas)."""

    def sigmoid(x):
        return 1 / (1 + math.exp(-x))

    out = []
    for lp, rp, label in zip(logps.tolist(), ref_logps.tolist(), labels.tolist(), strict=True):
        rho = lp - rp
        if name == "kto":
            value = (
                w_d * (1 - sigmoid(beta * (rho - z0))) if label else w_u * (1 - sigmoid(beta * (z0 - rho)))
            )
        else:
            value = w_d * (1 - sigmoid(beta * rho)) if label else w_u * sigmoid(beta * rho)
        out.append(value)
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("name", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("weights", [(1.0, 1.0), (1.33, 0.5)])
def test_losses_match_the_plain_formulas(name, weights):
    torch.manual_seed(0)
    logps, ref_logps = -10 * torch.rand(7, dtype=torch.float64), -10 * torch.rand(7, dtype=torch.float64)
    labels = torch.tensor([True, False, True, True, False, False, True])
    z0 = torch.tensor(0.7, dtype=torch.float64)
    fn = registry.get("kto", name)
    got = fn(
        logps, ref_logps, labels, z0, beta=0.3, desirable_weight=weights[0], undesirable_weight=weights[1]
    )
    expected = plain_loss(name, logps, ref_logps, labels, 0.7, 0.3, *weights)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=0)


def test_losses_at_the_reference_are_half_their_weight():
    # rho = 0 and z0 = 0: every sigmoid is 1/2, so each row's loss is half its weight
    zeros, labels = torch.zeros(2), torch.tensor([True, False])
    for name in ("kto", "apo_zero_unpaired"):
        loss = registry.get("kto", name)(zeros, zeros, labels, torch.tensor(0.0), beta=0.1, desirable_weight=2.0, undesirable_weight=0.5)  # fmt: skip
        assert loss.tolist() == [1.0, 0.25]


def test_gradients_flow_through_the_log_ratio_only():
    """d loss / d logps = -w_D beta s (1 - s) for a desirable row with s = sigma(beta (rho - z0)); z0 from the
    mismatched pairs carries no gradient."""
    logps = torch.tensor([-2.0, -3.0], requires_grad=True)
    kl_logps = torch.tensor([-4.0, -5.0], requires_grad=True)
    ref, ref_kl = torch.tensor([-2.5, -2.0]), torch.tensor([-5.0, -5.5])
    z0 = kto_losses.kl_reference_point(kl_logps, ref_kl)
    assert z0.item() == pytest.approx(0.75) and not z0.requires_grad
    loss = kto_losses.kto(logps, ref, torch.tensor([True, False]), z0, beta=0.5, desirable_weight=1.5)
    loss.sum().backward()
    s = torch.sigmoid(torch.tensor(0.5 * (0.5 - 0.75)))
    assert logps.grad[0].item() == pytest.approx((-1.5 * 0.5 * s * (1 - s)).item(), rel=1e-6)
    u = torch.sigmoid(torch.tensor(0.5 * (0.75 - (-1.0))))  # undesirable: 1 - sigma(beta (z0 - rho))
    assert logps.grad[1].item() == pytest.approx((0.5 * u * (1 - u)).item(), rel=1e-6)
    assert kl_logps.grad is None


def test_reference_point_is_clamped_after_the_mean_over_processes():
    kl, ref_kl = torch.tensor([-1.0, -2.0]), torch.tensor([-2.0, -2.5])  # local mean 0.75
    assert kto_losses.kl_reference_point(kl, ref_kl).item() == pytest.approx(0.75)
    # another process's mean of -2.25 brings the average to -0.75: clamped to 0 after averaging
    assert kto_losses.kl_reference_point(kl, ref_kl, lambda z: (z - 2.25) / 2).item() == 0.0
    assert kto_losses.kl_reference_point(ref_kl, kl).item() == 0.0  # a negative estimate: 0


def test_registry_lists_the_kto_losses():
    assert registry.names("kto") == ["apo_zero_unpaired", "kto"]
    assert kto_losses.needs_reference_point(registry.get("kto", "kto"))
    assert not kto_losses.needs_reference_point(registry.get("kto", "apo_zero_unpaired"))
    with pytest.raises(ValueError, match=r"unknown kto loss_type 'bco'.*'apo_zero_unpaired', 'kto'"):
        registry.get("kto", "bco")


# ---------------------------------------------------------------------------------------------------------
# Data helpers
# ---------------------------------------------------------------------------------------------------------


def test_unpairing_puts_each_blocks_chosen_before_its_rejected():
    pairs = Dataset.from_list(
        [{"prompt": f"p{i}", "chosen": f"c{i}", "rejected": f"r{i}", "id": i} for i in range(5)]
    )
    out = unpaired.unpair_preference(pairs, block=2)
    assert out["completion"] == ["c0", "c1", "r0", "r1", "c2", "c3", "r2", "r3", "c4", "r4"]
    assert out["label"] == [True, True, False, False, True, True, False, False, True, False]
    assert out["prompt"] == ["p0", "p1", "p0", "p1", "p2", "p3", "p2", "p3", "p4", "p4"]
    assert out["id"] == [0, 1, 0, 1, 2, 3, 2, 3, 4, 4]


def test_kl_completions_rotate_within_blocks():
    data = Dataset.from_list([{"completion_ids": [i]} for i in range(5)])
    out = unpaired.add_kl_completions(data, 2)
    assert out["kl_completion_ids"] == [
        [1],
        [0],
        [3],
        [2],
        [4],
    ]  # the short last block pairs a row with itself
    with pytest.raises(ValueError, match="block_size must be >= 1"):
        unpaired.add_kl_completions(data, 0)


def test_collate_cuts_pads_to_one_width_and_carries_labels():
    data = [
        {
            "prompt_ids": [5, 6, 7],
            "completion_ids": [8, 9],
            "kl_completion_ids": [10],
            "label": True,
            "ref_logps": -1.5,
            "ref_kl_logps": -2.0,
        },  # fmt: skip
        {
            "prompt_ids": [5],
            "completion_ids": [10],
            "kl_completion_ids": [8, 9],
            "label": False,
            "ref_logps": -0.5,
            "ref_kl_logps": -3.0,
        },  # fmt: skip
    ]
    batch = unpaired.collate_unpaired(data, 0, max_length=4)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [5, 10, 0, 0]]
    assert batch["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0]]
    assert batch["kl_input_ids"].tolist() == [[5, 6, 7, 10], [5, 8, 9, 0]]
    assert batch["kl_completion_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 1, 0]]
    assert batch["label"].tolist() == [True, False]
    assert batch["ref_logps"].tolist() == [-1.5, -0.5] and batch["ref_kl_logps"].tolist() == [-2.0, -3.0]
    end = unpaired.collate_unpaired(data, 0, max_length=3, truncation_mode="keep_end")
    assert end["input_ids"].tolist() == [[7, 8, 9], [5, 10, 0]]
    assert kto.count_rows(batch).tolist() == [2, 1, 1, 1, 1]  # rows, desirable, undesirable, their tokens


def test_empty_completion_trains_its_eos(tokenizer):
    """As TRL: an empty standard completion becomes eos alone (and an empty prompt no token)."""
    data = Dataset.from_list([{"prompt": "", "completion": "", "label": True}, {"prompt": "1+1=", "completion": "2", "label": False}])  # fmt: skip
    out, info = unpaired.tokenize_unpaired(data, tokenizer)
    assert out[0]["prompt_ids"] == [] and out[0]["completion_ids"] == [tokenizer.eos_token_id]
    assert info == {"desirable": 1, "undesirable": 1}


# ---------------------------------------------------------------------------------------------------------
# The step's counts
# ---------------------------------------------------------------------------------------------------------


def test_scalar_count_is_the_whole_step(tokenizer):
    """`kto_step_loss` with the step's row count alone (one micro-batch) equals it with the loop's counts."""
    cfg = kto.KTOConfig(beta=0.1, per_device_train_batch_size=8)
    tokenized, _ = unpaired.tokenize_unpaired(Dataset.from_list(rows(8)), tokenizer)
    batch = unpaired.collate_unpaired(list(unpaired.add_kl_completions(tokenized, 8)), tokenizer.pad_token_id)
    policy, ref = embedded.build_model(seed=0), embedded.build_model(seed=1)
    a = kto.kto_step_loss(policy, batch, kto.count_rows(batch), config=cfg, ref_model=ref)
    b = kto.kto_step_loss(policy, batch, 8, config=cfg, ref_model=ref)
    assert a[0].item() == b[0].item()
    assert {k: v.item() for k, v in a[1].items()} == {k: v.item() for k, v in b[1].items()}
    assert a[1]["kl"].item() > 0


def test_apo_micro_batches_sum_to_the_whole_step(tokenizer):
    """apo_zero_unpaired has no per-micro-batch reference point: two micro-batches give the one-batch step."""
    cfg = kto.KTOConfig(beta=0.1, loss_type="apo_zero_unpaired", per_device_train_batch_size=8)
    tokenized, _ = unpaired.tokenize_unpaired(Dataset.from_list(rows(8)), tokenizer)
    data = list(tokenized)
    policy, ref = embedded.build_model(seed=0), embedded.build_model(seed=1)

    def step(parts):
        batches = [unpaired.collate_unpaired(p, tokenizer.pad_token_id) for p in parts]
        total = sum(kto.count_rows(b) for b in batches)
        policy.zero_grad()
        loss, sums = 0.0, {}
        for b in batches:
            part, m = kto.kto_step_loss(policy, b, total, config=cfg, ref_model=ref)
            part.backward()
            loss += part.item()
            sums = {k: sums.get(k, 0.0) + v.item() for k, v in m.items()}
        return loss, sums, torch.cat([p.grad.flatten() for p in policy.parameters()])

    whole, halves = step([data]), step([data[:3], data[3:]])
    assert halves[0] == pytest.approx(whole[0], rel=1e-6)
    assert halves[1] == pytest.approx(whole[1], rel=1e-5, abs=1e-7)
    torch.testing.assert_close(halves[2], whole[2], rtol=1e-5, atol=1e-7)


def test_a_missing_reference_is_named(tokenizer):
    cfg = kto.KTOConfig(beta=0.1, per_device_train_batch_size=2)
    tokenized, _ = unpaired.tokenize_unpaired(Dataset.from_list(rows(2)), tokenizer)
    batch = unpaired.collate_unpaired(list(unpaired.add_kl_completions(tokenized, 2)), tokenizer.pad_token_id)
    with pytest.raises(ValueError, match="kto needs reference log-probs"):
        kto.kto_step_loss(embedded.build_model(), batch, 2, config=cfg)


# ---------------------------------------------------------------------------------------------------------
# Bad input and options
# ---------------------------------------------------------------------------------------------------------

CONFIG_ERRORS = {
    "unknown loss": ({"loss_type": "bco"}, "loss_type 'bco' is not a KTO loss; expected one of"),
    "random order with kto": (
        {"train_sampling_strategy": "random"},
        "needs train_sampling_strategy=sequential, got 'random'",
    ),
    "one row per batch": ({"per_device_train_batch_size": 1}, "per_device_train_batch_size must be >= 2"),
    "padding_free": ({"padding_free": True}, "padding_free is not supported by kto"),
    "negative weight": ({"undesirable_weight": -1.0}, "undesirable_weight must be >= 0"),
    "both weights 0": ({"desirable_weight": 0.0, "undesirable_weight": 0.0}, "both 0"),
    "stale precompute": (
        {"sync_ref_model": True, "precompute_ref_log_probs": True},
        "precomputed reference log-probs would go stale",
    ),
    "beta": ({"beta": 0.0}, "beta must be > 0"),
}


@pytest.mark.parametrize("case", list(CONFIG_ERRORS))
def test_bad_options_are_named(case):
    options, message = CONFIG_ERRORS[case]
    with pytest.raises(ConfigError, match=message):
        kto.KTOConfig(**options)


def test_apo_zero_unpaired_takes_any_order_and_single_rows():
    cfg = kto.KTOConfig(loss_type="apo_zero_unpaired", train_sampling_strategy="random", per_device_train_batch_size=1)  # fmt: skip
    assert not cfg.uses_kl


def test_defaults_follow_trl_for_named_data():
    cfg = kto.KTOConfig(dataset_name="some/data", model_name_or_path="some/model")
    assert (cfg.beta, cfg.learning_rate, cfg.max_length, cfg.per_device_train_batch_size) == (
        0.1,
        1e-6,
        1024,
        8,
    )
    assert (cfg.loss_type, cfg.desirable_weight, cfg.undesirable_weight) == ("kto", 1.0, 1.0)
    assert cfg.train_sampling_strategy == "sequential" and cfg.needs_reference


BAD_ROWS = {
    "integer label": ([{"prompt": "1+1=", "completion": "2", "label": 1}], "field 'label' must be a bool"),
    "missing label": (
        [
            {"prompt": "1+1=", "completion": "2", "label": True},
            {"prompt": "1+2=", "completion": "3", "label": None},
        ],
        "row 1: field 'label' is None",
    ),
    "no completion": (
        [{"prompt": "1+1=", "label": True}],
        r"unpaired preference \(prompt, completion, label\); the dataset \(columns \[.prompt., .label.\]\)",
    ),
    "empty completion message list": (
        [
            {
                "prompt": [{"role": "user", "content": "1+1="}],
                "completion": [{"role": "assistant", "content": "2"}],
                "label": True,
            },
            {"prompt": [{"role": "user", "content": "1+2="}], "completion": [], "label": False},
        ],  # fmt: skip
        "row 1: field 'completion' is an empty list of messages",
    ),
    "unknown role": (
        [
            {
                "prompt": [{"role": "robot", "content": "1+1="}],
                "completion": [{"role": "assistant", "content": "2"}],
                "label": True,
            }
        ],  # fmt: skip
        "row 0: field 'prompt', message 0 has unknown role 'robot'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_ROWS))
def test_bad_rows_are_named_before_the_run_starts(tmp_path, start, case):
    data, message = BAD_ROWS[case]
    path = write_rows(tmp_path / "rows.jsonl", data)
    out = tmp_path / "run"
    cfg = kto.KTOConfig(model_name_or_path=start, dataset_name=path, output_dir=str(out), per_device_train_batch_size=2)  # fmt: skip
    with pytest.raises(ValueError, match=message):
        kto.train(cfg)
    assert not out.exists()  # nothing written


def test_conversational_rows_need_a_chat_template(tokenizer):
    from transformers import PreTrainedTokenizerFast

    bare = PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend_tokenizer, eos_token="<|im_end|>")
    with pytest.raises(ValueError, match="conversational .* has no chat template"):
        unpaired.tokenize_unpaired(Dataset.from_list(rows(2, conversational=True)), bare)


@pytest.mark.parametrize("label", [True, False])
def test_one_label_only_warns_with_the_counts(tmp_path, tokenizer, label):
    data = [{**r, "label": label} for r in rows(6)]
    cfg = kto.KTOConfig(dataset_name=write_rows(tmp_path / "rows.jsonl", data), per_device_train_batch_size=2)
    counts = "6 desirable and 0 undesirable" if label else "0 desirable and 6 undesirable"
    with pytest.warns(UserWarning, match=counts):
        train_rows, _, info = kto.load_unpaired_data(cfg, tokenizer)
    assert len(train_rows) == 6 and info["train"]["desirable"] == (6 if label else 0)


def test_cli_names_a_bad_option_and_bad_data(tmp_path, start, capsys):
    assert main(["kto", "--loss_type", "sigmoid", "--output_dir", str(tmp_path / "a")]) == 2
    assert "loss_type 'sigmoid' is not a KTO loss" in capsys.readouterr().err
    path = write_rows(tmp_path / "rows.jsonl", BAD_ROWS["integer label"][0])
    code = main(
        ["kto", "--model_name_or_path", start, "--dataset_name", path, "--output_dir", str(tmp_path / "b")]
    )
    assert code == 2 and "field 'label' must be a bool" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_max_prompt_length_keeps_each_prompts_end(tmp_path, tokenizer):
    """An option TRL's KTOConfig lacks (the shared preference options have it): prompts cut to their last
    max_prompt_length tokens before the max_length filter, so no row is dropped for its long prompt."""
    data = [{**r, "prompt": "please add: " + r["prompt"]} for r in rows(4)]
    path = write_rows(tmp_path / "rows.jsonl", data)
    full, _, _ = kto.load_unpaired_data(
        kto.KTOConfig(dataset_name=path, per_device_train_batch_size=2), tokenizer
    )
    cfg = kto.KTOConfig(dataset_name=path, per_device_train_batch_size=2, max_prompt_length=6, max_length=10)
    cut, _, info = kto.load_unpaired_data(cfg, tokenizer)
    assert info["train"]["dropped_prompt_fills_max_length"] == 0
    for a, b in zip(cut, full, strict=True):
        assert len(b["prompt_ids"]) > 6 and a["prompt_ids"] == b["prompt_ids"][-6:]
        assert a["completion_ids"] == b["completion_ids"] and a["kl_completion_ids"] == b["kl_completion_ids"]


def run_kto(tmp_path, start, name, **options):
    data = write_rows(tmp_path / "rows.jsonl", rows(16))
    options = {"max_steps": 6, "per_device_train_batch_size": 4, "learning_rate": 1e-3, "save_steps": 0,
               "eval_steps": 0, "disable_tqdm": True, "report_to": "none", **options}  # fmt: skip
    out = tmp_path / name
    kto.train(kto.KTOConfig(model_name_or_path=start, dataset_name=data, output_dir=str(out), **options))
    return out


def test_a_resumed_run_continues_exactly(tmp_path, tokenizer):
    """6 steps of 4 rows over 16 (the sequential order wraps into a second epoch) in one go, or stopped at a
    checkpoint after step 3 and resumed: the same losses and reference points (a policy a few SFT steps
    away from its reference, so that z0 > 0)."""
    from _trl_drivers import trained_policy_and_reference

    for name, model in zip(("policy", "reference"), trained_policy_and_reference(tokenizer), strict=True):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    start = str(tmp_path / "policy")
    named = {"ref_model_name_or_path": str(tmp_path / "reference"), "learning_rate": 5e-4}
    whole = [r for r in metrics(run_kto(tmp_path, start, "whole", **named)) if "loss" in r]
    half = run_kto(tmp_path, start, "half", save_steps=3, **named)
    resumed = run_kto(tmp_path, start, "half", resume_from_checkpoint=str(half / "checkpoint-3"), **named)
    after = [r for r in metrics(resumed) if "loss" in r][-3:]
    assert [r["step"] for r in after] == [4, 5, 6]
    for key in ("loss", "kl", "rewards/margins"):
        assert [r[key] for r in after] == pytest.approx([r[key] for r in whole[3:]], abs=1e-6), key
    assert all(r["kl"] > 0 for r in whole)  # z0 in play


# ---------------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------------


def test_posttrain_kto_on_paired_data(tmp_path, start):
    """Paired rows are unpaired (16 pairs: 16 desirable rows, then 16 undesirable, TRL's order, so one batch of
    32 sees both); 4 steps from a random tiny model with a live reference: the logged margins grow and the
    saved model loads."""
    from transformers import AutoModelForCausalLM

    data = embedded.rows("preference", "train", seed=0)[:16]
    path = write_rows(tmp_path / "pairs.jsonl", data)
    out = tmp_path / "run"
    code = main(["kto", "--model_name_or_path", start, "--dataset_name", path, "--output_dir", str(out),
                 "--max_steps", "4", "--per_device_train_batch_size", "32", "--learning_rate", "1e-3",
                 "--logging_steps", "1", "--disable_tqdm", "true", "--save_steps", "0"])  # fmt: skip
    assert code == 0
    records = [r for r in metrics(out) if "loss" in r]
    assert len(records) == 4
    assert records[0]["rewards/margins"] == 0.0  # the policy starts at its reference
    assert records[-1]["rewards/margins"] > 0.2
    info = json.loads((out / "run_info.json").read_text())
    assert (info["train_desirable"], info["train_undesirable"]) == (16, 16)
    AutoModelForCausalLM.from_pretrained(out)


@pytest.mark.slow
def test_embedded_default_improves_on_its_sft_start(tmp_path):
    """`posttrain kto` with no arguments: the margins grow on the train and held-out rows, and the held-out
    exact match of the SFT start (110 or 111 of 112, by the machine's float rounding) is kept to within three
    problems: KTO's undesirable answers push down the first tokens of right ones too (see the defaults in
    rl/kto.py; CPO and ORPO keep theirs within two, test_cpo.KEPT_WITHIN)."""
    out = tmp_path / "kto"
    assert main(["kto", "--output_dir", str(out), "--disable_tqdm", "true"]) == 0
    records = metrics(out)
    train = [r["rewards/margins"] for r in records if "loss" in r]
    assert len(train) == 100 and train[0] == 0.0  # the policy starts at its reference
    assert sum(train[-10:]) / 10 > sum(train[:10]) / 10 + 0.5  # single steps are noisy (32 rows each)
    (final,) = [r for r in records if "eval_exact_match" in r]
    assert final["eval_rewards/margins"] > 0.8
    start_accuracy = json.loads((out / "run_info.json").read_text())["start_eval_exact_match"]
    assert start_accuracy > 0.95
    assert final["eval_exact_match"] >= start_accuracy - 3 / 112 - 1e-9


@pytest.mark.slow
def test_two_processes_share_the_reference_point(tmp_path):
    """torchrun, 2 processes x 4 rows, each with its own mismatched pairs: z0 is the clamped mean of the two
    processes' estimates (TRL gathers it so), and the step's loss, gradients and metrics equal a plain
    one-process computation from the logits with that z0."""
    import os
    import subprocess
    import sys

    import _kto_ddp_worker as worker

    out = tmp_path / "ddp.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, str(Path(__file__).parent / "_kto_ddp_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)

    def sequence_logps(model, batch, prefix=""):
        ids, mask = batch[f"{prefix}input_ids"], batch[f"{prefix}completion_mask"]
        logits = model(input_ids=ids, attention_mask=batch[f"{prefix}attention_mask"]).logits[:, :-1]
        token = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]
        return (token * mask[:, 1:]).sum(1)

    policy, ref = worker.models()
    batches = worker.halves(embedded.build_tokenizer())
    estimates = []
    for batch in batches:
        with torch.no_grad():
            estimates.append(
                (sequence_logps(policy, batch, "kl_") - sequence_logps(ref, batch, "kl_")).mean()
            )
    z0 = max(0.0, sum(estimates).item() / 2)
    assert z0 > 0 and all(abs(e.item() - z0) > 1e-2 for e in estimates)  # the gathering changes each z0
    loss = 0.0
    for batch in batches:
        rho = sequence_logps(policy, batch) - sequence_logps(ref, batch).detach()
        s = torch.sigmoid(worker.BETA * (rho - z0))
        loss = (
            loss + torch.where(batch["label"], 1 - s, s).sum() / worker.ROWS
        )  # 1 - sigma(beta (z0 - rho)) = s
    loss.backward()
    assert ddp["metrics"]["loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert ddp["metrics"]["kl"] == pytest.approx(z0, rel=1e-5)
    for name, p in policy.named_parameters():
        torch.testing.assert_close(ddp["grads"][name], p.grad, rtol=1e-4, atol=1e-6)
