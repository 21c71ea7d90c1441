"""LoRA through peft (`rl/lora.py`): what trains, the adapter-disabled reference, saving and reloading, resume,
the reward model's score head, the fused log-prob path through the wrapper, and every bad option.

References: the same computations without peft's machinery, written out here (a frozen copy of the base
model as reference, full logits + log_softmax for log-probs, the LoRA parameter count r * (in + out) per
adapted layer); peft itself only to reload what a run saved. Tolerances: float32 round-off (1e-6 for the
same operations in another order, 1e-5 where a merge adds the update into the weight first).
"""

import copy
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _optional import import_or_skip
from datasets import Dataset

from posttrain.data import embedded, preference
from posttrain.rl import checkpoint, dpo, grpo, loop, lora, reward, rloo
from posttrain.rl.config import ConfigError, TrainConfig, parse_config
from posttrain.rl.logprobs import supports_fused, token_logprobs

peft = import_or_skip("peft")


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
def pairs_file(tmp_path_factory):
    rows = embedded.rows("preference", "train", seed=0)[:16]
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def lora_options(**options):
    return {"use_peft": True, "lora_dropout": 0.0, **options}


def batch_of(tokenizer, n=4):
    rows, _ = preference.tokenize_preference(
        Dataset.from_list(embedded.rows("preference", "train", seed=0)[:n]), tokenizer, command="dpo"
    )
    return dpo.collate_pairs(list(rows), pad_token_id=tokenizer.pad_token_id, max_length=None)


def randomize_adapters(model, seed=0):
    """LoRA's B starts at 0 (the adapted model is the base model): give every adapter weight a value."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.1)


def reference_logps(model, batch):
    """Per-token log-probs from the model's full logits (the plain computation), (B, T), 0 off the mask."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logps = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logps, (1, 0)) * batch["completion_mask"]


def run_dpo(start, data, out, **options):
    shared = dict(model_name_or_path=start, dataset_name=data, output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-2, max_steps=6, eval_steps=0, save_steps=0, disable_tqdm=True, seed=0, lr_scheduler_type="constant", report_to="none")  # fmt: skip
    dpo.train(dpo.DPOConfig(**{**shared, **options}))
    return out


def train_losses(output_dir):
    lines = (Path(output_dir) / "metrics.jsonl").read_text().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]


# ---------------------------------------------------------------------------------------------------------
# What trains
# ---------------------------------------------------------------------------------------------------------


def test_only_adapter_parameters_get_gradients_and_reach_the_optimizer(tokenizer):
    model = lora.wrap(embedded.build_model(seed=0), TrainConfig(**lora_options(lora_r=4)))
    randomize_adapters(model)  # so that lora_A's gradient (B^T dY X) is not zero
    batch = batch_of(tokenizer)
    token_logprobs(model, batch).logps.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    adapters = {n for n, _ in model.named_parameters() if ".lora_A." in n or ".lora_B." in n}
    assert with_grad == adapters
    # all-linear: every projection of every layer, not the output layer; r * (in + out) parameters each
    linears = [m for n, m in embedded.build_model(seed=0).named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]  # fmt: skip
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sum(4 * (m.in_features + m.out_features) for m in linears)
    optimizer = loop.build_optimizer(model, TrainConfig(learning_rate=1e-3))
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    assert in_optimizer == {id(p) for n, p in model.named_parameters() if n in adapters}


def test_fused_log_probs_through_the_peft_wrapper_match_full_logits(tokenizer):
    batch = batch_of(tokenizer)
    model = lora.wrap(embedded.build_model(seed=0), TrainConfig(**lora_options()))
    randomize_adapters(model)
    assert supports_fused(model)  # the output layer found through PeftModel -> LoraModel -> Qwen2ForCausalLM
    expected = reference_logps(model, batch)
    torch.testing.assert_close(token_logprobs(model, batch).logps, expected, rtol=0, atol=1e-5)
    # an adapter on the output layer itself: the logits path, which applies it
    headed = lora.wrap(embedded.build_model(seed=0), TrainConfig(**lora_options(lora_target_modules=["lm_head", "q_proj"])))  # fmt: skip
    randomize_adapters(headed)
    assert not supports_fused(headed)
    torch.testing.assert_close(token_logprobs(headed, batch).logps, reference_logps(headed, batch), rtol=0, atol=1e-5)  # fmt: skip


