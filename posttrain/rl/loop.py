"""The machinery every training loop shares: start-up, optimizer and schedule, gradient accumulation,
data order, evaluation, and `fit`, an offline loop built from those pieces.

An offline loop (SFT, reward model, DPO) is

    run = loop.start(config, command="sft")
    model, tokenizer = ...
    loop.fit(run, model, tokenizer, train_rows, collate_fn, loss_fn, count_fn, eval_rows=eval_rows)

where `loss_fn(model, batch, num_items) -> (loss, metrics)` returns its micro-batch's loss already
divided by `num_items`, the number of loss units (tokens, sequences, pairs: whatever `count_fn(batch)`
counts) in the WHOLE optimizer step over all micro-batches and ranks. Summing micro-batch losses then
gives the step's mean loss however the step is split, which is what makes gradient accumulation and
data parallelism exact (each loss unit weighs the same). Metrics follow the same rule.

An online loop (GRPO, PPO) calls `start`, `prepare_model`, `build_optimizer`, `build_scheduler`,
`accumulate` (with a `faults.StepGuard` for non-finite steps and stop signals), `evaluate`,
`checkpoint.save_checkpoint` / `load_checkpoint`, `MetricsLogger` and `finish` itself.

Data order, as transformers' Trainer (with accelerate) counts it. Epoch e visits the rows in an order
that is a pure function of (seed, e): a fresh seeded permutation per epoch (`random`), the dataset's
order (`sequential`), or a seeded permutation regrouped so that rows of similar length share a
micro-batch (`group_by_length`, transformers' LengthGroupedSampler: megabatches of min(50, N / 4G) x G
rows, G = per_device_train_batch_size x gradient_accumulation_steps, each sorted longest first, and the
longest row of all moved to the front). A global micro-batch is per_device_train_batch_size *
world_size consecutive rows of the order and rank r takes its r-th slice; an optimizer step takes
gradient_accumulation_steps micro-batches. Every row trains every epoch: the last micro-batch may be
short, and the last optimizer step of an epoch may take fewer micro-batches (its loss is still the mean
over the tokens it has, since num_items counts that step). Under torchrun, when the rows do not fill the
last global micro-batch, it is completed from the start of the epoch's order, so that every rank has a
full micro-batch (accelerate's `even_batches`; those rows train twice in that epoch). With
dataloader_drop_last, an epoch's last global micro-batch is dropped instead when it is not full.
Steps per epoch are ceil(micro-batches per rank / gradient_accumulation_steps), and a run lasts
ceil(num_train_epochs * steps per epoch) steps unless max_steps says otherwise. The position in the
data is a function of the global step alone, which is all a checkpoint needs to store to resume exactly.
"""

from __future__ import annotations

import ctypes
import json
import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from posttrain.kernels import cpu_pool
from posttrain.rl import checkpoint, distributed, faults, lora, stock
from posttrain.rl.config import ConfigError, TrainConfig, save_config
from posttrain.rl.logger import METRICS_FILE, MetricsLogger, tensorboard_available

# Options that fix which rows each optimizer step sees; a resumed run must keep them.
DATA_ORDER_OPTIONS = (
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "seed",
    "dataloader_drop_last",
    "train_sampling_strategy",
    "length_column_name",
)

LossFn = Callable[[torch.nn.Module, dict, torch.Tensor], tuple[torch.Tensor, dict]]


# ---------------------------------------------------------------------------------------------------------
# Start-up
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Run:
    """What `start` decided: where the run lives, on which device and process, in which precision."""

    config: TrainConfig
    command: str
    output_dir: Path
    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    bf16: bool = False
    learning_rate: float | None = None
    resume_from: Path | None = None  # checkpoint folder to resume from, checked at start
    info: dict = field(default_factory=dict)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        """bf16 autocast for forward passes when enabled (a no-op context otherwise)."""
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def log_info(self, values: dict) -> None:
        """Facts about the run (e.g. rows dropped while tokenizing): printed and kept in run_info.json."""
        self.info.update(values)
        if self.is_main:
            print(f"[{self.command}] " + "  ".join(f"{k}={v}" for k, v in values.items()))
            (self.output_dir / "run_info.json").write_text(json.dumps(self.info, indent=2, default=str))


