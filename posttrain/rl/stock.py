"""Whether a module is as transformers built it, with nothing attached: the condition under which rl/decode.py,
rl/swiglu.py and rl/last_token.py may compute a module's forward their own way (a hook, an instance-level
forward, accelerate's dispatch hook, a subclass or a compiled graph would see, or expect, something else)."""

from __future__ import annotations

import contextlib

import torch

_hooks = torch.nn.modules.module


def from_transformers(module) -> bool:
    """`module`'s class is one of transformers' model classes (not a subclass defined elsewhere)."""
    return type(module).__module__.startswith("transformers.models.")


def intercepted(module) -> bool:
    """A forward hook, an instance-level forward or accelerate's dispatch hook on `module`. The forwards rl/lean.py
    swaps in (`lean_forward`) compute the module's own numbers on any input and do not count."""
    forward = module.__dict__.get("forward")
    return bool(
        module._forward_hooks
        or module._forward_pre_hooks
        or (forward is not None and not getattr(forward, "lean", False))
        or hasattr(module, "_hf_hook")
    )


def lean_forward(forward):
    """Mark `forward`, set on a module by rl/lean.py's parts, as computing the module's own numbers."""
    forward.lean = True
    return forward


def backward_hooked(module) -> bool:
    return bool(module._backward_hooks or module._backward_pre_hooks)


def global_hooks() -> bool:
    """A forward hook registered for every module (`torch.nn.modules.module.register_module_forward_hook`)."""
    return bool(_hooks._global_forward_hooks or _hooks._global_forward_pre_hooks)


def global_backward_hooks() -> bool:
    return bool(_hooks._global_backward_hooks or _hooks._global_backward_pre_hooks)


def checkpointing(module) -> bool:
    """transformers' activation (gradient) checkpointing is on for `module` (read by the property's current name,
    the old one where only it exists)."""
    for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):
        if isinstance(getattr(type(module), name, None), property):
            return bool(getattr(module, name))
    return False


def rescaled_rope(rotary) -> bool:
    """A rotary embedding module whose angles depend on more than the position: the dynamic and long-rope
    kinds rescale with the longest position of the call."""
    rope_type = getattr(rotary, "rope_type", "default")
    return "dynamic" in rope_type or rope_type == "longrope"


def compiled(module) -> bool:
    """`module` runs through torch.compile: compiled in place (`module.compile()`) or a compile wrapper."""
    return getattr(module, "_compiled_call_impl", None) is not None or hasattr(module, "_orig_mod")


@contextlib.contextmanager
def eager(model: torch.nn.Module):
    """While open, the modules of `model` compiled in place (`module.compile()`, as `torch_compile` compiles the
    decoder) run their own forward: generation's forwards (another graph per cache layout and prompt length,
    and modules patched per rollout) are not worth compiling."""
    modules = [m for m in model.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    impls = [m._compiled_call_impl for m in modules]
    try:
        for m in modules:
            m._compiled_call_impl = None
        yield
    finally:
        for m, impl in zip(modules, impls, strict=True):
            m._compiled_call_impl = impl


def lean_candidates(model) -> list[torch.nn.Module]:
    """The modules of `model` whose computation rl/lean.py's parts may take over while autograd
    records: none without autograd, for what is not a module (e.g. lora.AdapterDisabled, a view of the policy),
    under autocast (the products would run in another dtype than the backward's), for a compiled model, and
    under gradient checkpointing (whose recomputation in the backward, after the swap is undone, would build
    another graph than the forward's)."""
    if (
        not torch.is_grad_enabled()
        or not isinstance(model, torch.nn.Module)
        or torch.is_autocast_enabled("cpu")
    ):
        return []
    modules = list(model.modules())
    return [] if any(compiled(m) or checkpointing(m) for m in modules) else modules
