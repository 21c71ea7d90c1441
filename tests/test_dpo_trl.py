"""Our DPO loop against TRL 1.16's DPOTrainer: same tiny models, same rows, float32.

1. Tokens: our pipeline (`tokenize_preference`, the keep_start filter, `dpo.collate_pairs`) gives TRL's
   batch (`_prepare_dataset` + `DataCollatorForPreference`) exactly: input_ids, attention_mask,
   completion_mask, for standard, conversational and multi-turn rows, explicit and implicit prompt, and
   with max_length truncation (keep_start drops the rows whose prompt alone fills max_length, as TRL;
   keep_end drops none).
2. One step: on that batch, `dpo.dpo_step_loss` (policy and a separate reference model, the policy a few
   steps away from it) gives TRL's `compute_loss`, every parameter's gradient and every metric TRL logs
   (num_tokens through the loop's count), relative error <= 1e-5, for each loss_type and option of
   test_losses_preference.CASES.
3. Trajectories: 10 optimizer steps of `dpo.train` and of `DPOTrainer.train` from the same saved weights,
   the whole dataset as one batch, AdamW, constant learning rate: per-step losses within 1e-4 (and every
   other number TRL logs within 1e-4 relative or absolute), on Qwen2 (fused hidden-state path), GPT-2
   (logits path) and Gemma 2 (logit soft-capping); also with gradient accumulation, and the eval_ metrics.
4. Precomputed reference log-probs give the live reference's losses (ours, 10 steps); a named reference,
   live or precomputed (plain and LD-DPO sums), gives TRL's logged steps.
5. TR-DPO (sync_ref_model) follows TRL's SyncRefModelCallback trajectory.
6. padding_free (which TRL 1.16 turns off) gives the padded step's loss, gradients and metrics, and TRL's
   padded trajectory.
"""

import copy
import math
from pathlib import Path

import pytest
import torch
from _optional import import_or_skip
from _trl_drivers import (
    TRL_TRAIN,
    assert_same_step,
    family_config,
    logged,
    pair_rows,
    trained_policy_and_reference,
    trl_dpo_step,
    write_jsonl,
)
from datasets import Dataset
from test_losses_preference import CASES, ROWS

from posttrain.data import embedded, preference
from posttrain.rl import dpo
from posttrain.rl.loop import count_tokens
from posttrain.rl.models import disable_dropout, load_tokenizer, router_aux_loss_coef

trl = import_or_skip("trl")  # a failure under CI, where trl is installed

RTOL = 1e-5
TRAJECTORY_ATOL = 1e-4


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    """(policy, reference): the tiny Qwen2 and that model after 3 steps of SFT (see _trl_drivers)."""
    return trained_policy_and_reference(tokenizer)


def our_batch(tokenizer, rows, *, max_length=None, truncation_mode="keep_start", padding_free=False):
    """Our collated batch for `rows` and the number of rows the keep_start filter dropped."""
    tokenized, _ = preference.tokenize_preference(
        Dataset.from_list(rows), tokenizer, command="dpo", keep_columns=()
    )
    kept, dropped = dpo.drop_filled_prompts(tokenized, max_length, truncation_mode)
    batch = dpo.collate_pairs(
        list(kept),
        tokenizer.pad_token_id,
        max_length=max_length,
        truncation_mode=truncation_mode,
        padding_free=padding_free,
    )
    return batch, dropped


def assert_same_batch(ours, theirs):
    """input_ids and attention_mask equal; completion_mask equal wherever TRL reads it: shifted (positions
    1..T-1, the predicted tokens) and summed per sequence (the lengths ipo and sigmoid_norm divide by; ours
    carries them as completion_lengths). At position 0, which nothing predicts, our mask is always 0 (the
    collators' convention) while TRL's is 1 when a sequence starts with a completion token (an empty prompt,
    or keep_end cutting the whole prompt away)."""
    for key in ("input_ids", "attention_mask"):
        assert torch.equal(ours[key], theirs[key]), key
    assert torch.equal(ours["completion_mask"][:, 1:], theirs["completion_mask"][:, 1:])
    assert torch.equal(ours["completion_lengths"], theirs["completion_mask"].sum(1).float())


