"""torchrun process groups and DDP wrapping: the only module that talks to `torch.distributed`.

Run a loop under `torchrun --nproc_per_node N -m posttrain.cli <command> ...`: WORLD_SIZE > 1 in the
environment starts a process group (gloo on the CPU, nccl on CUDA) and the model is wrapped in
DistributedDataParallel. With one process every function here is a no-op, so the loops call them
unconditionally.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os

import torch
import torch.distributed as dist


def env_world() -> tuple[int, int, int]:
    """(rank, world_size, local_rank) from torchrun's environment; (0, 1, 0) without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return 0, 1, 0
    return int(os.environ["RANK"]), world_size, int(os.environ.get("LOCAL_RANK", "0"))


def init(device: torch.device) -> None:
    """Start the process group when WORLD_SIZE > 1 (idempotent)."""
    if env_world()[1] <= 1 or dist.is_initialized():
        return
    if device.type == "cuda":
        dist.init_process_group("nccl", device_id=device, timeout=datetime.timedelta(minutes=30))
    else:
        dist.init_process_group("gloo", timeout=datetime.timedelta(minutes=30))


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (returns the tensor)."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any (one all-reduce, so also a barrier)."""
    if not is_distributed():
        return flag
    total = torch.tensor([float(flag)], device=device)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.item() > 0


def destroy() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def wrap(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around `model` under a process group; `model` itself otherwise.

    No buffer sync in forward: the buffers of a causal LM (rotary frequencies) are constants, and a
    broadcast in every forward would make evaluation, whose micro-batch count differs between ranks,
    deadlock. FSDP2 (`fully_shard`) would slot in here, with `unwrap` returning the sharded module.
    """
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [device.index] if device.type == "cuda" else None
    # torch 2.13 renamed broadcast_buffers to forward_sync_buffers (both: no buffer sync in forward).
    parameters = inspect.signature(DistributedDataParallel).parameters
    no_forward_sync = {
        "forward_sync_buffers" if "forward_sync_buffers" in parameters else "broadcast_buffers": False
    }
    return DistributedDataParallel(model, device_ids=device_ids, **no_forward_sync)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The user's model inside DDP and torch.compile wrappers (for saving, generation, evaluation)."""
    from torch.nn.parallel import DistributedDataParallel

    while isinstance(model, DistributedDataParallel) or hasattr(model, "_orig_mod"):
        model = model.module if isinstance(model, DistributedDataParallel) else model._orig_mod
    return model


def no_sync(model: torch.nn.Module, skip: bool):
    """DDP's `no_sync()` when `skip` (accumulate gradients locally, reduce on the last micro-batch)."""
    if skip and hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()
