"""rl/rmsnorm.py: the RMSNorm in one C pass each way gives autograd's numbers bit for bit (forward, every
parameter's gradient, x's gradient summed in autograd's order) and holds one (n, H) activation less per norm."""

import contextlib

import pytest
import torch
from _lean import bits as _bits
from _lean import run, training_forward_calls
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen3Config

from posttrain.data import embedded
from posttrain.kernels import native
from posttrain.rl import rmsnorm, swiglu

needs_exact = pytest.mark.skipif(native._exact_built() is None, reason="no C compiler or no AVX2 / AVX-512")


def _llama(**overrides):
    shape = dict(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2)  # fmt: skip
    config = LlamaConfig(**{**shape, **overrides})
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


def _qwen3():  # q_norm and k_norm over each head's 16 floats besides the layers' norms
    config = Qwen3Config(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


MODELS = {
    "qwen2": lambda: embedded.build_model(seed=0, num_hidden_layers=2),
    "llama": _llama,
    "qwen3": _qwen3,
    "llama_h200": lambda: _llama(
        hidden_size=200, num_attention_heads=4, head_dim=50
    ),  # rows not whole vectors
}


def _run(model, lean: bool, mlps: bool = False):
    contexts = contextlib.ExitStack()
    if lean:
        contexts.enter_context(rmsnorm.lean_norms(model))
    if mlps:
        contexts.enter_context(swiglu.lean_mlps(model))
    return run(model, contexts)


@needs_exact
@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_are_autograds_bit_for_bit_with_one_activation_less_per_norm(name, monkeypatch):
    """And one more where linear maps read the norm's output (q, k, v; gate, up; not the output layer, which
    reads a slice of it): they keep x, which the norm keeps anyway, in its place."""
    model = MODELS[name]()
    calls, read = [], {}
    real, real_linear = rmsnorm._RMSNorm.apply, rmsnorm._NormedLinear.apply
    monkeypatch.setattr(rmsnorm._RMSNorm, "apply", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(
        rmsnorm._NormedLinear,
        "apply",
        lambda y, x, *a: read.setdefault(x.data_ptr(), y.numel()) and real_linear(y, x, *a),
    )
    _run(
        model, lean=True
    )  # the kernels' first use checks them against the ops, which saves tensors of its own
    calls.clear()
    read.clear()
    logits, grads, saved = _run(model, lean=False)
    lean_logits, lean_grads, lean_saved = _run(model, lean=True)
    norms = [m for m in model.modules() if type(m).__name__ in rmsnorm.NORM_CLASSES]
    assert len(calls) == len(norms) >= 5
    assert _bits(logits, lean_logits)
    for n, g in grads.items():
        assert _bits(g, lean_grads[n]), n
    # x * rsqrt(...) (n, H) per norm, and the output of each norm that linear maps read
    assert len(read) == 2 * model.config.num_hidden_layers
    assert saved - lean_saved == sum(shape.numel() * 4 for shape in calls) + sum(read.values()) * 4
    assert not rmsnorm._MADE  # the norms' outputs are gone, and with them what was noted for the linear maps
    assert not any("forward" in m.__dict__ for m in model.modules())  # the model is itself again


@needs_exact
def test_with_the_lean_mlps_too():
    model = _llama()
    logits, grads, _ = _run(model, lean=False)
    lean_logits, lean_grads, _ = _run(model, lean=True, mlps=True)
    assert _bits(logits, lean_logits) and all(_bits(g, lean_grads[n]) for n, g in grads.items())


@needs_exact
@pytest.mark.parametrize("frozen", ["norm", "all_but_embeddings"])
def test_frozen_weights_get_no_gradient_and_the_rest_autograds_bit_for_bit(frozen):
    """As under LoRA (norms frozen), and with the norms' input needing no gradient but their weight one."""
    model = _llama()
    for name, p in model.named_parameters():
        p.requires_grad_(("norm" not in name) if frozen == "norm" else ("norm" in name))
    logits, grads, _ = _run(model, lean=False)
    lean_logits, lean_grads, _ = _run(model, lean=True)
    assert _bits(logits, lean_logits) and grads.keys() == lean_grads.keys()
    for n, g in grads.items():
        assert _bits(g, lean_grads[n]), n


@needs_exact
@pytest.mark.parametrize(
    "shape", [(2, 3, 8), (4, 5, 64), (3, 7, 896), (2, 9, 1003), (1, 3, 9005), (5, 16384)]
)
def test_the_function_alone_against_the_modules_ops(shape):
    """Widths across torch's sum orders: one vector, groups of four, leftover vectors and floats, summed levels."""
    gen = torch.Generator().manual_seed(5)
    x, dy, later = (torch.randn(shape, generator=gen) * 2 for _ in range(3))
    weight = torch.randn(shape[-1], generator=gen)
    norm = torch.nn.Module()  # the module's own ops (transformers' Llama RMSNorm forward)
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    norm = LlamaRMSNorm(shape[-1], eps=1e-5)
    lean = LlamaRMSNorm(shape[-1], eps=1e-5)
    with torch.no_grad():
        norm.weight.copy_(weight)
        lean.weight.copy_(weight)
    ys, xs = [], []
    for module, context in ((norm, contextlib.nullcontext()), (lean, rmsnorm.lean_norms(lean))):
        xr = x.clone().requires_grad_()
        with context:
            y = module(xr)
        torch.autograd.backward([y, xr * later], [dy, torch.ones_like(x)])  # a later use's gradient first
        ys.append(y.detach())
        xs.append(xr.grad)
    assert _bits(ys[0], ys[1]) and _bits(xs[0], xs[1]) and _bits(norm.weight.grad, lean.weight.grad)


@needs_exact
def test_a_backward_that_builds_a_graph_takes_the_ops_and_differentiates_again():
    """create_graph: the kernels stand aside, the ops give the same first derivatives and a second one."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(2)
    x, dy = torch.randn(4, 32, generator=gen), torch.randn(4, 32, generator=gen)
    grads = []
    for lean in (False, True):
        norm = LlamaRMSNorm(32)
        xr = x.clone().requires_grad_()
        with rmsnorm.lean_norms(norm) if lean else contextlib.nullcontext():
            y = norm(xr)
        (gx,) = torch.autograd.grad(y, xr, dy, create_graph=True)
        (ggx,) = torch.autograd.grad(gx.square().sum(), xr)
        grads.append((gx.detach(), ggx))
    assert _bits(grads[0][0], grads[1][0])
    assert torch.allclose(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-5)


def _norm_then_linear(lean: bool, change_y=False):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(4)
    torch.manual_seed(4)
    norm, linear = LlamaRMSNorm(32), torch.nn.Linear(32, 24)
    with torch.no_grad():
        norm.weight.copy_(torch.linspace(-2, 2, 32))
    x = torch.randn(3, 5, 32, generator=gen).requires_grad_()
    module = torch.nn.Sequential(norm, linear)
    with rmsnorm.lean_norms(module) if lean else contextlib.nullcontext():
        y = norm(x)
        if change_y:
            y.mul_(2)  # no longer what the norm made: the linear map keeps it
        out = linear(y)
    return x, y, out, (norm.weight, linear.weight, linear.bias)


@needs_exact
def test_a_linear_map_reading_a_norm_differentiates_again_under_create_graph():
    """create_graph through norm -> linear: the first derivatives bit for bit, the second through the norm made
    again from x by the module's ops."""
    results = []
    for lean in (False, True):
        x, _, out, params = _norm_then_linear(lean)
        dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(5))
        first = torch.autograd.grad(out, (x, *params), dout, create_graph=True)
        second = torch.autograd.grad(sum(g.square().sum() for g in first), (x, *params), allow_unused=True)
        results.append(([g.detach() for g in first], second))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        assert _bits(a, b)
    for a, b in zip(results[0][1], results[1][1], strict=True):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-5)  # the bias: None


