"""The GRPO and RLOO loops besides TRL parity (test_grpo_trl.py): start-up checks, bad input, the generation
batch, accumulation, completions.jsonl, resume, the README's reward functions."""

import json
import re
import sys
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl import grpo, rloo, rollout
from posttrain.rl.config import ConfigError, parse_config, save_config

README = Path(__file__).resolve().parents[1] / "README.md"


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


@pytest.fixture(scope="module")
def prompts(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "prompts.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in embedded.rows("prompt_only", "train")[:48]))
    return str(path)


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def run(command, tmp_path, name, start, prompts, *args):
    out = tmp_path / name
    argv = [command, "--model_name_or_path", start, "--dataset_name", prompts, "--output_dir", str(out),
            "--reward_funcs", "_online_rewards:length", "--max_completion_length", "6",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_steps", "3",
            "--learning_rate", "1e-3", "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm", "true",
            "--report_to", "none", *args]  # fmt: skip
    assert main(argv) == 0
    return out


# ---------------------------------------------------------------------------------------------------------
# Start-up checks
# ---------------------------------------------------------------------------------------------------------


def config(cls=grpo.GRPOConfig, **options):
    return cls(**{"dataset_name": "unused", "reward_funcs": ["exact_match"], "output_dir": None, **options})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"num_generations": 1}, r"num_generations must be >= 2"),
        ({"per_device_train_batch_size": 6, "num_generations": 4}, r"generation batch of 6 completions per process .* not divisible by num_generations=4"),
        ({"per_device_train_batch_size": 8, "generation_batch_size": 32, "steps_per_generation": 2}, r"generation_batch_size=32 and steps_per_generation=2 name the same thing and disagree \(.* = 16\)"),
        ({"per_device_train_batch_size": 8, "generation_batch_size": 12}, r"generation_batch_size=12 must be a multiple of per_device_train_batch_size x processes = 8"),
        ({"max_new_tokens": 8, "max_completion_length": 16}, r"max_new_tokens=8 and max_completion_length=16"),
        ({"loss_type": "ppo"}, r"loss_type 'ppo' is not a policy loss; expected one of \[.*'dapo'"),
        ({"importance_sampling_level": "batch"}, r"importance_sampling_level must be one of"),
        ({"scale_rewards": "rank"}, r"scale_rewards must be one of"),
        ({"multi_objective_aggregation": "max"}, r"multi_objective_aggregation must be one of"),
        ({"reward_weights": [1.0, 2.0]}, r"reward_weights has 2 values for 1 rewards"),
        ({"reward_funcs": []}, r"no reward: pass --reward_funcs"),
        ({"sync_ref_model": True}, r"sync_ref_model=true but beta=0"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
        ({"top_entropy_quantile": 0.0}, r"top_entropy_quantile must lie in \(0, 1\]"),
    ],
)  # fmt: skip
def test_bad_options_are_named_at_start_up(options, message):
    with pytest.raises(ConfigError, match=message):
        config(**options)


def test_rloo_options():
    with pytest.raises(ConfigError, match=r"reward_clip_range must be two values low <= high"):
        config(rloo.RLOOConfig, reward_clip_range=[1.0, -1.0])
    assert config(rloo.RLOOConfig).beta == 0.05 and config(rloo.RLOOConfig).num_generations == 2  # TRL's
    # on the embedded task (no dataset named): 8 completions per prompt, GRPO's 6 epochs at lr 1e-4
    embedded_run = rloo.RLOOConfig(output_dir=None)
    assert (embedded_run.num_generations, embedded_run.num_train_epochs, embedded_run.learning_rate) == (
        8,
        6.0,
        1e-4,
    )
    embedded_run = grpo.GRPOConfig(output_dir=None)
    assert (embedded_run.num_generations, embedded_run.num_train_epochs, embedded_run.learning_rate) == (
        8,
        6.0,
        1e-4,
    )


