"""The rollout engine (posttrain.rl.rollout) against independent references.

- greedy completions equal transformers' `model.generate(do_sample=False)` token for token (Qwen2, Llama,
  GPT-2; prompts of different lengths, so left padding is in play), with eos, extra stop tokens, the length
  limit and repetition_penalty; mask and `finished` follow from generate's output;
- `process_logits` equals transformers' own logits processors (the spec) on random logits;
- sampling: 20,000 first tokens of one prompt against the exact processed distribution of the model
  (chi-square, fixed seed), for temperature, top-k, top-p and min-p; filtered tokens are never drawn;
- the returned log-probs equal `rl.logprobs.token_logprobs` recomputed on prompt + completion (float32
  noise of cached vs full forward: rtol = atol = 1e-5);
- seeds reproduce, compaction does not change the tokens, each prompt's generations are adjacent;
- bad options and prompts raise a one-line error naming them.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from posttrain.data.embedded import build_model
from posttrain.rl import rollout
from posttrain.rl.logprobs import token_logprobs

PAD, EOS = 0, 2
PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11], [40]]


def make_model(family: str, seed: int = 0, **overrides):
    """A tiny random model, eval mode. initializer_range 0.2: at the default 0.02 the greedy completions of a
    random model repeat one token, which would make the comparisons nearly vacuous."""
    common = dict(vocab_size=128, initializer_range=0.2, bos_token_id=1, eos_token_id=EOS, pad_token_id=PAD)
    common.update(overrides)
    if family == "qwen2":
        return build_model(seed, **common).eval()
    if family == "llama":
        config = AutoConfig.for_model(
            "llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, **common,
        )  # fmt: skip
    else:
        config = AutoConfig.for_model("gpt2", n_embd=64, n_layer=2, n_head=4, n_positions=128, **common)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def left_padded(prompts):
    P = max(len(p) for p in prompts)
    ids = torch.tensor([[PAD] * (P - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def reference(model, prompts, max_new_tokens, **kwargs):
    """generate's completions (B, T'): the new tokens, pad after a row's stop token."""
    ids, mask = left_padded(prompts)
    out = model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, pad_token_id=PAD, **kwargs
    )
    return out[:, ids.shape[1] :]


def expected_mask(completions, stops):
    """1 up to and including the first stop token of each row, and whether the row has one."""
    is_stop = torch.isin(completions, torch.tensor(stops))
    before = is_stop.long().cumsum(-1) - is_stop.long()  # stop tokens strictly before each position
    return (before == 0).long(), is_stop.any(-1)


def ours(model, prompts, **kwargs):
    kwargs = dict(dict(eos_token_id=EOS, pad_token_id=PAD), **kwargs)
    return rollout.generate(model, prompts, **kwargs)


# ---------------------------------------------------------------------------------------------------------
# Greedy against generate
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
@pytest.mark.parametrize("family", ["qwen2", "llama", "gpt2"])
def test_greedy_equals_generate(family, compile):
    model = make_model(family)
    free = reference(model, PROMPTS, 12, do_sample=False, eos_token_id=None)
    assert free.shape == (4, 12)
    # eos: row 0's 4th token, so row 0 stops early and (checked below) not every row does
    eos = int(free[0, 3])
    expected = reference(model, PROMPTS, 12, do_sample=False, eos_token_id=eos)
    got = ours(model, PROMPTS, max_completion_length=12, do_sample=False, eos_token_id=eos, compile=compile)
    mask, finished = expected_mask(expected, [eos])
    assert got.completion_ids.shape == expected.shape == (4, 12)
    assert torch.equal(got.completion_ids, expected)
    assert torch.equal(got.completion_mask, mask)
    assert torch.equal(got.finished, finished)
    assert finished.any() and not finished.all()
    assert int(mask[0].sum()) <= 4

    # extra stop tokens: every row stops by its 3rd token, so the output is narrower than the limit
    stops = sorted({int(free[r, 2]) for r in range(4)})
    expected = reference(model, PROMPTS, 12, do_sample=False, eos_token_id=[EOS, *stops])
    got = ours(
        model, PROMPTS, max_completion_length=12, do_sample=False, stop_token_ids=stops, compile=compile
    )
    mask, finished = expected_mask(expected, [EOS, *stops])
    assert got.completion_ids.shape == expected.shape and expected.shape[1] <= 3
    assert torch.equal(got.completion_ids, expected)
    assert torch.equal(got.completion_mask, mask)
    assert got.finished.all() and finished.all()


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])
def test_greedy_repetition_penalty_equals_generate(family):
    model = make_model(family)
    plain = reference(model, PROMPTS, 16, do_sample=False, eos_token_id=None)
    expected = reference(model, PROMPTS, 16, do_sample=False, eos_token_id=None, repetition_penalty=1.8)
    assert not torch.equal(plain, expected)  # the penalty changes the completions: the comparison bites
    got = ours(
        model, PROMPTS, max_completion_length=16, do_sample=False, eos_token_id=None, repetition_penalty=1.8
    )
    assert torch.equal(got.completion_ids, expected)
    assert got.completion_mask.all() and not got.finished.any()
    # temperature 0 is greedy too
    zero = ours(
        model, PROMPTS, max_completion_length=16, temperature=0.0, eos_token_id=None, repetition_penalty=1.8
    )
    assert torch.equal(zero.completion_ids, expected)


