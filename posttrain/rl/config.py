"""Run configuration: `TrainConfig`, the options every loop shares, and the YAML + command-line parser.

A config is a dataclass whose fields carry their help text in `field(metadata={"help": ...})`; each
loop subclasses `TrainConfig` to add its own fields. Values come, lowest precedence first, from the
dataclass defaults, a YAML file (`--config file.yaml`) and `--key value` / `--key=value` overrides.
Types are read from the annotations: `int`, `float`, `str`, `bool`, `X | None`, `Literal[...]`,
`list[X]`. Any bad option raises `ConfigError` naming it; the CLI prints the message and exits 2.

Option names follow TRL / transformers `TrainingArguments` wherever the same knob exists.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

# transformers' `get_scheduler` names and meanings: `constant` ignores warmup_steps, the others apply it.
LR_SCHEDULER_TYPES = ("linear", "cosine", "constant", "constant_with_warmup")
TRAIN_SAMPLING_STRATEGIES = ("random", "sequential", "group_by_length")
REPORT_TO = ("auto", "none", "tensorboard")
# transformers' TrainingArguments `fsdp` words: those that mean FSDP2 full sharding here, and the others it knows
FSDP_WORDS = ("full_shard", "auto_wrap", "true")
FSDP_REFUSED = ("shard_grad_op", "hybrid_shard", "hybrid_shard_zero2", "no_shard", "offload")
LORA_TASK_TYPES = ("CAUSAL_LM", "SEQ_CLS", "TOKEN_CLS")
BNB_4BIT_QUANT_TYPES = ("nf4", "fp4")
# Where QLoRA's quantized weights may live. bitsandbytes also runs on the CPU (the tests use that, widening
# this), but its CPU kernels are slower than the float32 model they replace: a CPU run is refused instead.
QUANTIZED_DEVICE_TYPES = ("cuda",)
BOOL_STRINGS = {"true": True, "1": True, "yes": True, "false": False, "0": False, "no": False}
NONE_STRINGS = ("none", "null")


class ConfigError(ValueError):
    """A bad option: unknown, of the wrong type, out of range, or contradicting another one."""


@dataclass
class TrainConfig:
    """Options shared by every training loop."""

    # --- model and data
    model_name_or_path: str | None = field(
        default=None,
        metadata={
            "help": "Local path or hub id of a causal LM; none: the embedded tiny model (random init)."
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub id, local file or folder of the dataset; none: the embedded arithmetic task."},
    )
    dataset_config: str | None = field(
        default=None, metadata={"help": "Dataset configuration name (subset)."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    dataset_test_split: str = field(
        default="test",
        metadata={
            "help": "Split to evaluate on; a missing 'test' split skips evaluation unless eval_steps is set; any other named split must exist."
        },
    )
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Run folder (config, metrics, checkpoints, model); none: runs/<command>."},
    )
    seed: int = field(default=42, metadata={"help": "Seed for python, numpy, torch and the data order."})
    # --- optimisation
    learning_rate: float | None = field(
        default=None, metadata={"help": "Peak AdamW learning rate; none: the loop's default for the model."}
    )
    lr_scheduler_type: str = field(
        default="linear",
        metadata={
            "help": "Learning-rate schedule, transformers' names: linear or cosine decay after warmup, "
            "constant (no warmup: warmup_steps is ignored, as in transformers), constant_with_warmup."
        },
    )
    warmup_steps: int = field(
        default=0, metadata={"help": "Optimizer steps of linear warmup from 0 (not used by 'constant')."}
    )
    weight_decay: float = field(
        default=0.0, metadata={"help": "AdamW weight decay (not applied to biases and norm weights)."}
    )
    adam_beta1: float = field(default=0.9, metadata={"help": "AdamW beta1."})
    adam_beta2: float = field(default=0.999, metadata={"help": "AdamW beta2."})
    adam_epsilon: float = field(default=1e-8, metadata={"help": "AdamW epsilon."})
    max_grad_norm: float = field(
        default=1.0, metadata={"help": "Clip the global gradient norm to this; 0: no clipping."}
    )
    # --- batch and length of the run
    per_device_train_batch_size: int = field(
        default=8, metadata={"help": "Rows per micro-batch per process."}
    )
    per_device_eval_batch_size: int = field(
        default=8, metadata={"help": "Rows per evaluation micro-batch per process."}
    )
    gradient_accumulation_steps: int = field(
        default=1, metadata={"help": "Micro-batches per optimizer step (per process)."}
    )
    num_train_epochs: float = field(
        default=3.0,
        metadata={"help": "Passes over the training data (fractions allowed); used when max_steps <= 0."},
    )
    max_steps: int = field(
        default=-1, metadata={"help": "Total optimizer steps; overrides num_train_epochs when > 0."}
    )
    dataloader_drop_last: bool = field(
        default=False,
        metadata={
            "help": "Drop an epoch's last micro-batch when it is not full on every process (false: it "
            "trains, and a short last accumulation step too, as in transformers)."
        },
    )
    train_sampling_strategy: str = field(
        default="random",
        metadata={
            "help": "Order of the rows in each epoch: random (reshuffled every epoch), sequential, or "
            "group_by_length (shuffled, rows of similar length batched together to cut padding)."
        },
    )
    length_column_name: str = field(
        default="length",
        metadata={
            "help": "Column of row lengths for group_by_length; rows without it are measured by input_ids."
        },
    )
    # --- logging, evaluation, checkpoints
    logging_steps: int = field(
        default=10, metadata={"help": "Print a metrics line every this many steps (0: never)."}
    )
    save_steps: int = field(
        default=500, metadata={"help": "Write a checkpoint every this many steps (0: never)."}
    )
    save_total_limit: int | None = field(
        default=None,
        metadata={"help": "Keep at most this many checkpoints (oldest deleted); none: keep all."},
    )
    eval_steps: int | None = field(
        default=None,
        metadata={
            "help": "Evaluate every this many steps; none: only at the end (when there is an eval set); 0: never."
        },
    )
    bf16: bool | None = field(
        default=None,
        metadata={"help": "bfloat16 autocast; none: on when the GPU supports it, off on the CPU."},
    )
    gradient_checkpointing: bool = field(
        default=False, metadata={"help": "Recompute activations in the backward pass to save memory."}
    )
    torch_compile: bool = field(
        default=False,
        metadata={
            "help": "Compile the trained model's decoder stack with torch.compile (inductor): its elementwise "
            "ops fused in the training and evaluation forwards. The output layer stays in the fused log-prob "
            "kernels and generation runs the decoder eagerly. The first forwards pay the compile (~30 s on "
            "a 2-core CPU). Not with fsdp."
        },
    )
    resume_from_checkpoint: str | None = field(
        default=None,
        metadata={
            "help": "'latest' (the newest checkpoint in output_dir) or a checkpoint folder to resume from."
        },
    )
    skip_nonfinite_steps: int = field(
        default=0,
        metadata={
            "help": "Skip up to this many optimizer steps in a row whose loss or gradient norm is NaN/inf "
            "(update not applied, logged as skipped_steps); 0: stop at the first."
        },
    )
    disable_tqdm: bool = field(default=False, metadata={"help": "Hide the progress bar."})
    report_to: str = field(
        default="auto",
        metadata={
            "help": "Extra metric sinks: 'auto' (tensorboard when installed), 'tensorboard' or 'none'."
        },
    )

    # --- distributed
    fsdp: str | None = field(
        default=None,
        metadata={
            "help": "Under torchrun: 'full_shard' (or 'full_shard auto_wrap', transformers' spelling) shards "
            "parameters, gradients and optimizer state over the processes with FSDP2, each decoder layer "
            "and the root its own unit; none: DDP (every process holds the whole model)."
        },
    )

    # --- LoRA through peft (TRL's ModelConfig names and defaults, except where a help text says otherwise)
    use_peft: bool = field(
        default=False,
        metadata={
            "help": "Train LoRA adapters (peft, the posttrain[peft] extra) on the frozen model; a loop's "
            "reference is then the same model with its adapters disabled."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(
        default=32,
        metadata={"help": "LoRA alpha: the update is scaled by alpha / r (alpha / sqrt(r) with rsLoRA)."},
    )
    lora_dropout: float = field(
        default=0.05,
        metadata={"help": "Dropout on the adapters' input (set to 0 with the model's when disable_dropout)."},
    )
    lora_target_modules: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules that get adapters, by name or name suffix (q_proj,v_proj), or all-linear; none: "
            "all-linear, every linear layer but the output layer (the family's attention and MLP "
            "projections; TRL's none leaves the choice to peft, q_proj and v_proj only for Llama or Qwen2)."
        },
    )
    lora_modules_to_save: list[str] | None = field(
        default=None,
        metadata={
            "help": "Modules trained in full beside the adapters (and saved with them); a sequence "
            "classifier's score head always is."
        },
    )
    lora_task_type: str | None = field(
        default=None,
        metadata={
            "help": "peft task type: CAUSAL_LM, SEQ_CLS or TOKEN_CLS (a classifier's score head trains in "
            "full); none: from the model, SEQ_CLS for a reward model, TOKEN_CLS for a process reward model, "
            "else CAUSAL_LM (TRL: CAUSAL_LM)."
        },
    )
    use_rslora: bool = field(
        default=False, metadata={"help": "Rank-stabilised LoRA: scale the update by alpha / sqrt(r)."}
    )
    use_dora: bool = field(
        default=False, metadata={"help": "DoRA: adapters on the direction, a trained magnitude per output."}
    )
    merge_adapter: bool = field(
        default=False,
        metadata={
            "help": "Also write the final model with the adapters merged into its weights, to "
            "output_dir/merged (loadable without peft); the adapter itself goes to output_dir."
        },
    )

    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "QLoRA: load the frozen base weights in 4 bits (bitsandbytes, the posttrain[qlora] extra; "
            "CUDA only; needs use_peft and a pretrained model)."
        },
    )
    load_in_8bit: bool = field(
        default=False,
        metadata={
            "help": "Load the frozen base weights in 8 bits (bitsandbytes; CUDA only; needs use_peft)."
        },
    )
    bnb_4bit_quant_type: str = field(
        default="nf4", metadata={"help": "The 4-bit data type: nf4 (QLoRA's NormalFloat) or fp4."}
    )
    use_bnb_nested_quant: bool = field(
        default=False,
        metadata={"help": "Quantize the 4-bit quantization constants too (QLoRA's double quantization)."},
    )

    def __post_init__(self):
        if self.learning_rate is not None:
            _check(
                self.learning_rate > 0 and math.isfinite(self.learning_rate),
                "learning_rate",
                "> 0",
                self.learning_rate,
            )
        _check_choice(self.lr_scheduler_type, "lr_scheduler_type", LR_SCHEDULER_TYPES)
        _check_choice(self.report_to, "report_to", REPORT_TO)
        _check_choice(self.train_sampling_strategy, "train_sampling_strategy", TRAIN_SAMPLING_STRATEGIES)
        _check(0 <= self.seed < 2**32, "seed", "in [0, 2**32)", self.seed)
        _check(self.warmup_steps >= 0, "warmup_steps", ">= 0", self.warmup_steps)
        _check(self.weight_decay >= 0, "weight_decay", ">= 0", self.weight_decay)
        _check(0 <= self.adam_beta1 < 1, "adam_beta1", "in [0, 1)", self.adam_beta1)
        _check(0 <= self.adam_beta2 < 1, "adam_beta2", "in [0, 1)", self.adam_beta2)
        _check(self.adam_epsilon >= 0, "adam_epsilon", ">= 0", self.adam_epsilon)
        _check(self.max_grad_norm >= 0, "max_grad_norm", ">= 0", self.max_grad_norm)
        for name in (
            "per_device_train_batch_size",
            "per_device_eval_batch_size",
            "gradient_accumulation_steps",
        ):
            _check(getattr(self, name) >= 1, name, ">= 1", getattr(self, name))
        _check(
            self.num_train_epochs >= 0 and math.isfinite(self.num_train_epochs),
            "num_train_epochs",
            ">= 0",
            self.num_train_epochs,
        )
        if self.max_steps <= 0 and self.num_train_epochs == 0:
            raise ConfigError(
                f"nothing to train: max_steps={self.max_steps} (<= 0 means 'use num_train_epochs') and "
                "num_train_epochs=0; set max_steps > 0 or num_train_epochs > 0"
            )
        _check(self.logging_steps >= 0, "logging_steps", ">= 0", self.logging_steps)
        _check(self.save_steps >= 0, "save_steps", ">= 0", self.save_steps)
        _check(self.skip_nonfinite_steps >= 0, "skip_nonfinite_steps", ">= 0", self.skip_nonfinite_steps)
        if self.save_total_limit is not None:
            _check(self.save_total_limit >= 1, "save_total_limit", ">= 1 (or none)", self.save_total_limit)
        if self.eval_steps is not None:
            _check(self.eval_steps >= 0, "eval_steps", ">= 0 (or none)", self.eval_steps)
        self._check_lora()
        self._check_fsdp()
        self._check_quantization()
        if self.resume_from_checkpoint == "":
            raise ConfigError("resume_from_checkpoint must be 'latest', a checkpoint folder or none, got ''")

    def _check_quantization(self) -> None:
        _check_choice(self.bnb_4bit_quant_type, "bnb_4bit_quant_type", BNB_4BIT_QUANT_TYPES)
        name = "load_in_4bit" if self.load_in_4bit else "load_in_8bit" if self.load_in_8bit else None
        if name is None:
            return
        if self.load_in_4bit and self.load_in_8bit:
            raise ConfigError("load_in_4bit=true and load_in_8bit=true: choose one")
        if self.merge_adapter:
            raise ConfigError(
                f"merge_adapter=true with {name}=true: merged into quantized weights the adapter would be rounded "
                "away; merge the saved adapter into the unquantized base instead (peft's merge_and_unload)"
            )
        if not self.use_peft:
            raise ConfigError(
                f"{name}=true without use_peft: quantized weights cannot be trained; QLoRA trains LoRA adapters "
                "on them (pass --use_peft true)"
            )
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
        if device not in QUANTIZED_DEVICE_TYPES:
            raise ConfigError(
                f"{name}=true needs a CUDA GPU (bitsandbytes' quantized weights); this machine has none: "
                "leave it off (LoRA alone trains on any device)"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ConfigError(f"{name}=true needs bitsandbytes: pip install 'posttrain[qlora]'") from None

    @property
    def fsdp_enabled(self) -> bool:
        return bool(self.fsdp) and self.fsdp.lower() not in ("false", "0", "no")

    def _check_fsdp(self) -> None:
        if not self.fsdp_enabled:
            return
        if self.torch_compile:
            raise ConfigError(
                f"fsdp={self.fsdp!r} with torch_compile=true: compiling FSDP2-sharded models is not supported "
                "here; use one of them"
            )
        words = self.fsdp.lower().replace(",", " ").split()
        refused = [w for w in words if w in FSDP_REFUSED]
        if refused:
            raise ConfigError(
                f"fsdp={self.fsdp!r}: {', '.join(refused)} is not supported; only full_shard (FSDP2, each "
                "decoder layer its own unit, optionally with auto_wrap) is"
            )
        unknown = [w for w in words if w not in FSDP_WORDS]
        if unknown:
            raise ConfigError(
                f"fsdp={self.fsdp!r}: unknown word(s) {unknown}; expected 'full_shard' (optionally with "
                "'auto_wrap'), as transformers' TrainingArguments spells it"
            )
        quantized = "load_in_4bit" if self.load_in_4bit else "load_in_8bit" if self.load_in_8bit else None
        if quantized:
            raise ConfigError(
                f"fsdp={self.fsdp!r} with {quantized}=true: FSDP2 cannot shard bitsandbytes' quantized weights "
                "here; use one of them"
            )

    def _check_lora(self) -> None:
        if not self.use_peft:
            if self.merge_adapter:
                raise ConfigError("merge_adapter=true but use_peft=false: there is no adapter to merge")
            return
        try:
            import peft  # noqa: F401
        except ImportError:
            raise ConfigError("use_peft=true needs the peft package: pip install 'posttrain[peft]'") from None
        _check(self.lora_r >= 1, "lora_r", ">= 1", self.lora_r)
        _check(self.lora_alpha > 0, "lora_alpha", "> 0", self.lora_alpha)
        _check(0 <= self.lora_dropout < 1, "lora_dropout", "in [0, 1)", self.lora_dropout)
        if self.lora_task_type is not None:
            _check_choice(self.lora_task_type, "lora_task_type", LORA_TASK_TYPES)
        for name in ("lora_target_modules", "lora_modules_to_save"):
            if getattr(self, name) is not None and not getattr(self, name):
                raise ConfigError(f"{name} is empty; leave it unset (none) for the default")
        if (
            self.lora_target_modules
            and "all-linear" in self.lora_target_modules
            and len(self.lora_target_modules) > 1
        ):
            raise ConfigError(
                f"lora_target_modules={self.lora_target_modules}: all-linear stands alone (it names every linear layer)"
            )
        if getattr(self, "sync_ref_model", False):
            raise ConfigError(
                "sync_ref_model=true with use_peft=true: the reference is the model with its adapters disabled, "
                "which cannot be mixed with the policy (TR-DPO); turn one of them off"
            )


def fill_run_defaults(
    config, defaults: dict, *, embedded_learning_rate: float, pretrained_learning_rate: float
) -> None:
    """Fill a loop's run-dependent options that were left unset: `defaults` maps a name to (value on the
    embedded task, value for any other data); unset is None, or -1 for max_length (None means no limit
    there). An unset learning rate is the embedded one for the randomly initialised embedded model, the
    pretrained one for any named model. Called at the top of a loop config's __post_init__."""
    embedded_task = config.dataset_name is None
    for name, (on_embedded, otherwise) in defaults.items():
        if getattr(config, name) == (-1 if name == "max_length" else None):
            setattr(config, name, on_embedded if embedded_task else otherwise)
    if config.learning_rate is None:
        random_init = config.model_name_or_path is None
        config.learning_rate = embedded_learning_rate if random_init else pretrained_learning_rate


