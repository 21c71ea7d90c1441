"""Our KTO against TRL 1.16's KTOTrainer: same tiny models, same rows, float32.

1. Data: our pipeline (`unpaired.tokenize_unpaired`, the keep_start filter, `add_kl_completions`) gives the
   rows of TRL's `_prepare_dataset` exactly (prompt_ids, completion_ids, the mismatched KL_completion_ids,
   label), for unpaired rows and for paired rows that both unpair (explicit and implicit prompt), standard
   and conversational, with max_length dropping the rows whose prompt fills it; the collated batches give
   TRL's collator's tensors.
2. One step: `kto.kto_step_loss` (a policy a few steps away from its separate reference) gives TRL's
   `compute_loss`, every parameter's gradient and every metric TRL logs, relative error <= 1e-5, for both
   loss types, with desirable / undesirable weights, with precomputed reference log-probs, on Qwen2 (fused
   path), GPT-2 (logits path) and a mixture-of-experts Qwen2 (router loss); and with two micro-batches (TRL:
   gradient accumulation): loss, gradients and kl.
3. Trajectories: 10 optimizer steps of `kto.train` and `KTOTrainer.train` from the same saved weights, the
   whole dataset as one batch, AdamW, constant learning rate: per-step losses within 1e-4 and every other
   number TRL logs within 1e-4; a named reference, live, precomputed or mixed into by the policy (TR-DPO),
   over 3 steps; the eval_ metrics.
"""

import copy
import logging
import math

import pytest
import torch
from _kto_drivers import (
    assert_same_metrics,
    our_batches,
    our_kto_step,
    our_rows,
    trl_kto_step,
    unpaired_rows,
)
from _optional import import_or_skip
from _trl_drivers import (
    TRL_TRAIN,
    assert_same_step,
    family_config,
    logged,
    pair_rows,
    trained_policy_and_reference,
    write_jsonl,
)
from datasets import Dataset
from test_dpo_trl import assert_same_trajectory, step_records

from posttrain.data import embedded
from posttrain.rl import kto
from posttrain.rl.models import load_tokenizer

trl = import_or_skip("trl")  # a failure under CI, where trl is installed

RTOL = 1e-5


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    """(policy, reference): the tiny Qwen2 and that model after 3 steps of SFT (see _trl_drivers)."""
    return trained_policy_and_reference(tokenizer)


def config(**options):
    """Our config at TRL's defaults for other data (beta 0.1, max_length 1024) unless the case says."""
    return kto.KTOConfig(**{"beta": 0.1, "max_length": 1024, **options})


# ---------------------------------------------------------------------------------------------------------
# 1. Data
# ---------------------------------------------------------------------------------------------------------


def long_rows(n: int = 12):
    """Unpaired standard rows with prompts of two length groups (for the max_length filter) and answers of
    two lengths (for the cut)."""
    out = []
    for i, row in enumerate(unpaired_rows(False, n)):
        prompt = ("please add these: " if i % 3 == 0 else "") + row["prompt"]
        completion = row["completion"] + (" is my answer" if i % 2 == 0 else "")
        out.append({**row, "prompt": prompt, "completion": completion})
    return out


DATA_LAYOUTS = {
    "unpaired, standard": lambda: unpaired_rows(False, 10),
    "unpaired, conversational": lambda: unpaired_rows(True, 10),
    "paired, standard": lambda: pair_rows(False, False, n=5),
    "paired, conversational": lambda: pair_rows(True, False, n=5),
    "paired, implicit prompt": lambda: pair_rows(False, True, n=5),
    "paired, conversational, implicit prompt": lambda: pair_rows(True, True, n=5),
}