def test_adapter_disabled_reference_is_the_base_model(tokenizer):
    batch = batch_of(tokenizer)
    base = embedded.build_model(seed=0)
    copy = embedded.build_model(seed=0)
    config = TrainConfig(**lora_options())
    ref = lora.reference_of(base, config, torch.device("cpu"))
    assert isinstance(ref, lora.AdapterDisabled)
    policy = lora.wrap(base, config)
    randomize_adapters(policy)
    with torch.no_grad():
        moved = token_logprobs(policy, batch).logps
        via_ref = token_logprobs(ref, batch).logps
        expected = reference_logps(copy, batch)
        again = token_logprobs(policy, batch).logps  # the adapters are back on after the reference's call
    torch.testing.assert_close(via_ref, expected, rtol=0, atol=1e-5)
    assert (moved - expected).abs().max() > 1e-2
    assert torch.equal(again, moved)
    assert all(p.requires_grad == ("lora_" in n) for n, p in policy.named_parameters())
    # GRPO's reference pass switches the reference to eval mode and back: that is the policy's mode
    policy.train()
    assert grpo.policy_logps(ref, batch, 1.0, 3).shape[0] == batch["input_ids"].shape[0]
    assert policy.training


def test_reward_models_score_head_trains_in_full(tokenizer):
    config = TrainConfig(**lora_options(lora_target_modules=["q_proj", "v_proj"]))
    model = reward.load_reward_model(None, pad_token_id=tokenizer.pad_token_id, seed=0)
    model = lora.wrap(model, config)
    assert model.peft_config["default"].task_type == "SEQ_CLS"  # chosen from the model
    randomize_adapters(model)
    batch = reward.collate_pairs(list(preference.tokenize_preference(Dataset.from_list(embedded.rows("preference", "train", seed=0)[:4]), tokenizer, command="rm")[0]), tokenizer.pad_token_id)  # fmt: skip
    loss, _ = reward.reward_step_loss(model, batch, 4)
    loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert {n for n in trained if "lora_" not in n} == {
        "base_model.model.score.modules_to_save.default.weight"
    }
    assert len(trained) == 1 + 2 * 2 * model.config.num_hidden_layers  # score + A, B of q_proj and v_proj


def test_process_reward_models_score_head_trains_in_full():
    from posttrain.rl import prm

    model = lora.wrap(
        prm.load_prm_model(None, seed=0), TrainConfig(**lora_options(lora_target_modules=["q_proj"]))
    )
    assert model.peft_config["default"].task_type == "TOKEN_CLS"  # chosen from the model
    randomize_adapters(model)
    model(input_ids=torch.tensor([[3, 4, 5, 6]])).logits.sum().backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    head = "base_model.model.score.modules_to_save.default"
    assert {n for n in trained if "lora_" not in n} == {f"{head}.weight", f"{head}.bias"}


def test_reward_run_saves_an_adapter_with_its_score_head_and_the_merged_model(tmp_path, start, pairs_file):
    out = tmp_path / "rm"
    reward.train(reward.RewardConfig(model_name_or_path=start, dataset_name=pairs_file, output_dir=str(out), per_device_train_batch_size=4, max_steps=3, eval_steps=0, save_steps=0, disable_tqdm=True, report_to="none", learning_rate=1e-2, merge_adapter=True, **lora_options()))  # fmt: skip
    from transformers import AutoModelForSequenceClassification

    adapter = peft.AutoPeftModelForSequenceClassification.from_pretrained(out, num_labels=1)
    merged = AutoModelForSequenceClassification.from_pretrained(out / "merged")
    ids = torch.tensor([[3, 4, 5, 6, 7]])
    torch.testing.assert_close(adapter(input_ids=ids).logits, merged(input_ids=ids).logits, rtol=0, atol=1e-5)
    # the score head trained from its fresh init (the same init under the same seed)
    fresh = reward.load_reward_model(start, pad_token_id=0, seed=0)
    assert (merged.score.weight - fresh.score.weight).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# DPO: the adapter-disabled reference, precomputed, saved, resumed
