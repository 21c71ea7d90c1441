"""The online loops' steps: posttrain vs TRL 1.16's GRPOTrainer / RLOOTrainer / OnlineDPOTrainer, side by side,
with the compute floor; PPO (which TRL 1.16 no longer ships) against its floor alone.

    python benchmarks/grpo.py                    # every loop; per side: 2 rounds x (3 warm-up + 10 timed steps)
    python benchmarks/grpo.py --algo rloo ppo    # some of them
    python benchmarks/grpo.py --quick            # a smoke run: tiny model, 1 round of 1 + 2 steps
    python benchmarks/grpo.py --torch_compile    # both sides' trained models compiled, in the warm-up

Model: the SFT benchmark's Qwen2 (benchmarks/sft.py: V = 32000, H = 256, L = 4, I = 1024, tied embeddings,
float32), saved to a temporary folder that both sides load (TRL builds its reference model from the path).
Work per optimizer step: N = 8 completions of exactly C = 32 new tokens to random prompts of P = 64 tokens, one
micro-batch, sampled at temperature 1 with no top-k / top-p / min-p: GRPO and RLOO one prompt x G = 8
completions (num_generations 8, per_device_train_batch_size 8), Online DPO 4 prompts x 2 (its pairs;
per_device_train_batch_size 4 prompts), PPO 8 prompts x 1 (per_device_train_batch_size 8, num_ppo_epochs 1,
num_mini_batches 1: one optimizer step per rollout batch). The eos id is V, outside the model's vocabulary (the
tokenizer has one more token than the model), so no completion stops early on either side: every step does the
same work, and each side's reward function checks that every completion has C tokens. The reward is a cheap
function of the completion's tokens (sum of ids mod 97, over 97), so that advantages are not all zero.
TRL's defaults otherwise (learning rate 1e-6, linear decay, AdamW, clipping at 1.0, epsilon 0.2):
    grpo        loss_type dapo, beta 0 (no reference model), num_iterations 1 (no old log-prob forward);
    rloo        beta 0.05: a reference forward and an old log-prob forward per step (the k1 KL in the reward);
    online_dpo  loss_type sigmoid, beta 0.1: the pairs' training forward + backward and a reference forward;
    ppo         a reward model (the same Qwen2 shapes with a one-output score head) scores; the value model is
                its backbone with a fresh head (TRL's default); per step the old-policy, reference, value and
                reward forwards, then the policy's and the value's forward + backward under one optimizer.
Both sides: no gradient checkpointing (TRL's default turns it on; neither side recomputes), fp32, CPU.

A step is everything between two optimizer steps: generation, rewards, the log-prob forwards the algorithm
needs, the training forward + backward, clipping, AdamW, schedule, metrics.
    ours  `posttrain.rl.grpo.train` / `rloo.train` (the whole loop: rollout engine, rewards, `prepare_batch`,
          `loop.accumulate`, metrics) with max_steps = warmup + steps on a jsonl of the same prompts, the reward
          named "__main__:REWARD"; the clock starts at the first `rollout.generate` call and stamps the end of
          every `loop.accumulate` (the optimizer step). The loop loads the model from the folder; its tokenizer
          is the benchmark's (patched in: transformers 5 reloads a qwen2 folder's tokenizer as a byte-level
          Qwen2Tokenizer, which does not know the words "t17").
    trl   `GRPOTrainer.train()` / `RLOOTrainer.train()` with max_steps = warmup + steps on a prompt-only dataset
          of text prompts (one word per token: TRL's tokenizer call returns the benchmark's ids); a callback
          stamps the time at each `on_step_end`. TRL generates with `model.generate` (no vLLM on the CPU),
          which prefills each of the N rows (the prompt repeated G times by its sampler).
Both sides also report where their mean step goes: generation, the no-grad log-prob forwards, training (timed
calls of `rollout.generate` / `grpo.policy_logps` / `loop.accumulate`, and of `GenerationMixin.generate` /
`_get_per_token_logps_and_entropies` in TRL), and the rest.
Peak memory: the resident high-water mark at the last step's end minus the resident set at the first step's
start (models and reference loaded, AdamW state not yet allocated), as the other benchmarks measure it.

Floor (`floor`): the matmuls a step cannot avoid, timed on their own shapes in the side's process right after
its steps, forward-only matmuls for the forward-only parts:
    prefill      the prompt's P positions once per prompt (not once per row: the G rows share it), its output
                 layer at the last position only;
    decode       C - 1 one-token forwards of the N rows (the prefill's logits give the first token), attention
                 over the prompt and the tokens so far, output layer at the new position;
    train        forward + backward of each prompt's P tokens once and the N rows' C completion tokens on
                 them (`common.shared_prompt_step_flops`: 3 x forward; both sides' loops used to run the
                 prompt once per row, ours runs it once per prompt since session 15: `rl.logprobs.shared_prefix`),
                 output layer at the N x C completion positions only;
    rloo adds    two forwards of the N rows (old and reference log-probs): 1/3 of the train floor each;
    online_dpo   the reference forward of the N rows: 1/3 of the train floor;
    ppo adds     the old-policy and reference forwards (1/3 of the train floor each), and the value model's
                 forward + backward plus its no-grad forward, body only (its head has one output), and the
                 reward model's forward, which reads the last token only (`common.last_token_score_flops`).
Decode runs at N = 8 rows, where a matmul reads its weights for little arithmetic: its rate is far below the
training matmuls', which is why it is timed on its own shapes.

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

ALGOS = ("grpo", "rloo", "online_dpo", "ppo")
HAS_TRL_SIDE = ("grpo", "rloo", "online_dpo")  # TRL 1.16 has no PPO
PROMPT_LEN, COMPLETION_LEN, ROWS = 64, 32, 8
# completions per prompt: the N = ROWS rows of a step are ROWS / G prompts x G completions
GENERATIONS = {"grpo": 8, "rloo": 8, "online_dpo": 2, "ppo": 1}


def prompts_per_step(algo: str) -> int:
    return ROWS // GENERATIONS[algo]


def sides_of(algo: str) -> tuple[str, ...]:
    return ("ours", "trl") if algo in HAS_TRL_SIDE else ("ours",)


PAD_ID = 0
# Generation's matmuls take microseconds: many repeats are cheap, and on a shared CPU one stalled OpenMP barrier
# can slow each of a few repeats many-fold (the floor takes the fastest).
FORWARD_REPEATS = 20


def build_tokenizer(vocab_size: int):
    """A word-level tokenizer over "t0" .. "t{V-1}" plus an eos "<eos>" with id V, outside the model's vocabulary
    (so never sampled). Text "t5 t17" is ids [5, 17]; "<pad>" is id 0."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": PAD_ID, **{f"t{i}": i for i in range(1, vocab_size)}, "<eos>": vocab_size}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>")


