"""Model and tokenizer loading: a local path or hub id, or the embedded tiny model when none is given."""

from __future__ import annotations

import torch

from posttrain.data import embedded


def load_tokenizer(model_name_or_path: str | None):
    """The model's tokenizer; the embedded one when no model is named.

    A tokenizer without a pad token pads with its eos token, as TRL does.
    """
    if model_name_or_path is None:
        return embedded.build_tokenizer()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"model_name_or_path={model_name_or_path!r}: its tokenizer has neither a pad nor an eos token"
            )
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(model_name_or_path: str | None, *, seed: int = 0, dtype: torch.dtype = torch.float32):
    """An `AutoModelForCausalLM` in `dtype`; the embedded tiny model (random init under `seed`) when None."""
    if model_name_or_path is None:
        return embedded.build_model(seed=seed).to(dtype)
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_name_or_path, dtype=dtype)