def our_step(models, batches, **options):
    """Our loss (summed over micro-batches), policy gradients and metrics for one optimizer step."""
    policy, ref = models
    # TRL's default beta and loss unless the case sets them (with no dataset named, ours default to the
    # embedded task's)
    config = dpo.DPOConfig(**{"beta": 0.1, "loss_type": ["sigmoid"], **options})
    model = copy.deepcopy(policy).train()
    disable_dropout(model)  # as TRL's trainer (GPT-2 configs default to dropout 0.1)
    num_pairs = sum(dpo.count_pairs(b) for b in batches)
    aux_coef = router_aux_loss_coef(model.config, config.router_aux_loss_coef)  # as dpo.train decides it
    loss, metrics = 0.0, {}
    for batch in batches:
        part, part_metrics = dpo.dpo_step_loss(
            model, batch, num_pairs, config=config, ref_model=ref, router_aux_loss_coef=aux_coef
        )
        part.backward()
        loss = loss + part.detach()
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss, "grads": grads, "metrics": metrics}


def assert_same_metrics(ours, theirs, batch):
    """Every metric TRL logs, under its name; num_tokens is the loop's count of the batch."""
    assert count_tokens(batch).item() == theirs["metrics"]["num_tokens"]
    for key, value in theirs["metrics"].items():
        if key == "num_tokens":
            continue
        assert key in ours["metrics"], f"{key} missing from our metrics {sorted(ours['metrics'])}"
        assert math.isclose(ours["metrics"][key], value, rel_tol=RTOL, abs_tol=1e-6), (
            key,
            ours["metrics"][key],
            value,
        )


# ---------------------------------------------------------------------------------------------------------
# 1. Tokens, masks and dropped rows
# ---------------------------------------------------------------------------------------------------------


def multi_turn_rows(implicit: bool, n: int = 6):
    """Conversational rows whose prompt is a system message and a finished exchange before the question."""
    out = []
    problems = embedded.problems("train")[: 2 * n]
    for (first, first_answer), (second, answer) in zip(problems[::2], problems[1::2], strict=True):
        prompt = [
            {"role": "system", "content": "Add."},
            {"role": "user", "content": first},
            {"role": "assistant", "content": first_answer},
            {"role": "user", "content": second},
        ]
        sides = {"chosen": answer, "rejected": str(int(answer) + 1)}
        sides = {k: [{"role": "assistant", "content": v}] for k, v in sides.items()}
        if implicit:
            out.append({k: prompt + v for k, v in sides.items()})
        else:
            out.append({"prompt": prompt, **sides})
    return out


def unshared_rows():
    """Implicit-prompt string pairs whose texts differ from the first character: the prompt is empty, so each
    sequence starts with a completion token (which no position predicts)."""
    return [
        {"chosen": "46 is right", "rejected": "9, maybe"},
        {"chosen": "1+1=2", "rejected": "3 = 1+1"},
        {"chosen": "yes", "rejected": "no"},
        {"chosen": "24+22=46", "rejected": "24+22=45"},  # and one with a prompt
    ]


LAYOUTS = {
    "standard, explicit prompt": lambda: pair_rows(False, False),
    "standard, implicit prompt": lambda: pair_rows(False, True),
    "conversational, explicit prompt": lambda: pair_rows(True, False),
    "conversational, implicit prompt": lambda: pair_rows(True, True),
    "multi-turn, explicit prompt": lambda: multi_turn_rows(False),
    "multi-turn, implicit prompt": lambda: multi_turn_rows(True),
    "standard, implicit prompt, empty": unshared_rows,
}
# Losses normalised by completion length (ipo, sigmoid_norm) beside plain sums, so that a different count of
# completion tokens shows in the loss.
LENGTH_LOSSES = {"loss_type": ["sigmoid", "ipo", "sigmoid_norm"], "loss_weights": [1.0, 0.1, 1.0]}


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_tokens_masks_and_step_match_trl(models, tokenizer, layout):
    rows = LAYOUTS[layout]()
    theirs = trl_dpo_step(*models, tokenizer, rows, **LENGTH_LOSSES)
    batch, dropped = our_batch(tokenizer, rows)
    assert dropped == 0
    assert_same_batch(batch, theirs["batch"])
    ours = our_step(models, [batch], **LENGTH_LOSSES)
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, batch)


