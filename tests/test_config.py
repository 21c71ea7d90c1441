"""TrainConfig validation and parse_config: YAML + command-line precedence, types, and every error message."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Literal

import pytest

from posttrain.rl.config import ConfigError, TrainConfig, config_help, parse_config, save_config


@dataclass
class LoopConfig(TrainConfig):
    """A loop's config: TrainConfig plus its own fields of the other supported types."""

    beta: float = field(default=0.1, metadata={"help": "KL coefficient."})
    loss_type: Literal["sigmoid", "hinge"] = field(default="sigmoid", metadata={"help": "Preference loss."})
    reward_funcs: list[str] = field(
        default_factory=lambda: ["accuracy"], metadata={"help": "Reward functions."}
    )
    max_length: int | None = field(default=1024, metadata={"help": "Truncation length."})


def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_no_arguments_give_the_defaults():
    config = parse_config(TrainConfig, [])
    assert config == TrainConfig()
    assert (config.learning_rate, config.lr_scheduler_type, config.max_steps, config.bf16) == (
        None,
        "linear",
        -1,
        None,
    )


def test_yaml_then_command_line_wins(tmp_path):
    path = _yaml(tmp_path, "learning_rate: 1e-5\nseed: 7\nper_device_train_batch_size: 2\nbf16: false\n")
    config = parse_config(TrainConfig, ["--config", path, "--seed", "3", "--bf16=true"])
    assert config.learning_rate == 1e-5  # PyYAML reads 1e-5 as a string; converted to float
    assert isinstance(config.learning_rate, float)
    assert config.seed == 3  # command line over YAML
    assert config.per_device_train_batch_size == 2  # YAML over default
    assert config.bf16 is True
    # --config may come after the overrides: the command line still wins.
    assert parse_config(TrainConfig, ["--seed", "3", f"--config={path}"]).seed == 3


def test_types_from_annotations(tmp_path):
    config = parse_config(
        LoopConfig,
        [
            "--beta",
            "1",
            "--loss-type",
            "hinge",
            "--reward_funcs",
            "a,b",
            "--max_length",
            "none",
            "--num_train_epochs",
            "2",
        ],
    )
    assert config.beta == 1.0 and isinstance(config.beta, float)
    assert config.loss_type == "hinge"  # dashes in the key are accepted
    assert config.reward_funcs == ["a", "b"]
    assert config.max_length is None
    assert config.num_train_epochs == 2.0
    path = _yaml(
        tmp_path, "reward_funcs: [x, y]\nmax_length: null\ndataset_config: 2022\noutput_dir: 'none'\n"
    )
    config = parse_config(LoopConfig, ["--config", path])
    assert config.reward_funcs == ["x", "y"] and config.max_length is None
    assert config.dataset_config == "2022"  # an unquoted YAML number for a string option
    assert config.output_dir == "none"  # a quoted YAML string stays a string


@pytest.mark.parametrize(
    "text, value",
    [
        ("true", True),
        ("True", True),
        ("1", True),
        ("yes", True),
        ("false", False),
        ("0", False),
        ("NO", False),
    ],
)
def test_bool_strings(text, value):
    assert parse_config(TrainConfig, ["--gradient_checkpointing", text]).gradient_checkpointing is value


def test_bare_flag_sets_true():
    config = parse_config(TrainConfig, ["--disable_tqdm", "--gradient_checkpointing", "--bf16"])
    assert config.disable_tqdm and config.gradient_checkpointing and config.bf16 is True
    assert parse_config(TrainConfig, ["--bf16", "none"]).bf16 is None


def test_save_config_round_trips(tmp_path):
    config = LoopConfig(
        learning_rate=3e-7,
        adam_epsilon=1e-8,
        reward_funcs=["a"],
        max_length=None,
        output_dir="null",
        bf16=False,
    )
    save_config(config, tmp_path / "out.yaml")
    assert parse_config(LoopConfig, ["--config", str(tmp_path / "out.yaml")]) == config


