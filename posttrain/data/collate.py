"""Collators (rows -> token batch) and best-fit-decreasing packing.

A row is a dict with `input_ids` and `completion_mask`, lists of T_i ints (packed rows add `position_ids`
and `seq_lengths`). Every collator returns the library's batch convention:

    input_ids        (B, T) long
    completion_mask  (B, T) long   1 where token t is a loss target; 0 on padding and on the first token of
                                   every sequence (nothing predicts it), which the collators zero here
    position_ids     (B, T) long   0 at the start of every sequence
    attention_mask   (B, T) long   padded batches only; padding-free and packed batches have none, and
                                   the model must run with `use_cache=False` so that sdpa / eager attention
                                   build block-diagonal masks from position_ids

Batches without an attention mask rely on the model's attention to find the documents in position_ids,
and transformers (5.x) does that in two ways. eager, sdpa and flex_attention
(`masking_utils.find_packed_sequence_indices`) read every row: any B works. Flash attention
(`modeling_flash_attention_utils._is_packed_sequence`) reads them only when B == 1, and with B > 1 runs
plain causal attention over each whole row, across its documents. `for_attention` lays batches out for
the model's attention: one row under flash attention, as TRL's padding-free collator does.
"""

from __future__ import annotations

import functools
from bisect import bisect_left, insort
from collections import deque
from collections.abc import Sequence

PADDING_SIDES = ("right", "left")
OVERFLOW = ("truncate", "split")
# Attention implementations that find the documents of every row (see the module docstring).
ROW_WISE_ATTENTION = ("eager", "sdpa", "flex_attention")


def _check_rows(rows: Sequence[dict], keys=("input_ids", "completion_mask")) -> None:
    if not rows:
        raise ValueError("cannot collate an empty list of rows")
    for i, row in enumerate(rows):
        for key in keys:
            if key not in row:
                raise KeyError(f"row {i} has no {key!r} (keys: {sorted(row)})")
        n = len(row["input_ids"])
        if n == 0:
            raise ValueError(f"row {i} has no tokens")
        for key in keys[1:]:
            if len(row[key]) != n:
                raise ValueError(f"row {i}: {key!r} has {len(row[key])} entries but input_ids has {n}")


def pad_collate(
    rows, pad_token_id: int, *, padding_side: str = "right", pad_to_multiple_of: int | None = None
):
    """Pad rows to the longest (rounded up to `pad_to_multiple_of`) on `padding_side`.

    Returns input_ids, attention_mask, completion_mask, position_ids, all (B, T). position_ids count real
    tokens only (0 at each row's first real token, also under left padding, where a model left to derive
    positions from T would shift them); padding gets position 0.
    """
    import torch

    if padding_side not in PADDING_SIDES:
        raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
    _check_rows(rows)
    B = len(rows)
    T = max(len(r["input_ids"]) for r in rows)
    if pad_to_multiple_of:
        T = -(-T // pad_to_multiple_of) * pad_to_multiple_of
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.long)
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        span = slice(0, n) if padding_side == "right" else slice(T - n, T)
        input_ids[b, span] = torch.tensor(row["input_ids"], dtype=torch.long)
        completion_mask[b, span] = torch.tensor(row["completion_mask"], dtype=torch.long)
        attention_mask[b, span] = 1
    position_ids = (attention_mask.cumsum(-1) - 1).clamp_min(0) * attention_mask  # (B, T)
    completion_mask[position_ids == 0] = 0  # first tokens (and padding) are never targets
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
        "position_ids": position_ids,
    }


def padding_free_collate(rows):
    """Concatenate rows into one sequence (B = 1, T = sum of lengths), positions restarting at 0 per row.

    Returns input_ids, completion_mask, position_ids, all (1, T); no attention_mask.
    """
    import torch

    _check_rows(rows)
    input_ids = torch.tensor([t for r in rows for t in r["input_ids"]], dtype=torch.long)
    completion_mask = torch.tensor([m for r in rows for m in r["completion_mask"]], dtype=torch.long)
    position_ids = torch.cat([torch.arange(len(r["input_ids"])) for r in rows])
    completion_mask[position_ids == 0] = 0
    return {
        "input_ids": input_ids[None],
        "completion_mask": completion_mask[None],
        "position_ids": position_ids[None],
    }


