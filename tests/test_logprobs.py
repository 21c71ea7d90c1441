"""rl.logprobs against a plain reference: the model's full logits -> float64 log_softmax -> gather; and its
mean_logit / log_sum_sq against TRL 1.16's fused LM head (float32, relative error <= 1e-5)."""

import copy
import functools

import pytest
import torch
from _optional import import_or_skip

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
    """(logps, entropy, is_top1, mean_logit, log_sum_sq), each (B, T), from the model's full logits (which carry any
    final soft-capping: the model's own forward applies it) in float64."""
    logits = model(
        input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False
    ).logits
    z = logits.double()[:, :-1] / temperature  # (B, T-1, V) what the softmax sees
    logp_all = z.log_softmax(-1)
    target = batch["input_ids"][:, 1:]
    mask = batch["completion_mask"][:, 1:].bool()
    logps = logp_all.gather(-1, target[..., None]).squeeze(-1) * mask
    p = logp_all.exp()
    entropy = -(p * logp_all).sum(-1) * mask
    top1 = (logp_all.argmax(-1) == target) & mask
    mean_logit = z.mean(-1) * mask
    log_sum_sq = (p * p).sum(-1).log() * mask
    pad = lambda x: torch.nn.functional.pad(x, (1, 0))
    return tuple(pad(x) for x in (logps, entropy, top1, mean_logit, log_sum_sq))


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@functools.cache
def _models():
    from transformers import AutoModelForCausalLM, Gemma2Config, GPT2Config

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
    gpt2 = GPT2Config(  # not in FUSED_MODEL_TYPES: the logits path
        vocab_size=128,
        n_embd=32,
        n_layer=1,
        n_head=2,
        n_positions=64,
        resid_pdrop=0.0,  # GPT-2 configs default to dropout 0.1
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,  # GPT-2's 50256 lies outside this vocabulary
        eos_token_id=0,
    )
    torch.manual_seed(0)
    return {
        "qwen2": embedded.build_model(seed=0, num_hidden_layers=1),
        "gemma2-softcap": AutoModelForCausalLM.from_config(gemma, attn_implementation="eager"),
        "gpt2": AutoModelForCausalLM.from_config(gpt2),
    }


EVERY = dict(return_entropy=True, return_top1=True, return_mean_logit=True, return_log_sum_sq=True)


@pytest.mark.parametrize(
    ("name", "path"),
    [
        ("qwen2", "fused"),
        ("qwen2", "logits"),
        ("gemma2-softcap", "fused"),
        ("gemma2-softcap", "logits"),
        ("gpt2", "logits"),
    ],
)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_match_reference_float64(tokenizer, monkeypatch, name, path, temperature):
    model = copy.deepcopy(_models()[name]).double()
    if path == "logits":
        monkeypatch.setattr(lp, "FUSED_MODEL_TYPES", frozenset())
    assert lp.supports_fused(model) == (path == "fused")
    batch = _batch(tokenizer, ["12+7=19", "3-11=-8", "5+5=10"], prompt_lens=[5, 5, 4])
    generator = torch.Generator().manual_seed(0)  # the same weights whatever ran before
    weights = torch.randn(batch["input_ids"].shape, dtype=torch.float64, generator=generator)

    ours = lp.token_logprobs(model, batch, temperature=temperature, **EVERY)
    ((ours.logps + 0.1 * ours.entropy) * weights).sum().backward()
    our_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    ref_logps, ref_entropy, ref_top1, ref_mean_logit, ref_log_sum_sq = _reference(model, batch, temperature)
    ((ref_logps + 0.1 * ref_entropy) * weights).sum().backward()

    torch.testing.assert_close(ours.logps, ref_logps, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.entropy, ref_entropy, rtol=1e-10, atol=1e-10)
    assert torch.equal(ours.is_top1, ref_top1)
    torch.testing.assert_close(ours.mean_logit, ref_mean_logit.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.log_sum_sq, ref_log_sum_sq.detach(), rtol=1e-10, atol=1e-10)
    assert not ours.mean_logit.requires_grad and not ours.log_sum_sq.requires_grad
    assert ours.mean_logit.abs().max() > 0.005 and ours.log_sum_sq.min() < -1  # not all zeros
    for ours_g, (pname, p) in zip(our_grads, model.named_parameters(), strict=True):
        torch.testing.assert_close(ours_g, p.grad, rtol=1e-8, atol=1e-10, msg=pname)


