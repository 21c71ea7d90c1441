"""rl/last_token.py: a sequence classifier's scores with the last layer at the last token only, against the
model's own forward (scores and every parameter's gradient, float32)."""

import pytest
import torch
import transformers

from posttrain.rl import last_token

FAMILIES = {
    "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForSequenceClassification, {}),
    "llama": (
        transformers.LlamaConfig,
        transformers.LlamaForSequenceClassification,
        {"attention_bias": True},
    ),
    "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForSequenceClassification, {"head_dim": 16}),
    "mistral": (
        transformers.MistralConfig,
        transformers.MistralForSequenceClassification,
        {"sliding_window": None},
    ),
}


def build(family, num_labels=1, **overrides):
    config_class, model_class, extra = FAMILIES[family]
    config = config_class(
        vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, num_labels=num_labels, pad_token_id=0, **{**extra, **overrides},
    )  # fmt: skip
    torch.manual_seed(0)
    model = model_class(config).float()
    with torch.no_grad():  # norms and biases away from their initial ones and zeros, so each one matters
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model


def padded_batch():
    """Rows of 9 positions: no padding, right padding, left padding, and pad ids the attention mask keeps
    (a tokenizer whose pad is its eos): inside the row, and at its end, which the model's rule (score the
    rightmost non-pad token) skips, so that token's query must not see it."""
    torch.manual_seed(1)
    ids = torch.randint(1, 64, (4, 9))
    mask = torch.ones_like(ids)
    ids[1, 6:], mask[1, 6:] = 0, 0
    ids[2, :3], mask[2, :3] = 0, 0
    ids[3, 4], ids[3, 8] = 0, 0
    return ids, mask


@pytest.mark.parametrize("num_labels", [1, 2])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_scores_and_gradients_equal_the_models_forward(family, num_labels):
    model = build(family, num_labels)
    assert last_token.supports(model)
    ids, mask = padded_batch()
    params = list(model.parameters())
    weights = torch.randn(4, num_labels)  # a loss that weighs each row and label differently

    expected = model(input_ids=ids, attention_mask=mask).logits
    expected_grads = torch.autograd.grad((expected * weights).sum(), params)
    scores = last_token.sequence_scores(model, ids, mask)
    grads = torch.autograd.grad((scores * weights).sum(), params)

    torch.testing.assert_close(scores, expected, rtol=1e-5, atol=1e-6)
    for (name, _), g, e in zip(model.named_parameters(), grads, expected_grads, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6, msg=name)


def test_the_model_is_left_as_it_was():
    model = build("qwen2")
    layer, keys = model.model.layers[-1], list(model.state_dict())
    ids, mask = padded_batch()
    last_token.sequence_scores(model, ids, mask)
    assert model.model.layers[-1] is layer and list(model.state_dict()) == keys

    def fail(*args, **kwargs):
        raise RuntimeError("inside the last layer")

    layer.mlp.forward = fail  # an error inside the substitute layer: the layer is put back all the same
    with pytest.raises(RuntimeError, match="inside the last layer"):
        last_token.sequence_scores(model, ids, mask)
    assert model.model.layers[-1] is layer and list(model.state_dict()) == keys


def test_where_it_does_not_apply_the_models_forward_runs():
    ids, mask = padded_batch()
    gpt2 = transformers.GPT2ForSequenceClassification(
        transformers.GPT2Config(vocab_size=64, n_embd=32, n_layer=2, n_head=4, num_labels=1, pad_token_id=0)
    )
    sliding = build("mistral", sliding_window=4)  # every layer masked by its window
    sliding_last = build("qwen2", use_sliding_window=True, sliding_window=4, max_window_layers=2)
    assert sliding_last.config.layer_types[-1] == "sliding_attention"
    eager = build("qwen2")
    eager.config._attn_implementation = "eager"
    checkpointed = build("qwen2")
    getattr(checkpointed, "activation_checkpointing_enable", checkpointed.gradient_checkpointing_enable)()
    hooked = {}
    for where in ("model", "backbone", "norm", "attention", "backward"):
        hooked[where] = build("qwen2")
        module = {
            "model": hooked[where],
            "backbone": hooked[where].model,
            "norm": hooked[where].model.norm,
            "attention": hooked[where].model.layers[-1].self_attn,
            "backward": hooked[where].model.layers[-1],
        }[where]
        if where == "backward":
            module.register_full_backward_hook(lambda *a: None)
        else:
            module.register_forward_hook(lambda *a: None)
    for model in (gpt2, sliding, sliding_last, eager, checkpointed, *hooked.values()):
        assert not last_token.supports(model.train())
        model.eval()  # the same dropout-free forward on both sides
        expected = model(input_ids=ids, attention_mask=mask).logits
        assert torch.equal(last_token.sequence_scores(model, ids, mask), expected)
    no_pad = build("qwen2")
    no_pad.config.pad_token_id = None
    assert not last_token.supports(no_pad)
    dropout = build("qwen2", attention_dropout=0.1)
    assert not last_token.supports(dropout.train()) and last_token.supports(dropout.eval())
    dropout.model.layers[-1].self_attn.train()  # the module's own mode is what its dropout reads
    assert not last_token.supports(dropout)


def test_other_inputs_reach_the_models_forward():
    # A tokenizer's token_type_ids (BERT-style reward models score with them) go to the model's own forward.
    bert = transformers.BertForSequenceClassification(
        transformers.BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=32,
            type_vocab_size=2,
            num_labels=1,
            pad_token_id=0,
        )  # fmt: skip
    ).eval()
    ids, mask = padded_batch()
    types = (torch.arange(9) >= 4).long().expand(4, 9)
    expected = bert(input_ids=ids, attention_mask=mask, token_type_ids=types).logits
    assert not torch.equal(expected, bert(input_ids=ids, attention_mask=mask).logits)
    assert torch.equal(last_token.sequence_scores(bert, ids, mask, token_type_ids=types), expected)
    qwen2 = build("qwen2").eval()  # given another input, a supported model takes its forward too
    position_ids = torch.arange(9).expand(4, 9) + 3
    expected = qwen2(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    assert torch.equal(last_token.sequence_scores(qwen2, ids, mask, position_ids=position_ids), expected)


def test_the_benchmarks_flop_count_is_what_it_computes(monkeypatch):
    # measure.last_token_score_flops (the reward benchmark's floor, PPO's reward model) against the matmuls
    # torch counts in one forward + backward; the counter's global module hooks would turn the path off.
    from torch.utils.flop_counter import FlopCounterMode

    from posttrain.measure import last_token_score_flops

    monkeypatch.setattr(last_token, "global_hooks", lambda: False)
    model = build("qwen2")
    ids = torch.randint(1, 64, (4, 16))
    with FlopCounterMode(display=False) as counter:
        last_token.sequence_scores(model, ids, torch.ones_like(ids)).sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert set(counts) == {"aten.mm", "aten.addmm"}  # attention is counted apart (`attn`)
    flops = last_token_score_flops(model.config, batch_tokens=64, seq_len=16, rows=4)
    assert sum(counts.values()) == flops["body"] + flops["head"]