def save_model(folder: str, quick: bool) -> None:
    """The SFT benchmark's model (seed 0), its eos moved to id V, and the tokenizer, saved to `folder`; and in
    folder/reward a reward model of the same shapes (a one-output score head, seed 1), for PPO."""
    from transformers import AutoModelForSequenceClassification

    model = sft.build_model(quick)
    V = model.config.vocab_size
    model.config.eos_token_id = model.generation_config.eos_token_id = V
    model.config.pad_token_id = model.generation_config.pad_token_id = PAD_ID
    model.save_pretrained(folder)
    build_tokenizer(V).save_pretrained(folder)
    torch.manual_seed(1)
    config = sft.model_config(quick)
    config.num_labels, config.pad_token_id = 1, PAD_ID
    reward = os.path.join(folder, "reward")
    AutoModelForSequenceClassification.from_config(config).save_pretrained(reward)
    build_tokenizer(V).save_pretrained(reward)


def random_prompts(n: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """n prompts of PROMPT_LEN random ids >= 3 (no pad / special ids)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab_size, (n, PROMPT_LEN), generator=g).tolist()


def prompt_rows(n: int, vocab_size: int) -> list[dict]:
    """The prompts as a prompt-only dataset's rows of text, one word per token."""
    return [{"prompt": " ".join(f"t{i}" for i in ids)} for ids in random_prompts(n, vocab_size)]


class CheckedReward:
    """The reward function both sides call (TRL's calling convention): sum of the completion's ids mod 97,
    over 97. It records every completion's length, so the run can check that all had COMPLETION_LEN tokens."""

    __name__ = "ids_mod_97"

    def __init__(self):
        self.lengths = []

    def __call__(self, prompts, completions, completion_ids, **kwargs):
        self.lengths += [len(ids) for ids in completion_ids]
        return [float(sum(ids) % 97) / 97 for ids in completion_ids]


REWARD = CheckedReward()  # ours names it "__main__:REWARD" (a run's config holds names, not objects)


class Parts:
    """Where a side's steps spend their time: `wrap` times every call of a function, under a part's name."""

    def __init__(self):
        self.calls = []  # (end, seconds, part)

    def wrap(self, owner, name: str, part) -> None:
        """Replace owner.name by a timed call of it; `part` is a name, or a function giving it at call time."""
        fn = getattr(owner, name)

        def timed(*a, **k):
            t0 = time.perf_counter()
            out = fn(*a, **k)
            t1 = time.perf_counter()
            self.calls.append((t1, t1 - t0, part if isinstance(part, str) else part()))
            return out

        setattr(owner, name, timed)

    def per_step(self, start: float, steps: int) -> dict[str, float]:
        """Mean seconds per step in each part, over the calls that ended after `start` (the timed steps)."""
        out = {}
        for end, seconds, part in self.calls:
            if end > start:
                out[part] = out.get(part, 0.0) + seconds / steps
        return out


# ---------------------------------------------------------------------------------------------------------
# Our side
# ---------------------------------------------------------------------------------------------------------


def run_ours(args) -> dict:
    """`grpo.train` / `rloo.train` (the whole loop) on the saved model and a jsonl of the prompts, timed from the
    outside: the clock starts at the first call of the rollout engine (everything before it is set-up) and
    stamps the end of every `loop.accumulate` (the optimizer step), so a step is all the loop does between two
    optimizer steps, as TRL's `on_step_end` stamps are."""
    import json

    from posttrain.rl import grpo, loop, rloo, rollout

    n_steps = args.warmup + args.steps
    vocab_size = sft.model_config(args.quick).vocab_size
    stamps, memory, parts = [], {}, Parts()
    # grpo.prepare_batch and rloo.prepare_batch both call grpo.policy_logps for the old / reference log-probs
    parts.wrap(grpo, "policy_logps", "logp forwards")
    parts.wrap(rollout, "generate", "generation")
    parts.wrap(loop, "accumulate", "train fwd + bwd + AdamW")
    generate, accumulate = rollout.generate, loop.accumulate

    def first_generate(*a, **k):
        if not stamps:
            memory["rss_before"] = common.rss_mib()
            common.reset_peak_rss()
            stamps.append(time.perf_counter())
        out = generate(*a, **k)
        if args.algo == "ppo":  # scored by a reward model, not REWARD: count the lengths here
            REWARD.lengths += out.completion_mask.sum(1).tolist()
        return out

    def stamped_accumulate(*a, **k):
        out = accumulate(*a, **k)
        stamps.append(time.perf_counter())
        memory["peak"] = common.peak_rss_mib()  # as of the last step's end (the final save comes after)
        return out

    rollout.generate, loop.accumulate = first_generate, stamped_accumulate
    # transformers 5 reloads a qwen2 folder's tokenizer as a byte-level Qwen2Tokenizer, which has no word for
    # "t17": the loop gets the benchmark's tokenizer, as TRL's side does (`processing_class`)
    grpo.load_tokenizer = lambda name: build_tokenizer(vocab_size)
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        save_model(folder, args.quick)
        data = os.path.join(folder, "prompts.jsonl")
        with open(data, "w") as f:
            rows = prompt_rows(n_steps * prompts_per_step(args.algo), vocab_size)
            f.writelines(json.dumps(row) + "\n" for row in rows)
        common_options = dict(
            output_dir=out,
            model_name_or_path=folder,
            dataset_name=data,
            max_steps=n_steps,
            logging_steps=10**6,  # as TRL's side: no metrics line, no completions.jsonl
            save_steps=0,
            bf16=False,
            report_to="none",
            seed=0,
            torch_compile=args.torch_compile,
        )
        online = dict(
            reward_funcs=["__main__:REWARD"],
            per_device_train_batch_size=ROWS,
            num_generations=GENERATIONS[args.algo],
            max_completion_length=COMPLETION_LEN,
        )
        if args.algo == "grpo":
            grpo.train(grpo.GRPOConfig(**common_options, **online, loss_type="dapo", beta=0.0))
        elif args.algo == "rloo":
            rloo.train(rloo.RLOOConfig(**common_options, **online, beta=0.05))
        elif args.algo == "online_dpo":
            from posttrain.rl import online_dpo

            # as TRL's OnlineDPOConfig, per_device_train_batch_size counts prompts (each makes a pair)
            options = {**online, "per_device_train_batch_size": prompts_per_step(args.algo)}
            options.update(temperature=1.0, loss_type="sigmoid", beta=0.1)
            online_dpo.train(online_dpo.OnlineDPOConfig(**common_options, **options))
        else:
            from posttrain.rl import models, ppo

            # the reward model's tokenizer is loaded from its folder inside rewards.py (a function-level import)
            ppo.load_tokenizer = models.load_tokenizer = grpo.load_tokenizer
            ppo.train(
                ppo.PPOConfig(
                    **common_options,
                    reward_model_path=os.path.join(folder, "reward"),
                    per_device_train_batch_size=ROWS,
                    num_ppo_epochs=1,
                    num_mini_batches=1,
                    response_length=COMPLETION_LEN,
                    temperature=1.0,
                )
            )
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)][args.warmup :]
    return {
        "times": times,
        "peak_mib": memory["peak"] - memory["rss_before"],
        "lengths": REWARD.lengths,
        "parts": parts.per_step(stamps[args.warmup], args.steps),
    }


