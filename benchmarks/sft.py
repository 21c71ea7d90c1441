"""SFT step: posttrain vs TRL 1.16's SFTTrainer, side by side in one run, with the compute floor.

    python benchmarks/sft.py                 # per side: 2 rounds x (3 warm-up + 10 timed steps)
    python benchmarks/sft.py --quick         # a smoke run: tiny model, 1 round of 1 + 2 steps

Model: Qwen2 from `posttrain.data.embedded.tiny_model_config` with vocab V = 32000, hidden H = 256,
L = 4 layers, 4 attention heads, 2 key-value heads, MLP I = 1024, tied embeddings, float32
(~12.1M parameters: 8.2M in the embedding, 3.9M in the layers).
Data: B = 8 random-token rows per step of 64 prompt + 64 completion tokens (T = 128, no padding);
prompt-completion, so the loss is the NLL of the 512 completion tokens.
Both sides: AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay), constant learning rate,
gradient clipping at norm 1.0, no gradient checkpointing, fp32, CPU, one micro-batch per step.

Each side runs in its own subprocess (fresh allocator, its own peak-RSS counter), the two alternating
`--rounds` times; both see the same rows in the same order, and their per-step losses are compared:
    ours  per step: `collate.pad_collate` on the step's rows, then `posttrain.rl.loop.accumulate` (the
          loops' machinery: forward, `posttrain.rl.sft.sft_step_loss`, backward, clip, AdamW, schedule,
          metrics to the host) with the optimizer and schedule from `loop.build_optimizer` /
          `loop.build_scheduler`, after `loop.start` (which also keeps freed CPU memory for reuse:
          `loop.keep_freed_cpu_memory`; TRL's side runs with glibc's defaults).
    trl   `SFTTrainer.train()` with max_steps = warmup + steps on a pre-tokenized dataset (labels -100
          on the prompt), sequential sampling; a callback stamps the time at each `on_step_end`, so a
          step is everything TRL's loop does between two optimizer steps (fetch + collate, forward,
          loss, backward, clip, AdamW, scheduler, metrics). On the CPU TRL 1.16 sends every position
          (prompt included) through the output layer.

Columns: see benchmarks/README.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

MODEL = dict(
    vocab_size=32000,
    hidden_size=256,
    intermediate_size=1024,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
QUICK_MODEL = dict(MODEL, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2)
BATCH, PROMPT_LEN, COMPLETION_LEN = 8, 64, 64
LEARNING_RATE, MAX_GRAD_NORM = 1e-4, 1.0


def model_config(quick: bool):
    from posttrain.data.embedded import tiny_model_config

    return tiny_model_config(**(QUICK_MODEL if quick else MODEL))


def build_model(quick: bool):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(model_config(quick), dtype=torch.float32)


def random_rows(n: int, vocab_size: int, seed: int = 0) -> list[dict]:
    """n rows of PROMPT_LEN random prompt tokens then COMPLETION_LEN random completion tokens (ids >= 3:
    no pad/eos/special ids inside a row)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab_size, (n, PROMPT_LEN + COMPLETION_LEN), generator=g)
    return [{"input_ids": row.tolist()} for row in ids]


# ---------------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------------


def run_ours(args) -> dict:
    from posttrain.data import collate
    from posttrain.rl import loop
    from posttrain.rl.config import TrainConfig
    from posttrain.rl.sft import count_targets, sft_step_loss

    n_steps = args.warmup + args.steps
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(
            output_dir=out,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            per_device_train_batch_size=BATCH,
            bf16=False,
            report_to="none",
            seed=0,
            torch_compile=args.torch_compile,
        )
        run = loop.start(config, command="sft")
        model = loop.prepare_model(run, build_model(args.quick))
        optimizer = loop.build_optimizer(model, config, run.learning_rate)
        scheduler = loop.build_scheduler(optimizer, config, n_steps)
        # Our tokenized-row format: input_ids and completion_mask (1 on completion tokens).
        rows = [
            {"input_ids": r["input_ids"], "completion_mask": [0] * PROMPT_LEN + [1] * COMPLETION_LEN}
            for r in random_rows(n_steps * BATCH, model.config.vocab_size)
        ]
        batches, losses = iter(range(0, len(rows), BATCH)), []

        def step():
            i = next(batches)
            batch = collate.pad_collate(rows[i : i + BATCH], pad_token_id=0)
            metrics = loop.accumulate(run, model, optimizer, scheduler, [batch], sft_step_loss, count_targets)
            losses.append(metrics["loss"])

        result = _measure(step, args)
        loop.finish(run)
    return {**result, "losses": losses}


