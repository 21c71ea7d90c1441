"""The embedded default: a tokenizer built in code, a tiny causal LM config and a synthetic task.

Everything here is offline and deterministic under a seed, so `posttrain sft` with no arguments runs
on a fresh CPU machine, and the tests use the same objects as fixtures.

The task is small-integer addition: the prompt is `"a+b="` (0 <= a, b <= 29) and the answer the decimal
sum, checkable by exact match. One generator serves every dataset format the loops need:

    prompt-completion   {"prompt", "completion"}                       SFT
    preference          {"prompt", "chosen", "rejected"}               reward model, DPO
    prompt-only         {"prompt", "answer"}                           GRPO, RLOO, PPO
    unpaired preference {"prompt", "completion", "label"}              KTO

each standard (strings) or conversational (lists of `{"role", "content"}` messages).
"""

from __future__ import annotations

import itertools
import random
import string

# ChatML-style template. Assistant turns sit inside `{% generation %}` so that
# `apply_chat_template(..., return_assistant_tokens_mask=True)` marks them (assistant-only loss).
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'assistant' %}"
    "{{- '<|im_start|>assistant\\n' }}"
    "{% generation %}{{- message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{- '\\n' }}"
    "{%- else %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

PAD_TOKEN = "<|endoftext|>"
EOS_TOKEN = "<|im_end|>"
SPECIAL_TOKENS = [PAD_TOKEN, "<|im_start|>", EOS_TOKEN]
# Printable ASCII plus newline: every string the task or a chat template produces is one token per character.
CHARACTERS = list(string.printable[:95]) + ["\n"]


def build_tokenizer():
    """A character-level `PreTrainedTokenizerFast` with ChatML special tokens and chat template.

    Ids: 0 pad `<|endoftext|>`, 1 `<|im_start|>`, 2 eos `<|im_end|>`, then one id per character.
    The vocabulary is written in GPT-2's byte-to-unicode alphabet ("\n" is "Ċ", " " is "Ġ") with a byte-level
    pre-tokenizer, as Qwen2's own tokenizer is: transformers 5 reloads the tokenizer of a qwen2 model folder as
    a `Qwen2Tokenizer` whatever class was saved, and that one drops characters outside the alphabet.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    alphabet = bytes_to_unicode()  # byte -> printable character
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [alphabet[ord(c)] for c in CHARACTERS])}
    # BPE with no merges splits any text into single characters; the byte-level decoder joins them back.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD_TOKEN,
        eos_token=EOS_TOKEN,
        additional_special_tokens=["<|im_start|>"],
        clean_up_tokenization_spaces=False,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_model_config(vocab_size: int = 128, **overrides):
    """A Qwen2 config small enough to train on a CPU in minutes (about 0.4M parameters)."""
    from transformers import Qwen2Config

    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=True,
        bos_token_id=None,
        eos_token_id=2,
        pad_token_id=0,
    )
    kwargs.update(overrides)
    return Qwen2Config(**kwargs)


def build_model(seed: int = 0, **config_overrides):
    """The tiny causal LM, randomly initialised under `seed` (float32)."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(tiny_model_config(**config_overrides), dtype=torch.float32)
    return model


# ---------------------------------------------------------------------------------------------------------
# The synthetic task
# ---------------------------------------------------------------------------------------------------------

MAX_OPERAND = 29  # answers 0..58: one or two characters, then eos


def _all_problems() -> list[tuple[int, int]]:
    # Addition only: with subtraction (negative answers) the tiny model needs several times the steps
    # to reach the same held-out exact match, and the default run must learn visibly in minutes.
    return [(a, b) for a in range(MAX_OPERAND + 1) for b in range(MAX_OPERAND + 1)]


def _plausible_mistakes(a: int, b: int) -> list[int]:
    """Off by one or ten (a dropped or doubled carry, negative for a small sum), or the difference."""
    right = a + b
    return sorted({right + 1, right - 1, right + 10, right - 10, abs(a - b)} - {right})


def _wrong_answer(rng: random.Random, a: int, b: int) -> int:
    """A plausible mistake (`_plausible_mistakes`), drawn by `rng`."""
    return rng.choice(_plausible_mistakes(a, b))