def test_help_lists_every_option(capsys):
    assert parse_config(LoopConfig, ["--seed", "1", "--help"]) is None
    text = capsys.readouterr().out
    for f in dataclasses.fields(LoopConfig):
        assert f"--{f.name} " in text
    assert "--learning_rate float | none (default: none)" in text
    assert "--per_device_train_batch_size int (default: 8)" in text
    assert "--loss_type one of 'sigmoid', 'hinge' (default: 'sigmoid')" in text
    assert "Peak AdamW learning rate" in text
    assert text == config_help(LoopConfig) + "\n"


# ---------------------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------------------


def test_unknown_option_suggests_close_names(tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"unknown option 'learning_rat' on the command line \(did you mean 'learning_rate'\?\)",
    ):
        parse_config(TrainConfig, ["--learning_rat", "1e-4"])
    path = _yaml(tmp_path, "per_device_batch_size: 4\n")
    with pytest.raises(
        ConfigError,
        match=r"unknown option 'per_device_batch_size' in .*config.yaml \(did you mean 'per_device_\w+_batch_size'",
    ):
        parse_config(TrainConfig, ["--config", path])
    with pytest.raises(ConfigError, match=r"unknown option 'zzz' on the command line; run with --help"):
        parse_config(TrainConfig, ["--zzz", "1"])


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--seed", "abc"], r"option 'seed' on the command line expects int, got 'abc'"),
        (["--seed", "1.5"], r"option 'seed' on the command line expects int, got '1.5'"),
        (
            ["--learning_rate", "fast"],
            r"option 'learning_rate' on the command line expects float \| none, got 'fast'",
        ),
        (["--bf16", "maybe"], r"option 'bf16' on the command line expects bool \| none, got 'maybe'"),
        (["--seed", "none"], r"option 'seed' on the command line expects int, got 'none'"),
        (["--seed"], r"option '--seed' expects a value \(int\)"),
        (["seed", "3"], r"unexpected argument 'seed': options are written --key value"),
        (["--config"], r"option '--config' expects a YAML file path"),
    ],
)
def test_wrong_type_names_the_option(argv, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, argv)


def test_wrong_types_in_yaml(tmp_path):
    with pytest.raises(ConfigError, match=r"option 'seed' in .*config.yaml expects int, got 1.5"):
        parse_config(TrainConfig, ["--config", _yaml(tmp_path, "seed: 1.5\n")])
    with pytest.raises(
        ConfigError, match=r"option 'loss_type' in .* expects one of 'sigmoid', 'hinge', got 'ipo'"
    ):
        parse_config(LoopConfig, ["--config", _yaml(tmp_path, "loss_type: ipo\n")])
    with pytest.raises(
        ConfigError, match=r"option 'gradient_checkpointing' in .* expects bool, got 'sometimes'"
    ):
        parse_config(LoopConfig, ["--config", _yaml(tmp_path, "gradient_checkpointing: sometimes\n")])


