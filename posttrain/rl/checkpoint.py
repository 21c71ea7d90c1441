"""Checkpoints: save, find, resume; written atomically so that a killed run always leaves a whole one.

Layout of `output_dir/checkpoint-{step}/`:

    model.safetensors (+ config.json ...)   `save_pretrained`: also loadable by `from_pretrained`
      or, under use_peft,
    adapter_model.safetensors               the adapters (and modules to save) alone, with their
      + adapter_config.json                 adapter_config.json: `PeftModel.save_pretrained`
    tokenizer files                         when the loop passes its tokenizer
    optimizer.pt, scheduler.pt              state dicts
    rng_state_rank{r}.pt                    python, numpy, torch CPU (+ CUDA) generators of rank r
    trainer_state.json                      global step, data position, the options that fix the data order
    {name}.safetensors                      each companion module's state dict (a frozen model the loop
                                            changes outside the optimizer: TR-DPO's reference)

Under --fsdp the weights, optimizer state and companions are sharded over the ranks and go through
torch.distributed.checkpoint (DCP) instead, each rank writing its own shards (`torch.distributed.checkpoint
.state_dict` helpers give and take them):

    sharded/                                DCP: __{rank}_0.distcp per rank + .metadata; keys "model" (the
                                            model's parameters as model.*, each companion's as
                                            companion_{name}.*; the trainable ones alone under use_peft),
                                            "optimizer"
    config.json | adapter_config.json       what the weights are (the model's config; the adapters')
    tokenizer files, scheduler.pt, rng_state_rank{r}.pt, trainer_state.json   as above

A sharded checkpoint resumes only with --fsdp and the same world size (loop._check_resumable); the final
model is gathered into one ordinary `save_pretrained` folder (`save_model`).

A checkpoint is written into the sibling `checkpoint-{step}.tmp/`, trainer_state.json last (itself
written to a side file and renamed), and renamed with `os.replace` once every rank has written its files,
so `checkpoint-{step}` either exists whole or not at all. Re-saving a step that exists (after resuming
from an older checkpoint) renames the existing one to `.old`, moves the new one into place, then deletes
`.old`; pruning renames to `.deleted` before deleting. `clean_temporary` at start-up finishes whatever a
killed save left: a complete `.tmp` (else `.old`) whose `checkpoint-{step}` is missing becomes it, the
rest is deleted. A failed write (no space, permission, ...) on any rank stops every rank with
`faults.WriteFailed` naming the path; the partial `.tmp` is removed and earlier checkpoints stay.

`get_state` / `set_state` know the layout of full, replicated state (one process, DDP); `sharded_state`
and `_load_sharded` the FSDP2 one.
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

from posttrain.rl import distributed, faults, lora
from posttrain.rl.config import ConfigError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TRAINER_STATE = "trainer_state.json"
ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"  # peft's file names
MERGED_DIR = "merged"  # where save_model writes the merged model under merge_adapter
SHARDED_DIR = "sharded"  # the DCP folder of a checkpoint written under --fsdp


# ---------------------------------------------------------------------------------------------------------
# State dicts (the FSDP2 seam)
# ---------------------------------------------------------------------------------------------------------


def get_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """{"model": full model state dict, "optimizer": optimizer state dict or None}.

    Called on every rank (under FSDP2 gathering is collective); only rank 0 writes the result. A peft
    model's `save_pretrained` keeps only the adapters' share of it.
    """
    model_state = distributed.unwrap(model).state_dict()
    return {"model": model_state, "optimizer": None if optimizer is None else optimizer.state_dict()}


def set_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer | None, state: dict) -> None:
    """Load `get_state`'s output back, on every rank. Weights tied to a loaded one may be absent.
    For a peft model, state["model"] is what its checkpoint holds: the adapters, under peft's saved names."""
    module = distributed.unwrap(model)
    if lora.is_peft(module):
        lora.load_adapter_state(module, state["model"])
        if optimizer is not None and state.get("optimizer") is not None:
            optimizer.load_state_dict(state["optimizer"])
        return
    own = module.state_dict()
    shapes = [
        f"{name} {tuple(tensor.shape)} vs {tuple(own[name].shape)}"
        for name, tensor in state["model"].items()
        if name in own and tensor.shape != own[name].shape
    ]
    if shapes:  # load_state_dict would raise a RuntimeError per tensor
        raise ValueError(
            f"checkpoint weights do not fit the model: shapes (checkpoint vs model) {shapes[:5]}"
        )
    pointers = {name: tensor.data_ptr() for name, tensor in own.items()}
    result = module.load_state_dict(state["model"], strict=False)
    loaded = {pointers[name] for name in state["model"] if name in pointers}
    missing = [name for name in result.missing_keys if pointers.get(name) not in loaded]
    if result.unexpected_keys or missing:
        raise ValueError(
            f"checkpoint weights do not fit the model: missing {missing[:5]}, unexpected {result.unexpected_keys[:5]}"
        )
    if optimizer is not None and state.get("optimizer") is not None:
        optimizer.load_state_dict(state["optimizer"])


