"""mean_token_accuracy counts a target only when it is the argmax, ties going to the lowest index (TRL 1.16
takes `logits.argmax(-1) == labels`), through the whole SFT step on both log-prob paths.

Ties are built into the model: equal output-layer rows make exactly equal logits. A collapsed model
(all logits equal, what `--learning_rate 1e6` produced) must score the rate at which the target is token
0, not 1.0; a model whose two target tokens share one output row must score the one tied with a lower
index as wrong and the other as right. Both against TRL's SFTTrainer on the same batch (float32). All four
cases fail on the rule before issue 17 ("the target holds the maximum").
"""

import copy

import pytest
import torch
from test_sft_trl import N_ROWS, our_rows, our_step, trl_step

from posttrain.data import collate, embedded
from posttrain.rl import logprobs


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


def _untied_model(seed=0):
    model = embedded.build_model(seed=seed, tie_word_embeddings=False)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()
    return model


def collapsed(model, batch):
    """Every logit of every position equal: each target ties with token 0."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        model.lm_head.weight.zero_()
    return model


def paired(model, batch, low=2, high=5):
    """Only tokens `low` < `high` (eos and "2", frequent targets) get a non-zero output row, the same one:
    the batch's mean final hidden state, so that at most positions they share the maximum logit. There a
    `low` target is the argmax and a `high` target ties with a lower index (not the argmax)."""
    model = copy.deepcopy(model)
    with torch.no_grad():
        hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])[0]
        direction = hidden[batch["attention_mask"].bool()].mean(0)  # (H,)
        w = model.lm_head.weight  # (V, H)
        w.zero_()
        w[low] = w[high] = direction
    return model


@pytest.mark.parametrize("fused", [True, False], ids=["hidden path", "logits path"])
@pytest.mark.parametrize("make", [collapsed, paired])
def test_mean_token_accuracy_with_ties_matches_trl(tokenizer, make, fused, monkeypatch):
    rows = embedded.rows("prompt_completion", "train", seed=0)[:N_ROWS]
    tokenized = our_rows(tokenizer, rows, max_length=64)
    batch = collate.pad_collate(
        [tokenized[i] for i in range(len(tokenized))], pad_token_id=tokenizer.pad_token_id
    )
    model = make(_untied_model(), batch)
    if not fused:
        monkeypatch.setattr(logprobs, "supports_fused", lambda model: False)
    assert logprobs.supports_fused(model) == fused
    theirs = trl_step(model, tokenizer, rows, max_length=64)
    ours = our_step(model, [batch])["metrics"]["mean_token_accuracy"]
    assert ours == pytest.approx(theirs["metrics"]["mean_token_accuracy"], rel=1e-6, abs=1e-7)

    # Independently: the targets, and which of them are the first maximum of the model's logits.
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["input_ids"][:, 1:]
    keep = batch["completion_mask"][:, 1:].bool()
    top = logits[:, :-1]
    first_max = top.argmax(-1) == targets
    holds_max = top.gather(-1, targets.unsqueeze(-1)).squeeze(-1) == top.amax(-1)
    assert ours == pytest.approx(first_max[keep].float().mean().item(), abs=1e-7)
    # the batch really has targets that tie with a lower index (a "ties count" rule would score higher)
    assert (holds_max & ~first_max)[keep].any()
    if make is paired:
        assert first_max[keep].any()  # and targets that are the first of their tie (not a vacuous 0)
