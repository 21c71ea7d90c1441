"""A decode step for the Llama family, written against the model's own modules and weights.

Notation: n rows decoding, H hidden, h_q / h_kv query and key-value heads, D head dim, S cache slots written.

transformers' forward of one new token per row is built for every case (any mask, any cache, training): each
call builds a 4-D mask, recomputes the rotary angles, books the cache, repeats or reshapes the key-value heads
for SDPA and calls SDPA's CPU flash kernel (~90 us a layer at 8 rows here, for a few hundred thousand FLOPs).
At a few rows that overhead is a large part of a decode step, whose matmuls read a few MB of weights for a few rows
of arithmetic. `LlamaDecodeStep` does the layer's math and nothing else:

    x = rms_norm(h)                                         input_layernorm
    q, k, v = x W_q^T (+ b_q), x W_k^T (+ b_k), x W_v^T (+ b_v)     Qwen3: rms_norm of q, k over D
    q, k = rope(q), rope(k)                                 cos / sin from a table the model's rotary module
                                                            made once for every position of the rollout
    cache[:, :, slot] = k, v                                written in place (transformers' StaticCache)
    a = softmax((q * scaling) K^T + mask) V                 over the S slots written so far, in float32; the
                                                            mask (built once per batch) hides the left pads
    h = h + a W_o^T                                         o_proj
    h = h + down(act(gate(x')) * up(x')),  x' = rms_norm(h) post_attention_layernorm, mlp
    logits = lm_head(rms_norm(h))

The model's own tensors and modules (no copy of its own: an optimizer step between two rollouts needs
nothing refreshed; the projections, activation, embedding and output layer are called as modules, so their
hooks run; inside a rollout the large linear maps run oneDNN's matmul on copies that `rollout.onednn_linears`
rebuilds per rollout), the same ops in the same order, but for two: `torch.nn.functional.rms_norm` in place
of the norm module's ops (in half precision it rounds once where the module rounds twice: an ulp), and attention as two
small matmuls and a float32 softmax in place of SDPA. Logits agree with the model's forward to float32
rounding (tests/test_decode.py: every supported family, biases, norm weights and rope scalings random).
Measured on the shared 2-core CPU, quiet, one step's logits (the output layer as `rollout.generate` runs it
included), the model's forward -> this step, medians of 7 rounds of 30 calls: benchmarks/rollout.py's sft model
(V = 32000, H = 256, 4 layers, two threads) 4.71 -> 3.82 ms at 8 rows, 11.29 -> 9.71 ms at 32; the embedded
model (V = 128, H = 128, 3 layers, one thread) 0.91 -> 0.56 ms at 8 rows, 1.43 -> 0.94 ms at 32. The same
comparison, one call per round inside the rollout benchmark: `python benchmarks/rollout.py --breakdown --model
sft --batch 8` (4.39 -> 3.51 ms at 8 rows, 11.6 -> 10.4 ms at 32).

`supports(model, cache)` says where it applies: on the device types in DEVICES (the CPU and CUDA), a model of exactly one of FAMILIES with the decoder modules transformers builds for it (a peft, FSDP or other wrapper, a subclass,
a swapped-in kernel module, or a forward hook on a module whose forward the step does not call takes the
model's own forward), plain `nn.Linear` projections, every layer full attention in a static cache
(transformers gives a sliding-window layer a cache of its own kind; Mistral masks by its window whatever
the layer types say, so a Mistral with a window is refused), and a rotary embedding whose angles depend on
the position alone (not the dynamic or long-rope kinds, which rescale with the sequence length).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import StaticCache
from transformers.cache_utils import StaticLayer

from posttrain.rl.stock import from_transformers, global_hooks, intercepted, rescaled_rope

# Model classes whose decoder layer is the one above (Qwen3 adds the per-head q / k norms).
FAMILIES = ("LlamaForCausalLM", "MistralForCausalLM", "Qwen2ForCausalLM", "Qwen3ForCausalLM")
# Device types where the step was measured faster than the model's forward (benchmarks/rollout.py --device
# times both elsewhere by adding a type here for the run). CUDA: an H200, bf16, Qwen2.5-0.5B's shapes, 64 new
# tokens: 1.55x `model.generate`'s tokens/s at 8 rows, 1.57x at 64, 1.77x at 4 prompts x 8, where the model's
# own forward in the same engine gives 0.94-0.97x (results.md "Session 16").
DEVICES = {"cpu", "cuda"}


def supports(model, cache) -> bool:
    """`LlamaDecodeStep` computes `model`'s forward into `cache`."""
    if type(model).__name__ not in FAMILIES or not from_transformers(model):
        return False
    inner, config = model.model, model.config
    if (
        inner.embed_tokens.weight.device.type not in DEVICES
        or len(set((getattr(model, "hf_device_map", None) or {}).values())) > 1
    ):
        return False
    if type(model).__name__ == "MistralForCausalLM" and getattr(config, "sliding_window", None) is not None:
        return False
    if not isinstance(cache, StaticCache) or len(cache.layers) != len(inner.layers):
        return False
    if any(type(layer) is not StaticLayer for layer in cache.layers):
        return False  # full attention in every layer, each layer's keys and values written in place
    if rescaled_rope(inner.rotary_emb):
        return False
    # modules whose forward the step replaces: transformers' own, with nothing attached to them
    bypassed = [model, inner, inner.norm, inner.rotary_emb] + [
        m
        for layer in inner.layers
        for m in (layer, layer.self_attn, layer.mlp, layer.input_layernorm, layer.post_attention_layernorm,
                  *((layer.self_attn.q_norm, layer.self_attn.k_norm) if hasattr(layer.self_attn, "q_norm") else ()))
    ]  # fmt: skip
    if not all(from_transformers(m) and not intercepted(m) for m in bypassed) or global_hooks():
        return False
    linears = [model.lm_head] + [
        m
        for layer in inner.layers
        for m in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj,
                  layer.self_attn.o_proj, layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj)
    ]  # fmt: skip
    return all(type(m) is torch.nn.Linear for m in linears)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x (..., D) rotated by angles whose cos / sin broadcast to it: the two halves, as transformers'
    apply_rotary_pos_emb, op for op."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), -1) * sin


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin (..., D) with its first half negated, for `rope_signed`."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), -1)


