"""The loop's numerics that a flag alone does not show: bf16 autocast and gradient clipping.

bf16: the forwards the loop runs (training and evaluation) compute their matmuls in bfloat16, and the
first step's loss equals the same step computed by hand under `torch.autocast(bfloat16)`, and differs
from the float32 one.
max_grad_norm 0: no clipping, so the first update is exactly a plain `torch.optim.AdamW` step on the raw
gradient (computed here); with max_grad_norm 1 the same step differs.
"""

import copy
import json

import pytest
import torch

from posttrain.data import embedded
from posttrain.data.collate import pad_collate
from posttrain.rl import loop, sft
from posttrain.rl.config import TrainConfig
from posttrain.rl.models import load_causal_lm, load_tokenizer

LOAD_CAUSAL_LM = sft.load_causal_lm  # before any test wraps it


def _sft_config(tmp_path, **overrides):
    kwargs = dict(
        output_dir=str(tmp_path),
        max_steps=1,
        warmup_steps=0,
        per_device_train_batch_size=8,
        save_steps=0,
        disable_tqdm=True,
        report_to="none",
    )
    kwargs.update(overrides)
    return sft.SFTConfig(**kwargs)


def test_bf16_forwards_run_in_bfloat16(tmp_path, monkeypatch):
    dtypes, batches = [], []

    def load_recording(name, seed=0, quantization=None):
        model = LOAD_CAUSAL_LM(name, seed=seed, quantization=quantization)
        # A Linear inside the decoder: under autocast its output is bfloat16, otherwise float32.
        q_proj = model.model.layers[0].self_attn.q_proj
        q_proj.register_forward_hook(lambda m, args, out: dtypes.append((m.training, out.dtype)))
        model.register_forward_pre_hook(
            lambda m, args, kwargs: batches.append(dict(kwargs)) if m.training else None, with_kwargs=True
        )
        return model

    monkeypatch.setattr(sft, "load_causal_lm", load_recording)
    config = _sft_config(tmp_path, bf16=True, per_device_eval_batch_size=64)
    sft.train(config)  # one step, then the final evaluation (eval loss and generation)

    assert {training for training, _ in dtypes} == {True, False}  # both the step and the evaluation
    assert {dtype for _, dtype in dtypes} == {torch.bfloat16}

    # The logged loss is the bf16-autocast loss of that batch under the initial weights, not float32's.
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    logged = next(r["loss"] for r in lines if "loss" in r)
    (inputs,) = batches
    model = load_causal_lm(None, seed=config.seed)
    mask = _completion_mask(inputs)
    batch = {**inputs, "completion_mask": mask}
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16_loss, _ = sft.sft_step_loss(model, batch, mask.sum())
        float32_loss, _ = sft.sft_step_loss(model, batch, mask.sum())
    assert logged == pytest.approx(bf16_loss.item(), rel=1e-6)
    # bf16 moves this loss by ~1.6e-4 relative (measured): 8x the margin below, itself 20x the equality's
    assert logged != pytest.approx(float32_loss.item(), rel=2e-5)


def _completion_mask(inputs) -> torch.Tensor:
    """The embedded task's targets for a padded batch, rebuilt from the tokens: every token after '='."""
    ids = inputs["input_ids"]
    tokenizer = load_tokenizer(None)
    equals = tokenizer.convert_tokens_to_ids("=")
    after = (ids == equals).long().cumsum(-1) - (ids == equals).long()  # 1 strictly after the '='
    return (after > 0).long() * inputs["attention_mask"]


# ---------------------------------------------------------------------------------------------------------
# max_grad_norm
# ---------------------------------------------------------------------------------------------------------

LOSS_SCALE = 1e4  # gradients far above norm 1, so that any clipping to a norm <= 1 would act


def _scaled_sft_loss(model, batch, num_items):
    loss, metrics = sft.sft_step_loss(model, batch, num_items)
    return LOSS_SCALE * loss, metrics


def _first_step(tmp_path, max_grad_norm):
    """(model before, model after one loop step, the batch) with a huge-gradient loss."""
    # adam_epsilon 1e-3: AdamW's first step is g / (|g| + eps), nearly scale-free with a tiny eps; a
    # larger eps makes the update depend on the gradient's scale, hence on clipping.
    config = TrainConfig(
        output_dir=str(tmp_path),
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        max_grad_norm=max_grad_norm,
        adam_epsilon=1e-3,
        weight_decay=0.0,
    )
    run = loop.Run(config=config, command="test", output_dir=tmp_path, device=torch.device("cpu"))
    model = embedded.build_model(seed=0, num_hidden_layers=1)
    before = copy.deepcopy(model)
    tokenizer = load_tokenizer(None)
    rows = []
    for prompt, answer in embedded.problems()[:8]:
        ids = tokenizer(prompt + answer + embedded.EOS_TOKEN)["input_ids"]  # one token per character
        rows.append({"input_ids": ids, "completion_mask": [0] * len(prompt) + [1] * (len(ids) - len(prompt))})
    batch = pad_collate(rows, tokenizer.pad_token_id)
    optimizer = loop.build_optimizer(model, config)
    scheduler = loop.build_scheduler(optimizer, config, total_steps=10)
    out = loop.accumulate(run, model, optimizer, scheduler, [batch], _scaled_sft_loss, sft.count_targets)
    return before, model, batch, out


def _adamw_step_by_hand(model, batch, config_lr=1e-2, eps=1e-3):
    """A plain torch.optim.AdamW step (unfused, no clipping) on the scaled loss's raw gradient."""
    model = copy.deepcopy(model)
    loss, _ = _scaled_sft_loss(model, batch, batch["completion_mask"].sum())
    loss.backward()
    norm = torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()]))
    torch.optim.AdamW(model.parameters(), lr=config_lr, eps=eps, weight_decay=0.0).step()
    return model, norm.item()


def test_max_grad_norm_zero_does_not_clip(tmp_path):
    before, after, batch, out = _first_step(tmp_path / "zero", max_grad_norm=0.0)
    reference, norm = _adamw_step_by_hand(before, batch)
    assert norm > 100  # clipping at any norm <= 1 would shrink this gradient 100-fold or more
    assert out["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for (name, ours), theirs in zip(after.named_parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7, msg=name)

    # The same step clipped at norm 1 moves the weights differently (so the comparison above can fail).
    _, clipped, _, _ = _first_step(tmp_path / "one", max_grad_norm=1.0)
    delta = lambda m: torch.cat(
        [(p - q).flatten() for p, q in zip(m.parameters(), before.parameters(), strict=True)]
    )
    diff = (delta(clipped) - delta(reference)).norm() / delta(reference).norm()
    assert diff > 0.05, diff
