"""Our CPO (SimPO, AlphaPO) and ORPO loops against TRL 1.16's experimental CPOTrainer and ORPOTrainer: same tiny
models, same rows, float32.

1. Tokens: our pipeline (`tokenize_preference`, `dpo.collate_pairs`) gives the trainers' concatenated batch
   (`tokenize_row` + `DPODataCollatorWithPadding` + `concatenated_inputs`): input_ids, attention_mask, and
   the label positions (our completion_mask), also with max_length cutting completions. Where they part, by
   choice (see `rl.cpo`): a tokenizer with a BOS token that it does not add itself gets it prepended by TRL
   and not by us (the DPO loop's tokens); a row whose prompt alone fills max_length, kept by TRL with an
   empty completion (a NaN loss under simpo), is dropped and counted by us.
2. One step: `cpo.cpo_step_loss` / `orpo.orpo_step_loss` give TRL's `compute_loss`, every parameter's
   gradient and every metric TRL stores, relative error <= 1e-5, for each loss_type and option, on Qwen2
   (fused hidden-state path) and GPT-2 (logits path), and on a mixture of experts with its router loss;
   logits/*, which TRL averages over every position of the (B, T, V) logits (prompt and padding included),
   against a plain reference over the completion tokens instead (our definition, the DPO loop's).
3. Trajectories and evaluation: 10 optimizer steps of `cpo.train` / `orpo.train` and of the trainers'
   `train` from the same saved weights, the whole dataset as one batch, AdamW, constant learning rate:
   per-step losses within 1e-4 and every other number TRL logs (but logits/*) within 1e-4, for SimPO
   (simpo, cpo_alpha 0), CPO (sigmoid) and ORPO, and with two micro-batches a step (gradient
   accumulation); the eval_ metrics on held-out pairs after 3 steps within 1e-5.
"""

import copy
import math
import tempfile

import pytest
import torch
from _optional import import_or_skip
from _trl_drivers import (
    TRL_CPU,
    TRL_TRAIN,
    assert_same_step,
    family_config,
    logged,
    pair_rows,
    trained_policy_and_reference,
    write_jsonl,
)
from datasets import Dataset

from posttrain.data import embedded, preference
from posttrain.rl import cpo, dpo, orpo
from posttrain.rl.models import disable_dropout, load_tokenizer

trl = import_or_skip("trl")  # a failure under CI, where trl is installed
from trl.experimental.cpo import CPOConfig, CPOTrainer  # noqa: E402
from trl.experimental.orpo import ORPOConfig, ORPOTrainer  # noqa: E402

RTOL = 1e-5
TRAJECTORY_ATOL = 1e-4
TRAINERS = {"cpo": (CPOConfig, CPOTrainer), "orpo": (ORPOConfig, ORPOTrainer)}
LOOPS = {
    "cpo": (cpo.CPOConfig, cpo.cpo_step_loss, cpo.train),
    "orpo": (orpo.ORPOConfig, orpo.orpo_step_loss, orpo.train),
}
# Completions of 1 to 4 characters + eos, so that per-token means and sums differ; the policy prefers the
# rejected answer of some pairs and the chosen of others.
ROWS = [
    {"prompt": "24+22=", "chosen": "46", "rejected": "4600"},
    {"prompt": "3+4=", "chosen": "7", "rejected": "x"},
    {"prompt": "25+25=", "chosen": "50", "rejected": "9"},
    {"prompt": "1+1=", "chosen": "2", "rejected": "3"},
]
LOGITS = ("logits/chosen", "logits/rejected")  # our definition differs (module docstring)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def policy(tokenizer):
    """The tiny Qwen2 after 3 steps of SFT (`trained_policy_and_reference`): log-probs far from uniform."""
    return trained_policy_and_reference(tokenizer)[0]


