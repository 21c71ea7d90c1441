"""A SwiGLU MLP that keeps two of its four activations for the backward and recomputes the other two.

Notation: n tokens, H hidden, I the MLP's intermediate size.

The Llama family's MLP, y = down(silu(g) * u) with g = gate(x) and u = up(x), run by autograd keeps g (for
silu's backward), a = silu(g) and u (for the product's) and h = a * u (for down's weight gradient): 4 I floats
per token, about two thirds of what a decoder layer keeps (benchmarks/reward.py's model: I = 4 H). `_SwiGLUDown`
keeps g and u and recomputes a and h in the backward (two elementwise ops over n x I), then runs the backward
autograd would, op for op (the products as autograd orders them, silu's own backward): the gradients are the
same numbers bit for bit (tests/test_swiglu.py) with 2 I floats per token less held from forward to backward.
The backward also holds less at once: down's weight gradient comes first (h made again, then freed), and where
nothing reads u again (the graph freed as the backward goes, no saved-tensors hook, u a product made for the
call) du is written over u, so one fresh (n, I) tensor at a time sits on top of g and u, where a plain order
holds h, dh and du together (benchmarks/reward.py's step: the live tensors' peak 121 -> 106 MiB above AdamW's
moments).
On the CPU in float32 the elementwise work runs in C (`kernels.native.swiglu_forward` / `swiglu_backward`: one
pass each way instead of two and five ops), with torch's numbers bit for bit.

`rl.logprobs.token_logprobs` runs it in its training forwards (every causal-LM loop): benchmarks/grpo.py's Online
DPO step peaked at 317 / 322 MiB without it and 309 / 295 with it, at the same time within the run-to-run noise.
The reward model's loss (`rl.reward.reward_step_loss`) runs it too since the C kernels: benchmarks/reward.py's
step, alternating in one process, 0.235 against 0.238 s, peak 352 / 373 against 381 / 379 MiB (session 20, Intel
Xeon; with the torch ops the recomputation had cost it 2-7 %).
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from posttrain.kernels import native
from posttrain.rl.stock import from_transformers, global_hooks, intercepted, lean_candidates, lean_forward

# The MLP classes whose forward is down_proj(act_fn(gate_proj(x)) * up_proj(x)).
MLP_CLASSES = ("LlamaMLP", "MistralMLP", "Qwen2MLP", "Qwen3MLP")


class _SwiGLUDown(torch.autograd.Function):
    """g, u (..., I), weight (H, I) -> down(silu(g) * u) (..., H); saves g, u (and the weight). `u_private`: the
    caller holds u nowhere else (a product made for this call), so the backward may write du over it."""

    @staticmethod
    def forward(ctx, g, u, weight, u_private=False):
        ctx.save_for_backward(g, u, weight)
        # not where a saved-tensors hook may have handed u to someone else too
        ctx.u_private = u_private and _saved_tensors_unhooked()
        h = native.swiglu_forward(g, u)  # one pass in C where it gives the ops' numbers
        return F.linear(F.silu(g) * u if h is None else h, weight)

    @staticmethod
    def backward(ctx, dy):
        g, u, weight = ctx.saved_tensors
        need_g, need_u, need_w = ctx.needs_input_grad[:3]
        dy2d = dy.reshape(-1, dy.shape[-1])
        # as autograd's mm backward of linear's (n, I) @ (I, H): dW = dy^T h, dh = dy W. dW first, so that h is
        # freed before dh and du exist: two (n, I) tensors at a time on top of g and u instead of three.
        dweight = None
        if need_w:
            h = native.swiglu_forward(g, u)  # the forward's h again, bit for bit
            dweight = dy2d.t().mm((F.silu(g) * u if h is None else h).reshape(-1, u.shape[-1]))
            del h
        if not (need_g or need_u):
            return None, None, dweight, None
        dh = dy2d.mm(weight).view(u.shape)
        # one pass in C, as forward; du over u where nothing reads u after this backward
        fused = native.swiglu_backward(
            g, u, dh, want_h=False, du_into_u=need_u and ctx.u_private and _graph_freed()
        )
        if fused is not None:
            _, dg, du = fused
            du = du.detach()  # u's storage: without u's place in the graph
        else:
            dg = torch.ops.aten.silu_backward(dh * u, g) if need_g else None
            du = dh * F.silu(g) if need_u else None
        return dg if need_g else None, du if need_u else None, dweight, None


def _unseen(mlp) -> bool:
    """No forward hook (of up_proj's own, added since the swap, or one for every module) sees u = up_proj(x)."""
    return not (intercepted(mlp.up_proj) or global_hooks())


def _saved_tensors_unhooked() -> bool:
    """No saved-tensors hooks are active (False where torch cannot tell)."""
    top = getattr(torch._C._autograd, "_top_saved_tensors_default_hooks", None)
    return top is not None and top(True) is None


def _graph_freed() -> bool:
    """Whether the running backward frees the graph as it goes (neither retain_graph nor create_graph), so that
    a tensor saved for it is read for the last time (False where torch cannot tell)."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _lean(mlp) -> bool:
    """`mlp` is one of MLP_CLASSES as transformers builds it: silu, plain bias-free linear maps, nothing attached."""
    if type(mlp).__name__ not in MLP_CLASSES or not from_transformers(mlp):
        return False
    parts = (mlp, mlp.gate_proj, mlp.up_proj, mlp.down_proj, mlp.act_fn)
    return (
        type(mlp.act_fn).__name__ in ("SiLUActivation", "SiLU")
        and all(type(m) is torch.nn.Linear and m.bias is None for m in parts[1:4])
        and not any(intercepted(m) for m in parts)
        and "forward" not in mlp.__dict__  # not already swapped (by an enclosing lean_mlps)
        and mlp.down_proj.weight.device.type == "cpu"
        and mlp.down_proj.weight.dtype == torch.float32
        and type(mlp.down_proj.weight.data) is torch.Tensor  # not an FSDP2 shard (a DTensor)
    )


@contextlib.contextmanager
def lean_mlps(model: torch.nn.Module):
    """While open (and autograd records), every MLP of `model` that `_lean` accepts runs `_SwiGLUDown`. Measured
    on the CPU in float32 only; elsewhere, under autocast, for any other MLP, for a compiled model and under
    gradient checkpointing (whose recomputation in the backward, after this closes, would build another graph
    than the forward's) the model runs as it is."""
    mlps = [m for m in lean_candidates(model) if _lean(m)]
    for mlp in mlps:
        mlp.forward = lean_forward(
            lambda x, mlp=mlp: _SwiGLUDown.apply(
                mlp.gate_proj(x), mlp.up_proj(x), mlp.down_proj.weight, _unseen(mlp)
            )
        )
    try:
        yield
    finally:
        for mlp in mlps:
            del mlp.forward