# ---------------------------------------------------------------------------------------------------------
# TRL's side
# ---------------------------------------------------------------------------------------------------------


def run_trl(args) -> dict:
    import trl
    from datasets import Dataset
    from transformers import GenerationMixin, TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.stamps, self.rss_before, self.peak = [], None, None

        def on_train_begin(self, *a, **k):
            self.rss_before = common.rss_mib()
            common.reset_peak_rss()
            self.stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            self.stamps.append(time.perf_counter())
            self.peak = common.peak_rss_mib()  # as of the last step's end

    n_steps = args.warmup + args.steps
    clock, parts = StepClock(), Parts()
    if args.algo == "online_dpo":
        from trl.experimental.online_dpo import OnlineDPOConfig, OnlineDPOTrainer

        Config, Trainer, logps = OnlineDPOConfig, OnlineDPOTrainer, "_forward"
        options = {
            "max_new_tokens": COMPLETION_LEN,
            "temperature": 1.0,
            "loss_type": "sigmoid",
            "beta": [0.1],
        }
    else:
        Config, Trainer = (
            (trl.GRPOConfig, trl.GRPOTrainer) if args.algo == "grpo" else (trl.RLOOConfig, trl.RLOOTrainer)
        )
        logps = "_get_per_token_logps_and_entropies"
        options = {"num_generations": GENERATIONS[args.algo], "max_completion_length": COMPLETION_LEN}
        options.update({"loss_type": "dapo", "beta": 0.0} if args.algo == "grpo" else {"beta": 0.05})
    parts.wrap(GenerationMixin, "generate", "generation")
    # TRL's log-prob function: under no_grad for the old and reference log-probs, with grad for training
    parts.wrap(Trainer, logps, lambda: "train forward" if torch.is_grad_enabled() else "logp forwards")
    with tempfile.TemporaryDirectory() as folder, tempfile.TemporaryDirectory() as out:
        save_model(folder, args.quick)
        # built, not reloaded: transformers 5 reloads a qwen2 folder's tokenizer as a byte-level Qwen2Tokenizer
        tokenizer = build_tokenizer(sft.model_config(args.quick).vocab_size)
        config = Config(
            output_dir=out,
            use_cpu=True,
            bf16=False,
            activation_checkpointing=False,  # TRL's default is on (as `gradient_checkpointing`)
            report_to=[],
            # GRPO / RLOO count completions per device, Online DPO prompts (each makes a pair)
            per_device_train_batch_size=ROWS if args.algo != "online_dpo" else prompts_per_step(args.algo),
            max_steps=n_steps,
            logging_steps=10**6,
            save_strategy="no",
            disable_tqdm=True,
            dataloader_num_workers=0,
            seed=0,
            torch_compile=args.torch_compile,  # the whole policy, as transformers' Trainer compiles it
            **options,
        )
        trainer = Trainer(
            model=folder,
            reward_funcs=[REWARD],
            args=config,
            train_dataset=Dataset.from_list(
                prompt_rows(n_steps * prompts_per_step(args.algo), tokenizer.eos_token_id)
            ),
            processing_class=tokenizer,
            callbacks=[clock],
        )
        trainer.train()
    times = [b - a for a, b in zip(clock.stamps, clock.stamps[1:], strict=False)][args.warmup :]
    return {
        "times": times,
        "peak_mib": clock.peak - clock.rss_before,
        "lengths": REWARD.lengths,
        "parts": parts.per_step(clock.stamps[args.warmup], args.steps),
    }


