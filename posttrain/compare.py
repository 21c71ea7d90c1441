"""`posttrain compare <command> [options]`: one run's options through posttrain and through TRL 1.16's trainer,
side by side.

    posttrain compare sft                                   # the embedded task, 10 steps
    posttrain compare dpo --model_name_or_path runs/sft --dataset_name trl-lib/ultrafeedback_binarized \\
        --max_steps 20 --output_dir runs/compare-dpo

The options are the command's own (`posttrain <command> --help`). Both sides start from the same weights (the
named model, or the loop's embedded start saved to a folder), train on the same rows in the same order (both
follow transformers' Trainer: a seeded random order, or train_sampling_strategy), and TRL gets every option
the two share by name with our resolved value, run-dependent defaults included, so that it runs what we run.
Options only posttrain has, set away from their defaults, are listed: TRL runs without them. Evaluation and
checkpoints are off on both sides; max_steps defaults to 10.

Each side runs in a fresh subprocess (no shared caches, its own peak memory) and is timed between its
optimizer steps. Printed, and written to compare.json in --output_dir (default: a temporary folder): the
per-step losses and their largest relative difference, the median s/step and tokens/s after the first step,
the peak memory (the resident set's high-water mark on the CPU, the allocator's peak on CUDA) and the compute
floor: the FLOPs of the forwards and backwards our side ran, counted at each call of the log-prob path (the
decoder layers over every token, a prompt shared by several rows once, the output layer over the positions the
loss reads: `measure.step_flops`),
divided by matmul rates measured in the same process after the steps.

Offline loops only (sft, rm, dpo, kto, cpo, orpo): the online ones sample their own completions, and two
samplers draw different tokens, so their losses cannot agree step by step (benchmarks/grpo.py times them on
fixed work).
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# command -> (TRL module, its config class, its trainer class)
TRL_TRAINERS = {
    "sft": ("trl", "SFTConfig", "SFTTrainer"),
    "rm": ("trl", "RewardConfig", "RewardTrainer"),
    "dpo": ("trl", "DPOConfig", "DPOTrainer"),
    "kto": ("trl", "KTOConfig", "KTOTrainer"),
    "cpo": ("trl.experimental.cpo", "CPOConfig", "CPOTrainer"),
    "orpo": ("trl.experimental.orpo", "ORPOConfig", "ORPOTrainer"),
}
ONLINE = ("grpo", "rloo", "ppo", "online_dpo")
DEFAULT_STEPS = 10
# Our options that are about the run, not the training: set by compare itself on both sides, never passed on.
RUN_OPTIONS = {
    "output_dir", "logging_steps", "save_steps", "save_total_limit", "eval_steps", "report_to", "disable_tqdm",
    "resume_from_checkpoint", "per_device_eval_batch_size", "dataset_name", "dataset_config",
    "dataset_train_split", "dataset_test_split", "model_name_or_path", "bf16",
}  # fmt: skip
RESULT_PREFIX = "COMPARE_RESULT "


class CompareError(ValueError):
    pass


def usage() -> str:
    return (
        "usage: posttrain compare <command> [the command's options]\n"
        f"commands: {', '.join(TRL_TRAINERS)} (the online loops {', '.join(ONLINE)} sample their own "
        "completions, so their losses cannot agree step by step: benchmarks/grpo.py times them on fixed work)"
    )


# ---------------------------------------------------------------------------------------------------------
# The run both sides make
# ---------------------------------------------------------------------------------------------------------


def our_config(command: str, argv: list[str], start: str, output_dir: str):
    """The command's config from `argv` (run-dependent defaults filled as `posttrain <command>` fills them),
    then pointed at the shared start folder, with evaluation, checkpoints and extra sinks off."""
    from posttrain.cli import COMMANDS
    from posttrain.rl.config import parse_config

    module_name, class_name = COMMANDS[command]
    config = parse_config(getattr(importlib.import_module(module_name), class_name), argv)
    # replace() runs the checks again on values already filled: the embedded defaults stay as resolved
    return dataclasses.replace(
        config,
        model_name_or_path=start,
        output_dir=output_dir,
        max_steps=config.max_steps if config.max_steps > 0 else DEFAULT_STEPS,
        eval_steps=0,
        save_steps=0,
        logging_steps=1,
        report_to="none",
        disable_tqdm=True,
    )


def embedded_train_rows(command: str):
    """The training rows a loop reads on the embedded task (no dataset_name), as a datasets.Dataset."""
    from datasets import Dataset

    from posttrain.data import embedded

    if command == "sft":
        return embedded.dataset("prompt_completion", "train")
    if command == "rm":
        from posttrain.rl import reward

        rows = embedded.ranked_preference_rows(
            "train", rejected_per_prompt=reward.EMBEDDED_REJECTED_PER_PROMPT
        )
        return Dataset.from_list(rows)
    if command == "kto":
        return embedded.dataset("unpaired_preference", "train")
    return embedded.dataset("preference", "train")


def shared_options(config, trl_config_class) -> tuple[dict, list[str]]:
    """(our resolved value of every option TRL's config also has, our options TRL lacks that are set away
    from their defaults)."""
    theirs = {f.name for f in dataclasses.fields(trl_config_class)}
    passed, ours_only = {}, []
    for f in dataclasses.fields(config):
        if f.name in RUN_OPTIONS:
            continue
        value = getattr(config, f.name)
        if f.name in theirs:
            passed[f.name] = value
        elif (
            f.name != "ref_model_name_or_path" and f.default is not dataclasses.MISSING and value != f.default
        ):
            ours_only.append(f"{f.name}={value!r}")
    return passed, ours_only


def trl_classes(command: str):
    module_name, config_name, trainer_name = TRL_TRAINERS[command]
    module = importlib.import_module(module_name)
    return getattr(module, config_name), getattr(module, trainer_name)


# ---------------------------------------------------------------------------------------------------------
# The sides (each in its own subprocess)
# ---------------------------------------------------------------------------------------------------------


def _peak_start(device) -> float:
    from posttrain import measure

    if device == "cuda":
        import torch

        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    measure.reset_peak_rss()
    return measure.rss_mib()


def _peak_mib(device, start: float) -> float:
    from posttrain import measure

    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20 - start
    return measure.peak_rss_mib() - start


class _FlopCounter:
    """Counts, per optimizer step, the tokens our side sent through the decoder layers and the output layer,
    with and without gradients, at each call of `token_logprobs` (every offline loop's log-prob path), or
    of the reward model's step loss."""

    def __init__(self):
        self.current = self._zero()
        self.steps = []
        self.shared = None  # the SharedPrefix of the call being counted (`install`)

    @staticmethod
    def _zero():
        return {
            "train_tokens": 0,
            "train_attn": 0,
            "train_head": 0,
            "fwd_tokens": 0,
            "fwd_attn": 0,
            "fwd_head": 0,
        }

    def add(self, batch: dict, head_positions: int, grad: bool, prefix: str = "", shared=None) -> None:
        """shared: the `rl.logprobs.SharedPrefix` the call ran, whose rows after a prefix's first did not run
        its tokens (nor attend among them)."""
        import torch

        lengths = document_lengths(batch, prefix)
        kind = "train" if grad else "fwd"
        tokens, attn = lengths.sum(), (lengths.long() ** 2).sum()
        if shared is not None:
            again = torch.ones_like(shared.inverse, dtype=torch.bool)
            again[shared.first] = False
            skipped = batch["attention_mask"][again, : shared.P].sum(1).long()
            tokens, attn = tokens - skipped.sum(), attn - (skipped**2).sum()
        self.current[f"{kind}_tokens"] += int(tokens)
        self.current[f"{kind}_attn"] += int(attn)
        self.current[f"{kind}_head"] += head_positions

    def step(self) -> None:
        self.steps.append(self.current)
        self.current = self._zero()

    def install(self) -> None:
        import torch

        from posttrain.rl import logprobs

        original = logprobs.token_logprobs

        real_shared_prefix = logprobs.shared_prefix

        def recorded_shared_prefix(*args, **kwargs):  # what token_logprobs ran, not computed a second time
            self.shared = real_shared_prefix(*args, **kwargs)
            return self.shared

        logprobs.shared_prefix = recorded_shared_prefix

        def counted(model, batch, *args, **kwargs):
            mask = kwargs.get("mask")
            mask = batch["completion_mask"] if mask is None else mask
            self.shared = None
            out = original(model, batch, *args, **kwargs)
            self.add(batch, int(mask[:, 1:].sum()), torch.is_grad_enabled(), shared=self.shared)
            return out

        for module in list(sys.modules.values()):
            if (module.__name__ or "").startswith("posttrain.") and getattr(
                module, "token_logprobs", None
            ) is original:
                module.token_logprobs = counted
        if "posttrain.rl.reward" in sys.modules:
            reward = sys.modules["posttrain.rl.reward"]
            step_loss = reward.reward_step_loss

            def counted_reward(model, batch, *args, **kwargs):
                for prefix in ("chosen_", "rejected_", ""):
                    if f"{prefix}input_ids" in batch:
                        self.add(batch, 0, torch.is_grad_enabled(), prefix)
                return step_loss(model, batch, *args, **kwargs)

            reward.reward_step_loss = counted_reward


def document_lengths(batch: dict, prefix: str = ""):
    """The lengths of the sequences a batch holds, padding left out: its rows' attention-mask sums, or, when
    position_ids restart within rows (packed or padding-free documents), each document's length. A
    document's attention costs its length squared, not its row's."""
    import torch

    ids = batch[f"{prefix}input_ids"]
    attention = batch.get(f"{prefix}attention_mask")
    keep = attention.bool() if attention is not None else torch.ones_like(ids, dtype=torch.bool)
    positions = batch.get(f"{prefix}position_ids")
    if positions is None:
        return keep.sum(-1)
    starts = ((positions == 0) & keep).flatten()
    document = starts.cumsum(0) - 1  # each kept token's document, counted over the flattened rows
    return torch.bincount(document[keep.flatten()].clamp(min=0))


def floor_seconds(model_config, steps: list[dict]) -> list[float]:
    """Each step's compute floor from its counted tokens: `measure.step_flops` for the trained part, a third
    of it (the forward) for the no-gradient part, at the body and output-layer rates measured now on the
    steps' mean shapes."""
    from posttrain import measure

    L, H, V = model_config.num_hidden_layers, model_config.hidden_size, model_config.vocab_size
    P, A = measure.linear_params_per_layer(model_config), measure.attention_width(model_config)
    tokens = max(1, round(statistics.mean(s["train_tokens"] + s["fwd_tokens"] for s in steps)))
    head = max(1, round(statistics.mean(s["train_head"] + s["fwd_head"] for s in steps)))
    layer_s = sum(measure.linear_fwd_bwd_seconds(tokens, k, m) for k, m in measure.layer_shapes(model_config))
    body_rate = 6.0 * P * tokens / layer_s
    head_rate = 6.0 * H * V * head / measure.linear_fwd_bwd_seconds(head, H, V)
    out = []
    for s in steps:
        seconds = 0.0
        for kind, share in (("train", 1.0), ("fwd", 1.0 / 3)):
            body = 6.0 * L * P * s[f"{kind}_tokens"] + 6.0 * L * A * s[f"{kind}_attn"]
            seconds += share * (body / body_rate + 6.0 * H * V * s[f"{kind}_head"] / head_rate)
        out.append(seconds)
    return out


def run_ours(spec: dict) -> dict:
    import torch

    from posttrain.cli import COMMANDS
    from posttrain.rl import loop

    command = spec["command"]
    module = importlib.import_module(COMMANDS[command][0])
    config = our_config(command, spec["argv"], spec["start"], spec["output_dir"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    counter, stamps, memory = _FlopCounter(), [], {}
    counter.install()
    optimizer_step = loop.optimizer_step

    def stamped(*args, **kwargs):
        optimizer_step(*args, **kwargs)
        stamps.append(time.perf_counter())
        counter.step()
        memory["peak"] = _peak_mib(device, memory["start"])

    loop.optimizer_step = stamped
    build_optimizer = loop.build_optimizer

    def starting(*args, **kwargs):  # models loaded, optimizer state not yet: where both sides start counting
        memory["start"] = _peak_start(device)
        counter.current = counter._zero()
        stamps.clear()
        stamps.append(time.perf_counter())
        return build_optimizer(*args, **kwargs)

    loop.build_optimizer = starting
    module.train(config)
    lines = [
        json.loads(line) for line in (Path(config.output_dir) / "metrics.jsonl").read_text().splitlines()
    ]
    records = [r for r in lines if "loss" in r]
    from transformers import AutoConfig

    floors = None  # the rates are timed with CPU matmuls (`measure`): no floor for a run on a GPU
    if device == "cpu":
        floors = floor_seconds(AutoConfig.from_pretrained(spec["start"]).get_text_config(), counter.steps)
    return {
        "losses": [r["loss"] for r in records],
        "num_tokens": [r.get("num_tokens") for r in records],
        "times": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "peak_mib": memory["peak"],
        "floors": floors,
    }


def run_trl(spec: dict) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, TrainerCallback

    from posttrain.data import loading
    from posttrain.rl.models import load_tokenizer

    command = spec["command"]
    config = our_config(command, spec["argv"], spec["start"], spec["output_dir"])
    Config, Trainer = trl_classes(command)
    options, _ = shared_options(config, Config)
    cuda = torch.cuda.is_available()
    bf16 = bool(config.bf16) if config.bf16 is not None else (cuda and torch.cuda.is_bf16_supported())
    args = Config(
        output_dir=spec["output_dir"],
        use_cpu=not cuda,
        bf16=bf16,
        activation_checkpointing=config.gradient_checkpointing,
        report_to=[],
        save_strategy="no",
        eval_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        dataloader_num_workers=0,
        **{k: v for k, v in options.items() if k != "gradient_checkpointing"},
    )
    device = "cuda" if cuda else "cpu"
    stamps, memory = [], {}

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            memory["start"] = _peak_start(device)
            stamps.append(time.perf_counter())

        def on_step_end(self, *a, **k):
            stamps.append(time.perf_counter())
            memory["peak"] = _peak_mib(device, memory["start"])

    if config.dataset_name is None:
        train = embedded_train_rows(command)
    else:
        train = loading.config_splits(dataclasses.replace(config, eval_steps=0, dataset_test_split="test"))[0]
    extra = {}
    if getattr(config, "ref_model_name_or_path", None):
        extra["ref_model"] = AutoModelForCausalLM.from_pretrained(config.ref_model_name_or_path)

    class InOurOrder(Trainer):
        # our epochs visit the rows in a seeded order of our own (`loop.epoch_order`, a pure function of seed
        # and epoch); transformers' random sampler draws from the global generator: TRL reads ours
        def _get_train_sampler(self, train_dataset=None):
            return _EpochOrder(
                len(train_dataset if train_dataset is not None else self.train_dataset), config
            )

    trainer = InOurOrder(
        model=spec["start"],
        args=args,
        train_dataset=train,
        processing_class=load_tokenizer(spec["start"]),
        callbacks=[Clock()],
        **extra,
    )
    trainer.train()
    records = [r for r in trainer.state.log_history if "loss" in r]
    return {
        "losses": [r["loss"] for r in records],
        "num_tokens": [r.get("num_tokens") for r in records],
        "times": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "peak_mib": memory["peak"],
    }


class _EpochOrder:
    """A sampler that visits the rows as our loops do: `loop.epoch_order` of each epoch in turn (the
    DataLoader iterates it once per epoch)."""

    def __init__(self, num_rows: int, config):
        self.num_rows, self.config, self.epoch = num_rows, config, 0

    def __len__(self) -> int:
        return self.num_rows

    def __iter__(self):
        from posttrain.rl import loop

        order = loop.epoch_order(
            self.num_rows, self.config.seed, self.epoch, self.config.train_sampling_strategy
        )
        self.epoch += 1
        return iter(order)


def _side_main(side: str, spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    result = (run_ours if side == "ours" else run_trl)(spec)
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def _run_side(side: str, spec_path: Path) -> dict:
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(
        [sys.executable, "-m", "posttrain.compare", side, str(spec_path)],
        capture_output=True,
        text=True,
        env=env,
    )
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not lines:
        raise CompareError(
            f"the {'posttrain' if side == 'ours' else 'TRL'} side failed (exit {proc.returncode}): "
            + (proc.stderr.strip().splitlines() or ["no output"])[-1]
        )
    return json.loads(lines[-1][len(RESULT_PREFIX) :])


# ---------------------------------------------------------------------------------------------------------
# The command
# ---------------------------------------------------------------------------------------------------------


def start_folder(command: str, config, work: Path) -> str:
    """The weights both sides start from: the named model, the loop's embedded start (the preference loops
    name theirs: DPO's is `sft.embedded_start`; the reward model's is the embedded SFT model), or for sft the
    embedded random-init model saved to `work`."""
    if config.model_name_or_path is not None:
        return config.model_name_or_path
    if hasattr(config, "embedded_start_model"):
        return config.embedded_start_model()
    if command != "sft":
        from posttrain.rl import sft

        return sft.embedded_sft_model()
    from posttrain.data import embedded

    folder = work / "start"
    embedded.build_model(seed=config.seed).save_pretrained(folder)
    embedded.build_tokenizer().save_pretrained(folder)
    return str(folder)


def compare(command: str, argv: list[str]) -> dict:
    """Run both sides and print the comparison; returns what compare.json holds."""
    from posttrain.cli import COMMANDS
    from posttrain.rl.config import parse_config

    if command in ONLINE:
        raise CompareError(
            f"{command} samples its own completions: two samplers draw different tokens, so the losses cannot "
            "agree step by step; benchmarks/grpo.py compares its speed with TRL's on fixed work"
        )
    if command not in TRL_TRAINERS:
        raise CompareError(f"unknown command {command!r}\n{usage()}")
    if importlib.util.find_spec("trl") is None:
        raise CompareError("the TRL side needs trl 1.16: pip install 'posttrain[bench]'")
    module_name, class_name = COMMANDS[command]
    config = parse_config(getattr(importlib.import_module(module_name), class_name), argv)
    if config is None:  # --help was printed
        return {}
    if config.train_sampling_strategy == "group_by_length":
        raise CompareError(
            "train_sampling_strategy=group_by_length orders rows by their tokenized lengths, which the two sides "
            "count differently: compare with random or sequential"
        )
    trl_config_class, _ = trl_classes(command)
    _, ours_only = shared_options(config, trl_config_class)
    output = (
        Path(config.output_dir)
        if config.output_dir is not None
        else Path(tempfile.mkdtemp(prefix="compare-"))
    )
    for side in ("ours", "trl"):
        if (output / side).exists():
            raise CompareError(
                f"output_dir {str(output)!r} already holds a comparison ({side}/): choose another"
            )
    output.mkdir(parents=True, exist_ok=True)
    start = start_folder(command, config, output)
    results = {}
    for side in ("ours", "trl"):
        spec = {"command": command, "argv": argv, "start": start, "output_dir": str(output / side)}
        path = output / f"{side}.spec.json"
        path.write_text(json.dumps(spec))
        results[side] = _run_side(side, path)
    summary = summarize(command, results, ours_only)
    (output / "compare.json").write_text(json.dumps(summary, indent=2))
    print_summary(summary)
    print(f"written: {output / 'compare.json'}")
    return summary


def summarize(command: str, results: dict, ours_only: list[str]) -> dict:
    ours, theirs = results["ours"], results["trl"]
    if len(ours["losses"]) != len(theirs["losses"]):
        raise CompareError(
            f"the sides ran {len(ours['losses'])} and {len(theirs['losses'])} steps: they do not count the same "
            "steps for these options"
        )
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(ours["losses"], theirs["losses"], strict=True)]
    out = {
        "command": command,
        "steps": len(rel),
        "ours_only_options": ours_only,
        "max_rel_loss_diff": max(rel),
    }
    floor = statistics.median(ours["floors"][1:] or ours["floors"]) if ours["floors"] else None
    for name, side in (("ours", ours), ("trl", theirs)):
        times = side["times"][1:] or side["times"]  # the first step warms up
        step_s = statistics.median(times)
        tokens = [
            b - a for a, b in zip(side["num_tokens"], side["num_tokens"][1:], strict=False) if a is not None
        ]
        out[name] = {
            "losses": side["losses"],
            "s_per_step": step_s,
            "tokens_per_s": statistics.median(tokens) / step_s if tokens else None,
            "peak_mib": side["peak_mib"],
            "floor_s": floor,
            "ratio_to_floor": step_s / floor if floor else None,
        }
    return out


def print_summary(summary: dict) -> None:
    ours, trl = summary["ours"], summary["trl"]
    print(f"posttrain compare {summary['command']}: {summary['steps']} steps, posttrain vs TRL 1.16 from the same "
          "weights on the same rows")  # fmt: skip
    print("step | posttrain loss | TRL loss | relative difference")
    for i, (a, b) in enumerate(zip(ours["losses"], trl["losses"], strict=True), start=1):
        print(f"{i:4d} | {a:.6f} | {b:.6f} | {abs(a - b) / max(abs(b), 1e-12):.1e}")
    print(f"agreement: largest relative difference {summary['max_rel_loss_diff']:.1e}")
    print("| side | s/step | tokens/s | floor s/step | / floor | peak MiB |")
    print("|---|---|---|---|---|---|")
    for name, side in (("posttrain", ours), ("TRL 1.16", trl)):
        tps = f"{side['tokens_per_s']:.0f}" if side["tokens_per_s"] else "-"
        floor = f"{side['floor_s']:.4f} | {side['ratio_to_floor']:.2f}" if side["floor_s"] else "- | -"
        print(f"| {name} | {side['s_per_step']:.4f} | {tps} | {floor} | {side['peak_mib']:.0f} |")
    print(f"| posttrain / TRL | {ours['s_per_step'] / trl['s_per_step']:.2f} | | | | "
          f"{ours['peak_mib'] / max(trl['peak_mib'], 1e-9):.2f} |")  # fmt: skip
    if summary["ours_only_options"]:
        print("not passed to TRL (posttrain-only options set): " + ", ".join(summary["ours_only_options"]))


def main(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    from posttrain.rl.config import ConfigError

    try:
        compare(argv[0], argv[1:])
    except (CompareError, ConfigError) as err:
        print(f"posttrain compare: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # one side, in its own process: python -m posttrain.compare ours|trl spec.json
    _side_main(sys.argv[1], sys.argv[2])
