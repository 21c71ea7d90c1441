"""The DPO loop's behaviour besides TRL parity (test_dpo_trl.py): start-up checks, bad input, truncation,
layouts, the reference model (live, precomputed, TR-DPO), a custom loss from the README, resume."""

import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from datasets import Dataset

from posttrain import compare
from posttrain.cli import main
from posttrain.data import embedded, preference
from posttrain.rl import cpo, dpo, kto, models, orpo, reward, sft
from posttrain.rl.config import ConfigError, config_help, parse_config

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


def rows(n=8, conversational=False):
    return embedded.rows("preference", "train", seed=0, conversational=conversational)[:n]


def write_rows(path, data):
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    return str(path)


def tokenized(tokenizer, n=8):
    out, _ = preference.tokenize_preference(
        Dataset.from_list(rows(n)), tokenizer, command="dpo", keep_columns=()
    )
    return out


def config(**options):
    return dpo.DPOConfig(**{"dataset_name": "unused", "output_dir": None, **options})


def metrics(output_dir):
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def train_losses(output_dir):
    return [r["loss"] for r in metrics(output_dir) if "loss" in r]


# ---------------------------------------------------------------------------------------------------------
# Start-up checks: each a ConfigError naming the option, before any work
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"loss_type": ["sigmoid", "nope"]}, r"loss_type 'nope' is not a preference loss; expected one of \[.*'apo_zero'.*'sigmoid'"),
        ({"loss_type": []}, r"loss_type is empty"),
        ({"loss_type": ["sigmoid", "sft"], "loss_weights": [1.0]}, r"loss_weights has 1 values for 2 loss_type \['sigmoid', 'sft'\]: give"),
        ({"dataset_name": None, "loss_weights": [1.0]}, r"2 loss_type \['sigmoid', 'sft'\] \(the embedded task's default loss_type\): give"),
        ({"loss_type": ["robust"], "label_smoothing": 0.5}, r"label_smoothing must lie in \[0, 0.5\) for robust"),
        ({"loss_type": ["robust"], "label_smoothing": -0.1}, r"label_smoothing must lie in \[0, 0.5\) for robust"),
        ({"loss_type": ["exo_pair"]}, r"label_smoothing must lie in \(0, 1\) for exo_pair"),
        ({"ld_alpha": 1.5}, r"ld_alpha must lie in \[0, 1\]"),
        ({"loss_type": ["nca_pair"], "f_divergence_type": "js_divergence"}, r"does not apply to loss_type 'nca_pair'"),
        ({"f_divergence_type": "chi2"}, r"unknown f_divergence_type 'chi2'"),
        ({"loss_type": ["aot"], "use_weighting": True}, r"use_weighting does not apply to loss_type 'aot'"),
        ({"sync_ref_model": True, "precompute_ref_log_probs": True}, r"sync_ref_model=true .* precomputed"),
        ({"sync_ref_model": True, "ref_model_mixup_alpha": 1.5}, r"ref_model_mixup_alpha must lie in \[0, 1\]"),
        ({"truncation_mode": "keep_middle"}, r"truncation_mode must be one of keep_start, keep_end"),
        ({"max_prompt_length": 0}, r"max_prompt_length must be >= 1"),
        ({"beta": 0.0}, r"beta must be > 0"),
    ],
)  # fmt: skip
def test_bad_options_are_named_at_start_up(options, message):
    with pytest.raises(ConfigError, match=message):
        config(**options)