def bf16_supported(device: torch.device) -> bool:
    """bfloat16 autocast works on this device (every CPU torch supports; CUDA from Ampere on)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return True


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)  # seeds CUDA generators too


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3


def keep_freed_cpu_memory() -> bool:
    """Keep a training step's large CPU tensors' memory for reuse, apart from the small objects around them.

    glibc serves a block above its mmap threshold (128 KiB, rising to at most 32 MiB) from fresh pages and
    unmaps it when freed, and returns the free top of its heap past the trim threshold, so a training step's
    large tensors (gradients, activations, output-layer tiles) fault in and are zeroed again every step:
    ~16,000 page faults per step of benchmarks/sft.py. So glibc keeps freed blocks of up to 32 MiB (mallopt),
    and tensors of 64 KiB or more come from `kernels.cpu_pool`, a range of their own where freed blocks stay
    too and autograd's small objects cannot split them (see its docstring: the reward model's step peaked
    ~70 MiB lower). Keeping freed memory is what jemalloc and tcmalloc (the allocators PyTorch's CPU tuning
    guide recommends) do; CUDA memory has torch's caching allocator anyway. Returns whether glibc's setting
    took (False, changing nothing there, without glibc); the pool is installed either way where it builds.
    """
    cpu_pool.install()
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (glibc only: other C libraries read these parameters differently)
    except (OSError, AttributeError):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, 32 << 20)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, 1 << 30))


def start(config: TrainConfig, command: str, *, default_learning_rate: float | None = None) -> Run:
    """Check the options against the machine and any checkpoint, then start the run.

    Everything that can be wrong with the options is raised here (ConfigError naming the option)
    before any work: bf16 on a device without it, report_to=tensorboard without tensorboard, a resume
    path that is not a checkpoint or whose data-order options differ, an output_dir holding an earlier
    run's checkpoints without resume_from_checkpoint (an error rather than TRL's silent overwrite: the
    new run's checkpoints would interleave with the old ones). Then: process group (WORLD_SIZE > 1),
    seeds, output_dir with config.yaml.
    """
    distributed.check_launch(config)
    rank, world_size, local_rank = distributed.env_world()
    if torch.cuda.is_available():
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")

    if config.bf16 and not bf16_supported(device):
        raise ConfigError(
            f"bf16=true but {device.type} device {device} does not support bfloat16; pass --bf16 false"
        )
    bf16 = (
        bool(config.bf16) if config.bf16 is not None else (device.type == "cuda" and bf16_supported(device))
    )
    if config.report_to == "tensorboard" and not tensorboard_available():
        raise ConfigError("report_to='tensorboard' but the tensorboard package is not installed")
    learning_rate = config.learning_rate if config.learning_rate is not None else default_learning_rate
    if learning_rate is None:
        raise ConfigError(
            f"learning_rate is not set and the {command} loop has no default: pass --learning_rate"
        )

    output_dir = Path(config.output_dir if config.output_dir is not None else f"runs/{command}")
    distributed.init(device)
    if rank == 0:  # a save killed midway may have left the newest checkpoint under a temporary name
        checkpoint.clean_temporary(output_dir)
    distributed.barrier()
    resume_from = None
    if config.resume_from_checkpoint is not None:
        resume_from = checkpoint.resolve_resume(output_dir, config.resume_from_checkpoint)
        _check_resumable(config, world_size, resume_from)
    elif checkpoint.list_checkpoints(output_dir):
        names = ", ".join(p.name for _, p in checkpoint.list_checkpoints(output_dir))
        raise ConfigError(
            f"output_dir {str(output_dir)!r} already holds checkpoints of an earlier run ({names}): pass "
            "--resume_from_checkpoint latest to continue it, or choose another --output_dir"
        )

    set_seed(config.seed)
    keep_freed_cpu_memory()
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        save_config(config, output_dir / "config.yaml")
    distributed.barrier()
    return Run(
        config=config,
        command=command,
        output_dir=output_dir,
        device=device,
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        bf16=bf16,
        learning_rate=learning_rate,
        resume_from=resume_from,
    )


def _check_resumable(config: TrainConfig, world_size: int, path: Path) -> None:
    state = checkpoint.read_trainer_state(path)
    for name in DATA_ORDER_OPTIONS:
        if name in state and state[name] != getattr(config, name):
            raise ConfigError(
                f"{name}={getattr(config, name)} but checkpoint {str(path)!r} was written with {name}={state[name]}; "
                "resume with the same value (it fixes the data order)"
            )
    has_adapter = (path / checkpoint.ADAPTER_CONFIG).is_file()
    if has_adapter != config.use_peft:
        raise ConfigError(
            f"use_peft={config.use_peft} but checkpoint {str(path)!r} holds "
            f"{'LoRA adapters' if has_adapter else 'full weights'}: resume with use_peft={has_adapter}"
        )
    sharded = checkpoint.is_sharded_checkpoint(path)
    if sharded != config.fsdp_enabled:
        raise ConfigError(
            f"fsdp={config.fsdp!r} but checkpoint {str(path)!r} holds "
            f"{'weights sharded by --fsdp full_shard' if sharded else 'full weights (written without --fsdp)'}: "
            f"resume with {'--fsdp full_shard' if sharded else 'no --fsdp'}"
        )
    if state.get("world_size", world_size) != world_size:
        why = "its shards and the data order" if sharded else "the data order"
        raise ConfigError(
            f"checkpoint {str(path)!r} was written by {state['world_size']} processes but this run has "
            f"{world_size} (torchrun --nproc_per_node): resume with the same world size (it fixes {why})"
        )


def finish(run: Run) -> None:
    """End the run: tear down the process group."""
    distributed.barrier()
    distributed.destroy()


# ---------------------------------------------------------------------------------------------------------
# Model, optimizer, schedule
# ---------------------------------------------------------------------------------------------------------


def prepare_model(run: Run, model: torch.nn.Module) -> torch.nn.Module:
    """Move to the run's device, enable gradient checkpointing if asked, add LoRA adapters if asked
    (`lora.wrap`: only they train from then on), train mode, DDP-wrap (under --fsdp: shard with FSDP2,
    `distributed.shard`, in bf16 when the run is).

    Returns the module to train (the DDP wrapper under torchrun; the sharded model itself under --fsdp);
    `distributed.unwrap` gives back the model (the peft model under use_peft).
    """
    model.to(run.device)
    if run.config.gradient_checkpointing:
        if not getattr(model, "supports_gradient_checkpointing", False):
            raise ConfigError(f"gradient_checkpointing=true but {type(model).__name__} does not support it")
        # transformers 5 renamed gradient_checkpointing_enable (now a deprecated alias) to
        # activation_checkpointing_enable. Non-reentrant checkpointing works with DDP and frozen embeddings.
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if getattr(model, "config", None) is not None:
            # a KV cache is useless in training and conflicts with checkpointing
            model.config.use_cache = False
    if run.config.torch_compile:
        compile_decoder(model)
    if run.config.use_peft:
        model = lora.wrap(model, run.config)
    model.train()
    return distributed.wrap(model, run.device, fsdp=run.config.fsdp_enabled, bf16=run.bf16)


RECOMPILE_LIMIT = 16


def compile_decoder(model: torch.nn.Module) -> None:
    """torch_compile: compile `model`'s decoder stack in place (`nn.Module.compile`: the module tree, its
    parameters and their state-dict names stay as they are, so checkpoints, peft adapters added afterwards and
    `distributed.unwrap` see the model as before). Only the decoder: the output layer runs in the fused
    log-prob kernels (rl/logprobs.py), whose tiled Python loop a graph would not capture whole."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    if not isinstance(decoder, torch.nn.Module) or decoder is model:
        raise ConfigError(
            f"torch_compile=true needs a transformers model with a decoder stack (get_decoder()); "
            f"{type(model).__name__} has none"
        )
    # One decoder's variants: the shared-prompt forward's prefix and rest calls, each compiled for its first
    # shape and then with sizes dynamic, with and without gradients (old log-probs), and a LoRA reference's
    # adapters-off calls: up to 12, past torch's default of 8, beyond which a new variant would run eagerly.
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    decoder.compile()