@pytest.mark.parametrize("layout", list(DATA_LAYOUTS))
def test_rows_and_batches_match_trl(models, tokenizer, layout):
    """Blocks of 4 rows for the mismatched completions (10 rows: a short last block, as TRL's)."""
    rows = DATA_LAYOUTS[layout]()
    theirs = trl_kto_step(*models, tokenizer, rows, batch_size=4)
    ours, dropped = our_rows(tokenizer, rows, config(per_device_train_batch_size=4))
    assert dropped == 0
    assert len(ours) == len(theirs["dataset"]) == 10
    for key, their_key in (
        ("prompt_ids", "prompt_ids"),
        ("completion_ids", "completion_ids"),
        ("kl_completion_ids", "KL_completion_ids"),
        ("label", "label"),
    ):
        assert ours[key] == theirs["dataset"][their_key], key
    batches, _ = our_batches(tokenizer, rows, config(per_device_train_batch_size=4))
    assert_same_batches(batches, theirs["batches"])


def assert_same_batches(ours, theirs):
    """Each micro-batch's tensors equal TRL's, ours padded to one width for the matched and mismatched
    sequences (the padding columns beyond TRL's width are padding only). The completion mask is compared
    where TRL reads it (positions 1.., the predicted tokens)."""
    assert len(ours) == len(theirs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a["label"], b["label"])
        assert ("kl_input_ids" in a) == ("KL_input_ids" in b)  # only for losses with a reference point
        for prefix, their_prefix in (("", ""), ("kl_", "KL_"))[: 1 + ("KL_input_ids" in b)]:
            T = b[f"{their_prefix}input_ids"].shape[1]
            assert not a[f"{prefix}attention_mask"][:, T:].any()
            for key in ("input_ids", "attention_mask"):
                assert torch.equal(a[f"{prefix}{key}"][:, :T], b[f"{their_prefix}{key}"]), prefix + key
            mask = a[f"{prefix}completion_mask"][:, 1:T]
            assert torch.equal(mask, b[f"{their_prefix}completion_mask"][:, 1:]), prefix + "completion_mask"


def test_max_length_drops_and_cuts_as_trl(models, tokenizer):
    """max_length between the two prompt lengths: the long-prompt rows are dropped (counted), the others
    cut, before the mismatched completions are built."""
    rows = long_rows()
    options = {"max_length": 20}
    theirs = trl_kto_step(*models, tokenizer, rows, batch_size=4, **options)
    ours, dropped = our_rows(tokenizer, rows, config(per_device_train_batch_size=4, **options))
    assert dropped == len(rows) - len(theirs["dataset"]) == 4
    assert ours["kl_completion_ids"] == theirs["dataset"]["KL_completion_ids"]
    batches, _ = our_batches(tokenizer, rows, config(per_device_train_batch_size=4, **options))
    assert any(b["attention_mask"].shape[1] == 20 for b in batches)  # rows that train are cut
    assert_same_batches(batches, theirs["batches"])


def test_label_balance_warning_gives_trls_ranges(models, tokenizer, caplog):
    """3 desirable, 5 undesirable rows: TRL logs its recommended weight ranges; ours warns the same ones."""
    from posttrain.data import unpaired

    rows = unpaired_rows(False, 8)
    assert sum(r["label"] for r in rows) == 3
    with caplog.at_level(logging.WARNING):
        trl_kto_step(*models, tokenizer, rows)
    (theirs,) = [r.getMessage() for r in caplog.records if "desirable_weight in" in r.getMessage()]
    (ours,) = unpaired.label_warnings(3, 5, 1.0, 1.0)
    for text in ("desirable_weight in [1.67, 2.22]", "undesirable_weight in [0.45, 0.6]"):
        assert text in theirs and text in ours


# ---------------------------------------------------------------------------------------------------------
# 2. One step
# ---------------------------------------------------------------------------------------------------------