def packed_collate(rows, *, pad_token_id: int = 0):
    """Stack packed rows (from `pack`) into (B, T), T the longest row, with no attention_mask, plus
    `num_tokens` (a scalar tensor): the tokens that are not filler.

    Shorter rows are filled with `pad_token_id` tokens that form their own document (position_ids
    0, 1, 2, ... and completion_mask 0), so attention never crosses into them nor out of them. Rows stay
    separate rather than being concatenated to B = 1 because sdpa / eager attention on packed rows
    materialise a dense (T, T) mask per row: B rows of length T cost B·T², one row of length B·T costs
    (B·T)². Packed rows are nearly full, so the padding is small. Flash attention needs them as one row:
    see `for_attention`.
    """
    import torch

    _check_rows(rows, keys=("input_ids", "completion_mask", "position_ids"))
    B = len(rows)
    T = max(len(r["input_ids"]) for r in rows)
    input_ids = torch.full((B, T), pad_token_id, dtype=torch.long)
    completion_mask = torch.zeros(B, T, dtype=torch.long)
    position_ids = torch.arange(T).repeat(B, 1)  # (B, T); the padding tail is overwritten below
    for b, row in enumerate(rows):
        n = len(row["input_ids"])
        input_ids[b, :n] = torch.tensor(row["input_ids"], dtype=torch.long)
        completion_mask[b, :n] = torch.tensor(row["completion_mask"], dtype=torch.long)
        position_ids[b, :n] = torch.tensor(row["position_ids"], dtype=torch.long)
        position_ids[b, n:] -= n  # the padding is one more document: 0, 1, 2, ...
    completion_mask[position_ids == 0] = 0
    # The filler is not data: `num_tokens` (TRL's metric) counts only the packed rows' own tokens.
    num_tokens = torch.tensor(sum(len(r["input_ids"]) for r in rows))
    return {
        "input_ids": input_ids,
        "completion_mask": completion_mask,
        "position_ids": position_ids,
        "num_tokens": num_tokens,
    }


def packs_into_one_row(attn_implementation: str | None) -> bool:
    """Whether `attn_implementation` keeps the documents of a batch without attention mask apart only
    when the batch is one row (B = 1): true for flash attention (transformers' own test: "flash" in the
    name, which also covers hub kernels such as "kernels-community/flash-attn2").

    None is the model's default (sdpa or eager). Raises ValueError for any other implementation, whose
    handling of packed documents is unknown (e.g. "paged|eager", which builds no mask without a cache).
    """
    if attn_implementation is None or attn_implementation in ROW_WISE_ATTENTION:
        return False
    if "flash" in attn_implementation:
        return True
    raise ValueError(
        f"attn_implementation={attn_implementation!r} does not keep packed documents apart: packing and "
        f"padding_free need {', '.join(ROW_WISE_ATTENTION)} or flash attention (or turn them off)"
    )


def to_one_row(batch: dict) -> dict:
    """A batch without attention mask as one row: (B, T) -> (1, B·T) for input_ids, completion_mask and
    position_ids; other entries (num_tokens) unchanged.

    Every row starts a document (position 0), so the documents stay the same; the filler of packed rows
    stays too, as a document of its own with no targets (rows are nearly full, so it is small).
    """
    if "attention_mask" in batch:
        raise ValueError("to_one_row is for packed / padding-free batches; this one has an attention_mask")
    flat = ("input_ids", "completion_mask", "position_ids")
    return {k: v.reshape(1, -1) if k in flat else v for k, v in batch.items()}


def for_attention(collate_fn, attn_implementation: str | None):
    """`collate_fn` with its batches laid out so that the attention keeps their documents apart.

    attn_implementation: the model's `config._attn_implementation`. Padded batches (with an attention
    mask) pass unchanged. Batches without one (packing, padding-free) pass unchanged under eager / sdpa /
    flex_attention and become one row under flash attention (`to_one_row`), which is also flash
    attention's efficient layout: its variable-length kernel builds no (T, T) mask, so one long row costs
    no more than B short ones. Under any other attention they raise ValueError (`packs_into_one_row`).
    """
    try:
        if not packs_into_one_row(attn_implementation):
            return collate_fn
    except ValueError as e:
        return functools.partial(_checked_layout, collate_fn, e)
    return functools.partial(_checked_layout, collate_fn, None)


def _checked_layout(collate_fn, refusal: ValueError | None, rows):
    batch = collate_fn(rows)
    if "attention_mask" in batch:
        return batch
    if refusal is not None:
        raise refusal
    return to_one_row(batch)