def build_optimizer(model: torch.nn.Module, config: TrainConfig, learning_rate: float | None = None):
    """AdamW over the trainable parameters; no weight decay on 1-D parameters (biases, norm weights).

    transformers picks the no-decay set by module class and name ("bias", "layernorm", "rmsnorm"), which
    misses e.g. Qwen2's final `model.norm.weight`; the dimension rule catches every norm and bias.
    """
    learning_rate = config.learning_rate if learning_rate is None else learning_rate
    if learning_rate is None:
        raise ConfigError("learning_rate is not set")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": config.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        [g for g in groups if g["params"]],
        lr=learning_rate,
        betas=(config.adam_beta1, config.adam_beta2),
        eps=config.adam_epsilon,
        # One fused kernel over all parameters (CPU and CUDA alike): the per-parameter loop cost ~10% of a
        # small model's CPU step (benchmarks/sft.py profile); same math.
        fused=params[0].device.type in ("cpu", "cuda") and params[0].is_floating_point(),
    )


def lr_multiplier(step: int, config: TrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step `step` (0-based) as a fraction of the peak: transformers'
    `get_scheduler` names and formulas.

    constant: 1 (no warmup, warmup_steps is ignored, as in transformers). The others warm up first,
    step / warmup_steps (so the first step runs at 0), then constant_with_warmup: 1;
    linear: (total - step) / (total - warmup);  cosine: (1 + cos(pi * progress)) / 2,
    progress = (step - warmup) / (total - warmup).
    """
    kind = config.lr_scheduler_type
    if kind == "constant":
        return 1.0
    warmup = config.warmup_steps
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant_with_warmup":
        return 1.0
    progress = (step - warmup) / max(1, total_steps - warmup)
    if kind == "linear":
        return max(0.0, 1.0 - progress)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def build_scheduler(optimizer, config: TrainConfig, total_steps: int):
    """LambdaLR following `lr_multiplier`; call `.step()` once per optimizer step."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_multiplier(step, config, total_steps))


# ---------------------------------------------------------------------------------------------------------
# One optimizer step
# ---------------------------------------------------------------------------------------------------------


def to_device(batch: dict, device: torch.device) -> dict:
    return {
        k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()
    }


def count_tokens(batch: dict) -> torch.Tensor:
    """Non-padding input tokens (TRL's num_tokens): the collator's count when it gives one (packed rows
    with filler), else the attention mask's sum, else every token (padding-free)."""
    if "num_tokens" in batch:
        return batch["num_tokens"]
    if "attention_mask" in batch:
        return batch["attention_mask"].sum()
    return torch.tensor(batch["input_ids"].numel(), device=batch["input_ids"].device)


def global_count(run: Run, batches: list[dict], count_fn) -> torch.Tensor:
    """Σ count_fn over `batches` and over all ranks, on the device, at least 1 (no host sync).

    int64 when every count is an integer (tokens, sequences, pairs), else float64: exact far past the 2^24
    units at which a float32 sum stops counting by ones. The clamp makes a step without any loss unit a zero
    loss with zero gradient instead of 0/0.
    """
    counts = [torch.as_tensor(count_fn(b), device=run.device) for b in batches]
    exact = torch.float64 if any(c.is_floating_point() for c in counts) else torch.int64
    total = sum((c.to(exact) for c in counts), torch.zeros((), dtype=exact, device=run.device))
    return distributed.all_reduce_sum(total).clamp(min=1)


def _accumulate_metrics(sums: dict, values: dict, device: torch.device) -> None:
    """sums[name] += value, as detached float64 scalars on the device (no host sync; float64 keeps counts
    such as num_tokens exact past 2^24)."""
    for name, value in values.items():
        value = torch.as_tensor(value, device=device).detach().to(torch.float64)
        sums[name] = sums[name] + value if name in sums else value


def forward_backward(run: Run, model, micro_batches: list[dict], loss_fn: LossFn, count_fn) -> dict:
    """Accumulate one optimizer step's gradients into `.grad`; returns this rank's summed loss and metrics.

    Returns {"loss", "num_tokens", *metrics}: scalar tensors summed over the micro-batches (not yet
    over ranks). Under DDP the gradient all-reduce runs only on the last micro-batch (`no_sync`).
    """
    batches = [to_device(b, run.device) for b in micro_batches]
    num_items = global_count(run, batches, count_fn)
    # DDP averages gradients over ranks; loss_fn divides by the global count already, so undo the mean.
    scale = run.world_size if distributed.is_distributed() else 1
    sums: dict[str, torch.Tensor] = {}
    for i, batch in enumerate(batches):
        with distributed.no_sync(model, skip=i < len(batches) - 1):
            with run.autocast():
                loss, metrics = loss_fn(model, batch, num_items)
            (loss * scale).backward()
        _accumulate_metrics(sums, {"loss": loss, "num_tokens": count_tokens(batch), **metrics}, run.device)
    return sums


def clip_gradients(run: Run, model) -> torch.Tensor:
    """Clip the global gradient norm to max_grad_norm (0: no clipping); returns the norm before clipping."""
    max_norm = run.config.max_grad_norm if run.config.max_grad_norm > 0 else math.inf  # inf: norm only
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    # Under FSDP2 the gradients are shards (DTensors): the norm is already over all of them (each rank's
    # partial sum of squares all-reduced), a replicated DTensor; its local value is the global norm.
    return norm.to_local() if hasattr(norm, "to_local") else norm


def optimizer_step(optimizer, scheduler, apply: bool = True) -> None:
    """Step the optimizer and the schedule (unless the step is skipped: `apply` False), zero the gradients."""
    if apply:
        optimizer.step()
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)


