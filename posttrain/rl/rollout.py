"""The rollout engine: batched sampling of completions from any transformers causal LM, with a KV cache.

Notation: B prompts, G = num_generations, N = B * G rows (each prompt's G completions adjacent, TRL's order),
P longest prompt, L max_completion_length, V vocab, n rows still decoding.

Structure (gpt-fast's): `prefill` runs the B left-padded prompts once into a static KV cache of P + L positions
(transformers' `StaticCache`: written in place, never concatenated; a `DynamicCache` for a model it cannot
serve, see `_new_cache`), keeping only the last position's logits;
the cache is then repeated G times along the batch (prefill once per prompt, not once per row). Then one
decode step per new token on the rows still decoding: the forward of the fed tokens, then the next tokens
drawn. On the CPU the forward of a Llama-family model is rl/decode.py's step (the layer's math without
transformers' per-call bookkeeping; see its docstring for where it applies and what it gains), elsewhere
the model's own forward (`decode_one_token`). Left padding: the attention mask hides the pads and
`position_ids` count real tokens only, so a row's positions are those it would have unpadded. One
(n, P + L) mask serves every decode step (the completion's slots shown; the causal mask hides those not
written yet), so no step builds a mask of its own (rl/decode.py turns it into an additive one once per
batch).

Per step, on the device and without a host sync: `process_logits` (repetition penalty, temperature, top-k,
top-p, min-p: transformers' `generate` order and semantics), then `sample` (inverse CDF) or argmax. Every
`sync_every` steps the host reads which rows have stopped (the one host sync of the loop; default 4 on a GPU,
where a sync stalls the launch queue and a few steps of wasted work on finished rows is the cheaper side, and
1 on the CPU, where every op is synchronous anyway); if any has, the batch is compacted (`index_select` of the
cache, mask and positions), so a finished row costs no more work. Each step's tokens stay in the live batch's
order and are written to their output rows once per compaction; the mask (up to and including the first stop
token) is computed once at the end.

The linear maps: on the CPU, for the whole rollout (prefill and decode), every plain float32 nn.Linear with a
weight of at least ONEDNN_MIN_ELEMENTS and nothing attached computes its product through oneDNN on a copy of
its weight reordered once per rollout (`onednn_linears`; not with compile=True, not under autocast): torch's
own nn.Linear runs MKL, which on this AVX-512 AMD CPU runs at about half the rate (2-3x slower on a decode
step's few rows). Where oneDNN is missing or does not take the output layer, for a vocabulary of LARGE_VOCAB
tokens or more, a call of at most VOCAB_MAJOR_MAX_ROWS rows computes its logits transposed, (W @ h^T)^T, which
MKL runs 1.3-4.5x faster than nn.Linear's (n, H) @ (H, V) at 4-8 rows (`vocab_major_output_layer`; the product
is then copied to rows of V, 0.1-0.2 ms at (4-8, 32000), which leaves 1.3-3.4x). Either way the same products,
summed in another order: logits differ from nn.Linear's by float32 rounding.

`compile=True` runs `decode_one_token` (the forward, the logit processing and the sampling) through
`torch.compile` (inductor: fused C++ kernels on the CPU, Triton on a GPU), with the batch dim marked dynamic so
that compaction reuses the compiled step; a batch of one row, another architecture, another set of active
filters, or a batch crossing VOCAB_MAJOR_MAX_ROWS rows compiles once more. The first call pays the compilation
(on the shared 2-core CPU here, cold: 16-18 s for the embedded model at load 3-5, 30-60 s at load 7-9, more
for deeper models), which a run recovers only over many calls, and only where the forward is Python-bound
rather than matmul-bound: see benchmarks/rollout.py for the per-call gain and the break-even. Off by default.

Sampling by inverse CDF: softmax, cumsum, `searchsorted` of one uniform per row (`inverse_cdf`: for a large
vocabulary in two levels, blocks then tokens, as a cumsum over the whole vocabulary is a slow sequential scan).
On the CPU this is an order of magnitude cheaper than `torch.multinomial` over a 32k vocabulary (about 0.7 ms
against 15 ms for a (32, 32000) batch here, with the one-level cumsum), which costs more than a small model's
whole decode step. The uniforms are drawn for all N rows and all L steps up front and each live row picks its
own, so a row's tokens depend only on the seed, never on when the batch was compacted (up to float32 rounding:
from VOCAB_MAJOR_MAX_ROWS live rows down, the output layer's logits come from another BLAS call, and oneDNN
may choose its kernel by the row count).

Log-probs returned: log p(token) under the distribution the token was drawn from, i.e. softmax of the
processed logits (after repetition penalty, temperature and the top-k / top-p / min-p truncation,
renormalised over the kept tokens), what vLLM returns with `logprobs_mode="processed_logprobs"`. Without
truncation they equal the policy's log-probs at that temperature (`rl.logprobs.token_logprobs(...,
temperature=T)`); with truncation they do not, and losses should use the policy's full-vocabulary log-probs
(design.md). Greedy decoding (do_sample=False or temperature 0) takes the argmax of the penalised logits, as
`generate` does, and reports log-probs under the same processed distribution (temperature 0 read as 1).

The model (unwrapped from DDP / torch.compile) runs in eval mode (dropout off) under `torch.no_grad()`; its
training flag is restored after. The host syncs: one per `sync_every` steps, one at the end (the output's
width); on the CPU they cost nothing, on a GPU they bound how far the host runs ahead.
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Sequence
from typing import NamedTuple

import torch
from transformers import DynamicCache, StaticCache
from transformers.cache_utils import StaticLayer

from posttrain.rl import decode, distributed, stock
from posttrain.rl.distributed import unwrap
from posttrain.rl.stock import intercepted

SYNC_EVERY = {"cpu": 1}  # steps between host syncs by device type; others: DEFAULT_SYNC_EVERY
DEFAULT_SYNC_EVERY = 4


class Rollout(NamedTuple):
    """completion_ids (N, L') long, right-padded with pad_token_id; completion_mask (N, L') long, 1 up to and
    including the stop token; logps (N, L') float32, the sampler's log-probs (0 where the mask is 0);
    finished (N,) bool, True where the row stopped on a stop token rather than at max_completion_length.
    L' is the longest completion of the batch (<= max_completion_length)."""

    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    logps: torch.Tensor
    finished: torch.Tensor


# ---------------------------------------------------------------------------------------------------------
# Logit processing and sampling: pure functions of (n, V) tensors
# ---------------------------------------------------------------------------------------------------------


def process_logits(
    logits: torch.Tensor,
    *,
    seen: torch.Tensor | None = None,
    repetition_penalty: float = 1.0,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
) -> torch.Tensor:
    """Float32 scores (n, V) of the sampling distribution; removed tokens are -inf. In `generate`'s order:

    1. repetition penalty (CTRL, arXiv:1909.05858): a token in `seen` (n, V) bool, the row's prompt and
       completion so far, has its logit divided by the penalty if positive, multiplied if negative;
    2. temperature: scores / T;
    3. top-k: keep the tokens whose score is >= the k-th largest (ties at the k-th all kept);
    4. top-p (nucleus): sort ascending; drop the tokens whose cumulative probability is <= 1 - top_p,
       i.e. keep the smallest set of most likely tokens holding at least top_p of the mass;
    5. min-p (arXiv:2407.01082): drop the tokens whose probability is < min_p * the top token's.
    Each filter keeps at least the most likely token."""
    scores = logits.float()
    if seen is not None and repetition_penalty != 1.0:
        penalised = torch.where(scores < 0, scores * repetition_penalty, scores / repetition_penalty)
        scores = torch.where(seen, penalised, scores)
    if temperature != 1.0:
        scores = scores / temperature
    if top_k:
        kth = scores.topk(min(top_k, scores.shape[-1]), dim=-1).values[:, -1:]  # (n, 1)
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        ascending, order = scores.sort(dim=-1)
        drop = ascending.softmax(-1).cumsum(-1) <= 1 - top_p  # (n, V) in sorted order
        drop[:, -1] = False
        scores = scores.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    if min_p is not None:
        probs = scores.softmax(-1)
        scores = scores.masked_fill(probs < min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return scores


def sample(scores: torch.Tensor, uniform: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw one token per row of softmax(scores) (n, V) by inverse CDF with `uniform` (n,) in [0, 1), or take
    the argmax when `uniform` is None. Returns tokens (n,) long and their log-probs (n,) float32."""
    # One softmax serves the CDF and the log-probs: log of a probability is exact to float32 rounding for any
    # token that can be drawn (a probability that underflows to 0 adds nothing to the CDF, so is never drawn).
    probs = scores.softmax(-1)  # (n, V)
    tokens = scores.argmax(-1) if uniform is None else inverse_cdf(probs, uniform)
    return tokens, probs.gather(-1, tokens[:, None]).squeeze(1).log()


# From this vocabulary size on, sampling searches in two levels (`inverse_cdf`) and a CPU output layer runs
# vocab-major at a few rows (`vocab_major_output_layer`). Both pay only for a large vocabulary: below it a cumsum
# is cheap and the output layer's weight stays in the cache, where nn.Linear's own call is as fast or faster
# (one thread here, H = 256: vocab-major 1.2-1.6x slower for V = 512 to 8192, 1.4x faster at 32000; the
# two-level search 4x slower at V = 128, 1.3x faster at 8192, 2.7x at 32000).
LARGE_VOCAB = 16384
CDF_BLOCK = 128  # tokens per block of `inverse_cdf`'s first level


def inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """The first token (n,) long of each row of probs (n, V) whose cumulative probability exceeds u * total,
    u = uniform (n,) in [0, 1). From LARGE_VOCAB tokens on, in two levels: the block of CDF_BLOCK tokens from the
    blocks' cumulative sums, then the token from the cumulative sum inside that block. The same token as one
    cumsum over V, up to float32 rounding at the boundaries, for about a third of the cost at V = 32000: a
    cumsum is a sequential scan, (8, 32000) taking ~0.2 ms on one CPU thread here, while the block sums
    vectorise. Only a token of positive probability can be drawn: every search stops strictly below its last
    cumulative value."""
    n, V = probs.shape
    if V < LARGE_VOCAB:
        cdf = probs.cumsum(-1)  # (n, V)
        return _first_above(cdf, uniform[:, None] * cdf[:, -1:]).squeeze(1)
    if V % CDF_BLOCK:  # a ragged last block is zero-padded (a copy: a whole number of blocks needs none)
        probs = torch.nn.functional.pad(probs, (0, -V % CDF_BLOCK))
    blocks = probs.view(n, -1, CDF_BLOCK)  # (n, K, BLOCK)
    block_cdf = blocks.sum(-1).cumsum(-1)  # (n, K)
    u = uniform[:, None] * block_cdf[:, -1:]  # (n, 1)
    k = _first_above(block_cdf, u)  # (n, 1): the block
    before = torch.where(k > 0, block_cdf.gather(-1, (k - 1).clamp(min=0)), 0.0)  # the mass before block k
    inside = blocks.gather(1, k[:, :, None].expand(n, 1, CDF_BLOCK)).squeeze(1).cumsum(-1)  # (n, BLOCK)
    return (k * CDF_BLOCK + _first_above(inside, u - before)).squeeze(1)


def _first_above(cdf: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Index (n, 1) of the first entry of each row of cdf (n, m) above target (n, 1), with the target held
    strictly below the row's last entry (rounding can put it there): an index whose increment is positive."""
    last = cdf[:, -1:]
    return torch.searchsorted(
        cdf, torch.minimum(target, torch.nextafter(last, torch.zeros_like(last))), right=True
    )


# ---------------------------------------------------------------------------------------------------------
# The model steps
# ---------------------------------------------------------------------------------------------------------


def _cache_name(forward_owner: type) -> str | None:
    """The forward's name for the cache, None for a forward that passes **kwargs on (peft's) or a callable
    wrapper with no forward (`lora.AdapterDisabled`): their base model's name then."""
    if not hasattr(forward_owner, "forward"):
        return None
    params = inspect.signature(forward_owner.forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


# filled by the eager prefill, read by a compiled step as a constant
_CACHE_NAMES: dict[type, str | None] = {}


def cache_kwarg(model, cache) -> dict:
    """The forward's keyword for a KV cache: transformers renamed `past_key_values` to `cache` in 5.x (releases
    up to at least 5.17 take the old name and silently drop an unknown `cache=`; later ones warn on the old).
    A wrapper whose forward passes **kwargs on (peft) takes its base model's name."""
    kind = type(model)
    if kind not in _CACHE_NAMES:
        _CACHE_NAMES[kind] = _cache_name(kind)
    if _CACHE_NAMES[kind] is not None:
        return {_CACHE_NAMES[kind]: cache}
    if hasattr(model, "get_base_model"):
        return cache_kwarg(model.get_base_model(), cache)
    from transformers import LlamaForCausalLM  # the name transformers' own models take

    return {_cache_name(LlamaForCausalLM): cache}


def prefill(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor, cache
) -> tuple[torch.Tensor, torch.Tensor]:
    """Run the left-padded prompts (B, P) once into `cache`. Returns the last position's logits (B, V) and the
    last position id of each row (B,)."""
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    # the prompt's other positions need no logits; a model without `logits_to_keep` computes them all
    keep = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        **cache_kwarg(model, cache),
        use_cache=True,
        **keep,
    )
    return out.logits[:, -1], position_ids[:, -1]


def next_token(logits, seen, uniform, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (n,) and their log-probs (n,) from logits (n, V): `process_logits` then `sample`."""
    return sample(process_logits(logits, seen=seen, **settings), uniform)


def decode_one_token(model, tokens, positions, attention_mask, cache, seen, uniform, settings: dict):
    """One step for n rows: feed tokens (n,) at positions (n,), then draw the next ones. attention_mask
    (n, P + L) spans a static cache (a dynamic one: its columns up to this token); `seen` (n, V) gets the fed
    tokens (repetition penalty). Returns the next tokens (n,) and their log-probs (n,); the cache takes the fed
    tokens' keys and values."""
    out = model(
        input_ids=tokens[:, None],
        attention_mask=attention_mask,
        position_ids=positions[:, None],
        **cache_kwarg(model, cache),
        use_cache=True,
    )
    return fed_then_next(out.logits[:, -1], tokens, seen, uniform, settings)


def fed_then_next(logits, fed, seen, uniform, settings: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """`next_token` from logits (n, V), `seen` (n, V) first given the fed tokens (n,)."""
    if seen is not None:
        seen.scatter_(1, fed[:, None], True)
    return next_token(logits, seen, uniform, settings)


# Compiled on first use. The parameters are graph inputs, so another model of the same architecture (or the
# same model after an optimizer step) reuses the graph; another architecture, another set of active filters
# (top-k on or off, greedy or sampled, ...) or a batch of one row compiles once more. The batch dim is marked
# dynamic (`_mark_batch_dynamic`), so compaction reuses the graph.
compiled_decode_one_token = torch.compile(decode_one_token)


# ---------------------------------------------------------------------------------------------------------
# generate
# ---------------------------------------------------------------------------------------------------------


def generate(
    model,
    prompt_ids: list[list[int]],
    *,
    num_generations: int = 1,
    max_completion_length: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float = 1.0,
    do_sample: bool = True,
    eos_token_id: int | Sequence[int] | None,
    stop_token_ids: Sequence[int] = (),
    pad_token_id: int,
    generator: torch.Generator | None = None,
    sync_every: int | None = None,
    compile: bool = False,
) -> Rollout:
    """`num_generations` completions of each prompt (token ids, no padding), each prompt's adjacent.

    A row stops at its first token in eos_token_id or stop_token_ids, or after max_completion_length
    tokens. Sampling draws its uniforms from `generator` (the default generator when None): the same seed
    gives the same tokens. `sync_every`: steps between the checks for stopped rows (None: 1 on the CPU, where
    every op is synchronous anyway, 4 elsewhere). `compile`: run the decode step through `torch.compile`
    (see the module docstring for its cost and gain). See the module docstring for the log-probs returned."""
    model = unwrap(model)  # generation runs outside DDP / torch.compile wrappers
    _check_options(
        num_generations,
        max_completion_length,
        temperature,
        top_k,
        top_p,
        min_p,
        repetition_penalty,
        sync_every,
    )
    embedding = model.get_input_embeddings()
    device = embedding.weight.device
    sync_every = sync_every or SYNC_EVERY.get(device.type, DEFAULT_SYNC_EVERY)
    _check_prompts(prompt_ids, embedding.num_embeddings, _context_length(model), max_completion_length)
    stops = [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id or [])
    stops = torch.tensor(stops + list(stop_token_ids), dtype=torch.long, device=device)
    greedy = not do_sample or temperature == 0
    settings = dict(
        repetition_penalty=repetition_penalty,
        temperature=1.0 if temperature == 0 else temperature,
        top_k=top_k,
        top_p=top_p,
        min_p=min_p,
    )
    step = compiled_decode_one_token if compile else decode_one_token
    was_training = model.training
    model.eval()
    try:
        # FSDP2: ranks decode different lengths, so the weights are gathered once for the whole rollout; oneDNN
        # before vocab-major, which leaves a head oneDNN took alone; not for a compiled step (dynamo would trace
        # the reordered weights), which runs nn.Linear (MKL) in its prefill too
        onednn = onednn_linears(model) if step is decode_one_token else contextlib.nullcontext()
        # a decoder compiled for training (torch_compile) runs its own forward here
        with (
            torch.no_grad(),
            stock.eager(model),
            distributed.gathered(model),
            onednn,
            vocab_major_output_layer(model),
        ):
            return _rollout(
                model, prompt_ids, num_generations, max_completion_length, settings, greedy, stops,
                pad_token_id, generator, sync_every, device, step,
            )  # fmt: skip
    finally:
        model.train(was_training)


def _rollout(
    model, prompt_ids, G, L, settings, greedy, stops, pad, generator, sync_every, device, step
) -> Rollout:
    N = len(prompt_ids) * G
    input_ids, prompt_mask = _left_pad(prompt_ids, pad, device)  # (B, P)
    P = input_ids.shape[1]
    cache = _new_cache(model, P + L)
    static = isinstance(cache, StaticCache)
    if step is compiled_decode_one_token and not static:
        raise ValueError(
            f"compile=True needs a model whose cache transformers can preallocate (StaticCache, full attention "
            f"only); {type(model).__name__} cannot: use compile=False"
        )
    logits, positions = prefill(model, input_ids, prompt_mask, cache)
    # the Llama family's own decode step where it applies (rl/decode.py), else the model's forward
    lean = (
        decode.LlamaDecodeStep(model, cache, P, P + L)
        if step is decode_one_token and decode.supports(model, cache)
        else None
    )
    # prefill ran once per prompt: repeat everything G times along the batch, each prompt's rows adjacent
    _select_rows(cache, torch.arange(len(prompt_ids), device=device).repeat_interleave(G))
    logits, positions, prompt_mask = (x.repeat_interleave(G, 0) for x in (logits, positions, prompt_mask))
    # One mask for every decode step, over the whole static cache: the prompt's pads hidden, the completion's
    # slots shown (the causal mask hides those not written yet), so no step builds a new mask. A dynamic cache
    # takes its first P + t columns at step t.
    attention_mask = torch.cat([prompt_mask, prompt_mask.new_ones(N, L)], dim=1)  # (n, P + L)
    V = logits.shape[-1]
    seen = None  # (n, V) bool: tokens of the row's prompt (pads excluded) and completion so far
    if settings["repetition_penalty"] != 1.0:
        ids = input_ids.repeat_interleave(G, 0).clamp(max=V).masked_fill(prompt_mask == 0, V)  # pads: V
        seen = torch.zeros(N, V + 1, dtype=torch.bool, device=device).scatter_(1, ids, True)
        seen = seen[:, :V].contiguous()
    # All the uniforms at once, on the generator's own device (a CPU generator serves a GPU model without a
    # copy per step): (L, n), row t for step t, column i for live row i (compaction selects columns), so a
    # row's tokens depend only on the seed, never on when the batch was compacted (up to float32 rounding).
    uniforms = None
    if not greedy:
        source = generator.device if generator is not None else device
        uniforms = torch.rand(L, N, generator=generator, device=source).to(device)

    # The tokens and log-probs of each step are kept in the live batch's order and written to the output rows
    # once per compaction (a segment), not scattered every step.
    segments = []  # (output rows (n,), first step, tokens (n, k), log-probs (n, k))
    rows, first, step_tokens, step_logps = torch.arange(N, device=device), 0, [], []
    tokens, token_logps = next_token(logits, seen, None if greedy else uniforms[0], settings)
    done = torch.isin(tokens, stops)  # (n,) stopped at some step of the current segment
    for t in range(1, L + 1):
        step_tokens.append(tokens)
        step_logps.append(token_logps)
        if t == L:
            break
        if t % sync_every == 0:
            keep = (~done).nonzero().squeeze(1)  # the host sync: which rows still decode
            if len(keep) == 0:
                break
            if len(keep) < len(done):  # drop the stopped rows from the batch and the cache
                segments.append((rows, first, torch.stack(step_tokens, 1), torch.stack(step_logps, 1)))
                first, step_tokens, step_logps = t, [], []
                _select_rows(cache, keep)
                rows, done, tokens, positions, attention_mask = (
                    x[keep] for x in (rows, done, tokens, positions, attention_mask)
                )
                seen = None if seen is None else seen[keep]
                uniforms = None if uniforms is None else uniforms[:, keep]
        uniform = None if greedy else uniforms[t]
        positions = positions + 1
        if step is compiled_decode_one_token:
            _mark_batch_dynamic(tokens, positions, attention_mask, seen, uniform, cache=cache)
        if lean is not None:
            logits = lean(tokens, positions, attention_mask)
            tokens, token_logps = fed_then_next(logits, tokens, seen, uniform, settings)
        else:
            mask = attention_mask if static else attention_mask[:, : P + t]
            tokens, token_logps = step(model, tokens, positions, mask, cache, seen, uniform, settings)
        done = done | torch.isin(tokens, stops)
    segments.append((rows, first, torch.stack(step_tokens, 1), torch.stack(step_logps, 1)))
    return _assemble(segments, N, L, stops, pad, device)


def _assemble(segments, N: int, L: int, stops, pad: int, device) -> Rollout:
    """The Rollout from the segments' tokens and log-probs: each row keeps its tokens up to and including its
    first stop token (a row decodes past it until the next sync), pads after."""
    completion_ids = torch.full((N, L), pad, dtype=torch.long, device=device)
    logps = torch.zeros(N, L, dtype=torch.float32, device=device)
    written = torch.zeros(N, L, dtype=torch.bool, device=device)
    for rows, first, tokens, token_logps in segments:
        last = first + tokens.shape[1]
        completion_ids[rows, first:last] = tokens
        logps[rows, first:last] = token_logps
        written[rows, first:last] = True
    is_stop = torch.isin(completion_ids, stops) & written
    mask = written & (is_stop.cumsum(-1) - is_stop.long() == 0)  # (N, L) up to and including the first stop
    length = int(mask.sum(-1).max())  # the longest completion: trim the columns no row reached
    mask = mask[:, :length]
    return Rollout(
        completion_ids[:, :length].masked_fill(~mask, pad).contiguous(),
        mask.long(),
        logps[:, :length].masked_fill(~mask, 0.0).contiguous(),
        (is_stop[:, :length] & mask).any(-1),
    )


# Up to this many rows per call the output layer runs vocab-major (see `vocab_major_output_layer`).
VOCAB_MAJOR_MAX_ROWS = 8


# oneDNN's matmul (torch.ops.mkldnn._linear_pointwise, the op inductor's weight-prepacking passes use for CPU
# linears) for a rollout's linear maps, on weights reordered once per rollout (`onednn_linears`). torch's CPU
# builds run nn.Linear through MKL, which on the AMD EPYC with AVX-512 here runs at about two cores' AVX2 rate,
# oneDNN at about their AVX-512 rate (`python benchmarks/gemm.py`): 2-3x on a decode step's products (the sft
# model's decode step at 8 / 32 rows: 3.73 -> 2.37 / 8.76 -> 4.03 ms), ~2.5x on a prefill's. Its call costs
# ~10 us more than torch.mm's, so small weights keep nn.Linear: at 8 rows a (128, 128) weight took 12 us against
# 5, (256, 256) 14 against 12-15, (1024, 256) 22-32 against 45-60 (one or two threads). Measured on this one
# machine only: on a CPU where MKL runs at full rate (Intel's) the gain may be small; ONEDNN = False turns it off.
ONEDNN = True
ONEDNN_MIN_ELEMENTS = 2**17
PACK_ROWS = 8  # the row count a weight is laid out for; it serves any count (1 to 1024 rows measured)


def onednn_available(weight: torch.Tensor) -> bool:
    """Whether oneDNN's matmul can take `weight`: a plain float32 CPU tensor, in a torch built with oneDNN and
    with it enabled (`torch.backends.mkldnn.flags`)."""
    ops = torch.ops.mkldnn
    return (
        type(weight.data) is torch.Tensor  # not a DTensor or a quantized subclass
        and weight.device.type == "cpu"
        and weight.dtype == torch.float32
        and torch.backends.mkldnn.is_available()
        and torch.backends.mkldnn.enabled
        and hasattr(ops, "_linear_pointwise")
        and hasattr(ops, "_reorder_linear_weight")
    )


@contextlib.contextmanager
def onednn_linears(model):
    """While open, every plain `nn.Linear` of `model` with a weight of at least ONEDNN_MIN_ELEMENTS that oneDNN
    can take and nothing attached (no hook, no accelerate hook, no forward of its own) computes its product by
    oneDNN on a copy of its weight reordered on entry: one more copy of those weights while open (a tied
    output layer's too), rebuilt on every entry, so an optimizer step between two rollouts is seen by the next.
    Forward only: the op has no gradient, so nothing may train the model while this is open (another thread
    included). Not under CPU autocast (nn.Linear computes in its dtype there) nor for a model compiled in place.
    Logits differ from nn.Linear's by float32 rounding. ONEDNN = False leaves the model as it is."""
    patched = []
    skip = (
        not ONEDNN
        or torch.is_autocast_enabled("cpu")
        or getattr(model, "_compiled_call_impl", None) is not None
    )
    try:
        for linear in () if skip else model.modules():
            if (
                type(linear) is torch.nn.Linear
                and linear.weight.numel() >= ONEDNN_MIN_ELEMENTS
                and not intercepted(linear)
                and onednn_available(linear.weight)
            ):
                linear.forward = _onednn_forward(linear)
                patched.append(linear)
        yield
    finally:  # also when a reorder fails half-way: a forward left behind would train on a stale copy
        for linear in patched:
            del linear.forward


def _onednn_forward(linear: torch.nn.Linear):
    ops = torch.ops.mkldnn
    weight, bias = ops._reorder_linear_weight(linear.weight.detach(), PACK_ROWS), linear.bias

    def forward(x: torch.Tensor) -> torch.Tensor:  # (..., in) -> (..., out)
        if x.dtype != torch.float32:  # what nn.Linear would do with it (an error, or autocast's product)
            return torch.nn.functional.linear(x, linear.weight, linear.bias)
        return ops._linear_pointwise(x, weight, bias, "none", [], "")

    return forward


@contextlib.contextmanager
def vocab_major_output_layer(model):
    """While open, a CPU model's output layer (a plain `nn.Linear` of V >= LARGE_VOCAB outputs) computes the
    logits of a call of at most VOCAB_MAJOR_MAX_ROWS rows as (W @ h^T)^T: the same products, another BLAS call.
    At 4-8 rows (a decode step of at most 8 live rows: a group of 8 completions, the tail of a larger batch)
    the CPU BLAS here runs (V, H) @ (H, n) 1.3-2.4x faster than (n, H) @ (H, V) on one thread, 2.2-4.5x on two;
    from 16 rows on, one thread, it is up to 12% slower (V = 32000, H = 256 and 768, the weight out of the
    cache: `python benchmarks/rollout.py --head`). The two calls sum in another order (logits differ by float32
    rounding). The (V, n) product is copied to (n, V) rows (0.19 ms at (8, 32000), two threads: the gain above
    is the matmul's alone). Elsewhere (a GPU, a smaller vocabulary, another kind of output layer, one whose
    forward is already replaced on the instance, as accelerate's hooks, `onednn_linears` (faster still) or an
    enclosing use of this context do) the model is left as it is."""
    head = model.get_output_embeddings()
    if (
        type(head) is not torch.nn.Linear
        or head.weight.device.type != "cpu"
        or head.out_features < LARGE_VOCAB
        or "forward" in head.__dict__
    ):
        yield
        return
    linear = head.forward

    def forward(hidden: torch.Tensor) -> torch.Tensor:  # (..., H) -> (..., V)
        flat = hidden.reshape(-1, hidden.shape[-1]).t()  # (H, n)
        if flat.shape[1] > VOCAB_MAJOR_MAX_ROWS:
            return linear(hidden)
        logits = (
            torch.mm(head.weight, flat)
            if head.bias is None
            else torch.addmm(head.bias[:, None], head.weight, flat)
        )
        # rows of V: a softmax over the rows of the transposed view took 0.9 ms at (8, 32000) here, the copy
        # 0.19 ms plus a softmax over contiguous rows 0.05 ms
        return logits.t().contiguous().reshape(*hidden.shape[:-1], logits.shape[0])

    head.forward = forward
    try:
        yield
    finally:
        del head.forward


def _new_cache(model, length: int):
    """transformers' StaticCache of `length` positions (written in place, never concatenated) where the model
    supports it and every layer is full attention; a DynamicCache otherwise (the one constant decode mask is
    right for full attention only; sliding-window and linear-attention layers keep their own bookkeeping)."""
    if getattr(model, "_can_compile_fullgraph", False):
        cache = StaticCache(config=model.config, max_cache_len=length)
        if all(type(layer) is StaticLayer for layer in cache.layers):
            return cache
    return DynamicCache(config=model.config)


def _select_rows(cache, index: torch.Tensor) -> None:
    """Keep the cache rows `index` (n',), in that order: one op for repeating and for compacting. transformers'
    static layers have no batch selection of their own; every dynamic layer kind has."""
    if not isinstance(cache, StaticCache):
        cache.batch_select_indices(index)
        return
    for layer in cache.layers:
        layer.keys, layer.values = layer.keys.index_select(0, index), layer.values.index_select(0, index)


def _mark_batch_dynamic(*tensors, cache) -> None:
    """Mark dim 0 (the batch: it shrinks as rows finish) of every decode input dynamic, so that compaction
    reuses the compiled step instead of compiling one per batch size."""
    for x in [*tensors, *(x for layer in cache.layers for x in (layer.keys, layer.values))]:
        if x is not None:
            torch._dynamo.maybe_mark_dynamic(x, 0)


def training_batch(
    prompt_ids: list[list[int]], rollout: Rollout, *, num_generations: int, pad_token_id: int
) -> dict:
    """The rows prompt + completion as a batch for `rl.logprobs.token_logprobs`, in TRL's layout: prompts
    left-padded, completions right-padded, side by side. input_ids, attention_mask, position_ids (counting real
    tokens only, so that absolute-position models see each row as if unpadded) and completion_mask, each
    (N, P + L'); the completion tokens are the targets."""
    prompts, prompt_mask = _left_pad(prompt_ids, pad_token_id, rollout.completion_ids.device)  # (B, P)
    prompts, prompt_mask = (
        prompts.repeat_interleave(num_generations, 0),
        prompt_mask.repeat_interleave(num_generations, 0),
    )
    if len(prompts) != len(rollout.completion_ids):
        raise ValueError(
            f"training_batch: {len(prompt_ids)} prompts x num_generations {num_generations} != "
            f"{len(rollout.completion_ids)} rollout rows"
        )
    attention_mask = torch.cat([prompt_mask, rollout.completion_mask], dim=1)
    return {
        "input_ids": torch.cat([prompts, rollout.completion_ids], dim=1),
        "attention_mask": attention_mask,
        "position_ids": (attention_mask.cumsum(-1) - 1).clamp(min=0),
        "completion_mask": torch.cat([torch.zeros_like(prompt_mask), rollout.completion_mask], dim=1),
    }


def _left_pad(prompt_ids: list[list[int]], pad: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompts as input_ids (B, P) padded on the left with `pad`, and their attention mask (B, P)."""
    P = max(len(p) for p in prompt_ids)
    input_ids = torch.full((len(prompt_ids), P), pad, dtype=torch.long)
    attention_mask = torch.zeros(len(prompt_ids), P, dtype=torch.long)
    for i, p in enumerate(prompt_ids):
        input_ids[i, P - len(p) :] = torch.tensor(p, dtype=torch.long)
        attention_mask[i, P - len(p) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _context_length(model) -> int | None:
    return getattr(model.config, "max_position_embeddings", None)


def _check_options(G, L, temperature, top_k, top_p, min_p, repetition_penalty, sync_every) -> None:
    problems = [
        (not isinstance(G, int) or G < 1, f"num_generations must be an integer >= 1, got {G!r}"),
        (not isinstance(L, int) or L < 1, f"max_completion_length must be an integer >= 1, got {L!r}"),
        (temperature < 0, f"temperature must be >= 0, got {temperature!r}"),
        (top_k is not None and top_k < 0, f"top_k must be >= 0 (0 or None: no top-k), got {top_k!r}"),
        (top_p is not None and not 0 < top_p <= 1, f"top_p must be in (0, 1], got {top_p!r}"),
        (min_p is not None and not 0 <= min_p <= 1, f"min_p must be in [0, 1], got {min_p!r}"),
        (repetition_penalty <= 0, f"repetition_penalty must be > 0, got {repetition_penalty!r}"),
        (
            sync_every is not None and (not isinstance(sync_every, int) or sync_every < 1),
            f"sync_every must be an integer >= 1, got {sync_every!r}",
        ),
    ]
    for bad, message in problems:
        if bad:
            raise ValueError(message)


def _check_prompts(prompt_ids, vocab_size: int, context: int | None, L: int) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("prompt_ids is empty: nothing to generate from")
    for i, p in enumerate(prompt_ids):
        if len(p) == 0:
            raise ValueError(f"prompt_ids row {i} is empty: a prompt needs at least one token")
        bad = [t for t in p if not 0 <= t < vocab_size]
        if bad:
            raise ValueError(
                f"prompt_ids row {i}: token id {bad[0]} outside the model's vocabulary [0, {vocab_size})"
            )
        if context is not None and len(p) + L > context:
            raise ValueError(
                f"prompt_ids row {i}: {len(p)} prompt tokens + max_completion_length {L} exceed the model's "
                f"context of {context} positions (max_position_embeddings)"
            )
