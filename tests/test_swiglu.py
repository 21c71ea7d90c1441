"""rl/swiglu.py: the SwiGLU MLP that recomputes silu(g) and silu(g) * u in the backward gives autograd's numbers
bit for bit and holds two of its four (n, I) activations less."""

import contextlib

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from posttrain.data import embedded
from posttrain.rl import logprobs, swiglu


def _llama(**overrides):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


MODELS = {"qwen2": lambda: embedded.build_model(seed=0, num_hidden_layers=2), "llama": _llama}


def _run(model, lean: bool):
    """Logits and every parameter's gradient of a random combination of them; the bytes autograd saved."""
    model.zero_grad(set_to_none=True)
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 128, (3, 17), generator=g)
    saved = {}

    def pack(t):
        saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with swiglu.lean_mlps(model) if lean else contextlib.nullcontext():
            logits = model(input_ids=ids).logits
    (logits * torch.randn(logits.shape, generator=g)).sum().backward()
    params = {id(p) for p in model.parameters()}
    activations = sum(
        n
        for ptr, n in saved.items()
        if ptr not in {p.untyped_storage().data_ptr() for p in model.parameters()}
    )
    del params
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, activations


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_are_autograds_bit_for_bit_with_two_activations_less(name):
    model = MODELS[name]()
    layers, intermediate = model.config.num_hidden_layers, model.config.intermediate_size
    logits, grads, saved = _run(model, lean=False)
    lean_logits, lean_grads, lean_saved = _run(model, lean=True)
    assert torch.equal(logits, lean_logits)
    for n, g in grads.items():
        assert torch.equal(g, lean_grads[n]), n
    assert saved - lean_saved == layers * 2 * 3 * 17 * intermediate * 4  # a and h, float32, per layer
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is itself again


def test_left_as_it_is_without_autograd_under_checkpointing_or_for_other_mlps():
    def replaced(model, context=None):
        with context or contextlib.nullcontext(), swiglu.lean_mlps(model):
            return sum("forward" in m.__dict__ for m in model.modules())

    assert replaced(_llama()) == 2
    assert replaced(_llama(hidden_act="gelu")) == 0  # not silu
    assert replaced(_llama(), torch.no_grad()) == 0
    assert replaced(_llama(), torch.autocast("cpu", dtype=torch.bfloat16)) == 0
    hooked = _llama()
    hooked.model.layers[0].mlp.down_proj.register_forward_hook(lambda *a: None)
    assert replaced(hooked) == 1  # the other layer's
    with swiglu.lean_mlps(object()):  # not a module (lora.AdapterDisabled, a reference view of the policy)
        pass
    checkpointed = _llama()
    checkpointed.activation_checkpointing_enable()
    assert replaced(checkpointed) == 0


def test_training_forwards_run_the_lean_mlp(monkeypatch):
    """token_logprobs runs it on the tape, not without (a spy on `_SwiGLUDown.apply` counts the layers)."""
    calls = []
    real = swiglu._SwiGLUDown.apply
    monkeypatch.setattr(swiglu._SwiGLUDown, "apply", lambda *a: calls.append(1) or real(*a))
    model = embedded.build_model(seed=0, num_hidden_layers=2)
    batch = {"input_ids": torch.tensor([[3, 4, 5, 6]]), "completion_mask": torch.tensor([[0, 0, 1, 1]])}
    logprobs.token_logprobs(model, batch).logps.sum().backward()
    assert len(calls) == 2
    with torch.no_grad():
        logprobs.token_logprobs(model, batch)
    assert len(calls) == 2
