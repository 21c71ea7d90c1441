"""The shared loop machinery: accumulation, schedules, data order, eval, checkpoint/resume, DDP, errors.

References are independent of the code under test: one big batch for accumulation, hand-computed
learning rates, an uninterrupted run for resume, a single process for DDP.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from _ddp_worker import build_model, collate, count_fn, make_rows, nll_loss_fn, train

from posttrain.data import embedded
from posttrain.rl import checkpoint, loop
from posttrain.rl.config import ConfigError, TrainConfig
from posttrain.rl.logger import MetricsLogger

STEP_KEYS = {"step", "epoch", "loss", "learning_rate", "grad_norm", "num_tokens", "tokens_per_second"}


def _config(tmp_path, name="run", **overrides):
    kwargs = dict(
        output_dir=str(tmp_path / name),
        learning_rate=3e-3,
        per_device_train_batch_size=4,
        max_steps=6,
        warmup_steps=2,
        save_steps=3,
        logging_steps=0,
        disable_tqdm=True,
        report_to="none",
    )
    kwargs.update(overrides)
    return TrainConfig(**kwargs)


def _run(tmp_path, **overrides) -> loop.Run:
    """A Run without `start` (no output folder needed) for calling the step functions directly."""
    return loop.Run(
        config=_config(tmp_path, **overrides), command="test", output_dir=tmp_path, device=torch.device("cpu")
    )


def _metrics(output_dir) -> list[dict]:
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def _losses(output_dir) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in _metrics(output_dir) if "loss" in r}


# ---------------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------------


def test_accumulated_gradient_equals_one_big_batch(tmp_path):
    rows = make_rows(9)
    micro = [rows[0:2], rows[2:5], rows[5:9]]  # 2, 3 and 4 rows: unequal token counts
    counts = [sum(sum(r["completion_mask"]) for r in m) for m in micro]
    assert len(set(counts)) == 3
    run = _run(tmp_path)

    model = build_model()
    sums = loop.forward_backward(run, model, [collate(m) for m in micro], nll_loss_fn, count_fn)
    accumulated = {n: p.grad.clone() for n, p in model.named_parameters()}

    reference = build_model()
    batch = collate(rows)  # padded to the longest row of all nine
    loss, _ = nll_loss_fn(reference, batch, count_fn(batch))
    loss.backward()
    for name, param in reference.named_parameters():
        torch.testing.assert_close(accumulated[name], param.grad, rtol=1e-5, atol=1e-7, msg=name)
    torch.testing.assert_close(sums["loss"], loss.detach().double(), rtol=1e-6, atol=0)  # sums are float64
    assert sums["num_tokens"].item() == sum(len(r["input_ids"]) for r in rows)


def test_accumulate_steps_clips_and_reports_norm_before_clipping(tmp_path):
    run = _run(tmp_path, max_grad_norm=1e-3, warmup_steps=0, lr_scheduler_type="constant")
    model = build_model()
    optimizer = loop.build_optimizer(model, run.config)
    scheduler = loop.build_scheduler(optimizer, run.config, total_steps=10)
    batch = collate(make_rows(4))

    reference = build_model()
    loss, _ = nll_loss_fn(reference, batch, count_fn(batch))
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in reference.parameters()])).item()

    out = loop.accumulate(run, model, optimizer, scheduler, [batch], nll_loss_fn, count_fn)
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-5)  # before clipping, as TRL logs it
    assert out["grad_norm"] > 1e-3
    assert out["loss"] == pytest.approx(loss.item(), rel=1e-6)
    assert out["learning_rate"] == 3e-3
    assert out["num_tokens"] == batch["attention_mask"].sum().item()
    assert set(out) == {
        "loss",
        "num_tokens",
        "mean_token_accuracy",
        "grad_norm",
        "learning_rate",
        "tokens_per_second",
    }
    assert all(p.grad is None for p in model.parameters())


def test_optimizer_groups_exclude_biases_and_norms_from_weight_decay(tmp_path):
    model = build_model()
    optimizer = loop.build_optimizer(model, _config(tmp_path, weight_decay=0.1))
    decay, no_decay = optimizer.param_groups
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    no_decay_names = {names[id(p)] for p in no_decay["params"]}
    assert "model.norm.weight" in no_decay_names  # Qwen2's final norm, missed by transformers' name rule
    assert "model.layers.0.self_attn.q_proj.bias" in no_decay_names
    assert all(p.ndim == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))


def test_gradient_checkpointing_gives_the_same_gradients(tmp_path):
    batch = collate(make_rows(4))
    grads = []
    for enabled in (False, True):
        model = loop.prepare_model(_run(tmp_path, gradient_checkpointing=enabled), build_model())
        loss, _ = nll_loss_fn(model, batch, count_fn(batch))
        loss.backward()
        grads.append([p.grad for p in model.parameters()])
    # transformers 5 renamed is_gradient_checkpointing to is_activation_checkpointing (5.17 has the old name only)
    flag = (
        "is_activation_checkpointing"
        if hasattr(model, "is_activation_checkpointing")
        else "is_gradient_checkpointing"
    )
    on = getattr(model, flag)
    assert on and not model.config.use_cache
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, expected",
    [
        # transformers' meaning: `constant` ignores warmup_steps, `constant_with_warmup` applies it
        ("constant", {0: 1.0, 1: 1.0, 3: 1.0, 4: 1.0, 11: 1.0}),
        # warmup 4 of 12 steps: 0, 1/4, 2/4, 3/4 of the peak, then the decay over the remaining 8 steps
        ("constant_with_warmup", {0: 0.0, 1: 0.25, 3: 0.75, 4: 1.0, 9: 1.0, 11: 1.0}),
        ("linear", {0: 0.0, 2: 0.5, 4: 1.0, 6: 6 / 8, 10: 2 / 8, 11: 1 / 8}),
        # cosine: (1 + cos(pi * (step - 4) / 8)) / 2
        (
            "cosine",
            {
                0: 0.0,
                2: 0.5,
                4: 1.0,
                6: (1 + math.cos(math.pi / 4)) / 2,
                8: 0.5,
                11: (1 + math.cos(7 * math.pi / 8)) / 2,
            },
        ),
    ],
)
def test_scheduler_values(tmp_path, kind, expected):
    from transformers import get_scheduler

    config = _config(tmp_path, learning_rate=0.5, warmup_steps=4, lr_scheduler_type=kind)
    optimizer = loop.build_optimizer(build_model(), config)
    scheduler = loop.build_scheduler(optimizer, config, total_steps=12)
    reference_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.5)
    reference = get_scheduler(kind, reference_optimizer, num_warmup_steps=4, num_training_steps=12)
    seen, theirs = {}, {}
    for step in range(12):
        seen[step] = [g["lr"] for g in optimizer.param_groups]
        theirs[step] = reference_optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        reference_optimizer.step()
        reference.step()
    for step, fraction in expected.items():
        assert seen[step] == pytest.approx([0.5 * fraction] * 2, abs=1e-12), (kind, step)
    for step in range(12):  # the same name means the same schedule as transformers.get_scheduler
        assert seen[step] == pytest.approx([theirs[step]] * 2, abs=1e-12), (kind, step)


# ---------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------


def test_data_order_is_seeded_and_split_across_ranks(tmp_path):
    config = _config(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2)
    order = loop.epoch_order(20, seed=42, epoch=0)
    assert sorted(order) == list(range(20))
    assert order == loop.epoch_order(20, seed=42, epoch=0)
    assert order != loop.epoch_order(20, seed=42, epoch=1) and order != loop.epoch_order(20, seed=43, epoch=0)
    # Step 1 of the epoch covers rows 8..15 of the order: micro-batch m, rank r -> a slice of 2.
    by_rank = [loop.step_indices(order, 1, config, rank, 2) for rank in range(2)]
    assert by_rank[0] == [order[8:10], order[12:14]]
    assert by_rank[1] == [order[10:12], order[14:16]]
    # 20 rows, 8 per global micro-batch: 3 micro-batches (the last completed from the epoch's start),
    # 3 steps per epoch; 2.5 epochs -> ceil(7.5) = 8 steps; with drop_last the last is dropped.
    assert loop.plan_steps(
        20, _config(tmp_path, per_device_train_batch_size=4, max_steps=-1, num_train_epochs=2.5), 2
    ) == (3, 8)
    assert loop.plan_steps(20, _config(tmp_path, per_device_train_batch_size=4, max_steps=7), 2) == (3, 7)
    assert loop.plan_steps(
        20, _config(tmp_path, per_device_train_batch_size=4, dataloader_drop_last=True, max_steps=-1), 2
    ) == (2, 6)


def test_take_rows_reads_a_datasets_dataset_like_a_list():
    from datasets import Dataset

    rows = make_rows(6)
    assert loop.take_rows(Dataset.from_list(rows), [4, 1]) == [rows[4], rows[1]]


def test_too_small_a_dataset_is_an_error_only_when_nothing_would_train(tmp_path):
    config = _config(tmp_path, per_device_train_batch_size=4, gradient_accumulation_steps=3)
    assert loop.plan_steps(5, config, 2) == (1, 6)  # one short step of one micro-batch, as transformers
    with pytest.raises(
        ConfigError,
        match=r"has 7 rows, fewer than one micro-batch on all processes \(per_device_train_batch_size 4 x "
        r"processes 2 = 8\): dataloader_drop_last=true drops every micro-batch",
    ):
        loop.plan_steps(7, _config(tmp_path, per_device_train_batch_size=4, dataloader_drop_last=True), 2)
    with pytest.raises(ConfigError, match=r"has 0 rows.*nothing to train on"):
        loop.plan_steps(0, config, 1)


# ---------------------------------------------------------------------------------------------------------
# A whole run: metrics, eval, final model
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    """6 steps uninterrupted with attention dropout (the RNG matters), checkpoints at 3 and 6, eval at 4 and 6."""
    tmp_path = tmp_path_factory.mktemp("straight")
    config = _config(tmp_path, eval_steps=4, per_device_eval_batch_size=3)
    model = build_model(attention_dropout=0.1)
    calls = []

    def eval_fn(m):
        calls.append(m.training)
        return {"answers": 7.0}

    run, model, result = train(config, model=model, num_eval_rows=10, eval_fn=eval_fn)
    return run, model, result, calls


def test_metrics_jsonl_has_every_step_and_eval(straight_run):
    run, _, result, calls = straight_run
    records = _metrics(run.output_dir)
    steps = [r for r in records if "loss" in r]
    evals = [r for r in records if "eval_loss" in r]
    assert [r["step"] for r in steps] == [1, 2, 3, 4, 5, 6]
    for r in steps:
        assert STEP_KEYS | {"mean_token_accuracy"} <= set(r)
    assert [r["learning_rate"] for r in steps[:3]] == [0.0, 1.5e-3, 3e-3]  # warmup 2, then linear decay
    tokens = [r["num_tokens"] for r in steps]
    assert tokens == sorted(tokens) and tokens[0] > 0  # cumulative
    assert [r["step"] for r in evals] == [4, 6]
    assert set(evals[0]) == {"step", "epoch", "eval_loss", "eval_mean_token_accuracy", "eval_answers"}
    assert evals[0]["eval_answers"] == 7.0 and calls == [False, False]  # eval_fn saw eval mode
    assert result["global_step"] == 6 and result["eval_loss"] == evals[-1]["eval_loss"]
    assert (run.output_dir / "config.yaml").is_file()


def test_eval_loss_is_the_mean_over_the_whole_eval_set(straight_run, tmp_path):
    _, model, result, _ = straight_run
    rows = make_rows(10, "test")
    batch = collate(rows)
    model.eval()
    with torch.no_grad():
        loss, metrics = nll_loss_fn(model, batch, count_fn(batch))
    assert result["eval_loss"] == pytest.approx(loss.item(), rel=1e-5)
    assert result["eval_mean_token_accuracy"] == pytest.approx(
        metrics["mean_token_accuracy"].item(), rel=1e-6
    )
    assert model.training is False  # (set here) -- evaluate itself restores train mode:
    model.train()
    loop.evaluate(_run(tmp_path, per_device_eval_batch_size=4), model, rows, collate, nll_loss_fn, count_fn)
    assert model.training


def test_final_model_loads_with_from_pretrained(straight_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run, model, _, _ = straight_run
    loaded = AutoModelForCausalLM.from_pretrained(run.output_dir)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    tokenizer = embedded.build_tokenizer()
    assert (
        AutoTokenizer.from_pretrained(run.output_dir)("1+2=")["input_ids"] == tokenizer("1+2=")["input_ids"]
    )
    ckpt = run.output_dir / "checkpoint-3"
    assert {
        "model.safetensors",
        "optimizer.pt",
        "scheduler.pt",
        "rng_state_rank0.pt",
        "trainer_state.json",
    } <= {p.name for p in ckpt.iterdir()}
    assert AutoModelForCausalLM.from_pretrained(ckpt) is not None


def test_logger_prints_every_logging_steps_and_writes_tensorboard(tmp_path, monkeypatch, capsys):
    scalars = []

    class FakeWriter:  # records the calls; tests/test_tensorboard.py reads a real events file
        def __init__(self, log_dir, purge_step):
            scalars.append(("log_dir", log_dir, purge_step))

        def add_scalar(self, tag, value, step):
            scalars.append((tag, value, step))

        def close(self):
            scalars.append("closed")

    fake = types.ModuleType("torch.utils.tensorboard")
    fake.SummaryWriter = FakeWriter
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", fake)
    logger = MetricsLogger(_run(tmp_path, report_to="tensorboard", logging_steps=2), total_steps=3)
    for step in (1, 2, 3):
        logger.log_train(step, {"loss": 2.0 / step, "learning_rate": 1e-3})
    logger.log_eval(3, 0.5, {"eval_loss": 0.25})
    logger.close()
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "step 2/3  loss 1  learning_rate 0.001",
        "step 3/3  loss 0.6667  learning_rate 0.001",  # the last step is always printed
        "eval step 3  eval_loss 0.25",
    ]
    assert scalars[0] == ("log_dir", str(tmp_path / "tensorboard"), 1)  # a fresh run hides older events
    assert ("train/loss", 1.0, 2) in scalars and ("eval/loss", 0.25, 3) in scalars and scalars[-1] == "closed"
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [
        1,
        2,
        3,
        3,
    ]


# ---------------------------------------------------------------------------------------------------------
# Resume
# ---------------------------------------------------------------------------------------------------------


def _answers(model):
    return {"answers": 7.0}


class Killed(RuntimeError):
    pass


def _killing_loss_fn(after_calls: int):
    calls = [0]

    def loss_fn(model, batch, num_items):
        calls[0] += 1
        if calls[0] > after_calls:
            raise Killed
        return nll_loss_fn(model, batch, num_items)

    return loss_fn


def test_resume_continues_exactly(straight_run, tmp_path, monkeypatch):
    run_a, model_a, _, _ = straight_run
    config = _config(tmp_path, eval_steps=4, per_device_eval_batch_size=3)
    # Killed during step 5 (after the checkpoint at 3 and the eval at 4 were logged).
    monkeypatch.setattr(
        "_ddp_worker.nll_loss_fn", _killing_loss_fn(after_calls=4 + 4)
    )  # 4 steps + eval (4 batches)
    with pytest.raises(Killed):
        train(config, model=build_model(attention_dropout=0.1), num_eval_rows=10, eval_fn=_answers)
    monkeypatch.undo()
    assert max(_losses(config.output_dir)) == 4

    resumed = _config(tmp_path, eval_steps=4, per_device_eval_batch_size=3, resume_from_checkpoint="latest")
    model_b = build_model(
        attention_dropout=0.1, seed=1
    )  # different init: the checkpoint's weights replace it
    run_b, model_b, _ = train(resumed, model=model_b, num_eval_rows=10, eval_fn=_answers)
    assert _losses(run_b.output_dir) == _losses(run_a.output_dir)  # exact, every step
    drop_timing = lambda records: [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in records]
    assert drop_timing(_metrics(run_b.output_dir)) == drop_timing(_metrics(run_a.output_dir))  # evals too
    for (name, a), b in zip(model_a.state_dict().items(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


def test_interrupted_save_leaves_the_previous_checkpoint(straight_run, tmp_path, monkeypatch):
    run_a, model_a, _, _ = straight_run
    config = _config(tmp_path, save_steps=2)
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs):
        if str(getattr(path, "name", path)).endswith(os.path.join("checkpoint-4.tmp", "scheduler.pt")):
            raise Killed  # killed mid-save: model and optimizer of step 4 are already in the temp folder
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(Killed):
        train(config, model=build_model(attention_dropout=0.1))
    monkeypatch.undo()
    out = Path(config.output_dir)
    assert (out / "checkpoint-4.tmp" / "optimizer.pt").is_file() and not (out / "checkpoint-4").exists()
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2]
    assert checkpoint.read_trainer_state(out / "checkpoint-2")["global_step"] == 2

    run_b, model_b, _ = train(
        _config(tmp_path, save_steps=2, resume_from_checkpoint="latest"),
        model=build_model(attention_dropout=0.1),
    )
    assert not (out / "checkpoint-4.tmp").exists()
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2, 4, 6]
    assert _losses(out) == _losses(run_a.output_dir)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_save_total_limit_prunes_oldest(tmp_path):
    run, _, _ = train(_config(tmp_path, max_steps=3, save_steps=1, save_total_limit=2, warmup_steps=0))
    assert [step for step, _ in checkpoint.list_checkpoints(run.output_dir)] == [2, 3]


# ---------------------------------------------------------------------------------------------------------
# Bad input at start
# ---------------------------------------------------------------------------------------------------------


def test_resume_errors(straight_run, tmp_path):
    run_a = straight_run[0]
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint: '.*nowhere' does not exist"):
        loop.start(_config(tmp_path, resume_from_checkpoint=str(tmp_path / "nowhere")), "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"'.*empty' is not a checkpoint \(no trainer_state.json"):
        loop.start(_config(tmp_path, resume_from_checkpoint=str(tmp_path / "empty")), "test")
    with pytest.raises(ConfigError, match=r"resume_from_checkpoint='latest' but '.*fresh' holds no complete"):
        loop.start(_config(tmp_path, "fresh", resume_from_checkpoint="latest"), "test")

    ckpt = str(run_a.output_dir / "checkpoint-3")
    with pytest.raises(
        ConfigError,
        match=r"per_device_train_batch_size=2 but checkpoint .* with per_device_train_batch_size=4",
    ):
        loop.start(_config(tmp_path, per_device_train_batch_size=2, resume_from_checkpoint=ckpt), "test")
    with pytest.raises(ConfigError, match=r"seed=1 but checkpoint .* with seed=42"):
        loop.start(_config(tmp_path, seed=1, resume_from_checkpoint=ckpt), "test")
    copy = tmp_path / "copy"
    shutil.copytree(ckpt, copy)
    state = json.loads((copy / "trainer_state.json").read_text())
    (copy / "trainer_state.json").write_text(json.dumps(state | {"world_size": 2}))
    with pytest.raises(ConfigError, match=r"written by 2 processes but this run has 1 .*nproc_per_node"):
        loop.start(_config(tmp_path, resume_from_checkpoint=str(copy)), "test")

    run = loop.start(_config(tmp_path, "other", resume_from_checkpoint=ckpt), "test")
    with pytest.raises(ValueError, match=r"trained on 48 rows but the train set now has 40"):
        loop.fit(run, build_model(), None, make_rows(40), collate, nll_loss_fn, count_fn)


def test_output_dir_with_checkpoints_needs_resume(straight_run):
    run_a = straight_run[0]
    config = TrainConfig(output_dir=str(run_a.output_dir), learning_rate=1e-3)
    with pytest.raises(
        ConfigError,
        match=r"already holds checkpoints of an earlier run \(checkpoint-3, checkpoint-6\).*--resume_from_checkpoint latest",
    ):
        loop.start(config, "test")


def test_start_errors(tmp_path, monkeypatch):
    monkeypatch.setattr(loop, "bf16_supported", lambda device: False)
    with pytest.raises(ConfigError, match=r"bf16=true but cpu device cpu does not support bfloat16"):
        loop.start(_config(tmp_path, bf16=True), "test")
    assert loop.start(_config(tmp_path, bf16=None), "test").bf16 is False  # auto: off on the CPU
    with pytest.raises(ConfigError, match=r"learning_rate is not set and the grpo loop has no default"):
        loop.start(_config(tmp_path, learning_rate=None), "grpo")
    assert (
        loop.start(_config(tmp_path, learning_rate=None), "sft", default_learning_rate=2e-5).learning_rate
        == 2e-5
    )
    monkeypatch.setattr(loop, "tensorboard_available", lambda: False)
    with pytest.raises(
        ConfigError, match=r"report_to='tensorboard' but the tensorboard package is not installed"
    ):
        loop.start(_config(tmp_path, report_to="tensorboard"), "test")


def test_bf16_autocast_runs_on_cpu(tmp_path):
    run, _, result = train(_config(tmp_path, bf16=True, max_steps=2, save_steps=0))
    assert run.bf16 and math.isfinite(result["loss"])


# ---------------------------------------------------------------------------------------------------------
# DDP (torchrun, gloo on the CPU)
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ddp_two_processes_match_one(tmp_path):
    common = ["--learning_rate", "3e-3", "--max_steps", "3", "--save_steps", "2", "--logging_steps", "0"]
    common += ["--warmup_steps", "0", "--disable_tqdm", "--report_to", "none"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    worker = str(Path(__file__).parent / "_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    proc = subprocess.run(
        [*cmd, str(tmp_path / "ddp"), "--per_device_train_batch_size", "2", *common],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]

    single = {}
    for name, per_device, accum in (("one", 4, 1), ("accum", 2, 2)):
        config = _config(
            tmp_path,
            name,
            per_device_train_batch_size=per_device,
            gradient_accumulation_steps=accum,
            max_steps=3,
            save_steps=2,
            warmup_steps=0,
        )
        single[name] = train(config)[1]
    ddp = _metrics(tmp_path / "ddp")
    for name in ("one", "accum"):
        for a, b in zip(ddp, _metrics(tmp_path / name), strict=True):
            for key in ("loss", "grad_norm", "mean_token_accuracy"):
                assert a[key] == pytest.approx(b[key], rel=1e-5), (name, a["step"], key)
            assert a["num_tokens"] == b["num_tokens"]
    assert (tmp_path / "ddp" / "checkpoint-2" / "rng_state_rank1.pt").is_file()
    from transformers import AutoModelForCausalLM

    final = AutoModelForCausalLM.from_pretrained(tmp_path / "ddp")
    # Adam divides by sqrt(v): a parameter whose gradient is ~0 turns float noise from the different
    # padding into an update of up to lr, so weights agree to an absolute 1e-5, not to float precision.
    for name, tensor in single["one"].state_dict().items():
        torch.testing.assert_close(final.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


def test_truncate_metrics_drops_later_steps_and_a_half_written_line(tmp_path):
    from posttrain.rl.logger import truncate_metrics

    path = tmp_path / "metrics.jsonl"
    path.write_text(
        '{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n{"step": 3, "loss": 1.0}\n{"step": 4, "lo'
    )
    truncate_metrics(path, last_step=2)
    assert path.read_text() == '{"step": 1, "loss": 2.0}\n{"step": 2, "eval_loss": 1.5}\n'


def test_clean_temporary_removes_partial_and_replaced_folders(tmp_path):
    for name in ("checkpoint-2", "checkpoint-4.tmp", "checkpoint-6.old"):
        (tmp_path / name).mkdir()
    checkpoint.clean_temporary(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