def rope_signed(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`rope` with the sign of the rotated half moved from x onto a table made once (`signed_sin`): the same
    numbers ((-a) b = a (-b) exactly), two ops fewer (10 us against 17 a call at 8 rows x 4 heads x 64)."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin_signed


class LlamaDecodeStep:
    """Feeds one token per row into slots first_slot, first_slot + 1, ... of `cache` (filled up to first_slot
    by the prefill) and returns the next position's logits. `length`: the cache's slots (prompt + completion).
    """

    def __init__(self, model, cache, first_slot: int, length: int):
        self.model, self.cache, self.slot = model, cache, first_slot
        self._mask, self._bias = None, None  # the attention mask last seen and its additive form
        inner = model.model
        weight = inner.embed_tokens.weight
        # the model's own rotary module, once for every position of the rollout: (length, D) each
        cos, sin = inner.rotary_emb(weight[:1], torch.arange(length, device=weight.device)[None])
        self.cos, self.sin = cos[0], signed_sin(sin[0])

    def __call__(self, tokens: torch.Tensor, positions: torch.Tensor, attention_mask: torch.Tensor):
        """tokens (n,) fed at positions (n,) into the next slot; attention_mask (n, length) long, 0 at the
        prompts' pads. Returns the logits (n, V)."""
        inner, S = self.model.model, self.slot + 1
        n = tokens.shape[0]
        if attention_mask is not self._mask:  # a new batch (compaction selects rows of the mask)
            bias = torch.zeros(attention_mask.shape, device=tokens.device)
            self._mask, self._bias = attention_mask, bias.masked_fill_(attention_mask == 0, float("-inf"))
        bias = self._bias[:, None, None, :S]  # (n, 1, 1, S)
        cos, sin = self.cos[positions][:, None], self.sin[positions][:, None]  # (n, 1, D); sin signed

        def rms_norm(x, norm):
            return F.rms_norm(x, (x.shape[-1],), norm.weight, norm.variance_epsilon)

        h = inner.embed_tokens(tokens)  # (n, H)
        for layer, cached in zip(inner.layers, self.cache.layers, strict=True):
            attn, mlp = layer.self_attn, layer.mlp
            x = rms_norm(h, layer.input_layernorm)
            q = attn.q_proj(x).view(n, -1, attn.head_dim)  # (n, h_q, D)
            k = attn.k_proj(x).view(n, -1, attn.head_dim)  # (n, h_kv, D)
            if hasattr(attn, "q_norm"):  # Qwen3
                q, k = rms_norm(q, attn.q_norm), rms_norm(k, attn.k_norm)
            cached.keys[:, :, self.slot] = rope_signed(k, cos, sin)
            cached.values[:, :, self.slot] = attn.v_proj(x).view(n, -1, attn.head_dim)
            keys, values = cached.keys[:, :, :S], cached.values[:, :, :S]  # (n, h_kv, S, D)
            h_kv = keys.shape[1]
            # (n, h_kv, h_q / h_kv, D): each kv head's queries
            q = rope_signed(q, cos, sin).view(n, h_kv, -1, attn.head_dim)
            # scaled before the product, as SDPA does: a half-precision q K^T of large q, k could overflow
            scores = torch.matmul(q * attn.scaling, keys.transpose(-1, -2)) + bias  # (n, h_kv, h_q / h_kv, S)
            probs = scores.softmax(-1, dtype=torch.float32).to(values.dtype)
            h = h + attn.o_proj(torch.matmul(probs, values).view(n, -1))
            x = rms_norm(h, layer.post_attention_layernorm)
            h = h + mlp.down_proj(mlp.act_fn(mlp.gate_proj(x)) * mlp.up_proj(x))
        self.slot += 1
        return self.model.lm_head(rms_norm(h, inner.norm))