def test_cli_lists_valid_loss_types_and_parses_loss_weights(capsys, tmp_path):
    assert main(["dpo", "--loss_type", "sigmoid,bogus", "--output_dir", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "loss_type 'bogus' is not a preference loss" in err and "'sigmoid_norm'" in err
    parsed = parse_config(
        dpo.DPOConfig, ["--loss_type", "sigmoid,bco_pair,sft", "--loss_weights", "0.8,0.2,1.0"]
    )
    assert dpo.DPOConfig(loss_type="ipo").loss_type == ["ipo"]  # one name, as TRL accepts it
    assert parsed.loss_type == ["sigmoid", "bco_pair", "sft"] and parsed.loss_weights == [0.8, 0.2, 1.0]
    assert not (tmp_path / "o").exists()


def test_defaults_are_trls():
    c = dpo.DPOConfig(model_name_or_path="m", dataset_name="d")
    assert (c.beta, c.loss_type, c.learning_rate, c.max_length, c.truncation_mode) == (
        0.1, ["sigmoid"], 1e-6, 1024, "keep_start"
    )  # fmt: skip
    assert (c.per_device_train_batch_size, c.num_train_epochs, c.disable_dropout) == (8, 3.0, True)
    assert (c.ref_model_mixup_alpha, c.ref_model_sync_steps, c.discopop_tau) == (0.6, 512, 0.05)


def test_embedded_defaults_add_the_nll_term_and_start_from_the_online_loops_start(monkeypatch, tmp_path):
    c = dpo.DPOConfig()
    assert (c.loss_type, c.loss_weights, c.learning_rate, c.beta, c.num_train_epochs) == (
        ["sigmoid", "sft"], None, 2e-4, 1.0, 16.0
    )  # fmt: skip
    assert dpo.DPOConfig(loss_type="ipo").loss_type == ["ipo"]  # an explicit loss wins
    assert "none: sigmoid,sft embedded, else sigmoid." in config_help(dpo.DPOConfig)
    # DPO starts from the weaker SFT model; KTO, CPO and ORPO keep the 98 % one (stand-ins: none is trained).
    monkeypatch.setattr(sft, "embedded_start", lambda: "16-epoch SFT")
    monkeypatch.setattr(sft, "embedded_sft_model", lambda: "64-epoch SFT")
    assert c.embedded_start_model() == "16-epoch SFT"
    for other in (kto.KTOConfig(), cpo.CPOConfig(), orpo.ORPOConfig()):
        assert other.embedded_start_model() == "64-epoch SFT", type(other).__name__
    # `posttrain compare` starts both sides where the command would
    assert compare.start_folder("dpo", c, tmp_path) == "16-epoch SFT"
    assert compare.start_folder("kto", kto.KTOConfig(), tmp_path) == "64-epoch SFT"
    assert compare.start_folder("rm", reward.RewardConfig(), tmp_path) == "64-epoch SFT"


# ---------------------------------------------------------------------------------------------------------
# Bad input through `posttrain dpo`: the shared preference checks, named, before the run folder exists
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda r: r.pop("rejected"), r"posttrain dpo: error: .*rejected"),
        (lambda r: r.update(chosen=""), r"row 2: field 'chosen' is an empty string"),
    ],
)
def test_bad_rows_are_named_before_the_run_folder_is_written(capsys, tmp_path, start, edit, message):
    data = rows(4)
    edit(data[2])
    out = tmp_path / "run"
    code = main(["dpo", "--model_name_or_path", start, "--dataset_name", write_rows(tmp_path / "d.jsonl", data), "--output_dir", str(out)])  # fmt: skip
    assert code == 2
    assert re.search(message, capsys.readouterr().err)
    assert not out.exists()


def test_router_loss_on_a_dense_model_is_named_before_the_run_folder_is_written(capsys, tmp_path, start):
    out = tmp_path / "run"
    data = write_rows(tmp_path / "d.jsonl", rows(4))
    code = main(["dpo", "--model_name_or_path", start, "--dataset_name", data, "--output_dir", str(out), "--router_aux_loss_coef", "0.01"])  # fmt: skip
    assert code == 2
    assert (
        "router_aux_loss_coef=0.01: the model (qwen2) is not a mixture of experts" in capsys.readouterr().err
    )
    assert not out.exists()


def test_explicit_prompt_with_different_context_per_side_is_an_error(tokenizer):
    data = rows(3, conversational=True)
    bad = {**data[1]}
    bad["chosen"] = [{"role": "user", "content": "other"}] + bad["chosen"]
    data[1] = bad
    with pytest.raises(
        ValueError, match="row 1: chosen and rejected start with different non-assistant messages"
    ):
        preference.tokenize_preference(Dataset.from_list(data), tokenizer, command="dpo", keep_columns=())


