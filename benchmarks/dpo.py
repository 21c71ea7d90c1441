"""Preference steps: DPO, KTO and ORPO, posttrain vs TRL 1.16's trainers, side by side in one run, with the
compute floor.

    python benchmarks/dpo.py                    # each loop, side and reference: 2 rounds x (3 warm-up + 10 timed steps)
    python benchmarks/dpo.py --loops kto,orpo   # a subset
    python benchmarks/dpo.py --quick            # a smoke run: tiny model, 1 round of 1 + 2 steps
    python benchmarks/dpo.py --torch_compile    # both sides' policies compiled (TRL: the whole model), in the warm-up

Model: the SFT benchmark's Qwen2 (benchmarks/sft.py: V = 32000, H = 256, L = 4, I = 1024, tied embeddings,
float32) as a causal LM.
Data: random tokens, 64 prompt + 64 completion tokens per sequence (no padding), 16 sequences per step:
    DPO   B = 8 pairs (2B = 16 sequences, chosen and rejected), explicit prompt; sigmoid loss, beta 0.1, lr 1e-6
    KTO   16 unpaired rows (8 desirable, 8 undesirable, alternating), plus the 16 mismatched KL sequences TRL
          builds (each prompt with the previous row's completion); loss_type kto, beta 0.1, lr 1e-6
    ORPO  B = 8 pairs as DPO's; beta (lambda) 0.1, lr 1e-6; no reference
Both sides: AdamW (betas (0.9, 0.999), eps 1e-8, no weight decay), constant learning rate, gradient clipping
at norm 1.0, no gradient checkpointing, dropout off, fp32, CPU, one micro-batch per step.
References (DPO and KTO), each run on both sides:
    live         a frozen copy of the starting model, run forward at every step;
    precomputed  `precompute_ref_log_probs=True`: the reference log-probs of every row computed once before
                 training and read from the rows; only the training steps are timed, the one-off precompute
                 is reported on its own line.

    ours  per step: the loop's collate function on the step's rows, then `posttrain.rl.loop.accumulate`
          (policy forward, the reference's under no_grad when live, the loop's step loss, backward, clip,
          AdamW, schedule, metrics to the host). Precomputed: the rows carry the reference log-probs, computed
          as the loop's `train` computes them (a copy of the starting model, freed afterwards).
    trl   `<Trainer>.train()` with max_steps = warmup + steps on pre-tokenized rows, sequential sampling; a
          callback stamps the time at each `on_step_end`. DPOTrainer and KTOTrainer: their dataset preparation
          is replaced by the rows (already what it returns); ORPOTrainer: its `tokenize_row` builds its
          padded-batch fields from the rows' ids. Live: `ref_model` is a copy of the starting model.
          Precomputed: no reference model (TRL scores the rows before training, in `__init__`).

Floor: the policy's forward + backward of the backbone over all 16 x 128 tokens (body and attention,
`common.step_flops`; DPO: each pair's 64 prompt tokens once and its chosen and rejected 64 answer
tokens on them, `common.shared_prompt_step_flops`, as our loops run them since session 15) and of the output layer at the 16 x 64 completion positions only (6 * V * H each; ORPO's
NLL term reads every position of the chosen sequences, so 8 x 127 + 8 x 64 there);
forward-only passes add a third of that each: DPO's live reference one pass (prompts once); KTO's policy on the
KL sequences (no gradient), and its live reference on the rows and the KL sequences (two passes, each prompt
once for its row and its KL sequence since session 16; precomputed: none); ORPO nothing.

Agreement: both sides start from the same weights and see the same rows in the same order, so their per-step
losses must agree. At these learning rates the losses barely move, and a log-ratio is the difference of two
sums of ~-660 (float32 spacing 6e-5 there), so the line shows that both sides compute the same loss to
float32 rounding, not how far their weights drift apart.

Columns: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import sft  # noqa: E402  the same model shapes

BATCH, PROMPT_LEN, COMPLETION_LEN = sft.BATCH, sft.PROMPT_LEN, sft.COMPLETION_LEN
LEARNING_RATE, MAX_GRAD_NORM, BETA = 1e-6, sft.MAX_GRAD_NORM, 0.1
KTO_ROWS = 2 * BATCH  # unpaired rows per step: as many sequences as DPO's pairs have
# loop -> the references it is measured with
REFERENCES = {"dpo": ("live", "precomputed"), "kto": ("live", "precomputed"), "orpo": ("none",)}


def build_model(quick: bool):
    from transformers import AutoModelForCausalLM

    from posttrain.rl.models import disable_dropout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(sft.model_config(quick), dtype=torch.float32)
    disable_dropout(model)
    return model


def frozen_copy(model):
    """The live reference: a copy of the starting model, in eval mode, without gradients."""
    ref = copy.deepcopy(model).eval()
    ref.requires_grad_(False)
    return ref


def random_pairs(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """n pairs: a random prompt and two random completions (ids >= 3: no pad/eos/special ids)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, PROMPT_LEN + 2 * COMPLETION_LEN), generator=g).tolist()
    return [
        {
            "prompt_ids": row[:PROMPT_LEN],
            "chosen_ids": row[PROMPT_LEN : PROMPT_LEN + COMPLETION_LEN],
            "rejected_ids": row[PROMPT_LEN + COMPLETION_LEN :],
        }
        for row in ids
    ]