def test_yaml_file_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"config file not found: '.*missing.yaml'"):
        parse_config(TrainConfig, ["--config", str(tmp_path / "missing.yaml")])
    with pytest.raises(
        ConfigError, match=r"config file '.*config.yaml' must hold a mapping of option: value, got list"
    ):
        parse_config(TrainConfig, ["--config", _yaml(tmp_path, "- 1\n- 2\n")])
    with pytest.raises(ConfigError, match=r"config file '.*config.yaml' is not valid YAML"):
        parse_config(TrainConfig, ["--config", _yaml(tmp_path, "a: [1\n")])
    assert parse_config(TrainConfig, ["--config", _yaml(tmp_path, "")]) == TrainConfig()


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("learning_rate", "0", r"learning_rate must be > 0, got 0.0"),
        ("learning_rate", "nan", r"learning_rate must be > 0, got nan"),
        ("per_device_train_batch_size", "0", r"per_device_train_batch_size must be >= 1, got 0"),
        ("per_device_eval_batch_size", "-1", r"per_device_eval_batch_size must be >= 1, got -1"),
        ("gradient_accumulation_steps", "0", r"gradient_accumulation_steps must be >= 1, got 0"),
        ("warmup_steps", "-1", r"warmup_steps must be >= 0, got -1"),
        ("weight_decay", "-0.1", r"weight_decay must be >= 0, got -0.1"),
        ("adam_beta1", "1", r"adam_beta1 must be in \[0, 1\), got 1.0"),
        ("adam_beta2", "-0.5", r"adam_beta2 must be in \[0, 1\), got -0.5"),
        ("adam_epsilon", "-1e-8", r"adam_epsilon must be >= 0, got -1e-08"),
        ("max_grad_norm", "-1", r"max_grad_norm must be >= 0, got -1.0"),
        ("num_train_epochs", "-1", r"num_train_epochs must be >= 0, got -1.0"),
        ("num_train_epochs", "inf", r"num_train_epochs must be >= 0, got inf"),
        ("seed", "-1", r"seed must be in \[0, 2\*\*32\), got -1"),
        ("logging_steps", "-1", r"logging_steps must be >= 0, got -1"),
        ("save_steps", "-5", r"save_steps must be >= 0, got -5"),
        ("save_total_limit", "0", r"save_total_limit must be >= 1 \(or none\), got 0"),
        ("eval_steps", "-1", r"eval_steps must be >= 0 \(or none\), got -1"),
        (
            "lr_scheduler_type",
            "polynomial",
            r"lr_scheduler_type must be one of linear, cosine, constant, constant_with_warmup, got 'polynomial'",
        ),
        ("report_to", "wandb", r"report_to must be one of auto, none, tensorboard, got 'wandb'"),
        (
            "resume_from_checkpoint",
            "",
            r"resume_from_checkpoint must be 'latest', a checkpoint folder or none, got ''",
        ),
    ],
)
def test_range_violations_name_the_option(option, value, message):
    with pytest.raises(ConfigError, match=message):
        parse_config(TrainConfig, [f"--{option}={value}"])


def test_contradiction_nothing_to_train():
    with pytest.raises(ConfigError, match=r"nothing to train: max_steps=-1 .* and num_train_epochs=0"):
        parse_config(TrainConfig, ["--num_train_epochs", "0"])
    assert parse_config(TrainConfig, ["--num_train_epochs", "0", "--max_steps", "5"]).max_steps == 5


def test_config_error_is_a_value_error():
    assert issubclass(ConfigError, ValueError)
    with pytest.raises(ValueError):
        TrainConfig(per_device_train_batch_size=0)


def test_help_names_each_loops_own_run_defaults():
    # Options shared by several loops carry {embedded} / {other} placeholders, filled from the loop's own
    # run_defaults; no loop's --help may show a placeholder.
    import importlib

    from posttrain.cli import COMMANDS

    for module_name, class_name in COMMANDS.values():
        text = config_help(getattr(importlib.import_module(module_name), class_name))
        assert "{embedded}" not in text and "{other}" not in text, module_name
    from posttrain.rl.dpo import DPOConfig

    text = config_help(DPOConfig)
    assert "none: 32 on the embedded task, else 8." in text
    assert "-1: 64 embedded, else 1024" in text


@pytest.mark.parametrize(
    "command", ["sft", "rm", "prm", "dpo", "kto", "cpo", "orpo", "grpo", "rloo", "ppo", "online_dpo"]
)
def test_every_loops_saved_config_reads_back(command, tmp_path):
    """The config.yaml a run writes (computed options included, such as GRPO's steps_per_generation and
    generation_batch_size) reads back equal: resuming with --config config.yaml works for every loop."""
    import importlib

    from posttrain.cli import COMMANDS

    module, name = COMMANDS[command]
    config_class = getattr(importlib.import_module(module), name)
    config = config_class(output_dir=None)
    save_config(config, tmp_path / "config.yaml")
    assert parse_config(config_class, ["--config", str(tmp_path / "config.yaml")]) == config