def sharded_state(model, optimizer, companions: dict | None = None) -> dict:
    """This rank's shards, for DCP: {"model": ..., "optimizer": ...}, state dicts of DTensors over the model and
    its companions together (`get_state_dict` of {"model": model, "companion_{name}": ...}, so that an optimizer
    over both, PPO's policy and value, maps every parameter to a name). Under use_peft the trainable parameters
    alone are kept (the adapters, modules to save, a trained companion), as a peft checkpoint does. Collective."""
    from torch.distributed.checkpoint.state_dict import get_state_dict

    holder = _holder(model, companions)
    model_state, optimizer_state = get_state_dict(holder, optimizer)
    if lora.is_peft(distributed.unwrap(model)):
        trainable = {name for name, p in holder.named_parameters() if p.requires_grad}
        model_state = {name: value for name, value in model_state.items() if name in trainable}
    return {"model": model_state, "optimizer": optimizer_state}


def _holder(model, companions: dict | None) -> torch.nn.ModuleDict:
    """The model and its companions in one module (names model.*, companion_{name}.*), each freed to its shards."""
    modules = {"model": distributed.unwrap(model)}
    modules.update({f"companion_{name}": distributed.unwrap(m) for name, m in (companions or {}).items()})
    for module in modules.values():
        distributed.reshard(module)
    return torch.nn.ModuleDict(modules)


def is_sharded_checkpoint(path: str | Path) -> bool:
    return (Path(path) / SHARDED_DIR).is_dir()


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
    """Finish what a run killed while saving left in `output_dir` (rank 0 only, before anything reads it).

    A complete `checkpoint-N.tmp` (it has trainer_state.json, written last) or else a complete
    `checkpoint-N.old` whose `checkpoint-N` is missing is renamed to `checkpoint-N`: the kill fell between
    moving the old copy aside and moving the new one in. Every other `.tmp` / `.old` / `.deleted` folder
    is deleted.
    """
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for suffix in (".tmp", ".old"):  # .tmp first: when both are whole, it is the newer
        for path in sorted(output_dir.glob(f"checkpoint-*{suffix}")):
            final = path.with_name(path.name.removesuffix(suffix))
            if CHECKPOINT_RE.match(final.name) and not final.exists() and (path / TRAINER_STATE).is_file():
                os.replace(path, final)
    for pattern in ("checkpoint-*.tmp", "checkpoint-*.old", "checkpoint-*.deleted"):
        for path in output_dir.glob(pattern):
            shutil.rmtree(path, ignore_errors=True)


# ---------------------------------------------------------------------------------------------------------
# Saving and loading
# ---------------------------------------------------------------------------------------------------------


def _together(run, write) -> None:
    """Run `write` (this rank's share of a save), then agree with every rank: if any failed, all raise.

    The agreement is one all-reduce, so it is also the barrier between the phases of a save.
    """
    error = None
    try:
        write()
    except faults.WriteFailed as err:
        error = err
    if distributed.any_rank(error is not None, run.device):
        raise error or faults.WriteFailed(f"another process could not write into {str(run.output_dir)!r}")


def _torch_save(obj, path: Path) -> None:
    # Through an open file: a failed write then raises OSError with its errno, where torch.save(obj, path)
    # raises "[enforce fail at inline_container.cc] unexpected pos".
    with faults.writing(path), open(path, "wb") as f:
        torch.save(obj, f)