def trl_step(kind, model, tokenizer, rows, **options):
    """TRL's loss, policy gradients, stored metrics (each one's last value) and concatenated batch for `rows`
    in one micro-batch."""
    config_class, trainer_class = TRAINERS[kind]
    with tempfile.TemporaryDirectory() as out:
        args = config_class(output_dir=out, per_device_train_batch_size=len(rows), **{**TRL_CPU, **options})
        trainer = trainer_class(
            model=copy.deepcopy(model),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
        )
        dataset = trainer.train_dataset
        batch = trainer.data_collator([dataset[i] for i in range(len(dataset))])
        trainer.model.train()
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
        grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
        metrics = {name: values[-1] for name, values in trainer._stored_metrics["train"].items()}
        concatenated = trainer.concatenated_inputs(batch, padding_value=tokenizer.pad_token_id)
    return {"loss": loss.detach(), "grads": grads, "metrics": metrics, "batch": concatenated}


def our_batch(tokenizer, rows, max_length=None):
    tokenized, _ = preference.tokenize_preference(
        Dataset.from_list(rows), tokenizer, command="cpo", keep_columns=()
    )
    return dpo.collate_pairs(list(tokenized), tokenizer.pad_token_id, max_length=max_length)


def our_step(kind, model, batch, *, router_aux_loss_coef=0.0, **options):
    """Our loss, policy gradients and metrics for one micro-batch (dataset_name set: TRL's defaults apply)."""
    config_class, step_loss, _ = LOOPS[kind]
    config = config_class(dataset_name="pairs.jsonl", **options)
    model = copy.deepcopy(model).train()
    disable_dropout(model)  # as TRL's trainers (GPT-2 configs default to dropout 0.1)
    loss, metrics = step_loss(
        model, batch, dpo.count_pairs(batch), config=config, router_aux_loss_coef=router_aux_loss_coef
    )
    loss.backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss.detach(), "grads": grads, "metrics": {k: float(v) for k, v in metrics.items()}}


def plain_mean_logits(model, batch):
    """logits/chosen, logits/rejected by a plain forward: the mean over the vocabulary of the logits that
    predict each completion token, averaged over the completion tokens of each half."""
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
        ).logits
    per_token = logits[:, :-1].mean(-1)
    mask = batch["completion_mask"][:, 1:].float()
    return [((x * m).sum() / m.sum()).item() for x, m in zip(per_token.chunk(2), mask.chunk(2), strict=True)]


def assert_same_metrics(ours, theirs, model, batch):
    """Every metric TRL stores, under its name; logits/* against `plain_mean_logits`."""
    for key, value in theirs["metrics"].items():
        assert key in ours["metrics"], f"{key} missing from our metrics {sorted(ours['metrics'])}"
        if key in LOGITS:
            continue
        assert math.isclose(ours["metrics"][key], value, rel_tol=RTOL, abs_tol=1e-6), (
            key,
            ours["metrics"][key],
            value,
        )
    for key, value in zip(LOGITS, plain_mean_logits(model, batch), strict=True):
        assert math.isclose(ours["metrics"][key], value, rel_tol=RTOL, abs_tol=1e-6), (
            key,
            ours["metrics"][key],
            value,
        )


SHARED_DEFAULTS = ("learning_rate", "max_length", "beta", "disable_dropout", "per_device_train_batch_size",
                   "num_train_epochs", "warmup_steps", "weight_decay", "lr_scheduler_type", "max_grad_norm")  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "names"),
    [("cpo", ("loss_type", "label_smoothing", "cpo_alpha", "simpo_gamma", "alpha")), ("orpo", ())],
)
def test_defaults_are_trls(kind, names):
    """With a named model and dataset (not the embedded task), every option both configs have defaults to
    TRL's value."""
    import dataclasses

    theirs = {f.name: f.default for f in dataclasses.fields(TRAINERS[kind][0])}
    ours = LOOPS[kind][0](model_name_or_path="m", dataset_name="d")
    for name in SHARED_DEFAULTS + names:
        assert getattr(ours, name) == theirs[name], name


# ---------------------------------------------------------------------------------------------------------
# 1. Tokens
# ---------------------------------------------------------------------------------------------------------


def assert_same_batch(ours, theirs):
    """input_ids and attention_mask equal; TRL's label positions (labels != -100, shifted: the predicted
    tokens) are our completion_mask's."""
    assert torch.equal(ours["input_ids"], theirs["concatenated_input_ids"])
    assert torch.equal(ours["attention_mask"], theirs["concatenated_attention_mask"])
    labelled = theirs["concatenated_labels"] != -100
    assert torch.equal(ours["completion_mask"][:, 1:].bool(), labelled[:, 1:])