def long_rows(conversational: bool, n: int = 16):
    """Preference rows with prompts of two length groups and answers that differ from their first token, so
    that truncation cuts answers without making chosen and rejected equal."""
    out = []
    for i, (prompt, answer) in enumerate(embedded.problems("train")[:n]):
        prompt = ("please add: " if i % 3 == 0 else "") + prompt
        sides = {"chosen": answer + " is the exact sum", "rejected": "maybe " + str(int(answer) + 1)}
        if conversational:
            prompt = [{"role": "user", "content": prompt}]
            sides = {k: [{"role": "assistant", "content": v}] for k, v in sides.items()}
        out.append({"prompt": prompt, **sides})
    return out


def _lengths(tokenizer, rows):
    tokenized, _ = preference.tokenize_preference(Dataset.from_list(rows), tokenizer, command="dpo")
    prompt = [len(r["prompt_ids"]) for r in tokenized]
    completion = [max(len(r["chosen_ids"]), len(r["rejected_ids"])) for r in tokenized]
    return prompt, [p + c for p, c in zip(prompt, completion, strict=True)], completion


TRUNCATIONS = {
    # keep_start: the rows whose prompt has >= max_length tokens are dropped (as TRL), the others lose the
    # ends of their answers. keep_end: nothing is dropped, the longer rows lose the start of their prompt;
    # with max_length 8, the whole prompt and the start of the longer answers.
    "keep_start": ("keep_start", lambda prompt, longest: max(prompt) - 1),
    "keep_end": ("keep_end", lambda prompt, longest: max(longest) - 3),
    "keep_end, answers cut": ("keep_end", lambda prompt, longest: 8),
}


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
@pytest.mark.parametrize("truncation", list(TRUNCATIONS))
def test_truncation_and_dropped_rows_match_trl(models, tokenizer, conversational, truncation):
    rows = long_rows(conversational)
    prompt, longest, completion = _lengths(tokenizer, rows)
    truncation_mode, choose = TRUNCATIONS[truncation]
    max_length = choose(prompt, longest)
    cut = {"max_length": max_length, "truncation_mode": truncation_mode}
    theirs = trl_dpo_step(*models, tokenizer, rows, **cut, **LENGTH_LOSSES)
    batch, dropped = our_batch(tokenizer, rows, **cut)
    assert dropped == len(rows) - len(theirs["dataset"])
    if truncation_mode == "keep_start":
        assert 0 < dropped < len(rows)
    else:
        assert dropped == 0
    kept = [
        n for n, p in zip(longest, prompt, strict=True) if truncation_mode == "keep_end" or p < max_length
    ]
    assert any(n > max_length for n in kept)  # rows that train are cut
    if truncation_mode == "keep_end":  # some sequences keep no prompt token: only with max_length 8
        assert (max(completion) >= max_length) == (truncation == "keep_end, answers cut")
    assert_same_batch(batch, theirs["batch"])
    ours = our_step(models, [batch], **LENGTH_LOSSES)
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, batch)


# ---------------------------------------------------------------------------------------------------------
# 2. Every loss_type and option: loss, gradients, metrics on our batch
# ---------------------------------------------------------------------------------------------------------


# loss_type ["sft"] alone needs no reference, so we load none (a stated departure, rl/dpo.py's docstring):
# TRL 1.16 runs its reference for every loss set (dpo_trainer.py, _compute_loss) and logs rewards/* from it.
# The loss, the gradients and every other metric are compared; rewards/* must be absent here.
REWARD_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins")


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_trl(models, tokenizer, case, shared_prefix_calls):
    options = CASES[case]
    theirs = trl_dpo_step(*models, tokenizer, ROWS, **options)
    batch, _ = our_batch(tokenizer, ROWS)
    assert_same_batch(batch, theirs["batch"])
    ours = our_step(models, [batch], **options)
    assert shared_prefix_calls  # chosen and rejected ran their prompt once
    assert theirs["loss"].abs() > 1e-3  # not at a flat point
    assert_same_step(ours, theirs)
    if case == "sft":
        assert not set(REWARD_METRICS) & set(ours["metrics"])
        theirs = {
            **theirs,
            "metrics": {k: v for k, v in theirs["metrics"].items() if k not in REWARD_METRICS},
        }
    assert_same_metrics(ours, theirs, batch)