def _write_json(path: Path, data: dict) -> None:
    """Write-then-rename, so the file is whole whenever it exists (trainer_state.json marks a complete save)."""
    part = path.with_name(path.name + ".part")
    with faults.writing(path):
        part.write_text(json.dumps(data, indent=2))
        os.replace(part, path)


def _write_model(model, state: dict, tokenizer, directory: Path, original_format: bool) -> None:
    module = distributed.unwrap(model)
    kwargs = {}
    if "save_original_format" in inspect.signature(module.save_pretrained).parameters:
        kwargs["save_original_format"] = original_format
    with faults.quiet_transformers_progress(), faults.writing(directory):
        module.save_pretrained(directory, state_dict=state, **kwargs)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def save_model(run, model, tokenizer, directory: str | Path, *, original_format: bool = True) -> None:
    """`save_pretrained` (safetensors) of the unwrapped model, plus the tokenizer; collective, rank 0 writes.

    original_format=False keeps transformers' internal parameter names (what `set_state` loads);
    True (the final model) lets transformers convert them back to the model's published layout.
    A peft model writes its adapter; with the run's merge_adapter, then also the merged model into
    `directory/merged` (merging in place: the model keeps no adapters after this). A sharded model (--fsdp)
    is first gathered whole into rank 0's CPU memory (`distributed.plain_copy`), then written the same way.
    Raises `faults.WriteFailed` on every rank when the write fails.
    """
    merge = lora.is_peft(distributed.unwrap(model)) and getattr(run.config, "merge_adapter", False)
    if distributed.is_sharded(model):  # gathered into an ordinary model on rank 0 (None elsewhere)
        model, state = distributed.plain_copy(model), None
    else:
        state = get_state(model)["model"]
    _together(
        run, lambda: run.is_main and _write_model(model, state, tokenizer, Path(directory), original_format)
    )
    if merge:

        def write_merged():
            with faults.quiet_transformers_progress(), faults.writing(Path(directory) / MERGED_DIR):
                lora.save_merged(distributed.unwrap(model), Path(directory) / MERGED_DIR, tokenizer)

        _together(run, lambda: run.is_main and write_merged())


