"""rl.logprobs' shared-prefix forward: rows that begin with the same prompt run it once.

Checked against the plain forward (every row whole: share_prompts false, the default) on the same model and
batch, float32: per-token log-probs and entropies, and every parameter's gradient of a loss that weighs each
token differently (relative error <= 1e-5), on the online loops' layout (left-padded prompts of different
lengths, G right-padded completions of different lengths each) and DPO's (right-padded rows, chosen and
rejected after the same prompt), for Qwen2, Llama, Qwen3 (per-head q / k norms) and Gemma (embeddings scaled in
the forward; the shared forward looks up both calls' embeddings at once), through LoRA, with the decoder compiled
(torch_compile), in eval mode without gradients, and under DDP (two processes: the prefix's forward runs outside
the wrapper). Where it does not apply, `shared_prefix` says None and the plain forward runs.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch

from posttrain.data import embedded
from posttrain.rl import logprobs as lp
from posttrain.rl import rollout

HERE = os.path.dirname(os.path.abspath(__file__))
V = 128


def tiny(family: str = "qwen2", seed: int = 0):
    from transformers import AutoModelForCausalLM, GemmaConfig, LlamaConfig, Qwen3Config

    kwargs = dict(
        vocab_size=V,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        pad_token_id=0,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        if family == "qwen2":
            return embedded.build_model(seed=seed, **kwargs)
        configs = {"llama": LlamaConfig, "qwen3": Qwen3Config, "gemma": GemmaConfig}
        config = configs[family](head_dim=8, **kwargs)
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def online_batch(prompt_lengths=(5, 9), G: int = 3, seed: int = 0) -> dict:
    """rollout.training_batch's layout: each prompt (lengths differ: left pads) with G completions of
    different lengths (right pads), one of them the longest possible."""
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(1, V, (n,), generator=g).tolist() for n in prompt_lengths]
    N, L = len(prompts) * G, 6
    lengths = torch.randint(1, L + 1, (N,), generator=g)
    lengths[0] = L
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    ids = torch.randint(1, V, (N, L), generator=g) * mask
    ro = rollout.Rollout(ids, mask, torch.zeros(N, L), lengths < L)
    return rollout.training_batch(prompts, ro, num_generations=G, pad_token_id=0)


def dpo_batch(seed: int = 0) -> dict:
    """Right-padded rows prompt + chosen, prompt + rejected per pair; the pairs' prompts differ in length."""
    g = torch.Generator().manual_seed(seed)
    rows, starts = [], []
    for prompt_length in (4, 7):
        prompt = torch.randint(1, V, (prompt_length,), generator=g).tolist()
        for answer_length in (3, 5):
            rows.append(prompt + torch.randint(1, V, (answer_length,), generator=g).tolist())
            starts.append(prompt_length)
    T = max(map(len, rows))
    batch = {k: torch.zeros(len(rows), T, dtype=torch.long) for k in ("input_ids", "attention_mask")}
    batch["completion_mask"] = torch.zeros(len(rows), T, dtype=torch.long)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        batch["input_ids"][b, : len(row)] = torch.tensor(row)
        batch["attention_mask"][b, : len(row)] = 1
        batch["completion_mask"][b, start : len(row)] = 1
    return batch


def outputs(model, batch, shared: bool, monkeypatch):
    """(logps, entropy, {name: grad}) of the weighted loss, by the shared-prefix (share_prompts) or the plain
    forward."""
    calls = []
    real = lp._shared_prefix_hidden

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    with monkeypatch.context() as m:
        m.setattr(lp, "_shared_prefix_hidden", spy)
        model.zero_grad(set_to_none=True)
        out = lp.token_logprobs(model, batch, temperature=0.7, return_entropy=True, share_prompts=shared)
        weights = torch.linspace(-1.0, 2.0, out.logps.numel()).view_as(out.logps)
        ((out.logps * weights).sum() + 0.3 * out.entropy.sum()).backward()
    assert len(calls) == int(shared)
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logps.detach(), out.entropy.detach(), grads