@pytest.fixture(scope="module")
def family_models(tokenizer):
    """family -> (policy, reference) as `models`, for the tiny GPT-2 (logits path), Gemma 2 (soft-capping)
    and Qwen2-MoE (router loss)."""
    from transformers import AutoModelForCausalLM

    pairs = {}

    def get(family):
        if family not in pairs:
            torch.manual_seed(0)
            start = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
            pairs[family] = trained_policy_and_reference(tokenizer, start)
        return pairs[family]

    return get


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
@pytest.mark.parametrize(
    "case", ["sigmoid", "ipo", "sigmoid-use_weighting", "sigmoid-ld_alpha", "mpo-loss_weights"]
)
def test_step_matches_trl_on_other_families(family_models, tokenizer, family, case):
    """As test_step_matches_trl, on models whose log-probs take the logits path (GPT-2) or go through the
    output soft-capping (Gemma 2): entropy, WPO's log sum p^2, the mean logit and top-1 from those paths."""
    options = CASES[case]
    rows = pair_rows(True, False, n=8)
    theirs = trl_dpo_step(*family_models(family), tokenizer, rows, **options)
    batch, _ = our_batch(tokenizer, rows)
    assert_same_batch(batch, theirs["batch"])
    ours = our_step(family_models(family), [batch], **options)
    assert 0 < theirs["metrics"]["rewards/accuracies"] < 1
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, batch)


def test_moe_router_aux_loss_matches_trl(family_models, tokenizer):
    """A mixture-of-experts policy: TRL 1.16 adds router_aux_loss_coef (the config's, 0.001 here) x the
    router's load-balancing loss to the DPO loss and logs it as aux_loss."""
    rows = pair_rows(True, False, n=8)
    theirs = trl_dpo_step(*family_models("qwen2_moe"), tokenizer, rows)
    assert theirs["metrics"]["aux_loss"] > 1.0  # the term is there: 0.001 x ~2.5 in a loss of ~0.7
    batch, _ = our_batch(tokenizer, rows)
    ours = our_step(family_models("qwen2_moe"), [batch])
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, batch)


def test_micro_batches_sum_to_the_whole_step(models, tokenizer):
    """Pair normalisation: two micro-batches of one step give the whole batch's loss, gradients, metrics."""
    rows = pair_rows(True, False, n=8)
    options = {"loss_type": ["sigmoid", "ipo"], "loss_weights": [1.0, 0.5]}
    whole = our_step(models, [our_batch(tokenizer, rows)[0]], **options)
    halves = our_step(
        models, [our_batch(tokenizer, rows[:3])[0], our_batch(tokenizer, rows[3:])[0]], **options
    )
    assert_same_step(halves, whole)
    for key in ("rewards/margins", "rewards/accuracies", "logps/chosen"):
        assert halves["metrics"][key] == pytest.approx(whole["metrics"][key], rel=RTOL, abs=1e-6), key


# ---------------------------------------------------------------------------------------------------------
# 6. padding_free: one packed row, same step as the padded batch (TRL 1.16 turns padding_free off)
# ---------------------------------------------------------------------------------------------------------


PADDING_FREE_CASES = {
    # name: (CASES entry, truncation_mode and max_length, or None)
    "sigmoid": ("sigmoid", None),
    "ipo": ("ipo", None),
    "sigmoid-ld_alpha": ("sigmoid-ld_alpha", None),
    "sigmoid-use_weighting": ("sigmoid-use_weighting", None),
    "mpo-loss_weights": ("mpo-loss_weights", None),
    "aot": ("aot", None),
    "mpo-keep_start": ("mpo-loss_weights", ("keep_start", 40)),
    "sigmoid-keep_end": ("sigmoid", ("keep_end", 40)),
    "ipo-keep_end-answers_cut": ("ipo", ("keep_end", 8)),  # sequences that start with a completion token
}