# ---------------------------------------------------------------------------------------------------------


def test_dpo_adapter_disabled_reference_gives_the_losses_of_an_explicit_base_copy(
    tmp_path, start, pairs_file
):
    disabled = train_losses(run_dpo(start, pairs_file, tmp_path / "disabled", **lora_options()))
    explicit = train_losses(run_dpo(start, pairs_file, tmp_path / "explicit", ref_model_name_or_path=start, **lora_options()))  # fmt: skip
    precomputed = train_losses(run_dpo(start, pairs_file, tmp_path / "pre", precompute_ref_log_probs=True, **lora_options()))  # fmt: skip
    assert len(disabled) == 6
    assert disabled[0] == pytest.approx(0.6931472, abs=1e-6)  # lora_B = 0: policy = reference at step 1
    assert disabled[-1] < disabled[0] - 0.05  # so the references are compared on a moving policy
    assert disabled == pytest.approx(explicit, abs=1e-6)
    assert disabled == pytest.approx(precomputed, abs=1e-6)


def test_dpo_lora_checkpoint_holds_the_adapter_and_resumes_exactly(tmp_path, start, pairs_file):
    whole = train_losses(run_dpo(start, pairs_file, tmp_path / "whole", **lora_options(lora_dropout=0.1)))
    half = run_dpo(start, pairs_file, tmp_path / "half", save_steps=3, **lora_options(lora_dropout=0.1))
    saved = half / "checkpoint-3"
    files = {p.name for p in saved.iterdir()}
    assert {
        checkpoint.ADAPTER_CONFIG,
        checkpoint.ADAPTER_WEIGHTS,
    } <= files and "model.safetensors" not in files
    optimizer = torch.load(saved / "optimizer.pt", weights_only=True)
    trainable = lora.wrap(embedded.build_model(seed=0), TrainConfig(**lora_options()))
    assert len(optimizer["state"]) == sum(p.requires_grad for p in trainable.parameters())
    resumed = run_dpo(
        start, pairs_file, half, resume_from_checkpoint=str(saved), **lora_options(lora_dropout=0.1)
    )
    assert train_losses(resumed)[-3:] == pytest.approx(whole[3:], abs=1e-6)


def test_saved_adapter_reloads_with_peft_and_merged_model_gives_the_same_log_probs(
    tmp_path, start, tokenizer
):
    from transformers import AutoModelForCausalLM

    batch = batch_of(tokenizer)
    config = TrainConfig(
        model_name_or_path=start, output_dir=str(tmp_path), merge_adapter=True, **lora_options()
    )
    model = lora.wrap(AutoModelForCausalLM.from_pretrained(start), config)
    randomize_adapters(model)
    with torch.no_grad():
        trained = token_logprobs(model, batch).logps
    run = loop.Run(config=config, command="test", output_dir=tmp_path, device=torch.device("cpu"))
    checkpoint.save_model(run, model, tokenizer, tmp_path)
    adapter = peft.AutoPeftModelForCausalLM.from_pretrained(tmp_path)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / checkpoint.MERGED_DIR)
    with torch.no_grad():
        torch.testing.assert_close(token_logprobs(adapter, batch).logps, trained, rtol=0, atol=1e-6)
        torch.testing.assert_close(token_logprobs(merged, batch).logps, trained, rtol=0, atol=1e-5)
        base = token_logprobs(AutoModelForCausalLM.from_pretrained(start), batch).logps
    assert (base - trained).abs().max() > 1e-2