STEP_CASES = {
    "kto": {"loss_type": "kto"},
    "kto-weights": {"loss_type": "kto", "desirable_weight": 1.33, "undesirable_weight": 0.6},
    "kto-beta": {"loss_type": "kto", "beta": 2.0},
    "apo_zero_unpaired": {"loss_type": "apo_zero_unpaired"},
    "apo_zero_unpaired-weights": {
        "loss_type": "apo_zero_unpaired",
        "desirable_weight": 0.5,
        "undesirable_weight": 2.0,
    },
    "kto-precomputed": {"loss_type": "kto", "precompute_ref_log_probs": True, "precompute_ref_batch_size": 3},
    "apo_zero_unpaired-precomputed": {"loss_type": "apo_zero_unpaired", "precompute_ref_log_probs": True},
}


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
@pytest.mark.parametrize("case", list(STEP_CASES))
def test_step_matches_trl(models, tokenizer, case, conversational, shared_prefix_calls):
    options = {"beta": 0.1, **STEP_CASES[case]}
    rows = unpaired_rows(conversational, 8)
    theirs = trl_kto_step(*models, tokenizer, rows, **options)
    cfg = config(per_device_train_batch_size=8, **options)
    batches, _ = our_batches(tokenizer, rows, cfg, ref=models[1])
    assert ("ref_logps" in batches[0]) == cfg.precompute_ref_log_probs
    assert_same_batches(batches, theirs["batches"])
    ours = our_kto_step(*models, batches, cfg)
    assert theirs["loss"].abs() > 1e-3
    if cfg.uses_kl:
        assert theirs["metrics"]["kl"] > 0  # the reference point is not clamped to 0 here: it is compared
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, batches)
    # the reference's forward over the rows and their mismatched completions ran each prompt once
    assert bool(shared_prefix_calls) == cfg.uses_kl


@pytest.fixture(scope="module")
def family_models(tokenizer):
    """family -> (policy, reference) as `models`, for the tiny GPT-2 (logits path) and Qwen2-MoE."""
    from transformers import AutoModelForCausalLM

    pairs = {}

    def get(family):
        if family not in pairs:
            torch.manual_seed(0)
            start = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
            pairs[family] = trained_policy_and_reference(tokenizer, start)
        return pairs[family]

    return get


@pytest.mark.parametrize("family", ["gpt2", "qwen2_moe"])
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_step_matches_trl_on_other_families(family_models, tokenizer, family, loss_type):
    """GPT-2: log-probs, entropy and the mean logit from the logits path. Qwen2-MoE: TRL adds the config's
    router_aux_loss_coef (0.001) x the router's load-balancing loss and logs aux_loss."""
    from posttrain.rl.models import router_aux_loss_coef

    rows = unpaired_rows(True, 8)
    policy, ref = family_models(family)
    theirs = trl_kto_step(policy, ref, tokenizer, rows, loss_type=loss_type, beta=0.1)
    cfg = config(per_device_train_batch_size=8, loss_type=loss_type)
    batches, _ = our_batches(tokenizer, rows, cfg)
    coef = router_aux_loss_coef(policy.config, None)
    assert (coef > 0) == (family == "qwen2_moe")
    model = copy.deepcopy(policy).train()
    num_items = kto.count_rows(batches[0])
    loss, metrics = kto.kto_step_loss(
        model, batches[0], num_items, config=cfg, ref_model=ref, router_aux_loss_coef=coef
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    ours = {"loss": loss.detach(), "grads": grads, "metrics": {k: float(v) for k, v in metrics.items()}}
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, batches)
    assert ("aux_loss" in ours["metrics"]) == (family == "qwen2_moe")


def test_two_micro_batches_match_trls_gradient_accumulation(models, tokenizer):
    """8 rows in 2 micro-batches of 4 (one step): each micro-batch has its own reference point, from its own
    mismatched pairs. Loss, gradients and kl equal TRL's (each micro-batch weighs by its rows, TRL: the
    micro-batch mean / 2, the same with equal micro-batches); the other metrics are pooled over the step
    here, TRL's the mean of the micro-batches' values (see rl/kto.py), so they are compared to that pooling."""
    rows = unpaired_rows(False, 8)
    theirs = trl_kto_step(*models, tokenizer, rows, batch_size=4, beta=0.1)
    cfg = config(per_device_train_batch_size=4)
    batches, _ = our_batches(tokenizer, rows, cfg)
    assert_same_batches(batches, theirs["batches"])
    ours = our_kto_step(*models, batches, cfg)
    assert_same_step(ours, theirs)
    assert math.isclose(ours["metrics"]["kl"], theirs["metrics"]["kl"], rel_tol=RTOL)
    whole = our_kto_step(*models, our_batches(tokenizer, rows, config(per_device_train_batch_size=8))[0], cfg)
    for key in (
        "logps/chosen",
        "logps/rejected",
        "logits/chosen",
        "entropy",
    ):  # the policy's, before the step
        assert math.isclose(ours["metrics"][key], whole["metrics"][key], rel_tol=RTOL), key


