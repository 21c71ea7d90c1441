"""SFT's three batch layouts (padded, padding-free, packed) through the real loop (`rl.sft.train`).

What is checked, against references computed here from the embedded task's strings (not from the
collators): the batches that reach the model have each layout's shape, positions and masks; the
packed rows hold exactly the task's documents; `num_tokens` counts real tokens only (no padding, no
packing filler); and the three layouts give the same optimizer steps.

Why the layouts must agree: each run takes optimizer steps over the WHOLE train set, so a step's loss is
the mean over every target token of the task whatever the order and the grouping of rows, and the
updated model (hence step 2's loss) is the same too. Float32 sums in different orders: rel 1e-5.
"""

import json

import pytest
import torch

from posttrain.data import embedded
from posttrain.rl import sft
from posttrain.rl.models import load_tokenizer

PER_DEVICE, ACCUMULATION = 197, 4  # 197 x 4 = 788, the whole embedded train set in one step
RTOL = 1e-5
LOAD_CAUSAL_LM = sft.load_causal_lm  # before any test wraps it


def _documents() -> list[str]:
    """Each train row as the text the model reads: prompt + answer + eos."""
    return [p + a + embedded.EOS_TOKEN for p, a in embedded.problems("train")]


def _real_tokens() -> int:
    # One token per character (embedded tokenizer), plus one for the eos.
    return sum(len(p) + len(a) + 1 for p, a in embedded.problems("train"))


def _train_recording(tmp_path, monkeypatch, per_device, accumulation, **options):
    """Two optimizer steps of per_device x accumulation rows (the whole train set); returns
    (metrics.jsonl step lines, the keyword arguments of every training forward)."""
    seen = []

    def load_recording(name, seed=0, quantization=None):
        model = LOAD_CAUSAL_LM(name, seed=seed, quantization=quantization)

        def record(module, args, kwargs):
            if module.training:  # training forwards only
                seen.append({k: v.clone() if torch.is_tensor(v) else v for k, v in kwargs.items()})

        model.register_forward_pre_hook(record, with_kwargs=True)
        return model

    monkeypatch.setattr(sft, "load_causal_lm", load_recording)
    config = sft.SFTConfig(
        output_dir=str(tmp_path),
        max_steps=2,
        warmup_steps=0,
        lr_scheduler_type="constant",
        per_device_train_batch_size=per_device,
        gradient_accumulation_steps=accumulation,
        eval_steps=0,
        save_steps=0,
        disable_tqdm=True,
        report_to="none",
        **options,
    )
    sft.train(config)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "loss" in r], seen


def _split_documents(ids: torch.Tensor, positions: torch.Tensor) -> list[list[int]]:
    """Cut one row of token ids wherever position_ids restart at 0."""
    starts = torch.nonzero(positions == 0).flatten().tolist() + [len(ids)]
    return [ids[a:b].tolist() for a, b in zip(starts[:-1], starts[1:], strict=True)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The three layouts' metrics and model inputs (module-scoped: each run is two steps over the data)."""
    out = {}
    with pytest.MonkeyPatch.context() as monkeypatch:
        tokenizer = load_tokenizer(None)
        # The packed layout's batch: all packed rows in one micro-batch, so that one step covers the set.
        packed_rows, _, _ = sft.load_sft_data(sft.SFTConfig(packing=True), tokenizer)
        layouts = {
            "padded": (PER_DEVICE, ACCUMULATION, {}),
            "padding_free": (PER_DEVICE, ACCUMULATION, {"padding_free": True}),
            "packing": (len(packed_rows), 1, {"packing": True}),
        }
        for name, (per_device, accumulation, options) in layouts.items():
            path = tmp_path_factory.mktemp(name)
            out[name] = _train_recording(path, monkeypatch, per_device, accumulation, **options)
    return out


def test_padded_batches_reach_the_model_with_an_attention_mask(runs):
    _, seen = runs["padded"]
    tokenizer = load_tokenizer(None)
    assert len(seen) == 2 * ACCUMULATION
    documents = []
    for inputs in seen[:ACCUMULATION]:  # step 1's micro-batches
        ids, real = inputs["input_ids"], inputs["attention_mask"].bool()
        assert ids.shape[0] == PER_DEVICE
        assert (ids[~real] == tokenizer.pad_token_id).all()
        # position_ids count each row's real tokens from 0
        expected = torch.arange(ids.shape[1]).expand_as(ids)
        assert torch.equal(inputs["position_ids"][real], expected[real])
        documents += [tokenizer.decode(row[mask]) for row, mask in zip(ids, real, strict=True)]
    assert sorted(documents) == sorted(_documents())


def test_padding_free_batches_are_one_row_of_whole_documents(runs):
    _, seen = runs["padding_free"]
    tokenizer = load_tokenizer(None)
    assert len(seen) == 2 * ACCUMULATION
    documents = []
    for inputs in seen[:ACCUMULATION]:  # step 1's micro-batches
        ids, positions = inputs["input_ids"], inputs["position_ids"]
        assert ids.shape[0] == 1 and "attention_mask" not in inputs
        assert inputs["use_cache"] is False  # block-diagonal attention from position_ids needs it
        docs = _split_documents(ids[0], positions[0])
        assert len(docs) == PER_DEVICE
        for doc, start in zip(docs, (positions[0] == 0).nonzero().flatten().tolist(), strict=True):
            assert positions[0, start : start + len(doc)].tolist() == list(range(len(doc)))
        documents += [tokenizer.decode(d) for d in docs]
    # Step 1 saw every train row once, unpadded.
    assert sorted(documents) == sorted(_documents())
    assert sum(inputs["input_ids"].numel() for inputs in seen[:ACCUMULATION]) == _real_tokens()


def test_packed_batches_hold_the_task_documents_and_filler(runs):
    _, seen = runs["packing"]
    tokenizer = load_tokenizer(None)
    assert len(seen) == 2
    inputs = seen[0]
    ids, positions = inputs["input_ids"], inputs["position_ids"]
    B, T = ids.shape
    assert "attention_mask" not in inputs and inputs["use_cache"] is False
    assert T <= sft.SFTConfig().max_length  # bins of max_length tokens
    assert B < len(_documents()) / 4  # rows hold several documents each (~8 tokens per document)
    documents, filler = [], 0
    for b in range(B):
        for doc in _split_documents(ids[b], positions[b]):
            if set(doc) == {tokenizer.pad_token_id}:
                filler += len(doc)  # the collator's padding tail: a document of its own
            else:
                documents.append(tokenizer.decode(doc))
    assert sorted(documents) == sorted(_documents())
    assert filler > 0 and B * T == _real_tokens() + filler


def test_num_tokens_counts_real_tokens_only(runs):
    """TRL's num_tokens: tokens seen so far, without padding or packing filler (cumulative)."""
    for name, (lines, _) in runs.items():
        assert [r["num_tokens"] for r in lines] == [_real_tokens(), 2 * _real_tokens()], name


@pytest.mark.parametrize("layout", ["padding_free", "packing"])
def test_layouts_give_the_same_steps(runs, layout):
    reference, _ = runs["padded"]
    lines, _ = runs[layout]
    for key in ("loss", "grad_norm", "mean_token_accuracy", "entropy"):
        ours = [r[key] for r in lines]
        assert ours == pytest.approx([r[key] for r in reference], rel=RTOL), key
    # the whole-set step changed the model: step 2's loss is not step 1's
    assert reference[1]["loss"] < reference[0]["loss"] * 0.99