def problems(split: str = "train", seed: int = 0) -> list[tuple[str, str]]:
    """(prompt, answer) pairs; `train` and `test` are disjoint, fixed by `seed` (test holds 1/8)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    all_problems = _all_problems()
    random.Random(seed).shuffle(all_problems)
    n_test = len(all_problems) // 8
    chosen = all_problems[:n_test] if split == "test" else all_problems[n_test:]
    return [(f"{a}+{b}=", str(a + b)) for a, b in chosen]


def _message(role: str, content: str) -> list[dict[str, str]]:
    return [{"role": role, "content": content}]


def rows(kind: str = "prompt_completion", split: str = "train", seed: int = 0, conversational: bool = False):
    """The task as a list of dicts in one of TRL's dataset formats.

    kind: "prompt_completion", "preference", "prompt_only", "unpaired_preference" or "language_modeling".
    """
    rng = random.Random(f"{seed}-{kind}-{split}")
    out = []
    for prompt, answer in problems(split, seed):
        wrong = str(_wrong_answer(rng, *_parse(prompt)))
        p = _message("user", prompt) if conversational else prompt
        c = (lambda text: _message("assistant", text)) if conversational else (lambda text: text)
        if kind == "prompt_completion":
            out.append({"prompt": p, "completion": c(answer)})
        elif kind == "language_modeling":
            if conversational:
                out.append({"messages": _message("user", prompt) + _message("assistant", answer)})
            else:
                out.append({"text": prompt + answer})
        elif kind == "preference":
            out.append({"prompt": p, "chosen": c(answer), "rejected": c(wrong)})
        elif kind == "prompt_only":
            out.append({"prompt": p, "answer": answer})
        elif kind == "unpaired_preference":
            good = rng.random() < 0.5
            out.append({"prompt": p, "completion": c(answer if good else wrong), "label": good})
        else:
            raise ValueError(
                f"unknown kind {kind!r}: expected one of prompt_completion, language_modeling, preference, "
                "prompt_only, unpaired_preference"
            )
    return out


def _parse(prompt: str) -> tuple[int, int]:
    a, b = prompt.strip().rstrip("=").split("+")
    return int(a), int(b)


def dataset(
    kind: str = "prompt_completion", split: str = "train", seed: int = 0, conversational: bool = False
):
    """`rows(...)` as a `datasets.Dataset`."""
    from datasets import Dataset

    return Dataset.from_list(rows(kind, split, seed, conversational))


def is_correct(prompt: str, completion: str) -> bool:
    """Exact match of the completion (up to surrounding whitespace) against the true answer."""
    a, b = _parse(prompt)
    return completion.strip() == str(a + b)


def exact_match(model, tokenizer, split: str = "test", seed: int = 0, limit: int | None = None) -> dict:
    """Greedy-decode every prompt of `split` and score exact match of the answer: {"exact_match": fraction}.

    The prompts are the standard rows' plain strings (`"a+b="`), which is what `posttrain sft` trains
    on by default; `model` is the bare model (not a DDP wrapper).
    """
    import torch

    pairs = problems(split, seed)[:limit]
    was_training = model.training
    model.eval()
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer([p for p, _ in pairs], return_tensors="pt", padding=True).to(model.device)
        with torch.no_grad():
            out = model.generate(
                **enc,
                max_new_tokens=4,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    texts = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
    correct = sum(is_correct(p, t) for (p, _), t in zip(pairs, texts, strict=True))
    return {"exact_match": correct / max(len(pairs), 1)}


def ranked_preference_rows(split: str = "train", seed: int = 0, rejected_per_prompt: int = 12):
    """Standard preference rows with several rejected answers per problem: every plausible mistake
    (off by one or ten, the difference; see `_wrong_answer`) and random wrong sums in 0..58 up to
    `rejected_per_prompt` pairs per prompt. The reward model's default run trains on these: with one
    rejected answer per problem (`rows("preference")`) the tiny model memorises the training pairs
    instead of learning to check a sum."""
    rng = random.Random(f"{seed}-ranked-{split}")
    out = []
    for prompt, answer in problems(split, seed):
        a, b = _parse(prompt)
        right = a + b
        wrong = _plausible_mistakes(a, b)  # the negative ones too: the held-out rows have them
        others = [c for c in range(2 * MAX_OPERAND + 1) if c != right and c not in wrong]
        wrong += rng.sample(others, max(0, rejected_per_prompt - len(wrong)))
        out.extend({"prompt": prompt, "chosen": answer, "rejected": str(c)} for c in wrong)
    return out


# ---------------------------------------------------------------------------------------------------------
# The stepwise split (process reward model)
# ---------------------------------------------------------------------------------------------------------

STEPWISE_MAX_OPERAND = 9
STEPWISE_TEST_PROBLEMS = 160
STEPWISE_TRAIN_PROBLEMS = 2400
STEPWISE_HELD_OUT_SHARE = 8  # one step pair (x, y) in 8 is held out


def step_pairs(operands: tuple[int, ...]) -> list[tuple[int, int]]:
    """The (running sum, operand added) pair of each step of the right solution of `operands`."""
    sums = itertools.accumulate(operands[:-1])
    return list(zip(sums, operands[1:], strict=True))


def held_out_step_pairs(seed: int = 0) -> set[tuple[int, int]]:
    """The step pairs (x, y) only the test split has: one in STEPWISE_HELD_OUT_SHARE of those that can occur
    (x up to three operands' sum, y one operand), drawn under `seed`."""
    pairs = [(x, y) for x in range(3 * STEPWISE_MAX_OPERAND + 1) for y in range(STEPWISE_MAX_OPERAND + 1)]
    rng = random.Random(f"{seed}-stepwise-held-out")
    return set(rng.sample(pairs, len(pairs) // STEPWISE_HELD_OUT_SHARE))


def _stepwise_problems(seed: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Distinct operand tuples of 3 or 4 operands in 0..STEPWISE_MAX_OPERAND, in a fixed order: (train ones,
    whose steps have no held-out pair; test ones, each with at least one)."""
    held_out = held_out_step_pairs(seed)
    rng = random.Random(f"{seed}-stepwise-problems")
    seen, train, test = set(), [], []
    while len(train) < STEPWISE_TRAIN_PROBLEMS or len(test) < STEPWISE_TEST_PROBLEMS:
        operands = tuple(rng.randint(0, STEPWISE_MAX_OPERAND) for _ in range(rng.choice((3, 4))))
        if operands in seen:
            continue
        seen.add(operands)
        split, size = (
            (test, STEPWISE_TEST_PROBLEMS)
            if held_out & set(step_pairs(operands))
            else (train, STEPWISE_TRAIN_PROBLEMS)
        )
        if len(split) < size:
            split.append(operands)
    return train, test


def _step_mistake(rng: random.Random, x: int, y: int) -> int:
    """A plausible wrong result of x + y: off by one or ten (a slip, a dropped or doubled carry, never
    negative) or the difference (subtracted instead of added)."""
    right = x + y
    return rng.choice(
        sorted({w for w in (right + 1, right - 1, right + 10, right - 10, abs(x - y)) if w >= 0} - {right})
    )


def _solution(rng: random.Random, operands: tuple[int, ...], slip: int | None) -> dict:
    """One stepwise row: the running sum step by step, right throughout (slip None) or ending at a wrong
    step `slip`."""
    value, steps, labels = operands[0], [], []
    for k, operand in enumerate(operands[1:]):
        right = value + operand
        result = right if k != slip else _step_mistake(rng, value, operand)
        steps.append(f"{value}+{operand}={result}")
        labels.append(result == right)
        if k == slip:
            break
        value = result
    return {"prompt": "+".join(map(str, operands)) + "=", "completions": steps, "labels": labels}


def stepwise_rows(split: str = "train", seed: int = 0) -> list[dict]:
    """TRL's stepwise-supervision format: {"prompt", "completions" (steps), "labels" (one bool per step)}.

    The prompt sums 3 or 4 one-digit operands (`"3+4+8="`); the steps add one operand at a time to the
    running sum (`"3+4=7"`, `"7+8=15"`). Every problem comes with its right solution and, for each step, a
    solution that is right up to that step and makes one plausible mistake there: off by one or ten (a
    slip, a dropped or doubled carry: `"7+8=16"`, `"7+8=5"`) or the difference (`"7+8=1"`). So the prompt
    alone never tells the labels: the steps must be checked.

    After a first wrong step: the solution ends there, as in TRL's PRM800K conversion (whose rows stop at
    the first step a labeller rejected). Math-Shepherd (Wang et al. 2023, arXiv:2312.08935) instead keeps
    the later steps and labels them wrong too; we tried that here, and those later steps (right arithmetic
    on a wrong running sum) held the PRM to 0.81 held-out step accuracy after 500 steps, against 0.91 this way
    (same start model and schedule; measured before the split held out steps).

    The split holds out steps, not just problems: a step's label depends only on its text ("7+8=15" is
    right wherever it appears) and the steps come from a small addition table, so with problems alone held
    out 99.6% of the test steps were, word for word, training steps, and a lookup table scored as well as
    the PRM. So one step pair (x, y) in 8 (running sum x, operand y: `held_out_step_pairs`) is held out:
    no training row has a step on a held-out pair, right or wrong, and every test problem has at least one
    (42% of the test steps are on held-out pairs, the rest are seen ones after or before them).

    `train` (2400 problems, 8866 rows) and `test` (160 problems, 574 rows) hold disjoint operand tuples;
    about two steps in three are right; deterministic under `seed`.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    problems = _stepwise_problems(seed)[split == "test"]
    rng = random.Random(f"{seed}-stepwise-{split}")
    return [_solution(rng, ops, slip) for ops in problems for slip in (None, *range(len(ops) - 1))]
