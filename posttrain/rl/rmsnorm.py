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

The linear maps that read a norm's output y (q, k, v after the input norm; gate and up after the post-attention
norm) keep y for their weights' gradients, one more (n, H) per norm. While `lean_norms` is open they run
`_NormedLinear`, which keeps x (which the norm keeps anyway) in y's place and makes y again in the backward (the
norm's forward once more for each map that reads it, the same numbers; a pass over (n, H) each): benchmarks/reward.py's step, live tensors at their peak 199 -> 187
MiB, at the same speed within the noise. A y changed in place since the norm made it, or one the map reads
through a slice (the output layer's), is kept as autograd keeps it.
"""

from __future__ import annotations

import contextlib
import weakref

import torch
import torch.nn.functional as F

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


class _NormedLinear(torch.autograd.Function):
    """y (n, H), the rows of the output of a norm (module `norm`, weight `norm_weight`) of x (..., H), weight
    (O, H), bias (O,) or None -> y W^T + b (n, O); saves x (which the norm keeps anyway) where autograd's linear
    keeps y, and makes y again, the norm's forward once more, for the weight's gradient. Two-dimensional inside,
    as torch's linear runs a (..., H) input, so that the output is no view made inside a Function (which could
    not be changed in place)."""

    @staticmethod
    def forward(ctx, y, x, weight, bias, norm_weight, norm):
        ctx.save_for_backward(x, weight, norm_weight)  # the norm's weight saved for its version check
        ctx.norm = norm
        return F.linear(y, weight, bias)

    @staticmethod
    def backward(ctx, dout):
        x, weight, norm_weight = ctx.saved_tensors
        need_y, _, need_w, need_b, _, _ = ctx.needs_input_grad
        # as autograd's backward of linear's (n, H) @ (H, O): dy = dout W, dW = dout^T y, db = dout summed to (O,)
        dy = dout.mm(weight) if need_y else None
        dweight = None
        if need_w:
            # bit for bit the y of the forward; with create_graph, the module's ops (its numbers too), through
            # which the double backward reaches x and the norm's weight
            eps = ctx.norm.variance_epsilon
            made = None if torch.is_grad_enabled() else native.rmsnorm_forward(x, norm_weight, eps)
            y = type(ctx.norm).forward(ctx.norm, x) if made is None else made[0]
            dweight = dout.t().mm(y.reshape(-1, y.shape[-1]))
        dbias = dout.sum_to_size(weight.shape[:1]) if need_b else None
        return dy, None, dweight, dbias, None, None


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
    y = _RMSNorm.apply(x, x, norm.weight, norm.variance_epsilon)
    if not y.is_inference():  # (no version counters under inference mode, and nothing to keep)
        # for the linear maps that read y (`_linear_forward`), while y lives; nothing attached to y itself
        key = id(y)
        _MADE[key] = (weakref.ref(y, lambda _, key=key: _MADE.pop(key, None)), x, norm, _versions(y, x, norm))
    return y


# id(y) -> (a weak reference to y, x, the norm, the versions of y, x and the norm's weight) for each output y of
# a norm alive
_MADE: dict[int, tuple] = {}


def _versions(y, x, norm) -> tuple[int, int, int]:
    return y._version, x._version, norm.weight._version


def _linear_forward(linear, y):
    """`linear`'s forward: `_NormedLinear` on a norm's output where nothing has changed y, x or the norm's weight
    since the norm ran, F.linear else."""
    made = _MADE.get(id(y))
    if (
        made is None
        or made[0]() is not y
        or made[3] != _versions(y, made[1], made[2])
        or not y.is_contiguous()
    ):
        return F.linear(y, linear.weight, linear.bias)
    x, norm = made[1], made[2]
    out = _NormedLinear.apply(y.view(-1, y.shape[-1]), x, linear.weight, linear.bias, norm.weight, norm)
    return out.view(*y.shape[:-1], out.shape[-1])


def _takes_norm_outputs(linear) -> bool:
    """A plain float32 CPU nn.Linear with nothing attached (a LoRA layer, a hook, an FSDP2 shard do not qualify)."""
    return (
        type(linear) is torch.nn.Linear
        and not intercepted(linear)
        and "forward" not in linear.__dict__  # not already swapped (by an enclosing lean_norms)
        and linear.weight.device.type == "cpu"
        and linear.weight.dtype == torch.float32
        and type(linear.weight.data) is torch.Tensor
    )


@contextlib.contextmanager
def lean_norms(model: torch.nn.Module):
    """While open (and autograd records), every RMSNorm of `model` that `_lean` accepts runs `_RMSNorm` on float32
    CPU tensors (`kernels.native.rmsnorm_applies`; the module's own forward elsewhere). Not for compiled models or
    under gradient checkpointing (`stock.lean_candidates`)."""
    candidates = lean_candidates(model)
    norms = [m for m in candidates if _lean(m)]
    linears = [m for m in candidates if norms and _takes_norm_outputs(m)]
    for norm in norms:
        norm.forward = lean_forward(lambda x, norm=norm: _forward(norm, x))
    for linear in linears:
        linear.forward = lean_forward(lambda y, linear=linear: _linear_forward(linear, y))
    try:
        yield
    finally:
        for module in norms + linears:
            del module.forward