# ---------------------------------------------------------------------------------------------------------
# The floor
# ---------------------------------------------------------------------------------------------------------


def layer_forward_seconds(config, rows: int) -> float:
    """Seconds of one decoder layer's linear maps, forward only, at `rows` rows (`common.layer_shapes`)."""
    return sum(
        common.linear_forward_seconds(rows, k, m, FORWARD_REPEATS) for k, m in common.layer_shapes(config)
    )


def generation_floor(config, prompts: int) -> dict:
    """FLOPs and floor seconds of sampling C tokens for the N rows of `prompts` prompts (see the module
    docstring): prefill once per prompt, then C - 1 one-token decode steps, forward only, each part at the rate
    of its own matmul shapes measured now (attention at the body's rate)."""
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    P_layer, A = common.linear_params_per_layer(config), common.attention_width(config)
    prefill_rows = prompts * PROMPT_LEN
    flops = {
        "prefill body": 2.0 * L * P_layer * prefill_rows,
        "prefill attn": 2.0 * L * PROMPT_LEN * A * prefill_rows,  # causal half of QK^T and PV
        "prefill head": 2.0 * H * V * prompts,  # last position only
        "decode body": 2.0 * L * P_layer * ROWS * (COMPLETION_LEN - 1),
        # the new token at context length c = P + t attends to c positions: 2 matmuls x 2 FLOPs x c x A
        "decode attn": sum(4.0 * L * (PROMPT_LEN + t) * A * ROWS for t in range(1, COMPLETION_LEN)),
        "decode head": 2.0 * H * V * ROWS * (COMPLETION_LEN - 1),
    }
    prefill_layer_s, decode_layer_s = (
        layer_forward_seconds(config, prefill_rows),
        layer_forward_seconds(config, ROWS),
    )
    prefill_rate = 2.0 * P_layer * prefill_rows / prefill_layer_s
    decode_rate = 2.0 * P_layer * ROWS / decode_layer_s
    seconds = {
        "prefill": L * prefill_layer_s
        + flops["prefill attn"] / prefill_rate
        + common.linear_forward_seconds(prompts, H, V, FORWARD_REPEATS),
        "decode": (COMPLETION_LEN - 1)
        * (L * decode_layer_s + common.linear_forward_seconds(ROWS, H, V, FORWARD_REPEATS))
        + flops["decode attn"] / decode_rate,
    }
    return {"flops": flops, "seconds": seconds, "decode_rate": decode_rate}