@needs_exact
def test_the_linear_maps_output_may_change_in_place_and_nested_contexts_undo_their_own():
    """The output of a linear map reading a norm is no view made inside a Function (torch refuses to change those
    in place); a lean_norms inside another swaps each module once and each undoes its own."""
    grads = []
    for lean in (False, True):
        x, _, out, params = _norm_then_linear(lean)
        out.add_(1.0)  # as peft's mixed-batch forward adds into a base layer's output
        out.square().sum().backward()
        grads.append([x.grad, *(p.grad for p in params)])
    assert all(_bits(a, b) for a, b in zip(*grads, strict=True))
    model = _llama()
    with rmsnorm.lean_norms(model.model.layers[0]), rmsnorm.lean_norms(model):
        assert sum("forward" in m.__dict__ for m in model.modules()) == 20
    assert not any("forward" in m.__dict__ for m in model.modules())


@needs_exact
def test_a_norm_output_changed_in_place_is_kept_by_the_linear_map(monkeypatch):
    calls = []
    real = rmsnorm._NormedLinear.apply
    monkeypatch.setattr(rmsnorm._NormedLinear, "apply", lambda *a: calls.append(1) or real(*a))
    x, y, out, params = _norm_then_linear(lean=True)
    assert calls == [1]
    assert not vars(y)  # nothing attached to the norm's output itself
    y_changed = _norm_then_linear(lean=True, change_y=True)
    assert calls == [1]  # not made by the norm as it is now: F.linear
    plain = _norm_then_linear(lean=False, change_y=True)
    for ran in (plain, y_changed):
        ran[2].sum().backward()
    assert all(
        _bits(a.grad, b.grad)
        for a, b in zip((plain[0], *plain[3]), (y_changed[0], *y_changed[3]), strict=True)
    )