def accumulate(
    run: Run,
    model,
    optimizer,
    scheduler,
    micro_batches: list[dict],
    loss_fn: LossFn,
    count_fn,
    guard: faults.StepGuard | None = None,
) -> dict:
    """One optimizer step over this rank's `micro_batches`; returns its global metrics as floats.

    Keys: loss, num_tokens (this step's non-pad input tokens, all ranks), the loss_fn's metrics (sums
    over micro-batches and ranks: global means when loss_fn divides by num_items), grad_norm (before
    clipping), learning_rate (the one this step used), tokens_per_second.

    A step whose loss or grad norm is not finite is not applied; `guard` decides whether the run goes
    on (skip_nonfinite_steps) and carries this rank's stop request in and every rank's verdict out
    (`guard.stop`). Without a guard a non-finite step raises `faults.NonFiniteStep`.
    """
    t0 = time.perf_counter()
    sums = forward_backward(run, model, micro_batches, loss_fn, count_fn)
    grad_norm = clip_gradients(run, model)
    names = list(sums)
    stop = torch.full((), float(guard is not None and guard.stop_requested), device=run.device)  # no copy
    reduced = distributed.all_reduce_sum(torch.stack([sums[n] for n in names] + [stop]))
    # The step's one host sync: every metric, the stop flag and the grad norm cross to the CPU in a
    # single transfer, before optimizer.step() so that a non-finite step never reaches the weights.
    *values, stop_ranks, norm = torch.cat(
        [reduced, grad_norm.detach().float().reshape(1).to(reduced.device)]
    ).tolist()
    out = dict(zip(names, values, strict=True))
    out["grad_norm"] = norm
    out["learning_rate"] = scheduler.get_last_lr()[0]
    finite = math.isfinite(out["loss"]) and math.isfinite(norm)
    optimizer_step(optimizer, scheduler, apply=finite)
    (guard or faults.StepGuard(run, limit=0)).after_step(out, finite, stop=stop_ranks > 0)
    out["tokens_per_second"] = out["num_tokens"] / max(time.perf_counter() - t0, 1e-9)
    return out


