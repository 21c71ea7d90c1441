"""A decoder's pieces computed their own way in the training forwards, with autograd's numbers bit for bit: the
SwiGLU MLPs keep two activations less (rl/swiglu.py), the RMSNorms (rl/rmsnorm.py) and the rotary embedding
(rl/rope.py) run in one C pass each way on the CPU, and the linear maps reading a norm keep its input in place of
its output (rl/rmsnorm.py). Each part stands aside where it does not apply."""

from __future__ import annotations

import contextlib

import torch

from posttrain.rl import rmsnorm, rope, swiglu


@contextlib.contextmanager
def layers(model: torch.nn.Module):
    with swiglu.lean_mlps(model), rmsnorm.lean_norms(model), rope.lean_rope(model):
        yield