def save_checkpoint(
    run, model, optimizer, scheduler, trainer_state: dict, tokenizer=None, companions: dict | None = None
) -> Path:
    """Write `output_dir/checkpoint-{step}` atomically (called on every rank); returns its path.

    trainer_state must hold "global_step"; everything in it is stored as JSON and returned by
    `load_checkpoint`. companions: name -> module (replicated on every rank), saved as {name}.safetensors.
    Prunes the oldest checkpoints beyond `save_total_limit`.
    """
    step = trainer_state["global_step"]
    final = Path(run.output_dir) / f"checkpoint-{step}"
    tmp, old = final.with_name(final.name + ".tmp"), final.with_name(final.name + ".old")
    sharded = distributed.is_sharded(model)
    # collective under FSDP2
    state = sharded_state(model, optimizer, companions) if sharded else get_state(model, optimizer)

    def write_main():
        with faults.writing(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        if sharded:  # the weights and optimizer state go into the shards (write_shards)
            _write_description(model, tokenizer, tmp)
        else:
            _write_model(model, state["model"], tokenizer, tmp, original_format=False)
            _torch_save(state["optimizer"], tmp / "optimizer.pt")
        _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
        for name, module in (companions or {}).items() if not sharded else ():
            _save_companion(module, tmp / f"{name}.safetensors")

    def write_shards():
        import torch.distributed.checkpoint as dcp

        with faults.writing(tmp / SHARDED_DIR):
            dcp.save(state, checkpoint_id=tmp / SHARDED_DIR)

    def commit():
        _write_json(tmp / TRAINER_STATE, trainer_state)
        with faults.writing(final):
            if final.exists():  # re-saving a step after resuming from an older checkpoint
                shutil.rmtree(old, ignore_errors=True)
                os.replace(final, old)
            os.replace(tmp, final)  # the new copy is in place before the old one goes
        shutil.rmtree(old, ignore_errors=True)
        limit = run.config.save_total_limit
        if limit is not None:
            for _, path in list_checkpoints(run.output_dir)[:-limit]:
                doomed = path.with_name(path.name + ".deleted")  # never a half-deleted checkpoint-N
                os.replace(path, doomed)
                shutil.rmtree(doomed)

    try:
        _together(run, lambda: run.is_main and write_main())
        if sharded:
            _together(run, write_shards)  # every rank writes its shards (rank 0 also DCP's .metadata)
        _together(run, lambda: _torch_save(rng_state(), tmp / f"rng_state_rank{run.rank}.pt"))
        _together(run, lambda: run.is_main and commit())
    except faults.WriteFailed:
        if run.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            if old.exists() and not final.exists():
                os.replace(old, final)
        raise
    return final


def _write_description(model, tokenizer, directory: Path) -> None:
    """What a sharded checkpoint's weights are: the model's config.json, or under use_peft the adapters'
    adapter_config.json (which is also how `loop._check_resumable` tells an adapter checkpoint); the tokenizer."""
    module = distributed.unwrap(model)
    with faults.quiet_transformers_progress(), faults.writing(directory):
        if lora.is_peft(module):
            module.peft_config["default"].save_pretrained(directory)
        else:
            module.config.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def _load_sharded(path: Path, model, optimizer, companions: dict | None) -> None:
    """Read `path`'s DCP shards into the sharded model, optimizer and companions (every rank its own)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

    state = sharded_state(model, optimizer, companions)  # the shapes and shards to read into
    dcp.load(state, checkpoint_id=path / SHARDED_DIR)
    set_state_dict(
        _holder(model, companions),
        optimizer,
        model_state_dict=state["model"],
        optim_state_dict=state["optimizer"],
        # under peft the checkpoint holds the trainable parameters alone
        options=StateDictOptions(strict=not lora.is_peft(distributed.unwrap(model))),
    )


def _load_weights(path: Path, adapter: bool = False) -> dict[str, torch.Tensor]:
    """The model weights of checkpoint `path` (its adapter's, when `adapter`)."""
    from safetensors.torch import load_file

    if adapter:
        if not (path / ADAPTER_WEIGHTS).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is missing {ADAPTER_WEIGHTS}")
        return load_file(path / ADAPTER_WEIGHTS, device="cpu")
    index = path / "model.safetensors.index.json"
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else None
    files = files or ["model.safetensors"]
    weights = {}
    for name in files:
        if not (path / name).is_file():
            raise ValueError(f"checkpoint {str(path)!r} is missing {name}")
        weights.update(load_file(path / name, device="cpu"))
    return weights


def _save_companion(module, path: Path) -> None:
    from safetensors.torch import save_file

    # clone: tied weights share storage, which safetensors refuses
    state = {k: v.detach().cpu().clone().contiguous() for k, v in module.state_dict().items()}
    with faults.writing(path):
        save_file(state, path)


def load_checkpoint(
    run, path: str | Path, model, optimizer, scheduler, companions: dict | None = None
) -> dict:
    """Restore model, optimizer, scheduler, companions and this rank's RNG from `path`; returns its
    trainer_state."""
    path = Path(path)
    trainer_state = read_trainer_state(path)
    rng_file = path / f"rng_state_rank{run.rank}.pt"
    sharded = distributed.is_sharded(model)
    if sharded:
        files = [f"{SHARDED_DIR}/.metadata", "scheduler.pt", rng_file.name]
    else:
        files = [
            "optimizer.pt",
            "scheduler.pt",
            rng_file.name,
            *(f"{n}.safetensors" for n in companions or {}),
        ]
    missing = [name for name in files if not (path / name).is_file()]
    if missing:
        raise ValueError(f"checkpoint {str(path)!r} is missing {', '.join(missing)} (for rank {run.rank})")
    if sharded:
        _load_sharded(path, model, optimizer, companions)
    else:
        optimizer_state = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=True)
        weights = _load_weights(path, adapter=lora.is_peft(distributed.unwrap(model)))
        set_state(model, optimizer, {"model": weights, "optimizer": optimizer_state})
    scheduler.load_state_dict(torch.load(path / "scheduler.pt", weights_only=True))
    set_rng_state(torch.load(rng_file, weights_only=True))
    from safetensors.torch import load_file

    for name, module in (companions or {}).items() if not sharded else ():
        module.load_state_dict(load_file(path / f"{name}.safetensors", device="cpu"))
    return trainer_state