@pytest.mark.parametrize("name", ["qwen2", "gpt2"])
def test_token_logprobs_float32_and_zero_outside_mask(tokenizer, name):
    model = embedded.build_model(seed=1, num_hidden_layers=1) if name == "qwen2" else _models()[name]
    batch = _batch(tokenizer, ["12+7=19", "3-11=-8"], prompt_lens=[5, 5])
    ours = lp.token_logprobs(model, batch)
    ref, _, _, ref_mean_logit, ref_log_sum_sq = _reference(model, batch, 1.0)
    assert ours.logps.dtype == torch.float32
    assert (
        ours.entropy is None and ours.is_top1 is None and ours.mean_logit is None and ours.log_sum_sq is None
    )
    torch.testing.assert_close(ours.logps, ref.float(), rtol=1e-5, atol=1e-5)
    assert (ours.logps[batch["completion_mask"] == 0] == 0).all()
    assert (ours.logps[batch["completion_mask"] == 1] < 0).all()
    metrics = lp.token_logprobs(model, batch, return_mean_logit=True, return_log_sum_sq=True)
    assert torch.equal(metrics.logps, ours.logps) and metrics.entropy is None and metrics.is_top1 is None
    for got, want in ((metrics.mean_logit, ref_mean_logit), (metrics.log_sum_sq, ref_log_sum_sq)):
        assert got.dtype == torch.float32 and (got[batch["completion_mask"] == 0] == 0).all()
        torch.testing.assert_close(got, want.detach().float(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["qwen2", "gemma2-softcap"])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_mean_logit_and_log_sum_sq_match_trl_fused_lm_head(tokenizer, name, temperature):
    """Against TRL 1.16's fused LM head (`trl.trainer.utils.add_fused_lm_head`, whose `mean_logits` its DPO trainer
    logs as logits/chosen and logits/rejected and whose `log_sum_sq_probs` are the WPO weights of `use_weighting`):
    the same float32 model and batch, temperature and Gemma 2's final soft-capping included; relative error <= 1e-5
    (plus 1e-6 absolute for the mean logits that pass near 0)."""
    trl_utils = import_or_skip("trl.trainer.utils")  # a failure under CI, where trl is installed
    model = copy.deepcopy(_models()[name])  # float32; add_fused_lm_head patches this copy's forward
    batch = _batch(tokenizer, ["12+7=19", "3-11=-8", "5+5=10"], prompt_lens=[5, 5, 4])
    with torch.no_grad():
        ours = lp.token_logprobs(
            model, batch, temperature=temperature, return_mean_logit=True, return_log_sum_sq=True
        )
        trl_utils.add_fused_lm_head(
            model, temperature=temperature, outputs=("log_probs", "mean_logits", "log_sum_sq_probs")
        )
        labels = batch["input_ids"].masked_fill(batch["completion_mask"] == 0, -100)
        theirs = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            labels=labels,
            fused_lm_head=True,
        )
    # TRL's fields are (B, T - 1), entry t about token t + 1, 0 where the label is -100; ours (B, T), entry t about
    # token t, 0 outside the completion mask, whose column 0 never counts
    pairs = (
        ("logps", ours.logps, theirs.log_probs),
        ("mean_logit", ours.mean_logit, theirs.mean_logits),
        ("log_sum_sq", ours.log_sum_sq, theirs.log_sum_sq_probs),
    )
    for what, got, want in pairs:
        assert want.shape == got[:, 1:].shape and want.abs().sum() > 0, what
        torch.testing.assert_close(got[:, 1:], want, rtol=1e-5, atol=1e-6, msg=what)


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
