"""torch_compile: the trained model's decoder stack compiled in place (`loop.compile_decoder`) for the training
and evaluation forwards; generation runs it eagerly, the reward model's last-token path steps aside."""

import json

import pytest
import torch
from torch._dynamo.utils import counters

from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl import last_token, loop, rollout, stock
from posttrain.rl import logprobs as lp
from posttrain.rl.config import ConfigError, TrainConfig
from posttrain.rl.loop import Run


def _records(out, key):
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if key in r]


def _run(argv):
    torch._dynamo.reset()  # each run compiles its own model: no graph of an earlier test is reused
    counters.clear()
    assert main(argv) == 0
    return counters["stats"]["unique_graphs"]


@pytest.mark.slow
def test_sft_with_the_decoder_compiled_follows_the_eager_run(tmp_path, start):
    # the same 3 steps (loss and gradient norm each step), to fused-op rounding
    argv = ["sft", "--model_name_or_path", start, "--max_steps", "3", "--logging_steps", "1", "--eval_steps", "0",
            "--save_steps", "0", "--disable_tqdm", "true", "--report_to", "none"]  # fmt: skip
    graphs = {}
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        graphs[compiled] = _run([*argv, "--output_dir", str(out), "--torch_compile", str(compiled).lower()])
    assert graphs[False] == 0 and graphs[True] >= 1
    eager, fused = (_records(tmp_path / str(c), "loss") for c in (False, True))
    assert [r["step"] for r in fused] == [1, 2, 3]
    for key in ("loss", "grad_norm"):
        assert [r[key] for r in fused] == pytest.approx([r[key] for r in eager], rel=1e-4)


@pytest.mark.slow
def test_grpo_generates_eagerly_and_trains_the_compiled_decoder(tmp_path, start, monkeypatch):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in embedded.rows("prompt_only", "train")[:16]))
    seen = []  # whether the decoder ran compiled during each rollout
    real = rollout._rollout

    def spy(model, *args):
        seen.append(any(stock.compiled(m) for m in model.modules()))
        return real(model, *args)

    monkeypatch.setattr(rollout, "_rollout", spy)
    shared = []  # whether the decoder ran compiled in each shared-prompt forward (the training and old log-probs)
    real_shared = lp._shared_prefix_hidden

    def shared_spy(model, *args):
        shared.append(stock.compiled(model.get_decoder()))
        return real_shared(model, *args)

    monkeypatch.setattr(lp, "_shared_prefix_hidden", shared_spy)
    argv = ["grpo", "--model_name_or_path", start, "--dataset_name", str(prompts),
            "--reward_funcs", "_online_rewards:length", "--max_completion_length", "6",
            "--per_device_train_batch_size", "8", "--num_generations", "4", "--max_steps", "2",
            "--logging_steps", "1", "--save_steps", "0", "--eval_steps", "0", "--disable_tqdm", "true",
            "--report_to", "none"]  # fmt: skip
    for compiled in (False, True):
        out = tmp_path / str(compiled)
        graphs = _run([*argv, "--output_dir", str(out), "--torch_compile", str(compiled).lower()])
        assert (graphs >= 1) is compiled
    assert seen == [False] * 4  # two rollouts per run, each with the decoder eager
    assert shared and shared == [False] * (len(shared) // 2) + [True] * (len(shared) // 2)  # prompts run once
    completions = [(tmp_path / str(c) / "completions.jsonl").read_text().splitlines() for c in (False, True)]
    step_one = [
        [json.loads(line) for line in lines if json.loads(line)["step"] == 1] for lines in completions
    ]
    assert [r["completion"] for r in step_one[1]] == [r["completion"] for r in step_one[0]]  # same sampler
    eager, fused = (_records(tmp_path / str(c), "loss") for c in (False, True))
    assert [r["loss"] for r in fused] == pytest.approx([r["loss"] for r in eager], rel=1e-4, abs=1e-6)


def test_the_decoder_is_compiled_in_place_and_eager_lifts_it_for_a_while():
    model = embedded.build_model(seed=0)
    names = list(model.state_dict())
    loop.compile_decoder(model)
    assert stock.compiled(model.model) and not stock.compiled(model)
    assert torch._dynamo.config.recompile_limit >= loop.RECOMPILE_LIMIT  # room for every variant it runs
    assert list(model.state_dict()) == names  # checkpoints keep their names
    with stock.eager(model):
        assert not any(stock.compiled(m) for m in model.modules())
    assert stock.compiled(model.model)
    with pytest.raises(RuntimeError, match="inside"), stock.eager(model):
        raise RuntimeError("inside")
    assert stock.compiled(model.model)  # restored after an error too


def test_evaluation_runs_its_eval_fn_with_the_decoder_eager(tmp_path):
    # eval_fn is the embedded task's exact match, which generates with transformers' generate
    run = Run(
        config=TrainConfig(output_dir=None), command="test", output_dir=tmp_path, device=torch.device("cpu")
    )
    model = embedded.build_model(seed=0)
    loop.compile_decoder(model)
    seen = []

    def eval_fn(module):
        seen.append(any(stock.compiled(m) for m in module.modules()))
        return {"exact_match": 0.0}

    assert loop.evaluate(run, model, None, None, None, None, eval_fn) == {"eval_exact_match": 0.0}
    assert seen == [False] and stock.compiled(model.model)


def test_a_model_without_a_decoder_stack_is_named():
    with pytest.raises(ConfigError, match="torch_compile=true needs .* Linear has none"):
        loop.compile_decoder(torch.nn.Linear(2, 2))


def test_fsdp_and_torch_compile_together_are_refused():
    with pytest.raises(ConfigError, match="fsdp='full_shard' with torch_compile=true"):
        TrainConfig(output_dir=None, fsdp="full_shard", torch_compile=True)


def test_the_reward_models_last_token_path_steps_aside_for_a_compiled_backbone():
    from transformers import AutoModelForSequenceClassification

    config = embedded.tiny_model_config(num_labels=1, pad_token_id=0)
    model = AutoModelForSequenceClassification.from_config(config)
    model.config._attn_implementation = "sdpa"
    assert last_token.supports(model)
    loop.compile_decoder(model)
    assert not last_token.supports(model)