# ---------------------------------------------------------------------------------------------------------
# Bad options: each named, before the model is trained
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"merge_adapter": True}, r"merge_adapter=true but use_peft=false"),
        ({"use_peft": True, "lora_r": 0}, r"lora_r must be >= 1, got 0"),
        ({"use_peft": True, "lora_alpha": 0}, r"lora_alpha must be > 0, got 0"),
        ({"use_peft": True, "lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\), got 1.0"),
        ({"use_peft": True, "lora_task_type": "QUESTION_ANS"}, r"lora_task_type must be one of CAUSAL_LM, SEQ_CLS, TOKEN_CLS, got 'QUESTION_ANS'"),
        ({"use_peft": True, "lora_target_modules": []}, r"lora_target_modules is empty"),
        ({"use_peft": True, "lora_target_modules": ["all-linear", "q_proj"]}, r"all-linear stands alone"),
    ],
)  # fmt: skip
def test_bad_lora_options_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig(**options)


def test_tr_dpo_with_lora_is_named():
    with pytest.raises(ConfigError, match=r"sync_ref_model=true with use_peft=true"):
        dpo.DPOConfig(dataset_name="unused", sync_ref_model=True, use_peft=True)


def test_missing_peft_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(
        ConfigError, match=r"use_peft=true needs the peft package: pip install 'posttrain\[peft\]'"
    ):
        TrainConfig(use_peft=True)


def test_options_parse_from_the_command_line():
    config = parse_config(
        TrainConfig, ["--use_peft", "--lora_target_modules", "q_proj,v_proj", "--lora_r", "8"]
    )
    assert (config.use_peft, config.lora_target_modules, config.lora_r) == (True, ["q_proj", "v_proj"], 8)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"lora_target_modules": ["q_proj", "qkv_proj"]}, r"lora_target_modules: \['qkv_proj'\] match no linear module of Qwen2ForCausalLM; its linear module names: \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', 'v_proj'\]"),
        ({"lora_modules_to_save": ["embed"]}, r"lora_modules_to_save: \['embed'\] match no module of Qwen2ForCausalLM"),
        ({"lora_task_type": "SEQ_CLS"}, r"lora_task_type=SEQ_CLS but the model is a Qwen2ForCausalLM: use CAUSAL_LM"),
        ({"lora_task_type": "TOKEN_CLS"}, r"lora_task_type=TOKEN_CLS but the model is a Qwen2ForCausalLM: use CAUSAL_LM"),
    ],
)  # fmt: skip
def test_options_that_do_not_fit_the_model_are_named(options, message):
    with pytest.raises(ConfigError, match=message):
        lora.wrap(embedded.build_model(seed=0), TrainConfig(**lora_options(**options)))


def test_resume_with_other_lora_options_is_named(tmp_path, start, pairs_file):
    run = run_dpo(start, pairs_file, tmp_path / "run", max_steps=2, save_steps=2, **lora_options())
    saved = str(run / "checkpoint-2")
    with pytest.raises(ConfigError, match=r"use_peft=False but checkpoint .* holds LoRA adapters: resume with use_peft=True"):  # fmt: skip
        run_dpo(start, pairs_file, run, max_steps=4, resume_from_checkpoint=saved)
    with pytest.raises(ValueError, match=r"checkpoint adapter does not fit the model \(other lora_r"):
        run_dpo(start, pairs_file, run, max_steps=4, resume_from_checkpoint=saved, **lora_options(lora_r=8))


