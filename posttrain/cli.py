"""`posttrain <command> [--config file.yaml] [--key value ...]`.

Each command is a loop module exposing a config dataclass and `train(config)`, or a tool (eval, plot, demo)
whose positional arguments, if it takes any, fill one option of its config dataclass before a function of it
runs. A bad option or bad input (a missing dataset, a malformed row, a contradiction found at start-up) stops
the command with a one-line message naming it and exit code 2; POSTTRAIN_TRACEBACK=1 shows the traceback
instead.
"""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

from posttrain.rl.config import ConfigError, parse_config

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

# --- eval / plot / demo: tools, not training loops. command -> (module, config class, the function run with
# the config, the option the positional arguments fill (None: the tool takes none), how many at most (None:
# any), how usage lines show them)
TOOLS = {
    "eval": ("posttrain.evaluate", "EvalConfig", "run", "model_name_or_path", 1, "MODEL"),
    "plot": ("posttrain.plot", "PlotConfig", "run", "run_dirs", None, "RUN_DIR [RUN_DIR ...]"),
    "demo": ("posttrain.demo", "DemoConfig", "run", None, 0, "[--quick]"),
}


def _summary(module_name: str) -> str:
    """A command's one-line description: its module docstring's first sentence, without a leading
    "`posttrain x ...`:" or citations, up to its first colon (read from the source, so that `posttrain --help`
    imports no loop)."""
    import ast
    import importlib.util
    import re

    source = Path(importlib.util.find_spec(module_name).origin).read_text()
    paragraph = " ".join((ast.get_docstring(ast.parse(source)) or "").split("\n\n")[0].split())
    paragraph = re.sub(r"^`[^`]*`:\s*", "", paragraph)
    paragraph = re.sub(r"\s*\([^()]*(et al\.|arXiv)[^()]*\)", "", paragraph)  # citations
    first = paragraph.split(": ")[0].split(". ")[0].rstrip(".")
    return first[:1].upper() + first[1:]


def usage() -> str:
    """`posttrain --help`: the commands, one line each."""
    lines = ["usage: posttrain <command> [--config file.yaml] [--key value ...] [--help]", "commands:"]
    modules = {name: entry[0] for name, entry in {**COMMANDS, **TOOLS}.items()} | {
        "compare": "posttrain.compare"
    }
    for name, module_name in modules.items():
        lines.append(f"  {name:<11} {_summary(module_name)}")
    return "\n".join(lines)


def _positional_options(command: str, argv: list[str]) -> list[str]:
    """`eval MODEL --k v` -> `--model_name_or_path MODEL --k v`; `plot A B --k v` -> `--run_dirs=A,B --k v`."""
    _, _, _, option, most, shown = TOOLS[command]
    n = next((i for i, a in enumerate(argv) if a.startswith("-")), len(argv))
    positional, rest = argv[:n], argv[n:]
    if not positional or "--help" in rest or "-h" in rest:
        return rest
    if option is None:
        raise ConfigError(f"takes no positional arguments, got {positional}")
    if most is not None and len(positional) > most:
        raise ConfigError(f"expected one {shown}, got {len(positional)}: {positional}")
    if most is None and any("," in p for p in positional):  # several are joined with commas into one option
        raise ConfigError(
            f"{shown}: {next(p for p in positional if ',' in p)!r} has a comma, which separates list items"
        )
    if any(a.partition("=")[0].lstrip("-").replace("-", "_") == option for a in rest):
        raise ConfigError(f"{shown} given both as a positional argument and as --{option}")
    return [f"--{option}={','.join(positional)}", *rest]


# --- end of eval / plot / demo


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command == "compare":  # runs another command's options through posttrain and TRL
        from posttrain import compare

        return compare.main(rest)
    if command not in COMMANDS and command not in TOOLS:
        print(f"posttrain: unknown command {command!r}\n{usage()}", file=sys.stderr)
        return 2
    from posttrain.rl import distributed
    from posttrain.rl.faults import RunStopped

    if command in TOOLS:
        module_name, config_name, entry, *_, shown = TOOLS[command]
        if "--help" in rest or "-h" in rest:
            print(f"usage: posttrain {command} {shown} [--config file.yaml] [--key value ...]")
    else:
        (module_name, config_name), entry = COMMANDS[command], "train"
    module = importlib.import_module(module_name)
    try:
        if command in TOOLS:
            rest = _positional_options(command, rest)
        config = parse_config(getattr(module, config_name), rest)
        if config is not None:
            distributed.check_launch(config)  # --fsdp without torchrun: said before any data is read
    except ConfigError as err:
        print(f"posttrain {command}: {err}", file=sys.stderr)
        return 2
    if config is None:  # --help was printed
        return 0
    try:
        getattr(module, entry)(config)
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
