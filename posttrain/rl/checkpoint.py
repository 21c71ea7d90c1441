"""Checkpoints: save, find, resume; written atomically so that a killed run always leaves a whole one.

Layout of `output_dir/checkpoint-{step}/`:

    model.safetensors (+ config.json ...)   `save_pretrained`: also loadable by `from_pretrained`
    tokenizer files                         when the loop passes its tokenizer
    optimizer.pt, scheduler.pt              state dicts
    rng_state_rank{r}.pt                    python, numpy, torch CPU (+ CUDA) generators of rank r
    trainer_state.json                      global step, data position, the options that fix the data order

A checkpoint is written into the sibling `checkpoint-{step}.tmp/` and renamed with `os.replace` once
every rank has written its files, so `checkpoint-{step}` either exists whole or not at all; leftover
`.tmp` folders are deleted by the next save or resume.

`get_state` / `set_state` are the only functions that know how parameters and optimizer state are
laid out across processes (full, replicated state under DDP); FSDP2 replaces just these two.
"""

from __future__ import annotations

import inspect
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from posttrain.rl import distributed
from posttrain.rl.config import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"


# ---------------------------------------------------------------------------------------------------------
# State dicts (the FSDP2 seam)
# ---------------------------------------------------------------------------------------------------------


def get_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{"model": full model state dict, "optimizer": optimizer state dict or None}.

    Called on every rank (under FSDP2 gathering is collective); only rank 0 writes the result.
    """
    model_state = distributed.unwrap(model).state_dict()
    return {"model": model_state, "optimizer": None if optimizer is None else optimizer.state_dict()}


def set_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Load `get_state`'s output back, on every rank. Weights tied to a loaded one may be absent."""
    module = distributed.unwrap(model)
    pointers = {name: tensor.data_ptr() for name, tensor in module.state_dict().items()}
    result = module.load_state_dict(state["model"], strict=False)
    loaded = {pointers[name] for name in state["model"] if name in pointers}
    missing = [name for name in result.missing_keys if pointers.get(name) not in loaded]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"checkpoint weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])


# ---------------------------------------------------------------------------------------------------------
# RNG
# ---------------------------------------------------------------------------------------------------------


def rng_state() -> dict:
    """Every generator the training step may draw from, in a form `torch.load(weights_only=True)` reads."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "cpu": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["cpu"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ---------------------------------------------------------------------------------------------------------
# Finding checkpoints
# ---------------------------------------------------------------------------------------------------------


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir` as (step, path), oldest first (`.tmp` folders are not listed)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_RE.match(path.name)
        if match and (path / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: str | Path, resume_from_checkpoint: str) -> Path:
    """The checkpoint folder named by `resume_from_checkpoint`: 'latest' or a path."""
    if resume_from_checkpoint == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            raise ConfigError(
                f"resume_from_checkpoint='latest' but {str(output_dir)!r} holds no complete checkpoint-N folder"
            )
        return found[-1][1]
    path = Path(resume_from_checkpoint)
    if not path.is_dir():
        raise ConfigError(f"resume_from_checkpoint: {str(path)!r} does not exist")
    if not (path / TRAINER_STATE).is_file():
        raise ConfigError(
            f"resume_from_checkpoint: {str(path)!r} is not a checkpoint (no {TRAINER_STATE} in it)"
        )
    return path


def read_trainer_state(path: str | Path) -> dict:
    return json.loads((Path(path) / TRAINER_STATE).read_text())


def clean_temporary(output_dir: str | Path) -> None:
    """Delete `checkpoint-*.tmp` / `.old` folders left by a run killed while saving (rank 0 only)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for pattern in ("checkpoint-*.tmp", "checkpoint-*.old"):
            for path in output_dir.glob(pattern):
                shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------


def save_model(run, model, tokenizer, directory: str | Path, *, original_format: bool = True) -> None:
    """`save_pretrained` (safetensors) of the unwrapped model, plus the tokenizer; collective, rank 0 writes.

    original_format=False keeps transformers' internal parameter names (what `set_state` loads);
    True (the final model) lets transformers convert them back to the model's published layout.
    """
    state = get_state(model)["model"]
    if run.is_main:
        module = distributed.unwrap(model)
        kwargs = {}
        if "save_original_format" in inspect.signature(module.save_pretrained).parameters:
            kwargs["save_original_format"] = original_format
        module.save_pretrained(directory, state_dict=state, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    distributed.barrier()


def save_checkpoint(run, model, optimizer, scheduler, trainer_state: dict, tokenizer=None) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically (called on every rank); returns its path.

    trainer_state must hold "global_step"; everything in it is stored as JSON and returned by
    `load_checkpoint`. Prunes the oldest checkpoints beyond `save_total_limit`.
    """
    step = trainer_state["global_step"]
    final = Path(run.output_dir) / f"checkpoint-{step}"
    tmp = final.with_name(final.name + ".tmp")
    if run.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    distributed.barrier()
    state = get_state(model, optimizer)
    save_model(run, model, tokenizer, tmp, original_format=False)
    if run.is_main:
        torch.save(state["optimizer"], tmp / "optimizer.pt")
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
    torch.save(rng_state(), tmp / f"rng_state_rank{run.rank}.pt")
    distributed.barrier()  # every rank's files are in tmp before it becomes the checkpoint
    if run.is_main:
        (tmp / TRAINER_STATE).write_text(json.dumps(trainer_state, indent=2))
        if final.exists():  # re-running a step after resuming from an older checkpoint
            old = final.with_name(final.name + ".old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            shutil.rmtree(old)
        os.replace(tmp, final)
        limit = run.config.save_total_limit
        if limit is not None:
            for _, path in list_checkpoints(run.output_dir)[:-limit]:
                shutil.rmtree(path)
    distributed.barrier()
    return final


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    files = files or ["model.safetensors"]
    weights = {}
    for name in files:
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is missing {name}")
        weights.update(load_file(path / name, device="cpu"))
    return weights


def load_checkpoint(run, path: str | Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG from `path`; returns its trainer_state."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    rng_file = path / f"rng_state_rank{run.rank}.pt"
    if not rng_file.is_file():
        raise ValueError(f"checkpoint {str(path)!r} has no {rng_file.name} for rank {run.rank}")
    optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
    set_state(model, optimizer, {"model": _load_weights(path), "optimizer": optimizer_state})
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(rng_file, weights_only=True))
    return trainer_state
