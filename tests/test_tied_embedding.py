"""rl.logprobs.TiedWeight: an embedding tied to the fused output layer gets its lookup's gradient added into the
output layer's at the looked-up rows, where the embedding's own backward builds a dense (V, H) gradient to add.

Checked against that dense backward bit for bit: every parameter's gradient, two micro-batches accumulated, on
the plain forward and the shared-prefix one, on batches with repeated ids and padding ids (whose rows the
embedding's backward leaves at zero), for a tied Qwen2 and a tied Llama. Where it does not apply (untied, an
embedding module of another class, a hook on the embedding, no autograd), the module's lookup runs.
"""

from __future__ import annotations

import pytest
import torch
from test_shared_prefix import dpo_batch, online_batch, tiny

from posttrain.rl import logprobs as lp


def tied(family: str):
    model = tiny(family)
    if family == "llama":
        model.config.tie_word_embeddings = True
        model.tie_weights()
    assert model.get_input_embeddings().weight is model.get_output_embeddings().weight
    return model


def repeated(batch: dict) -> dict:
    """The batch with an id repeated within and across rows, and the padding id (0) at an attended position of
    every row (so that its embedding has a gradient the embedding's backward drops). Rows that shared a prompt
    still do."""
    batch = {k: v.clone() for k, v in batch.items()}
    ids, attended = batch["input_ids"], batch["attention_mask"].bool()
    ids[:, 2:4] = torch.where(attended[:, 2:4], torch.tensor([0, 5]), ids[:, 2:4])
    ids[:, -2:] = torch.where(attended[:, -2:], 5, ids[:, -2:])
    return batch


def gradients(model, batch, share: bool, tie: bool, monkeypatch, retain: bool = False) -> tuple[dict, int]:
    """Every parameter's gradient after two micro-batches (each backward twice with retain_graph if `retain`),
    and how many times the tied path joined its rows."""
    joins = []
    real = lp._TieJoin.backward

    def spy(ctx, grad):
        joins.append(len(ctx.rows))
        return real(ctx, grad)

    with monkeypatch.context() as m:
        m.setattr(lp._TieJoin, "backward", staticmethod(spy))
        if not tie:
            m.setattr(lp.TiedWeight, "applies", staticmethod(lambda model: False))
        model.zero_grad(set_to_none=True)
        for _ in range(2):
            out = lp.token_logprobs(model, batch, temperature=0.7, return_entropy=True, share_prompts=share)
            weights = torch.linspace(-1.0, 2.0, out.logps.numel()).view_as(out.logps)
            loss = (out.logps * weights).sum() + 0.3 * out.entropy.sum()
            for _ in range(2 if retain else 1):
                loss.backward(retain_graph=retain)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    assert all(g.layout == torch.strided for g in grads.values())
    return grads, len(joins)


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("layout", ["dpo", "online"])
@pytest.mark.parametrize("share", [False, True], ids=["plain", "shared-prefix"])
def test_gradients_equal_the_dense_embedding_backward_bit_for_bit(family, layout, share, monkeypatch):
    model = tied(family)
    batch = repeated(dpo_batch() if layout == "dpo" else online_batch())
    assert lp.shared_prefix(model, batch, batch["completion_mask"]) is not None  # rows still share prompts
    dense, dense_joins = gradients(model, batch, share, tie=False, monkeypatch=monkeypatch)
    joined, joins = gradients(model, batch, share, tie=True, monkeypatch=monkeypatch)
    assert (dense_joins, joins) == (0, 2)
    assert dense.keys() == joined.keys() and "model.embed_tokens.weight" in dense
    for name, grad in dense.items():
        assert torch.equal(grad, joined[name]), name


@pytest.mark.parametrize("case", ["padding_idx None", "retain_graph"])
def test_an_embedding_without_padding_id_and_a_retained_graph(case, monkeypatch):
    model = tied("qwen2")
    if case == "padding_idx None":
        model.get_input_embeddings().padding_idx = None
    batch, retain = repeated(dpo_batch()), case == "retain_graph"
    dense, _ = gradients(model, batch, True, tie=False, monkeypatch=monkeypatch, retain=retain)
    joined, joins = gradients(model, batch, True, tie=True, monkeypatch=monkeypatch, retain=retain)
    assert joins == (4 if retain else 2)
    for name, grad in dense.items():
        assert torch.equal(grad, joined[name]), name


def test_a_compiled_model_looks_up_as_it_is(monkeypatch):
    """A compile wrapper (or a decoder compiled in place) would trace the swapped lookup: the module's runs."""
    model = tied("qwen2")
    dense, _ = gradients(model, dpo_batch(), False, tie=False, monkeypatch=monkeypatch)
    compiled, joins = gradients(torch.compile(model, backend="eager"), dpo_batch(), False, True, monkeypatch)
    assert joins == 0
    for name, grad in dense.items():
        assert torch.equal(grad, compiled[name.removeprefix("_orig_mod.")] if name in compiled else grad), (
            name
        )


def test_where_it_does_not_apply():
    untied = tiny("llama")
    assert not lp.TiedWeight.applies(untied)
    assert not lp.TiedWeight.applies(tiny("gemma"))  # its embedding scales in its own forward
    model = tied("qwen2")
    assert lp.TiedWeight.applies(model)
    with torch.no_grad():
        assert not lp.TiedWeight.applies(model)
    handle = model.get_input_embeddings().register_forward_hook(lambda *args: None)
    assert not lp.TiedWeight.applies(model)
    handle.remove()
    model.get_input_embeddings().weight.requires_grad_(False)
    assert not lp.TiedWeight.applies(model)
