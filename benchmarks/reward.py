"""Reward-model step: posttrain vs TRL 1.16's RewardTrainer, side by side in one run, with the compute floor.

    python benchmarks/reward.py              # per side: 2 rounds x (3 warm-up + 10 timed steps)
    python benchmarks/reward.py --quick      # a smoke run: tiny model, 1 round of 1 + 2 steps

Model: the SFT benchmark's Qwen2 (benchmarks/sft.py: V = 32000, H = 256, L = 4, I = 1024, float32) as
`Qwen2ForSequenceClassification` with one output (a (1, H) score head instead of the (V, H) lm_head).
Data: B = 8 random-token pairs per step, each 64 prompt + 64 chosen and 64 prompt + 64 rejected tokens
(2B = 16 sequences of T = 128, no padding), explicit prompt; Bradley–Terry loss, no margin or centring.
Both sides: AdamW (lr 1e-4, betas (0.9, 0.999), eps 1e-8, no weight decay), constant learning rate,
gradient clipping at norm 1.0, no gradient checkpointing, dropout off, fp32, CPU, one micro-batch per step.

    ours  per step: `posttrain.rl.reward.collate_pairs` on the step's pairs, then `posttrain.rl.loop.accumulate`
          (forward of chosen and rejected in one batch, `reward_step_loss`, backward, clip, AdamW, schedule,
          metrics to the host).
    trl   `RewardTrainer.train()` with max_steps = warmup + steps on a pre-tokenized dataset (chosen_ids,
          rejected_ids), sequential sampling; a callback stamps the time at each `on_step_end`.

Floor: a reward model needs no logits, and its score reads one position per row, so the floor is the
backbone's matmuls over all 2B*T tokens (body and attention, `common.step_flops`) but for the last layer's
query, output map and MLP, which only the 2B last tokens need (its keys and values need every position), plus
the score head at those tokens (`floor`). Ours computes just that (`posttrain.rl.last_token`); TRL runs the
whole last layer and the score head at every position, about 1.3x the floor's matmuls on this shape.

Memory floor (`memory_floor`, printed under the table in peak MiB's unit: besides the model): any exact
AdamW step holds the gradients and the two moments together, 3 x the weights' bytes; a step that does not
recompute activations also holds the moments and every activation the forward saves for the backward when
the backward starts: on this shape 93 MiB of moments + 82 of activations (ours: the last layer at the last
token only, two of the MLP's four products a layer, the norms' inputs kept in place of their outputs).

Two peaks. `peak MiB` in the table is the RSS high-water mark above the RSS before the first step. The line
under it, live tensors at their peak, is AdamW's moments plus one step's high-water mark of live tensors above
them (`common.TensorPeak`, a profiled step after the timed ones): no allocator enters it, as none enters
torch.cuda.max_memory_allocated on a GPU. Ours 187 MiB against TRL's 312, 0.60x (Intel Xeon, session 22).
Until session 23 our RSS sat ~115 MiB above that (302 against TRL's 433, 0.70x): glibc's main heap held the
tensors among ~10,000 small C++ allocations a step (autograd's nodes, tensor handles), which split the large
blocks' free space, so the heap grew over the first steps; replayed alone through the same glibc settings, the
step's tensor allocations needed 228 MiB. Now tensors of 64 KiB or more come from a range of their own
(`posttrain.kernels.cpu_pool`, installed by `loop.start`): 232 MiB, 0.54x TRL's (TRL's side runs with glibc's
defaults, as TRL does; under tcmalloc on both sides the two were 231 and 358 MiB in session 22).
POSTTRAIN_CPU_POOL=0 runs ours on glibc alone.

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
import sft  # noqa: E402  the same model shapes

BATCH, PROMPT_LEN, COMPLETION_LEN = sft.BATCH, sft.PROMPT_LEN, sft.COMPLETION_LEN
LEARNING_RATE, MAX_GRAD_NORM = sft.LEARNING_RATE, sft.MAX_GRAD_NORM


def build_model(quick: bool):
    from transformers import AutoModelForSequenceClassification

    from posttrain.rl.models import disable_dropout

    config = sft.model_config(quick)
    config.num_labels, config.pad_token_id = 1, 0
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    disable_dropout(model)
    return model


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


def run_ours(args) -> dict:
    from posttrain.rl import loop, reward
    from posttrain.rl.config import TrainConfig

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
        )
        run = loop.start(config, command="rm")
        model = loop.prepare_model(run, build_model(args.quick))
        optimizer = loop.build_optimizer(model, config, run.learning_rate)
        scheduler = loop.build_scheduler(optimizer, config, n_steps)
        pairs = random_pairs((n_steps + 1) * BATCH, model.config.vocab_size)  # + the profiled step
        batches, losses = iter(range(0, len(pairs), BATCH)), []

        def step():
            i = next(batches)
            batch = reward.collate_pairs(pairs[i : i + BATCH], pad_token_id=0)
            metrics = loop.accumulate(
                run, model, optimizer, scheduler, [batch], reward.reward_step_loss, reward.count_pairs
            )
            losses.append(metrics["loss"])

        rss_before = common.rss_mib()
        common.reset_peak_rss()
        times = common.time_steps(step, args.steps, args.warmup)
        result = {"times": times, "peak_mib": common.peak_rss_mib() - rss_before}
        # after the peak is read: the profiled step and the measuring forward allocate tensors of their own
        with common.TensorPeak() as step_peak:
            step()
        result["tensor_peak_mib"] = common.optimizer_state_mib(optimizer) + step_peak.mib
        result["memory_floor"] = memory_floor(model, reward.collate_pairs(pairs[:BATCH], pad_token_id=0))
        loop.finish(run)
    return {**result, "losses": losses[:n_steps]}


def run_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import TrainerCallback

    from posttrain.data.embedded import build_tokenizer

    model = build_model(args.quick)
    n_steps = args.warmup + args.steps
    # Pre-tokenized: TRL skips tokenization when chosen_ids / rejected_ids exist (they hold the prompt too).
    rows = [
        {"chosen_ids": p["prompt_ids"] + p["chosen_ids"], "rejected_ids": p["prompt_ids"] + p["rejected_ids"]}
        for p in random_pairs((n_steps + 1) * BATCH, model.config.vocab_size)
    ]

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.rss_before, self.peak, self.tensor_peak = [], None, None, None

        def on_train_begin(self, *a, **k):
            self.rss_before = common.rss_mib()
            common.reset_peak_rss()
            self.stamps.append(time.perf_counter())

        def on_step_begin(self, args, state, control, **k):
            if (
                state.global_step == n_steps
            ):  # one more step, profiled for its tensors: after the peak is read
                self.peak = common.peak_rss_mib()
                self.tensor_peak = common.TensorPeak().__enter__()

        def on_step_end(self, args, state, control, **k):
            if self.tensor_peak is None:
                self.stamps.append(time.perf_counter())
            else:
                self.tensor_peak.__exit__(None, None, None)

    clock = StepClock()
    with tempfile.TemporaryDirectory() as out:
        config = trl.RewardConfig(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,
            report_to=[],
            per_device_train_batch_size=BATCH,
            max_length=None,
            max_steps=n_steps + 1,
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
        trainer = trl.RewardTrainer(
            model=model,
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
        tensor_peak = common.optimizer_state_mib(trainer.optimizer) + clock.tensor_peak.mib
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return {
        "times": times,
        "peak_mib": clock.peak - clock.rss_before,
        "tensor_peak_mib": tensor_peak,
        "losses": [x.item() for x in losses][:n_steps],
    }


def floor(config) -> dict:
    """What a reward step must compute (`common.last_token_score_flops`: the last layer's query, output map
    and MLP at each row's last token only) at the body's matmul rate."""
    seq_len = PROMPT_LEN + COMPLETION_LEN
    tokens = 2 * BATCH * seq_len
    out = common.compute_floor(config, tokens, seq_len, head_tokens=1)  # for its rates
    flops = common.last_token_score_flops(config, tokens, seq_len, rows=2 * BATCH)
    return {**out, "flops": flops, "floor_s": sum(flops.values()) / out["body_rate"]}


def memory_floor(model, batch) -> dict:
    """What an exact fp32 step must hold besides the model, in MiB (the unit of the table's peak MiB,
    which leaves out the model and the process baseline: both are resident before the steps).

    grads_moments: the gradients and AdamW's two moments, 3 x the parameters' bytes, alive together at
    the optimizer step in any implementation. no_recompute: the two moments plus the activations the
    model's forward saves for its backward (autograd's saved tensors, each storage once, the parameters
    left out), alive together when the backward starts: the floor of any step of this model (transformers'
    Qwen2 code) that does not recompute activations, as neither side does here (no gradient checkpointing).
    """
    from posttrain.rl import reward

    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in params:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        reward.reward_step_loss(model, batch, torch.tensor(1))  # forward only: nothing is stepped
    param_mib = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    activation_mib = sum(saved.values()) / 2**20
    return {
        "params_mib": param_mib,
        "activations_mib": activation_mib,
        "grads_moments_mib": 3 * param_mib,
        "no_recompute_mib": 2 * param_mib + activation_mib,
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the sides this many times")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps, 1 round")
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1

    config = sft.model_config(args.quick)
    if args.side:
        result = (run_ours if args.side == "ours" else run_trl)(args)
        common.emit_result({**result, "floor": floor(config)})  # measured right after the steps
        return

    sides = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    results = {side: {"times": [], "peak_mib": 0.0, "losses": [], "floors": []} for side in ("ours", "trl")}
    for _ in range(args.rounds):
        for side in ("ours", "trl"):
            result = common.run_side(__file__, ["--side", side, *sides])
            results[side]["times"] += result["times"]
            results[side]["floors"].append(result["floor"])
            results[side]["peak_mib"] = max(results[side]["peak_mib"], result["peak_mib"])
            results[side]["tensor_peak_mib"] = max(
                results[side].get("tensor_peak_mib", 0.0), result["tensor_peak_mib"]
            )
            results[side]["losses"] = result["losses"]
            results[side]["memory_floor"] = result.get("memory_floor")
    for r in results.values():
        r["floor_s"] = common.median([f["floor_s"] for f in r["floors"]])

    print(f"Reward-model step, {common.machine_line()}")
    print(
        f"model: Qwen2ForSequenceClassification V={config.vocab_size} H={config.hidden_size} "
        f"L={config.num_hidden_layers} I={config.intermediate_size}; batch {BATCH} pairs x ({PROMPT_LEN} prompt "
        f"+ {COMPLETION_LEN} completion) x 2 sides; {args.rounds} x ({args.warmup} warm-up + {args.steps} "
        "timed steps) per side, alternating"
    )
    f = results["ours"]["floors"][0]["flops"]
    print(
        f"floor: {sum(f.values()) / 1e9:.1f} GFLOP (body {f['body'] / 1e9:.1f} + attn {f['attn'] / 1e9:.1f} "
        f"+ score head {f['head'] / 1e9:.3f}; no logits) per step; floor ours {results['ours']['floor_s']:.3f} s, "
        f"TRL {results['trl']['floor_s']:.3f} s"
    )
    common.print_comparison(results)
    m, trl_peak = results["ours"]["memory_floor"], results["trl"]["peak_mib"]
    print(
        f"memory floor besides the model ({m['params_mib']:.0f} MiB of weights): gradients + 2 AdamW moments "
        f"{m['grads_moments_mib']:.0f} MiB in any exact step; without recomputing activations, 2 moments "
        f"{2 * m['params_mib']:.0f} + the activations the forward saves {m['activations_mib']:.0f} = "
        f"{m['no_recompute_mib']:.0f} MiB ({m['no_recompute_mib'] / trl_peak:.2f} x TRL's peak; the target "
        f"0.6 x is {0.6 * trl_peak:.0f} MiB)"
    )
    ours_t, trl_t = results["ours"]["tensor_peak_mib"], results["trl"]["tensor_peak_mib"]
    print(
        f"live tensors at their peak (AdamW's moments + one step's high-water mark above them, from the profiler's "
        f"allocation events: no allocator involved, as torch.cuda.max_memory_allocated on a GPU): ours {ours_t:.0f} "
        f"MiB, TRL {trl_t:.0f} MiB, {ours_t / trl_t:.2f} x TRL's"
    )


if __name__ == "__main__":
    main()