# ---------------------------------------------------------------------------------------------------------
# GRPO / RLOO with beta > 0: the same reference without the copy
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("algo", [grpo, rloo])
def test_online_adapter_disabled_reference_gives_the_losses_of_an_explicit_base_copy(
    tmp_path, start, monkeypatch, algo
):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in embedded.rows("prompt_only", "train")[:16]))
    config_cls = grpo.GRPOConfig if algo is grpo else rloo.RLOOConfig

    def run(name):
        out = tmp_path / name
        algo.train(config_cls(model_name_or_path=start, dataset_name=str(prompts), output_dir=str(out), reward_funcs=["_online_rewards:length"], max_completion_length=6, num_generations=4, per_device_train_batch_size=8, max_steps=3, learning_rate=1e-2, beta=0.5, save_steps=0, eval_steps=0, disable_tqdm=True, report_to="none", **lora_options()))  # fmt: skip
        return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]

    disabled = run("disabled")
    # the test's explicit reference: a frozen copy of the base model, taken where the loop takes its reference
    copies = []

    def explicit_copy(policy, config, device):
        copies.append(copy.deepcopy(policy).eval().requires_grad_(False))
        return copies[-1]

    monkeypatch.setattr(lora, "reference_of", explicit_copy)
    explicit = run("explicit")
    assert len(copies) == 1 and not any(lora.is_adapter_layer(m) for m in copies[0].modules())
    for name in ("loss", "kl"):
        assert [r[name] for r in disabled if name in r] == pytest.approx([r[name] for r in explicit if name in r], abs=1e-6)  # fmt: skip
    assert [r["kl"] for r in disabled if "kl" in r][-1] > 1e-4  # the policy moved away from its reference


# ---------------------------------------------------------------------------------------------------------
# With the rest of the machinery: gradient checkpointing, DDP
# ---------------------------------------------------------------------------------------------------------


def test_dpo_lora_with_gradient_checkpointing_gives_the_same_losses(tmp_path, start, pairs_file):
    plain = train_losses(run_dpo(start, pairs_file, tmp_path / "plain", max_steps=3, **lora_options()))
    checkpointed = train_losses(run_dpo(start, pairs_file, tmp_path / "ckpt", max_steps=3, gradient_checkpointing=True, **lora_options()))  # fmt: skip
    assert abs(plain[-1] - plain[0]) > 1e-2  # the adapters moved
    assert checkpointed == pytest.approx(plain, abs=1e-6)


