"""FSDP2 under torchrun (`--fsdp full_shard`, 2 gloo processes on the CPU): the loops, sharded checkpoints,
the gathered final model, bad input.

Reference for every number: the same run in one process on the same global batch (2 processes x 4 rows vs
1 x 8), compared per step (loss, grad_norm, eval metrics) within float32 reduction-order round-off (relative
1e-5). GRPO's reference is DDP over the same 2 processes instead: each rank samples its own completions from
its own generator, so one process would sample other completions. A kill -9 while saving, then a resume,
must log the uninterrupted run's losses exactly and end with the same weights.

A torchrun launch costs ~10 s of imports, so they are shared: one launch runs every loop one after the other
(tests/_fsdp_worker.py), a second is killed mid-save, a third resumes it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _ddp_worker import MODEL_KWARGS
from _optional import import_or_skip
from torch.distributed.checkpoint import FileSystemReader

from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl import checkpoint, loop
from posttrain.rl.config import ConfigError, TrainConfig, parse_config
from posttrain.rl.sft import SFTConfig

TESTS = Path(__file__).parent
COMMON = ["--max_steps", "6", "--save_steps", "2", "--eval_steps", "3", "--logging_steps", "0"]
COMMON += [
    "--disable_tqdm",
    "true",
    "--report_to",
    "none",
    "--seed",
    "0",
    "--per_device_eval_batch_size",
    "4",
]
TR_DPO = ["--sync_ref_model", "true", "--ref_model_sync_steps", "2", "--ref_model_mixup_alpha", "0.5"]
LORA = ["--use_peft", "true", "--lora_r", "4", "--lora_dropout", "0", "--merge_adapter", "true"]
PPO = [
    "--reward_funcs",
    "_online_rewards:length",
    "--response_length",
    "5",
    "--per_device_train_batch_size",
    "2",
]
PPO += ["--gradient_accumulation_steps", "2", "--num_mini_batches", "2", "--num_ppo_epochs", "2"]
PPO += ["--learning_rate", "1e-3", "--max_steps", "2", "--save_steps", "1", "--eval_steps", "0"]
PPO += ["--logging_steps", "0", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0"]
GRPO = ["--reward_funcs", "_online_rewards:length", "--max_completion_length", "6", "--num_generations", "4"]
GRPO += [
    "--beta",
    "0.5",
    "--learning_rate",
    "1e-2",
    "--max_steps",
    "2",
    "--save_steps",
    "0",
    "--eval_steps",
    "0",
]
GRPO += ["--logging_steps", "0", "--disable_tqdm", "true", "--report_to", "none", "--seed", "0"]
BF16 = ["--bf16", "true", "--gradient_checkpointing", "true", "--max_steps", "3", "--save_steps", "0"]
BF16 += ["--eval_steps", "0"]
TWO = ["--per_device_train_batch_size", "4", "--fsdp", "full_shard"]  # 2 processes x 4 rows
ONE = ["--per_device_train_batch_size", "8"]  # 1 process x 8 rows


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny model folder and the data: train splits of 32 rows, test splits of 17 (split 8 / 9 over two
    ranks: 2 and 3 eval micro-batches of 4, so the ranks must keep in step through evaluation)."""
    root = tmp_path_factory.mktemp("fsdp")
    embedded.build_model(seed=0, **MODEL_KWARGS).save_pretrained(root / "model")
    embedded.build_tokenizer().save_pretrained(root / "model")
    for name, kind in (("sft", "prompt_completion"), ("pairs", "preference")):
        _write_jsonl(root / name / "train.jsonl", embedded.rows(kind, "train", seed=0)[:32])
        _write_jsonl(root / name / "test.jsonl", embedded.rows(kind, "test", seed=0)[:17])
    _write_jsonl(root / "prompts.jsonl", embedded.rows("prompt_only", "train", seed=0)[:16])
    return root


def _sft(files, out, *extra):
    return ["sft", "--model_name_or_path", str(files / "model"), "--dataset_name", str(files / "sft"),
            "--learning_rate", "3e-3", *COMMON, *extra, "--output_dir", str(out)]  # fmt: skip


def _dpo(files, out, *extra):
    return ["dpo", "--model_name_or_path", str(files / "model"), "--dataset_name", str(files / "pairs"),
            "--learning_rate", "1e-2", *COMMON, *extra, "--output_dir", str(out)]  # fmt: skip