def random_unpaired(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """n unpaired rows (prompt_ids, completion_ids, label), desirable and undesirable alternating, with
    KL_completion_ids: the previous row's completion within each step's KTO_ROWS rows (TRL's rotation)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, PROMPT_LEN + COMPLETION_LEN), generator=g).tolist()
    rows = [
        {"prompt_ids": r[:PROMPT_LEN], "completion_ids": r[PROMPT_LEN:], "label": i % 2 == 0}
        for i, r in enumerate(ids)
    ]
    for start in range(0, n, KTO_ROWS):
        block = rows[start : start + KTO_ROWS]
        for i, row in enumerate(block):
            row["KL_completion_ids"] = block[i - 1]["completion_ids"]
    return rows


# ---------------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------------


def time_ours(args, config, model, rows, collate_fn, step_loss, count_fn, rows_per_step, rss_before) -> dict:
    """Time `loop.accumulate` over consecutive blocks of rows_per_step rows; peak RSS above rss_before."""
    from posttrain.rl import loop

    run = loop.start(config, command="bench")
    model = loop.prepare_model(run, model)
    optimizer = loop.build_optimizer(model, config, run.learning_rate)
    scheduler = loop.build_scheduler(optimizer, config, args.warmup + args.steps)
    starts, losses = iter(range(0, len(rows), rows_per_step)), []

    def step():
        i = next(starts)
        batch = collate_fn(loop.take_rows(rows, list(range(i, i + rows_per_step))))
        metrics = loop.accumulate(run, model, optimizer, scheduler, [batch], step_loss, count_fn)
        losses.append(metrics["loss"])

    times = common.time_steps(step, args.steps, args.warmup)
    result = {"times": times, "peak_mib": common.peak_rss_mib() - rss_before, "losses": losses}
    loop.finish(run)
    return result


def common_options(out: str, learning_rate: float, torch_compile: bool) -> dict:
    return dict(
        output_dir=out, learning_rate=learning_rate, lr_scheduler_type="constant", weight_decay=0.0,
        max_grad_norm=MAX_GRAD_NORM, max_length=None, bf16=False, report_to="none", seed=0,
        torch_compile=torch_compile,
    )  # fmt: skip


def with_reference(args, config, model, rows, precompute):
    """The reference as the loop's `train` sets it up: live (returned, not counted in the peak), or used once
    by `precompute(rows, ref)` and freed (its peak counted). Returns (ref or None, rows, precompute_s, rss_before)."""
    from posttrain.rl import dpo

    if args.ref == "live":
        ref = dpo.load_reference(config, model, torch.device("cpu"))
        rss_before = common.rss_mib()  # the reference, like the policy, is not counted
        common.reset_peak_rss()
        return ref, rows, None, rss_before
    rss_before = common.rss_mib()
    common.reset_peak_rss()  # counted from before the copy: what it leaves in the allocator counts
    t0 = time.perf_counter()
    rows = precompute(rows, dpo.load_reference(config, model, torch.device("cpu")))
    return None, rows, time.perf_counter() - t0, rss_before


def run_ours_dpo(args) -> dict:
    from datasets import Dataset

    from posttrain.rl import dpo

    model = build_model(args.quick)
    with tempfile.TemporaryDirectory() as out:
        config = dpo.DPOConfig(
            **common_options(out, LEARNING_RATE, args.torch_compile), per_device_train_batch_size=BATCH, beta=BETA,
            loss_type=["sigmoid"], precompute_ref_log_probs=args.ref == "precomputed", precompute_ref_batch_size=BATCH,
        )  # fmt: skip
        rows = Dataset.from_list(random_pairs((args.warmup + args.steps) * BATCH, model.config.vocab_size))
        collate_fn = functools.partial(dpo.collate_pairs, pad_token_id=0)

        def precompute(rows, ref):
            return dpo.precompute_reference(
                rows, ref, collate_fn, batch_size=BATCH, device=torch.device("cpu"), ld_alpha=None
            )

        ref, rows, precompute_s, rss_before = with_reference(args, config, model, rows, precompute)
        step_loss = functools.partial(dpo.dpo_step_loss, config=config, ref_model=ref)
        result = time_ours(
            args, config, model, rows, collate_fn, step_loss, dpo.count_pairs, BATCH, rss_before
        )
    return {**result, "precompute_s": precompute_s}


def run_ours_kto(args) -> dict:
    from datasets import Dataset

    from posttrain.data import unpaired
    from posttrain.rl import kto

    model = build_model(args.quick)
    with tempfile.TemporaryDirectory() as out:
        config = kto.KTOConfig(
            **common_options(out, LEARNING_RATE, args.torch_compile), per_device_train_batch_size=KTO_ROWS, beta=BETA,
            loss_type="kto", precompute_ref_log_probs=args.ref == "precomputed", precompute_ref_batch_size=KTO_ROWS,
        )  # fmt: skip
        rows = random_unpaired((args.warmup + args.steps) * KTO_ROWS, model.config.vocab_size)
        rows = Dataset.from_list([{k: v for k, v in r.items() if k != "KL_completion_ids"} for r in rows])
        rows = unpaired.add_kl_completions(rows, KTO_ROWS)  # as kto.train builds them: the same rotation
        collate_fn = functools.partial(unpaired.collate_unpaired, pad_token_id=0)

        def precompute(rows, ref):
            return kto.precompute_reference(
                rows, ref, collate_fn, batch_size=KTO_ROWS, device=torch.device("cpu"), with_kl=True
            )

        ref, rows, precompute_s, rss_before = with_reference(args, config, model, rows, precompute)
        step_loss = functools.partial(kto.kto_step_loss, config=config, ref_model=ref)
        result = time_ours(
            args, config, model, rows, collate_fn, step_loss, kto.count_rows, KTO_ROWS, rss_before
        )
    return {**result, "precompute_s": precompute_s}


def run_ours_orpo(args) -> dict:
    from datasets import Dataset

    from posttrain.rl import dpo, orpo

    model = build_model(args.quick)
    with tempfile.TemporaryDirectory() as out:
        config = orpo.ORPOConfig(
            **common_options(out, LEARNING_RATE, args.torch_compile), per_device_train_batch_size=BATCH, beta=BETA,
        )  # fmt: skip
        rows = Dataset.from_list(random_pairs((args.warmup + args.steps) * BATCH, model.config.vocab_size))
        collate_fn = functools.partial(dpo.collate_pairs, pad_token_id=0)
        rss_before = common.rss_mib()
        common.reset_peak_rss()
        step_loss = functools.partial(orpo.orpo_step_loss, config=config)
        result = time_ours(
            args, config, model, rows, collate_fn, step_loss, dpo.count_pairs, BATCH, rss_before
        )
    return {**result, "precompute_s": None}


# ---------------------------------------------------------------------------------------------------------
# TRL's side
# ---------------------------------------------------------------------------------------------------------


def time_trl(args, trainer_cls, config, model, ref, rows, tokenizer, **trainer_kwargs) -> dict:
    """`trainer.train()` with a callback stamping each step's end; the per-step losses from compute_loss."""
    from datasets import Dataset
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.rss_before, self.peak = [], None, None

        def on_train_begin(self, *a, **k):
            self.rss_before = common.rss_mib()
            common.reset_peak_rss()
            self.stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.stamps.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            self.peak = common.peak_rss_mib()

    clock = StepClock()
    if ref is not None:
        trainer_kwargs["ref_model"] = ref
    trainer = trainer_cls(
        model=model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
        callbacks=[clock], **trainer_kwargs,
    )  # fmt: skip
    losses, compute_loss = [], trainer.compute_loss

    def recording_compute_loss(*a, **k):
        loss = compute_loss(*a, **k)
        losses.append((loss[0] if isinstance(loss, tuple) else loss).detach())
        return loss

    trainer.compute_loss = recording_compute_loss
    trainer.train()
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return {"times": times, "peak_mib": clock.peak - clock.rss_before, "losses": [x.item() for x in losses]}


def trl_options(out: str, learning_rate: float, n_steps: int, batch: int, torch_compile: bool) -> dict:
    return dict(
        torch_compile=torch_compile,  # the whole policy, as transformers' Trainer compiles it
        output_dir=out, use_cpu=True, bf16=False, report_to=[], per_device_train_batch_size=batch,
        max_length=None, beta=BETA, max_steps=n_steps, learning_rate=learning_rate, lr_scheduler_type="constant",
        weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, logging_steps=10**6, save_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, seed=0, train_sampling_strategy="sequential",
    )  # fmt: skip


def timed_precompute(trainer_cls, sink: list) -> None:
    """Time the trainer's own precompute method, which runs inside its __init__."""
    precompute = trainer_cls._precompute_ref_logps

    def timed(self, *a, **k):
        t0 = time.perf_counter()
        dataset = precompute(self, *a, **k)
        sink.append(time.perf_counter() - t0)
        return dataset

    trainer_cls._precompute_ref_logps = timed


def run_trl_dpo(args) -> dict:
    import trl

    from posttrain.data.embedded import build_tokenizer

    model = build_model(args.quick)
    n_steps, precomputed = args.warmup + args.steps, args.ref == "precomputed"
    rows = random_pairs(n_steps * BATCH, model.config.vocab_size)
    precompute_s = []
    timed_precompute(trl.DPOTrainer, precompute_s)
    # TRL 1.16's DPOTrainer always tokenizes text columns (unlike its SFT and Reward trainers it has no
    # pre-tokenized path); the rows already are what its preparation returns (prompt_ids, chosen_ids,
    # rejected_ids; no max_length filter), so that step is skipped. It runs in __init__, untimed, either way.
    trl.DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            **trl_options(out, LEARNING_RATE, n_steps, BATCH, args.torch_compile),
            activation_checkpointing=False,  # TRL's default is on (as `gradient_checkpointing`)
            loss_type=["sigmoid"], precompute_ref_log_probs=precomputed, precompute_ref_batch_size=BATCH,
        )  # fmt: skip
        ref = None if precomputed else frozen_copy(model)
        result = time_trl(args, trl.DPOTrainer, config, model, ref, rows, build_tokenizer())
    return {**result, "precompute_s": sum(precompute_s) if precomputed else None}


