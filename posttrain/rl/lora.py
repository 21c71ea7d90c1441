"""LoRA through peft: the one place a loaded model gets its adapters, and the reference that is the same model
with them disabled.

`loop.prepare_model` calls `wrap` when `use_peft` is set, so every loop trains adapters without a change of
its own. What follows from it, as TRL 1.16 does it:

- only the adapters (and `lora_modules_to_save`, and a sequence classifier's score head) require gradients,
  so they alone reach the optimizer, and a checkpoint holds them alone (`PeftModel.save_pretrained`:
  adapter_config.json + adapter_model.safetensors, loadable with `peft.AutoPeftModelForCausalLM`);
- a loop's frozen reference is `AdapterDisabled(policy)`: the policy's own forward with every adapter
  switched off, no second copy of the weights (TRL: `use_adapter(model, None)` -> `disable_adapter()`);
- with `merge_adapter`, the final save also writes the merged model (`save_merged`).

Departures from TRL 1.16: `lora_target_modules` none means every linear layer but the output layer
("all-linear"; TRL leaves it to peft, whose table gives Llama and Qwen2 only q_proj and v_proj), and each
name given must match a module (peft only fails when none does); `lora_task_type` none follows the model
(SEQ_CLS for a sequence classifier, TOKEN_CLS for a token classifier, so a reward model's or process
reward model's score head trains in full); an adapter on the
output layer is trained through the full-logits path (TRL refuses it: its fused head reads the weight).
"""

from __future__ import annotations

import contextlib
import sys

import torch

from posttrain.rl.config import ConfigError
from posttrain.rl.models import disable_dropout, frozen_reference

ALL_LINEAR = "all-linear"


def is_peft(model: torch.nn.Module) -> bool:
    """`model` (already unwrapped from DDP) is a peft model."""
    # No peft model exists unless peft was imported; importing it here would load bitsandbytes where installed
    # (seconds, and a warning on machines without CUDA) in every run that saves a plain model.
    peft = sys.modules.get("peft")
    peft_model = getattr(peft, "PeftModel", None)  # None: not imported, or another module of that name
    return peft_model is not None and isinstance(model, peft_model)


def _task_type(model: torch.nn.Module) -> str:
    """peft's task type for `model`: a classifier's (whose head then trains in full) or CAUSAL_LM."""
    # transformers names its heads <Family>For<Task>
    name = type(model).__name__
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"  # a process reward model
    return "CAUSAL_LM"


def _matches(name: str, target: str) -> bool:
    """peft's rule for a listed target: the module's full name or its last dotted components."""
    return name == target or name.endswith("." + target)


def _check_names(model: torch.nn.Module, option: str, names: list[str] | None, linear_only: bool) -> None:
    """Each of `names` matches a module of `model` (a linear one when `linear_only`), else a ConfigError
    naming the option, the culprits and the candidates."""
    if not names or names == [ALL_LINEAR]:
        return
    modules = [
        n for n, m in model.named_modules() if n and (not linear_only or isinstance(m, torch.nn.Linear))
    ]
    unmatched = [t for t in names if not any(_matches(n, t) for n in modules)]
    if unmatched:
        leaves = sorted({n.rsplit(".", 1)[-1] for n in modules})
        kind = "linear module" if linear_only else "module"
        raise ConfigError(
            f"{option}: {unmatched} match no {kind} of {type(model).__name__}; its {kind} names: {leaves}"
        )


def lora_config(model: torch.nn.Module, config):
    """The `peft.LoraConfig` of `config`'s LoRA options for `model` (checked against its modules)."""
    from peft import LoraConfig

    task_type = config.lora_task_type or _task_type(model)
    if task_type != _task_type(model):
        raise ConfigError(
            f"lora_task_type={task_type} but the model is a {type(model).__name__}: use "
            f"{_task_type(model)} (or leave it unset)"
        )
    targets = config.lora_target_modules or [ALL_LINEAR]
    _check_names(model, "lora_target_modules", targets, linear_only=True)
    _check_names(model, "lora_modules_to_save", config.lora_modules_to_save, linear_only=False)
    return LoraConfig(
        task_type=task_type,
        r=config.lora_r,
        lora_alpha=config.lora_alpha,
        lora_dropout=config.lora_dropout,
        # a one-element list, not the bare string: peft reads a string as a regular expression on full names
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else list(targets),
        modules_to_save=config.lora_modules_to_save,
        bias="none",
        use_rslora=config.use_rslora,
        use_dora=config.use_dora,
    )


def quantization(run) -> dict | None:
    """The from_pretrained options that load a model's weights quantized on the run's device for QLoRA (TRL's
    `get_quantization_config` / `get_kbit_device_map`: 4-bit computes in the run's dtype, bf16 when the run
    autocasts to it), or None when neither load_in_4bit nor load_in_8bit is set. The config has checked
    bitsandbytes and the device."""
    config = run.config
    if not (config.load_in_4bit or config.load_in_8bit):
        return None
    from transformers import BitsAndBytesConfig

    if config.load_in_8bit:
        bnb = BitsAndBytesConfig(load_in_8bit=True)
    else:
        dtype = torch.bfloat16 if run.bf16 else torch.float32
        bnb = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_compute_dtype=dtype,
            bnb_4bit_quant_type=config.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=config.use_bnb_nested_quant,
            bnb_4bit_quant_storage=dtype,
        )
    # bitsandbytes places the weights as it quantizes them: the whole model on this process's device
    return {"quantization_config": bnb, "device_map": {"": str(run.device)}}


