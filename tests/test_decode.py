"""The Llama family's decode step (posttrain.rl.decode) against the model's own forward.

- per family (Llama with biases and llama3 rope scaling, Mistral, Qwen2, Qwen3 with its q / k norms): after
  the same prefill, five steps of `LlamaDecodeStep` give the logits of the model's forward of the same
  tokens at the same positions (float32: rtol = atol = 1e-5; the two differ in the norm and attention
  kernels only) and leave the same keys and values in the cache;
- `supports` refuses what the step does not compute: another architecture, a subclass or wrapped
  projection, a dynamic cache, a dynamic rotary embedding, a sliding window;
- `rollout.generate` takes the step where it applies, and gives what the model's forward gives: the same
  greedy and sampled tokens, log-probs to float32 rounding.
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
    "qwen2": dict(),
    "qwen3": dict(head_dim=24),  # a head dim other than H / heads
}


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny random model (4 query heads over 2 key-value heads), eval mode."""
    config = AutoConfig.for_model(
        family, vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, initializer_range=0.2, eos_token_id=EOS,
        pad_token_id=PAD, **{**FAMILIES[family], **overrides},
    )  # fmt: skip
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def prefilled(model):
    """The left-padded prompts through `rollout.prefill` into a fresh static cache of P + L slots: the cache,
    the last positions (B,), the attention mask over every slot (B, P + L), and P."""
    ids, mask = rollout._left_pad(PROMPTS, PAD, "cpu")
    P = ids.shape[1]
    cache = rollout._new_cache(model, P + L)
    with torch.no_grad():
        _, positions = rollout.prefill(model, ids, mask, cache)
    return cache, positions, torch.cat([mask, mask.new_ones(len(PROMPTS), L)], 1), P


@pytest.mark.parametrize("family", FAMILIES)
def test_step_equals_the_models_forward(family):
    model = make_model(family)
    ours, positions, mask, P = prefilled(model)
    theirs, _, _, _ = prefilled(model)
    assert decode.supports(model, ours)
    step = decode.LlamaDecodeStep(model, ours, P, P + L)
    torch.manual_seed(1)
    with torch.no_grad():
        for _ in range(1, L):
            tokens = torch.randint(3, 128, (len(PROMPTS),))
            positions = positions + 1
            got = step(tokens, positions, mask)
            expected = model(
                input_ids=tokens[:, None], attention_mask=mask, position_ids=positions[:, None], cache=theirs
            ).logits[:, -1]
            torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert step.slot == P + L - 1
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        torch.testing.assert_close(a.keys, b.keys, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.values, b.values, rtol=1e-5, atol=1e-5)


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

    class Adapter(torch.nn.Module):  # what peft's LoRA puts in a projection's place
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            return self.base(x)

    wrapped = make_model("qwen2")
    wrapped.model.layers[1].mlp.up_proj = Adapter(wrapped.model.layers[1].mlp.up_proj)
    assert not decode.supports(wrapped, rollout._new_cache(wrapped, P + L))

    dynamic_rope = make_model("llama", rope_scaling={"rope_type": "dynamic", "factor": 2.0})
    assert not decode.supports(dynamic_rope, rollout._new_cache(dynamic_rope, P + L))

    windowed = make_model("mistral", sliding_window=4096)  # longer than the rollout: still its own cache kind
    assert not decode.supports(windowed, StaticCache(config=windowed.config, max_cache_len=P + L))


@pytest.mark.parametrize("family", ["llama", "qwen3"])
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_takes_the_step_and_gives_the_forwards_tokens(family, do_sample, monkeypatch):
    model = make_model(family)
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