@needs_exact
@pytest.mark.parametrize("n", [64, 1003])
def test_a_gradient_strided_along_the_rows_takes_the_ops(n):
    """dy with a non-unit stride over H (not made by transformers' models): torch sums its products in another
    order than a contiguous row's, and the ops give it."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    gen = torch.Generator().manual_seed(8)
    x, dy = torch.randn(6, n, generator=gen), torch.randn(n, 6, generator=gen).t()
    out = []
    for lean in (False, True):
        norm = LlamaRMSNorm(n)
        with torch.no_grad():
            norm.weight.copy_(torch.linspace(-2, 2, n))
        xr = x.clone().requires_grad_()
        with rmsnorm.lean_norms(norm) if lean else contextlib.nullcontext():
            y = norm(xr)
        y.backward(dy)
        out.append((y.detach(), xr.grad, norm.weight.grad))
    assert all(_bits(a, b) for a, b in zip(*out, strict=True))


def test_left_as_it_is_where_it_does_not_apply(monkeypatch):
    def replaced(model, context=None):
        with context or contextlib.nullcontext(), rmsnorm.lean_norms(model):
            return sum("forward" in m.__dict__ for m in model.modules() if "Norm" in type(m).__name__)

    with rmsnorm.lean_norms(llama := _llama()):  # and the linear maps: 7 a layer and the output layer
        assert sum("forward" in m.__dict__ for m in llama.modules() if type(m) is torch.nn.Linear) == 15

    assert replaced(_llama()) == 5  # two per layer and the final one
    assert replaced(_llama(), torch.no_grad()) == 0
    assert replaced(_llama(), torch.autocast("cpu", dtype=torch.bfloat16)) == 0
    hooked = _llama()
    hooked.model.layers[0].input_layernorm.register_forward_hook(lambda *a: None)
    assert replaced(hooked) == 4
    checkpointed = _llama()
    checkpointed.activation_checkpointing_enable()
    assert replaced(checkpointed) == 0
    gemma = AutoModelForCausalLM.from_config(
        __import__("transformers").Gemma2Config(
            vocab_size=128,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
        )  # fmt: skip
    )
    assert replaced(gemma) == 0  # (1 + w) and its own rounding: not this formula
    with rmsnorm.lean_norms(gemma):  # no norm of ours: no linear map reads one
        assert not any("forward" in m.__dict__ for m in gemma.modules())
    # per call: another dtype or no kernels run the module's own forward, with its numbers
    model = _llama()
    monkeypatch.setattr(native, "enabled", False)
    logits, grads, _ = _run(model, lean=False)
    lean_logits, lean_grads, _ = _run(model, lean=True)
    assert _bits(logits, lean_logits) and all(_bits(g, lean_grads[n]) for n, g in grads.items())
    assert not native.rmsnorm_applies(torch.randn(3, 64), torch.randn(64))
    monkeypatch.setattr(native, "enabled", True)
    if native._exact_built() is not None:
        assert native.rmsnorm_applies(torch.randn(3, 64), torch.randn(64))
    assert not native.rmsnorm_applies(torch.randn(3, 64).double(), torch.randn(64).double())
    assert not native.rmsnorm_applies(torch.randn(64, 3).t(), torch.randn(64))  # not contiguous
    assert not native.rmsnorm_applies(torch.randn(3, 4), torch.randn(4))  # rows shorter than a vector
    assert not native.rmsnorm_applies(torch.randn(2, 20000), torch.randn(20000))


def test_training_forwards_run_the_lean_norms(monkeypatch):
    """token_logprobs runs it on the tape, not without (a spy on `_RMSNorm.apply` counts the norms)."""
    norms = 5 if native._exact_built() is not None else 0
    assert training_forward_calls(monkeypatch, rmsnorm._RMSNorm) == (norms, norms)


def test_the_reward_models_last_token_path_and_nesting_see_through_the_swap():
    """A swapped norm computes the module's own numbers on any shape: rl/last_token.py still runs the last layer
    at the last token under it; an inner lean_norms leaves the enclosing one's swap in place."""
    from transformers import AutoModelForSequenceClassification

    from posttrain.rl import last_token

    config = embedded.build_model(seed=0, num_hidden_layers=2).config
    config.num_labels, config.pad_token_id = 1, 0
    model = AutoModelForSequenceClassification.from_config(config)
    with rmsnorm.lean_norms(model):
        assert last_token.supports(model)
        swapped = model.model.norm.__dict__.get("forward")
        with rmsnorm.lean_norms(model):
            assert model.model.norm.__dict__.get("forward") is swapped
        assert model.model.norm.__dict__.get("forward") is swapped
    assert "forward" not in model.model.norm.__dict__
    model.model.norm.register_forward_hook(lambda *a: None)
    with rmsnorm.lean_norms(model):
        assert not last_token.supports(model)
