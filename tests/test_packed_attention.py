"""Packed batches under every attention implementation transformers offers: the documents stay apart.

transformers separates the documents of a batch without attention mask in two ways: eager / sdpa /
flex_attention build a block-diagonal mask from each row's position_ids, and flash attention finds them
(`_is_packed_sequence`) only when B == 1. `collate.for_attention` lays the collator's batches out for the
model's implementation. Checked here with transformers' own code on the CPU:

- detection: for each implementation, the mask transformers builds from our batch (evaluated token by
  token, flex's BlockMask included) is the block-diagonal causal mask of our documents, or, for flash
  attention, `_is_packed_sequence` holds and the cu_seqlens it derives are our document boundaries;
- logits: a tiny Qwen2 on packed batches gives each document the logits it gets alone (float32, 1e-5),
  under eager, sdpa and flash attention. Flash attention runs through transformers' real dispatch
  (`_flash_attention_forward`) with its CUDA kernels replaced by a plain causal-attention reference;
  the same run on today's (B > 1) layout mixes documents, which is what the layout fixes.
"""

import pytest
import torch
import transformers.modeling_flash_attention_utils as fa_utils
from datasets import Dataset
from transformers.masking_utils import create_causal_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.utils.generic import is_flash_attention_requested

from posttrain.data import collate, embedded

DOC_LENGTHS = [7, 3, 9, 4, 5, 2, 6, 8]
MAX_LENGTH = 12
# Every implementation transformers registers, plus eager (the models' built-in one).
IMPLEMENTATIONS = sorted({"eager", *ALL_ATTENTION_FUNCTIONS._global_mapping})


@pytest.fixture(scope="module")
def packed_rows():
    g = torch.Generator().manual_seed(0)
    docs = [torch.randint(3, 128, (n,), generator=g).tolist() for n in DOC_LENGTHS]
    tokenized = Dataset.from_list([{"input_ids": d, "completion_mask": [1] * len(d)} for d in docs])
    rows = list(collate.pack(tokenized, MAX_LENGTH))
    assert len(rows) > 1 and any(sum(r["seq_lengths"]) < MAX_LENGTH for r in rows)  # B > 1, with filler
    return rows


def _documents(rows):
    """[(row, start, length)] of every document of packed_collate's output, the filler included."""
    T = max(sum(r["seq_lengths"]) for r in rows)
    out = []
    for b, row in enumerate(rows):
        start = 0
        for n in [*row["seq_lengths"], T - sum(row["seq_lengths"])]:
            if n:
                out.append((b, start, n))
            start += n
    return out, T


def _block_causal(rows):
    """The attention a packed batch must get: token q sees token k iff same document and k <= q."""
    docs, T = _documents(rows)
    B = len(rows)
    doc_id = torch.full((B, T), -1)
    for i, (b, start, n) in enumerate(docs):
        doc_id[b, start : start + n] = i
    idx = torch.arange(T)
    return (doc_id[:, :, None] == doc_id[:, None, :]) & (idx[None, :, None] >= idx[None, None, :])


def _allowed(mask, B, T):
    """transformers' mask (bool, additive float or flex BlockMask) -> bool (B, T, T), True = attends."""
    if hasattr(mask, "mask_mod"):  # BlockMask: evaluate its mask function at every (q, kv) pair
        b = torch.arange(B)[:, None, None]
        q, kv = torch.arange(T)[None, :, None], torch.arange(T)[None, None, :]
        return mask.mask_mod(b, torch.zeros_like(b), q, kv).expand(B, T, T)
    mask = mask[:, 0]
    return mask if mask.dtype == torch.bool else mask == 0


@pytest.mark.parametrize("impl", IMPLEMENTATIONS)
def test_transformers_finds_our_documents(packed_rows, impl):
    config = embedded.tiny_model_config()
    config._attn_implementation = impl
    layout = collate.for_attention(collate.packed_collate, impl)
    flash = is_flash_attention_requested(requested_attention_implementation=impl)
    if impl not in ("eager", "sdpa", "flex_attention") and not flash:
        # e.g. paged|eager: no mask without a cache, so packed documents would see each other
        with pytest.raises(
            ValueError, match=rf"attn_implementation='{impl}' does not keep packed documents apart"
        ):
            layout(packed_rows)
        return
    batch = layout(packed_rows)
    position_ids = batch["position_ids"]
    B, T = position_ids.shape
    mask = create_causal_mask(
        config, torch.zeros(B, T, config.hidden_size), None, None, position_ids=position_ids
    )
    if flash:
        assert mask is None and B == 1  # no mask: the documents come from position_ids alone
        assert fa_utils._is_packed_sequence(position_ids, batch_size=B)
        (cu_seqlens, _), _ = fa_utils.prepare_fa_kwargs_from_position_ids(position_ids)
        docs, row_length = _documents(packed_rows)
        starts = [b * row_length + start for b, start, _ in docs]
        assert cu_seqlens.tolist() == [*starts, len(packed_rows) * row_length]
        # The collator's own (B > 1) layout is what flash attention cannot see into:
        raw = collate.packed_collate(packed_rows)
        assert not fa_utils._is_packed_sequence(raw["position_ids"], batch_size=len(packed_rows))
        for key in ("input_ids", "completion_mask", "position_ids"):  # the same tokens, bins end to end
            assert torch.equal(batch[key], raw[key].reshape(1, -1))
        assert batch["num_tokens"] == raw["num_tokens"] == sum(DOC_LENGTHS)  # filler is not counted
    else:
        assert B == len(packed_rows)  # row-wise attention keeps the bins as rows
        assert torch.equal(_allowed(mask, B, T), _block_causal(packed_rows))