# no-grad log-prob forwards of the N rows through a causal LM (old policy, reference) per step
LOGP_FORWARDS = {"grpo": 0, "rloo": 2, "online_dpo": 1, "ppo": 2}


def floor(config, algo: str) -> dict:
    """The step's floor: generation (`generation_floor`), the training forward + backward (`common.compute_floor`
    over N x (P + C) tokens, output layer at the N x C completion positions), LOGP_FORWARDS[algo] no-grad
    forwards of the same rows (1/3 of the training floor each) and, for PPO, the value model's forward +
    backward and forward (the training floor's body part, in full and 1/3) and the reward model's forward."""
    seq_len = PROMPT_LEN + COMPLETION_LEN
    prompts = prompts_per_step(algo)  # each prompt once: its G rows share it (rl.logprobs.shared_prefix)
    shared = common.shared_prompt_step_flops(
        config, prompts, ROWS, PROMPT_LEN, COMPLETION_LEN, head_tokens=ROWS * COMPLETION_LEN
    )
    tokens = prompts * PROMPT_LEN + ROWS * COMPLETION_LEN
    train = common.compute_floor(config, tokens, seq_len, ROWS * COMPLETION_LEN, repeats=10, flops=shared)
    gen = generation_floor(config, prompts)
    forwards = LOGP_FORWARDS[algo]
    f = train["flops"]
    seconds = {**gen["seconds"], "train": train["floor_s"], "logp forwards": forwards / 3 * train["floor_s"]}
    flops = {
        "generation": sum(gen["flops"].values()),
        "train": sum(f.values()),
        "logp forwards": forwards / 3 * sum(f.values()),
    }
    if algo == "ppo":
        scored = common.last_token_score_flops(config, ROWS * seq_len, seq_len, rows=ROWS)
        value_reward_flops = (f["body"] + f["attn"]) * (1 + 1 / 3) + sum(scored.values()) / 3
        seconds["value + reward models"] = value_reward_flops / train["body_rate"]
        flops["value + reward models"] = value_reward_flops
    return {
        "flops": flops,
        "seconds": seconds,
        "floor_s": sum(seconds.values()),
        "body_rate": train["body_rate"],
        "head_rate": train["head_rate"],
        "decode_rate": gen["decode_rate"],
    }