def test_identical_pairs_are_dropped_and_counted_in_the_run_info(tmp_path, start):
    data = rows(8)
    data[3] = {**data[3], "rejected": data[3]["chosen"]}
    out = tmp_path / "run"
    dpo.train(dpo.DPOConfig(model_name_or_path=start, dataset_name=write_rows(tmp_path / "d.jsonl", data), output_dir=str(out), max_steps=1, eval_steps=0, save_steps=0, disable_tqdm=True))  # fmt: skip
    info = json.loads((out / "run_info.json").read_text())
    assert info["train_dropped_identical_pairs"] == 1


def test_a_reference_loss_without_reference_log_probs_is_an_error(tokenizer):
    batch = dpo.collate_pairs(list(tokenized(tokenizer, 4)), tokenizer.pad_token_id)
    model = embedded.build_model(seed=0)
    with pytest.raises(ValueError, match=r"needs reference log-probs, but the batch carries none"):
        dpo.dpo_step_loss(model, batch, 4, config=config(loss_type=["sigmoid"]), ref_model=None)
    # a reference-free loss runs without one
    loss, _ = dpo.dpo_step_loss(model, batch, 4, config=config(loss_type=["sft"]), ref_model=None)
    assert torch.isfinite(loss)


# ---------------------------------------------------------------------------------------------------------
# Truncation and layouts
# ---------------------------------------------------------------------------------------------------------


def pair(prompt, chosen, rejected):
    return {"prompt_ids": prompt, "chosen_ids": chosen, "rejected_ids": rejected}


def test_truncation_keeps_the_start_or_the_end_of_each_sequence():
    rows_ = [pair([1, 2, 3], [4, 5, 6], [7]), pair([8], [9], [10, 11])]
    start_ = dpo.collate_pairs(rows_, 0, max_length=4)
    assert start_["input_ids"].tolist() == [[1, 2, 3, 4], [8, 9, 0, 0], [1, 2, 3, 7], [8, 10, 11, 0]]
    assert start_["completion_mask"].tolist() == [[0, 0, 0, 1], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]]
    end = dpo.collate_pairs(rows_, 0, max_length=4, truncation_mode="keep_end")
    assert end["input_ids"].tolist() == [[3, 4, 5, 6], [8, 9, 0, 0], [1, 2, 3, 7], [8, 10, 11, 0]]
    # the first token of a row is never a target: nothing predicts it
    assert end["completion_mask"].tolist() == [[0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 1], [0, 1, 1, 0]]


def test_max_prompt_length_keeps_the_prompts_end_and_filled_prompts_are_dropped():
    data = Dataset.from_list(
        [pair([1, 2, 3, 4, 5], [6], [7]), pair([1, 2], [3], [4]), pair([9, 9, 9, 9], [1], [2])]
    )
    cut = dpo.cut_prompts(data, 3)
    assert cut["prompt_ids"] == [[3, 4, 5], [1, 2], [9, 9, 9]]
    kept, dropped = dpo.drop_filled_prompts(data, 4, "keep_start")
    assert dropped == 2 and kept["prompt_ids"] == [[1, 2]]
    assert dpo.drop_filled_prompts(data, 4, "keep_end")[1] == 0  # keep_end keeps the completion
    with pytest.raises(ValueError, match=r"every prompt has max_length=2 tokens or more"):
        dpo.drop_filled_prompts(data, 2, "keep_start")


