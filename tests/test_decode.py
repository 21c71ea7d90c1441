"""The Llama family's decode step (posttrain.rl.decode) against the model's own forward.

- per family (Llama with biases and llama3 rope scaling, Mistral, Qwen2 with yarn, Qwen3 with its q / k norms
  and a head dim other than H / heads), every bias and norm weight random (transformers initialises them to 0
  and 1, which would hide a dropped one) and a large norm eps in one: after the same prefill, five steps of
  `LlamaDecodeStep`, with the batch compacted to a reordered subset after the second, give the logits of the
  model's forward of the same tokens at the same positions (float32: rtol = atol = 1e-5; the two differ in
  the norm and attention kernels only) and leave the same keys and values in the cache; bfloat16 to a few
  of its ulps;
- `supports` refuses what the step does not compute: another architecture, a subclass (even under the
  family's name), a projection that is not exactly nn.Linear, a forward hook on a module the step does not
  call (one on a projection is fine: it is called), a dynamic cache, a dynamic rotary embedding, Mistral with
  a sliding window, a model on a device outside decode.DEVICES (meta);
- `rollout.generate` takes the step where it applies, and gives what the model's forward gives: the same
  greedy and sampled tokens, log-probs to float32 rounding;
- the first and the last on a GPU too when there is one (decode.DEVICES has "cuda").
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, DynamicCache, StaticCache

from posttrain.rl import decode, rollout

PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]
L = 6  # completion slots of the rollout

FAMILIES = {
    "llama": dict(
        attention_bias=True,
        mlp_bias=True,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
    "mistral": dict(sliding_window=None),
    "qwen2": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32}),
    "qwen3": dict(head_dim=24, rms_norm_eps=0.1),  # eps: as large as the activations' variance
}


def make_model(family: str, seed: int = 0, dtype=torch.float32, **overrides):
    """A tiny random model (4 query heads over 2 key-value heads), eval mode, its biases and norm weights
    random."""
    config = AutoConfig.for_model(
        family, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, eos_token_id=EOS,
        pad_token_id=PAD, **{**FAMILIES[family], **overrides},
    )  # fmt: skip
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:  # biases (0 by default) and norm weights (1)
                p.normal_(1.0 if "norm" in name else 0.0, 0.2)
    return model


def prefilled(model):
    """The left-padded prompts through `rollout.prefill` into a fresh static cache of P + L slots: the cache,
    the last positions (B,), the attention mask over every slot (B, P + L), and P."""
    ids, mask = rollout._left_pad(PROMPTS, PAD, model.device)
    P = ids.shape[1]
    cache = rollout._new_cache(model, P + L)
    with torch.no_grad():
        _, positions = rollout.prefill(model, ids, mask, cache)
    return cache, positions, torch.cat([mask, mask.new_ones(len(PROMPTS), L)], 1), P


def steps_against_forward(model, tol):
    """Five decode steps by `LlamaDecodeStep` and by the model's forward, from the same prefill, the batch
    compacted to rows [3, 0, 2] after the second; logits and caches compared at `tol`."""
    ours, positions, mask, P = prefilled(model)
    theirs, _, _, _ = prefilled(model)
    assert decode.supports(model, ours)
    step = decode.LlamaDecodeStep(model, ours, P, P + L)
    torch.manual_seed(1)
    with torch.no_grad():
        for t in range(1, L):
            if t == 3:  # compaction: rollout._rollout's row selection, on both sides
                keep = torch.tensor([3, 0, 2], device=model.device)
                rollout._select_rows(ours, keep)
                rollout._select_rows(theirs, keep)
                positions, mask = positions[keep], mask[keep]
            tokens = torch.randint(3, 128, (len(positions),)).to(model.device)
            positions = positions + 1
            got = step(tokens, positions, mask)
            expected = model(
                input_ids=tokens[:, None],
                attention_mask=mask,
                position_ids=positions[:, None],
                **rollout.cache_kwarg(model, theirs),
            ).logits[:, -1]
            torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
    assert step.slot == P + L - 1
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=tol, atol=tol)
        torch.testing.assert_close(a.values, b.values, rtol=tol, atol=tol)


# the step runs wherever decode.DEVICES allows it: on a GPU too, when there is one
DEVICES = [
    "cpu",
    pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_step_equals_the_models_forward(family, device):
    steps_against_forward(make_model(family).to(device), tol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rope_with_the_sign_on_the_table_is_the_same_rope(dtype):
    torch.manual_seed(3)
    x, cos, sin = (
        torch.randn(5, 4, 24, dtype=dtype),
        torch.randn(5, 1, 24, dtype=dtype),
        torch.randn(5, 1, 24),
    )
    sin = sin.to(dtype)
    assert torch.equal(decode.rope_signed(x, cos, decode.signed_sin(sin)), decode.rope(x, cos, sin))


def test_step_in_bfloat16():
    """bfloat16: the step's norm rounds once where the module rounds twice, its attention runs in float32
    where SDPA runs in bfloat16: agreement to 4 bfloat16 ulps of the largest logits (~5, ulp 1/32)."""
    steps_against_forward(make_model("qwen3", dtype=torch.bfloat16), tol=0.125)


def test_supports_refuses_what_it_does_not_compute():
    model = make_model("qwen2")
    cache, _, _, P = prefilled(model)
    assert decode.supports(model, cache)
    assert not decode.supports(model, DynamicCache(config=model.config))

    gpt2 = AutoModelForCausalLM.from_config(
        AutoConfig.for_model("gpt2", vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128)
    )
    assert not decode.supports(gpt2, rollout._new_cache(gpt2, P + L))

    class Custom(type(model)):  # a subclass may override any part of the forward
        pass

    subclass = Custom(model.config).eval()
    assert not decode.supports(subclass, rollout._new_cache(subclass, P + L))
    same_name = type("Qwen2ForCausalLM", (type(model),), {})(model.config).eval()
    assert not decode.supports(same_name, rollout._new_cache(same_name, P + L))

    class Quantized(torch.nn.Linear):  # bitsandbytes' layers subclass nn.Linear
        pass

    for kind in (Quantized, torch.nn.Identity):
        other = make_model("qwen2")
        up = other.model.layers[1].mlp.up_proj
        other.model.layers[1].mlp.up_proj = (
            kind(up.in_features, up.out_features) if kind is Quantized else kind()
        )
        assert not decode.supports(other, rollout._new_cache(other, P + L))

    hooked = make_model("qwen2")
    handle = hooked.model.layers[0].self_attn.q_proj.register_forward_hook(lambda *args: None)
    assert decode.supports(hooked, rollout._new_cache(hooked, P + L))  # the step calls q_proj
    handle.remove()
    for module in (hooked.model.layers[0], hooked.model.layers[1].mlp, hooked.model.norm):
        handle = module.register_forward_pre_hook(lambda *args: None)
        assert not decode.supports(hooked, rollout._new_cache(hooked, P + L))
        handle.remove()
    assert decode.supports(hooked, rollout._new_cache(hooked, P + L))

    meta = make_model("qwen2").to("meta")
    assert not decode.supports(meta, rollout._new_cache(model, P + L))

    dynamic_rope = make_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not decode.supports(dynamic_rope, rollout._new_cache(dynamic_rope, P + L))

    windowed = make_model("mistral", sliding_window=4096)  # longer than the rollout: still its own cache kind
    assert not decode.supports(windowed, StaticCache(config=windowed.config, max_cache_len=P + L))
    # full-attention layer types give static layers, but Mistral's forward masks by the window all the same
    full = make_model("mistral", sliding_window=4, layer_types=["full_attention"] * 2)
    cache = StaticCache(config=full.config, max_cache_len=P + L)
    assert all(type(layer).__name__ == "StaticLayer" for layer in cache.layers)
    assert not decode.supports(full, cache)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_takes_the_step_and_gives_the_forwards_tokens(family, do_sample, device, monkeypatch):
    model = make_model(family).to(device)
    calls = []
    step_call = decode.LlamaDecodeStep.__call__
    monkeypatch.setattr(
        decode.LlamaDecodeStep, "__call__", lambda self, *a: calls.append(1) or step_call(self, *a)
    )
    kwargs = dict(
        num_generations=3, max_completion_length=8, eos_token_id=EOS, pad_token_id=PAD, do_sample=do_sample,
        top_k=20, repetition_penalty=1.3,
    )  # fmt: skip
    ours = rollout.generate(model, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    steps = len(calls)
    assert steps >= 7  # every decode step of the longest row
    monkeypatch.setattr(decode, "supports", lambda *args: False)
    theirs = rollout.generate(model, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(calls) == steps  # the model's own forward this time
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert torch.equal(ours.completion_mask, theirs.completion_mask)
    torch.testing.assert_close(ours.logps, theirs.logps, rtol=1e-5, atol=1e-5)