@pytest.mark.parametrize("kind", ["cpo", "orpo"])
@pytest.mark.parametrize("max_length", [None, 8], ids=["full", "cut"])
def test_tokens_match_trl(policy, tokenizer, kind, max_length):
    # max_length 8 cuts the longer completions (TRL cuts completions only; no prompt here fills 8 tokens)
    rows = ROWS + pair_rows(False, False, n=4)
    options = {} if max_length is None else {"max_length": max_length}
    theirs = trl_step(kind, policy, tokenizer, rows, **options)
    ours = our_batch(tokenizer, rows, max_length)
    if max_length is not None:
        assert ours["input_ids"].shape[1] == max_length  # the cut is exercised
    assert_same_batch(ours, theirs["batch"])


def test_bos_token_is_not_added(tokenizer):
    """The chosen departure: a tokenizer with a BOS token it does not add itself (GPT-2's kind) gets it in
    front of every sequence from CPOTrainer, and not from us (the DPO loop's tokens, TRL 1.16's DPOTrainer's)."""
    bos_tokenizer = copy.deepcopy(tokenizer)
    bos_tokenizer.bos_token = "<|im_start|>"
    model = embedded.build_model(seed=0)
    theirs = trl_step("cpo", model, bos_tokenizer, ROWS)["batch"]
    ours = our_batch(bos_tokenizer, ROWS)
    bos = bos_tokenizer.bos_token_id
    assert bos is not None and (theirs["concatenated_input_ids"][:, 0] == bos).all()
    assert (ours["input_ids"] != bos).all()
    for row, ids in enumerate(ours["input_ids"]):
        length = int(ours["attention_mask"][row].sum())
        assert theirs["concatenated_input_ids"][row, 1 : length + 1].tolist() == ids[:length].tolist()


def test_a_prompt_that_fills_max_length_is_dropped_where_trl_gives_nan(policy, tokenizer, tmp_path):
    """The other chosen departure: CPOTrainer keeps a row whose prompt alone fills max_length, with an empty
    completion, whose per-token mean is 0 / 0 (a NaN loss under simpo); ours drops and counts it (keep_start,
    as the DPO loop and TRL's DPOTrainer)."""
    rows = ROWS + [{"prompt": "1+2+3+4+5+6=", "chosen": "21", "rejected": "20"}]  # a 12-token prompt
    theirs = trl_step("cpo", policy, tokenizer, rows, loss_type="simpo", max_length=12)
    assert math.isnan(theirs["loss"].item())
    path = write_jsonl(tmp_path / "pairs.jsonl", rows)
    config = cpo.CPOConfig(dataset_name=path, loss_type="simpo", max_length=12)
    train_rows, _, info = dpo.load_preference_data(config, tokenizer)
    assert info["train"]["dropped_prompt_fills_max_length"] == 1 and len(train_rows) == len(ROWS)
    batch = dpo.collate_pairs(list(train_rows), tokenizer.pad_token_id, max_length=12)
    assert math.isfinite(our_step("cpo", policy, batch, loss_type="simpo")["loss"].item())


# ---------------------------------------------------------------------------------------------------------
# 2. One step
# ---------------------------------------------------------------------------------------------------------

CASES = {
    "cpo-sigmoid": ("cpo", {}),
    "cpo-sigmoid-smoothed": ("cpo", {"label_smoothing": 0.2, "beta": 0.5}),
    "cpo-hinge": ("cpo", {"loss_type": "hinge"}),
    "cpo-ipo": ("cpo", {"loss_type": "ipo", "beta": 0.3}),
    "cpo-simpo": ("cpo", {"loss_type": "simpo"}),
    "simpo": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "simpo_gamma": 1.5, "beta": 2.0}),
    "simpo-smoothed": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0, "label_smoothing": 0.1}),
    "alphapo": ("cpo", {"loss_type": "alphapo", "alpha": 0.25, "beta": 2.5}),
    "alphapo-alpha0": ("cpo", {"loss_type": "alphapo"}),
    "cpo-sigmoid-alpha": ("cpo", {"alpha": -0.1, "cpo_alpha": 0.5}),
    "cpo-ipo-alpha": ("cpo", {"loss_type": "ipo", "alpha": 0.5}),
    "cpo-hinge-alpha": ("cpo", {"loss_type": "hinge", "alpha": 0.05, "beta": 1.0}),
    "orpo": ("orpo", {}),
    "orpo-beta": ("orpo", {"beta": 0.5}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_step_matches_trl(policy, tokenizer, case):
    kind, options = CASES[case]
    theirs = trl_step(kind, policy, tokenizer, ROWS, **options)
    batch = our_batch(tokenizer, ROWS)
    ours = our_step(kind, policy, batch, **options)
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, policy, batch)