@pytest.mark.parametrize("name", list(PADDING_FREE_CASES))
def test_padding_free_gives_the_padded_step(models, tokenizer, name):
    case, truncation = PADDING_FREE_CASES[name]
    rows = pair_rows(True, False, n=8) if truncation is None else long_rows(True, n=8)
    cut = {} if truncation is None else dict(zip(("truncation_mode", "max_length"), truncation, strict=True))
    padded, _ = our_batch(tokenizer, rows, **cut)
    packed, _ = our_batch(tokenizer, rows, padding_free=True, **cut)
    assert packed["input_ids"].shape[0] == 1 and "attention_mask" not in packed
    assert packed["input_ids"].shape[1] == padded["attention_mask"].sum()
    ours = our_step(models, [packed], **CASES[case])
    reference = our_step(models, [padded], **CASES[case])
    assert_same_step(ours, reference)
    for key, value in reference["metrics"].items():
        assert ours["metrics"][key] == pytest.approx(value, rel=RTOL, abs=1e-6), key


# ---------------------------------------------------------------------------------------------------------
# 3-5. Trajectories through both trainers
# ---------------------------------------------------------------------------------------------------------

N_PAIRS, STEPS, LEARNING_RATE = 16, 10, 5e-4


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    """family -> a folder holding that family's tiny causal LM (random init, seed 0) and the tokenizer."""
    from transformers import AutoModelForCausalLM

    folders = {}

    def get(family):
        if family not in folders:
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
            folder = tmp_path_factory.mktemp(family)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            folders[family] = folder
        return folders[family]

    return get


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = pair_rows(True, False, n=N_PAIRS)
    return rows, write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def shared_options(steps=STEPS, **options):
    return dict(
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=N_PAIRS,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        max_length=64,
        seed=0,
        **options,
    )


def trl_run(folder, rows, out, ref_model=None, **options):
    """TRL's logged records (one per step) of DPOTrainer.train from the model in `folder`."""
    args = trl.DPOConfig(output_dir=str(out), **TRL_TRAIN, **options)
    # The tokenizer as both sides load it from the folder (transformers 5 picks its class from the model
    # config there, which for the embedded character tokenizer is not the class it was saved as).
    trainer = trl.DPOTrainer(
        model=str(folder),
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(folder)),
    )
    trainer.train()
    return trainer


def our_run(folder, data_path, out, **options):
    """`dpo.train` from the model in `folder` on the rows in `data_path`; returns its metrics.jsonl."""
    options = {"save_steps": 0, "eval_steps": 0, "disable_tqdm": True, "report_to": "none", **options}
    dpo.train(
        dpo.DPOConfig(model_name_or_path=str(folder), dataset_name=data_path, output_dir=str(out), **options)
    )
    return out / "metrics.jsonl"


def step_records(trainer_or_metrics) -> list[dict]:
    """The per-step records of a TRL trainer's log history or of one of our runs' metrics.jsonl."""
    if isinstance(trainer_or_metrics, Path):
        return [r for r in logged(trainer_or_metrics, None) if "loss" in r]
    return [r for r in trainer_or_metrics.state.log_history if "loss" in r]


def assert_same_trajectory(ours, theirs, steps):
    """Per-step losses within TRAJECTORY_ATOL; every other number TRL logs (grad_norm, learning_rate,
    num_tokens, each DPO metric) within 1e-4, relative or absolute."""
    assert len(ours) == len(theirs) == steps
    gaps = [a["loss"] - b["loss"] for a, b in zip(ours, theirs, strict=True)]
    assert max(map(abs, gaps)) <= TRAJECTORY_ATOL, gaps
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key, value in b.items():
            assert key in a, f"step {step}: {key} missing from our log {sorted(a)}"
            assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (step, key, a[key], value)


