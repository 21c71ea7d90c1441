"""Unpaired preference data -> token ids: one prompt, one completion and a desirable / undesirable label per row.

Used by KTO. Semantics follow TRL 1.16's `KTOTrainer._prepare_dataset` and its collator:

- paired preference data (prompt, chosen, rejected; or an implicit prompt) is unpaired first, as TRL's
  `unpair_preference_dataset` does it: in blocks of 1000 pairs (the `datasets.map` batch it runs in), each
  block's chosen rows (label True) followed by its rejected rows (label False), every other column copied
  to both. The order matters: the mismatched pairs below are built from neighbouring rows.
- standard rows get the tokenizer's eos appended to the completion when missing; `tokenizer(prompt)` and
  `tokenizer(prompt + completion)`. Conversational rows: the chat template on the prompt with the
  generation prompt and on prompt + completion (with the row's `tools` / `chat_template_kwargs`).
- the prompt ends where the tokenized prompt stops being a prefix of the tokenized whole
  (`tokenization.tokenize_prompt_completions`; a conversational template that renders the prompt alone
  differently raises here, where TRL cuts at the common prefix with a warning).
- the KL completions (`add_kl_completions`): within each block of `block_size` consecutive rows (TRL:
  per_device_train_batch_size), row i gets row i-1's completion and the first row the block's last one:
  (x_1, y_n), (x_2, y_1), ..., (x_n, y_{n-1}). With sequential batches of that size, each micro-batch's
  mismatched completions are exactly its own completions, re-paired.
- `collate_unpaired` cuts each sequence to max_length (TRL: its first max_length tokens) and pads the
  matched and the mismatched sequences to one width.

Rows are checked before anything is tokenized (`formats.check_format` / `validate_rows`: missing columns,
None, empty strings or message lists, unknown roles, a label that is not a bool), naming the row and field.
A train set of one label only trains (as TRL) but warns with the counts (`label_warnings`).
"""

from __future__ import annotations

from .formats import check_format, validate_rows, with_explicit_prompt
from .tokenization import template_kwargs_groups, tokenize_prompt_completions

COLUMNS = ("prompt_ids", "completion_ids", "label")
UNPAIR_BLOCK = 1000  # datasets.map's default batch size, in which TRL's unpair_preference_dataset runs


def unpair_preference(dataset, block: int = UNPAIR_BLOCK):
    """Preference rows (explicit prompt) -> unpaired rows, 2N of them: per block of `block` pairs, the
    chosen completions (label True) then the rejected ones (label False); other columns copied to both."""

    def unpair(batch):
        out = {name: values + values for name, values in batch.items() if name not in ("chosen", "rejected")}
        out["completion"] = batch["chosen"] + batch["rejected"]
        out["label"] = [True] * len(batch["chosen"]) + [False] * len(batch["rejected"])
        return out

    return dataset.map(
        unpair, batched=True, batch_size=block, remove_columns=["chosen", "rejected"], desc="Unpairing"
    )


def tokenize_unpaired(dataset, tokenizer, *, command: str = "kto"):
    """Tokenize unpaired preference rows (or paired ones, unpaired first), standard or conversational.

    Returns (dataset with columns prompt_ids, completion_ids (lists of ints) and label (bool), info
    {"desirable": int, "undesirable": int}). Other columns are dropped. `command` names the caller in errors.
    """
    fmt = check_format(dataset, ("unpaired_preference", "preference"), command)
    if fmt.conversational and not getattr(tokenizer, "chat_template", None):
        raise ValueError(
            "the dataset is conversational (message lists) but the tokenizer "
            f"{getattr(tokenizer, 'name_or_path', '') or type(tokenizer).__name__!r} has no chat template: "
            "use a model whose tokenizer has one, or a dataset of plain strings"
        )
    validate_rows(dataset, fmt)
    if fmt.kind == "preference":
        dataset = unpair_preference(with_explicit_prompt(dataset, fmt))

    def tokenize_batch(batch, indices):
        n = len(indices)
        prompt_ids, completion_ids = [None] * n, [None] * n
        for group, kwargs in template_kwargs_groups(batch, n):
            prompts, completions = tokenize_prompt_completions(
                tokenizer,
                [batch["prompt"][i] for i in group],
                [batch["completion"][i] for i in group],
                rows=[indices[i] for i in group],
                **kwargs,
            )
            for j, i in enumerate(group):
                prompt_ids[i], completion_ids[i] = prompts[j], completions[j]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids}

    tokenized = dataset.map(
        tokenize_batch,
        batched=True,
        with_indices=True,
        remove_columns=[c for c in dataset.column_names if c != "label"],
        desc="Tokenizing (unpaired preference)",
    )
    desirable = int(tokenized.with_format("arrow")["label"].combine_chunks().true_count)
    return tokenized, {"desirable": desirable, "undesirable": len(tokenized) - desirable}