# ---------------------------------------------------------------------------------------------------------
# Logit processing against transformers' processors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "settings",
    [
        dict(temperature=0.7),
        dict(top_k=5),
        dict(top_p=0.6),
        dict(min_p=0.2),
        dict(repetition_penalty=1.3, temperature=1.5, top_k=40, top_p=0.9, min_p=0.05),
    ],
)
def test_process_logits_equals_transformers(settings):
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        MinPLogitsWarper,
        RepetitionPenaltyLogitsProcessor,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=g) * 3
    history = torch.randint(0, 50, (6, 7), generator=g)  # each row's tokens so far
    processors = LogitsProcessorList()  # in generate's order (generation/utils.py, _get_logits_processor)
    if "repetition_penalty" in settings:
        processors.append(RepetitionPenaltyLogitsProcessor(settings["repetition_penalty"]))
    if "temperature" in settings:
        processors.append(TemperatureLogitsWarper(settings["temperature"]))
    if "top_k" in settings:
        processors.append(TopKLogitsWarper(settings["top_k"]))
    if "top_p" in settings:
        processors.append(TopPLogitsWarper(settings["top_p"]))
    if "min_p" in settings:
        processors.append(MinPLogitsWarper(settings["min_p"]))
    expected = processors(history, logits.clone())
    seen = torch.zeros(6, 50, dtype=torch.bool).scatter_(1, history, True)
    got = rollout.process_logits(logits, seen=seen, **settings)
    assert torch.equal(torch.isinf(got), torch.isinf(expected))
    kept = ~torch.isinf(expected)
    torch.testing.assert_close(got[kept], expected[kept], rtol=1e-6, atol=1e-6)
    if any(k in settings for k in ("top_k", "top_p", "min_p")):
        assert torch.isinf(expected).any()  # something was filtered: the comparison bites


# ---------------------------------------------------------------------------------------------------------
# Sampling against the exact distribution
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def peaked_model():
    """Qwen2 with its untied output layer scaled by 1.5: a first-token distribution far from uniform (top
    token ~0.2) that top-p 0.7 and min-p 0.05 still leave several tokens of."""
    model = make_model("qwen2", tie_word_embeddings=False)
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    return model