def _grpo(files, out, *extra):
    return ["grpo", "--model_name_or_path", str(files / "model"), "--dataset_name", str(files / "prompts.jsonl"),
            *GRPO, "--per_device_train_batch_size", "8", *extra, "--output_dir", str(out)]  # fmt: skip


def _ppo(files, out, *extra):
    return ["ppo", "--model_name_or_path", str(files / "model"), "--dataset_name", str(files / "prompts.jsonl"),
            *PPO, *extra, "--output_dir", str(out)]  # fmt: skip


def _env() -> dict:
    """This checkout and tests/ (the worker's imports, the reward functions) first on the path."""
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), str(TESTS), env.get("PYTHONPATH", "")])
    return env


def _launch(tmp: Path, jobs: list[dict]) -> subprocess.CompletedProcess:
    """The jobs run one after the other under one `torchrun --nproc_per_node 2`."""
    spec = tmp / f"jobs-{len(list(tmp.glob('jobs-*')))}.json"
    spec.write_text(json.dumps(jobs))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    cmd += [str(TESTS / "_fsdp_worker.py"), str(spec)]
    # the worker ends itself, printing its stacks, if it hangs (_fsdp_worker.HANG_SECONDS)
    return subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)


def _records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def _steps(out: Path, key: str = "loss") -> dict[int, float]:
    """{step: value} of the metrics lines holding `key` (a resumed run's re-logged steps overwrite)."""
    return {r["step"]: r[key] for r in _records(out) if key in r}


@pytest.fixture(scope="module")
def runs(files, tmp_path_factory):
    """Every loop under FSDP (one launch, both ranks exit 0), and its one-process reference."""
    tmp = tmp_path_factory.mktemp("runs")
    jobs = [
        {"argv": _sft(files, tmp / "sft2", *TWO)},
        {"argv": _sft(files, tmp / "bf16_2", *TWO, *BF16)},
        {"argv": _dpo(files, tmp / "dpo2", *TWO, *TR_DPO)},
        {"argv": _dpo(files, tmp / "lora2", *TWO, *LORA)},
        {"argv": _grpo(files, tmp / "grpo_fsdp", "--fsdp", "full_shard")},
        {"argv": _grpo(files, tmp / "grpo_ddp")},
        {"argv": _ppo(files, tmp / "ppo_fsdp", "--fsdp", "full_shard")},
        {"argv": _ppo(files, tmp / "ppo_ddp")},
        {"check": "frozen_reference_root", "out": str(tmp / "frozen_reference_root.json")},
    ]
    done = _launch(tmp, jobs)
    assert done.returncode == 0, done.stderr[-4000:]
    for job in (job for job in jobs if "argv" in job):
        out = Path(job["argv"][-1])
        assert [(out / f"exit_code.rank{r}").read_text() for r in (0, 1)] == ["0", "0"], job["argv"][0]
    for argv in (_sft(files, tmp / "sft1", *ONE), _sft(files, tmp / "bf16_1", *ONE, *BF16),
                 _dpo(files, tmp / "dpo1", *ONE, *TR_DPO),
                 _dpo(files, tmp / "lora1", *ONE, *LORA)):  # fmt: skip
        assert main(argv) == 0, argv[0]
    return tmp


def _assert_same_steps(a: Path, b: Path, keys: tuple[str, ...], rel: float = 1e-5, abs: float = 1e-7) -> None:
    for key in keys:
        ours, reference = _steps(a, key), _steps(b, key)
        assert ours.keys() == reference.keys() and ours, key
        assert ours == pytest.approx(reference, rel=rel, abs=abs), key


def _weights(folder: Path, name: str = "model.safetensors") -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(folder / name)


def _assert_close_weights(a: dict, b: dict, atol: float = 1e-4) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=atol, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Two processes sharded vs one process
# ---------------------------------------------------------------------------------------------------------


def test_sft_two_sharded_processes_give_one_process_losses(runs):
    """Per-step loss, grad norm (clipped at 1.0: ~2.5 before clipping, so the sharded norm is what clips),
    token accuracy and the evaluations at steps 3 and 6 over 17 rows split unevenly over the ranks."""
    _assert_same_steps(runs / "sft2", runs / "sft1", ("loss", "grad_norm", "mean_token_accuracy", "entropy"))
    _assert_same_steps(runs / "sft2", runs / "sft1", ("eval_loss", "eval_mean_token_accuracy"))
    assert max(_steps(runs / "sft2", "grad_norm").values()) > 1.0
    assert sorted(_steps(runs / "sft2", "eval_loss")) == [3, 6]
    _assert_close_weights(_weights(runs / "sft2"), _weights(runs / "sft1"))


