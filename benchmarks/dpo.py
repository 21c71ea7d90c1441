"""DPO step: posttrain vs TRL 1.16's DPOTrainer, side by side in one run, with the compute floor.

    python benchmarks/dpo.py                 # per side and reference: 2 rounds x (3 warm-up + 10 timed steps)
    python benchmarks/dpo.py --quick         # a smoke run: tiny model, 1 round of 1 + 2 steps

Model: the SFT benchmark's Qwen2 (benchmarks/sft.py: V = 32000, H = 256, L = 4, I = 1024, tied embeddings,
float32) as a causal LM.
Data: B = 8 random-token pairs per step, each 64 prompt + 64 chosen and 64 prompt + 64 rejected tokens
(2B = 16 sequences of T = 128, no padding), explicit prompt; sigmoid DPO loss, beta 0.1.
Both sides: AdamW (lr 1e-6, TRL's default; betas (0.9, 0.999), eps 1e-8, no weight decay), constant
learning rate, gradient clipping at norm 1.0, no gradient checkpointing, dropout off, fp32, CPU, one
micro-batch per step.
Two references, each run on both sides:
    live         a frozen copy of the starting model, run forward at every step;
    precomputed  `precompute_ref_log_probs=True`: the reference log-probs of every pair computed once before
                 training (8 pairs per forward) and read from the rows; only the training steps are timed, the
                 one-off precompute is reported on its own line.

    ours  per step: `posttrain.rl.dpo.collate_pairs` on the step's pairs, then `posttrain.rl.loop.accumulate`
          (policy forward of chosen and rejected in one batch, the reference's under no_grad when live,
          `dpo_step_loss`, backward, clip, AdamW, schedule, metrics to the host). Precomputed: the rows carry
          ref_chosen_logps / ref_rejected_logps from `dpo.precompute_reference`, as `dpo.train` computes them
          (a copy of the starting model, `dpo.load_reference`, freed afterwards).
    trl   `DPOTrainer.train()` with max_steps = warmup + steps on a pre-tokenized dataset (prompt_ids,
          chosen_ids, rejected_ids), sequential sampling; a callback stamps the time at each `on_step_end`.
          Live: `ref_model` is a copy of the starting model. Precomputed: no reference model (TRL's policy
          scores the pairs before training, in `__init__`); the precompute time is `_precompute_ref_logps`'s.

Floor: the policy's forward + backward of the backbone over all 2B*T tokens (body and attention,
`common.step_flops`) and of the output layer at the 2B*64 completion positions only (6 * V * H each); the
live reference adds the forward alone: a third of each (the backbone over all tokens, 2 * V * H per
completion token); the precomputed one adds nothing.

Agreement: both sides start from the same weights and see the same pairs in the same order, so their per-step
losses must agree. At lr 1e-6 the loss stays within ~1e-4 of ln 2 over the run, and a pair's log-ratio is
the difference of two sums of ~-660 (float32 spacing 6e-5 there), so the line can show that both sides
compute the same loss to float32 rounding, not how far their weights drift apart.

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
REFERENCES = ("live", "precomputed")


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


# ---------------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------------


def run_ours(args) -> dict:
    from datasets import Dataset

    from posttrain.rl import dpo, loop

    n_steps, precomputed = args.warmup + args.steps, args.ref == "precomputed"
    with tempfile.TemporaryDirectory() as out:
        config = dpo.DPOConfig(
            output_dir=out,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            per_device_train_batch_size=BATCH,
            beta=BETA,
            loss_type=["sigmoid"],
            max_length=None,
            precompute_ref_log_probs=precomputed,
            precompute_ref_batch_size=BATCH,
            bf16=False,
            report_to="none",
            seed=0,
        )
        run = loop.start(config, command="dpo")
        model = loop.prepare_model(run, build_model(args.quick))
        optimizer = loop.build_optimizer(model, config, run.learning_rate)
        scheduler = loop.build_scheduler(optimizer, config, n_steps)
        rows = Dataset.from_list(random_pairs(n_steps * BATCH, model.config.vocab_size))
        collate_fn = functools.partial(dpo.collate_pairs, pad_token_id=0)
        rss_before = common.rss_mib()
        if precomputed:
            # As `dpo.train` does: a copy of the starting model scores every pair, then is freed. The peak is
            # counted from before the copy, so whatever it leaves in the allocator counts against this side.
            common.reset_peak_rss()
            t0 = time.perf_counter()
            ref = dpo.load_reference(config, model, run.device)
            rows = dpo.precompute_reference(
                rows, ref, collate_fn, batch_size=BATCH, device=run.device, ld_alpha=config.ld_alpha
            )
            precompute_s, ref = time.perf_counter() - t0, None
        else:
            ref, precompute_s = dpo.load_reference(config, model, run.device), None
            rss_before = common.rss_mib()  # the reference, like the policy, is not counted
            common.reset_peak_rss()
        step_loss = functools.partial(dpo.dpo_step_loss, config=config, ref_model=ref)
        batches, losses = iter(range(0, len(rows), BATCH)), []

        def step():
            i = next(batches)
            batch = collate_fn(loop.take_rows(rows, list(range(i, i + BATCH))))
            metrics = loop.accumulate(run, model, optimizer, scheduler, [batch], step_loss, dpo.count_pairs)
            losses.append(metrics["loss"])

        times = common.time_steps(step, args.steps, args.warmup)
        result = {"times": times, "peak_mib": common.peak_rss_mib() - rss_before}
        loop.finish(run)
    return {**result, "losses": losses, "precompute_s": precompute_s}


# ---------------------------------------------------------------------------------------------------------
# TRL's side
# ---------------------------------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from posttrain.data.embedded import build_tokenizer

    model = build_model(args.quick)
    n_steps, precomputed = args.warmup + args.steps, args.ref == "precomputed"
    rows = random_pairs(n_steps * BATCH, model.config.vocab_size)

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

    # The precompute runs inside DPOTrainer.__init__: time its own method.
    precompute_s, precompute = [], trl.DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *a, **k):
        t0 = time.perf_counter()
        dataset = precompute(self, *a, **k)
        precompute_s.append(time.perf_counter() - t0)
        return dataset

    trl.DPOTrainer._precompute_ref_logps = timed_precompute
    # TRL 1.16's DPOTrainer always tokenizes text columns (unlike its SFT and Reward trainers it has no
    # pre-tokenized path); the rows already are what its preparation returns (prompt_ids, chosen_ids,
    # rejected_ids; no max_length filter), so that step is skipped. It runs in __init__, untimed, either way.
    trl.DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = trl.DPOConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,  # TRL's default is on (as `gradient_checkpointing`)
            report_to=[],
            per_device_train_batch_size=BATCH,
            max_length=None,
            beta=BETA,
            loss_type=["sigmoid"],
            precompute_ref_log_probs=precomputed,
            precompute_ref_batch_size=BATCH,
            max_steps=n_steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            logging_steps=10**6,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",
            seed=0,
        )
        trainer = trl.DPOTrainer(
            model=model,
            ref_model=None if precomputed else frozen_copy(model),
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=build_tokenizer(),
            callbacks=[clock],
        )
        losses, compute_loss = [], trainer.compute_loss

        def recording_compute_loss(*a, **k):
            loss = compute_loss(*a, **k)
            losses.append(loss.detach())
            return loss

        trainer.compute_loss = recording_compute_loss
        trainer.train()
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return {
        "times": times,
        "peak_mib": clock.peak - clock.rss_before,
        "losses": [x.item() for x in losses],
        "precompute_s": sum(precompute_s) if precomputed else None,
    }


# ---------------------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------------------


def floor(config, reference: bool) -> dict:
    """The policy's floor (`common.compute_floor`: backbone over all 2B*T tokens, output layer at the 2B*64
    completion positions) plus, with a live reference, its forward: a third of each part, at the same rates."""
    seq_len = PROMPT_LEN + COMPLETION_LEN
    out = common.compute_floor(config, 2 * BATCH * seq_len, seq_len, 2 * BATCH * COMPLETION_LEN)
    share = 1 / 3 if reference else 0.0  # forward = a third of forward + backward
    flops = {**out["flops"], **{f"ref {k}": share * v for k, v in out["flops"].items()}}
    return {**out, "flops": flops, "floor_s": (1 + share) * out["floor_s"]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the sides this many times")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps, 1 round")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--ref", choices=REFERENCES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1

    config = sft.model_config(args.quick)
    if args.side:
        result = (run_ours if args.side == "ours" else run_trl)(args)
        common.emit_result({**result, "floor": floor(config, args.ref == "live")})  # right after the steps
        return

    sides = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    results = {
        ref: {
            side: {"times": [], "peak_mib": 0.0, "losses": [], "floors": [], "precompute_s": []}
            for side in ("ours", "trl")
        }
        for ref in REFERENCES
    }
    for _ in range(args.rounds):
        for ref in REFERENCES:
            for side in ("ours", "trl"):
                result = common.run_side(__file__, ["--side", side, "--ref", ref, *sides])
                r = results[ref][side]
                r["times"] += result["times"]
                r["floors"].append(result["floor"])
                r["peak_mib"] = max(r["peak_mib"], result["peak_mib"])
                r["losses"] = result["losses"]
                if result["precompute_s"] is not None:
                    r["precompute_s"].append(result["precompute_s"])
    for by_side in results.values():
        for r in by_side.values():
            r["floor_s"] = common.median([f["floor_s"] for f in r["floors"]])

    print(f"DPO step, {common.machine_line()}")
    print(
        f"model: Qwen2 V={config.vocab_size} H={config.hidden_size} L={config.num_hidden_layers} "
        f"I={config.intermediate_size}; batch {BATCH} pairs x ({PROMPT_LEN} prompt + {COMPLETION_LEN} completion) "
        f"x 2 sides; sigmoid loss, beta {BETA}, lr {LEARNING_RATE:g}; {args.rounds} x ({args.warmup} warm-up + "
        f"{args.steps} timed steps) per side and reference, alternating"
    )
    for ref in REFERENCES:
        by_side = results[ref]
        f = by_side["ours"]["floors"][0]["flops"]
        policy = f["body"] + f["attn"] + f["head"]
        reference = f["ref body"] + f["ref attn"] + f["ref head"]
        print(
            f"\nreference {ref}: floor {(policy + reference) / 1e9:.1f} GFLOP per step (policy fwd + bwd "
            f"{policy / 1e9:.1f}: body {f['body'] / 1e9:.1f} + attn {f['attn'] / 1e9:.1f} + head "
            f"{f['head'] / 1e9:.1f}; reference fwd {reference / 1e9:.1f}); floor ours "
            f"{by_side['ours']['floor_s']:.3f} s, TRL {by_side['trl']['floor_s']:.3f} s"
        )
        for side in ("ours", "trl"):
            rates = ", ".join(
                f"{x['body_rate'] / 1e9:.1f} / {x['head_rate'] / 1e9:.1f}" for x in by_side[side]["floors"]
            )
            print(f"  {side}: body / head GFLOP/s per round {rates}")
        if ref == "precomputed":
            once = {s: common.median(by_side[s]["precompute_s"]) for s in ("ours", "trl")}
            print(
                f"one-off precompute of {BATCH * (args.warmup + args.steps)} pairs' reference log-probs "
                f"(not in the steps): ours {once['ours']:.3f} s, TRL {once['trl']:.3f} s, ours / TRL "
                f"{once['ours'] / once['trl']:.2f}"
            )
        common.print_comparison(by_side)


if __name__ == "__main__":
    main()
