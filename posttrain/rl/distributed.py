"""torchrun process groups, DDP wrapping and FSDP2 sharding: the only module that talks to `torch.distributed`
(checkpoint.py adds torch.distributed.checkpoint for sharded state).

Run a loop under `torchrun --nproc_per_node N -m posttrain.cli <command> ...`: WORLD_SIZE > 1 in the
environment starts a process group (gloo on the CPU, nccl on CUDA) and the model is wrapped in
DistributedDataParallel, or, with `--fsdp full_shard`, sharded in place with FSDP2 (`shard`). With one
process every function here is a no-op, so the loops call them unconditionally.

FSDP2, as set up here (`shard`): each decoder layer (the classes the model lists in `_no_split_modules`, as
transformers and accelerate find them) and the root are units. A layer's parameters are all-gathered
before its forward and freed after it, and again in backward, whose gradients are reduce-scattered (summed,
then divided by the world size, as DDP averages) into each rank's shard as each layer finishes. The root
unit (embeddings, final norm, output layer) stays gathered from its forward until its backward, so the
fused log-prob kernels (rl/logprobs.py), which read the output layer's weight after the forward, get the
gathered weight; a frozen model (a reference) has no backward, so its root is freed after each forward
(`release_frozen_root`, called by rl/logprobs.py) and gathered again by the next. Gradients are
reduce-scattered on every micro-batch (no `no_sync`): accumulating unsharded gradients would hold a full copy
per rank. The optimizer only ever sees the shards (DTensors).
Generation and the embedded task's exact-match evaluation run inside `gathered`: every unit gathered for
the whole call, since ranks decode different lengths and a per-layer all-gather would need them in step.
"""

from __future__ import annotations

import contextlib
import datetime
import inspect
import os
import time

import torch
import torch.distributed as dist

from posttrain.rl.config import ConfigError


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


# Seconds without the GIL before the process group goes (see `destroy`).
TEARDOWN_PAUSE_S = 0.05


def destroy() -> None:
    """Tear down the process group. First a pause without the GIL: gloo's worker thread frees each finished
    collective, whose tensors are Python objects (so it takes the GIL), and the group's destructor joins that
    thread while holding the GIL, from wherever its last reference goes (DDP's reducer, at the end of `fit`).
    Caught mid-free, the two deadlock: a torchrun test hung 1 run in ~15 here (torch 2.13, gloo; py-spy: the
    main thread in ~ProcessGroupGloo joining, the worker in ~AsyncBarrierWork waiting for the GIL)."""
    if dist.is_available() and dist.is_initialized():
        time.sleep(TEARDOWN_PAUSE_S)
        dist.destroy_process_group()


def check_launch(config) -> None:
    """--fsdp needs several processes started by torchrun: a ConfigError naming the option otherwise."""
    if not getattr(config, "fsdp_enabled", False):
        return
    world_size = env_world()[1]
    if "WORLD_SIZE" not in os.environ:
        raise ConfigError(
            f"fsdp={config.fsdp!r} shards the model over processes started by torchrun, but this process was "
            "launched without it: run `torchrun --nproc_per_node N -m posttrain.cli ...` (N >= 2), or drop --fsdp"
        )
    if world_size < 2:
        raise ConfigError(
            f"fsdp={config.fsdp!r} but torchrun started {world_size} process: there is nothing to shard over; "
            "pass --nproc_per_node 2 or more, or drop --fsdp"
        )


def wrap(
    model: torch.nn.Module, device: torch.device, *, fsdp: bool = False, bf16: bool = False
) -> torch.nn.Module:
    """DistributedDataParallel around `model` under a process group (`fsdp`: `model` sharded in place with
    FSDP2, `shard`); `model` itself otherwise.

    No buffer sync in forward: the buffers of a causal LM (rotary frequencies) are constants, and a
    broadcast in every forward would make evaluation, whose micro-batch count differs between ranks,
    deadlock. FSDP2 (`fully_shard`) would slot in here, with `unwrap` returning the sharded module.
    """
    if not is_distributed():
        return model
    if fsdp:
        return shard(model, bf16=bf16)
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


# ---------------------------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------------------------


def _fsdp_module_class():
    from torch.distributed.fsdp import FSDPModule

    return FSDPModule


def is_sharded(model) -> bool:
    """`model` (or the model inside a wrapper) was sharded by `shard`."""
    if model is None or not dist.is_available():
        return False
    return isinstance(unwrap(model), _fsdp_module_class())


def _layer_classes(model: torch.nn.Module) -> set[str]:
    """The class names transformers models list in `_no_split_modules` (their decoder layers), over every
    pretrained model inside `model` (a peft model wraps one)."""
    names = set()
    for module in model.modules():
        names.update(getattr(module, "_no_split_modules", None) or ())
    return names