def test_padding_free_gives_the_padded_loss_and_gradients(tokenizer):
    data = list(tokenized(tokenizer, 6))
    torch.manual_seed(0)
    policy, ref = embedded.build_model(seed=1), embedded.build_model(seed=2)
    cfg = config(
        loss_type=["sigmoid", "ipo", "sft"], loss_weights=[1.0, 0.5, 0.3], ld_alpha=0.7, use_weighting=True
    )
    results = []
    for padding_free in (False, True):
        policy.zero_grad()
        batch = dpo.collate_pairs(data, tokenizer.pad_token_id, padding_free=padding_free)
        loss, m = dpo.dpo_step_loss(policy, batch, len(data), config=cfg, ref_model=ref)
        loss.backward()
        results.append(
            (
                loss.detach(),
                {k: v.item() for k, v in m.items()},
                [p.grad.clone() for p in policy.parameters()],
            )
        )
    (l0, m0, g0), (l1, m1, g1) = results
    assert "attention_mask" not in dpo.collate_pairs(data, 0, padding_free=True)
    torch.testing.assert_close(l1, l0, rtol=1e-5, atol=1e-6)
    assert m0.keys() == m1.keys()
    for k in m0:
        assert m1[k] == pytest.approx(m0[k], rel=1e-5, abs=1e-6), k
    for a, b in zip(g0, g1, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_logits_metrics_are_the_mean_logit_over_completion_tokens(tokenizer):
    data = list(tokenized(tokenizer, 4))
    policy, ref = embedded.build_model(seed=1), embedded.build_model(seed=2)
    batch = dpo.collate_pairs(data, tokenizer.pad_token_id)
    _, m = dpo.dpo_step_loss(policy, batch, len(data), config=config(), ref_model=ref)
    with torch.no_grad():
        logits = policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    mask = batch["completion_mask"][:, 1:].bool()
    mean_logit = logits[:, :-1].mean(-1)
    for name, half in (("logits/chosen", slice(0, 4)), ("logits/rejected", slice(4, 8))):
        expected = mean_logit[half][mask[half]].mean()
        assert m[name].item() == pytest.approx(expected.item(), rel=1e-5)
    top1 = (logits[:4, :-1].argmax(-1) == batch["input_ids"][:4, 1:])[mask[:4]].float().mean()
    assert m["mean_token_accuracy"].item() == pytest.approx(top1.item(), rel=1e-6)


def test_a_micro_batch_contributes_its_share_of_the_step_router_loss_included(tokenizer):
    """Every term, the MoE router loss too, is this micro-batch's value times pairs / num_items: a micro-batch
    in a step of twice its pairs gives half of what it gives alone (TRL's per-micro-batch mean under
    gradient accumulation of equal micro-batches)."""
    from _trl_drivers import family_config
    from transformers import AutoModelForCausalLM

    from posttrain.rl.models import router_aux_loss_coef

    torch.manual_seed(0)
    policy = AutoModelForCausalLM.from_config(family_config("qwen2_moe", tokenizer))
    ref = AutoModelForCausalLM.from_config(family_config("qwen2_moe", tokenizer))
    coef = router_aux_loss_coef(policy.config, None)
    assert coef > 0
    batch = dpo.collate_pairs(list(tokenized(tokenizer, 4)), tokenizer.pad_token_id)
    cfg = config(loss_type=["sigmoid", "sft"])
    alone, m_alone = dpo.dpo_step_loss(policy, batch, 4, config=cfg, ref_model=ref, router_aux_loss_coef=coef)
    share, m_share = dpo.dpo_step_loss(policy, batch, 8, config=cfg, ref_model=ref, router_aux_loss_coef=coef)
    assert m_alone["aux_loss"] > 0
    torch.testing.assert_close(share, alone / 2)
    for key in m_alone:
        torch.testing.assert_close(m_share[key], m_alone[key] / 2, msg=key)
    without, _ = dpo.dpo_step_loss(policy, batch, 4, config=cfg, ref_model=ref)
    torch.testing.assert_close(alone - without, coef * m_alone["aux_loss"])


# ---------------------------------------------------------------------------------------------------------
# The reference: precomputed = live, TR-DPO's mixing, checkpointed with the run
# ---------------------------------------------------------------------------------------------------------


def run_dpo(tmp_path, start, name, **options):
    data = write_rows(tmp_path / "pairs.jsonl", rows(16))
    out = tmp_path / name
    shared = dict(model_name_or_path=start, dataset_name=data, output_dir=str(out), per_device_train_batch_size=4, learning_rate=1e-3, max_steps=6, eval_steps=0, save_steps=0, disable_tqdm=True, seed=0, lr_scheduler_type="constant")  # fmt: skip
    dpo.train(dpo.DPOConfig(**{**shared, **options}))
    return out


def test_precomputed_reference_log_probs_give_the_live_references_losses(tmp_path, start):
    live = train_losses(run_dpo(tmp_path, start, "live", loss_type=["sigmoid", "apo_zero"], ld_alpha=0.5))
    pre = train_losses(run_dpo(tmp_path, start, "pre", loss_type=["sigmoid", "apo_zero"], ld_alpha=0.5, precompute_ref_log_probs=True, precompute_ref_batch_size=3))  # fmt: skip
    assert len(live) == 6
    assert max(abs(a - b) for a, b in zip(live, pre, strict=True)) < 1e-6
    assert live[0] == pytest.approx(math.log(2) + 1.0, abs=1e-6)  # policy = reference at step 1
    assert live[-1] < live[0] - 0.05


def test_tr_dpo_mixes_the_policy_into_the_reference(tokenizer):
    policy, ref = embedded.build_model(seed=1), embedded.build_model(seed=2)
    before = [p.clone() for p in ref.parameters()]
    models.mix_into_reference(policy, ref, 0.25)
    for mixed, old, p in zip(ref.parameters(), before, policy.parameters(), strict=True):
        torch.testing.assert_close(mixed, 0.25 * p + 0.75 * old)


def test_tr_dpo_resumes_exactly_with_its_moved_reference(tmp_path, start):
    sync = dict(sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5)
    whole = train_losses(run_dpo(tmp_path, start, "whole", **sync))
    fixed = train_losses(run_dpo(tmp_path, start, "fixed"))
    assert whole[:2] == pytest.approx(fixed[:2], abs=1e-7)  # the first mix lands after step 2
    assert abs(whole[2] - fixed[2]) > 1e-5
    half = run_dpo(tmp_path, start, "half", save_steps=3, max_steps=6, **sync)
    assert (half / "checkpoint-3" / "ref_model.safetensors").is_file()
    resumed = run_dpo(tmp_path, start, "half", resume_from_checkpoint=str(half / "checkpoint-3"), **sync)
    losses = [r["loss"] for r in metrics(resumed) if "loss" in r]
    assert losses[-3:] == pytest.approx(whole[3:], abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# A custom loss: the README's snippet, as a user would run it
# ---------------------------------------------------------------------------------------------------------


def readme_snippet() -> str:
    text = README.read_text()
    match = re.search(r"<!-- custom-loss -->\s*```python\n(.*?)```", text, re.S)
    assert match, "README.md has no custom-loss snippet"
    return match.group(1)


def test_readme_custom_loss_snippet_trains_with_that_loss(tmp_path, start):
    script = tmp_path / "my_dpo.py"
    script.write_text(readme_snippet())
    data = write_rows(tmp_path / "pairs.jsonl", rows(8))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, str(script), "--loss_type", "margin_sigmoid", "--model_name_or_path", start,
         "--dataset_name", data, "--output_dir", str(out), "--max_steps", "2", "--eval_steps", "0",
         "--save_steps", "0", "--disable_tqdm", "true"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    first = train_losses(out)[0]
    # At step 1 the policy is its reference: rho_w = rho_l = 0, so the loss is -log sigma(-gamma).
    gamma = float(re.search(r"gamma=([0-9.]+)", readme_snippet()).group(1))
    assert first == pytest.approx(math.log1p(math.exp(gamma)), abs=1e-6)


# ---------------------------------------------------------------------------------------------------------
# The embedded default
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_default_improves_on_its_sft_start(tmp_path):
    out = tmp_path / "dpo"
    assert main(["dpo", "--output_dir", str(out), "--disable_tqdm", "true"]) == 0
    records = metrics(out)
    evals = [r for r in records if "eval_exact_match" in r]
    train = [r for r in records if "rewards/margins" in r]
    info = json.loads((out / "run_info.json").read_text())
    # It starts from the online loops' start (44.6 % of the 112 held-out sums), not the 98 % SFT model.
    assert info["start_model"] == sft.embedded_start()  # the cached folder: not trained again
    assert info["start_eval_exact_match"] < 0.6
    # sigmoid + NLL on the chosen answers raises exact match: 68.8 / 68.8 / 69.6 % for seeds 42 / 1 / 7
    # (+24 points; rl/dpo.py's RUN_DEFAULTS), and the margins (first step 0, the policy is its reference).
    assert evals[-1]["eval_exact_match"] > info["start_eval_exact_match"] + 0.1
    assert train[-1]["rewards/margins"] > train[0]["rewards/margins"] + 1.5  # 0 -> 2.4-3.7
    assert evals[-1]["eval_rewards/margins"] > 2.0  # 2.65-2.74; 0 before training
    assert evals[-1]["eval_rewards/accuracies"] > 0.8  # the implicit reward ranks held-out pairs (0.89-0.91)