def test_defaults_and_aliases_are_trls():
    c = config(per_device_train_batch_size=16, max_new_tokens=12)
    assert c.max_completion_length == 12
    assert (c.loss_type, c.beta, c.epsilon, c.epsilon_high, c.num_generations) == ("dapo", 0.0, 0.2, 0.2, 8)
    assert (c.steps_per_generation, c.generation_batch_size) == (1, 16)
    c = config(per_device_train_batch_size=8, generation_batch_size=32)
    assert c.steps_per_generation == 4


@pytest.mark.parametrize("cls", [grpo.GRPOConfig, rloo.RLOOConfig])
def test_a_saved_config_reads_back(cls, tmp_path):
    """config.yaml holds steps_per_generation and generation_batch_size both (computed); resuming with
    --config reads it back equal. Both given and agreeing is accepted; disagreeing is refused above."""
    saved = config(cls, per_device_train_batch_size=8, generation_batch_size=32)
    save_config(saved, tmp_path / "config.yaml")
    assert parse_config(cls, ["--config", str(tmp_path / "config.yaml")]) == saved


def test_a_prompt_too_long_for_the_context_is_named_before_the_run_folder(tmp_path, start, capsys):
    data = tmp_path / "long.jsonl"
    data.write_text(json.dumps({"prompt": "1+1="}) + "\n" + json.dumps({"prompt": "9" * 253 + "="}) + "\n")
    out = tmp_path / "run"
    argv = ["grpo", "--model_name_or_path", start, "--dataset_name", str(data), "--output_dir", str(out),
            "--reward_funcs", "format", "--max_completion_length", "4", "--num_generations", "2",
            "--per_device_train_batch_size", "2"]  # fmt: skip
    assert main(argv) == 2
    assert "train row 1: its prompt has 254 tokens" in capsys.readouterr().err
    assert not out.exists()


def test_a_reward_path_that_does_not_import_is_named_before_the_run_folder(tmp_path, start, prompts, capsys):
    out = tmp_path / "run"
    argv = ["rloo", "--model_name_or_path", start, "--dataset_name", prompts, "--output_dir", str(out),
            "--reward_funcs", "no_such_module_here:score"]  # fmt: skip
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "no_such_module_here:score" in err
    assert not out.exists()


@pytest.mark.parametrize(
    ("func", "message"),
    [("raises", r"'raises'.*the grader is down|the grader is down.*'raises'"), ("nan_at_three", r"'nan_at_three' returned nan for row 3")],
)  # fmt: skip
def test_a_failing_reward_function_stops_the_run_naming_it(tmp_path, start, prompts, capsys, func, message):
    with pytest.raises(Exception, match=message):
        grpo.train(
            grpo.GRPOConfig(
                model_name_or_path=start,
                dataset_name=prompts,
                output_dir=str(tmp_path / "run"),
                reward_funcs=[f"_online_rewards:{func}"],
                max_completion_length=4,
                num_generations=4,
                per_device_train_batch_size=8,
                max_steps=2,
                disable_tqdm=True,
                report_to="none",
            )  # fmt: skip
        )


# ---------------------------------------------------------------------------------------------------------
# The generation batch
# ---------------------------------------------------------------------------------------------------------