def run_trl_kto(args) -> dict:
    import trl

    from posttrain.data.embedded import build_tokenizer

    model = build_model(args.quick)
    n_steps, precomputed = args.warmup + args.steps, args.ref == "precomputed"
    rows = random_unpaired(n_steps * KTO_ROWS, model.config.vocab_size)
    precompute_s = []
    timed_precompute(trl.KTOTrainer, precompute_s)
    # The rows already are what KTOTrainer._prepare_dataset returns (prompt_ids, completion_ids, label,
    # KL_completion_ids rotated within each batch); it runs in __init__, untimed, either way.
    trl.KTOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    with tempfile.TemporaryDirectory() as out:
        config = trl.KTOConfig(
            **trl_options(out, LEARNING_RATE, n_steps, KTO_ROWS, args.torch_compile), loss_type="kto",
            precompute_ref_log_probs=precomputed, precompute_ref_batch_size=KTO_ROWS,
        )  # fmt: skip
        ref = None if precomputed else frozen_copy(model)
        result = time_trl(args, trl.KTOTrainer, config, model, ref, rows, build_tokenizer())
    return {**result, "precompute_s": sum(precompute_s) if precomputed else None}


def run_trl_orpo(args) -> dict:
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    from posttrain.data.embedded import build_tokenizer

    model = build_model(args.quick)
    n_steps = args.warmup + args.steps
    rows = random_pairs(n_steps * BATCH, model.config.vocab_size)

    def tokenize_row(self, feature, model=None):
        # The padded-batch fields ORPOTrainer's tokenize_row returns, from the ids (no BOS: this model has none;
        # no eos added: random completions, as on our side).
        prompt = feature["prompt_ids"]
        out = {"prompt_input_ids": prompt, "prompt_attention_mask": [1] * len(prompt)}
        for side in ("chosen", "rejected"):
            ids = prompt + feature[f"{side}_ids"]
            out[f"{side}_input_ids"], out[f"{side}_attention_mask"] = ids, [1] * len(ids)
            out[f"{side}_labels"] = [-100] * len(prompt) + feature[f"{side}_ids"]
        return out

    ORPOTrainer.tokenize_row = tokenize_row
    with tempfile.TemporaryDirectory() as out:
        options = trl_options(out, LEARNING_RATE, n_steps, BATCH, args.torch_compile)
        options["max_length"] = PROMPT_LEN + COMPLETION_LEN  # ORPOConfig needs one; every sequence fits
        config = ORPOConfig(**options, gradient_checkpointing=False)
        result = time_trl(args, ORPOTrainer, config, model, None, rows, build_tokenizer())
    return {**result, "precompute_s": None}


