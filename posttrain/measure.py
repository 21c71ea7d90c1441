"""Measuring a training step: peak memory and the compute floor (used by `posttrain compare` and benchmarks/).

Notation: B batch, T time, H hidden, V vocab, I MLP intermediate size, L layers, N rows through the
output layer.

Peak memory is read from the kernel's own high-water mark (VmHWM, reset through /proc/self/clear_refs before
the steps) rather than sampled. The compute floor is the time the matrix multiplications a step cannot avoid
take at the matmul rate measured on this machine, in this process (`compute_floor`): `measured / floor` says
how much of a step is spent on anything else: skipped work done anyway, memory traffic, Python, the optimizer.
"""

from __future__ import annotations

import re
import time

import torch

# ---------------------------------------------------------------------------------------------------------
# Memory: resident set size of this process, in MiB
# ---------------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1))


def rss_mib() -> float:
    return _status_kib("VmRSS") / 1024


def reset_peak_rss() -> None:
    """Make the kernel's peak-RSS counter (VmHWM) restart from the current RSS (Linux >= 4.0)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def peak_rss_mib() -> float:
    return _status_kib("VmHWM") / 1024


class TensorPeak:
    """Context: the high-water mark of the bytes of live CPU tensors while open, above those alive on entry, in
    MiB (`.mib`, set on exit), from the profiler's allocation events. No allocator is involved: it is the peak a
    caching allocator would hold, where the RSS also counts what the C library's heap keeps in pieces around
    the tensors; the CPU's counterpart of the rise of torch.cuda.max_memory_allocated over the same code. The
    profiler slows what runs inside: time it elsewhere."""

    def __enter__(self):
        from torch.profiler import ProfilerActivity, profile

        self.mib, self._profile = None, profile(activities=[ProfilerActivity.CPU], profile_memory=True)
        self._profile.__enter__()
        return self

    def __exit__(self, *exc):
        self._profile.__exit__(*exc)
        events = [e for e in self._profile.profiler.kineto_results.events() if e.name() == "[memory]"]
        live = peak = 0
        for event in sorted(events, key=lambda e: e.start_ns()):
            live += event.nbytes()
            peak = max(peak, live)
        self.mib = peak / 2**20
        return False


def optimizer_state_mib(optimizer) -> float:
    """The bytes of an optimizer's state tensors (AdamW: the two moments and the step counts), in MiB."""
    return sum(t.nbytes for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)) / 2**20


# ---------------------------------------------------------------------------------------------------------
# The compute floor of a decoder-only transformer training step
# ---------------------------------------------------------------------------------------------------------


def linear_params_per_layer(config) -> int:
    """Weights of one decoder layer's matmuls: q, k, v, o projections and a gated MLP (gate, up, down)."""
    H, ffn = config.hidden_size, config.intermediate_size  # ffn: I in the notation
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q = o = H * config.num_attention_heads * head_dim
    kv = 2 * H * config.num_key_value_heads * head_dim
    return q + kv + o + 3 * H * ffn