# ---------------------------------------------------------------------------------------------------------
# Data order
# ---------------------------------------------------------------------------------------------------------


def micro_batches_per_epoch(num_rows: int, config: TrainConfig, world_size: int) -> int:
    """Micro-batches each rank trains per epoch: ceil (floor with dataloader_drop_last) of
    num_rows / (per_device_train_batch_size * world_size), transformers' length of the sharded loader."""
    global_micro = config.per_device_train_batch_size * world_size
    if config.dataloader_drop_last:
        return num_rows // global_micro
    return -(-num_rows // global_micro)


def plan_steps(num_rows: int, config: TrainConfig, world_size: int) -> tuple[int, int]:
    """(steps_per_epoch, total_steps) as transformers counts them; the last step of an epoch may be partial."""
    micro = micro_batches_per_epoch(num_rows, config, world_size)
    if micro == 0:
        global_micro = config.per_device_train_batch_size * world_size
        reason = (
            "dataloader_drop_last=true drops every micro-batch of the epoch"
            if num_rows
            else "there is nothing to train on"
        )
        raise ConfigError(
            f"the train set has {num_rows} rows, fewer than one micro-batch on all processes "
            f"(per_device_train_batch_size {config.per_device_train_batch_size} x processes {world_size} = "
            f"{global_micro}): {reason}"
        )
    steps_per_epoch = -(-micro // config.gradient_accumulation_steps)
    total = config.max_steps if config.max_steps > 0 else math.ceil(config.num_train_epochs * steps_per_epoch)
    return steps_per_epoch, total


def epoch_progress(step: int, num_rows: int, config: TrainConfig, world_size: int) -> float:
    """The `epoch` logged after `step` optimizer steps: epochs done + the fraction of the current epoch's
    micro-batches trained (transformers' value, which a short last step makes uneven)."""
    steps_per_epoch, _ = plan_steps(num_rows, config, world_size)
    epoch, position = divmod(step, steps_per_epoch)
    if position == 0:
        return float(epoch)
    micro = micro_batches_per_epoch(num_rows, config, world_size)
    return epoch + position * config.gradient_accumulation_steps / micro


def row_lengths(rows, length_column_name: str) -> list[int]:
    """Each row's length for group_by_length: its `length_column_name` value, else len(input_ids)."""
    if hasattr(rows, "column_names"):  # datasets.Dataset: read one column
        if length_column_name in rows.column_names:
            return [int(n) for n in rows[length_column_name]]
        if "input_ids" in rows.column_names:
            return [len(ids) for ids in rows["input_ids"]]
    elif len(rows) and length_column_name in rows[0]:
        return [int(row[length_column_name]) for row in rows]
    elif len(rows) and "input_ids" in rows[0]:
        return [len(row["input_ids"]) for row in rows]
    raise ConfigError(
        f"train_sampling_strategy=group_by_length needs row lengths: the rows have neither a "
        f"length_column_name={length_column_name!r} column nor input_ids"
    )


def _permutation(num_rows: int, seed: int, epoch: int) -> torch.Tensor:
    mixed = int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])  # (seed, epoch) -> 32 bits
    return torch.randperm(num_rows, generator=torch.Generator().manual_seed(mixed))