RUNNERS = {
    ("ours", "dpo"): run_ours_dpo, ("trl", "dpo"): run_trl_dpo,
    ("ours", "kto"): run_ours_kto, ("trl", "kto"): run_trl_kto,
    ("ours", "orpo"): run_ours_orpo, ("trl", "orpo"): run_trl_orpo,
}  # fmt: skip


# ---------------------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------------------


# Forward-only passes over the step's 16 x 128 tokens beyond the policy's forward + backward, by loop and reference.
FORWARD_PASSES = {
    ("dpo", "live"): 1,  # the reference on chosen and rejected
    ("dpo", "precomputed"): 0,
    # the policy on the KL sequences (no gradient); the reference on the rows and on those (their prompts once)
    ("kto", "live"): 3,
    ("kto", "precomputed"): 1,  # the policy on the KL sequences
    ("orpo", "none"): 0,
}


def floor(config, loop_name: str, reference: str) -> dict:
    """The policy's forward + backward (`common.compute_floor`: the backbone over every token, a pair's prompt
    once for DPO, not for KTO's unpaired rows nor ORPO, whose NLL term reads the prompts; the output layer at
    the 16 x 64 completion positions) plus a third of each forward-only pass's FLOPs (FORWARD_PASSES), at the
    rates measured for the policy's shapes. KTO's live reference scores each row and its KL sequence in one
    forward, where the two share their prompt (`kto.reference_logps`): counted once."""
    seq_len = PROMPT_LEN + COMPLETION_LEN

    def whole(rows, head_tokens):
        return common.step_flops(config, rows * seq_len, seq_len, head_tokens)

    def shared(prompts, rows):
        return common.shared_prompt_step_flops(
            config, prompts, rows, PROMPT_LEN, COMPLETION_LEN, rows * COMPLETION_LEN
        )

    # ORPO's NLL term reads every position of the chosen sequences (TRL's), prompt included
    if loop_name == "orpo":
        head_tokens = BATCH * (seq_len - 1) + BATCH * COMPLETION_LEN
        tokens, policy, passes = 2 * BATCH * seq_len, whole(2 * BATCH, head_tokens), []
    elif loop_name == "kto":  # unpaired rows; the policy's no-grad pass over the KL sequences, whole too
        head_tokens = KTO_ROWS * COMPLETION_LEN
        tokens, policy = KTO_ROWS * seq_len, whole(KTO_ROWS, head_tokens)
        passes = [policy] + ([shared(KTO_ROWS, 2 * KTO_ROWS)] if reference == "live" else [])
    else:  # a pair's chosen and rejected share their prompt: once per pair (rl.logprobs.shared_prefix)
        head_tokens = 2 * BATCH * COMPLETION_LEN
        tokens, policy = BATCH * PROMPT_LEN + 2 * BATCH * COMPLETION_LEN, shared(BATCH, 2 * BATCH)
        passes = [policy] if reference == "live" else []
    out = common.compute_floor(config, tokens, seq_len, head_tokens, flops=policy)
    # a forward is a third of a forward + backward
    fwd = {f"fwd {k}": sum(p[k] for p in passes) / 3 for k in policy}
    fwd_s = (fwd["fwd body"] + fwd["fwd attn"]) / out["body_rate"] + fwd["fwd head"] / out["head_rate"]
    return {**out, "flops": {**out["flops"], **fwd}, "floor_s": out["floor_s"] + fwd_s}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--loops", default="dpo,kto,orpo", help="which loops, comma-separated: dpo, kto, orpo"
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the sides this many times")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps, 1 round")
    parser.add_argument(
        "--torch_compile", action="store_true", help="both sides with torch_compile (compiled in the warm-up)"
    )
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--loop", choices=REFERENCES, help=argparse.SUPPRESS)
    parser.add_argument("--ref", choices=("live", "precomputed", "none"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1
    loops = [name.strip() for name in args.loops.split(",") if name.strip()]
    unknown = [name for name in loops if name not in REFERENCES]
    if unknown:
        parser.error(f"unknown loop(s) {unknown}; expected some of {', '.join(REFERENCES)}")

    config = sft.model_config(args.quick)
    if args.side:
        if args.side == "ours":  # as the loops' `train` starts: loop.start before the models are built
            from posttrain.rl import loop

            loop.keep_freed_cpu_memory()
        result = RUNNERS[args.side, args.loop](args)
        common.emit_result({**result, "floor": floor(config, args.loop, args.ref)})  # right after the steps
        return

    sides = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    sides += ["--torch_compile"] if args.torch_compile else []
    runs = [(name, ref) for name in loops for ref in REFERENCES[name]]
    results = {
        run: {
            side: {"times": [], "peak_mib": 0.0, "losses": [], "floors": [], "precompute_s": []}
            for side in ("ours", "trl")
        }
        for run in runs
    }
    for _ in range(args.rounds):
        for name, ref in runs:
            for side in ("ours", "trl"):
                result = common.run_side(__file__, ["--side", side, "--loop", name, "--ref", ref, *sides])
                r = results[name, ref][side]
                r["times"] += result["times"]
                r["floors"].append(result["floor"])
                r["peak_mib"] = max(r["peak_mib"], result["peak_mib"])
                r["losses"] = result["losses"]
                if result["precompute_s"] is not None:
                    r["precompute_s"].append(result["precompute_s"])
    for by_side in results.values():
        for r in by_side.values():
            r["floor_s"] = common.median([f["floor_s"] for f in r["floors"]])

    print(f"Preference steps, {common.machine_line()}")
    print(
        f"model: Qwen2 V={config.vocab_size} H={config.hidden_size} L={config.num_hidden_layers} "
        f"I={config.intermediate_size}; 16 sequences of {PROMPT_LEN} prompt + {COMPLETION_LEN} completion tokens "
        f"per step (DPO / ORPO: {BATCH} pairs; KTO: {KTO_ROWS} rows + their KL sequences); beta {BETA}, lr {LEARNING_RATE:g}; "
        f"{args.rounds} x ({args.warmup} warm-up + {args.steps} timed steps) per side, alternating"
        + ("; torch_compile on both sides" if args.torch_compile else "")
    )
    for (name, ref), by_side in results.items():
        f = by_side["ours"]["floors"][0]["flops"]
        policy = f["body"] + f["attn"] + f["head"]
        forward = f["fwd body"] + f["fwd attn"] + f["fwd head"]
        print(
            f"\n{name.upper()}, reference {ref}: floor {(policy + forward) / 1e9:.1f} GFLOP per step (policy fwd + "
            f"bwd {policy / 1e9:.1f}: body {f['body'] / 1e9:.1f} + attn {f['attn'] / 1e9:.1f} + head "
            f"{f['head'] / 1e9:.1f}; {FORWARD_PASSES[name, ref]} forward-only pass(es) {forward / 1e9:.1f}); "
            f"floor ours {by_side['ours']['floor_s']:.3f} s, TRL {by_side['trl']['floor_s']:.3f} s"
        )
        for side in ("ours", "trl"):
            rates = ", ".join(
                f"{x['body_rate'] / 1e9:.1f} / {x['head_rate'] / 1e9:.1f}" for x in by_side[side]["floors"]
            )
            print(f"  {side}: body / head GFLOP/s per round {rates}")
        if ref == "precomputed":
            once = {s: common.median(by_side[s]["precompute_s"]) for s in ("ours", "trl")}
            print(
                f"one-off precompute of the rows' reference log-probs (not in the steps): ours "
                f"{once['ours']:.3f} s, TRL {once['trl']:.3f} s, ours / TRL {once['ours'] / once['trl']:.2f}"
            )
        common.print_comparison(by_side)


if __name__ == "__main__":
    main()