def test_padded_batches_pass_unchanged():
    rows = [
        {"input_ids": [5, 6, 7], "completion_mask": [0, 1, 1]},
        {"input_ids": [8, 9], "completion_mask": [1, 1]},
    ]
    expected = collate.pad_collate(rows, pad_token_id=0)
    for impl in IMPLEMENTATIONS:
        got = collate.for_attention(lambda r: collate.pad_collate(r, pad_token_id=0), impl)(rows)
        assert got.keys() == expected.keys() and all(torch.equal(got[k], expected[k]) for k in got)
    with pytest.raises(ValueError, match="has an attention_mask"):
        collate.to_one_row(expected)


# --- flash attention's dispatch with a reference kernel ---------------------------------------------------


def _attend(q, k, v, scale):
    """Causal attention of one sequence. q (T, H, D), k, v (T, H_kv, D) -> (T, H, D)."""
    k, v = (x.repeat_interleave(q.shape[1] // x.shape[1], dim=1) for x in (k, v))
    scores = torch.einsum("qhd,khd->hqk", q, k) * (scale or q.shape[-1] ** -0.5)
    T = q.shape[0]
    scores = scores.masked_fill(torch.ones(T, T, dtype=torch.bool).triu(1), float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _reference_flash(implementation, *args, **kwargs):
    """lazy_import_flash_attention's return value, with plain-torch stand-ins for the CUDA kernels."""

    def flash(q, k, v, causal, softmax_scale, **_):  # (B, T, H, D): each row one causal sequence
        assert causal
        return torch.stack([_attend(q[b], k[b], v[b], softmax_scale) for b in range(q.shape[0])])

    def flash_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, causal, softmax_scale, **_):  # (N, H, D)
        assert causal and torch.equal(cu_seqlens_q, cu_seqlens_k)
        bounds = cu_seqlens_q.tolist()
        return torch.cat(
            [
                _attend(q[s:e], k[s:e], v[s:e], softmax_scale)
                for s, e in zip(bounds[:-1], bounds[1:], strict=True)
            ]
        )

    def process(**kw):
        keep = {k: kw[k] for k in ("max_seqlen_q", "max_seqlen_k") if k in kw}
        return {"causal": kw["is_causal"], "softmax_scale": kw["softmax_scale"], **keep}

    return (flash, flash_varlen, None, None, None), (process, dict)


@pytest.fixture(scope="module")
def model():
    return embedded.build_model(seed=1).eval()


def _logits(model, impl, batch):
    model.config._attn_implementation = impl
    try:
        with torch.no_grad():
            return model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
    finally:
        model.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("impl", ["eager", "sdpa", "flash_attention_2", "flash_attention_3"])
def test_packed_documents_get_their_own_logits(packed_rows, model, impl, monkeypatch):
    monkeypatch.setattr(fa_utils, "lazy_import_flash_attention", _reference_flash)
    alone = {}
    docs, T = _documents(packed_rows)
    batch = collate.packed_collate(packed_rows)
    for b, start, n in docs:
        ids = batch["input_ids"][b, start : start + n][None]
        alone[b, start] = _logits(model, "eager", {"input_ids": ids, "position_ids": torch.arange(n)[None]})[
            0
        ]

    logits = _logits(model, impl, collate.for_attention(collate.packed_collate, impl)(packed_rows))
    logits = logits.reshape(len(packed_rows), T, -1)  # one row under flash attention: back to the bins
    for (b, start), expected in alone.items():
        torch.testing.assert_close(logits[b, start : start + len(expected)], expected, rtol=1e-5, atol=1e-5)

    if impl.startswith("flash"):  # the collator's own layout: later documents attend to earlier ones
        mixed = _logits(model, impl, batch)
        worst = max((mixed[b, s : s + len(e)] - e).abs().max().item() for (b, s), e in alone.items())
        assert worst > 1e-2


def test_which_implementations_need_one_row():
    # transformers' flash test ("flash" in the name) also covers hub kernels; None is the default (sdpa/eager)
    for impl in (None, "eager", "sdpa", "flex_attention"):
        assert not collate.packs_into_one_row(impl)
    for impl in ("flash_attention_2", "flash_attention_3", "kernels-community/flash-attn2"):
        assert collate.packs_into_one_row(impl) == is_flash_attention_requested(
            requested_attention_implementation=impl
        )
        assert collate.packs_into_one_row(impl)
    with pytest.raises(
        ValueError, match=r"attn_implementation='paged\|eager' does not keep packed documents apart"
    ):
        collate.packs_into_one_row("paged|eager")