def test_bf16_shards_keep_float32_weights_and_train_as_one_bf16_process(runs):
    """--bf16 (FSDP's MixedPrecisionPolicy: layers gathered and run in bfloat16, gradients reduced in float32)
    with gradient checkpointing: the losses of one process under bf16 autocast within bfloat16 round-off, and
    not the float32 run's (the bf16 arithmetic is in effect); the weights stay float32."""
    ours, reference, float32 = _steps(runs / "bf16_2"), _steps(runs / "bf16_1"), _steps(runs / "sft2")
    assert sorted(ours) == [1, 2, 3]
    assert ours == pytest.approx(reference, rel=2e-3)
    assert all(abs(ours[step] - float32[step]) > 1e-6 for step in ours)
    assert {tensor.dtype for tensor in _weights(runs / "bf16_2").values()} == {torch.float32}


def test_the_gathered_final_model_loads_in_one_process_and_equals_the_shards(runs):
    """The final model folder (rank 0's gathered copy) loads with AutoModelForCausalLM as the base model's
    architecture, and its weights are exactly those the last sharded checkpoint holds."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(runs / "sft2")
    assert type(model).__name__ == "Qwen2ForCausalLM"
    assert json.loads((runs / "sft2" / "config.json").read_text())["architectures"] == ["Qwen2ForCausalLM"]
    last = runs / "sft2" / "checkpoint-6"
    assert checkpoint.is_sharded_checkpoint(last) and not (last / "model.safetensors").exists()
    assert sorted(p.name for p in (last / checkpoint.SHARDED_DIR).iterdir()) == [".metadata", "__0_0.distcp", "__1_0.distcp"]  # fmt: skip
    dcp_to_torch_save(last / checkpoint.SHARDED_DIR, runs / "sft2-shards.pt")
    shards = torch.load(runs / "sft2-shards.pt", weights_only=True)["model"]
    own = model.state_dict()
    for name, tensor in own.items():
        assert torch.equal(tensor, shards[f"model.{name}"]), name


def test_dpo_two_sharded_processes_with_a_sharded_reference_give_one_process_losses(runs):
    """DPO with a sharded frozen reference that TR-DPO mixes the policy into every 2 steps (shard by shard,
    checkpointed with the run): the one-process losses, grad norms, log-probs and evaluations. Rewards are
    beta x (log-prob - reference log-prob), differences of ~-13 log-probs: their round-off is absolute."""
    _assert_same_steps(runs / "dpo2", runs / "dpo1", ("loss", "grad_norm", "logps/chosen", "logps/rejected"))
    _assert_same_steps(runs / "dpo2", runs / "dpo1", ("rewards/chosen", "rewards/rejected"), rel=0, abs=1e-5)
    _assert_same_steps(runs / "dpo2", runs / "dpo1", ("eval_loss", "eval_logps/chosen"))
    assert (
        _steps(runs / "dpo2")[6] < _steps(runs / "dpo2")[1] - 1e-3
    )  # it learned: the comparison is not vacuous
    names = FileSystemReader(str(runs / "dpo2" / "checkpoint-2" / checkpoint.SHARDED_DIR)).read_metadata()
    assert any(n.startswith("model.companion_ref_model.") for n in names.state_dict_metadata)
    _assert_close_weights(_weights(runs / "dpo2"), _weights(runs / "dpo1"))


def test_a_sharded_reference_frees_its_root_after_each_forward(runs):
    """The frozen reference's embeddings and output layer (the root unit) are gathered for its forward only,
    not kept whole for a backward it never runs; inside `gathered` (generation) they stay whole; a trained
    model keeps its root from forward to backward, and after backward holds its shard again."""
    found = json.loads((runs / "frozen_reference_root.json").read_text())
    assert found == {
        "before": True, "after_first": True, "after_second": True, "inside_gathered": False,
        "after_gathered": True, "max_diff": pytest.approx(0.0, abs=1e-5), "policy_after_backward": True,
        "policy_after_no_grad_forward": False,
    }  # fmt: skip


def test_lora_dpo_sharded_checkpoints_hold_the_adapters_and_the_final_save_merges(runs):
    """LoRA + DPO (the reference: the policy with its adapters disabled) under FSDP: the one-process losses;
    checkpoints hold the adapters alone; the final adapter and merged model equal the one-process ones, the
    adapter reloads with peft and gives the merged model's log-probs."""
    peft = import_or_skip("peft")
    from transformers import AutoModelForCausalLM

    _assert_same_steps(runs / "lora2", runs / "lora1", ("loss", "grad_norm", "rewards/margins"))
    saved = runs / "lora2" / "checkpoint-2"
    assert (saved / checkpoint.ADAPTER_CONFIG).is_file() and not (saved / checkpoint.ADAPTER_WEIGHTS).exists()
    names = FileSystemReader(str(saved / checkpoint.SHARDED_DIR)).read_metadata().state_dict_metadata
    weights = [n for n in names if n.startswith("model.")]
    assert len(weights) == 2 * 7 * MODEL_KWARGS["num_hidden_layers"]  # lora_A, lora_B on 7 linears per layer
    assert all(".lora_A." in n or ".lora_B." in n for n in weights)
    adapter = _weights(runs / "lora2", checkpoint.ADAPTER_WEIGHTS)
    _assert_close_weights(adapter, _weights(runs / "lora1", checkpoint.ADAPTER_WEIGHTS))
    merged_dir = runs / "lora2" / checkpoint.MERGED_DIR
    _assert_close_weights(_weights(merged_dir), _weights(runs / "lora1" / checkpoint.MERGED_DIR))

    ids = torch.tensor([[5, 9, 17, 23, 8, 3, 41, 2]])
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()
    reloaded = peft.AutoPeftModelForCausalLM.from_pretrained(runs / "lora2").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(ids).logits, merged(ids).logits, rtol=0, atol=1e-5)


