"""The PPO loop (`posttrain ppo`): bad input named before the run folder is written, the value model read at
every position, a killed and resumed run continuing with the same per-step numbers, the saved policy and
value model, and (slow) a short run on the embedded task whose score rises."""

import json
import math
import sys
from pathlib import Path

import pytest
import torch

from posttrain.cli import main
from posttrain.data import embedded
from posttrain.rl import checkpoint, loop, ppo, rewards, rollout
from posttrain.rl.config import ConfigError
from posttrain.rl.models import load_reward_model

TRL_METRICS = (
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores", "policy/approxkl_avg", "policy/clipfrac_avg", "policy/entropy_avg", "loss/policy_avg",
    "loss/value_avg", "val/clipfrac_avg", "val/ratio", "val/ratio_var", "val/num_eos_tokens",
    "val/explained_variance", "episode", "loss", "learning_rate", "grad_norm", "num_tokens",
)  # fmt: skip

# The reward of the loop tests: the completion's length in characters (varied, so advantages move); when
# PPO_TEST_STOP_AT names the update being scored, the process first sends itself SIGTERM (a preemption).
REWARD_MODULE = """
import os, signal

def length(completions, trainer_state, **kwargs):
    if os.environ.get("PPO_TEST_STOP_AT") == str(trainer_state.global_step):
        os.kill(os.getpid(), signal.SIGTERM)
    return [float(len(c)) for c in completions]
"""


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


@pytest.fixture
def reward_module(tmp_path, monkeypatch):
    (tmp_path / "ppo_test_rewards.py").write_text(REWARD_MODULE)
    monkeypatch.chdir(tmp_path)  # module:function paths are searched in the working folder, as TRL's script
    monkeypatch.delitem(sys.modules, "ppo_test_rewards", raising=False)
    monkeypatch.delenv("PPO_TEST_STOP_AT", raising=False)
    return "ppo_test_rewards:length"


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def argv_for(out, start, prompts, *args):
    return ["ppo", "--model_name_or_path", start, "--dataset_name", prompts, "--output_dir", str(out),
            "--reward_funcs", "format", "--response_length", "5", "--per_device_train_batch_size", "4",
            "--gradient_accumulation_steps", "2", "--num_mini_batches", "2", "--num_ppo_epochs", "2",
            "--learning_rate", "1e-3", "--max_steps", "2", "--save_steps", "0", "--eval_steps", "0",
            "--disable_tqdm", "true", "--report_to", "none", *args]  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Options
# ---------------------------------------------------------------------------------------------------------


def config(**options):
    return ppo.PPOConfig(**{"dataset_name": "unused", "reward_funcs": ["format"], **options})


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 3, "num_mini_batches": 5},
         r"num_mini_batches=5 does not divide the batch of 12 prompts per process"),
        ({"per_device_train_batch_size": 4, "gradient_accumulation_steps": 2, "num_mini_batches": 4},
         r"a mini-batch of 2 prompts .* is not a whole number of micro-batches of per_device_train_batch_size 4"),
        ({"stop_token": "eot"}, r"stop_token must be 'eos' or none"),
        ({"stop_token": "eos", "stop_token_id": 3}, r"stop_token='eos' and stop_token_id=3: give one"),
        ({"kl_estimator": "k2"}, r"kl_estimator must be one of k1, k3, got 'k2'"),
        ({"response_length": 8, "max_completion_length": 16}, r"max_completion_length=16 and response_length=8"),
        ({"model_name_or_path": "a", "sft_model_path": "b"}, r"sft_model_path='b' and model_name_or_path='a'"),
        ({"reward_weights": [1.0, 2.0]}, r"reward_weights has 2 values for 1 rewards"),
        ({"reward_funcs": []}, r"no reward: pass --reward_model_path or --reward_funcs"),
        ({"temperature": 0.0}, r"temperature must be > 0"),
        ({"gamma": 1.5}, r"gamma must be in \[0, 1\]"),
        ({"missing_eos_penalty": -1.0}, r"missing_eos_penalty must be >= 0"),
        ({"num_ppo_epochs": 0}, r"num_ppo_epochs must be >= 1"),
    ],
)  # fmt: skip
def test_bad_options_are_named_at_start_up(options, message):
    with pytest.raises(ConfigError, match=message):
        config(**options)