TRAJECTORIES = {
    "qwen2-sigmoid": ("qwen2", {"loss_type": ["sigmoid"]}),
    "qwen2-ipo": ("qwen2", {"loss_type": ["ipo"]}),
    "qwen2-robust": ("qwen2", {"loss_type": ["robust"], "label_smoothing": 0.1}),
    "qwen2-apo_zero": ("qwen2", {"loss_type": ["apo_zero"]}),
    "qwen2-mpo": ("qwen2", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    "gpt2-sigmoid": ("gpt2", {"loss_type": ["sigmoid"]}),
    "gpt2-mpo": ("gpt2", {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}),
    "gemma2-sigmoid": ("gemma2", {"loss_type": ["sigmoid"]}),
    "gemma2-ipo": ("gemma2", {"loss_type": ["ipo"]}),
    # padding_free: ours packs each batch into one row; TRL 1.16 warns and pads (so the reference is padded)
    "gpt2-padding_free": ("gpt2", {"loss_type": ["sigmoid", "sft"], "padding_free": True}),
    "gemma2-padding_free": ("gemma2", {"loss_type": ["sigmoid", "sft"], "padding_free": True}),
    # mixture of experts: the router loss (router_aux_loss_coef from the config) is in the loss, aux_loss logged
    "qwen2_moe-sigmoid": ("qwen2_moe", {"loss_type": ["sigmoid"]}),
    "qwen2_moe-padding_free": ("qwen2_moe", {"loss_type": ["sigmoid"], "padding_free": True}),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAJECTORIES))
def test_ten_steps_follow_trls_trajectory(tmp_path, start, data, case):
    family, options = TRAJECTORIES[case]
    rows, data_path = data
    theirs = step_records(trl_run(start(family), rows, tmp_path / "trl", **shared_options(**options)))
    ours = step_records(our_run(start(family), data_path, tmp_path / "ours", **shared_options(**options)))
    assert_same_trajectory(ours, theirs, STEPS)
    first, last = theirs[0]["loss"], theirs[-1]["loss"]
    assert abs(last - first) > 0.02 * abs(first)  # the run moves: real updates are compared


@pytest.mark.slow
@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "padding_free"])
def test_precomputed_reference_gives_the_live_losses(tmp_path, start, data, padding_free):
    """Ours, 10 steps: reference log-probs computed once up front (in micro-batches of 4 pairs, so with other
    padding than the training batch) or by the live reference model each step."""
    _, data_path = data
    options = shared_options(
        loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.01], padding_free=padding_free
    )
    live = step_records(our_run(start("qwen2"), data_path, tmp_path / "live", **options))
    pre = step_records(
        our_run(
            start("qwen2"),
            data_path,
            tmp_path / "pre",
            precompute_ref_log_probs=True,
            precompute_ref_batch_size=4,
            **options,
        )
    )
    assert len(live) == len(pre) == STEPS
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "loss/ipo"):
        gap = max(abs(a[key] - b[key]) for a, b in zip(live, pre, strict=True))
        assert gap <= 1e-5 * max(1.0, abs(live[0][key])), (key, gap)
    assert live[-1]["loss"] < live[0]["loss"] - 0.05


NAMED_REFERENCE_CASES = {
    "live": {},
    "precomputed": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 4},
    "precomputed-ld_alpha": {
        "precompute_ref_log_probs": True,
        "precompute_ref_batch_size": 4,
        "ld_alpha": 0.5,
    },
    "live-tr_dpo": {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
}


@pytest.mark.parametrize("case", list(NAMED_REFERENCE_CASES))
def test_named_reference_matches_trl(tmp_path, models, tokenizer, data, case):
    """3 steps from a policy that is not its reference (the `models` fixture, saved; ours names the reference
    by ref_model_name_or_path, TRL gets it as ref_model), the reference live or its log-probs precomputed by
    both trainers (in micro-batches of 4 pairs; with LD-DPO's weighted sums too), or mixed with the policy
    after every step (TR-DPO). The first step: every number TRL logs to 1e-5; all three: as the
    trajectories (a reference that moved, or did not move as TRL's, would show)."""
    from transformers import AutoModelForCausalLM

    policy, ref = models
    for name, model in (("policy", policy), ("ref", ref)):
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    rows, data_path = data
    steps = 3
    options = shared_options(steps=steps, **NAMED_REFERENCE_CASES[case])
    trainer = trl_run(
        tmp_path / "policy",
        rows,
        tmp_path / "trl",
        ref_model=AutoModelForCausalLM.from_pretrained(tmp_path / "ref", dtype=torch.float32),
        **options,
    )
    metrics = our_run(
        tmp_path / "policy",
        data_path,
        tmp_path / "ours",
        ref_model_name_or_path=str(tmp_path / "ref"),
        **options,
    )
    theirs, ours = step_records(trainer), step_records(metrics)
    assert 0 < theirs[0]["rewards/accuracies"] < 1  # policy and reference differ
    assert_same_trajectory(ours, theirs, steps)
    for key, value in theirs[0].items():  # loss, grad_norm, num_tokens and every DPO metric
        assert math.isclose(ours[0][key], value, rel_tol=RTOL, abs_tol=1e-6), (key, ours[0][key], value)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_tr_dpo_follows_trls_trajectory(tmp_path, start, data, family):
    """TR-DPO: every 2 steps the reference becomes 0.5 x reference + 0.5 x policy (TRL's
    SyncRefModelCallback, after the optimizer step)."""
    rows, data_path = data
    steps = 6
    options = shared_options(
        steps=steps, sync_ref_model=True, ref_model_sync_steps=2, ref_model_mixup_alpha=0.5
    )
    theirs = step_records(trl_run(start(family), rows, tmp_path / "trl", **options))
    ours = step_records(our_run(start(family), data_path, tmp_path / "ours", **options))
    assert_same_trajectory(ours, theirs, steps)
    # The sync is visible: right after step 2 the reference moved halfway to the policy, which halves every
    # log-ratio, so step 3's loss is above step 2's (without the sync the loss falls at every step).
    assert theirs[2]["loss"] > theirs[1]["loss"]