# ---------------------------------------------------------------------------------------------------------
# TRL's side
# ---------------------------------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from posttrain.data.embedded import build_tokenizer

    model = build_model(args.quick)
    n_steps = args.warmup + args.steps
    rows = random_rows(n_steps * BATCH, model.config.vocab_size)
    # Pre-tokenized with labels: TRL skips tokenization and trains on the tokens whose label is not -100.
    for r in rows:
        r["labels"] = [-100] * PROMPT_LEN + r["input_ids"][PROMPT_LEN:]

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
    with tempfile.TemporaryDirectory() as out:
        config = trl.SFTConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,  # TRL's default is on (as `gradient_checkpointing`)
            report_to=[],
            per_device_train_batch_size=BATCH,
            max_length=None,
            max_steps=n_steps,
            learning_rate=LEARNING_RATE,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM,
            logging_steps=10**6,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            train_sampling_strategy="sequential",  # the same batches in the same order as our side
            seed=0,
            torch_compile=args.torch_compile,  # the whole model, as transformers' Trainer compiles it
        )
        trainer = trl.SFTTrainer(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=build_tokenizer(),
            callbacks=[clock],
        )
        # Keep each step's loss (detached, no host sync) for the agreement check.
        losses, compute_loss = [], trainer.compute_loss

        def recording_compute_loss(*a, **k):
            loss = compute_loss(*a, **k)
            losses.append(loss.detach())
            return loss

        trainer.compute_loss = recording_compute_loss
        trainer.train()
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return {"times": times, "peak_mib": clock.peak - clock.rss_before, "losses": [x.item() for x in losses]}


# ---------------------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------------------


def _measure(step, args) -> dict:
    """Time the steps; the peak memory is the RSS high-water mark over all steps (warm-up included, so
    AdamW's state and the gradients are counted) minus the RSS before the first one."""
    rss_before = common.rss_mib()
    common.reset_peak_rss()
    times = common.time_steps(step, args.steps, args.warmup)
    return {"times": times, "peak_mib": common.peak_rss_mib() - rss_before}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the timed ones")
    parser.add_argument(
        "--rounds",
        type=int,
        default=2,
        help="alternate the sides this many times (ours, TRL, ours, TRL, ...)",
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps, 1 round")
    parser.add_argument(
        "--torch_compile", action="store_true", help="both sides with torch_compile (compiled in the warm-up)"
    )
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)  # set for the subprocesses
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1

    config = model_config(args.quick)
    tokens, head_tokens = BATCH * (PROMPT_LEN + COMPLETION_LEN), BATCH * COMPLETION_LEN
    if args.side:
        result = (run_ours if args.side == "ours" else run_trl)(args)
        # The floor is measured in the same process right after the steps, so that it sees the machine
        # (its clock, and any other load on it) as the steps did.
        floor = common.compute_floor(config, tokens, PROMPT_LEN + COMPLETION_LEN, head_tokens)
        common.emit_result({**result, "floor": floor})
        return

    sides = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    sides += ["--torch_compile"] if args.torch_compile else []
    # Alternating the sides spreads any other load on the machine over both.
    results = {side: {"times": [], "peak_mib": 0.0, "losses": [], "floors": []} for side in ("ours", "trl")}
    for _ in range(args.rounds):
        for side in ("ours", "trl"):
            result = common.run_side(__file__, ["--side", side, *sides])
            results[side]["times"] += result["times"]
            results[side]["floors"].append(result["floor"])
            results[side]["peak_mib"] = max(results[side]["peak_mib"], result["peak_mib"])
            results[side]["losses"] = result["losses"]  # the same in every round
    for r in results.values():
        r["floor_s"] = common.median([f["floor_s"] for f in r["floors"]])

    print(f"SFT step, {common.machine_line()}")
    print(
        f"model: Qwen2 V={config.vocab_size} H={config.hidden_size} L={config.num_hidden_layers} "
        f"I={config.intermediate_size}; batch {BATCH} x ({PROMPT_LEN} prompt + {COMPLETION_LEN} completion); "
        f"{args.rounds} x ({args.warmup} warm-up + {args.steps} timed steps) per side, alternating"
        + ("; torch_compile on both sides" if args.torch_compile else "")
    )
    f = results["ours"]["floors"][0]["flops"]
    print(
        f"floor: {sum(f.values()) / 1e9:.1f} GFLOP (body {f['body'] / 1e9:.1f} + attn {f['attn'] / 1e9:.1f} "
        f"+ head {f['head'] / 1e9:.1f}) per step at the matmul rates measured after each side's steps:"
    )
    for side in ("ours", "trl"):
        rates = ", ".join(
            f"{x['body_rate'] / 1e9:.1f} / {x['head_rate'] / 1e9:.1f} GFLOP/s"
            for x in results[side]["floors"]
        )
        print(f"  {side}: body / head {rates}; floor {results[side]['floor_s']:.3f} s")
    common.print_comparison(results)


if __name__ == "__main__":
    main()