def test_grpo_sharded_policy_generates_and_trains_as_ddp(runs):
    """GRPO with beta 0.5 (a sharded reference) under FSDP vs DDP on the same 2 processes: the same
    completions (rewards) and the same losses and grad norms."""
    keys = ("loss", "grad_norm", "reward", "reward_std", "kl", "completions/mean_length")
    _assert_same_steps(runs / "grpo_fsdp", runs / "grpo_ddp", keys)
    assert sorted(_steps(runs / "grpo_fsdp")) == [1, 2]


def test_ppo_policy_and_value_sharded_train_as_ddp(runs):
    """PPO (policy and value model sharded, one optimizer over both, the value model checkpointed with the
    policy's shards) under FSDP vs DDP on the same 2 processes: the same scores, losses and grad norms."""
    keys = ("loss", "loss/value_avg", "grad_norm", "objective/scores")
    _assert_same_steps(runs / "ppo_fsdp", runs / "ppo_ddp", keys)
    # the KL is a difference of summed log-probs: its round-off is absolute
    _assert_same_steps(runs / "ppo_fsdp", runs / "ppo_ddp", ("objective/kl",), rel=0, abs=1e-5)
    # so is the policy loss's: the whitened advantages average to 0, so it is a small mean of O(1) terms (on an
    # Intel Xeon with AMX: -0.0162464 against -0.0162466, 1.3e-5 relative)
    _assert_same_steps(runs / "ppo_fsdp", runs / "ppo_ddp", ("loss/policy_avg",), rel=0, abs=2e-6)
    names = FileSystemReader(str(runs / "ppo_fsdp" / "checkpoint-2" / checkpoint.SHARDED_DIR)).read_metadata()
    assert any(n.startswith("model.companion_value_model.score.") for n in names.state_dict_metadata)


# ---------------------------------------------------------------------------------------------------------
# kill -9 while saving, then resume
# ---------------------------------------------------------------------------------------------------------