# ---------------------------------------------------------------------------------------------------------
# Best-fit-decreasing packing
# ---------------------------------------------------------------------------------------------------------


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> list[list[int]]:
    """Assign items to bins of size `capacity`: the longest first, each into the fullest bin it still fits.

    Returns bins as lists of item indices. Items must be 1 <= length <= capacity. Free space takes at most
    `capacity` distinct values, so a sorted list of those values (plus a FIFO of bins per value) finds the
    best fit by bisection: O(N log N + N·capacity) worst case, fast in practice.
    See "Fewer Truncations Improve Language Modeling" (Ding et al., 2024) for BFD in LLM packing.
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    bins: list[list[int]] = []
    spaces: list[int] = []  # sorted distinct free-space values that some open bin has
    by_space: dict[int, deque[int]] = {}  # free space -> bins with exactly that much room
    for i in order:
        n = lengths[i]
        if not 1 <= n <= capacity:
            raise ValueError(f"item {i} has length {n}, outside [1, {capacity}]")
        k = bisect_left(spaces, n)
        if k == len(spaces):  # fits in no open bin
            b, space = len(bins), capacity
            bins.append([])
        else:
            space = spaces[k]
            b = by_space[space].popleft()
            if not by_space[space]:
                del spaces[k], by_space[space]
        bins[b].append(i)
        space -= n
        if space > 0:
            if space not in by_space:
                by_space[space] = deque()
                insort(spaces, space)
            by_space[space].append(b)
    return bins


def pack(dataset, max_length: int, *, overflow: str = "truncate"):
    """Pack the rows of a tokenized dataset into rows of at most `max_length` tokens (best fit decreasing).

    Input: a `datasets.Dataset` with list columns input_ids and completion_mask (other columns are
    dropped). Output: a Dataset with input_ids, completion_mask, position_ids (restarting at 0 per
    document) and seq_lengths (the document lengths of each packed row, in order).

    A row longer than `max_length` is, with overflow="truncate" (TRL's default "bfd" strategy), cut to
    its first `max_length` tokens; with overflow="split" (TRL's "bfd_split") cut into pieces of
    `max_length` (the last shorter) that are packed as separate documents — each piece then starts a new
    context and its first token is not a target. Truncate is the default because SFT rows from
    `tokenize_sft` already fit, and a split conversation trains on fragments without their context.
    Packed rows come out longest-documents-first (BFD order): shuffle them when loading batches.
    """
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from datasets import Dataset
    from datasets.table import InMemoryTable

    if overflow not in OVERFLOW:
        raise ValueError(f"overflow must be one of {OVERFLOW}, got {overflow!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise ValueError(f"max_length must be a positive int, got {max_length!r}")
    for key in ("input_ids", "completion_mask"):
        if key not in dataset.column_names:
            raise KeyError(f"pack needs a tokenized dataset with {key!r}; columns: {dataset.column_names}")
    if len(dataset) == 0:
        raise ValueError("cannot pack an empty dataset")
    view = dataset.with_format("arrow")
    ids = view["input_ids"].combine_chunks()
    mask = view["completion_mask"].combine_chunks()
    lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False)
    if not np.array_equal(lengths, pc.list_value_length(mask).to_numpy(zero_copy_only=False)):
        row = int(np.flatnonzero(lengths != pc.list_value_length(mask).to_numpy(zero_copy_only=False))[0])
        raise ValueError(f"row {row}: input_ids and completion_mask have different lengths")
    if (lengths == 0).any():
        raise ValueError(f"row {int(np.flatnonzero(lengths == 0)[0])} has no tokens")

    # Documents as (start, length) into the flat token arrays.
    flat_ids = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
    flat_mask = pc.list_flatten(mask).to_numpy(zero_copy_only=False)
    row_starts = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    if overflow == "truncate":
        doc_starts, doc_lengths = row_starts, np.minimum(lengths, max_length)
    else:
        pieces = -(-lengths // max_length)  # ceil
        row_of_piece = np.repeat(np.arange(len(lengths)), pieces)
        piece_index = np.arange(len(row_of_piece)) - np.repeat(np.cumsum(pieces) - pieces, pieces)
        doc_starts = row_starts[row_of_piece] + piece_index * max_length
        doc_lengths = np.minimum(lengths[row_of_piece] - piece_index * max_length, max_length)

    bins = best_fit_decreasing(doc_lengths.tolist(), max_length)
    docs = np.array([d for b in bins for d in b], dtype=np.int64)  # documents in packed order
    lens = doc_lengths[docs]
    # Token gather index: for each document in order, its start .. start + length.
    ends = np.cumsum(lens)
    within = np.arange(ends[-1]) - np.repeat(ends - lens, lens)  # position inside its document
    take = np.repeat(doc_starts[docs], lens) + within
    row_offsets = np.concatenate([[0], np.cumsum([doc_lengths[b].sum() for b in bins])]).astype(np.int64)
    doc_offsets = np.concatenate([[0], np.cumsum([len(b) for b in bins])]).astype(np.int32)

    def lists(values, offsets):
        big = offsets[-1] >= 2**31  # int32 list offsets overflow past 2^31 tokens
        kind, offset_type = (pa.LargeListArray, pa.int64()) if big else (pa.ListArray, pa.int32())
        return kind.from_arrays(pa.array(offsets, offset_type), pa.array(values))

    table = pa.table(
        {
            "input_ids": lists(flat_ids[take], row_offsets),
            "completion_mask": lists(flat_mask[take], row_offsets),
            "position_ids": lists(within, row_offsets),
            "seq_lengths": pa.ListArray.from_arrays(pa.array(doc_offsets), pa.array(lens)),
        }
    )
    return Dataset(InMemoryTable(table))
