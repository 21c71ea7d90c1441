"""Rollout: new tokens/s of `posttrain.rl.rollout.generate` vs transformers' `model.generate`, same run.

    python benchmarks/rollout.py            # embedded model and ~100M Qwen2, batch 8 / 32 / 64
    python benchmarks/rollout.py --quick    # a smoke run: embedded model only, batch 8, few tokens
    python benchmarks/rollout.py --models sft 100m
    python benchmarks/rollout.py --breakdown --model sft --batch 32   # where a call's time goes
    python benchmarks/rollout.py --head                               # the output layer's two BLAS layouts
    python benchmarks/rollout.py --device cuda --dtype bfloat16 --models 0.5b --sides generate ours_step ours_forward

Models (random init, float32 unless --dtype, dropout off, CPU unless --device):
    embedded  `posttrain.data.embedded.build_model` (Qwen2, V = 128, H = 128, 3 layers, ~0.4M parameters)
    sft       the SFT benchmark's Qwen2 (benchmarks/sft.py: V = 32000, H = 256, 4 layers, I = 1024), the model
              design.md's figures are about: its decode step costs about what sampling 32k tokens does
    100m      Qwen2, V = 32000, H = 768, 12 layers, 12 heads (4 kv), I = 2304, tied embeddings (~107M)
    0.5b      Qwen2.5-0.5B's shapes: V = 151936, H = 896, 24 layers, 14 heads (2 kv), I = 4864 (GPU runs)
Work per call: B rows, B / G random prompts of 16 to 32 tokens (different lengths: left padding in play) with
G completions each (G = 1, and G = 8 at B = 32: GRPO's shape; generate's `num_return_sequences`), each of up to
`--new_tokens` tokens (default 32), eos = the model's eos (a random model rarely emits it, so
almost every row runs to the limit). Both sides: do_sample, temperature 1, top_p 1, top_k off (generate's
default top_k of 50 is switched off), KV cache, the same left-padded batch.

Sides: `generate` (transformers), `ours` (`rollout.generate`, eager) and `compiled` (`rollout.generate(...,
compile=True)`); with `--sides`, also `ours_step` / `ours_forward` (rl/decode.py's step allowed on the device
/ never: what the step gains, on a GPU too) and `ours_mkl` (`ours` without oneDNN). `--device cuda --dtype
bfloat16` runs every side on the GPU. Each (model, batch) runs in its own subprocess (`common.run_side`)
holding every side: the compiled side's first call (its compilation, timed: `compile s`, cold, in a fresh
TORCHINDUCTOR_CACHE_DIR), one warm-up call of the others, then `--repeats` (default 5) rounds of one timed
call per side, back to back, so that the shared machine's changing load hits the sides of a round alike. A
call's rate is (new tokens produced) / (wall-clock seconds of the call), the new tokens being the completion
tokens it returned (up to and including eos), prefill included in the time. The table gives each side's median
rate and, per side, the median over rounds of its rate / generate's rate in the same round.

Measured on the shared 2-core CPU, 30 Nov 2026, two torch threads (one for the embedded model, THREADS), with
rl/decode.py's step and the linear maps through oneDNN (`rollout.onednn_linears`): embedded and sft
02:22-02:26 UTC (load 0.9-1.5), 100m 02:26-02:33 (load 1.5-1.8):

    python benchmarks/rollout.py --models embedded sft --sides generate ours ours_mkl ours_compiled
    python benchmarks/rollout.py --models 100m --repeats 3 --sides generate ours ours_mkl ours_compiled

    model     batch       generate tok/s  ours tok/s  ours_mkl tok/s  compiled tok/s  ours / gen  ours_mkl / gen  compiled / gen  compile s
    embedded  8                     5467        8789            7825            9275        1.60            1.37            1.56         16
    embedded  32                   11854       15444           15618           15102        1.30            1.29            1.25         16
    embedded  64                   13357       17106           17356           15526        1.24            1.26            1.12         17
    embedded  32 (4 x 8)           11807       23910           24036           21385        2.05            2.11            1.72         17
    sft       8                      658        2669            1835            1723        4.02            2.79            2.63         20
    sft       32                    1149        5446            2899            2919        4.91            2.52            2.53         20
    sft       64                    1271        6519            3685            3662        5.19            2.90            2.88         19
    sft       32 (4 x 8)            1056        5600            2982            2957        5.32            2.82            2.81         21
    100m      8                      128         374             163             163        2.90            1.27            1.27         32
    100m      32                     258         686             302             298        2.66            1.18            1.16         32
    100m      64                     317         794             379             362        2.49            1.19            1.15         34
    100m      32 (4 x 8)             286        1020             451             428        3.62            1.58            1.49         29

`ours_mkl` is `ours` with nn.Linear's own matmul (MKL; `rollout.ONEDNN = False`), what session 10 measured
(29 Nov, 23:19-23:56: embedded 1.47 / 1.38 / 1.19 / 1.86, sft 2.77 / 2.30 / 2.77 / 2.54, 100m 1.28 / 1.17 /
1.26 / 1.60). The embedded model's weights are all below `rollout.ONEDNN_MIN_ELEMENTS`, so its `ours` and
`ours_mkl` are the same code. `compiled` is the model's own forward through `torch.compile`, without oneDNN's
reordered weights (inductor compiles nn.Linear to MKL here). Session 9 (the model's forward, before the step):
embedded 1.05 / 1.16 / 1.14 / 1.54, sft 2.33 / 2.02 / 2.38 / 2.26, 100m 1.22 / 1.14 / 1.16 / 1.54.

The issue's target, 3x `generate` at batch 32, is met on the sft model (4.91x), not on the issue's two models:
100m 2.66x, embedded 1.30x (Python-bound: see below). Where a 100m call at batch 32 goes now (ms, two
threads): prefill 468 (1024 left-padded positions, 219 GFLOP at ~470 GFLOP/s: oneDNN's peak here), 31 decode steps of 25.9 (6.9 GFLOP each at ~270 GFLOP/s, the
rate of 32-row products; their 428 MB of weights take ~9 ms at the 48 GB/s this machine reads), sampling 0.3
a step; the call 1477 against generate's ~3970. 3x would need the call at ~1320: skipping the prompts' pad
positions in the prefill (a quarter of them) would save ~115 ms, not enough alone.

Session 10's analysis of the MKL step, for reference: `--breakdown` at 23:30 (ms; a side's
per-step cost is (its call - prefill) / 31; `forward` the model's forward of one step, `decode step`
rl/decode.py's, both with the output layer `generate` gives them):

    model  batch  prefill  forward  decode step  sampling  gen call  ours call  gen step  ours step
    sft    8         15.4     4.39         3.51      0.28       275        131      8.37       3.74
    sft    32        65.9     11.6         10.4      0.65       943        407      28.3       11.0

Both sides run the same prefill (at batch 32, 1024 left-padded prompt tokens: 7% of generate's call, 16% of
ours). generate's step is the model's forward plus `torch.multinomial` over 32k tokens (~15 ms at 32 rows by
design.md's probe); ours is the decode step and the inverse-CDF sampling, so at batch 32 3x would need our step
at ~8 ms, against the ~9 ms its matmuls take where every step streams the 16.8 MB of layer weights and the
32.8 MB output layer (more than the 32 MB L3; the output layer alone 4-5 ms at 32 rows). 100m: the forward is
matmul-bound (a step reads ~430 MB of weights) and generate adds little: 1.2-1.3x. Embedded: generate's step
is ~1.7 ms against our ~1.1 ms; the prefill (20 ms of our 54 ms call at batch 32) is the same on both sides,
so 3x would need the decode steps nearly free.

`--head`: the output layer's two BLAS layouts (V = 32000, each call after a 64 MB write that evicts the weight),
ms, at 21:58 with two threads, and at 21:10 with one thread beside another agent's one-thread job:

    H    rows  2 threads: x @ W.T  W @ x.T  ratio    1 thread: x @ W.T  W @ x.T  ratio
    256  4                  3.21     0.85   3.79               3.18     1.46   2.18
    256  8                  3.62     1.43   2.54               3.82     2.76   1.39
    256  16                 4.34     2.80   1.55               5.04     5.41   0.93
    256  32                 4.97     4.09   1.21               7.36     8.37   0.88
    768  4                 11.40     2.53   4.50              10.56     4.44   2.38
    768  8                 11.84     5.36   2.21              12.47     9.74   1.28
    768  16                13.50     9.93   1.36              16.09    18.33   0.88
    768  32                17.43    14.36   1.21              23.53    25.59   0.92

so the rollout engine takes W @ x.T up to 8 rows (`rollout.VOCAB_MAJOR_MAX_ROWS`), where it wins on one thread
too.

`compile=True` (off by default) compiles the model's forward; it paid where that forward is Python-bound
(session 9: embedded at batch 8, 1.90x against eager's 1.05x); against rl/decode.py's eager step it now gains
at embedded batch 8 only (1.85x against 1.47x), and costs a first call of 15-33 s here (cold inductor cache;
30-60 s for every model at load 7-9; ~8 s with a warm cache), so the default stays eager.
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

MODELS = ("embedded", "sft", "100m", "0.5b")
# (rows, completions per prompt): rows = prompts x completions; (32, 8) is GRPO's shape, 4 prompts x 8
BATCHES = ((8, 1), (32, 1), (64, 1), (32, 8))
MIN_PROMPT, MAX_PROMPT = 16, 32
# The embedded model's ops are far too small to split across threads, and on a shared CPU a second OpenMP
# thread that gets descheduled stalls every op at its barrier (calls ran 10-100x slower, on either side at
# random): both sides run it on one thread.
THREADS = {"embedded": 1}


def build_model(name: str, device: str = "cpu", dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    from posttrain.data.embedded import build_model as build_embedded
    from posttrain.data.embedded import tiny_model_config

    if name == "embedded":
        model = build_embedded(0)
    elif name == "sft":
        import sft

        model = sft.build_model(quick=False)
    else:
        shapes = dict(hidden_size=768, intermediate_size=2304, num_hidden_layers=12, num_attention_heads=12)
        shapes |= dict(num_key_value_heads=4, vocab_size=32000)
        if name == "0.5b":  # Qwen2.5-0.5B's shapes
            shapes = dict(
                hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14
            )
            shapes |= dict(num_key_value_heads=2, vocab_size=151936)
        config = tiny_model_config(**shapes, max_position_embeddings=1024)
        torch.manual_seed(0)
        with torch.device(device):  # initialised where it runs: ~0.5B parameters take a while on the CPU
            model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval()


def random_prompts(batch: int, vocab_size: int, seed: int = 0) -> list[list[int]]:
    """`batch` prompts of MIN_PROMPT..MAX_PROMPT random ids >= 3 (no pad / eos / special ids)."""
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(MIN_PROMPT, MAX_PROMPT + 1, (batch,), generator=g).tolist()
    return [torch.randint(3, vocab_size, (n,), generator=g).tolist() for n in lengths]


# ours: rollout.generate as shipped (rl/decode.py's step where `decode.supports`, else the model's forward);
# ours_step / ours_forward: the step allowed on this device / never (the step's gain, on any device);
# ours_mkl: the linear maps through nn.Linear (torch.mm: MKL) rather than oneDNN (rollout.ONEDNN = False)
SIDES = ("generate", "ours", "ours_step", "ours_forward", "ours_mkl", "ours_compiled")
DEFAULT_SIDES = ("generate", "ours", "ours_compiled")


def calls(args, model) -> dict:
    """One zero-argument call per side on the same prompts and settings; each returns its new tokens."""
    from posttrain.rl import decode, rollout

    eos, pad = model.config.eos_token_id, model.config.pad_token_id
    G = args.num_generations
    prompts = random_prompts(args.batch // G, model.config.vocab_size)
    generator = torch.Generator().manual_seed(0)
    input_ids, attention_mask = rollout._left_pad(prompts, pad, args.device)
    shipped = set(decode.DEVICES)

    def ours(compile: bool, step_devices: set | None = None, onednn=rollout.ONEDNN) -> int:
        decode.DEVICES.clear()
        decode.DEVICES.update(shipped if step_devices is None else step_devices)
        rollout.ONEDNN, shipped_onednn = onednn, rollout.ONEDNN
        try:
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
        finally:  # the switches as shipped for the next side
            decode.DEVICES.clear()
            decode.DEVICES.update(shipped)
            rollout.ONEDNN = shipped_onednn
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

    return {
        "generate": generate,
        "ours": lambda: ours(False),
        "ours_step": lambda: ours(False, shipped | {torch.device(args.device).type}),
        "ours_forward": lambda: ours(False, set()),
        "ours_mkl": lambda: ours(False, onednn=False),
        "ours_compiled": lambda: ours(True),
    }


def pair(args) -> dict:
    """Every side on one (model, batch) in this process, calls interleaved round by round, so that a change
    of load on the shared machine hits all sides alike. Returns each side's rates (tokens/s) per round and
    the compiled side's first call (its compilation: dynamo + inductor, cold, as TORCHINDUCTOR_CACHE_DIR is
    a fresh folder)."""
    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model, args.device, getattr(torch, args.dtype))
    side_calls = calls(args, model)
    rates = {name: [] for name in args.sides}
    first_call_s = float("nan")
    with torch.no_grad():
        if "ours_compiled" in args.sides:
            t0 = time.perf_counter()
            side_calls["ours_compiled"]()
            first_call_s = time.perf_counter() - t0
        for name in args.sides:  # warm-up
            if name != "ours_compiled":
                side_calls[name]()
        for _ in range(args.repeats):
            for name in args.sides:
                t0 = time.perf_counter()
                tokens = side_calls[name]()
                rates[name].append(tokens / (time.perf_counter() - t0))
    return {"rates": rates, "first_call_s": first_call_s}


def breakdown(args) -> None:
    """Where a call's time goes, at one (model, batch), in ms: the prefill, one decode step's logits by the
    model's forward (static cache) and by `decode.LlamaDecodeStep` (what `rollout.generate` runs for the Llama
    family), both with the output layer `rollout.generate` gives them (`vocab_major_output_layer`),
    inverse-CDF sampling, and each side's whole call, timed interleaved round by round; a side's per-step cost
    is (its call - prefill) / (new_tokens - 1)."""
    from transformers import StaticCache

    from posttrain.rl import decode, rollout

    if args.threads:
        torch.set_num_threads(args.threads)
    model = build_model(args.model)
    side_calls = calls(args, model)
    prompts = random_prompts(args.batch, model.config.vocab_size)
    input_ids, attention_mask = rollout._left_pad(prompts, model.config.pad_token_id, "cpu")
    P, L = input_ids.shape[1], args.new_tokens

    def prefill():
        return rollout.prefill(
            model, input_ids, attention_mask, StaticCache(config=model.config, max_cache_len=P + L)
        )

    with torch.no_grad(), rollout.vocab_major_output_layer(model):
        logits, positions = prefill()
        cache = StaticCache(config=model.config, max_cache_len=P + L)
        rollout.prefill(model, input_ids, attention_mask, cache)
        mask = torch.cat([attention_mask, attention_mask.new_ones(args.batch, L)], dim=1)
        tokens, uniform = logits.argmax(-1), torch.rand(args.batch)

        def forward():
            model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions[:, None] + 1,
                **rollout.cache_kwarg(model, cache),
                use_cache=True,
            )
            for layer in cache.layers:  # rewind: every repeat writes the same slot
                layer.cumulative_length.sub_(1)

        lean_cache = StaticCache(config=model.config, max_cache_len=P + L)
        rollout.prefill(model, input_ids, attention_mask, lean_cache)
        lean = decode.LlamaDecodeStep(model, lean_cache, P, P + L)

        def lean_step():
            lean(tokens, positions + 1, mask)
            lean.slot -= 1  # rewind: every repeat writes the same slot

        settings = dict(repetition_penalty=1.0, temperature=1.0, top_k=None, top_p=1.0, min_p=None)
        pieces = {
            "prefill": prefill,
            "forward": forward,
            "decode step": lean_step,
            "sampling": lambda: rollout.next_token(logits, None, uniform, settings),
        }
        pieces.update({name: side_calls[name] for name in args.sides})
        for piece in pieces.values():
            piece()  # warm-up (the compiled side compiles here)
        times = {name: [] for name in pieces}
        for _ in range(args.repeats):
            for name, piece in pieces.items():
                t0 = time.perf_counter()
                piece()
                times[name].append((time.perf_counter() - t0) * 1e3)
    ms = {name: common.median(t) for name, t in times.items()}
    print(common.machine_line())
    print(
        f"{args.model} batch {args.batch}: "
        + ", ".join(f"{name} {t:.2f}" for name, t in ms.items())
        + " (ms)"
    )
    print(
        "per decode step: "
        + ", ".join(f"{side} {(ms[side] - ms['prefill']) / (L - 1):.2f}" for side in args.sides)
    )


def head_layouts(args) -> None:
    """The output layer's two BLAS layouts at a decode step's few rows, V = 32000 (the sft and 100m models'
    H): x (n, H) @ W.T, what nn.Linear runs, against W @ x.T (`rollout.vocab_major_output_layer`), ms per
    call, each call after a 64 MB write that evicts the weight from the caches, as a decode step's other
    weights do."""
    if args.threads:
        torch.set_num_threads(args.threads)
    evict = torch.zeros(16 * 2**20)
    rows = []
    for H in (256, 768):
        W = torch.randn(32000, H)
        for n in (1, 4, 8, 16, 32, 64):
            x = torch.randn(n, H)
            ms = {}
            for name, (a, b) in (("x @ W.T", (x, W.T)), ("W @ x.T", (W, x.T))):
                times = []
                for _ in range(args.repeats + 1):
                    evict.add_(1.0)
                    t0 = time.perf_counter()
                    torch.mm(a, b)
                    times.append((time.perf_counter() - t0) * 1e3)
                ms[name] = common.median(times[1:])
            rows.append(
                [H, n, f"{ms['x @ W.T']:.2f}", f"{ms['W @ x.T']:.2f}", f"{ms['x @ W.T'] / ms['W @ x.T']:.2f}"]
            )
    print(common.machine_line())
    print(common.markdown_table(["H", "rows", "x @ W.T ms", "W @ x.T ms", "ratio"], rows))


def batch_arg(text: str) -> tuple[int, int]:
    """`--batches` entry: "32" (32 rows, one completion per prompt) or "32x8" (4 prompts x 8 completions)."""
    rows, x, per_prompt = text.partition("x")
    if not rows.isdigit() or (x and not per_prompt.isdigit()):
        raise argparse.ArgumentTypeError(f"{text!r}: expected ROWS or ROWSxCOMPLETIONS, e.g. 8 or 32x8")
    rows, per_prompt = int(rows), int(per_prompt or 1)
    if rows < 1 or per_prompt < 1 or rows % per_prompt:
        raise argparse.ArgumentTypeError(f"{text!r}: rows must be a positive multiple of the completions")
    return rows, per_prompt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--new_tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--pair", action="store_true")  # internal: run one (model, batch) in this process
    parser.add_argument("--breakdown", action="store_true", help="time the pieces of one --model at --batch")
    parser.add_argument("--head", action="store_true", help="time the output layer's two layouts")
    parser.add_argument("--model", choices=MODELS)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--num_generations", type=int, default=1)
    parser.add_argument("--threads", type=int, help="torch threads for every model (default: THREADS)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=["embedded", "sft", "100m"])
    parser.add_argument("--sides", nargs="+", choices=SIDES, default=list(DEFAULT_SIDES))
    parser.add_argument(
        "--batches", nargs="+", type=batch_arg, help="rows or rows x completions, e.g. 8 32x8 (default: all)"
    )
    parser.add_argument("--device", default="cpu", help="e.g. cuda: the models and both sides run there")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    args = parser.parse_args()
    if (args.breakdown or args.head) and args.device != "cpu":
        parser.error("--breakdown and --head time the CPU only")
    if "generate" not in args.sides:
        parser.error("--sides: the ratios are to generate, which must be one of them")
    if args.pair:
        common.emit_result(pair(args))
        return
    if args.breakdown:
        breakdown(args)
        return
    if args.head:
        head_layouts(args)
        return

    models, batches = (("embedded",), ((8, 1), (8, 4))) if args.quick else (args.models, BATCHES)
    batches = args.batches or batches
    new_tokens, repeats = (8, 2) if args.quick else (args.new_tokens, args.repeats)
    print(common.machine_line())
    if args.device != "cpu":
        print(f"device: {args.device} ({torch.cuda.get_device_name(args.device)}), {args.dtype}")
    ours_sides = [side for side in args.sides if side != "generate"]
    header = ["model", "batch", *(f"{side} tok/s" for side in args.sides)]
    header += [f"{side} / generate" for side in ours_sides]
    header += ["compile s"] if "ours_compiled" in args.sides else []
    rows = []
    for name in models:
        for batch, G in batches:
            flags = ["--pair", "--model", name, "--batch", str(batch), "--num_generations", str(G)]
            flags += ["--new_tokens", str(new_tokens), "--repeats", str(repeats), "--sides", *args.sides]
            flags += ["--device", args.device, "--dtype", args.dtype]
            threads = args.threads or THREADS.get(name)
            flags += ["--threads", str(threads)] if threads else []
            with tempfile.TemporaryDirectory() as inductor_cache:
                os.environ["TORCHINDUCTOR_CACHE_DIR"] = inductor_cache
                result = common.run_side(__file__, flags)
            rates = result["rates"]
            # ratios per round (the sides of a round ran back to back), then their median
            ratio = {
                side: common.median([a / b for a, b in zip(rates[side], rates["generate"], strict=True)])
                for side in ours_sides
            }
            label = batch if G == 1 else f"{batch} ({batch // G} x {G})"
            rows.append(
                [name, label, *(f"{common.median(rates[side]):.0f}" for side in args.sides)]
                + [f"{ratio[side]:.2f}" for side in ours_sides]
                + ([f"{result['first_call_s']:.0f}"] if "ours_compiled" in args.sides else [])
            )
            print(common.markdown_table(header, rows[-1:]), flush=True)
    print()
    print(common.markdown_table(header, rows))
    print(common.machine_line())


if __name__ == "__main__":
    main()
