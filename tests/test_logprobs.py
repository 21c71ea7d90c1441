"""rl.logprobs against a plain reference: the model's full logits -> float64 log_softmax -> gather."""

import copy
import functools

import pytest
import torch

from posttrain.data import embedded
from posttrain.rl import logprobs as lp


def _batch(tokenizer, texts, prompt_lens):
    """Right-padded batch; the completion mask covers every token after the first `prompt_len`."""
    ids = [tokenizer(t)["input_ids"] for t in texts]
    T = max(map(len, ids))
    input_ids = torch.full((len(ids), T), tokenizer.pad_token_id)
    attention_mask = torch.zeros(len(ids), T, dtype=torch.long)
    completion_mask = torch.zeros(len(ids), T, dtype=torch.long)
    for b, (row, p) in enumerate(zip(ids, prompt_lens, strict=True)):
        input_ids[b, : len(row)] = torch.tensor(row)
        attention_mask[b, : len(row)] = 1
        completion_mask[b, p : len(row)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "completion_mask": completion_mask}


def _reference(model, batch, temperature):
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    logp_all = (logits.double() / temperature).log_softmax(-1)[:, :-1]  # (B, T-1, V)
    target = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    logps = logp_all.gather(-1, target[..., None]).squeeze(-1) * mask
    entropy = -(logp_all.exp() * logp_all).sum(-1) * mask
    top1 = (logp_all.argmax(-1) == target) & mask
    pad = lambda x: torch.nn.functional.pad(x, (1, 0))
    return pad(logps), pad(entropy), pad(top1)


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@functools.cache
def _models():
    from transformers import AutoModelForCausalLM, Gemma2Config

    gemma = Gemma2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        final_logit_softcapping=2.0,  # small, so the cap actually bends these logits
        pad_token_id=0,
    )
    torch.manual_seed(0)
    return {
        "qwen2": embedded.build_model(seed=0, num_hidden_layers=1),
        "gemma2-softcap": AutoModelForCausalLM.from_config(gemma, attn_implementation="eager"),
    }


@pytest.mark.parametrize("name", ["qwen2", "gemma2-softcap"])
@pytest.mark.parametrize("path", ["fused", "logits"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_reference_float64(tokenizer, monkeypatch, name, path, temperature):
    model = copy.deepcopy(_models()[name]).double()
    if path == "logits":
        monkeypatch.setattr(lp, "FUSED_MODEL_TYPES", frozenset())
    assert lp.supports_fused(model) == (path == "fused")
    batch = _batch(tokenizer, ["12+7=19", "3-11=-8", "5+5=10"], prompt_lens=[5, 5, 4])
    generator = torch.Generator().manual_seed(0)  # the same weights whatever ran before
    weights = torch.randn(batch["input_ids"].shape, dtype=torch.float64, generator=generator)

    ours = lp.token_logprobs(model, batch, temperature=temperature, return_entropy=True, return_top1=True)
    ((ours.logps + 0.1 * ours.entropy) * weights).sum().backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logps, ref_entropy, ref_top1 = _reference(model, batch, temperature)
    ((ref_logps + 0.1 * ref_entropy) * weights).sum().backward()

    torch.testing.assert_close(ours.logps, ref_logps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.entropy, ref_entropy, rtol=1e-10, atol=1e-10)
    assert torch.equal(ours.is_top1, ref_top1)
    for ours_g, (pname, p) in zip(our_grads, model.named_parameters(), strict=True):
        torch.testing.assert_close(ours_g, p.grad, rtol=1e-8, atol=1e-10, msg=pname)


def test_token_logprobs_float32_and_zero_outside_mask(tokenizer):
    model = embedded.build_model(seed=1, num_hidden_layers=1)
    batch = _batch(tokenizer, ["12+7=19", "3-11=-8"], prompt_lens=[5, 5])
    ours = lp.token_logprobs(model, batch)
    ref, _, _ = _reference(model, batch, 1.0)
    assert ours.logps.dtype == torch.float32 and ours.entropy is None and ours.is_top1 is None
    torch.testing.assert_close(ours.logps, ref.float(), rtol=1e-5, atol=1e-5)
    assert (ours.logps[batch["completion_mask"] == 0] == 0).all()
    assert (ours.logps[batch["completion_mask"] == 1] < 0).all()


def test_output_layer_sees_only_zero_rows(tokenizer):
    """The fused path never projects a (B, T, V) logits tensor: the output layer gets zero rows."""
    model = embedded.build_model(seed=0, num_hidden_layers=1)
    seen = []
    model.get_output_embeddings().register_forward_hook(lambda m, args, out: seen.append(out.shape))
    lp.token_logprobs(model, _batch(tokenizer, ["12+7=19"], prompt_lens=[5]))
    assert seen == [torch.Size([1, 0, 128])]
    # and the hook is removed afterwards: a plain forward projects every position again
    model(input_ids=torch.tensor([[4, 5, 6]]))
    assert seen[-1] == torch.Size([1, 3, 128])


def test_sequence_logprobs():
    logps = torch.tensor([[0.0, -1.0, -2.0, -3.0], [0.0, -4.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 0], [0, 0, 0, 0]])
    total, mean = lp.sequence_logprobs(logps, mask)
    assert total.tolist() == [-6.0, -4.0, 0.0]
    assert mean.tolist() == [-2.0, -4.0, 0.0]
