"""`posttrain <command> [--config file.yaml] [--key value ...]`.

Each command is a loop module exposing a config dataclass and `train(config)`. A bad option or bad
input (a missing dataset, a malformed row, a contradiction found at start-up) stops the command with a
one-line message naming it and exit code 2; POSTTRAIN_TRACEBACK=1 shows the traceback instead.
"""

from __future__ import annotations

import importlib
import os
import sys

# command -> (module, config class name)
COMMANDS = {
    "sft": ("posttrain.rl.sft", "SFTConfig"),
    "rm": ("posttrain.rl.reward", "RewardConfig"),
    "prm": ("posttrain.rl.prm", "PRMConfig"),
    "dpo": ("posttrain.rl.dpo", "DPOConfig"),
    "kto": ("posttrain.rl.kto", "KTOConfig"),
    "cpo": ("posttrain.rl.cpo", "CPOConfig"),
    "orpo": ("posttrain.rl.orpo", "ORPOConfig"),
    "grpo": ("posttrain.rl.grpo", "GRPOConfig"),
    "rloo": ("posttrain.rl.rloo", "RLOOConfig"),
    "ppo": ("posttrain.rl.ppo", "PPOConfig"),
    "online_dpo": ("posttrain.rl.online_dpo", "OnlineDPOConfig"),
}

USAGE = "usage: posttrain <command> [--config file.yaml] [--key value ...] [--help]\ncommands: " + ", ".join(
    COMMANDS
)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "compare":  # runs another command's options through posttrain and TRL
        from posttrain import compare

        return compare.main(rest)
    if command not in COMMANDS:
        print(f"posttrain: unknown command {command!r}\n{USAGE}", file=sys.stderr)
        return 2
    from posttrain.rl.config import ConfigError, parse_config
    from posttrain.rl.faults import RunStopped

    module_name, config_name = COMMANDS[command]
    module = importlib.import_module(module_name)
    try:
        config = parse_config(getattr(module, config_name), rest)
    except ConfigError as err:
        print(f"posttrain {command}: {err}", file=sys.stderr)
        return 2
    if config is None:  # --help was printed
        return 0
    try:
        module.train(config)
    except RunStopped as err:  # a fault mid-run (non-finite step, failed write, signal): no traceback
        print(f"posttrain {command}: {err}", file=sys.stderr)
        return err.exit_code
    except (ValueError, FileNotFoundError) as err:  # ConfigError is a ValueError
        if os.environ.get("POSTTRAIN_TRACEBACK") == "1":
            raise
        message = " ".join(str(err).split())  # one line, also for library messages that span several
        print(f"posttrain {command}: error: {message} (POSTTRAIN_TRACEBACK=1 shows where)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