# ---------------------------------------------------------------------------------------------------------
# Measurement and report
# ---------------------------------------------------------------------------------------------------------


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--algo", nargs="+", choices=ALGOS, default=list(ALGOS), help="algorithms to run")
    parser.add_argument("--steps", type=int, default=10, help="timed steps per side")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side before the timed ones")
    parser.add_argument("--rounds", type=int, default=2, help="alternate the sides this many times")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny model, 1 + 2 steps, 1 round")
    parser.add_argument(
        "--torch_compile", action="store_true", help="both sides with torch_compile (compiled in the warm-up)"
    )
    parser.add_argument("--side", choices=("ours", "trl"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds = min(args.steps, 2), min(args.warmup, 1), 1

    config = sft.model_config(args.quick)
    if args.side:
        args.algo = args.algo[0]
        result = (run_ours if args.side == "ours" else run_trl)(args)
        common.emit_result({**result, "floor": floor(config, args.algo)})  # right after the steps
        return

    sides = ["--steps", str(args.steps), "--warmup", str(args.warmup)] + (["--quick"] if args.quick else [])
    sides += ["--torch_compile"] if args.torch_compile else []
    results = {
        algo: {
            side: {"times": [], "peak_mib": 0.0, "floors": [], "lengths": set(), "parts": []}
            for side in sides_of(algo)
        }
        for algo in args.algo
    }
    print(f"online loops' steps, {common.machine_line()}", flush=True)
    for _ in range(args.rounds):  # alternating the sides spreads any other load on the machine over both
        for algo in args.algo:
            for side in sides_of(algo):
                result = common.run_side(__file__, ["--side", side, "--algo", algo, *sides])
                r = results[algo][side]
                r["times"] += result["times"]
                r["floors"].append(result["floor"])
                r["peak_mib"] = max(r["peak_mib"], result["peak_mib"])
                r["lengths"] |= set(result["lengths"])
                r["parts"].append(result["parts"])
    for by_side in results.values():
        for r in by_side.values():
            # the smallest of the rounds': on a shared CPU a whole round's matmul timings can stall many-fold
            r["floor_s"] = min(f["floor_s"] for f in r["floors"])

    print(
        f"model: Qwen2 V={config.vocab_size} H={config.hidden_size} L={config.num_hidden_layers} "
        f"I={config.intermediate_size}; per step {ROWS} completions of {COMPLETION_LEN} tokens to prompts of "
        f"{PROMPT_LEN} tokens ({', '.join(f'{a} {prompts_per_step(a)} x {GENERATIONS[a]}' for a in args.algo)}); "
        f"{args.rounds} x ({args.warmup} warm-up + "
        f"{args.steps} timed steps) per side and algorithm, alternating"
        + ("; torch_compile on both sides" if args.torch_compile else "")
        + f"; load at the end {os.getloadavg()[0]:.2f}"
    )
    for algo, by_side in results.items():
        f, s = by_side["ours"]["floors"][0]["flops"], by_side["ours"]["floors"][0]["seconds"]
        print(
            f"\n{algo}: floor {sum(f.values()) / 1e9:.1f} GFLOP per step ("
            + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in f.items())
            + "); seconds in ours' first round: "
            + ", ".join(f"{k} {v:.3f}" for k, v in s.items())
        )
        for side in by_side:
            rates = ", ".join(
                f"{x['body_rate'] / 1e9:.0f} / {x['head_rate'] / 1e9:.0f} / {x['decode_rate'] / 1e9:.0f}"
                for x in by_side[side]["floors"]
            )
            lengths = sorted(by_side[side]["lengths"])
            print(
                f"  {side}: body / head / decode GFLOP/s per round {rates}; completion lengths seen {lengths}"
            )
            mean = sum(by_side[side]["times"]) / len(by_side[side]["times"])
            split = {}
            for round_parts in by_side[side]["parts"]:
                for part, seconds in round_parts.items():
                    split[part] = split.get(part, 0.0) + seconds / len(by_side[side]["parts"])
            print(
                f"  {side}: mean s/step {mean:.3f}: "
                + ", ".join(f"{part} {seconds:.3f}" for part, seconds in split.items())
                + f", the rest {mean - sum(split.values()):.3f}"
            )
            if lengths != [COMPLETION_LEN]:
                print(
                    f"  WARNING: {side} made completions of other lengths than {COMPLETION_LEN}: not the same work"
                )
        if "trl" in by_side:
            common.print_comparison(by_side)

    # One line per algorithm; each side's ratio to the floor measured in its own processes.
    header = ["algo", "floor s (ours / TRL runs)", "ours s/step", "TRL s/step", "ours / floor", "TRL / floor"]
    header += ["ours / TRL time", "ours MiB", "TRL MiB", "ours / TRL memory"]
    rows = []
    for algo, by_side in results.items():
        ours, trl = by_side["ours"], by_side.get("trl")
        t_ours = common.median(ours["times"])
        if trl is None:  # TRL 1.16 has no PPO: the floor alone
            rows.append(
                [algo, f"{ours['floor_s']:.3f} / -", f"{t_ours:.3f}", "-", f"{t_ours / ours['floor_s']:.2f}"]
                + ["-"] * 2
                + [f"{ours['peak_mib']:.0f}"]
                + ["-"] * 2
            )
            continue
        t_trl = common.median(trl["times"])
        rows.append(
            [
                algo,
                f"{ours['floor_s']:.3f} / {trl['floor_s']:.3f}",
                f"{t_ours:.3f}",
                f"{t_trl:.3f}",
                f"{t_ours / ours['floor_s']:.2f}",
                f"{t_trl / trl['floor_s']:.2f}",
                f"{t_ours / t_trl:.2f}",
                f"{ours['peak_mib']:.0f}",
                f"{trl['peak_mib']:.0f}",
                f"{ours['peak_mib'] / trl['peak_mib']:.2f}",
            ]
        )
    print()
    print(common.markdown_table(header, rows))
    print(common.machine_line())


if __name__ == "__main__":
    main()