@pytest.fixture(scope="module")
def gpt2_policy(tokenizer):
    """A tiny GPT-2 (the logits path: not in FUSED_MODEL_TYPES) after 3 steps of SFT, dropout off."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(family_config("gpt2", tokenizer))
    return trained_policy_and_reference(tokenizer, reference=model)[0]


@pytest.mark.parametrize("case", ["cpo-sigmoid", "simpo", "alphapo", "orpo"])
def test_step_matches_trl_on_gpt2(gpt2_policy, tokenizer, case):
    kind, options = CASES[case]
    theirs = trl_step(kind, gpt2_policy, tokenizer, ROWS, **options)
    batch = our_batch(tokenizer, ROWS)
    ours = our_step(kind, gpt2_policy, batch, **options)
    assert_same_step(ours, theirs)
    assert_same_metrics(ours, theirs, gpt2_policy, batch)


@pytest.mark.parametrize("kind", ["cpo", "orpo"])
def test_moe_router_aux_loss_matches_trl(tokenizer, kind):
    """A mixture of experts whose config asks for router logits: TRL adds router_aux_loss_coef * aux_loss
    to the loss; ours the same (the coefficient as `dpo.start_offline` decides it: the config's)."""
    from transformers import AutoModelForCausalLM

    config = family_config("qwen2_moe", tokenizer)
    config.output_router_logits = True
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    theirs = trl_step(kind, model, tokenizer, ROWS)
    ours = our_step(kind, model, our_batch(tokenizer, ROWS), router_aux_loss_coef=config.router_aux_loss_coef)
    assert ours["metrics"]["aux_loss"] > 0
    assert_same_step(ours, theirs)


# ---------------------------------------------------------------------------------------------------------
# 3. Trajectories through both trainers
# ---------------------------------------------------------------------------------------------------------

N_PAIRS, STEPS, LEARNING_RATE = 16, 10, 5e-4


@pytest.fixture(scope="module")
def start(tmp_path_factory, tokenizer):
    """A folder holding the tiny Qwen2 (random init, seed 0) and the tokenizer."""
    folder = tmp_path_factory.mktemp("qwen2")
    embedded.build_model(seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    rows = pair_rows(False, False, n=N_PAIRS)
    return rows, write_jsonl(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows)


def shared_options(**options):
    base = dict(
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        max_steps=STEPS,
        per_device_train_batch_size=N_PAIRS,
        weight_decay=0.0,
        max_grad_norm=1.0,
        logging_steps=1,
        max_length=64,
        seed=0,
    )
    return {**base, **options}


def trl_records(kind, folder, rows, out, **options):
    """TRL's logged records (one per step) of the trainer's `train` from the model in `folder`."""
    config_class, trainer_class = TRAINERS[kind]
    args = config_class(output_dir=str(out), **TRL_TRAIN, **options)
    # The tokenizer as both sides load it from the folder (see test_dpo_trl.trl_run).
    trainer = trainer_class(
        model=str(folder),
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=load_tokenizer(str(folder)),
    )
    trainer.train()
    return [r for r in trainer.state.log_history if "loss" in r]


def our_records(kind, folder, data_path, out, **options):
    """Our run's logged step records, from the model in `folder` on the rows in `data_path`."""
    config_class, _, train = LOOPS[kind]
    options = {"save_steps": 0, "eval_steps": 0, "disable_tqdm": True, "report_to": "none", **options}
    train(
        config_class(model_name_or_path=str(folder), dataset_name=data_path, output_dir=str(out), **options)
    )
    return [r for r in logged(out / "metrics.jsonl", None) if "loss" in r]


ACCUMULATION = {
    "per_device_train_batch_size": 8,
    "gradient_accumulation_steps": 2,
    "train_sampling_strategy": "sequential",
}
TRAJECTORIES = {
    "simpo": ("cpo", {"loss_type": "simpo", "cpo_alpha": 0.0}),
    "cpo-sigmoid": ("cpo", {"loss_type": "sigmoid"}),
    "orpo": ("orpo", {}),
    # two micro-batches of 8 pairs a step, in the dataset's order on both sides (our random order is a
    # permutation of its own): TRL averages their losses and metrics, ours weighs them by pairs (the same for
    # equal micro-batches; the NLL a token mean per micro-batch on both sides)
    "cpo-sigmoid-accumulation": ("cpo", ACCUMULATION),
    "orpo-accumulation": ("orpo", ACCUMULATION),
}


@pytest.mark.slow
@pytest.mark.parametrize("case", list(TRAJECTORIES))
def test_ten_steps_follow_trls_trajectory(tmp_path, start, data, case):
    kind, options = TRAJECTORIES[case]
    rows, data_path = data
    theirs = trl_records(kind, start, rows, tmp_path / "trl", **shared_options(**options))
    ours = our_records(kind, start, data_path, tmp_path / "ours", **shared_options(**options))
    assert len(ours) == len(theirs) == STEPS
    gaps = [a["loss"] - b["loss"] for a, b in zip(ours, theirs, strict=True)]
    assert max(map(abs, gaps)) <= TRAJECTORY_ATOL, gaps
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        for key, value in b.items():
            if key in LOGITS:
                continue
            assert key in a, f"step {step}: {key} missing from our log {sorted(a)}"
            assert math.isclose(a[key], value, rel_tol=1e-4, abs_tol=1e-4), (step, key, a[key], value)
    first, last = theirs[0]["loss"], theirs[-1]["loss"]
    assert abs(last - first) > 0.02 * abs(first)  # the run moves: real updates are compared


@pytest.mark.parametrize("kind", ["cpo", "orpo"])
def test_evaluation_matches_trl(tmp_path, start, data, kind):
    """eval_ metrics on 16 held-out pairs in 2 batches of 8 after 3 steps (TRL averages the batches' values,
    ours weighs them by pairs: the same for equal batches). Not compared: TRL's timings, and logits/*."""
    rows, _ = data
    held_out = embedded.rows("preference", "test", seed=0)[:16]
    (tmp_path / "pairs").mkdir()
    write_jsonl(tmp_path / "pairs" / "train.jsonl", rows)
    write_jsonl(tmp_path / "pairs" / "test.jsonl", held_out)
    options = {**shared_options(), "max_steps": 3, "per_device_eval_batch_size": 8}
    config_class, trainer_class = TRAINERS[kind]
    args = config_class(
        output_dir=str(tmp_path / "trl"), eval_strategy="steps", eval_steps=3, **TRL_TRAIN, **options
    )
    trainer = trainer_class(
        model=str(start),
        args=args,
        train_dataset=Dataset.from_list(rows),
        eval_dataset=Dataset.from_list(held_out),
        processing_class=load_tokenizer(str(start)),
    )
    trainer.train()
    (theirs,) = [r for r in trainer.state.log_history if "eval_loss" in r]
    records = our_records(kind, start, str(tmp_path / "pairs"), tmp_path / "ours", **options, eval_steps=3)
    assert records  # the run trained
    (ours,) = [r for r in logged(tmp_path / "ours" / "metrics.jsonl", None) if "eval_loss" in r]
    skipped = (
        "eval_runtime",
        "eval_samples_per_second",
        "eval_steps_per_second",
        "eval_logits/chosen",
        "eval_logits/rejected",
    )
    assert 0 < theirs["eval_rewards/accuracies"] < 1
    for key, value in theirs.items():
        if key not in skipped:
            assert key in ours, f"{key} missing from our log {sorted(ours)}"
            assert math.isclose(ours[key], value, rel_tol=RTOL, abs_tol=1e-6), (key, ours[key], value)