def test_defaults_and_aliases_are_trls():
    c = config(max_completion_length=12, sft_model_path="some/model", per_device_train_batch_size=4,
               gradient_accumulation_steps=4, num_mini_batches=2)  # fmt: skip
    assert (c.response_length, c.model_name_or_path) == (12, "some/model")
    assert (c.num_ppo_epochs, c.kl_coef, c.kl_estimator, c.cliprange, c.cliprange_value, c.vf_coef) == (
        4, 0.05, "k1", 0.2, 0.2, 0.1)  # fmt: skip
    assert (c.gamma, c.lam, c.temperature, c.whiten_rewards, c.local_rollout_forward_batch_size) == (
        1.0, 0.95, 0.7, False, 64)  # fmt: skip
    assert c.stop_token is None and c.learning_rate == 5e-5  # TRL's on any other data
    assert (c.local_batch_size, c.local_mini_batch_size, c.steps_per_update) == (16, 8, 8)
    embedded_task = ppo.PPOConfig()
    assert (embedded_task.stop_token, embedded_task.response_length, embedded_task.reward_funcs) == (
        "eos", 4, ["exact_match"])  # fmt: skip
    assert ppo.PPOConfig(stop_token_id=5).stop_token is None  # a stop token id replaces the embedded default


# ---------------------------------------------------------------------------------------------------------
# Bad input named before the run folder is written
# ---------------------------------------------------------------------------------------------------------


def save_classifier(path, tokenizer, num_labels):
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_config(embedded.tiny_model_config(num_labels=num_labels))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_a_reward_model_with_two_labels_is_named(tmp_path, tokenizer, start, prompts, capsys):
    reward = save_classifier(tmp_path / "rm2", tokenizer, num_labels=2)
    out = tmp_path / "run"
    argv = argv_for(out, start, prompts, "--reward_model_path", reward, "--reward_funcs", "none")
    assert main(argv) == 2
    assert f"reward_model_path='{reward}': its head has 2 labels" in capsys.readouterr().err
    assert not out.exists()


def test_a_causal_lm_as_the_reward_model_is_named_before_loading_it(tmp_path, start, prompts, capsys):
    out = tmp_path / "run"
    argv = argv_for(out, start, prompts, "--reward_model_path", start, "--reward_funcs", "none")
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"reward_model_path='{start}': not a trained reward model" in err and "Qwen2ForCausalLM" in err
    assert not out.exists()


def test_a_value_model_with_another_tokenizer_is_named(tmp_path, start, prompts, capsys):
    other = embedded.build_tokenizer()
    other.add_tokens(["<extra>"])
    value = save_classifier(tmp_path / "value", other, num_labels=1)
    out = tmp_path / "run"
    assert main(argv_for(out, start, prompts, "--value_model_path", value)) == 2
    err = capsys.readouterr().err
    assert f"value_model_path='{value}': its tokenizer is not the policy's (vocabulary of" in err
    assert not out.exists()


def test_a_value_model_without_a_sequence_classifier_is_named(tmp_path, start, prompts, capsys):
    from transformers import ViTConfig

    ViTConfig().save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    assert main(argv_for(out, start, prompts, "--value_model_path", str(tmp_path / "vit"))) == 2
    assert "its architecture (vit) has no sequence-classification model" in capsys.readouterr().err
    assert not out.exists()


def test_a_stop_token_the_tokenizer_does_not_know_is_named(tmp_path, tokenizer, start, prompts, capsys):
    out = tmp_path / "run"
    assert main(argv_for(out, start, prompts, "--stop_token_id", "999")) == 2
    assert (
        f"stop_token_id=999 is not a token of the tokenizer (ids 0 .. {len(tokenizer) - 1})"
        in capsys.readouterr().err
    )
    assert not out.exists()


def test_num_mini_batches_not_dividing_the_batch_is_named(tmp_path, start, prompts, capsys):
    out = tmp_path / "run"
    assert main(argv_for(out, start, prompts, "--num_mini_batches", "3")) == 2
    assert "num_mini_batches=3 does not divide the batch of 8 prompts per process" in capsys.readouterr().err
    assert not out.exists()