def is_quantized(model: torch.nn.Module) -> bool:
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def wrap(model: torch.nn.Module, config) -> torch.nn.Module:
    """`model` with LoRA adapters (peft's `get_peft_model`, which injects them in place): only they, the
    modules to save and a classifier's score head require gradients. Dropout, the adapters' included, is
    set to 0 when the config's `disable_dropout` is on (TRL disables it after wrapping).

    The adapters' random initialisation (lora_A) draws from a CPU generator seeded with `config.seed`, as
    TRL seeds right before it wraps: it depends on the seed alone, not on what ran before, and leaves the
    run's own random stream where it was."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    peft_config = lora_config(model, config)
    if is_quantized(model):
        # as TRL: the layers left unquantized (norms, embeddings) in float32, inputs that carry gradients
        # through checkpointed blocks when the embeddings are frozen
        model = prepare_model_for_kbit_training(
            model,
            use_gradient_checkpointing=config.gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},  # as loop.prepare_model set it
        )
    with torch.random.fork_rng(devices=[]):  # peft initialises on the CPU, then moves to the base's device
        torch.default_generator.manual_seed(config.seed)
        peft_model = get_peft_model(model, peft_config)
    if getattr(config, "disable_dropout", False):
        disable_dropout(peft_model)
    return peft_model


def wrap_like(model: torch.nn.Module, peft_model: torch.nn.Module) -> torch.nn.Module:
    """`model` (a fresh copy of `peft_model`'s base) with `peft_model`'s adapters added: the same modules
    and parameter names, the weights still to be loaded (`distributed.plain_copy` rebuilds a sharded model
    this way)."""
    import copy

    from peft import get_peft_model

    return get_peft_model(model, copy.deepcopy(peft_model.peft_config["default"]))


def is_adapter_layer(module: torch.nn.Module) -> bool:
    """`module` is one peft switches when it disables adapters (`BaseTuner._set_adapter_layers`): an
    adapter layer or a modules-to-save wrapper."""
    if not type(module).__module__.startswith("peft."):
        return False  # peft not imported, or a plain module
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return isinstance(module, BaseTunerLayer | AuxiliaryTrainingWrapper)


def _adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """`model`'s adapter layers and modules-to-save wrappers; none before `wrap`."""
    return [m for m in model.modules() if is_adapter_layer(m)]


@contextlib.contextmanager
def adapters_disabled(model: torch.nn.Module):
    """Run `model` (a peft model or the model peft injected into) as the base model: every adapter off and
    every module-to-save its original, then back as they were (peft's `disable_adapter()`, for a model that
    may not be the PeftModel itself)."""
    layers = [m for m in _adapter_layers(model) if not m.disable_adapters]
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield
    finally:
        for layer in layers:
            layer.enable_adapters(True)


class AdapterDisabled:
    """A frozen reference that is the policy itself with its adapters disabled: no second copy.

    Called like a model (its forward runs under `adapters_disabled`, meant for `torch.no_grad()`); `config`
    and `get_output_embeddings` are the policy's, so `rl.logprobs` takes its fused path through it. It holds
    the model peft injects into (the policy before `loop.prepare_model` wraps it is fine: the adapters are
    looked up at each call). train() / eval() / to() switch the policy's mode or device, as they would a
    copy's; it has no parameters of its own (nothing to freeze, mix (TR-DPO) or checkpoint).
    """

    def __init__(self, policy: torch.nn.Module):
        self.policy = policy

    def __call__(self, *args, **kwargs):
        with adapters_disabled(self.policy):
            return self.policy(*args, **kwargs)

    @property
    def config(self):
        return self.policy.config

    @property
    def training(self) -> bool:
        return self.policy.training

    def get_output_embeddings(self):
        return self.policy.get_output_embeddings()

    # what `rl.logprobs.shared_prefix` asks of a model: a prompt shared by several rows runs once
    def get_input_embeddings(self):
        return self.policy.get_input_embeddings()

    def get_decoder(self):
        return self.policy.get_decoder()

    def get_base_model(self):
        return self.policy.get_base_model() if hasattr(self.policy, "get_base_model") else self.policy

    def train(self, mode: bool = True):
        self.policy.train(mode)
        return self

    def to(self, *args, **kwargs):
        self.policy.to(*args, **kwargs)
        return self

    def eval(self):
        return self.train(False)


def reference_of(policy: torch.nn.Module, config, device) -> torch.nn.Module | AdapterDisabled:
    """A loop's frozen reference as the policy starts: the policy with adapters disabled under use_peft,
    else a frozen copy of it in eval mode on `device` (sharded under --fsdp: `models.frozen_reference`)."""
    if config.use_peft:
        # on the device now, as a copy would be: a precompute runs it before loop.prepare_model moves the policy
        return AdapterDisabled(policy.to(device))
    import copy

    return frozen_reference(copy.deepcopy(policy), config, device)


def adapter_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The weights a peft checkpoint holds, under the names its adapter_model.safetensors uses."""
    from peft import get_peft_model_state_dict

    return get_peft_model_state_dict(model)


def load_adapter_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load `adapter_state`'s output (read from a checkpoint) into the peft model `model`; every adapter
    weight must be there, in its shape."""
    from peft import set_peft_model_state_dict

    own = adapter_state(model)
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [
        f"{name} {tuple(state[name].shape)} vs {tuple(own[name].shape)}"
        for name in own
        if name in state and state[name].shape != own[name].shape
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            "checkpoint adapter does not fit the model (other lora_r, lora_target_modules or "
            f"lora_modules_to_save?): missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"shapes (checkpoint vs model) {shapes[:5]}"
        )
    set_peft_model_state_dict(model, state)


def save_merged(model: torch.nn.Module, directory, tokenizer=None) -> None:
    """Merge the adapters into the weights (in place: the last thing a run does with its model) and write the
    result with `save_pretrained`, loadable by AutoModelForCausalLM / AutoModelForSequenceClassification."""
    merged = model.merge_and_unload()
    merged.save_pretrained(directory)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
