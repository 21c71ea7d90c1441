"""Model and tokenizer loading: a local folder or hub id, or the embedded tiny model when none is given.

`model_name_or_path` names a local folder when a file or folder of that name exists, or when it looks like
a path rather than a hub id (it starts with `/`, `.` or `~`, or has more separators than the one of
"org/name"): a missing one is then an error naming the option, where transformers would say "Repo id
must be in the form ...". Anything else is a hub id, handed to transformers unchanged.

A local folder is checked in full (config.json, weights, a tokenizer that produces tokens) when its
tokenizer is loaded, which every loop does before it writes its run folder: a bad path stops the run
before any work. Every error is a ValueError (FileNotFoundError for a missing path) whose message starts
with `model_name_or_path=...`; the CLI prints it on one line.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from posttrain.data import embedded
from posttrain.data.loading import looks_like_hub_id
from posttrain.rl import distributed
from posttrain.rl.distributed import unwrap

# What `from_pretrained` reads from a local folder (transformers' own file names).
CONFIG_FILE = "config.json"
WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)


def local_model_folder(model_name_or_path: str) -> Path | None:
    """The local folder `model_name_or_path` names, checked; None when it is a hub id.

    Raises FileNotFoundError for a path that does not exist, ValueError for a file (not a folder), a
    folder without config.json, or one with a config but no weights.
    """
    option = f"model_name_or_path={model_name_or_path!r}"
    if not os.fspath(model_name_or_path).strip():  # Path("") is the current folder
        raise ValueError(f"{option} is empty; leave it unset for the embedded model")
    path = Path(model_name_or_path).expanduser()
    if not path.exists():
        if looks_like_hub_id(os.fspath(model_name_or_path)):
            return None
        raise FileNotFoundError(f"{option}: no such file or folder (and it is not a hub id)")
    if not path.is_dir():
        raise ValueError(f"{option} is a file; expected a model folder (config.json and weights)")
    found = sorted(p.name for p in path.iterdir())
    if CONFIG_FILE not in found:
        adapter = (
            " (a PEFT adapter: merge it into its base model first)" if "adapter_config.json" in found else ""
        )
        raise ValueError(f"{option}: the folder has no {CONFIG_FILE}{adapter} (found: {found or 'nothing'})")
    if not any(name in found for name in WEIGHT_FILES):
        raise ValueError(
            f"{option}: the folder has a {CONFIG_FILE} but no weights ({', '.join(WEIGHT_FILES)}; found: {found})"
        )
    return path


def load_checked(load, model_name_or_path: str, what: str, **kwargs):
    """`load` from the checked local folder or the hub id, its failure turned into one line naming the option."""
    folder = local_model_folder(model_name_or_path)
    try:
        # the expanded folder: transformers takes "~/model" for a (malformed) hub id
        return load(str(folder) if folder is not None else model_name_or_path, **kwargs)
    except Exception as e:  # transformers' errors vary by cause (OSError, ValueError, KeyError, ...)
        where = (
            "from its local folder"
            if folder is not None
            else "(not a local folder, and the Hugging Face Hub could not provide it)"
        )
        raise ValueError(
            f"model_name_or_path={model_name_or_path!r}: could not load its {what} {where}: "
            f"{type(e).__name__}: {e}"
        ) from e


def load_tokenizer(model_name_or_path: str | None):
    """The model's tokenizer; the embedded one when no model is named. Checks a local model folder in
    full first (see the module docstring).

    A tokenizer without a pad token pads with its eos token, as TRL does; one with neither is an error.
    """
    if model_name_or_path is None:
        return embedded.build_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = load_checked(AutoTokenizer.from_pretrained, model_name_or_path, "tokenizer")
    option = f"model_name_or_path={model_name_or_path!r}"
    # transformers 5 builds an empty tokenizer from a folder without tokenizer files instead of failing.
    if not tokenizer("Hello world", add_special_tokens=False)["input_ids"]:
        folder = local_model_folder(model_name_or_path)
        found = f" (found: {sorted(p.name for p in folder.iterdir())})" if folder is not None else ""
        raise ValueError(
            f"{option}: its tokenizer turns text into no tokens: no tokenizer files (tokenizer.json, "
            f"tokenizer_config.json with its vocabulary){found}"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(f"{option}: its tokenizer has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(
    model_name_or_path: str | None,
    *,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    quantization: dict | None = None,
):
    """An `AutoModelForCausalLM` in `dtype`; the embedded tiny model (random init under `seed`) when None.
    `quantization`: `lora.quantization`'s from_pretrained options (QLoRA), or None."""
    if model_name_or_path is None:
        if quantization:
            raise ValueError(NOT_QUANTIZABLE)
        return embedded.build_model(seed=seed).to(dtype)
    from transformers import AutoModelForCausalLM

    return load_checked(
        AutoModelForCausalLM.from_pretrained, model_name_or_path, "model", dtype=dtype, **(quantization or {})
    )