def attention_width(config) -> int:
    """Width A of a layer's queries (and of its attention output): heads x head_dim."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return config.num_attention_heads * head_dim


def step_flops(config, batch_tokens: int, seq_len: int, head_tokens: int) -> dict[str, float]:
    """FLOPs of one forward + backward, by part (a multiply-add is 2 FLOPs; backward = 2 x forward):

        body = 6 * L * P_layer * B*T        P_layer = weights of one layer's linear maps (embeddings excluded)
        attn = 6 * L * T * A * B*T          causal QK^T and PV: 2 matmuls x 2 FLOPs x T*A / 2 (causal) x 3,
                                            A = heads x head_dim (H, unless head_dim is set apart, as Qwen3's)
        head = 6 * H * V * N                N = positions whose log-prob the loss needs (completion tokens)

    The attention term counts only the causal half of the score matrix (a causal kernel needs no more);
    PaLM's convention counts all of it (12 instead of 6): ~3% of this model's total either way.
    """
    L, H, V = config.num_hidden_layers, config.hidden_size, config.vocab_size
    return {
        "body": 6.0 * L * linear_params_per_layer(config) * batch_tokens,
        "attn": 6.0 * L * seq_len * attention_width(config) * batch_tokens,
        "head": 6.0 * H * V * head_tokens,
    }


def shared_prompt_step_flops(
    config, prompts: int, rows: int, prompt_len: int, completion_len: int, head_tokens: int
) -> dict[str, float]:
    """`step_flops` of `rows` sequences of prompt_len + completion_len tokens whose prompts are `prompts`
    distinct ones, each shared by rows / prompts rows (a prompt's sampled completions, a pair's chosen and
    rejected: `rl.logprobs.shared_prefix`): each prompt's P positions once, each row's C positions attending
    to its prompt and the completion before them (on average P + C / 2 keys, where `step_flops`' causal
    T / 2 would count T = 2P + C). prompts == rows gives `step_flops` of the rows whole."""
    prompt = step_flops(config, prompts * prompt_len, prompt_len, head_tokens=0)
    completion = step_flops(config, rows * completion_len, 2 * prompt_len + completion_len, head_tokens)
    return {part: prompt[part] + completion[part] for part in prompt}


def last_token_score_flops(config, batch_tokens: int, seq_len: int, rows: int) -> dict[str, float]:
    """FLOPs of one forward + backward of a sequence classifier that reads one position per row, its last
    token (a reward model: `posttrain.rl.last_token`), by part as `step_flops`: every layer but the last over
    all B*T tokens; the last layer's key and value maps over all of them (the last token attends to them),
    its query and output maps, MLP and one query's attention over T keys (2 x 2 x T*A, x 3) at the `rows`
    last tokens; the (1, H) score head at those. A forward alone is a third of each."""
    full = step_flops(config, batch_tokens, seq_len, head_tokens=0)
    L, H = config.num_hidden_layers, config.hidden_size
    kv = sum(k * m for k, m in layer_shapes(config)[1:3])
    at_last_token = linear_params_per_layer(config) - kv  # q, o and the MLP
    return {
        "body": full["body"] - 6.0 * at_last_token * (batch_tokens - rows),
        "attn": full["attn"] * (L - 1) / L + 12.0 * seq_len * attention_width(config) * rows,
        "head": 6.0 * H * rows,
    }


def linear_fwd_bwd_seconds(n: int, k: int, m: int, repeats: int = 5) -> float:
    """Seconds of the three fp32 matmuls of a linear map y = x @ w.T, x (n, k), w (m, k): forward
    x @ w.T (n, m); backward dy @ w (n, k) and dy.T @ x (m, k). The fastest of `repeats`: a floor is a
    lower bound, and other work on the machine can only slow a repeat down. Each product goes into a
    buffer allocated once: a fresh output of more than the allocator keeps would be faulted in and zeroed
    by the kernel at every call, which times the allocator, not the matmul."""
    x, w, dy = torch.randn(n, k), torch.randn(m, k), torch.randn(n, m)
    y, dx, dw = torch.empty(n, m), torch.empty(n, k), torch.empty(m, k)
    times = []
    for _ in range(repeats + 1):  # the first call warms up the BLAS threads and touches the buffers
        t0 = time.perf_counter()
        torch.mm(x, w.T, out=y)
        torch.mm(dy, w, out=dx)
        torch.mm(dy.T, x, out=dw)
        times.append(time.perf_counter() - t0)
    return min(times[1:])


def layer_shapes(config) -> list[tuple[int, int]]:
    """(in, out) of one decoder layer's linear maps: q, k, v, o projections and a gated MLP (gate, up, down)."""
    H, ffn = config.hidden_size, config.intermediate_size
    head_dim = getattr(config, "head_dim", None) or H // config.num_attention_heads
    q_out, kv_out = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    return [(H, q_out), (H, kv_out), (H, kv_out), (q_out, H), (H, ffn), (H, ffn), (ffn, H)]


def linear_forward_seconds(n: int, k: int, m: int, repeats: int = 5, calls: int = 10) -> float:
    """Seconds of the forward matmul of a linear map alone, x (n, k) @ w.T (m, k) -> (n, m): the forward-only
    parts of a step (generation, log-prob forwards without gradients). The same products can also be
    computed transposed, w @ x.T -> (m, n), which a CPU BLAS runs up to 4.5x faster at a few rows and a long
    m (a decode step's output layer: `rollout.vocab_major_output_layer` uses it), and oneDNN's matmul on a
    reordered weight runs them up to 3x faster than either where torch has it (`rollout.onednn_linears` uses
    it); the floor takes the fastest. Each is the fastest of `repeats` rounds of `calls` calls, per call (a
    decode step's matmuls of a few rows take microseconds: one call is below the timer's resolution), into a
    buffer allocated once (see `linear_fwd_bwd_seconds`; oneDNN's op allocates its own output)."""
    from posttrain.rl.rollout import PACK_ROWS, onednn_available

    x, w = torch.randn(n, k), torch.randn(m, k)
    y, yt = torch.empty(n, m), torch.empty(m, n)
    products = [lambda: torch.mm(x, w.T, out=y), lambda: torch.mm(w, x.T, out=yt)]
    if onednn_available(w):
        ops = torch.ops.mkldnn
        packed = ops._reorder_linear_weight(w, PACK_ROWS)  # the layout the engine makes (its cost left out)
        products.append(lambda: ops._linear_pointwise(x, packed, None, "none", [], ""))
    best = float("inf")
    for product in products:
        times = []
        for _ in range(repeats + 1):  # the first round warms up the BLAS threads and touches the buffers
            t0 = time.perf_counter()
            for _ in range(calls):
                product()
            times.append((time.perf_counter() - t0) / calls)
        best = min(best, *times[1:])
    return best


def compute_floor(
    config, batch_tokens: int, seq_len: int, head_tokens: int, repeats: int = 5, flops: dict | None = None
) -> dict:
    """The step's FLOPs (`step_flops`, or `flops` by part when given: `shared_prompt_step_flops`, whose body
    must be over batch_tokens) divided by matmul rates measured now, on the shapes the step uses.

    body rate: the matmuls of one decoder layer's linear maps at B*T rows (all of them, fwd + bwd);
    head rate: the output layer's at N rows. Attention runs at the body rate (it is ~3% of the work).
    Returns the FLOPs, the rates (FLOP/s) and `floor_s`, the step's floor in seconds."""
    H, V = config.hidden_size, config.vocab_size
    layer_s = sum(linear_fwd_bwd_seconds(batch_tokens, k, m, repeats) for k, m in layer_shapes(config))
    head_s = linear_fwd_bwd_seconds(head_tokens, H, V, repeats)
    flops = flops or step_flops(config, batch_tokens, seq_len, head_tokens)
    body_rate = 6.0 * linear_params_per_layer(config) * batch_tokens / layer_s
    head_rate = flops["head"] / head_s
    floor = (flops["body"] + flops["attn"]) / body_rate + flops["head"] / head_rate
    return {"flops": flops, "body_rate": body_rate, "head_rate": head_rate, "floor_s": floor}