def label_warnings(desirable: int, undesirable: int, desirable_weight: float, undesirable_weight: float):
    """What to warn about a train set of `desirable` / `undesirable` rows under these weights (a list of
    one-line messages, empty when balanced enough).

    One label only: KTO still trains (TRL does not refuse it), but only pushes that label's log-ratios one
    way. Unequal counts: TRL's advice from the KTO paper's eq. 8, that w_D n_D / (w_U n_U) should lie in
    [1, 4/3]; the message gives the range of each weight that achieves it (TRL's bounds, rounded as it
    rounds them), shown when neither weight is in its range.
    """
    if desirable == 0 or undesirable == 0:
        missing = "undesirable (label False)" if undesirable == 0 else "desirable (label True)"
        return [
            f"the train set has {desirable} desirable and {undesirable} undesirable rows: with no {missing} "
            "rows, KTO only moves one side's log-ratios"
        ]
    if desirable == undesirable:
        return []
    d_low = round(undesirable * undesirable_weight / desirable, 2)
    d_high = round(undesirable * undesirable_weight / desirable * 1.33, 2)
    u_low = round(desirable * desirable_weight / undesirable / 1.33, 2)
    u_high = round(desirable * desirable_weight / undesirable, 2)
    if d_low <= desirable_weight <= d_high or u_low <= undesirable_weight <= u_high:
        return []
    return [
        f"the train set has {desirable} desirable and {undesirable} undesirable rows, and desirable_weight="
        f"{desirable_weight}, undesirable_weight={undesirable_weight} do not balance them (KTO paper, eq. 8): "
        f"set desirable_weight in [{d_low}, {d_high}] or undesirable_weight in [{u_low}, {u_high}], not both"
    ]


def add_kl_completions(rows, block_size: int):
    """rows with a column kl_completion_ids: within each block of `block_size` consecutive rows, each row's
    completion moved to the next row, the last one to the block's first (see the module docstring)."""
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")

    def rotate(completions):
        return {"kl_completion_ids": completions[-1:] + completions[:-1]}

    return rows.map(
        rotate,
        input_columns="completion_ids",
        batched=True,
        batch_size=block_size,
        desc="Mismatched completions for the KL reference point",
    )


def collate_unpaired(
    rows, pad_token_id: int, *, max_length: int | None = None, truncation_mode: str = "keep_start"
):
    """B rows -> one batch: the matched sequences prompt + completion, and (when the rows have
    kl_completion_ids) the mismatched ones prompt + kl completion, each cut to max_length tokens and all
    right-padded to one width T.

    Returns input_ids, attention_mask, completion_mask, position_ids (B, T); kl_input_ids, kl_attention_mask,
    kl_completion_mask, kl_position_ids (B, T) for the mismatched sequences; label (B,) bool; ref_logps and
    ref_kl_logps (B,) float32 when the rows carry precomputed reference log-probs.
    """
    import torch

    from .collate import pad_collate

    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    if truncation_mode not in ("keep_start", "keep_end"):
        raise ValueError(f"truncation_mode must be keep_start or keep_end, got {truncation_mode!r}")
    cut = slice(None)
    if max_length is not None:
        cut = slice(None, max_length) if truncation_mode == "keep_start" else slice(-max_length, None)
    sides = ["completion_ids"] + (["kl_completion_ids"] if "kl_completion_ids" in rows[0] else [])
    sequences = []
    for side in sides:
        for r in rows:
            ids = r["prompt_ids"] + r[side]
            mask = [0] * len(r["prompt_ids"]) + [1] * len(r[side])
            sequences.append({"input_ids": ids[cut], "completion_mask": mask[cut]})
    padded = pad_collate(
        sequences, pad_token_id
    )  # one width for both: the reference runs them in one forward
    B = len(rows)
    batch = {key: value[:B] for key, value in padded.items()}
    if len(sides) == 2:
        batch.update({f"kl_{key}": value[B:] for key, value in padded.items()})
    batch["label"] = torch.tensor([bool(r["label"]) for r in rows], dtype=torch.bool)
    for key in ("ref_logps", "ref_kl_logps"):
        if key in rows[0]:
            batch[key] = torch.tensor([float(r[key]) for r in rows], dtype=torch.float32)
    return batch
