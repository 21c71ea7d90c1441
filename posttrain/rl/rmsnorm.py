"""The Llama family's RMSNorm in one pass forward and one backward, with autograd's numbers bit for bit.

Notation: n tokens, H hidden.

transformers' RMSNorm (Llama, Mistral, Mixtral, Qwen2, Qwen3 and their MoE kin) is y = w * (x * rsqrt(mean(x^2)
+ eps)) over each token's H floats: five ops forward and about ten backward, each a pass over (n, H) with its own
dispatch. At benchmarks/dpo.py's shape (16 x 64 tokens, H = 256) one norm took ~0.2 ms forward and ~0.9 ms
backward, and a DPO step runs eighteen of each. `_RMSNorm` runs them in C (`kernels.native.rmsnorm_forward` /
`rmsnorm_backward`), which reproduce torch's ops to the bit, sums included (torch's order of additions), and keeps
x and the rows' rsqrt for the backward where autograd also kept x * rsqrt: one (n, H) tensor less per norm. x
enters the Function twice, so that its gradient leaves in autograd's two parts (through x * rsqrt, then through
x^2), which autograd adds into x's gradient after a residual connection's, in that order, as it did before.
"""

from __future__ import annotations

import contextlib

import torch

from posttrain.kernels import native
from posttrain.rl.stock import from_transformers, intercepted, lean_candidates, lean_forward

# The RMSNorm classes whose forward is weight * (x * rsqrt(x.pow(2).mean(-1, keepdim=True) + variance_epsilon)).
NORM_CLASSES = (
    "LlamaRMSNorm", "MistralRMSNorm", "MixtralRMSNorm", "Qwen2RMSNorm", "Qwen2MoeRMSNorm", "Qwen3RMSNorm",
    "Qwen3MoeRMSNorm",
)  # fmt: skip


class _RMSNorm(torch.autograd.Function):
    """x (..., H) given twice, weight (H,), eps -> y (..., H); saves x, the rows' rsqrt (..., 1) and the weight."""

    @staticmethod
    def forward(ctx, x, x_again, weight, eps):
        y, r = native.rmsnorm_forward(x, weight, eps)
        ctx.save_for_backward(x, r, weight)
        ctx.eps = eps
        return y

    @staticmethod
    def backward(ctx, dy):
        x, r, weight = ctx.saved_tensors
        need_x, _, need_w, _ = ctx.needs_input_grad
        # Autograd's products take dy's layout, and torch's sums follow it: the kernel sums each row as contiguous
        # floats, so a dy strided along H takes the ops; a dy whose rows are merely permuted (Qwen3's q_norm, whose
        # output is transposed) takes the kernel for x's gradient and the ops for the weight's sum over the rows.
        out = None if dy.stride(-1) != 1 else native.rmsnorm_backward(dy.contiguous(), x, r, weight, need_w)
        # also in grad mode (create_graph): the same numbers, from ops autograd can differentiate
        if out is None:
            out = _backward_ops(dy, x, weight, ctx.eps, need_w)
        elif need_w and not dy.is_contiguous():
            out = (*out[:2], (dy * (x * r)).sum_to_size(weight.shape))
        dx_mul, dx_pow, dweight = out
        return dx_mul if need_x else None, dx_pow if need_x else None, dweight, None


def _backward_ops(dy, x, weight, eps, need_w):
    """The backward of the module's ops, written out as autograd evaluates it (each op rounds as autograd's)."""
    r = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    dh = dy * weight
    dr = (dh * x).sum(-1, keepdim=True)
    dmean = (-0.5 * dr * r.pow(3)) / x.shape[-1]
    dweight = (dy * (x * r)).sum_to_size(weight.shape) if need_w else None
    return dh * r, dmean * (2.0 * x), dweight


def _lean(norm) -> bool:
    """`norm` is one of NORM_CLASSES as transformers builds it, with its own forward and nothing attached."""
    return (
        type(norm).__name__ in NORM_CLASSES
        and from_transformers(norm)
        # its forward not replaced (the kernels hub's kernelize)
        and type(norm).forward.__module__ == type(norm).__module__
        and isinstance(getattr(norm, "variance_epsilon", None), float)
        and not intercepted(norm)
        and "forward" not in norm.__dict__  # not already swapped (by an enclosing lean_norms)
    )


def _forward(norm, x):
    if not native.rmsnorm_applies(x, norm.weight):
        return type(norm).forward(norm, x)
    return _RMSNorm.apply(x, x, norm.weight, norm.variance_epsilon)


@contextlib.contextmanager
def lean_norms(model: torch.nn.Module):
    """While open (and autograd records), every RMSNorm of `model` that `_lean` accepts runs `_RMSNorm` on float32
    CPU tensors (`kernels.native.rmsnorm_applies`; the module's own forward elsewhere). Not for compiled models or
    under gradient checkpointing (`stock.lean_candidates`)."""
    norms = [m for m in lean_candidates(model) if _lean(m)]
    for norm in norms:
        norm.forward = lean_forward(lambda x, norm=norm: _forward(norm, x))
    try:
        yield
    finally:
        for norm in norms:
            del norm.forward