def test_a_reward_model_scores_and_starts_the_value_model(tmp_path, tokenizer, start, prompts):
    reward = save_classifier(tmp_path / "rm", tokenizer, num_labels=1)
    out = tmp_path / "run"
    assert (
        main(
            argv_for(
                out,
                start,
                prompts,
                "--reward_model_path",
                reward,
                "--reward_funcs",
                "none",
                "--max_steps",
                "1",
            )
        )
        == 0
    )
    info = json.loads((out / "run_info.json").read_text())
    assert info["value_model"] == reward  # TRL's script: the value model starts as the reward model
    first = metrics(out)[0]
    assert first["objective/scores"] == pytest.approx(first["rewards/rm/mean"], rel=1e-6)
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert first["objective/scores"] == pytest.approx(
        sum(r["rewards"]["rm"] for r in rows) / len(rows), rel=1e-5
    )


def test_an_on_policy_step_has_ratio_one(tmp_path, start, prompts):
    """One optimizer step per update: the policy that scores the batch is the one that sampled it, so every
    ratio is 1 (old log-probs at the same temperature, the same tokens), nothing is clipped, and the policy
    loss is minus the mean whitened advantage over the one micro-batch: 0."""
    out = tmp_path / "run"
    argv = argv_for(out, start, prompts, "--num_ppo_epochs", "1", "--num_mini_batches", "1",
                    "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "8")  # fmt: skip
    assert main(argv) == 0
    first = metrics(out)[0]
    assert first["val/ratio"] == pytest.approx(1.0, abs=1e-6) and first["val/ratio_var"] == 0.0
    assert first["policy/approxkl_avg"] == pytest.approx(0.0, abs=1e-10)
    assert first["policy/clipfrac_avg"] == 0.0 and first["val/clipfrac_avg"] == 0.0
    assert first["loss/policy_avg"] == pytest.approx(0.0, abs=1e-6)
    assert first["loss"] == pytest.approx(0.1 * first["loss/value_avg"], abs=1e-7)  # vf_coef 0.1


def test_on_policy_steps_with_lora_have_ratio_one_and_the_adapter_checkpoint_resumes_exactly(
    tmp_path, start, prompts
):
    """Under use_peft the adapters' lora_dropout (0.05 here, the default) must be off too, or the training
    forward differs from the no-gradient one that made the old log-probs. LoRA's B starts at 0, so the adapters
    act only from the second update on: every update's ratio is exactly 1 and its approxkl 0. The checkpoint
    after update 2 holds the adapter alone (beside the value model) and resuming from it repeats update 3."""
    pytest.importorskip("peft")
    out = tmp_path / "run"
    argv = argv_for(out, start, prompts, "--num_ppo_epochs", "1", "--num_mini_batches", "1",
                    "--gradient_accumulation_steps", "1", "--per_device_train_batch_size", "8",
                    "--use_peft", "true", "--lora_dropout", "0.05", "--max_steps", "3", "--save_steps", "2",
                    "--learning_rate", "1e-2")  # fmt: skip
    assert main(argv) == 0
    records = metrics(out)
    assert len(records) == 3
    for record in records:
        assert record["val/ratio"] == 1.0 and record["val/ratio_var"] == 0.0
        assert record["policy/approxkl_avg"] == 0.0 and record["policy/clipfrac_avg"] == 0.0
    assert records[2]["objective/kl"] > 1e-4  # the adapters act: dropout in them would have shown

    saved = out / "checkpoint-2"
    files = {p.name for p in saved.iterdir()}
    assert {checkpoint.ADAPTER_CONFIG, checkpoint.ADAPTER_WEIGHTS, f"{ppo.VALUE_DIR}.safetensors"} <= files
    assert "model.safetensors" not in files
    assert main([*argv, "--resume_from_checkpoint", str(saved)]) == 0
    resumed = metrics(out)[-1]
    assert resumed["step"] == 3
    for key in ("loss", "loss/policy_avg", "loss/value_avg", "grad_norm", "objective/scores", "objective/kl"):
        assert resumed[key] == pytest.approx(records[2][key], rel=1e-6, abs=1e-9), key


# ---------------------------------------------------------------------------------------------------------
# The value model
# ---------------------------------------------------------------------------------------------------------


def test_token_values_are_the_value_of_the_state_before_each_token(start, tokenizer):
    """V at completion token t is the score head read after tokens < t: the pooled score of the prefix."""
    value = load_reward_model(start, pad_token_id=tokenizer.pad_token_id, seed=3).eval()
    prompt_ids = [[5, 6, 7], [8, 9]]
    completion = torch.tensor([[10, 11, 2], [12, 2, 0]])
    ro = rollout.Rollout(
        completion, torch.tensor([[1, 1, 1], [1, 1, 0]]), torch.zeros(2, 3), torch.ones(2, dtype=torch.bool)
    )
    batch = rollout.training_batch(prompt_ids, ro, num_generations=1, pad_token_id=tokenizer.pad_token_id)
    with torch.no_grad():
        values = ppo.token_values(value, batch)[:, -3:]
        for i, (p, c, n) in enumerate([(prompt_ids[0], [10, 11, 2], 3), (prompt_ids[1], [12, 2], 2)]):
            for t in range(3):
                if t >= n:
                    assert values[i, t] == 0
                    continue
                prefix = torch.tensor([p + c[:t]])
                want = value(input_ids=prefix).logits[0, 0]
                assert float(values[i, t]) == pytest.approx(float(want), rel=1e-5, abs=1e-6)


def test_the_step_loss_equals_a_plain_computation_from_the_models_logits(start, tokenizer):
    """`ppo_step_loss` (fused log-probs, hooked values, sliced completion columns) against the models' own full
    logits and hidden states, read token by token: loss and gradients of both models, float32, rel 1e-5."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(start)
    value = load_reward_model(start, pad_token_id=tokenizer.pad_token_id, seed=1)
    prompt_ids = [[5, 6, 7], [8, 9], [10, 11, 12]]
    completion = torch.tensor([[20, 21, 2, 0], [22, 23, 24, 25], [26, 2, 0, 0]])  # stopped, never, stopped
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0]])
    ro = rollout.Rollout(completion, mask, torch.zeros(3, 4), torch.tensor([True, False, True]))
    batch = rollout.training_batch(prompt_ids, ro, num_generations=1, pad_token_id=tokenizer.pad_token_id)
    m = mask.float()
    batch.update(
        old_logps=(-torch.rand(3, 4) * 5) * m, old_values=torch.randn(3, 4) * m,
        advantages=torch.randn(3, 4) * m, returns=torch.randn(3, 4) * m,
    )  # fmt: skip
    config = ppo.PPOConfig(dataset_name="unused", reward_funcs=["format"], cliprange=0.5, cliprange_value=0.3)
    models = ppo.PolicyAndValue(policy, value)
    loss, _ = ppo.ppo_step_loss(models, batch, 2, config=config)  # a micro-batch of 2 in its step
    loss.backward()
    grads = {name: p.grad.clone() for name, p in models.named_parameters()}
    models.zero_grad()

    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}
    logits = policy(**inputs).logits / config.temperature
    hidden = value.model(**inputs).last_hidden_state
    P = batch["input_ids"].shape[1] - 4
    pg_terms, vf_terms = [], []
    for i in range(3):
        for t in range(int(mask[i].sum())):
            position = P + t  # the completion token's column; it is predicted from the column before
            logp = torch.log_softmax(logits[i, position - 1], -1)[batch["input_ids"][i, position]]
            ratio = torch.exp(logp - batch["old_logps"][i, t])
            a = batch["advantages"][i, t]
            pg_terms.append(torch.maximum(-a * ratio, -a * ratio.clamp(0.5, 1.5)))
            v = value.score(hidden[i, position - 1])[0]
            old, ret = batch["old_values"][i, t], batch["returns"][i, t]
            clipped = torch.clamp(v, old - 0.3, old + 0.3)
            vf_terms.append(0.5 * torch.maximum((v - ret) ** 2, (clipped - ret) ** 2))
    want = (sum(pg_terms) / len(pg_terms) + config.vf_coef * sum(vf_terms) / len(vf_terms)) / 2
    want.backward()
    assert loss.item() == pytest.approx(want.item(), rel=1e-5)
    for name, p in models.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-5, atol=1e-7, msg=name)


# ---------------------------------------------------------------------------------------------------------
# Experience
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("kl_estimator", "whiten_rewards"), [("k1", False), ("k3", True)])
def test_experience_equals_a_plain_computation(start, tokenizer, monkeypatch, kl_estimator, whiten_rewards):
    """`make_experience` with the rollout stubbed (fixed completions: two stop early, one is its stop token
    alone, one never stops) against each quantity computed here on its own: the policy's and the reference's
    log-probs from full logits of the unpadded prompt + completion, in float64; the value of the state before
    each token as the value model's pooled score of that prefix alone; the scores (a reward of the completion's
    length, minus missing_eos_penalty where it has no eos); then the per-token rewards, GAE and the whitening
    by the per-timestep loops of test_ppo_losses.py. Model outputs: float32 round-off (rel 1e-5); the rest
    follows from them to rel 1e-6."""
    from test_ppo_losses import loop_gae, loop_kl, loop_mean, loop_var, masked_entries
    from transformers import AutoModelForCausalLM

    eos = tokenizer.eos_token_id
    prompts = ["12+3=", "7+45=", "9+9=", "30+41="]
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completions = [[4, 5, eos], [6, 7, 8, 9, 10], [eos], [11, 3, 4, eos]]
    lengths, W = [len(c) for c in completions], 5
    ids = torch.tensor([c + [tokenizer.pad_token_id] * (W - len(c)) for c in completions])
    mask = torch.tensor([[int(t < n) for t in range(W)] for n in lengths])
    finished = torch.tensor([c[-1] == eos for c in completions])

    def generate(model, given_prompt_ids, *, max_completion_length, eos_token_id, **kwargs):
        assert given_prompt_ids == prompt_ids and (max_completion_length, eos_token_id) == (W, eos)
        return rollout.Rollout(ids, mask, torch.zeros(4, W), finished)

    monkeypatch.setattr(rollout, "generate", generate)

    def length(completion_ids, **kwargs):
        return [0.5 * len(c) - 1.0 for c in completion_ids]

    config = ppo.PPOConfig(
        dataset_name="unused", reward_funcs=["format"], response_length=W, stop_token="eos", kl_coef=0.2,
        kl_estimator=kl_estimator, whiten_rewards=whiten_rewards, missing_eos_penalty=1.5, gamma=0.9, lam=0.8,
        temperature=0.7, local_rollout_forward_batch_size=3,
    )  # fmt: skip
    policy = AutoModelForCausalLM.from_pretrained(start)
    ref = embedded.build_model(seed=1)  # another model, so that the KL is not 0
    value = load_reward_model(start, pad_token_id=tokenizer.pad_token_id, seed=2)
    models = ppo.PolicyAndValue(policy, value)
    rows = [{"prompt": p, "prompt_ids": i} for p, i in zip(prompts, prompt_ids, strict=True)]
    exp = ppo.make_experience(
        config, models, ref, tokenizer, rewards.resolve([length]), rows, stop_token_id=eos
    )

    want = {"old_logps": torch.zeros(4, W), "ref_logps": torch.zeros(4, W), "old_values": torch.zeros(4, W)}
    with torch.no_grad():
        for i, (p, c) in enumerate(zip(prompt_ids, completions, strict=True)):
            sequence = torch.tensor([p + c])
            for name, model in (("old_logps", policy), ("ref_logps", ref)):
                logits = model(input_ids=sequence).logits[0].double() / config.temperature
                for t, token in enumerate(c):  # completion token t is predicted at position len(p) + t - 1
                    want[name][i, t] = torch.log_softmax(logits[len(p) + t - 1], -1)[token]
            for t in range(len(c)):
                want["old_values"][i, t] = value(input_ids=torch.tensor([p + c[:t]])).logits[0, 0]
    got = {
        "old_logps": exp.batch["old_logps"],
        "ref_logps": exp.ref_logps,
        "old_values": exp.batch["old_values"],
    }
    for name, tensor in got.items():
        torch.testing.assert_close(tensor, want[name], rtol=1e-5, atol=1e-6, msg=name)

    scores = [
        0.5 * n - 1.0 - (0.0 if c[-1] == eos else 1.5) for n, c in zip(lengths, completions, strict=True)
    ]
    assert exp.scores.tolist() == pytest.approx(scores)

    # from here on, the experience's own (checked) log-probs and values, in float64
    logps, ref_logps = exp.batch["old_logps"].double(), exp.ref_logps.double()
    values, m = exp.batch["old_values"].double(), mask.double()
    token_rewards = torch.zeros(4, W, dtype=torch.float64)
    for i, n in enumerate(lengths):
        for t in range(n):
            kl = loop_kl(float(logps[i, t]), float(ref_logps[i, t]), kl_estimator)
            token_rewards[i, t] = -0.2 * kl + (scores[i] if t == n - 1 else 0.0)
    if whiten_rewards:  # scaled to unit variance over the batch's tokens, the mean kept (TRL's)
        entries = masked_entries(token_rewards, lengths)
        mean, std = loop_mean(entries), math.sqrt(loop_var(entries) + 1e-8)
        token_rewards = ((token_rewards - mean) / std + mean) * m
    advantages, returns = loop_gae(token_rewards, values, lengths, 0.9, 0.8)
    entries = masked_entries(advantages, lengths)
    mean, std = loop_mean(entries), math.sqrt(loop_var(entries) + 1e-8)
    whitened = (advantages - mean) / std * m
    torch.testing.assert_close(exp.token_rewards.double(), token_rewards, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exp.batch["returns"].double(), returns, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(exp.batch["advantages"].double(), whitened, rtol=1e-6, atol=1e-6)
    assert float(exp.metrics["val/num_eos_tokens"]) == 3
    kl_sums = [sum(loop_kl(float(logps[i, t]), float(ref_logps[i, t]), kl_estimator) for t in range(n))
               for i, n in enumerate(lengths)]  # fmt: skip
    assert float(exp.metrics["objective/kl"]) == pytest.approx(sum(kl_sums) / 4, rel=1e-5)
    assert min(abs(k) for k in kl_sums) > 1e-3  # the KL term is not vacuous


# ---------------------------------------------------------------------------------------------------------
# The update's metrics and gradient clipping (`train_on` on a fixed batch)
# ---------------------------------------------------------------------------------------------------------


def update_inputs(start, tokenizer, tmp_path, learning_rate, **options):
    """`train_on`'s inputs: the run (CPU), the tiny policy and value models, a plain SGD optimizer at
    `learning_rate` (so a step's parameter change is -learning_rate x the clipped gradient), and a batch of four
    completions (lengths 3, 4, 2, 4 of W = 4) with random old values, advantages and returns."""
    from transformers import AutoModelForCausalLM

    config = ppo.PPOConfig(dataset_name="unused", reward_funcs=["format"], **options)
    run = loop.Run(config, "ppo", tmp_path, torch.device("cpu"))
    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_pretrained(start)
    value = load_reward_model(start, pad_token_id=tokenizer.pad_token_id, seed=1)
    models = ppo.PolicyAndValue(policy, value).train()
    optimizer = torch.optim.SGD(models.parameters(), lr=learning_rate)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    prompt_ids = [[5, 6, 7], [8, 9], [10, 11, 12], [13]]
    completion = torch.tensor([[20, 21, 2, 0], [22, 23, 24, 25], [26, 2, 0, 0], [27, 28, 29, 30]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 1]])
    finished = torch.tensor([True, False, True, False])
    ro = rollout.Rollout(completion, mask, torch.zeros(4, 4), finished)
    batch = rollout.training_batch(prompt_ids, ro, num_generations=1, pad_token_id=tokenizer.pad_token_id)
    m = mask.float()
    batch.update(
        old_logps=(-torch.rand(4, 4) * 5) * m, old_values=torch.randn(4, 4) * m,
        advantages=torch.randn(4, 4) * m, returns=torch.randn(4, 4) * m,
    )  # fmt: skip
    return config, run, models, optimizer, scheduler, batch


def test_ratio_var_is_the_variance_of_the_micro_batches_mean_ratios(start, tokenizer, tmp_path):
    """val/ratio_var is TRL's: the unbiased variance of the per-micro-batch mean ratios over the update, checked
    against torch.var of those means computed here in float64. Ratios 1.01 +- 1e-4 (variance ~1e-9) are where
    E[r^2] - E[r]^2 from float32 loses every digit. A zero output layer makes every log-prob the same number c
    whatever the batch, and the learning rate 0 keeps it, so the ratios are known exactly: exp(c - old_logps).
    One row per micro-batch and two PPO epochs: each row's mean ratio enters twice, whatever the shuffle."""
    config, run, models, optimizer, scheduler, batch = update_inputs(
        start, tokenizer, tmp_path, 0.0, per_device_train_batch_size=1, gradient_accumulation_steps=4,
        num_mini_batches=2, num_ppo_epochs=2,
    )  # fmt: skip
    with torch.no_grad():
        models.policy.lm_head.weight.zero_()
        logps = ppo._logps(models.policy, batch, temperature=config.temperature)[:, -4:]
    mask = batch["completion_mask"][:, -4:].bool()
    c = logps[mask]
    assert (c == c[0]).all()
    generator = torch.Generator().manual_seed(1)
    shift = 0.01 + 1e-4 * torch.randn(4, 4, generator=generator)
    batch["old_logps"] = (c[0] - shift) * mask
    out = ppo.train_on(run, models, optimizer, scheduler, batch, config, None, seed=0)

    log_ratio = c[0].double() - batch["old_logps"].double()  # exact: two nearby float32 numbers
    row_means = torch.stack([torch.expm1(log_ratio[i][mask[i]]).mean() + 1 for i in range(4)])
    per_micro_batch = row_means.repeat(2)  # two epochs over the four one-row micro-batches
    assert out["val/ratio_var"] == pytest.approx(float(per_micro_batch.var()), rel=1e-9)
    assert out["val/ratio"] == pytest.approx(float(per_micro_batch.mean()), rel=1e-12)
    assert 1e-10 < out["val/ratio_var"] < 1e-8


@pytest.mark.parametrize("max_grad_norm", [0.0, 1e-2])
def test_max_grad_norm_zero_does_not_clip(start, tokenizer, tmp_path, max_grad_norm):
    """PPO clips at max_grad_norm (1.0 by default; TRL's PPOTrainer never clips): 0 turns clipping off, so a
    plain SGD step at lr 1 moves the parameters of both models by the whole gradient, whose norm is grad_norm;
    with 1e-2 it moves them by 1e-2."""
    from posttrain.rl.config import parse_config

    argv = ["--dataset_name", "unused", "--reward_funcs", "format", "--max_grad_norm", "0"]
    assert parse_config(ppo.PPOConfig, argv).max_grad_norm == 0.0
    assert parse_config(ppo.PPOConfig, argv[:-2]).max_grad_norm == 1.0  # the default
    config, run, models, optimizer, scheduler, batch = update_inputs(
        start, tokenizer, tmp_path, 1.0, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        num_mini_batches=1, num_ppo_epochs=1, max_grad_norm=max_grad_norm,
    )  # fmt: skip
    before = [p.detach().clone() for p in models.parameters()]
    out = ppo.train_on(run, models, optimizer, scheduler, batch, config, None, seed=0)
    moved = torch.cat([(p.detach() - b).flatten() for p, b in zip(models.parameters(), before, strict=True)])
    assert out["grad_norm"] > 0.1  # above the clip below
    want = out["grad_norm"] if max_grad_norm == 0 else max_grad_norm
    assert float(moved.double().norm()) == pytest.approx(want, rel=1e-5)  # (a float32 norm is off by 1e-4)


# ---------------------------------------------------------------------------------------------------------
# A killed run resumes exactly; what it saves
# ---------------------------------------------------------------------------------------------------------


def test_a_killed_run_resumes_with_the_same_per_step_numbers(
    tmp_path, start, prompts, reward_module, monkeypatch, capsys
):
    args = ("--reward_funcs", reward_module, "--max_steps", "5", "--save_steps", "5", "--logging_steps", "1")
    whole = tmp_path / "whole"
    assert main(argv_for(whole, start, prompts, *args)) == 0
    killed = tmp_path / "killed"
    monkeypatch.setenv("PPO_TEST_STOP_AT", "2")  # SIGTERM while scoring update 3: it finishes, then stops
    assert main(argv_for(killed, start, prompts, *args)) == 143
    assert "stopped by SIGTERM after step 3" in capsys.readouterr().err
    assert [p.name for _, p in checkpoint.list_checkpoints(killed)] == ["checkpoint-3"]
    monkeypatch.delenv("PPO_TEST_STOP_AT")
    assert main(argv_for(killed, start, prompts, *args, "--resume_from_checkpoint", "latest")) == 0

    expected, resumed = metrics(whole), metrics(killed)
    assert [r["step"] for r in resumed] == [1, 2, 3, 4, 5]
    assert set(TRL_METRICS) <= set(expected[0])
    for key in ("loss", "loss/policy_avg", "loss/value_avg", "grad_norm", "objective/scores", "objective/kl",
                "val/explained_variance", "val/ratio", "episode"):  # fmt: skip
        assert [r[key] for r in resumed[3:]] == pytest.approx(
            [r[key] for r in expected[3:]], rel=1e-5, abs=1e-7
        )
    assert expected[1]["objective/kl"] > 0  # the policy moved: the numbers compared are not trivially equal
    assert expected[4]["episode"] == 5 * 8 and expected[0]["learning_rate"] == pytest.approx(1e-3)

    # the policy loads as a causal LM from output_dir, the value model as a classifier beside it, each with
    # the weights of the run's last checkpoint (written after the same update)
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    last = killed / "checkpoint-5"
    policy = AutoModelForCausalLM.from_pretrained(killed)
    for name, tensor in checkpoint._load_weights(last).items():
        torch.testing.assert_close(policy.state_dict()[name], tensor, rtol=0, atol=0)
    value = AutoModelForSequenceClassification.from_pretrained(killed / ppo.VALUE_DIR)
    assert value.config.num_labels == 1
    saved_value = load_file(last / f"{ppo.VALUE_DIR}.safetensors")
    for name, tensor in value.state_dict().items():
        torch.testing.assert_close(tensor, saved_value[name], rtol=0, atol=0)
    start_value = load_reward_model(start, pad_token_id=0, seed=42)  # the run's fresh head: it trained
    assert not torch.equal(start_value.score.weight, value.score.weight)


def test_the_completions_log_and_metrics(tmp_path, start, prompts):
    out = tmp_path / "run"
    assert main(argv_for(out, start, prompts, "--logging_steps", "1", "--missing_eos_penalty", "1.0")) == 0
    rows = [json.loads(line) for line in (out / "completions.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1] * 8 + [2] * 8  # 4 x 2 prompts per update, one completion each
    first = metrics(out)[0]
    format_mean = sum(r["rewards"]["format"] for r in rows[:8]) / 8
    assert first["rewards/format/mean"] == pytest.approx(format_mean)
    # the score is the reward minus the penalty for each completion without eos
    assert first["objective/scores"] == pytest.approx(format_mean - (8 - first["val/num_eos_tokens"]) / 8)
    assert first["objective/kl"] == 0.0  # the first update samples from the reference itself
    assert first["objective/rlhf_reward"] == pytest.approx(first["objective/scores"])


# ---------------------------------------------------------------------------------------------------------
# The embedded task
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_ppo_raises_the_score_on_the_embedded_task(tmp_path):
    """The default run (the embedded RL start, exact match, 128 prompts per update), cut to 40 updates (~30 s,
    plus ~20 s to train the start once per session). Measured: sampled score 0.388 over the first 10 updates,
    0.455 over the last 10; KL to the reference at most 0.28 nats per completion; explained variance -0.17 at
    the first update (a fresh value head), 0.094 over the last 10; held-out exact match 44.6 % -> 53.6 %."""
    out = tmp_path / "run"
    argv = ["ppo", "--output_dir", str(out), "--max_steps", "40", "--save_steps", "0", "--disable_tqdm", "true",
            "--report_to", "none"]  # fmt: skip
    assert main(argv) == 0
    records = [r for r in metrics(out) if "objective/scores" in r]
    assert len(records) == 40

    def mean(key, rows):
        return sum(r[key] for r in rows) / len(rows)

    first, last = records[:10], records[-10:]
    assert mean("objective/scores", last) > mean("objective/scores", first) + 0.04
    assert max(r["objective/kl"] for r in records) < 0.5  # nats per completion (k1, summed over its tokens)
    assert records[0]["val/explained_variance"] < 0 < mean("val/explained_variance", last)
    info = json.loads((out / "run_info.json").read_text())
    final = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert final["eval_exact_match"] > info["start_eval_exact_match"]  # held-out greedy answers too