def test_killed_while_saving_then_resumed_continues_as_the_uninterrupted_run(files, runs, tmp_path):
    """The SFT run of `runs`, with rank 0 SIGKILLed as it commits checkpoint-4 (every shard and RNG file
    written, trainer_state.json not yet): checkpoint-2 is left whole, checkpoint-4 never appears; resuming
    from the latest checkpoint logs the uninterrupted run's losses exactly and ends with its weights."""
    out = tmp_path / "sft"
    killed = _launch(
        tmp_path, [{"argv": _sft(files, out, *TWO), "kill_at": r"checkpoint-4\.tmp/trainer_state"}]
    )
    assert killed.returncode != 0
    assert [step for step, _ in checkpoint.list_checkpoints(out)] == [2]
    assert sorted(p.name for p in (out / "checkpoint-4.tmp" / checkpoint.SHARDED_DIR).iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp"
    ]  # fmt: skip
    assert not (out / "checkpoint-4.tmp" / checkpoint.TRAINER_STATE).exists()
    assert sorted(_steps(out)) == [1, 2, 3, 4]

    resumed = _launch(tmp_path, [{"argv": _sft(files, out, *TWO, "--resume_from_checkpoint", "latest")}])
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert _steps(out) == _steps(runs / "sft2")
    assert _steps(out, "grad_norm") == _steps(runs / "sft2", "grad_norm")
    assert _steps(out, "eval_loss") == _steps(runs / "sft2", "eval_loss")
    ours, straight = _weights(out), _weights(runs / "sft2")
    assert ours.keys() == straight.keys()
    assert all(torch.equal(ours[name], straight[name]) for name in ours)
    assert not list(out.glob("*.tmp"))


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ("shard_grad_op", r"fsdp='shard_grad_op': shard_grad_op is not supported; only full_shard"),
        ("full_shard offload", r"fsdp='full_shard offload': offload is not supported"),
        ("fully_shard", r"fsdp='fully_shard': unknown word\(s\) \['fully_shard'\]; expected 'full_shard'"),
    ],
)
def test_an_unknown_or_unsupported_fsdp_value_is_named(value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, ["--fsdp", value])


def test_fsdp_with_quantized_weights_is_refused():
    with pytest.raises(ConfigError, match=r"fsdp='full_shard' with load_in_4bit=true: FSDP2 cannot shard"):
        parse_config(TrainConfig, ["--fsdp", "full_shard", "--use_peft", "true", "--load_in_4bit", "true"])


def test_transformers_spellings_of_full_shard_are_accepted():
    for value in ("full_shard", "full_shard auto_wrap", "auto_wrap full_shard", "true"):
        assert parse_config(TrainConfig, ["--fsdp", value]).fsdp_enabled, value
    assert not TrainConfig().fsdp_enabled and not TrainConfig(fsdp="false").fsdp_enabled


def test_fsdp_without_torchrun_stops_before_the_run_folder(files, tmp_path, capsys, monkeypatch):
    out = tmp_path / "plain"
    assert main(_sft(files, out, *TWO)) == 2
    err = capsys.readouterr().err
    assert "fsdp='full_shard' shards the model over processes started by torchrun, but this process was launched without it" in err  # fmt: skip
    assert not out.exists()
    # said before any data is read: a dataset that does not exist is not what stops it
    missing = ["--dataset_name", str(tmp_path / "absent.jsonl")]
    assert main([*_sft(files, out, *TWO), *missing]) == 2
    assert "launched without it" in capsys.readouterr().err
    monkeypatch.setenv("WORLD_SIZE", "1")  # torchrun --nproc_per_node 1
    monkeypatch.setenv("RANK", "0")
    assert main(_sft(files, out, *TWO)) == 2
    assert (
        "fsdp='full_shard' but torchrun started 1 process: there is nothing to shard over"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_a_sharded_checkpoint_resumes_only_with_fsdp_and_its_world_size(files, runs, tmp_path, capsys):
    """Without --fsdp (the CLI stops before any work, the checkpoint untouched); with another world size;
    and a checkpoint written without --fsdp resumed with it."""
    sharded = runs / "sft2" / "checkpoint-2"
    before = {p: p.stat().st_mtime_ns for p in sharded.rglob("*")}
    out = tmp_path / "resumed"
    argv = _sft(files, out, "--per_device_train_batch_size", "4", "--resume_from_checkpoint", str(sharded))
    assert main(argv) == 2
    assert (
        f"fsdp=None but checkpoint '{sharded}' holds weights sharded by --fsdp full_shard: resume with --fsdp "
        "full_shard" in capsys.readouterr().err
    )
    assert not out.exists()
    assert {p: p.stat().st_mtime_ns for p in sharded.rglob("*")} == before

    options = dict(per_device_train_batch_size=4, seed=0, fsdp="full_shard")
    with pytest.raises(ConfigError, match=r"was written by 2 processes but this run has 3 \(torchrun --nproc_per_node\): resume with the same world size \(it fixes its shards and the data order\)"):  # fmt: skip
        loop._check_resumable(SFTConfig(**options), 3, sharded)
    plain = runs / "sft1" / "checkpoint-2"
    with pytest.raises(ConfigError, match=r"fsdp='full_shard' but checkpoint .*checkpoint-2' holds full weights \(written without --fsdp\): resume with no --fsdp"):  # fmt: skip
        loop._check_resumable(SFTConfig(**{**options, "per_device_train_batch_size": 8}), 2, plain)