# ---------------------------------------------------------------------------------------------------------
# 3. Trajectories through both trainers
# ---------------------------------------------------------------------------------------------------------

N_ROWS, STEPS, LEARNING_RATE = 16, 10, 5e-4


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    """A folder holding the tiny Qwen2 (random init, seed 0) and the tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("qwen2", tokenizer))
    folder = tmp_path_factory.mktemp("qwen2")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = unpaired_rows(True, N_ROWS)
    return rows, write_jsonl(tmp_path_factory.mktemp("data") / "rows.jsonl", rows)


def shared_options(steps=STEPS, **options):
    return dict(
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=steps,
        per_device_train_batch_size=N_ROWS,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        max_length=64,
        seed=0,
        **options,
    )


def trl_run(folder, rows, out, ref_model=None, eval_rows=None, **options):
    """KTOTrainer.train from the model in `folder`; returns the trainer (its log history)."""
    args = trl.KTOConfig(output_dir=str(out), **TRL_TRAIN, **options)
    trainer = trl.KTOTrainer(
        model=str(folder),
        ref_model=ref_model,
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=None if eval_rows is None else Dataset.from_list(eval_rows),
        processing_class=load_tokenizer(str(folder)),
    )
    trainer.train()
    return trainer


def our_run(folder, data_path, out, **options):
    """`kto.train` from the model in `folder` on the rows in `data_path`; returns its metrics.jsonl."""
    options = {"save_steps": 0, "eval_steps": 0, "disable_tqdm": True, "report_to": "none", **options}
    kto.train(
        kto.KTOConfig(model_name_or_path=str(folder), dataset_name=data_path, output_dir=str(out), **options)
    )
    return out / "metrics.jsonl"


@pytest.fixture(scope="module")
def named(tmp_path_factory, models, tokenizer):
    """Folders holding the `models` pair: a policy that is not its reference, so that the KL reference point
    is positive (a policy starting at its reference gives a negative estimate here, clamped to 0)."""
    folders = {}
    for name, model in zip(("policy", "ref"), models, strict=True):
        folders[name] = tmp_path_factory.mktemp(name)
        model.save_pretrained(folders[name])
        tokenizer.save_pretrained(folders[name])
    return folders


def named_runs(tmp_path, named, data, **options):
    """(TRL's step records, ours) from the `named` policy against the `named` reference."""
    from transformers import AutoModelForCausalLM

    rows, data_path = data
    reference = AutoModelForCausalLM.from_pretrained(named["ref"], dtype=torch.float32)
    theirs = step_records(trl_run(named["policy"], rows, tmp_path / "trl", ref_model=reference, **options))
    ours = step_records(
        our_run(
            named["policy"], data_path, tmp_path / "ours", ref_model_name_or_path=str(named["ref"]), **options
        )
    )
    return theirs, ours


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_ten_steps_follow_trls_trajectory(tmp_path, named, data, loss_type):
    theirs, ours = named_runs(tmp_path, named, data, **shared_options(loss_type=loss_type, beta=0.5))
    assert_same_trajectory(ours, theirs, STEPS)
    first, last = theirs[0]["loss"], theirs[-1]["loss"]
    assert abs(last - first) > 0.02 * abs(first)  # the run moves: real updates are compared
    if loss_type == "kto":
        assert all(r["kl"] > 0 for r in theirs)  # the reference point is in play at every step


NAMED_REFERENCE_CASES = {
    "live": {},
    "precomputed": {"precompute_ref_log_probs": True, "precompute_ref_batch_size": 4},
    "live-tr_dpo": {"sync_ref_model": True, "ref_model_sync_steps": 1, "ref_model_mixup_alpha": 0.5},
}


@pytest.mark.parametrize("case", list(NAMED_REFERENCE_CASES))
def test_named_reference_matches_trl(tmp_path, named, data, case):
    """3 steps from a policy that is not its reference (ours names it by ref_model_name_or_path, TRL gets it
    as ref_model), live, its log-probs (of the completions and the mismatched ones) precomputed by both
    trainers in batches of 4 rows, or mixed with the policy after every step (TR-DPO). The first step:
    every number TRL logs to 1e-5; all three as the trajectories."""
    options = shared_options(steps=3, beta=0.1, **NAMED_REFERENCE_CASES[case])
    theirs, ours = named_runs(tmp_path, named, data, **options)
    assert theirs[0]["kl"] > 0 and theirs[0]["rewards/margins"] != 0  # policy and reference differ
    assert_same_trajectory(ours, theirs, 3)
    for key, value in theirs[0].items():
        assert math.isclose(ours[0][key], value, rel_tol=RTOL, abs_tol=1e-6), (key, ours[0][key], value)


@pytest.mark.parametrize("precompute", [False, True], ids=["live", "precomputed"])
def test_evaluation_matches_trl(tmp_path, named, data, precompute):
    """eval_ metrics on 16 held-out rows (one evaluation batch: TRL averages per-batch values, ours pools the
    whole evaluation, the same with one batch) after 3 steps, the reference live or its log-probs precomputed
    for the held-out rows too. Not compared: TRL's timings and its eval_num_tokens (the training count)."""
    from transformers import AutoModelForCausalLM

    rows, _ = data
    held_out = unpaired_rows(True, 16, offset=100)
    (tmp_path / "rows").mkdir()
    write_jsonl(tmp_path / "rows" / "train.jsonl", rows)
    write_jsonl(tmp_path / "rows" / "test.jsonl", held_out)
    steps = 3
    options = shared_options(
        steps=steps, beta=0.1, per_device_eval_batch_size=16, precompute_ref_log_probs=precompute
    )
    reference = AutoModelForCausalLM.from_pretrained(named["ref"], dtype=torch.float32)
    trainer = trl_run(
        named["policy"], rows, tmp_path / "trl", ref_model=reference, eval_rows=held_out,
        eval_strategy="steps", eval_steps=steps, **options,
    )  # fmt: skip
    (theirs,) = [r for r in trainer.state.log_history if "eval_loss" in r]
    metrics = our_run(
        named["policy"], str(tmp_path / "rows"), tmp_path / "ours", ref_model_name_or_path=str(named["ref"]),
        eval_steps=steps, **options,
    )  # fmt: skip
    (ours,) = [r for r in logged(metrics, None) if "eval_loss" in r]
    skipped = ("eval_runtime", "eval_samples_per_second", "eval_steps_per_second", "eval_num_tokens")
    assert theirs["eval_kl"] > 0
    for key, value in theirs.items():
        if key not in skipped:
            assert key in ours, f"{key} missing from our log {sorted(ours)}"
            assert math.isclose(ours[key], value, rel_tol=RTOL, abs_tol=1e-6), (key, ours[key], value)


def test_unpairing_matches_trls_unpair_preference_dataset():
    """1003 pairs with an extra column: TRL unpairs in map batches of 1000 (each batch's chosen rows, then its
    rejected rows); the order matters, as the mismatched completions come from neighbouring rows."""
    from trl.data_utils import unpair_preference_dataset

    from posttrain.data import unpaired

    pairs = Dataset.from_list(
        [
            {"prompt": f"{i}+1=", "chosen": str(i + 1), "rejected": str(i), "score": float(i)}
            for i in range(1003)
        ]
    )
    theirs = unpair_preference_dataset(pairs)
    ours = unpaired.unpair_preference(pairs)
    assert sorted(ours.column_names) == sorted(theirs.column_names)
    for column in theirs.column_names:
        assert ours[column] == theirs[column], column
