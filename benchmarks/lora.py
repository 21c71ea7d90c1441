"""LoRA vs full fine-tuning, SFT and DPO step: posttrain (full and LoRA r = 16) and TRL 1.16 + peft (LoRA), side
by side in one run: peak memory and step time.

    python benchmarks/lora.py                # per side: 1 round of 2 warm-up + 4 timed steps
    python benchmarks/lora.py --quick        # a smoke run: tiny model, 1 + 2 steps

Model: a random-init Qwen2 of ~100M parameters (V = 32000, H = 768, L = 12, 12 heads, 4 key-value heads,
I = 2048, tied embeddings: 24.6M in the embedding, 75.5M in the layers), float32, dropout off.
LoRA: r = 16, alpha 32, dropout 0, every linear layer but the output layer ("all-linear": 7 per layer,
2.6M adapter parameters), the same peft `LoraConfig` on both sides.
Data (the SFT and DPO benchmarks' rows): SFT, 4 random-token rows of 64 prompt + 64 completion tokens per step
(the loss on the completions); DPO, 2 random-token pairs per step, 64 prompt + 64 chosen and 64 prompt + 64
rejected tokens (4 sequences of 128), sigmoid loss, beta 0.1. Both: 512 tokens per step.
All sides: AdamW (lr 1e-4, no weight decay), constant schedule, clipping at 1.0, no gradient checkpointing,
fp32, CPU, one micro-batch per step.

Sides (each in its own subprocess, `common.run_side`):
    ours full   `loop.prepare_model` / `build_optimizer` / `accumulate` as `benchmarks/sft.py` and `dpo.py`
                run them; DPO's reference: `dpo.load_reference`, a frozen copy of the model.
    ours LoRA   the same with use_peft: `loop.prepare_model` wraps the model (`rl/lora.py`), the optimizer
                holds the adapters alone, DPO's reference is `dpo.load_reference`'s adapter-disabled policy.
    TRL LoRA    `SFTTrainer` / `DPOTrainer` with `peft_config` (no ref_model: TRL disables the adapters for
                the reference), pre-tokenized rows, sequential sampling; a callback stamps each step's end.

peak MiB here counts everything a side adds to the model it starts from: the process's peak resident memory
(VmHWM, reset once the starting model is built and every module is imported) minus its resident memory then.
So a full DPO's reference copy (~385 MiB), gradients and AdamW state count, as do the activations, the
adapters and their optimizer state. The starting model's own weights (~385 MiB) are the same on every side
and not counted. The sides start from the same weights and LoRA initialisation (the same seed drawn in the
same order), so LoRA's losses, ours vs TRL, are compared step by step.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402
import dpo as dpo_bench  # noqa: E402  its random pairs
import sft as sft_bench  # noqa: E402  its random rows

MODEL = dict(
    vocab_size=32000,
    hidden_size=768,
    intermediate_size=2048,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_key_value_heads=4,
    max_position_embeddings=512,
)
QUICK_MODEL = dict(MODEL, vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)  # fmt: skip
ROWS = {"sft": 4, "dpo": 2}  # per step: 4 rows or 2 pairs, 512 tokens either way
PROMPT_LEN, COMPLETION_LEN = sft_bench.PROMPT_LEN, sft_bench.COMPLETION_LEN
assert (dpo_bench.PROMPT_LEN, dpo_bench.COMPLETION_LEN) == (PROMPT_LEN, COMPLETION_LEN)
LEARNING_RATE, MAX_GRAD_NORM, BETA = 1e-4, 1.0, 0.1
LORA = dict(r=16, lora_alpha=32, lora_dropout=0.0)
SIDES = (("ours", "full"), ("ours", "lora"), ("trl", "lora"))


def model_config(quick: bool):
    from posttrain.data.embedded import tiny_model_config

    return tiny_model_config(**(QUICK_MODEL if quick else MODEL))


def build_model(quick: bool):
    from transformers import AutoModelForCausalLM

    from posttrain.rl.models import disable_dropout

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(model_config(quick), dtype=torch.float32)
    disable_dropout(model)
    return model


def sft_rows(n: int, vocab_size: int) -> list[dict]:
    """The SFT benchmark's rows with completion_mask (ours) and labels (TRL's pre-tokenized format)."""
    rows = sft_bench.random_rows(n, vocab_size)
    for r in rows:
        r["completion_mask"] = [0] * PROMPT_LEN + [1] * COMPLETION_LEN
        r["labels"] = [-100] * PROMPT_LEN + r["input_ids"][PROMPT_LEN:]
    return rows


class Peak:
    """Resident memory added from now on: the baseline, then the high-water mark above it."""

    def __init__(self):
        self.before = common.rss_mib()
        common.reset_peak_rss()

    def mib(self) -> float:
        return common.peak_rss_mib() - self.before


# ---------------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------------


def run_ours(args) -> dict:
    from datasets import Dataset

    from posttrain.data import collate
    from posttrain.rl import dpo, loop, lora, sft  # noqa: F401  (lora: imported before the baseline)
    from posttrain.rl.config import TrainConfig

    n_steps, rows_per_step = args.warmup + args.steps, ROWS[args.algo]
    options = dict(use_peft=True, lora_r=LORA["r"], lora_alpha=LORA["lora_alpha"], lora_dropout=LORA["lora_dropout"])  # fmt: skip
    with tempfile.TemporaryDirectory() as out:
        shared = dict(output_dir=out, learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=MAX_GRAD_NORM, per_device_train_batch_size=rows_per_step, bf16=False, report_to="none", seed=0, **(options if args.mode == "lora" else {}))  # fmt: skip
        if args.algo == "dpo":
            config = dpo.DPOConfig(**shared, beta=BETA, loss_type=["sigmoid"], max_length=None)
        else:
            config = TrainConfig(**shared)
        run = loop.start(config, command=args.algo)
        model = build_model(args.quick)
        if args.algo == "dpo":
            rows = Dataset.from_list(dpo_bench.random_pairs(n_steps * rows_per_step, model.config.vocab_size))
            collate_fn = functools.partial(dpo.collate_pairs, pad_token_id=0)
        else:
            rows = sft_rows(n_steps * rows_per_step, model.config.vocab_size)
            collate_fn = functools.partial(collate.pad_collate, pad_token_id=0)
        peak = Peak()
        if args.algo == "dpo":
            ref = dpo.load_reference(config, model, run.device)  # a copy, or the adapter-disabled policy
            step_loss = functools.partial(dpo.dpo_step_loss, config=config, ref_model=ref)
            count = dpo.count_pairs
        else:
            step_loss, count = sft.sft_step_loss, sft.count_targets
        model = loop.prepare_model(run, model)
        optimizer = loop.build_optimizer(model, config, run.learning_rate)
        scheduler = loop.build_scheduler(optimizer, config, n_steps)
        batches, losses = iter(range(0, len(rows), rows_per_step)), []

        def step():
            i = next(batches)
            batch = collate_fn(loop.take_rows(rows, list(range(i, i + rows_per_step))))
            metrics = loop.accumulate(run, model, optimizer, scheduler, [batch], step_loss, count)
            losses.append(metrics["loss"])

        times = common.time_steps(step, args.steps, args.warmup)
        result = {"times": times, "peak_mib": peak.mib(), "losses": losses}
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        loop.finish(run)
    return {**result, "trainable": trainable}


# ---------------------------------------------------------------------------------------------------------
# TRL's side
# ---------------------------------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import peft
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from posttrain.data.embedded import build_tokenizer

    trainer_cls, config_cls = (trl.DPOTrainer, trl.DPOConfig) if args.algo == "dpo" else (trl.SFTTrainer, trl.SFTConfig)  # fmt: skip
    n_steps, rows_per_step = args.warmup + args.steps, ROWS[args.algo]
    model = build_model(args.quick)
    if args.algo == "dpo":
        rows = dpo_bench.random_pairs(n_steps * rows_per_step, model.config.vocab_size)
        # pre-tokenized already (see benchmarks/dpo.py): skip TRL's tokenization
        trl.DPOTrainer._prepare_dataset = lambda self, dataset, *a, **k: dataset
        extra = dict(beta=BETA, loss_type=["sigmoid"])
    else:
        rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in sft_rows(n_steps * rows_per_step, model.config.vocab_size)]  # fmt: skip
        extra = {}
    peak = Peak()

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.peak = [], None

        def on_train_begin(self, *a, **k):
            self.stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.stamps.append(time.perf_counter())

        def on_train_end(self, *a, **k):
            self.peak = peak.mib()

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = config_cls(
            output_dir=out, use_cpu=True, bf16=False, report_to=[],
            activation_checkpointing=False,  # TRL's default is on (as `gradient_checkpointing`)
            per_device_train_batch_size=rows_per_step, max_length=None, max_steps=n_steps,
            learning_rate=LEARNING_RATE, lr_scheduler_type="constant", weight_decay=0.0,
            max_grad_norm=MAX_GRAD_NORM, logging_steps=10**6, save_strategy="no", disable_tqdm=True,
            dataloader_num_workers=0, train_sampling_strategy="sequential", seed=0, **extra,
        )  # fmt: skip
        lora_config = peft.LoraConfig(task_type="CAUSAL_LM", target_modules="all-linear", bias="none", **LORA)
        trainer = trainer_cls(
            model=model,
            args=config,
            train_dataset=Dataset.from_list(rows),
            processing_class=build_tokenizer(),
            callbacks=[clock],
            peft_config=lora_config,
        )
        losses, compute_loss = [], trainer.compute_loss

        def recording_compute_loss(*a, **k):
            loss = compute_loss(*a, **k)
            losses.append(loss.detach())
            return loss

        trainer.compute_loss = recording_compute_loss
        trainer.train()
        trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return {
        "times": times,
        "peak_mib": clock.peak,
        "losses": [x.item() for x in losses],
        "trainable": trainable,
    }


# ---------------------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per side before the timed ones")
    parser.add_argument("--algo", choices=("sft", "dpo"), action="append", help="sft, dpo (default: both)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--mode", choices=("full", "lora"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
    if args.side:
        args.algo = args.algo[0]
        common.emit_result((run_ours if args.side == "ours" else run_trl)(args))
        return

    config = model_config(args.quick)
    params = sum(p.numel() for p in build_model(args.quick).parameters())
    print(f"LoRA vs full fine-tuning, {common.machine_line()}")
    print(
        f"model: Qwen2 V={config.vocab_size} H={config.hidden_size} L={config.num_hidden_layers} "
        f"I={config.intermediate_size}, {params / 1e6:.1f}M parameters; LoRA r={LORA['r']} all-linear; "
        f"{args.warmup} warm-up + {args.steps} timed steps per side"
    )
    common_args = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (
        ["--quick"] if args.quick else []
    )
    for algo in args.algo or ["sft", "dpo"]:
        results = {}
        for side, mode in SIDES:
            argv = ["--side", side, "--mode", mode, "--algo", algo, *common_args]
            results[side, mode] = common.run_side(__file__, argv)
        full, ours, trl = results["ours", "full"], results["ours", "lora"], results["trl", "lora"]
        rows = [
            [
                name,
                f"{r['trainable'] / 1e6:.2f}M",
                f"{common.median(r['times']):.3f}",
                f"{min(r['times']):.3f}",
                f"{r['peak_mib']:.0f}",
            ]  # fmt: skip
            for name, r in (("posttrain full", full), ("posttrain LoRA", ours), ("TRL 1.16 + peft LoRA", trl))
        ]
        for name, other in (("LoRA / full (posttrain)", full), ("LoRA posttrain / TRL", trl)):
            time_ratio = common.median(ours["times"]) / common.median(other["times"])
            rows.append([name, "", f"{time_ratio:.2f}", "", f"{ours['peak_mib'] / other['peak_mib']:.2f}"])
        rows_per_step = ROWS[algo]
        what = f"{rows_per_step} rows" if algo == "sft" else f"{rows_per_step} pairs"
        print(f"\n{algo.upper()} step ({what} of {PROMPT_LEN} + {COMPLETION_LEN} tokens):")
        header = ["side", "trainable", "median s/step", "min s/step", "peak MiB (added to the model)"]
        print(common.markdown_table(header, rows))
        worst = max(abs(a - b) / abs(b) for a, b in zip(ours["losses"], trl["losses"], strict=True))
        print(
            f"agreement: LoRA loss per step, ours vs TRL, {len(trl['losses'])} steps: max relative difference "
            f"{worst:.1e} (first {ours['losses'][0]:.6f} vs {trl['losses'][0]:.6f}, last {ours['losses'][-1]:.6f} "
            f"vs {trl['losses'][-1]:.6f})"
        )


if __name__ == "__main__":
    main()
