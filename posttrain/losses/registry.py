"""One registry per kind of variant (SFT losses, preference losses, policy losses, advantage estimators, ...).

A variant is a function registered under (kind, name); loops look it up by the config's name, so a user
adds a loss by registering a function, without touching a loop.

    @register("sft", "nll")
    def nll(logps, mask, num_items): ...

    get("sft", "nll")  -> the function
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

_REGISTRY: dict[str, dict[str, Callable]] = {}
# The module holding each kind's built-in variants, imported on first lookup so that `get` works
# without the caller importing it for its registration side effect.
BUILTIN_MODULES = {
    "sft": "posttrain.losses.sft",
    "reward": "posttrain.losses.reward",
    "prm": "posttrain.losses.prm",
    "preference": "posttrain.losses.preference",
    "kto": "posttrain.losses.kto",
    **dict.fromkeys(("cpo", "orpo"), "posttrain.losses.cpo"),
    **dict.fromkeys(("policy", "kl", "advantage"), "posttrain.losses.policy"),
    **dict.fromkeys(("ppo_advantage", "ppo_policy", "ppo_value"), "posttrain.losses.ppo"),
}


def register(kind: str, name: str) -> Callable[[Callable], Callable]:
    """Decorator: register `fn` as variant `name` of `kind`. Re-registering a name with a different function raises."""

    def decorator(fn: Callable) -> Callable:
        variants = _REGISTRY.setdefault(kind, {})
        existing = variants.get(name)
        if existing is not None and existing is not fn:
            raise ValueError(
                f"{kind} loss {name!r} is already registered by {existing.__module__}.{existing.__qualname__}"
            )
        variants[name] = fn
        return fn

    return decorator


def get(kind: str, name: str) -> Callable:
    """The variant `name` of `kind`; the error lists the valid names."""
    variants = _variants(kind)
    if name not in variants:
        raise ValueError(f"unknown {kind} loss_type {name!r}; expected one of {sorted(variants)}")
    return variants[name]


def names(kind: str) -> list[str]:
    return sorted(_variants(kind))


def _variants(kind: str) -> dict[str, Callable]:
    if kind in BUILTIN_MODULES:
        importlib.import_module(BUILTIN_MODULES[kind])
    return _REGISTRY.get(kind, {})