def assert_same(model, batch, monkeypatch, plain_model=None):
    shared = outputs(model, batch, True, monkeypatch)
    plain = outputs(model if plain_model is None else plain_model, batch, False, monkeypatch)
    for a, b in zip(shared[:2], plain[:2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert shared[2].keys() == plain[2].keys() and plain[2]
    for name, grad in plain[2].items():
        error = (shared[2][name] - grad).norm() / grad.norm().clamp(min=1e-12)
        assert error <= 1e-5, (name, float(error))


@pytest.mark.parametrize("family", ["qwen2", "llama", "qwen3", "gemma"])
def test_online_layout_equals_plain_forward(family, monkeypatch):
    model = tiny(family)
    batch = online_batch()
    shared = lp.shared_prefix(model, batch, batch["completion_mask"])
    assert shared.P == 9  # every prompt column: the longest prompt's
    groups = shared.inverse.tolist()  # each prompt's G rows share one prefix
    assert groups[0:3] == [groups[0]] * 3 and groups[3:6] == [groups[3]] * 3 and groups[0] != groups[3]
    assert shared.first[shared.inverse].tolist() == [0, 0, 0, 3, 3, 3]
    assert_same(model, batch, monkeypatch)


def test_rows_in_any_order_and_a_fully_masked_row(monkeypatch):
    """A shuffled micro-batch (groups interleaved) and a row whose completion is masked out entirely
    (mask_truncated_completions)."""
    batch = online_batch(prompt_lengths=(3, 8, 5), G=2, seed=1)
    order = torch.tensor([3, 0, 5, 1, 4, 2])
    batch = {k: v[order] for k, v in batch.items()}
    batch["completion_mask"][2] = 0
    assert len(lp.shared_prefix(tiny(), batch, batch["completion_mask"]).first) == 3
    assert_same(tiny(), batch, monkeypatch)


def test_same_prompt_ids_under_other_pads_are_not_shared(monkeypatch):
    """A prompt that begins with the pad id's token, [0, 5, 6], and a shorter one left-padded to the same ids,
    [pad, 5, 6], differ only in their attention mask (here without position_ids): two prefixes, not one."""
    G, L = 2, 4
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, V, (2 * G, L), generator=g)
    ro = rollout.Rollout(
        ids, torch.ones_like(ids), torch.zeros(2 * G, L), torch.zeros(2 * G, dtype=torch.bool)
    )
    batch = rollout.training_batch([[0, 5, 6], [5, 6]], ro, num_generations=G, pad_token_id=0)
    del batch["position_ids"]
    assert batch["input_ids"][0, :3].tolist() == batch["input_ids"][G, :3].tolist()
    assert len(lp.shared_prefix(tiny(), batch, batch["completion_mask"]).first) == 2
    assert_same(tiny(), batch, monkeypatch)


def test_dpo_layout_equals_plain_forward(monkeypatch):
    """The prefix ends at the shortest prompt (4 columns): the longer prompt's pair shares those 4 columns
    too, and its other 3 prompt tokens run with the answers."""
    batch = dpo_batch()
    shared = lp.shared_prefix(tiny(), batch, batch["completion_mask"])
    assert shared.P == 4 and len(shared.first) == 2
    assert_same(tiny(), batch, monkeypatch)


def test_lora_equals_plain_forward(monkeypatch):
    from posttrain.rl import lora
    from posttrain.rl.config import TrainConfig

    model = lora.wrap(
        tiny(), TrainConfig(output_dir="unused", use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0)
    )
    with torch.no_grad():  # B starts at zero: random, so that every adapter weight has a gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.1)
    assert_same(model, online_batch(), monkeypatch)


@pytest.mark.parametrize("saved", [None, ["embed_tokens"]], ids=["adapters", "trained-embedding-copy"])
def test_lora_reference_shares_prompts_with_its_adapters_off(saved, monkeypatch):
    """The policy with its adapters disabled (`lora.AdapterDisabled`, the reference under use_peft) runs a
    shared prompt once too, and what it gives is the base model's, not the adapted policy's: also where the
    embedding is a module peft trains a copy of (modules_to_save), which only the disabled call looks past."""
    from posttrain.rl import lora
    from posttrain.rl.config import TrainConfig

    base = tiny()
    options = dict(use_peft=True, lora_r=4, lora_alpha=8, lora_dropout=0.0, lora_modules_to_save=saved)
    policy = lora.wrap(copy.deepcopy(base), TrainConfig(output_dir="unused", **options))
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name or "modules_to_save" in name:
                p.normal_(std=0.1)
    reference, batch = lora.AdapterDisabled(policy), online_batch()
    calls = []
    real = lp._shared_prefix_hidden
    monkeypatch.setattr(lp, "_shared_prefix_hidden", lambda *a: calls.append(1) or real(*a))
    with torch.no_grad():
        shared = lp.token_logprobs(reference, batch, share_prompts=True).logps
        assert calls == [1]
        plain = lp.token_logprobs(base, batch).logps
        adapted = lp.token_logprobs(policy, batch).logps
    torch.testing.assert_close(shared, plain, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(adapted, plain, rtol=1e-3, atol=1e-4)  # the adapters do change the policy


def test_no_grad_eval_equals_plain_forward():
    model = tiny().eval()
    batch = online_batch()
    with torch.no_grad():
        shared = lp.token_logprobs(model, batch, return_entropy=True, share_prompts=True)
        plain = lp.token_logprobs(model, batch, return_entropy=True)
    torch.testing.assert_close(shared.logps, plain.logps, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(shared.entropy, plain.entropy, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_compiled_decoder_equals_plain_eager_forward(monkeypatch):
    """torch_compile's decoder (compiled in place) takes the split: the prefix and the rest calls compile a
    graph each (another batch shape compiles them once more with the sizes dynamic: ~2x this test's time cold,
    left to torch's own tests)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = tiny()
    eager = copy.deepcopy(model)
    model.get_decoder().compile()
    batch = online_batch()
    assert lp.shared_prefix(model, batch, batch["completion_mask"]) is not None
    assert_same(model, batch, monkeypatch, plain_model=eager)
    assert counters["stats"]["unique_graphs"] == 2


def test_where_it_does_not_apply():
    from transformers import AutoModelForCausalLM, Gemma2Config, LlamaConfig, Qwen2MoeConfig

    model, batch = tiny(), online_batch()
    mask = batch["completion_mask"]
    assert lp.shared_prefix(model, {k: v for k, v in batch.items() if k != "attention_mask"}, mask) is None
    distinct = online_batch(prompt_lengths=(5, 9), G=1)  # no prompt twice
    assert lp.shared_prefix(model, distinct, distinct["completion_mask"]) is None
    at_start = mask.clone()
    at_start[:, 1] = 1  # a target at column 1: no prefix before it
    assert lp.shared_prefix(model, batch, at_start) is None
    assert lp.shared_prefix(model, batch, torch.zeros_like(mask)) is None  # no target at all
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert lp.shared_prefix(model, batch, mask) is None  # transformers drops the cache under checkpointing
    gemma2 = Gemma2Config(  # sliding-window layers keep only their window in a cache
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, pad_token_id=0,
    )  # fmt: skip
    assert lp.shared_prefix(AutoModelForCausalLM.from_config(gemma2), batch, mask) is None
    small = dict(
        vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2
    )
    dynamic = LlamaConfig(rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}, **small)
    assert lp.shared_prefix(AutoModelForCausalLM.from_config(dynamic), batch, mask) is None  # angles per call
    moe = Qwen2MoeConfig(output_router_logits=True, **small)  # its router loss reads the (B, T) mask
    assert lp.shared_prefix(AutoModelForCausalLM.from_config(moe), batch, mask) is None
    moe.output_router_logits = False
    assert lp.shared_prefix(AutoModelForCausalLM.from_config(moe), batch, mask) is not None


def test_ddp_gradients_equal_plain_forward(tmp_path):
    """Two processes under DDP, each a different half of the batch's groups, by the shared-prefix forward:
    the averaged gradients equal one process's plain forward of the whole batch (halved loss per rank)."""
    out = tmp_path / "grads.pt"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
             os.path.join(HERE, "_shared_prefix_ddp_worker.py"), str(out)],
            env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out: {e.stderr}") from e
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = torch.load(out)
    model = tiny()
    batch = online_batch(prompt_lengths=(5, 9, 4, 7), G=3)
    (lp.token_logprobs(model, batch).logps.sum() / 2).backward()
    for name, p in model.named_parameters():
        error = (ddp[name] - p.grad).norm() / p.grad.norm().clamp(min=1e-12)
        assert error <= 1e-5, (name, float(error))