def shard(model: torch.nn.Module, *, bf16: bool = False) -> torch.nn.Module:
    """FSDP2 in place: `fully_shard` on every decoder layer, then on the root (the rest: embeddings, final
    norm, output layer). With bf16 the gathered parameters are bfloat16 and gradients are reduced in float32
    (`MixedPrecisionPolicy`). Works for a frozen model (a reference: no optimizer, nothing reduced).
    Returns `model`, now an `FSDPModule` whose parameters are this rank's shards (DTensors)."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    classes = _layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in classes]
    if not layers:
        raise ConfigError(
            f"fsdp: {type(model).__name__} names no decoder layer class (transformers' _no_split_modules) "
            "to shard by"
        )
    kwargs = {}
    if bf16:
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for layer in layers:
        fully_shard(layer, **kwargs)
    # The root stays gathered from forward to backward: rl/logprobs.py reads the output layer's weight then.
    fully_shard(model, reshard_after_forward=False, **kwargs)
    return model


def _units(model) -> list[torch.nn.Module]:
    FSDPModule = _fsdp_module_class()
    return [m for m in unwrap(model).modules() if isinstance(m, FSDPModule)]


def reshard(model) -> None:
    """Free every gathered unit of a sharded model (a trained model's root stays gathered after a forward
    without backward); a no-op otherwise. Before reading or changing its shards."""
    for unit in _units(model) if is_sharded(model) else ():
        unit.reshard()


GATHERED_FLAG = "_posttrain_gathered"  # set on a sharded model's root while `gathered` holds it whole


def release_frozen_root(model) -> None:
    """After a forward of a sharded model with nothing to train (a frozen reference), free its root unit
    (embeddings, final norm, output layer), which `shard` keeps gathered after forward for a backward that
    never comes; its next forward gathers it again. A no-op for any other model, for a model with trainable
    parameters (the policy's root is needed by its backward), and inside `gathered` (where forwards must not
    gather: ranks run different numbers of them)."""
    if not is_sharded(model):
        return
    root = unwrap(model)
    if getattr(root, GATHERED_FLAG, False) or any(p.requires_grad for p in root.parameters()):
        return
    root.reshard()


@contextlib.contextmanager
def gathered(model):
    """Inside the block a sharded model is whole on every rank and its forwards do no collective, so ranks
    may run different numbers of them (generation); a no-op for any other model. Memory: the full model
    per rank while it lasts."""
    # a nested block is a no-op: the outer one holds the model whole, and frees it at its end
    if not is_sharded(model) or getattr(unwrap(model), GATHERED_FLAG, False):
        yield
        return
    root, units = unwrap(model), _units(model)
    for unit in units:
        unit.unshard()
        unit.set_reshard_after_forward(False, recurse=False)
    setattr(root, GATHERED_FLAG, True)
    try:
        yield
    finally:
        setattr(root, GATHERED_FLAG, False)
        for unit in units:
            unit.set_reshard_after_forward(unit is not root, recurse=False)  # as `shard` left them
            unit.reshard()


def all_reduce_max(value: int, device: torch.device) -> int:
    """The largest `value` over ranks (itself with one process)."""
    if not is_distributed():
        return value
    total = torch.tensor([value], device=device)
    dist.all_reduce(total, op=dist.ReduceOp.MAX)
    return int(total.item())


def plain_copy(model) -> torch.nn.Module | None:
    """The sharded `model` gathered into an ordinary module of the same kind (its peft wrapping included),
    on the CPU of rank 0; None on the other ranks. Collective. For the final `save_pretrained` (and a
    merge), which need the whole model in one process."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    module = unwrap(model)
    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    dtype = next(iter(full.values())).dtype
    with torch.device("meta"):
        copy = _build_like(module)
    copy.to(dtype).to_empty(device="cpu")
    copy.tie_weights()  # to_empty gives each parameter its own storage: tied ones are tied again
    result = copy.load_state_dict(full, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise RuntimeError(
            f"the gathered state does not fit a fresh {type(copy).__name__}: missing "
            f"{result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    # Buffers are not sharded (FSDP2 shards parameters); the non-persistent ones (rotary frequencies) are not
    # in the state dict, so they are copied from this rank's module.
    own = dict(module.named_buffers())
    for name, buffer in copy.named_buffers():
        buffer.copy_(own[name])
    return copy.train(module.training)


def _plain_class(module: torch.nn.Module) -> type:
    FSDPModule = _fsdp_module_class()
    cls = type(module)
    if issubclass(cls, FSDPModule):  # fully_shard swaps in a class FSDP<Name>(FSDPModule, <Name>)
        cls = next(base for base in cls.__bases__ if not issubclass(base, FSDPModule))
    return cls


def _build_like(module: torch.nn.Module) -> torch.nn.Module:
    """A fresh module of `module`'s (unsharded) class and config; a peft model rebuilt around a fresh base."""
    from posttrain.rl import lora

    if lora.is_peft(module):
        base = module.get_base_model()
        return lora.wrap_like(_plain_class(base)(base.config), module)
    return _plain_class(module)(module.config)