def _check(ok: bool, name: str, requirement: str, value) -> None:
    # `not ok` (rather than a negated comparison) so that NaN fails every check.
    if not ok:
        raise ConfigError(f"{name} must be {requirement}, got {value!r}")


def _check_choice(value, name: str, choices) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {value!r}")


# ---------------------------------------------------------------------------------------------------------
# Parsing
# ---------------------------------------------------------------------------------------------------------


def _fields(config_cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    """name -> (field, resolved type) for every init field of the config class."""
    hints = typing.get_type_hints(config_cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(config_cls) if f.init}


def _type_name(tp) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        inner = [_type_name(a) for a in args if a is not type(None)]
        return " | ".join(inner) + (" | none" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, *, from_text: bool):
    """`value` converted to `tp`, or raise ValueError.

    from_text: the value is a command-line string, so 'none'/'null' mean None and every type is parsed
    from text. YAML values arrive typed already; a YAML string is parsed only where `tp` is not a string
    type (PyYAML reads `1e-5` as a string, for example), so a quoted 'none' stays a string.
    """
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (Union, types.UnionType):
        if value is None or (from_text and isinstance(value, str) and value.lower() in NONE_STRINGS):
            if type(None) in args:
                return None
            raise ValueError
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(value, arg, from_text=from_text)
            except ValueError:
                continue
        raise ValueError
    if origin is Literal:
        for choice in args:
            try:
                if _convert(value, type(choice), from_text=from_text) == choice:
                    return choice
            except ValueError:
                continue
        raise ValueError
    if origin is list:
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ValueError
        return [_convert(v, args[0], from_text=from_text) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in BOOL_STRINGS:
            return BOOL_STRINGS[value.lower()]
        raise ValueError
    if tp is int:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int):
            return value
        if isinstance(value, str):
            return int(value.strip())
        raise ValueError
    if tp is float:
        if isinstance(value, bool):
            raise ValueError
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            return float(value.strip())
        raise ValueError
    if tp is str:
        if isinstance(value, str):
            return value
        if not from_text and isinstance(value, int | float) and not isinstance(value, bool):
            return str(value)  # YAML `dataset_config: 2022` means the string "2022"
        raise ValueError
    raise ValueError(f"unsupported option type {tp!r}")


def _is_bool(tp) -> bool:
    return tp is bool or (typing.get_origin(tp) in (Union, types.UnionType) and bool in typing.get_args(tp))


def _unknown(name: str, known, where: str) -> ConfigError:
    close = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return ConfigError(f"unknown option {name!r}{where}{hint}; run with --help to list the options")


def _set(values: dict, fields: dict, name: str, raw, *, from_text: bool, where: str) -> None:
    if name not in fields:
        raise _unknown(name, fields, where)
    tp = fields[name][1]
    try:
        values[name] = _convert(raw, tp, from_text=from_text)
    except ValueError:
        raise ConfigError(f"option {name!r}{where} expects {_type_name(tp)}, got {raw!r}") from None


def _split_argv(argv: list[str]) -> tuple[str | None, list[tuple[str, str | None]]]:
    """(--config path or None, [(key, text or None for a bare flag)]) in command-line order."""
    config_path, pairs, i = None, [], 0
    while i < len(argv):
        token = argv[i]
        if not token.startswith("--") or token == "--":
            raise ConfigError(
                f"unexpected argument {token!r}: options are written --key value or --key=value"
            )
        key, eq, text = token[2:].partition("=")
        key = key.replace("-", "_")
        if not eq:
            # `--key value`, or a bare `--flag` when the next token is another option or there is none.
            if i + 1 < len(argv) and not argv[i + 1].startswith("--"):
                text, i = argv[i + 1], i + 1
            else:
                text = None
        if key == "config":
            if text is None:
                raise ConfigError("option '--config' expects a YAML file path")
            config_path = text
        else:
            pairs.append((key, text))
        i += 1
    return config_path, pairs


def load_yaml(path: str | Path) -> dict:
    """The mapping in a YAML config file (an empty file is an empty mapping)."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {str(path)!r}")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(
            f"config file {str(path)!r} must hold a mapping of option: value, got {type(data).__name__}"
        )
    return data


def parse_config(config_cls, argv: list[str]):
    """A `config_cls` instance from `[--config file.yaml] [--key value | --key=value | --flag ...]`.

    Precedence: command line > YAML file > dataclass defaults. A bare `--flag` sets a bool to true.
    `--help` / `-h` prints every option (type, default, help) and returns None.
    Raises ConfigError naming the option for an unknown key (with close matches), a value of the wrong
    type, a missing or malformed YAML file, or a value that `__post_init__` rejects.
    """
    if "--help" in argv or "-h" in argv:
        print(config_help(config_cls))
        return None
    fields = _fields(config_cls)
    # A parent's option that this config sets itself (an init=False field, its reason in metadata["fixed"]):
    # refused on the command line; in a YAML file only if it differs from the value the config sets (a
    # config.yaml saved before the option was fixed names it, with that value).
    fixed = {f.name: f.metadata.get("fixed", "") for f in dataclasses.fields(config_cls) if not f.init}
    config_path, pairs = _split_argv(argv)
    values: dict[str, Any] = {}
    saved_fixed: dict[str, Any] = {}  # a fixed option named in the YAML file -> its value there
    if config_path is not None:
        for name, raw in load_yaml(config_path).items():
            if str(name) in fixed:
                saved_fixed[str(name)] = raw
                continue
            _set(values, fields, str(name), raw, from_text=False, where=f" in {config_path}")
    for name, text in pairs:
        if name in fixed:
            raise ConfigError(f"option {name!r} on the command line does not apply: {fixed[name]}")
        if text is None:
            if name in fields and _is_bool(fields[name][1]):
                text = "true"
            elif name in fields:
                raise ConfigError(f"option '--{name}' expects a value ({_type_name(fields[name][1])})")
        _set(values, fields, name, text, from_text=True, where=" on the command line")
    config = config_cls(**values)
    for name, raw in saved_fixed.items():
        if raw != getattr(config, name):
            raise ConfigError(
                f"option {name!r} in {config_path} does not apply: {fixed[name]} ({name} is "
                f"{getattr(config, name)!r} here, the file says {raw!r})"
            )
    return config


def _default_text(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        return "none" if f.default is None else repr(f.default)
    if f.default_factory is not dataclasses.MISSING:
        return repr(f.default_factory())
    return "required"


def config_help(config_cls) -> str:
    """Every option of `config_cls` with its type, default and help text, one per line."""
    lines = [f"options of {config_cls.__name__} (YAML via --config file.yaml; command line overrides it):"]
    for name, (f, tp) in _fields(config_cls).items():
        head = f"  --{name} {_type_name(tp)} (default: {_default_text(f)})"
        lines.append(head)
        text = f.metadata.get("help", "")
        run_defaults = getattr(config_cls, "run_defaults", {})
        if name in run_defaults:  # shared fields name each loop's own run defaults
            text = text.format(embedded=run_defaults[name][0], other=run_defaults[name][1])
        lines.append(f"      {text}")
    return "\n".join(lines)


def config_dict(config) -> dict:
    """The config's init fields as a plain dict (the YAML that `save_config` writes)."""
    return {f.name: getattr(config, f.name) for f in dataclasses.fields(config) if f.init}


def save_config(config, path: str | Path) -> None:
    """Write the config as YAML; `parse_config(type(config), ["--config", path])` reads it back equal."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_dict(config), sort_keys=False))