NOT_QUANTIZABLE = (
    "load_in_4bit / load_in_8bit quantize a pretrained checkpoint as it loads; the embedded model is built "
    "from a config: pass --model_name_or_path"
)


def load_reward_model(
    model_name_or_path: str | None,
    *,
    pad_token_id: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
    quantization: dict | None = None,
):
    """An `AutoModelForSequenceClassification` with one output (the reward) in `dtype`.

    A causal-LM checkpoint (e.g. an SFT output) gets its architecture's score head, freshly initialised by
    transformers under `seed` (its lm_head is left out); None: the embedded tiny model's architecture with
    random weights. `pad_token_id` goes into the config: the model scores each sequence at its last token
    that is not padding, which it finds by that id. `quantization` as `load_causal_lm`'s.
    """
    from transformers import AutoModelForSequenceClassification

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if model_name_or_path is None:
            if quantization:
                raise ValueError(NOT_QUANTIZABLE)
            config = embedded.tiny_model_config(num_labels=1)
            model = AutoModelForSequenceClassification.from_config(config, dtype=dtype)
        else:
            try:
                model = load_checked(
                    AutoModelForSequenceClassification.from_pretrained,
                    model_name_or_path,
                    "model",
                    num_labels=1,
                    dtype=dtype,
                    **(quantization or {}),
                )
            except ValueError as err:
                if "Unrecognized configuration class" not in str(err):
                    raise
                raise ValueError(
                    f"model_name_or_path={model_name_or_path!r}: its architecture has no sequence-classification "
                    "model in transformers (AutoModelForSequenceClassification), so it cannot be a reward model"
                ) from None
    model.config.get_text_config().pad_token_id = pad_token_id
    return model


def disable_dropout(model: torch.nn.Module) -> None:
    """Set every `nn.Dropout`'s probability to 0 (TRL's `disable_dropout`), so training is deterministic."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def router_aux_loss_coef(model_config, requested: float | None) -> float:
    """The weight of a mixture-of-experts model's router load-balancing loss in the training loss, as TRL
    decides it: `requested`, or the config's own `router_aux_loss_coef` when None; 0 for a model without
    a router (which may not be asked for one). model_config: the model's `PretrainedConfig`, so the
    decision can be made before the weights load."""
    config = model_config.get_text_config()
    has_router = hasattr(config, "output_router_logits")
    if requested is None:
        return float(getattr(config, "router_aux_loss_coef", 0.0)) if has_router else 0.0
    if requested and not has_router:
        raise ValueError(
            f"router_aux_loss_coef={requested}: the model ({config.model_type}) is not a mixture of experts "
            "with a router load-balancing loss"
        )
    return float(requested)


def frozen_reference(model: torch.nn.Module, config, device) -> torch.nn.Module:
    """`model` as a loop's frozen reference: eval mode, no gradients, on `device`; under --fsdp (torchrun)
    sharded like the policy (`distributed.shard`, no optimizer), so that its memory per rank scales too."""
    model = model.eval().requires_grad_(False).to(device)
    if getattr(config, "fsdp_enabled", False) and distributed.is_distributed():
        distributed.shard(model)
    return model


@torch.no_grad()
def mix_into_reference(policy, ref_model, alpha: float) -> None:
    """TR-DPO's soft update (Gorbatovski et al. 2024, arXiv:2404.09656): ref <- alpha * policy + (1 - alpha) * ref.
    Sharded models mix shard by shard (both are freed to their shards first)."""
    distributed.reshard(policy)
    distributed.reshard(ref_model)
    for p_ref, p in zip(ref_model.parameters(), unwrap(policy).parameters(), strict=True):
        p_ref.mul_(1.0 - alpha).add_(p.detach().to(p_ref.dtype), alpha=alpha)
