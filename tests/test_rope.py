"""rl/rope.py: the rotary embedding in one C pass each way gives autograd's numbers bit for bit (the output in
torch's layout, the gradient with autograd's signed zeros), and the model's function is its own again after."""

import contextlib
import sys

import pytest
import torch
from _lean import bits as _bits
from _lean import run, training_forward_calls
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from posttrain.data import embedded
from posttrain.kernels import native
from posttrain.rl import lean, rope

needs_exact = pytest.mark.skipif(native._exact_built() is None, reason="no C compiler or no AVX2 / AVX-512")


def _config(cls, **overrides):
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cls(**{**shape, **overrides}))


MODELS = {
    "qwen2": lambda: embedded.build_model(seed=0, num_hidden_layers=2),
    "llama": lambda: _config(LlamaConfig),
    "qwen3": lambda: _config(Qwen3Config, head_dim=16),
    "llama_d6": lambda: _config(LlamaConfig, hidden_size=24, head_dim=6),  # halves of 3: not whole vectors
}


def _run(model, context, mask=False):
    return run(model, context, mask)[:2]


@needs_exact
@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("mask", [False, True])
def test_gradients_are_autograds_bit_for_bit(name, mask, monkeypatch):
    model = MODELS[name]()
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = module.apply_rotary_pos_emb
    calls = []
    real = rope._Rope.apply
    monkeypatch.setattr(rope._Rope, "apply", lambda *a: calls.append(1) or real(*a))
    logits, grads = _run(model, contextlib.nullcontext(), mask)
    lean_logits, lean_grads = _run(model, rope.lean_rope(model), mask)
    assert len(calls) == 2 * model.config.num_hidden_layers  # q and k, each layer
    assert _bits(logits, lean_logits)
    for n, g in grads.items():
        assert _bits(g, lean_grads[n]), n
    assert module.apply_rotary_pos_emb is original


@needs_exact
def test_all_lean_parts_together_keep_autograds_numbers():
    model = MODELS["llama"]()
    logits, grads = _run(model, contextlib.nullcontext())
    lean_logits, lean_grads = _run(model, lean.layers(model))
    assert _bits(logits, lean_logits) and all(_bits(g, lean_grads[n]) for n, g in grads.items())


@needs_exact
@pytest.mark.parametrize("b_cos", [1, 2])
def test_the_function_alone_against_the_ops(b_cos):
    """x as the attention makes it (a transposed view), cos shared by the rows or per row, zeros in the gradient."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 9, 3, 8, generator=g).transpose(1, 2)
    cos, sin = (torch.randn(b_cos, 9, 8, generator=g) for _ in range(2))
    dout = torch.randn(2, 3, 9, 8, generator=g).transpose(2, 3).contiguous().transpose(2, 3)  # strided
    dout[dout.abs() < 0.3] = -0.0
    outs = []
    for fn in (native.rope_ops, rope._Rope.apply):
        xr = x.detach().requires_grad_()
        y = fn(xr, cos, sin)
        (dx,) = torch.autograd.grad(y, xr, dout)
        outs.append((y.detach(), dx))
    (y, dx), (lean_y, lean_dx) = outs
    assert lean_y.stride() == y.stride() and _bits(lean_y, y)
    assert lean_dx.stride() == dx.stride() and _bits(lean_dx, dx)


def test_a_backward_that_builds_a_graph_takes_the_ops():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 2, 5, 8, generator=g)
    cos, sin, dout = (
        torch.randn(1, 5, 8, generator=g),
        torch.randn(1, 5, 8, generator=g),
        torch.randn(2, 2, 5, 8),
    )
    grads = []
    for fn in (native.rope_ops, rope._Rope.apply):
        if fn is rope._Rope.apply and native.rope_forward(x, cos, sin) is None:
            pytest.skip("no exact kernels here")
        w = torch.randn(2, 2, 5, 8, generator=torch.Generator().manual_seed(4)).requires_grad_()
        xr = (x * w).requires_grad_()
        (dx,) = torch.autograd.grad(fn(xr, cos, sin), xr, dout * w, create_graph=True)
        (dw,) = torch.autograd.grad(dx.square().sum(), w)
        grads.append((dx.detach(), dw))
    assert torch.equal(grads[0][0], grads[1][0]) and torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_left_as_it_is_where_it_does_not_apply(monkeypatch):
    model = MODELS["llama"]()
    module = sys.modules[type(model.model.layers[0].self_attn).__module__]
    original = module.apply_rotary_pos_emb
    with rope.lean_rope(model):
        assert module.apply_rotary_pos_emb is not original
        with rope.lean_rope(model):  # already rebound: left to the outer one
            inner = module.apply_rotary_pos_emb
        assert module.apply_rotary_pos_emb is inner
    assert module.apply_rotary_pos_emb is original
    for context in (torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16)):
        with context, rope.lean_rope(model):
            assert module.apply_rotary_pos_emb is original
    checkpointed = MODELS["llama"]()
    checkpointed.activation_checkpointing_enable()
    with rope.lean_rope(checkpointed):
        assert module.apply_rotary_pos_emb is original
    # per call: another dtype, other broadcasting, cos needing a gradient run the original
    x, cos = torch.randn(2, 3, 5, 8), torch.randn(2, 5, 8)
    assert native.rope_applies(x, cos, cos) == (native._exact_built() is not None)
    assert not native.rope_applies(x.double(), cos.double(), cos.double())
    assert not native.rope_applies(x, cos[:, :, :4], cos[:, :, :4])
    assert not native.rope_applies(x[..., :7], cos[..., :7], cos[..., :7])  # odd head size
    assert not native.rope_applies(x.transpose(2, 3), cos, cos)  # d not unit-stride
    wide = torch.randn(2, 3, 5, 16)
    assert not native.rope_applies(wide[..., :8], cos, cos)  # gaps between the rows: no output laid out as x
    assert not native.rope_applies(x[:, :1].expand(2, 3, 5, 8), cos, cos)  # rows sharing memory
    assert native.rope_applies(wide.transpose(1, 2)[..., :8].contiguous().transpose(1, 2), cos, cos) == (
        native._exact_built() is not None
    )  # permuted but dense, as the attention's q and k
    monkeypatch.setattr(native, "enabled", False)
    assert not native.rope_applies(x, cos, cos)


def test_training_forwards_run_it(monkeypatch):
    ropes = 4 if native._exact_built() is not None else 0  # q and k in each layer, not without autograd
    assert training_forward_calls(monkeypatch, rope._Rope) == (ropes, ropes)


@needs_exact
def test_any_default_dtype_and_any_gradient_layout():
    """The kernels' buffers do not follow torch's default dtype; a gradient expanded from a sum (not dense) takes
    the ops' backward, with the same numbers."""
    g = torch.Generator().manual_seed(6)
    x = torch.randn(2, 9, 3, 8, generator=g).transpose(1, 2)
    cos, sin = torch.randn(1, 9, 8, generator=g), torch.randn(1, 9, 8, generator=g)
    dout = torch.randn(2, 3, 9, 8, generator=g)
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        grads = []
        for fn in (native.rope_ops, rope._Rope.apply):
            xr = x.detach().requires_grad_()
            y = fn(xr, cos, sin)
            (dx,) = torch.autograd.grad(y, xr, dout)
            (dx_sum,) = torch.autograd.grad(fn(xr, cos, sin).sum(), xr)  # dout expanded from a scalar
            grads.append((y.detach(), dx, dx_sum))
    finally:
        torch.set_default_dtype(before)
    for a, b in zip(*grads, strict=True):
        assert a.dtype == torch.float32 and _bits(a, b)
