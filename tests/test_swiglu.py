"""rl/swiglu.py: the SwiGLU MLP that recomputes silu(g) and silu(g) * u in the backward gives autograd's numbers
bit for bit and holds two of its four (n, I) activations less."""

import contextlib

import pytest
import torch
from _lean import run, training_forward_calls
from transformers import AutoModelForCausalLM, LlamaConfig

from posttrain.data import embedded
from posttrain.kernels import native
from posttrain.rl import lean, swiglu


def _llama(**overrides):
    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, **overrides)  # fmt: skip
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config)


MODELS = {"qwen2": lambda: embedded.build_model(seed=0, num_hidden_layers=2), "llama": _llama}


def _run(model, lean: bool):
    return run(model, swiglu.lean_mlps(model) if lean else None)


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


@pytest.mark.parametrize("frozen", ["down_proj", "gate_proj", "up_proj", "gate_proj,up_proj,down_proj"])
def test_frozen_projections_get_no_gradient_and_the_rest_autograds_bit_for_bit(frozen):
    """As under LoRA: each combination of frozen MLP weights (so of the Function's inputs that need no gradient)."""
    model = _llama()
    for name, p in model.named_parameters():
        p.requires_grad_(not any(f"mlp.{part}." in name for part in frozen.split(",")))
    logits, grads, _ = _run(model, lean=False)
    lean_logits, lean_grads, _ = _run(model, lean=True)
    assert torch.equal(logits, lean_logits) and grads.keys() == lean_grads.keys()
    assert not any(f"mlp.{frozen.split(',')[0]}." in n for n in lean_grads)
    for n, g in grads.items():
        assert torch.equal(g, lean_grads[n]), n


@pytest.mark.parametrize("wanted", [(1, 1, 1), (1, 0, 0), (0, 1, 0), (0, 0, 1), (0, 1, 1), (1, 0, 1)])
def test_each_input_needing_a_gradient_alone_gets_autograds(wanted):
    """The Function on its own, against autograd's F.linear(F.silu(g) * u, W), for each set of inputs that need a
    gradient (inside a model the inputs g and u always do; W not under LoRA)."""
    gen = torch.Generator().manual_seed(7)
    g, u, w, dy = (
        torch.randn(shape, generator=gen) for shape in ((2, 5, 12), (2, 5, 12), (6, 12), (2, 5, 6))
    )
    plain = [x.clone().requires_grad_(bool(want)) for x, want in zip((g, u, w), wanted, strict=True)]
    lean = [x.clone().requires_grad_(bool(want)) for x, want in zip((g, u, w), wanted, strict=True)]
    y = torch.nn.functional.linear(torch.nn.functional.silu(plain[0]) * plain[1], plain[2])
    lean_y = swiglu._SwiGLUDown.apply(*lean)
    assert torch.equal(y, lean_y)
    y.backward(dy)
    lean_y.backward(dy)
    for a, b, want in zip(plain, lean, wanted, strict=True):
        assert (b.grad is not None) == bool(want) and (not want or torch.equal(a.grad, b.grad))
    for x, b in zip((g, u, w), lean, strict=True):
        assert torch.equal(x, b)  # a u the caller holds (u_private not given) is left as it was


def _function_inputs(n=64, inner=4096, hidden=16):
    gen = torch.Generator().manual_seed(3)
    g, u = torch.randn(n, inner, generator=gen), torch.randn(n, inner, generator=gen)
    return g, u, torch.randn(hidden, inner, generator=gen) / 64, torch.randn(n, hidden, generator=gen)


def _lean_backward(g, u, w, dy, u_private, retain_graph=False):
    inputs = [x.clone().requires_grad_() for x in (g, u, w)]
    # g and u as products made for the call (as the lean MLP passes them), not leaves
    y = swiglu._SwiGLUDown.apply(inputs[0] * 1, inputs[1] * 1, inputs[2], u_private)
    y.backward(dy, retain_graph=retain_graph)
    grads = [x.grad.clone() for x in inputs]
    if retain_graph:  # the same graph once more: what it saved must be intact
        for x in inputs:
            x.grad = None
        y.backward(dy)
        assert all(torch.equal(a, x.grad) for a, x in zip(grads, inputs, strict=True))
    return grads


def _du_over_u_flags(monkeypatch) -> list[bool]:
    """The `du_into_u` of each call of the SwiGLU backward kernel from now on (a spy that still runs it)."""
    flags, real = [], native.swiglu_backward
    monkeypatch.setattr(
        native, "swiglu_backward", lambda *a, **k: flags.append(k["du_into_u"]) or real(*a, **k)
    )
    return flags


