"""The Llama family's rotary position embedding in one pass each way, with autograd's numbers bit for bit.

Notation: b rows, h heads, t positions, d head size.

transformers applies it as `apply_rotary_pos_emb(q, k, cos, sin)`, a function of the attention's modeling module:
q * cos + rotate_half(q) * sin, the same for k, with rotate_half(x) = cat(-x[d/2:], x[:d/2]): six ops forward per
tensor and about ten backward (the slices' backward fills zero tensors), each a pass over (b, h, t, d).
`_Rope` runs each way in C (`kernels.native.rope_forward` / `rope_backward`), with torch's numbers and layouts:
the output laid out as q (a transposed view of the projection's output), the gradient contiguous, and even its
signed zeros as autograd's sum leaves them. It saves only cos and sin, as autograd did.

The function is looked up in its module's globals at each call, so `lean_rope` rebinds it there while open, for
the attention classes whose function is the one above; every call on what the kernels do not take (another
dtype, no autograd, unsqueeze_dim other than 1) runs the original.
"""

from __future__ import annotations

import contextlib
import sys

import torch

from posttrain.kernels import native
from posttrain.rl.stock import from_transformers, lean_candidates

# The attention classes whose modeling module's apply_rotary_pos_emb is q * cos + rotate_half(q) * sin, likewise k.
ATTENTION_CLASSES = (
    "LlamaAttention", "MistralAttention", "MixtralAttention", "Qwen2Attention", "Qwen2MoeAttention",
    "Qwen3Attention", "Qwen3MoeAttention",
)  # fmt: skip


class _Rope(torch.autograd.Function):
    """x (b, h, t, d), cos and sin (b or 1, t, d), no gradient for them -> x * cos + rotate_half(x) * sin."""

    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        ctx.shape = x.shape
        return native.rope_forward(x, cos, sin)

    @staticmethod
    def backward(ctx, dout):
        cos, sin = ctx.saved_tensors
        dx = native.rope_backward(dout, cos, sin)
        if dx is None:  # create_graph, or a dout the kernel does not take: the ops' own backward
            create_graph = torch.is_grad_enabled()
            with torch.enable_grad():
                x = torch.zeros(ctx.shape, dtype=cos.dtype, requires_grad=True)  # dx does not depend on x
                y = native.rope_ops(x, cos, sin)
                (dx,) = torch.autograd.grad(y, x, dout, create_graph=create_graph)
        return dx, None, None


def _apply(original):
    def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1):
        if (
            unsqueeze_dim != 1
            or not torch.is_grad_enabled()
            or cos.requires_grad
            or sin.requires_grad
            or not (native.rope_applies(q, cos, sin) and native.rope_applies(k, cos, sin))
        ):
            return original(q, k, cos, sin, unsqueeze_dim)
        return _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)

    apply_rotary_pos_emb.original = original
    return apply_rotary_pos_emb


def _modules(model) -> list:
    """The modeling modules of `model`'s attentions that ATTENTION_CLASSES names, with their function unchanged."""
    found = {}
    for m in lean_candidates(model):
        if type(m).__name__ in ATTENTION_CLASSES and from_transformers(m):
            module = sys.modules[type(m).__module__]
            function = getattr(module, "apply_rotary_pos_emb", None)
            if getattr(function, "__module__", None) == module.__name__:  # transformers' own, not rebound
                found[module.__name__] = module
    return list(found.values())


@contextlib.contextmanager
def lean_rope(model: torch.nn.Module):
    """While open (and autograd records), the attentions of `model` that ATTENTION_CLASSES names apply the rotary
    embedding through `_Rope` where the kernels take the tensors. Not for compiled models or under gradient
    checkpointing (`stock.lean_candidates`)."""
    swaps = [(module, module.apply_rotary_pos_emb) for module in _modules(model)]
    for module, original in swaps:
        module.apply_rotary_pos_emb = _apply(original)
    try:
        yield
    finally:
        for module, original in swaps:
            if getattr(module.apply_rotary_pos_emb, "original", None) is original:  # ours, not rebound since
                module.apply_rotary_pos_emb = original