def epoch_order(
    num_rows: int,
    seed: int,
    epoch: int,
    strategy: str = "random",
    lengths: list[int] | None = None,
    group_size: int = 1,
) -> list[int]:
    """The order of row indices that epoch `epoch` visits, a pure function of its arguments.

    random: a permutation seeded by (seed, epoch); sequential: 0..N-1; group_by_length: that permutation
    cut into megabatches of min(N // (4 * group_size), 50) (at least 1) x group_size rows, each sorted by
    `lengths` longest first, then the longest row of all swapped to the front (an out-of-memory shows on
    the first step), as transformers' LengthGroupedSampler with batch size `group_size`.
    """
    if strategy == "sequential":
        return list(range(num_rows))
    order = _permutation(num_rows, seed, epoch).tolist()
    if strategy == "random":
        return order
    if strategy != "group_by_length":
        raise ValueError(f"unknown train_sampling_strategy {strategy!r}")
    size = max(1, min(num_rows // (group_size * 4), 50)) * group_size
    megabatches = [
        sorted(order[i : i + size], key=lambda row: lengths[row], reverse=True)
        for i in range(0, num_rows, size)
    ]
    longest = max(range(len(megabatches)), key=lambda m: lengths[megabatches[m][0]])  # first of the maxima
    megabatches[0][0], megabatches[longest][0] = megabatches[longest][0], megabatches[0][0]
    return [row for megabatch in megabatches for row in megabatch]


def step_indices(
    order: list[int], position: int, config: TrainConfig, rank: int, world_size: int
) -> list[list[int]]:
    """This rank's micro-batches (row indices) for the `position`-th optimizer step of an epoch.

    The epoch's last step takes the micro-batches that are left (fewer than gradient_accumulation_steps
    when they do not divide); one process trains a short last micro-batch as it is, several complete it
    from the start of the order (accelerate's even_batches) so that every rank holds a full one.
    """
    per_device, accum = config.per_device_train_batch_size, config.gradient_accumulation_steps
    global_micro, n = per_device * world_size, len(order)
    first = position * accum
    last = min(first + accum, micro_batches_per_epoch(n, config, world_size))
    out = []
    for micro in range(first, last):
        start = micro * global_micro + rank * per_device
        if world_size == 1:
            out.append(order[start : start + per_device])
        else:
            out.append([order[i % n] for i in range(start, start + per_device)])
    return out


def take_rows(rows, indices: list[int]) -> list[dict]:
    """Rows `indices` of a list of dicts or a `datasets.Dataset`, as a list of dicts."""
    if hasattr(rows, "column_names"):  # datasets.Dataset: one columnar read instead of a read per row
        columns = rows[indices]
        return [dict(zip(columns, values, strict=True)) for values in zip(*columns.values(), strict=True)]
    return [rows[i] for i in indices]


# ---------------------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------------------


def evaluate(run: Run, model, eval_rows, collate_fn, loss_fn: LossFn, count_fn, eval_fn=None) -> dict:
    """eval_loss and eval_<metric> of `loss_fn` over all of `eval_rows`, plus `eval_fn(model)`'s metrics.

    Rows are split into contiguous shards over ranks, each in micro-batches of per_device_eval_batch_size;
    num_items counts the whole eval set. A set with fewer rows than processes is still evaluated, as
    transformers does: the ranks without a row contribute zeros. `eval_fn` gets the unwrapped model on every rank (shard and
    reduce inside it to spread its work). No gradients, eval mode, back to train mode after.
    """
    module = distributed.unwrap(model)
    was_training = module.training
    module.eval()
    out: dict[str, float] = {}
    try:
        with torch.no_grad():
            if eval_rows is not None and len(eval_rows) > 0:
                out.update(_eval_loss(run, module, eval_rows, collate_fn, loss_fn, count_fn))
            if eval_fn is not None:
                # eval_fn may generate: ranks out of step, and a decoder compiled for training (torch_compile)
                # runs its own forward, as in rollout.generate
                with run.autocast(), distributed.gathered(module), stock.eager(module):
                    extra = eval_fn(module)
                out.update({k if k.startswith("eval_") else f"eval_{k}": float(v) for k, v in extra.items()})
    finally:
        module.train(was_training)
    return out


def _eval_loss(run: Run, module, eval_rows, collate_fn, loss_fn, count_fn) -> dict:
    n, size = len(eval_rows), run.config.per_device_eval_batch_size
    lo, hi = n * run.rank // run.world_size, n * (run.rank + 1) // run.world_size
    batches = [
        to_device(collate_fn(take_rows(eval_rows, list(range(i, min(i + size, hi))))), run.device)
        for i in range(lo, hi, size)
    ]
    num_items = global_count(run, batches, count_fn)
    # A rank with fewer micro-batches than another runs the difference on one row and contributes zeros:
    # with none (fewer eval rows than processes, which transformers still evaluates) the all-reduce needs its
    # metric names; under FSDP2 every forward gathers each layer with all ranks, so they must run as many.
    most = distributed.all_reduce_max(len(batches), run.device) if distributed.is_sharded(module) else 1
    sums: dict[str, torch.Tensor] = {}
    for batch in batches:
        with run.autocast():
            loss, metrics = loss_fn(module, batch, num_items)
        _accumulate_metrics(sums, {"loss": loss, **metrics}, run.device)
    for _ in range(max(most - len(batches), 0)):
        with run.autocast():
            loss, metrics = loss_fn(module, to_device(collate_fn(take_rows(eval_rows, [0])), run.device), 1)
        _accumulate_metrics(sums, {"loss": loss * 0, **{k: v * 0 for k, v in metrics.items()}}, run.device)
    names = list(sums)
    values = distributed.all_reduce_sum(torch.stack([sums[k] for k in names])).tolist()  # one host sync
    return {f"eval_{k}": v for k, v in zip(names, values, strict=True)}


# ---------------------------------------------------------------------------------------------------------
# The offline loop
# ---------------------------------------------------------------------------------------------------------


def _eval_logged(run: Run, step: int) -> bool:
    """metrics.jsonl already holds an evaluation at `step` (rank 0 reads it; every rank gets the answer)."""
    found = 0
    if run.is_main:
        path = run.output_dir / METRICS_FILE
        for line in path.read_text().splitlines() if path.is_file() else ():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # the line being written when the run was killed
                continue
            found |= record.get("step") == step and any(k.startswith("eval_") for k in record)
    flag = torch.tensor(float(found), device=run.device)
    return distributed.all_reduce_sum(flag).item() > 0


def _resume(
    run: Run, model, optimizer, scheduler, num_rows: int, steps_per_epoch: int, companions=None
) -> dict:
    """Load `run.resume_from` into the model, optimizer, schedule and companions; refuse a checkpoint
    whose data position would not mean the same rows here. Returns its trainer state."""
    state = checkpoint.load_checkpoint(run, run.resume_from, model, optimizer, scheduler, companions)
    if state["num_train_rows"] != num_rows:
        raise ValueError(
            f"checkpoint {str(run.resume_from)!r} was trained on {state['num_train_rows']} rows but the train "
            f"set now has {num_rows}: resume with the same data"
        )
    if state.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
        # same options and rows, other step count: written by a version that dropped leftover rows
        raise ValueError(
            f"checkpoint {str(run.resume_from)!r} has {state['steps_per_epoch']} steps per epoch where this "
            f"version counts {steps_per_epoch} (epochs now train every row): its data position cannot be "
            "resumed exactly; start a new run"
        )
    return state


def _data_position_state(run: Run, num_rows: int, steps_per_epoch: int, total_steps: int) -> dict:
    """What a checkpoint records so that a resume can check it sees the same rows in the same order."""
    return {
        "steps_per_epoch": steps_per_epoch,
        "total_steps": total_steps,
        "num_train_rows": num_rows,
        "world_size": run.world_size,
        **{name: getattr(run.config, name) for name in DATA_ORDER_OPTIONS},
    }


def _config_epoch_order(config: TrainConfig, num_rows: int, epoch: int, lengths) -> list[int]:
    # transformers' LengthGroupedSampler groups by per-device batch x accumulation
    group_size = config.per_device_train_batch_size * config.gradient_accumulation_steps
    return epoch_order(num_rows, config.seed, epoch, config.train_sampling_strategy, lengths, group_size)


def fit(
    run: Run,
    model,
    tokenizer,
    train_rows,
    collate_fn,
    loss_fn: LossFn,
    count_fn,
    *,
    eval_rows=None,
    eval_fn=None,
    on_step=None,
    companions: dict | None = None,
) -> dict[str, Any]:
    """Train to the end (resuming if the run says so), then save the final model and tokenizer.

    train_rows / eval_rows: tokenized rows (list of dicts or `datasets.Dataset`); collate_fn(list of rows)
    -> batch dict of tensors; loss_fn(model, batch, num_items) -> (loss, metrics), both already divided
    by num_items = Σ count_fn(batch) over the optimizer step's micro-batches on all ranks.
    on_step(step, model): called after each optimizer step, before its logging, evaluation and checkpoint.
    companions: name -> module that on_step changes outside the optimizer; checkpointed and resumed too.
    Returns the last step's metrics merged with the last evaluation's.
    """
    config = run.config
    steps_per_epoch, total_steps = plan_steps(len(train_rows), config, run.world_size)
    lengths = None
    if config.train_sampling_strategy == "group_by_length":
        lengths = row_lengths(train_rows, config.length_column_name)

    def epoch_of(step: int) -> float:
        return epoch_progress(step, len(train_rows), config, run.world_size)

    model = prepare_model(run, model)
    optimizer = build_optimizer(model, config, run.learning_rate)
    scheduler = build_scheduler(optimizer, config, total_steps)
    step, num_tokens, last_eval_step, state = 0, 0, None, None
    if run.resume_from is not None:
        state = _resume(run, model, optimizer, scheduler, len(train_rows), steps_per_epoch, companions)
        step, num_tokens = state["global_step"], state["num_tokens"]
        if (config.eval_steps and step % config.eval_steps == 0) or _eval_logged(run, step):
            # evaluated before that checkpoint was written, or (the final checkpoint) after it
            last_eval_step = step

    has_eval = (
        eval_fn is not None or (eval_rows is not None and len(eval_rows) > 0)
    ) and config.eval_steps != 0
    logger = MetricsLogger(run, total_steps, resume_step=step)
    guard = faults.StepGuard(run, step, state).install()  # non-finite steps, SIGTERM / SIGINT
    last: dict[str, Any] = {}

    def run_eval():
        nonlocal last_eval_step
        results = evaluate(run, model, eval_rows, collate_fn, loss_fn, count_fn, eval_fn)
        logger.log_eval(step, epoch_of(step), results)
        last.update(results)
        last_eval_step = step

    try:
        order, order_epoch = None, None
        while step < total_steps:
            epoch, position = divmod(step, steps_per_epoch)
            if epoch != order_epoch:
                order, order_epoch = _config_epoch_order(config, len(train_rows), epoch, lengths), epoch
            indices = step_indices(order, position, config, run.rank, run.world_size)
            micro_batches = [collate_fn(take_rows(train_rows, idx)) for idx in indices]
            metrics = accumulate(run, model, optimizer, scheduler, micro_batches, loss_fn, count_fn, guard)
            step += 1
            if on_step is not None:
                on_step(step, model)
            num_tokens += int(metrics.pop("num_tokens"))
            record = {"epoch": epoch_of(step)}
            for name in ("loss", "learning_rate", "grad_norm"):
                record[name] = metrics.pop(name)
            record["num_tokens"] = num_tokens
            record["tokens_per_second"] = metrics.pop("tokens_per_second")
            record.update(metrics)
            logger.log_train(step, record)
            last.update(record)
            if has_eval and config.eval_steps and step % config.eval_steps == 0:
                run_eval()
            if guard.stop or (config.save_steps and step % config.save_steps == 0):
                trainer_state = {
                    "global_step": step,
                    "epoch": epoch_of(step),
                    "num_tokens": num_tokens,
                    **_data_position_state(run, len(train_rows), steps_per_epoch, total_steps),
                    **guard.state(),
                }
                saved = checkpoint.save_checkpoint(
                    run, model, optimizer, scheduler, trainer_state, tokenizer, companions
                )
                if guard.stop:
                    raise guard.preempted(step, saved)
        if has_eval and last_eval_step != step:
            run_eval()
        checkpoint.save_model(run, model, tokenizer, run.output_dir)
    except faults.WriteFailed as err:
        raise faults.WriteFailed(f"{err}; the run stopped; {faults.resume_hint(run)}") from err
    finally:
        guard.restore()
        logger.close()
    finish(run)
    return {"global_step": step, **last}