@pytest.mark.skipif(native.exact_library() is None, reason="the exact kernels are not built here")
@pytest.mark.parametrize("name", list(MODELS))
def test_in_a_model_as_training_runs_it_du_goes_over_u_with_autograds_numbers(name, monkeypatch):
    """Without a saved-tensors hook (as training runs; the other model tests count saved bytes through one, which
    keeps u), every lean part together (rl/lean.py): du written over u in each layer, every gradient autograd's."""
    model = MODELS[name]()
    flags = _du_over_u_flags(monkeypatch)
    logits, grads, _ = run(model, count_saved=False)
    lean_logits, lean_grads, _ = run(model, lean.layers(model), count_saved=False)
    assert flags == [True] * model.config.num_hidden_layers
    assert torch.equal(logits, lean_logits)
    for n, g in grads.items():
        assert torch.equal(g.view(torch.int32), lean_grads[n].view(torch.int32)), n


@pytest.mark.skipif(native.exact_library() is None, reason="the exact kernels are not built here")
def test_a_forward_hook_on_up_proj_added_while_open_keeps_u(monkeypatch):
    model = MODELS["qwen2"]()
    flags, seen = _du_over_u_flags(monkeypatch), []
    context = lean.layers(model)
    with context:
        model.model.layers[0].mlp.up_proj.register_forward_hook(
            lambda m, i, out: seen.append(out.clone()) or None
        )
        logits = model(input_ids=torch.arange(1, 9)[None]).logits
    logits.sum().backward()
    # the backward runs layer 1 (u written over), then the hooked layer 0 (u kept)
    assert flags == [True, False] and len(seen) == 1


def test_du_over_u_only_where_nothing_reads_u_again():
    """u_private: du is written over u when the backward frees the graph; with retain_graph or create_graph (the
    graph is read again) or under a saved-tensors hook (u may be held elsewhere) u stays as it was. Every way,
    autograd's gradients bit for bit."""
    g, u, w, dy = _function_inputs(n=5, inner=24, hidden=6)
    plain = [x.clone().requires_grad_() for x in (g, u, w)]
    torch.nn.functional.linear(torch.nn.functional.silu(plain[0]) * plain[1], plain[2]).backward(dy)
    want = [x.grad for x in plain]
    for retain in (False, True):
        assert all(
            torch.equal(a, b) for a, b in zip(want, _lean_backward(g, u, w, dy, True, retain), strict=True)
        )
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        assert all(torch.equal(a, b) for a, b in zip(want, _lean_backward(g, u, w, dy, True), strict=True))
    # which u the backward wrote: a spy on the kernel's flag
    with pytest.MonkeyPatch.context() as m:
        flags = _du_over_u_flags(m)
        _lean_backward(g, u, w, dy, True)
        _lean_backward(g, u, w, dy, True, retain_graph=True)
        _lean_backward(g, u, w, dy, False)
        with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
            _lean_backward(g, u, w, dy, True)
    assert flags == [True, False, True, False, False]  # a retained graph's last backward frees it


@pytest.mark.skipif(native.exact_library() is None, reason="the exact kernels are not built here")
@pytest.mark.parametrize("u_private", [True, False])
def test_the_backward_holds_one_or_two_products_at_a_time(u_private):
    """Down's weight gradient is taken before dh exists, so h (n, I) is freed first: the backward's allocations
    peak at one (n, I) product when du goes over u, two otherwise (three before: h, dh and du together)."""
    from torch.profiler import ProfilerActivity, profile

    g, u, w, dy = _function_inputs(hidden=4)
    # g and u from small products, whose backward makes no (n, I) tensor of its own
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(g.shape[0], 2, generator=gen, requires_grad=True)
    w_g, w_u = (torch.randn(g.shape[1], 2, generator=gen, requires_grad=True) for _ in range(2))
    y = swiglu._SwiGLUDown.apply(x @ w_g.t(), x @ w_u.t(), w.requires_grad_(), u_private)
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        y.backward(dy)
    live = peak = 0
    for event in sorted(prof.profiler.kineto_results.events(), key=lambda e: e.start_ns()):
        if event.name() == "[memory]":
            live += event.nbytes()
            peak = max(peak, live)
    product = g.numel() * 4
    assert (1 if u_private else 2) * product <= peak < (1.5 if u_private else 2.5) * product


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
    dispatched = _llama()
    dispatched.model.layers[1].mlp.up_proj._hf_hook = object()  # accelerate's dispatch hook (device_map)
    assert replaced(dispatched) == 1
    with swiglu.lean_mlps(object()):  # not a module (lora.AdapterDisabled, a reference view of the policy)
        pass
    checkpointed = _llama()
    checkpointed.activation_checkpointing_enable()
    assert replaced(checkpointed) == 0


def test_training_forwards_run_the_lean_mlp(monkeypatch):
    """token_logprobs runs it on the tape, not without (a spy on `_SwiGLUDown.apply` counts the layers)."""
    assert training_forward_calls(monkeypatch, swiglu._SwiGLUDown) == (2, 2)
