"""Collators and BFD packing: packed / padding-free batches give the same per-token log-probs as padded ones."""

import random
from collections import Counter

import pytest
import torch
from datasets import Dataset

from posttrain.data import embedded
from posttrain.data.collate import (
    best_fit_decreasing,
    pack,
    packed_collate,
    pad_collate,
    padding_free_collate,
)
from posttrain.data.tokenization import tokenize_sft


@pytest.fixture(scope="module")
def rows():
    """Tokenized SFT rows of mixed lengths (6 to ~30 tokens): standard and conversational prompt-completion."""
    tok = embedded.build_tokenizer()
    conv, _ = tokenize_sft(embedded.dataset("prompt_completion", conversational=True).select(range(7)), tok)
    std, _ = tokenize_sft(embedded.dataset("prompt_completion").select(range(7)), tok)
    text, _ = tokenize_sft(embedded.dataset("language_modeling").select(range(4)), tok)
    return conv.to_list() + std.to_list() + text.to_list()


def test_pad_collate_by_hand():
    rows = [
        {"input_ids": [5, 6, 7], "completion_mask": [1, 1, 1]},
        {"input_ids": [8, 9], "completion_mask": [0, 1]},
    ]
    right = pad_collate(rows, pad_token_id=0, pad_to_multiple_of=4)
    assert right["input_ids"].tolist() == [[5, 6, 7, 0], [8, 9, 0, 0]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 0], [1, 1, 0, 0]]
    assert right["completion_mask"].tolist() == [[0, 1, 1, 0], [0, 1, 0, 0]]  # first tokens zeroed
    assert right["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 0]]
    left = pad_collate(rows, pad_token_id=0, padding_side="left")
    assert left["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert left["completion_mask"].tolist() == [[0, 1, 1], [0, 0, 1]]
    assert left["position_ids"].tolist() == [[0, 1, 2], [0, 0, 1]]
    free = padding_free_collate(rows)
    assert set(free) == {"input_ids", "completion_mask", "position_ids"}
    assert free["input_ids"].tolist() == [[5, 6, 7, 8, 9]]
    assert free["position_ids"].tolist() == [[0, 1, 2, 0, 1]]
    assert free["completion_mask"].tolist() == [[0, 1, 1, 0, 1]]


def test_pack_and_packed_collate_by_hand():
    # TRL's pack_dataset docstring example: same bins, plus position_ids.
    ds = Dataset.from_dict(
        {
            "input_ids": [[1, 2, 3, 4, 5], [6, 7], [8, 9, 10], [11]],
            "completion_mask": [[1, 1, 1, 0, 0], [1, 0], [1, 1, 0], [1]],
        }
    )
    packed = pack(ds, 4)
    assert packed["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 11], [6, 7]]
    assert packed["seq_lengths"] == [[4], [3, 1], [2]]
    assert packed["position_ids"] == [[0, 1, 2, 3], [0, 1, 2, 0], [0, 1]]
    split = pack(ds, 4, overflow="split")
    assert split["input_ids"] == [[1, 2, 3, 4], [8, 9, 10, 5], [6, 7, 11]]
    assert split["seq_lengths"] == [[4], [3, 1], [2, 1]]
    batch = packed_collate([packed[1], packed[2]], pad_token_id=0)
    assert set(batch) == {"input_ids", "completion_mask", "position_ids", "num_tokens"}
    assert batch["input_ids"].tolist() == [[8, 9, 10, 11], [6, 7, 0, 0]]
    assert batch["num_tokens"].item() == 6  # the two filler tokens are not counted
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0], [0, 1, 0, 1]]  # the padding is its own document
    assert batch["completion_mask"].tolist() == [[0, 1, 0, 0], [0, 0, 0, 0]]


def test_best_fit_decreasing_by_hand():
    # Longest first; each into the bin with the least room that fits: 5->A(3 left), 4->B(4), 3->A(0),
    # 3->B(1), 2->C(6), 1->B(0).
    assert best_fit_decreasing([5, 4, 3, 3, 2, 1], 8) == [[0, 2], [1, 3, 5], [4]]


def test_bfd_properties_and_trl_bin_count():
    from trl.data_utils import pack_dataset

    rng = random.Random(0)
    lengths = [rng.randint(1, 40) for _ in range(300)]
    ids = [[rng.randrange(3, 99) for _ in range(n)] for n in lengths]
    ds = Dataset.from_dict({"input_ids": ids, "completion_mask": [[1] * n for n in lengths]})
    packed = pack(ds, 64)
    assert len(packed) < len(ds)
    assert max(len(r) for r in packed["input_ids"]) <= 64
    docs = [
        r[s - n : s]
        for r, ls in zip(packed["input_ids"], packed["seq_lengths"], strict=True)
        for s, n in _ends(ls)
    ]
    assert Counter(map(tuple, docs)) == Counter(map(tuple, ids))  # every token once, documents intact
    for pos, ls in zip(packed["position_ids"], packed["seq_lengths"], strict=True):
        assert pos == [i for n in ls for i in range(n)]
    trl = pack_dataset(ds, 64, strategy="bfd")
    assert len(packed) == len(trl)
    assert sorted(map(sorted, packed["seq_lengths"])) == sorted(map(sorted, trl["seq_lengths"]))


def _ends(lengths):
    end = 0
    for n in lengths:
        end += n
        yield end, n


def token_logps(model, batch):
    """(B, T) log p(x_t | x_<t), 0 at t = 0, computed plainly from the full logits."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids") if k in batch}
    with torch.no_grad():
        logits = model(**inputs, use_cache=False).logits.double()
    logps = logits[:, :-1].log_softmax(-1).gather(-1, batch["input_ids"][:, 1:, None])[..., 0]
    return torch.nn.functional.pad(logps, (1, 0))


def per_document(batch, logps, row_spans):
    """{(tokens, completion_mask): logps of tokens 1..} from (batch row, start, length) spans."""
    out = {}
    for b, start, n in row_spans:
        mask = batch["completion_mask"][b, start : start + n]
        key = (tuple(batch["input_ids"][b, start : start + n].tolist()), tuple(mask.tolist()))
        out[key] = logps[b, start + 1 : start + n]
    return out


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_and_padding_free_logps_equal_padded(rows, attn):
    model = embedded.build_model()
    model.set_attn_implementation(attn)
    model.eval()
    lengths = [len(r["input_ids"]) for r in rows]

    layouts = {}
    right = pad_collate(rows, pad_token_id=0)
    layouts["right"] = per_document(
        right, token_logps(model, right), [(b, 0, n) for b, n in enumerate(lengths)]
    )
    left = pad_collate(rows, pad_token_id=0, padding_side="left")
    T = left["input_ids"].shape[1]
    layouts["left"] = per_document(
        left, token_logps(model, left), [(b, T - n, n) for b, n in enumerate(lengths)]
    )
    free = padding_free_collate(rows)
    starts = [sum(lengths[:i]) for i in range(len(rows))]
    layouts["free"] = per_document(
        free, token_logps(model, free), [(0, s, n) for s, n in zip(starts, lengths, strict=True)]
    )
    packed_rows = pack(Dataset.from_list(rows), max_length=64).to_list()
    assert len(packed_rows) < len(rows)
    packed = packed_collate(packed_rows, pad_token_id=0)
    spans = [(b, s - n, n) for b, r in enumerate(packed_rows) for s, n in _ends(r["seq_lengths"])]
    layouts["packed"] = per_document(packed, token_logps(model, packed), spans)

    reference = layouts.pop("right")
    assert len(reference) == len(rows)
    for name, docs in layouts.items():
        assert docs.keys() == reference.keys(), name
        for key, logps in docs.items():  # equal keys: same documents with the same completion masks
            torch.testing.assert_close(logps, reference[key], rtol=0, atol=1e-5, msg=f"{name} {attn}")
    # The model must see the documents apart: running them as one unmasked sequence changes the log-probs.
    joined = {"input_ids": free["input_ids"]}
    mixed = token_logps(model, joined)[0, starts[1] + 1 : starts[1] + lengths[1]]
    alone = next(v for k, v in layouts["free"].items() if k[0] == tuple(rows[1]["input_ids"]))
    assert not torch.allclose(mixed, alone, atol=1e-3)


def test_collate_errors():
    good = {"input_ids": [1, 2], "completion_mask": [1, 1]}
    with pytest.raises(ValueError, match="cannot collate an empty list of rows"):
        pad_collate([], pad_token_id=0)
    with pytest.raises(KeyError, match=r"row 1 has no 'completion_mask'"):
        pad_collate([good, {"input_ids": [1]}], pad_token_id=0)
    with pytest.raises(ValueError, match=r"row 0: 'completion_mask' has 1 entries but input_ids has 2"):
        padding_free_collate([{"input_ids": [1, 2], "completion_mask": [1]}])
    with pytest.raises(ValueError, match="row 1 has no tokens"):
        pad_collate([good, {"input_ids": [], "completion_mask": []}], pad_token_id=0)
    with pytest.raises(ValueError, match=r"padding_side must be one of \('right', 'left'\), got 'top'"):
        pad_collate([good], pad_token_id=0, padding_side="top")
    with pytest.raises(ValueError, match="pad_to_multiple_of must be a positive int or None, got 0"):
        pad_collate([good], pad_token_id=0, pad_to_multiple_of=0)
    with pytest.raises(KeyError, match=r"row 0 has no 'position_ids'"):
        packed_collate([good])
    ds = Dataset.from_dict({"input_ids": [[1, 2], [3]], "completion_mask": [[1, 1], [1]]})
    with pytest.raises(ValueError, match=r"overflow must be one of \('truncate', 'split'\), got 'wrap'"):
        pack(ds, 4, overflow="wrap")
    with pytest.raises(ValueError, match="max_length must be a positive int, got 0"):
        pack(ds, 0)
    with pytest.raises(KeyError, match="pack needs a tokenized dataset with 'completion_mask'"):
        pack(ds.remove_columns("completion_mask"), 4)
    with pytest.raises(ValueError, match="row 1: input_ids and completion_mask have different lengths"):
        pack(Dataset.from_dict({"input_ids": [[1], [2, 3]], "completion_mask": [[1], [1]]}), 4)
    with pytest.raises(ValueError, match="row 0 has no tokens"):
        pack(Dataset.from_dict({"input_ids": [[]], "completion_mask": [[]]}), 4)
    with pytest.raises(ValueError, match="cannot pack an empty dataset"):
        pack(ds.select([]), 4)
    with pytest.raises(ValueError, match=r"item 0 has length 9, outside \[1, 8\]"):
        best_fit_decreasing([9], 8)