def exact_first_token(model, prompt, settings) -> torch.Tensor:
    """p(first token) (V,) computed without the engine: full forward, transformers' processors, softmax."""
    from transformers.generation.logits_process import (
        MinPLogitsWarper,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    with torch.no_grad():
        scores = model(torch.tensor([prompt])).logits[:, -1].double()
    for key, warper in [
        ("temperature", TemperatureLogitsWarper),
        ("top_k", TopKLogitsWarper),
        ("top_p", TopPLogitsWarper),
        ("min_p", MinPLogitsWarper),
    ]:
        if key in settings:
            scores = warper(settings[key])(None, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize(
    "settings",
    [dict(), dict(temperature=1.6), dict(temperature=0.8, top_k=8), dict(top_p=0.7), dict(min_p=0.05)],
)
def test_sampling_matches_exact_distribution(peaked_model, settings):
    prompt, n = [5, 6, 7], 20_000
    p = exact_first_token(peaked_model, prompt, settings)
    got = ours(
        peaked_model, [prompt], num_generations=n, max_completion_length=1, eos_token_id=None,
        generator=torch.Generator().manual_seed(0), **settings,
    )  # fmt: skip
    counts = torch.bincount(got.completion_ids[:, 0], minlength=p.numel()).double()
    assert counts[p == 0].sum() == 0  # a filtered token is never drawn
    # Pearson's chi-square over the tokens expected >= 5 times, the rest pooled into one cell
    expected = n * p
    big = expected >= 5
    obs = torch.cat([counts[big], counts[~big].sum()[None]])
    exp = torch.cat([expected[big], expected[~big].sum()[None]])
    obs, exp = obs[exp > 0], exp[exp > 0]
    chi2 = ((obs - exp) ** 2 / exp).sum().item()
    dof = len(exp) - 1
    assert dof >= 3, "the distribution is too peaked for the test to say anything"
    assert chi2 < dof + 5 * (2 * dof) ** 0.5, f"chi2 {chi2:.1f} with {dof} degrees of freedom"
    # and the log-probs are those of the same distribution
    torch.testing.assert_close(got.logps[:, 0].double(), p.log()[got.completion_ids[:, 0]], rtol=0, atol=1e-5)


@pytest.mark.parametrize("two_levels", [True, False])
@pytest.mark.parametrize("V", [7, 128, 1000, 32000])  # under one block, one, several with a ragged end
def test_inverse_cdf_equals_a_float64_cumsum(V, two_levels, monkeypatch):
    """Either search (two levels, or one cumsum) draws the token a float64 cumsum over the whole vocabulary gives
    (u away from a boundary by more than float32 rounding, and u = 0), never one of probability 0 (u just below
    1 too)."""
    monkeypatch.setattr(rollout, "LARGE_VOCAB", 0 if two_levels else 10**9)
    g = torch.Generator().manual_seed(V)
    logits = torch.randn(64, V, generator=g) * 4
    logits[torch.rand(64, V, generator=g) < 0.3] = float("-inf")  # zero-probability tokens inside blocks
    logits[:, 0] = float("-inf")  # and at the start: u = 0 must skip them
    probs = logits.softmax(-1)
    u = torch.rand(64, generator=g)
    u[:2] = torch.tensor([0.0, 1.0 - 2**-24])
    got = rollout.inverse_cdf(probs, u)
    cdf = probs.double().cumsum(-1)
    target = u.double()[:, None] * cdf[:, -1:]
    expected = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp(max=V - 1)
    clear = ((cdf - target).abs().min(-1).values > 1e-5) | (torch.arange(64) == 0)
    assert clear.sum() >= 60
    assert torch.equal(got[clear], expected[clear])
    assert (probs.gather(1, got[:, None]) > 0).all()
    assert got[0] == int((probs[0] > 0).nonzero()[0])  # u = 0: the first token of positive probability
    # u just below 1, many rows: the block sums' rounding can put u past the chosen block's own cumsum
    probs = (torch.randn(1024, V, generator=g) * 4).softmax(-1)
    got = rollout.inverse_cdf(probs, torch.full((1024,), 1 - 2**-24))
    assert (got < V).all() and (probs.gather(1, got[:, None]) > 0).all()


def test_sampling_test_detects_a_wrong_temperature(peaked_model):
    """The chi-square bound above is tight enough to reject sampling at temperature 1 for 1.6."""
    prompt, n = [5, 6, 7], 20_000
    p = exact_first_token(peaked_model, prompt, dict(temperature=1.6))
    got = ours(
        peaked_model,
        [prompt],
        num_generations=n,
        max_completion_length=1,
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(got.completion_ids[:, 0], minlength=p.numel()).double()
    exp = n * p
    chi2 = ((counts - exp) ** 2 / exp)[exp >= 5].sum().item()
    dof = int((exp >= 5).sum())
    assert chi2 > dof + 5 * (2 * dof) ** 0.5


# ---------------------------------------------------------------------------------------------------------
# Log-probs against rl.logprobs
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # token_logprobs' fused path and its logits path
@pytest.mark.parametrize("temperature, do_sample", [(1.0, True), (0.7, True), (0.7, False)])
def test_logps_equal_token_logprobs(family, temperature, do_sample):
    """Greedy reports its tokens' log-probs under the same tempered distribution."""
    model = make_model(family)
    G, L = 3, 10
    got = ours(
        model, PROMPTS, num_generations=G, max_completion_length=L, temperature=temperature, do_sample=do_sample,
        generator=torch.Generator().manual_seed(1), stop_token_ids=list(range(3, 15)),
    )  # fmt: skip
    assert got.finished.any() and not got.finished.all()
    # prompt + completion of each row, right-padded, no left padding: an independent layout
    rows, targets = [], []
    for i in range(len(PROMPTS) * G):
        prompt, n = PROMPTS[i // G], int(got.completion_mask[i].sum())
        rows.append(prompt + got.completion_ids[i, :n].tolist())
        targets.append([0] * len(prompt) + [1] * n)
    T = max(len(r) for r in rows)
    batch = {
        "input_ids": torch.tensor([r + [PAD] * (T - len(r)) for r in rows]),
        "attention_mask": torch.tensor([[1] * len(r) + [0] * (T - len(r)) for r in rows]),
        "completion_mask": torch.tensor([m + [0] * (T - len(m)) for m in targets]),
    }
    with torch.no_grad():
        ref = token_logprobs(model, batch, temperature=temperature).logps
    for i, prompt in enumerate(rows):
        n = int(got.completion_mask[i].sum())
        P = len(prompt) - n
        torch.testing.assert_close(got.logps[i, :n], ref[i, P : P + n], rtol=1e-5, atol=1e-5)
        assert (got.logps[i, n:] == 0).all() and (got.completion_ids[i, n:] == PAD).all()


@pytest.mark.parametrize("family", ["qwen2", "gpt2"])  # GPT-2: learned absolute positions
def test_training_batch_gives_the_sampler_logps(family):
    """`training_batch` (TRL's layout: left-padded prompts, right-padded completions) fed to token_logprobs
    reproduces the sampler's log-probs: positions and masks are right for left padding."""
    model = make_model(family)
    G = 2
    got = ours(
        model, PROMPTS, num_generations=G, max_completion_length=8, stop_token_ids=list(range(3, 15)),
        generator=torch.Generator().manual_seed(2),
    )  # fmt: skip
    batch = rollout.training_batch(PROMPTS, got, num_generations=G, pad_token_id=PAD)
    P = max(len(p) for p in PROMPTS)
    assert batch["input_ids"].shape == (len(PROMPTS) * G, P + got.completion_ids.shape[1])
    with torch.no_grad():
        ref = token_logprobs(model, batch).logps[:, P:]
    mask = got.completion_mask.bool()
    torch.testing.assert_close(ref[mask], got.logps[mask], rtol=1e-5, atol=1e-5)
    assert (ref[~mask] == 0).all()
    with pytest.raises(ValueError, match="training_batch: 4 prompts x num_generations 3 != 8 rollout rows"):
        rollout.training_batch(PROMPTS, got, num_generations=3, pad_token_id=PAD)


# ---------------------------------------------------------------------------------------------------------
# Seeds, compaction, ordering
# ---------------------------------------------------------------------------------------------------------


def test_seed_reproduces_and_compaction_changes_nothing():
    model = make_model("qwen2")

    def run(seed, sync_every):
        return ours(
            model, PROMPTS, num_generations=4, max_completion_length=12, top_k=20, stop_token_ids=[7, 11, 61],
            generator=torch.Generator().manual_seed(seed), sync_every=sync_every,
        )  # fmt: skip

    a, b = run(0, 1), run(0, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    # sync_every 1 compacts as soon as a row stops; 1000 never compacts: same tokens and log-probs
    c = run(0, 1000)
    assert torch.equal(a.completion_ids, c.completion_ids) and torch.equal(
        a.completion_mask, c.completion_mask
    )
    torch.testing.assert_close(a.logps, c.logps, rtol=0, atol=1e-5)
    assert a.finished.any() and not a.finished.all()  # rows stopped at different steps: compaction happened
    assert not torch.equal(a.completion_ids, run(1, 1).completion_ids)


@pytest.mark.slow
def test_compiled_step_equals_eager_and_compiles_once():
    """compile=True draws the eager step's tokens (log-probs to float32 noise: inductor reorders sums), with
    rows leaving the batch at many steps, and compiles one graph for every batch size >= 2 (the batch dim
    is dynamic; a batch of one row specialises, as dynamo does for any size-1 dim)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # graphs compiled by earlier tests would hide this test's compilations
    model = make_model("qwen2")
    kwargs = dict(
        num_generations=4, max_completion_length=12, top_k=20, stop_token_ids=[7, 11, 61], sync_every=1
    )
    eager = ours(model, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    before = counters["stats"]["unique_graphs"]
    compiled = ours(model, PROMPTS, generator=torch.Generator().manual_seed(0), compile=True, **kwargs)
    graphs = counters["stats"]["unique_graphs"] - before
    assert torch.equal(compiled.completion_ids, eager.completion_ids)
    assert torch.equal(compiled.completion_mask, eager.completion_mask)
    # the compiled step is the model's forward, the eager one rl/decode.py's: float32 rounding apart
    torch.testing.assert_close(compiled.logps, eager.logps, rtol=1e-5, atol=1e-5)
    # the batch before step k + 1: rows not stopped within their first k tokens (sync_every 1)
    lengths = compiled.completion_mask.sum(-1)
    sizes = {int(((lengths > k) | ~compiled.finished).sum()) for k in range(1, 12)} - {0}
    assert len(sizes - {1}) >= 3  # the batch shrank at several steps
    assert graphs == 1 + (1 in sizes)


def test_finished_rows_leave_the_batch():
    """With sync_every 1 each decode step runs exactly the rows that have not stopped yet."""
    model = make_model("qwen2")
    batch_sizes = []
    # the embedding sees every forward's tokens: the model's own (prefill) and the decode step's (rl/decode.py)
    handle = model.model.embed_tokens.register_forward_pre_hook(
        lambda module, args: batch_sizes.append(args[0].shape)
    )
    try:
        got = ours(
            model, PROMPTS, num_generations=4, max_completion_length=12, stop_token_ids=list(range(3, 15)),
            generator=torch.Generator().manual_seed(0), sync_every=1,
        )  # fmt: skip
    finally:
        handle.remove()
    lengths = got.completion_mask.sum(-1)
    assert batch_sizes[0] == (len(PROMPTS), max(len(p) for p in PROMPTS))  # prefill: once per prompt
    decode = [shape[0] for shape in batch_sizes[1:]]
    # before token k + 1 (k = 1, 2, ...) the rows that have not stopped within their first k tokens
    expected = [int(((lengths > k) | ~got.finished).sum()) for k in range(1, len(decode) + 1)]
    assert decode == expected
    assert decode[-1] < len(PROMPTS) * 4  # rows did leave


def test_generations_of_a_prompt_are_adjacent():
    model = make_model("llama")
    G = 3
    single = ours(model, PROMPTS, max_completion_length=8, do_sample=False)
    grouped = ours(model, PROMPTS, num_generations=G, max_completion_length=8, do_sample=False)
    assert torch.equal(grouped.completion_ids, single.completion_ids.repeat_interleave(G, 0))
    assert torch.equal(grouped.completion_mask, single.completion_mask.repeat_interleave(G, 0))
    # sampled: row i belongs to prompt i // G (its log-probs are checked against that prompt above); the
    # generations of one prompt differ from each other
    sampled = ours(
        model, PROMPTS, num_generations=G, max_completion_length=8, generator=torch.Generator().manual_seed(0)
    )
    assert sampled.completion_ids.shape[0] == len(PROMPTS) * G
    assert not torch.equal(sampled.completion_ids[0], sampled.completion_ids[1])


needs_onednn = pytest.mark.skipif(
    not rollout.onednn_available(torch.zeros(1)), reason="torch built without oneDNN (mkldnn) on the CPU"
)


def _own_forwards(model) -> list[str]:
    return [name for name, m in model.named_modules() if "forward" in m.__dict__]


@needs_onednn
def test_onednn_linears_take_the_large_plain_linears_and_give_their_products(monkeypatch):
    """Inside `onednn_linears` the MLP's (384, 128) weights, at the threshold, go through oneDNN; the smaller
    attention weights and a hooked projection stay nn.Linear; the forward's logits match nn.Linear's to float32
    rounding; on exit every module is as it was."""
    monkeypatch.setattr(rollout, "ONEDNN_MIN_ELEMENTS", 384 * 128)
    model = make_model("qwen2")
    model.model.layers[2].mlp.down_proj.register_forward_hook(lambda *args: None)
    ids, mask = left_padded([[5, 6, 7], [8, 9, 10, 11]])
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        with rollout.onednn_linears(model):
            taken = _own_forwards(model)
            got = model(input_ids=ids, attention_mask=mask).logits
    mlps = [f"model.layers.{i}.mlp.{p}" for i in range(3) for p in ("gate_proj", "up_proj", "down_proj")]
    assert taken == mlps[:-1]
    assert _own_forwards(model) == []
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    monkeypatch.setattr(rollout, "ONEDNN", False)
    with rollout.onednn_linears(model):
        assert _own_forwards(model) == []
    monkeypatch.setattr(rollout, "ONEDNN", True)
    with rollout.onednn_linears(model.to(torch.bfloat16)):
        assert _own_forwards(model) == []  # float32 only


@needs_onednn
@pytest.mark.parametrize("do_sample", [False, True])
def test_generate_through_onednn_gives_nn_linears_tokens(do_sample, monkeypatch):
    """Every linear map of a Llama with biases through oneDNN (threshold 0), in the prefill and in rl/decode.py's
    step, the output layer included (oneDNN takes it before the vocab-major layout would): the same tokens as
    through nn.Linear, log-probs to float32 rounding."""
    monkeypatch.setattr(rollout, "ONEDNN_MIN_ELEMENTS", 0)
    monkeypatch.setattr(rollout, "LARGE_VOCAB", 0)  # vocab-major would take the head if oneDNN had not
    model = make_model("llama", attention_bias=True, mlp_bias=True)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):  # transformers initialises them to 0, which would hide a dropped one
                p.normal_(0.0, 0.2)
    calls = []
    make_forward = rollout._onednn_forward

    def counted(linear):
        forward = make_forward(linear)
        return lambda x: calls.append(1) or forward(x)

    monkeypatch.setattr(rollout, "_onednn_forward", counted)
    prompts = [[5, 6, 7, 8, 9], [10, 11], [3, 4, 5, 6, 7, 8, 9, 10, 11]]
    kwargs = dict(num_generations=2, max_completion_length=8, eos_token_id=EOS, pad_token_id=PAD)
    kwargs |= dict(do_sample=do_sample, top_k=20)
    ours = rollout.generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(calls) == 15 * 8  # 2 layers x 7 maps + the head, in the prefill and 7 decode steps
    monkeypatch.setattr(rollout, "ONEDNN", False)
    monkeypatch.setattr(rollout, "LARGE_VOCAB", 16384)  # the reference's head: plain nn.Linear
    theirs = rollout.generate(model, prompts, generator=torch.Generator().manual_seed(0), **kwargs)
    assert len(calls) == 15 * 8
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    torch.testing.assert_close(ours.logps, theirs.logps, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_onednn_linears_step_aside_where_nn_linear_must_run(monkeypatch):
    """Not under CPU autocast (nn.Linear computes in bfloat16 there), not for a model compiled in place, not when
    oneDNN is switched off; a non-float32 input falls back to nn.Linear's product; a reorder failing half-way
    leaves no module patched (a forward left behind would train on a stale copy)."""
    monkeypatch.setattr(rollout, "ONEDNN_MIN_ELEMENTS", 0)
    model = make_model("qwen2")
    with torch.autocast("cpu", dtype=torch.bfloat16), rollout.onednn_linears(model):
        assert _own_forwards(model) == []
    with torch.backends.mkldnn.flags(enabled=False), rollout.onednn_linears(model):
        assert _own_forwards(model) == []
    up = model.model.layers[0].mlp.up_proj
    x = torch.randn(3, up.in_features, dtype=torch.bfloat16)
    # autocast entered inside the patched rollout
    with rollout.onednn_linears(model), torch.autocast("cpu", dtype=torch.bfloat16):
        assert "forward" in up.__dict__
        assert torch.equal(up(x), torch.nn.functional.linear(x, up.weight))
    made = []
    make_forward = rollout._onednn_forward

    def failing(linear):
        if made:
            raise RuntimeError("reorder failed")
        made.append(linear)
        return make_forward(linear)

    monkeypatch.setattr(rollout, "_onednn_forward", failing)
    with pytest.raises(RuntimeError, match="reorder failed"), rollout.onednn_linears(model):
        pass
    assert len(made) == 1 and _own_forwards(model) == []
    monkeypatch.setattr(rollout, "_onednn_forward", make_forward)
    model.compile()
    with rollout.onednn_linears(model):
        assert _own_forwards(model) == []


@needs_onednn
def test_generate_under_autocast_and_after_a_weight_change_matches_nn_linear(monkeypatch):
    """Under bfloat16 autocast `generate` gives nn.Linear's tokens; after an in-place change of the weights (an
    optimizer step) the next rollout reorders them again."""
    monkeypatch.setattr(rollout, "ONEDNN_MIN_ELEMENTS", 0)
    model = make_model("llama")
    prompts = [[5, 6, 7, 8], [9, 10]]
    kwargs = dict(max_completion_length=6, eos_token_id=EOS, pad_token_id=PAD, do_sample=False)

    def both():
        monkeypatch.setattr(rollout, "ONEDNN", True)
        ours = rollout.generate(model, prompts, **kwargs)
        monkeypatch.setattr(rollout, "ONEDNN", False)
        return ours, rollout.generate(model, prompts, **kwargs)

    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = both()
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    before, _ = both()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours, theirs = both()
    assert torch.equal(ours.completion_ids, theirs.completion_ids)
    assert not torch.equal(ours.completion_ids, before.completion_ids)  # the change did move the tokens


def test_the_cache_goes_by_the_name_the_forward_takes():
    """transformers renamed the forward's `past_key_values` to `cache` in 5.x; a release that takes the old name
    drops an unknown `cache=` into **kwargs without a word, and the rollout would run with an empty cache."""
    import inspect

    from transformers import LlamaForCausalLM

    class Old(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, past_key_values=None, use_cache=None): ...

    class New(torch.nn.Module):
        def forward(self, input_ids, attention_mask=None, cache=None, use_cache=None): ...

    class Wrapper(torch.nn.Module):  # peft's way: everything through **kwargs
        def forward(self, input_ids, **kwargs): ...

    class WrapperOf(Wrapper):
        def __init__(self, base):
            super().__init__()
            self.base = base

        def get_base_model(self):
            return self.base

    sentinel = object()
    assert rollout.cache_kwarg(Old(), sentinel) == {"past_key_values": sentinel}
    assert rollout.cache_kwarg(New(), sentinel) == {"cache": sentinel}
    installed = (
        "cache" if "cache" in inspect.signature(LlamaForCausalLM.forward).parameters else "past_key_values"
    )
    assert rollout.cache_kwarg(Wrapper(), sentinel) == {installed: sentinel}
    assert rollout.cache_kwarg(WrapperOf(Old()), sentinel) == {"past_key_values": sentinel}
    assert rollout.cache_kwarg(WrapperOf(New()), sentinel) == {"cache": sentinel}


@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_model_without_logits_to_keep(name):
    """A forward that takes no `logits_to_keep` gets the full prompt logits, and the same completions; one that
    takes only `past_key_values` (transformers up to 5.17) would raise on `cache=`: it gets the cache under its
    own name in the prefill and in every decode step."""
    from transformers import Qwen2ForCausalLM

    def forward(model, input_ids, attention_mask, position_ids, cache, use_cache):
        cache = {rollout._cache_name(Qwen2ForCausalLM): cache}  # the installed transformers' name
        return Qwen2ForCausalLM.forward(
            model, input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **cache,
            use_cache=use_cache,
        )  # fmt: skip

    class New(Qwen2ForCausalLM):
        def forward(self, input_ids, attention_mask=None, position_ids=None, cache=None, use_cache=None):
            return forward(self, input_ids, attention_mask, position_ids, cache, use_cache)

    class Old(Qwen2ForCausalLM):
        def forward(
            self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=None
        ):
            return forward(self, input_ids, attention_mask, position_ids, past_key_values, use_cache)

    Plain = New if name == "cache" else Old
    model = make_model("qwen2")
    plain = Plain(model.config).eval()
    plain.load_state_dict(model.state_dict())
    kwargs = dict(num_generations=2, max_completion_length=8, generator=torch.Generator().manual_seed(0))
    a = ours(model, PROMPTS, **kwargs)
    kwargs["generator"] = torch.Generator().manual_seed(0)
    b = ours(plain, PROMPTS, **kwargs)
    assert torch.equal(a.completion_ids, b.completion_ids)
    torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)


def test_model_without_static_cache():
    """A model transformers cannot give a static cache decodes on a dynamic one, to the same completions; it
    cannot be compiled, and says so."""
    from transformers import Qwen2ForCausalLM

    class Dynamic(Qwen2ForCausalLM):
        _can_compile_fullgraph = False

    model = make_model("qwen2")
    dynamic = Dynamic(model.config).eval()
    dynamic.load_state_dict(model.state_dict())
    kwargs = dict(num_generations=3, max_completion_length=10, stop_token_ids=[7, 11, 61], sync_every=1)
    a = ours(model, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    b = ours(dynamic, PROMPTS, generator=torch.Generator().manual_seed(0), **kwargs)
    assert a.finished.any() and not a.finished.all()  # rows left the batch: both caches were compacted
    assert all(torch.equal(x, y) for x, y in zip(a[:2] + a[3:], b[:2] + b[3:], strict=True))
    # the static side decodes with rl/decode.py's step, the dynamic one with the model's forward
    torch.testing.assert_close(a.logps, b.logps, rtol=1e-5, atol=1e-5)
    with pytest.raises(
        ValueError, match="compile=True needs a model whose cache transformers can preallocate"
    ):
        ours(dynamic, PROMPTS, max_completion_length=4, compile=True)


def test_vocab_major_output_layer_gives_the_same_logits(monkeypatch):
    """The output layer as (W @ h^T)^T gives the model's own logits (bias included; one position per row or
    several; at most VOCAB_MAJOR_MAX_ROWS rows, nn.Linear's own call above), is what generate's forwards use,
    and is undone afterwards, also after an error; an output layer that is not a plain nn.Linear, or has fewer
    than LARGE_VOCAB outputs, is left alone."""
    model = make_model("llama")
    torch.manual_seed(1)
    model.lm_head = torch.nn.Linear(64, 128, bias=True)  # untied, with a bias
    with rollout.vocab_major_output_layer(model):  # 128 tokens: a small vocabulary is left alone
        assert "forward" not in model.lm_head.__dict__
    monkeypatch.setattr(rollout, "LARGE_VOCAB", 128)
    ids, mask = left_padded(PROMPTS)
    assert rollout.VOCAB_MAJOR_MAX_ROWS == 8  # the shapes below straddle it
    addmm, vocab_major = torch.addmm, []  # the (V, H) @ (H, n) calls: their n

    def spy(bias, weight, hidden, *args, **kwargs):
        vocab_major.append(hidden.shape[1])
        return addmm(bias, weight, hidden, *args, **kwargs)

    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits  # (4, 9, 128)
        monkeypatch.setattr(torch, "addmm", spy)
        with rollout.vocab_major_output_layer(model):
            assert "forward" in model.lm_head.__dict__
            whole = model(input_ids=ids, attention_mask=mask).logits  # 36 rows: nn.Linear's own call
            last = model(input_ids=ids, attention_mask=mask, logits_to_keep=1).logits  # 4 rows
            two = model(input_ids=ids[:2], attention_mask=mask[:2], logits_to_keep=4).logits  # 2 x 4 rows
    assert "forward" not in model.lm_head.__dict__
    torch.testing.assert_close(whole, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(last, expected[:, -1:], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, expected[:2, -4:], rtol=1e-5, atol=1e-5)
    assert vocab_major == [4, 8] and two.shape == (2, 4, 128)  # the 36-row call took nn.Linear's
    assert last.is_contiguous()  # rows of V: a softmax over the transposed product's rows is ~4x slower
    monkeypatch.setattr(torch, "addmm", addmm)

    seen = []
    model.lm_head.register_forward_pre_hook(lambda module, args: seen.append("forward" in module.__dict__))
    ours(model, PROMPTS, max_completion_length=3, eos_token_id=None)
    assert seen == [True] * 3  # the prefill and two decode steps

    with pytest.raises(RuntimeError, match="inside"), rollout.vocab_major_output_layer(model):
        raise RuntimeError("inside")
    assert "forward" not in model.lm_head.__dict__

    # nested, or a forward already replaced on the instance (accelerate's hooks do): left as it is
    with rollout.vocab_major_output_layer(model):
        outer = model.lm_head.forward
        with rollout.vocab_major_output_layer(model):
            assert model.lm_head.forward is outer
        assert model.lm_head.forward is outer
    assert "forward" not in model.lm_head.__dict__
    own = model.lm_head.forward
    model.lm_head.forward = own
    with rollout.vocab_major_output_layer(model):
        assert model.lm_head.forward is own
    assert model.lm_head.__dict__["forward"] is own
    del model.lm_head.forward

    class Scaled(torch.nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    model.lm_head = Scaled(64, 128)
    with rollout.vocab_major_output_layer(model):
        assert "forward" not in model.lm_head.__dict__


def test_training_flag_restored():
    model = make_model("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    expected = reference(model.eval(), PROMPTS, 6, do_sample=False, eos_token_id=None)
    model.train()
    got = ours(model, PROMPTS, max_completion_length=6, do_sample=False, eos_token_id=None)
    assert model.training
    assert torch.equal(got.completion_ids, expected)  # dropout was off during the rollout


# ---------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompts, kwargs, message",
    [
        ([], {}, "prompt_ids is empty"),
        ([[5], []], {}, "prompt_ids row 1 is empty"),
        ([[5], [4, 200]], {}, r"prompt_ids row 1: token id 200 outside the model's vocabulary \[0, 128\)"),
        (
            [[5], [3] * 250],
            {"max_completion_length": 10},
            r"prompt_ids row 1: 250 prompt tokens \+ max_completion_length 10 exceed the model's context of 256",
        ),
        ([[5]], {"num_generations": 0}, "num_generations must be an integer >= 1"),
        ([[5]], {"max_completion_length": 0}, "max_completion_length must be an integer >= 1"),
        ([[5]], {"temperature": -1.0}, "temperature must be >= 0"),
        ([[5]], {"top_k": -1}, "top_k must be >= 0"),
        ([[5]], {"top_p": 0.0}, r"top_p must be in \(0, 1\]"),
        ([[5]], {"min_p": 1.5}, r"min_p must be in \[0, 1\]"),
        ([[5]], {"repetition_penalty": 0.0}, "repetition_penalty must be > 0"),
        ([[5]], {"sync_every": 0}, "sync_every must be an integer >= 1"),
    ],
)
def test_bad_input(prompts, kwargs, message):
    model = make_model("qwen2")
    kwargs = dict(dict(max_completion_length=4), **kwargs)
    with pytest.raises(ValueError, match=message):
        ours(model, prompts, **kwargs)