def test_ddp_two_processes_train_the_adapters_as_one(tmp_path):
    """tests/_ddp_worker.py's training under torchrun (gloo, 2 x 2 rows) vs one process (4 rows): the same
    losses and gradient norms, and the final adapters agree."""
    import _ddp_worker

    options = ["--learning_rate", "3e-3", "--max_steps", "3", "--save_steps", "0", "--logging_steps", "0"]
    options += ["--disable_tqdm", "--report_to", "none", "--use_peft", "--lora_dropout", "0", "--lora_r", "4"]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    worker = str(Path(__file__).parent / "_ddp_worker.py")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", worker]
    proc = subprocess.run([*cmd, str(tmp_path / "ddp"), "--per_device_train_batch_size", "2", *options], env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    one = parse_config(TrainConfig, ["--output_dir", str(tmp_path / "one"), "--per_device_train_batch_size", "4", *options])  # fmt: skip
    _ddp_worker.train(one)

    def records(name):
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        return [r for r in map(json.loads, lines) if "loss" in r]

    ddp, single = records("ddp"), records("one")
    assert len(ddp) == 3
    for a, b in zip(ddp, single, strict=True):
        assert (a["loss"], a["grad_norm"]) == pytest.approx((b["loss"], b["grad_norm"]), rel=1e-5)
    from safetensors.torch import load_file

    final, reference = (load_file(tmp_path / name / checkpoint.ADAPTER_WEIGHTS) for name in ("ddp", "one"))
    assert (
        final.keys() == reference.keys()
        and len(final) == 2 * 7 * _ddp_worker.MODEL_KWARGS["num_hidden_layers"]
    )
    for name, tensor in reference.items():
        torch.testing.assert_close(final[name], tensor, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------------
# TRL 1.16 + peft: the same run, step by step
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_dpo_with_lora_follows_trls_trajectory(tmp_path, start):
    """DPO with LoRA (TRL's defaults: r 16, alpha 32, dropout 0.05, zeroed by disable_dropout; all-linear on
    both sides), 8 steps of 8 pairs at lr 2e-3 vs `DPOTrainer(peft_config=...)`, whose reference is the model
    with its adapters disabled: every number TRL logs (loss, grad_norm, rewards/*, logps/*, ...) within 1e-4.
    Both seed the adapters' initialisation with the run's seed, so the trajectories can be compared at all;
    the rows go in order (posttrain's shuffle is its own, not TRL's sampler's). At lr 1e-2 the grad norms
    part by 0.5% at step 4 (the first steps agree; the cause of the growth was not pinned down)."""
    trl = import_or_skip("trl")
    from _trl_drivers import TRL_TRAIN, pair_rows, write_jsonl

    from posttrain.rl.models import load_tokenizer

    rows = pair_rows(True, False, n=16)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    shared = dict(learning_rate=2e-3, lr_scheduler_type="constant", max_steps=8, per_device_train_batch_size=8, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, max_length=64, seed=0, train_sampling_strategy="sequential")  # fmt: skip
    lora_config = peft.LoraConfig(task_type="CAUSAL_LM", r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none")  # fmt: skip
    from transformers import AutoModelForCausalLM

    # a loaded model, not its path: TRL seeds, then would load it (drawing from the generator), then wraps
    trainer = trl.DPOTrainer(
        model=AutoModelForCausalLM.from_pretrained(start),
        args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), **TRL_TRAIN, **shared),
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(start),
        peft_config=lora_config,
    )
    trainer.train()
    theirs = [r for r in trainer.state.log_history if "loss" in r]
    run_dpo(start, data, tmp_path / "ours", **{**shared, "max_length": 64}, use_peft=True)
    ours = [json.loads(line) for line in (tmp_path / "ours" / "metrics.jsonl").read_text().splitlines()]
    ours = [r for r in ours if "loss" in r]
    assert len(ours) == len(theirs) == 8
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key, value in b.items():
            assert key in a, f"step {step}: {key} missing from our log"
            assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (step, key, a[key], value)
    assert abs(theirs[-1]["loss"] - theirs[0]["loss"]) > 0.02  # the adapters move: real updates are compared


@pytest.mark.slow
def test_reward_model_with_lora_follows_trls_trajectory(tmp_path, tokenizer):
    """A reward model with LoRA (task type SEQ_CLS: peft trains the score head in full) vs
    `RewardTrainer(peft_config=LoraConfig(task_type="SEQ_CLS", ...))`, 8 steps of 16 pairs at lr 2e-3 from the
    same saved sequence classifier: per-step loss within 1e-4 (each side's own task type: ours chosen from
    the model, lora_task_type unset)."""
    trl = import_or_skip("trl")
    from _trl_drivers import TRL_TRAIN, pair_rows, write_jsonl
    from transformers import AutoModelForSequenceClassification

    from posttrain.rl.models import load_tokenizer

    start = tmp_path / "start"
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(embedded.tiny_model_config(num_labels=1))
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(start)
    tokenizer.save_pretrained(start)
    rows = pair_rows(True, False, n=16)
    shared = dict(learning_rate=2e-3, lr_scheduler_type="constant", max_steps=8, per_device_train_batch_size=16, weight_decay=0.0, max_grad_norm=1.0, logging_steps=1, max_length=64, seed=0)  # fmt: skip
    lora_config = peft.LoraConfig(task_type="SEQ_CLS", r=16, lora_alpha=32, lora_dropout=0.05, target_modules="all-linear", bias="none")  # fmt: skip
    trainer = trl.RewardTrainer(
        model=AutoModelForSequenceClassification.from_pretrained(start, num_labels=1),
        args=trl.RewardConfig(output_dir=str(tmp_path / "trl"), **TRL_TRAIN, **shared),
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(start)),
        peft_config=lora_config,
    )
    trainer.train()
    theirs = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    config = reward.RewardConfig(model_name_or_path=str(start), dataset_name=write_jsonl(tmp_path / "pairs.jsonl", rows), output_dir=str(tmp_path / "ours"), save_steps=0, eval_steps=0, disable_tqdm=True, report_to="none", use_peft=True, **shared)  # fmt: skip
    reward.train(config)
    ours = train_losses(tmp_path / "ours")
    assert len(ours) == len(theirs) == 8
    assert ours == pytest.approx(theirs, abs=1e-4)
    assert abs(theirs[-1] - theirs[0]) > 0.02  # the adapters and the head move: real updates are compared
