"""Rollout: new tokens/s of `posttrain.rl.rollout.generate` vs transformers' `model.generate`, same run.

    python benchmarks/rollout.py            # embedded model and ~100M Qwen2, batch 8 / 32 / 64
    python benchmarks/rollout.py --quick    # a smoke run: embedded model only, batch 8, few tokens
    python benchmarks/rollout.py --models sft 100m

Models (random init, float32, dropout off, CPU):
    embedded  `posttrain.data.embedded.build_model` (Qwen2, V = 128, H = 128, 3 layers, ~0.4M parameters)
    sft       the SFT benchmark's Qwen2 (benchmarks/sft.py: V = 32000, H = 256, 4 layers, I = 1024), the model
              design.md's figures are about: its decode step costs about what sampling 32k tokens does
    100m      Qwen2, V = 32000, H = 768, 12 layers, 12 heads (4 kv), I = 2304, tied embeddings (~107M)
Work per call: B rows, B / G random prompts of 16 to 32 tokens (different lengths: left padding in play) with
G completions each (G = 1, and G = 8 at B = 32: GRPO's shape; generate's `num_return_sequences`), each of up to
`--new_tokens` tokens (default 32), eos = the model's eos (a random model rarely emits it, so
almost every row runs to the limit). Both sides: do_sample, temperature 1, top_p 1, top_k off (generate's
default top_k of 50 is switched off), KV cache, the same left-padded batch.

Sides: `generate` (transformers), `ours` (`rollout.generate`, eager) and `compiled` (`rollout.generate(...,
compile=True)`). Each (model, batch) runs in its own subprocess (`common.run_side`) holding all three sides: the
compiled side's first call (its compilation, timed: `compile s`, cold, in a fresh TORCHINDUCTOR_CACHE_DIR), one
warm-up call of the others, then `--repeats` (default 5) rounds of one timed call per side, back to back, so
that the shared machine's changing load hits the sides of a round alike. A call's rate is (new tokens
produced) / (wall-clock seconds of the call), the new tokens being the completion tokens it returned (up to and
including eos), prefill included in the time. The table gives each side's median rate and, per side, the
median over rounds of its rate / generate's rate in the same round.

Measured on the shared 2-core CPU, 29 Nov 2026 (load 0.7-1.9; the embedded rows re-run on one thread):

    model     batch        ours tok/s  generate tok/s  ours / generate
    embedded  8                  6040            5978  1.01
    embedded  32                13008           11609  1.12
    embedded  64                16559           14126  1.17
    embedded  32 (4 x 8)        17220           12717  1.35
    sft       8                   743             646  1.15
    sft       32                 2562            1085  2.36
    sft       64                 3270            1247  2.62
    sft       32 (4 x 8)         2826            1116  2.53
    100m      8                   152             141  1.08
    100m      32                  318             282  1.13
    100m      64                  361             330  1.10
    100m      32 (4 x 8)          364             259  1.40

Where the time goes (sft, batch 32, one decode step): the model's forward ~10 ms (its output layer alone ~5 ms,
the weight read of a (32000, 256) matrix), our processing and sampling ~0.7 ms; generate adds
`torch.multinomial` (~15 ms on an idle machine). Ours is within ~10% of the model's own forward, so the issue's
3x at batch 32 would need generate to spend twice the forward outside it, which it does not here: 2.4x. On
the embedded model both sides are the forward's Python overhead; on the 100M model both are its matmuls
(a decode step reads ~430 MB of weights). The (4 x 8) rows add prefill once per prompt (generate's
`num_return_sequences` prefills every row).
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

MODELS = ("embedded", "sft", "100m")
# (rows, completions per prompt): rows = prompts x completions; (32, 8) is GRPO's shape, 4 prompts x 8
BATCHES = ((8, 1), (32, 1), (64, 1), (32, 8))
MIN_PROMPT, MAX_PROMPT = 16, 32
# The embedded model's ops are far too small to split across threads, and on a shared CPU a second OpenMP
# thread that gets descheduled stalls every op at its barrier (calls ran 10-100x slower, on either side at
# random): both sides run it on one thread.
THREADS = {"embedded": 1}


def build_model(name: str):
    from transformers import AutoModelForCausalLM

    from posttrain.data.embedded import build_model as build_embedded
    from posttrain.data.embedded import tiny_model_config

    if name == "embedded":
        model = build_embedded(0)
    elif name == "sft":
        import sft

        model = sft.build_model(quick=False)
    else:
        config = tiny_model_config(
            vocab_size=32000,
            hidden_size=768,
            intermediate_size=2304,
            num_hidden_layers=12,
            num_attention_heads=12,
            num_key_value_heads=4,
            max_position_embeddings=1024,
        )
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def random_prompts(batch: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of MIN_PROMPT..MAX_PROMPT random ids >= 3 (no pad / eos / special ids)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


SIDES = ("generate", "ours", "ours_compiled")


def calls(args, model) -> dict:
    """One zero-argument call per side on the same prompts and settings; each returns its new tokens."""
    from posttrain.rl import rollout

    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    G = args.num_generations
    prompts = random_prompts(args.batch // G, model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    input_ids, attention_mask = rollout._left_pad(prompts, pad, "cpu")

    def ours(compile: bool) -> int:
        out = rollout.generate(
            model,
            prompts,
            num_generations=G,
            max_completion_length=args.new_tokens,
            temperature=1.0,
            top_p=1.0,
            eos_token_id=eos,
            pad_token_id=pad,
            generator=generator,
            compile=compile,
        )
        return int(out.completion_mask.sum())

    def generate() -> int:
        out = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=1.0,
            top_p=1.0,
            top_k=0,
            max_new_tokens=args.new_tokens,
            num_return_sequences=G,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        completions = out[:, input_ids.shape[1] :]
        # tokens up to and including the first eos: generate pads the rows that stopped
        stopped_before = (completions == eos).long().cumsum(-1) - (completions == eos).long()
        return int((stopped_before == 0).sum())

    return {"generate": generate, "ours": lambda: ours(False), "ours_compiled": lambda: ours(True)}


def pair(args) -> dict:
    """Every side on one (model, batch) in this process, calls interleaved round by round, so that a change
    of load on the shared machine hits all sides alike. Returns each side's rates (tokens/s) per round and
    the compiled side's first call (its compilation: dynamo + inductor, cold, as TORCHINDUCTOR_CACHE_DIR is
    a fresh folder)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    side_calls = calls(args, model)
    rates = {name: [] for name in SIDES}
    with torch.no_grad():
        t0 = time.perf_counter()
        side_calls["ours_compiled"]()
        first_call_s = time.perf_counter() - t0
        side_calls["ours"](), side_calls["generate"]()  # warm-up
        for _ in range(args.repeats):
            for name in SIDES:
                t0 = time.perf_counter()
                tokens = side_calls[name]()
                rates[name].append(tokens / (time.perf_counter() - t0))
    return {"rates": rates, "first_call_s": first_call_s}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pair", action="store_true")  # internal: run one (model, batch) in this process
    parser.add_argument("--model", choices=MODELS)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--num_generations", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads for every model (default: THREADS)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    args = parser.parse_args()
    if args.pair:
        common.emit_result(pair(args))
        return

    models, batches = (("embedded",), ((8, 1), (8, 4))) if args.quick else (args.models, BATCHES)
    new_tokens, repeats = (8, 2) if args.quick else (args.new_tokens, args.repeats)
    print(common.machine_line())
    header = ["model", "batch", "generate tok/s", "ours tok/s", "compiled tok/s", "ours / generate"]
    header += ["compiled / generate", "compile s"]
    rows = []
    for name in models:
        for batch, G in batches:
            flags = ["--pair", "--model", name, "--batch", str(batch), "--num_generations", str(G)]
            flags += ["--new_tokens", str(new_tokens), "--repeats", str(repeats)]
            threads = args.threads or THREADS.get(name)
            flags += ["--threads", str(threads)] if threads else []
            with tempfile.TemporaryDirectory() as inductor_cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
                result = common.run_side(__file__, flags)
            rates = result["rates"]
            # ratios per round (the sides of a round ran back to back), then their median
            ratio = {
                side: common.median([a / b for a, b in zip(rates[side], rates["generate"], strict=True)])
                for side in ("ours", "ours_compiled")
            }
            label = batch if G == 1 else f"{batch} ({batch // G} x {G})"
            rows.append(
                [name, label, *(f"{common.median(rates[side]):.0f}" for side in SIDES)]
                + [f"{ratio['ours']:.2f}", f"{ratio['ours_compiled']:.2f}", f"{result['first_call_s']:.0f}"]
            )
            print(common.markdown_table(header, rows[-1:]), flush=True)
    print()
    print(common.markdown_table(header, rows))
    print(common.machine_line())


if __name__ == "__main__":
    main()