def fixed_rollout(tokenizer):
    """Two prompts x G = 2 completions: eos at different lengths, one cut at max_completion_length (4)."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    ids = torch.tensor([[20, 21, eos, pad], [22, eos, pad, pad], [23, 24, 25, 26], [27, 28, 29, eos]])
    mask = (torch.arange(4)[None] <= torch.tensor([2, 1, 3, 3])[:, None]).long()
    finished = torch.tensor([True, True, False, True])
    return rollout.Rollout(ids * mask + pad * (1 - mask), mask, torch.zeros(4, 4), finished)


def test_prepare_batch_masks_truncated_completions_and_computes_what_is_needed(start, tokenizer):
    model = embedded.build_model(seed=0)
    prompt_ids = [[5, 6, 7], [8, 9]]
    values = torch.tensor([[1.0], [0.0], [2.0], [3.0]])
    options = dict(reward_names=["r"], pad_token_id=tokenizer.pad_token_id)
    base = config(num_generations=2, per_device_train_batch_size=4, max_completion_length=4)
    batch = grpo.prepare_batch(base, model, None, prompt_ids, fixed_rollout(tokenizer), values, **options)
    assert "old_logps" not in batch and "ref_logps" not in batch  # on-policy, beta 0
    assert batch["completion_mask"].sum(1).tolist() == [3, 2, 4, 4]
    assert batch["advantages"].tolist() == pytest.approx([0.7071, -0.7071, -0.7071, 0.7071], abs=1e-3)
    masked = config(num_generations=2, per_device_train_batch_size=4, max_completion_length=4,
                    mask_truncated_completions=True, beta=0.1, num_iterations=2)  # fmt: skip
    batch = grpo.prepare_batch(masked, model, model, prompt_ids, fixed_rollout(tokenizer), values, **options)
    assert batch["completion_mask"].sum(1).tolist() == [3, 2, 0, 4]
    assert batch["attention_mask"][2, 3:].sum().item() == 0  # the cut completion is hidden from attention too
    torch.testing.assert_close(batch["old_logps"], batch["ref_logps"])  # the same model, at generation
    assert batch["metrics"]["completions/clipped_ratio"].item() == 0.25


def test_rloo_baseline_and_kl_penalty(tokenizer):
    model, ref = embedded.build_model(seed=0), embedded.build_model(seed=1)
    prompt_ids = [[5, 6, 7], [8, 9]]
    values = torch.tensor([[1.0], [0.0], [2.0], [3.0]])
    c = config(
        rloo.RLOOConfig, num_generations=2, per_device_train_batch_size=4, max_completion_length=4, beta=0.5
    )
    batch = rloo.prepare_batch(c, model, ref, prompt_ids, fixed_rollout(tokenizer), values, reward_names=["r"],
                               pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    mask = batch["completion_mask"].float()
    ref_logps = grpo.policy_logps(ref, batch, 1.0, 4)
    kl = ((batch["old_logps"] - ref_logps) * mask).sum(1)
    r = values[:, 0] - 0.5 * kl
    expected = torch.stack([r[0] - r[1], r[1] - r[0], r[2] - r[3], r[3] - r[2]])
    torch.testing.assert_close(batch["advantages"], expected, rtol=1e-5, atol=1e-6)
    assert batch["metrics"]["kl"].item() == pytest.approx((kl.sum() / mask.sum()).item(), rel=1e-5)


# ---------------------------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["dapo", "grpo", "bnpo", "dr_grpo"])
def test_accumulated_micro_batches_give_the_whole_batch_step(tmp_path, start, prompts, loss_type):
    """One generation batch of 16 completions: one micro-batch of 16 or two of 8 take the same step
    (bnpo normalises per micro-batch by design, so only its first-step loss is a mean of the two)."""
    whole = metrics(run("grpo", tmp_path, "whole", start, prompts, "--loss_type", loss_type,
                        "--per_device_train_batch_size", "16"))  # fmt: skip
    split = metrics(run("grpo", tmp_path, "split", start, prompts, "--loss_type", loss_type,
                        "--gradient_accumulation_steps", "2"))  # fmt: skip
    if loss_type == "bnpo":
        assert split[0]["reward"] == pytest.approx(whole[0]["reward"], rel=1e-6)
        return
    for a, b in zip(whole, split, strict=True):
        for key in ("loss", "grad_norm", "reward", "entropy"):
            assert a[key] == pytest.approx(b[key], rel=2e-5, abs=1e-7), key


def test_metrics_and_completions_log(tmp_path, start, prompts):
    out = run("grpo", tmp_path, "log", start, prompts, "--reward_funcs", "_online_rewards:length,_online_rewards:answer_seen",
              "--reward_weights", "1.0,2.0", "--logging_steps", "2")  # fmt: skip
    records = metrics(out)
    for key in ("reward", "reward_std", "rewards/length/mean", "rewards/answer_seen/std", "frac_reward_zero_std",
                "entropy", "clip_ratio/region_mean", "completions/mean_length", "completions/clipped_ratio",
                "num_tokens", "answer_length"):  # fmt: skip
        assert key in records[0], key
    assert records[0]["reward"] == pytest.approx(
        records[0]["rewards/length/mean"] + 2 * records[0]["rewards/answer_seen/mean"], rel=1e-5
    )
    logged = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert sorted({r["step"] for r in logged}) == [1, 3]  # every logging_steps
    assert len(logged) == 2 * 8
    first = logged[0]
    assert set(first) >= {"prompt", "completion", "rewards", "advantage", "answer"}
    assert first["rewards"]["length"] == len(first["completion"])


def test_the_embedded_task_is_evaluated_every_eval_steps_and_at_the_end(tmp_path, start):
    out = tmp_path / "eval"
    argv = ["grpo", "--model_name_or_path", start, "--output_dir", str(out), "--max_completion_length", "3",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_steps", "3",
            "--eval_steps", "2", "--save_steps", "0", "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    assert [r["step"] for r in metrics(out) if "eval_exact_match" in r] == [2, 3]


def test_num_iterations_reuses_the_generation_batch(tmp_path, start, prompts):
    records = metrics(
        run("grpo", tmp_path, "iter", start, prompts, "--num_iterations", "2", "--max_steps", "4")
    )
    assert (
        "reward" in records[0] and "reward" not in records[1] and "reward" in records[2]
    )  # generated at 1, 3
    assert records[1]["clip_ratio/region_mean"] >= 0.0  # the second pass has a real ratio (old log-probs)


@pytest.mark.parametrize("command", ["grpo", "rloo"])
def test_resume_continues_exactly(tmp_path, start, prompts, command):
    whole = metrics(run(command, tmp_path, "whole", start, prompts, "--max_steps", "4"))
    out = run(command, tmp_path, "half", start, prompts, "--max_steps", "4", "--save_steps", "2")
    resumed = metrics(run(command, tmp_path, "half", start, prompts, "--max_steps", "4", "--save_steps", "2",
                          "--resume_from_checkpoint", str(out / "checkpoint-2")))  # fmt: skip
    assert [r["step"] for r in resumed] == [1, 2, 3, 4]  # the steps after the checkpoint were logged anew
    for key in ("grad_norm", "reward", "entropy", "loss"):  # on-policy the loss is ~0: the gradient moves
        assert [r[key] for r in resumed[2:]] == pytest.approx([r[key] for r in whole[2:]], rel=1e-5, abs=1e-7)


def test_resuming_on_other_prompts_is_named(tmp_path, start, prompts, capsys):
    out = run("grpo", tmp_path, "run", start, prompts, "--max_steps", "2", "--save_steps", "2")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(Path(prompts).read_text().splitlines(keepends=True)[:40]))
    argv = ["grpo", "--model_name_or_path", start, "--dataset_name", str(fewer), "--output_dir", str(out),
            "--reward_funcs", "_online_rewards:length", "--per_device_train_batch_size", "8",
            "--num_generations", "4", "--max_completion_length", "6", "--max_steps", "4",
            "--resume_from_checkpoint", "latest"]  # fmt: skip
    assert main(argv) == 2
    assert "was trained on 48 prompts but the train set now has 40" in capsys.readouterr().err


def test_readme_reward_functions_train(tmp_path, start, prompts, monkeypatch):
    snippet = re.search(r"<!-- custom-reward -->\s*```python\n(.*?)```", README.read_text(), re.S)
    assert snippet, "README.md has no custom-reward snippet"
    # its own module name: another test imports a `my_rewards` of its own
    (tmp_path / "readme_rewards.py").write_text(snippet.group(1))
    monkeypatch.chdir(tmp_path)  # the working folder is searched for module:function, as TRL's script does
    monkeypatch.delitem(sys.modules, "readme_rewards", raising=False)  # and dropped again after the test
    out = run("grpo", tmp_path, "readme", start, prompts, "--max_steps", "1",
              "--reward_funcs", "readme_rewards:accuracy,readme_rewards:brevity")  # fmt: skip
    first = metrics(out)[0]
    assert first["rewards/accuracy/mean"] == 0.0  # a random model does not add
    assert first["rewards/brevity/mean"] == pytest.approx(-first["completions/mean_length"] / 100, rel=1e-5)