@pytest.mark.slow
def test_gradient_accumulation_follows_trls_trajectory(tmp_path, start, data):
    """4 micro-batches of 4 pairs per step, in the dataset's order on both sides (sequential: our random
    order is a permutation of its own, not transformers'). Each micro-batch's loss is its pairs' share of
    the step (TRL: the micro-batch mean / 4, the same with equal micro-batches); sft's token mean and
    aot_unpaired's sorting stay within each micro-batch, as in TRL."""
    rows, data_path = data
    steps = 6
    options = shared_options(
        steps=steps,
        loss_type=["sigmoid", "sft", "aot_unpaired"],
        loss_weights=[1.0, 0.5, 1.0],
        train_sampling_strategy="sequential",
    )
    options.update(per_device_train_batch_size=4, gradient_accumulation_steps=4)
    theirs = step_records(trl_run(start("qwen2"), rows, tmp_path / "trl", **options))
    ours = step_records(our_run(start("qwen2"), data_path, tmp_path / "ours", **options))
    assert_same_trajectory(ours, theirs, steps)


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_evaluation_matches_trl(tmp_path, start, data, precompute):
    """eval_ metrics on 16 held-out pairs in 2 batches of 8 after 3 steps, with the live reference or its
    log-probs precomputed for the held-out pairs too. Not compared: TRL's timings, and its eval_num_tokens
    (the training token count, which DPOTrainer logs under every mode's num_tokens)."""
    rows, _ = data
    held_out = embedded.rows("preference", "test", seed=0, conversational=True)[:16]
    (tmp_path / "pairs").mkdir()
    write_jsonl(tmp_path / "pairs" / "train.jsonl", rows)
    write_jsonl(tmp_path / "pairs" / "test.jsonl", held_out)
    steps = 3
    options = shared_options(
        steps=steps,
        loss_type=["sigmoid", "sft"],
        per_device_eval_batch_size=8,
        precompute_ref_log_probs=precompute,
    )
    args = trl.DPOConfig(
        output_dir=str(tmp_path / "trl"), eval_strategy="steps", eval_steps=steps, **TRL_TRAIN, **options
    )
    trainer = trl.DPOTrainer(
        model=str(start("qwen2")),
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=load_tokenizer(str(start("qwen2"))),
    )
    trainer.train()
    (theirs,) = [r for r in trainer.state.log_history if "eval_loss" in r]
    metrics = our_run(start("qwen2"), str(tmp_path / "pairs"), tmp_path / "ours", **options, eval_steps=steps)
    (ours,) = [r for r in logged(metrics, None) if "eval_loss" in r]
    skipped = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens")
    assert 0 < theirs["eval_rewards/accuracies"] < 1
    for key, value in theirs.items():
        if key not in skipped:
            assert key in ours, f"{key} missing from our log {sorted(ours)}"
            assert math.isclose(ours[key], value, rel_tol=RTOL, abs_tol=1e-6), (key, ours[key], value)
