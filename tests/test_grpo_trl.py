"""Our GRPO and RLOO steps against TRL 1.16's GRPOTrainer and RLOOTrainer: same tiny models, same prompts,
same completions, same rewards, float32.

TRL side (`_trl_drivers.trl_online_step`): the trainer's generation step returns fixed completions, so its
`_generate_and_score_completions` (prompt tokenization and left padding, masks, old and reference
log-probs, rewards, advantages, generation metrics) and `compute_loss` run on them, over one optimizer step
of 1 or 2 micro-batches in row order. With num_iterations 2 the step is the second iteration's: after an
update of the policy (the same weights on both sides), against the old log-probs of the generation batch.
Our side: the loop's pieces (`algorithm()`: prepare_batch, units, the step loss; `grpo.split_batch`) on
TRL's prompt ids, the same completions as a `rollout.Rollout` and the same rewards (NaN for None).

Compared, relative error <= 1e-5: the step's loss and every parameter's gradient, the advantages, the old
and reference log-probs, and every metric both sides log (those the issue names must be among ours).

1. GRPO_CASES: every loss_type at the token level (on-policy for two), the sequence level, and options
   added to a base case (beta, bias correction, reward scaling and aggregation, masks, entropy terms,
   off-policy mask, delta, clip ranges, loss hyperparameters, temperature, rows no reward function
   scores: one, and all but one of a group); 2 micro-batches for the loss types whose normaliser spans
   the step. RLOO_CASES likewise.
2. Our prompt tokenization (standard and conversational) gives TRL's ids and its step.
3. GPT-2 (absolute positions, the logits path) and Gemma 2 (soft-capping) give TRL's steps; GPT-2 on prompts
   of equal length, since TRL scores left-padded GPT-2 rows at shifted positions: ours score each row as
   if alone, checked against the row run unpadded.
4. The loops: 4 steps of GRPOTrainer.train / RLOOTrainer.train and grpo.train / rloo.train from the same
   weights, both generation steps returning the same completions, the prompts in dataset order and the
   generation batches unshuffled on both sides; generation batches of 2 optimizer steps (old log-probs,
   dapo's spread normaliser), also as 2 micro-batches per step used twice (num_iterations 2, the loop's
   micro-batch marks, the entropy bonus): every logged number each step within 1e-5, and the logged
   completions (completions.jsonl against TRL's completions table).

The batch: 4 prompts of 4 to 6 characters (left padding), 3 completions each (N = 12) that end in eos
after 0 to 2 characters or are truncated at max_completion_length 5; two reward functions weighted 1 and
0.5, the second returning None on two rows; one group with equal rewards (zero std). The policy is 3 SFT
steps away from the reference (per-token KL ~1); the update between iterations is one AdamW step at lr 1e-3
(per-token ratios 0.7 to 1.4), so that both clip bounds, delta and the off-policy mask act on some tokens.
A case that adds an option to a base case also checks that the option changes TRL's gradients, so that no
case passes vacuously.
"""

import copy
import math

import pytest
import torch
from _optional import import_or_skip
from _trl_drivers import (
    TRL_TRAIN,
    assert_same_step,
    family_config,
    logged,
    rel_err,
    trained_policy_and_reference,
    trl_online_step,
    write_jsonl,
)
from datasets import Dataset

from posttrain.data import embedded
from posttrain.data.tokenization import tokenize_prompts
from posttrain.rl import grpo, loop, rloo, rollout
from posttrain.rl.models import load_tokenizer

trl = import_or_skip("trl")  # a failure under CI, where trl is installed

RTOL = 1e-5
LOSS_SCALE = 0.1  # see assert_same_loss_and_grads
MAX_COMPLETION_LENGTH = 5
PROMPTS = ["1+2=", "13+27=", "5+5=", "17+8="]
EQUAL_LENGTH_PROMPTS = ["1+2=", "5+5=", "7+8=", "3+4="]  # no left padding (GPT-2, see its tests)
NONE = float("nan")  # a reward function's None
# (completion text, ends in eos) and the two reward functions' values per completion, each prompt's 3 adjacent.
# fmt: off
COMPLETIONS = [
    ("3", True), ("40", True), ("12345", False),  # "1+2="
    ("40", True), ("4", True), ("1+2=3", False),  # "13+27="
    ("10", True), ("10", True), ("55555", False),  # "5+5=": equal rewards, zero std
    ("", True), ("25", True), ("52", True),  # "17+8="
]
REWARDS = [
    [1.0, 0.5], [0.0, 0.5], [0.0, NONE],
    [1.0, 1.0], [0.0, 0.5], [0.0, 0.0],
    [1.0, 1.0], [1.0, 1.0], [1.0, 1.0],
    [0.0, 0.0], [1.0, 1.0], [0.0, NONE],
]
# fmt: on
REWARD_NAMES = ["exact_match", "format"]  # the built-ins' names (our configs want reward_funcs)
REWARD_WEIGHTS = [1.0, 0.5]
UNSCORABLE = (5,)  # the "unscorable" cases: no function scores this completion
LONE_SCORED = (3, 4)  # the "lone-scored" cases: the group of "13+27=" keeps one scored completion

LOSS_TYPES = ["grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo"]
CLIPPED = ["grpo", "bnpo", "dr_grpo", "dapo", "luspo"]  # the losses that log clip_ratio/*

# name -> (base case or None, options, run arguments). Options are both configs' (TRL's names).
_ON_POLICY = [("grpo", "token", 1), ("dapo", "token", 1)]  # ratio 1: no old log-probs computed
_OFF_POLICY = [(loss, "token", 2) for loss in LOSS_TYPES]
# cispo (its cap epsilon_high, 0.2 by default, is below every ratio) and vespo (its weight is the sequence's
# whatever the level) give the token level's step at the sequence level: see the cispo-sequence case.
_OFF_POLICY += [(loss, "sequence", 2) for loss in LOSS_TYPES if loss not in ("cispo", "vespo")]
GRPO_CASES = {
    f"{loss}-{level}-iter{iterations}": (
        None,
        {"loss_type": loss, "importance_sampling_level": level, "num_iterations": iterations},
        {},
    )
    for loss, level, iterations in _ON_POLICY + _OFF_POLICY
}
_SPECIAL = {  # added to a base case: (base, options added)
    "beta": ("dapo-token-iter2", {"beta": 0.1}),
    "beta-no-bias-correction": ("dapo-token-iter2", {"beta": 0.1, "use_bias_correction_kl": False}),
    "beta-grpo-sequence": ("grpo-sequence-iter2", {"beta": 0.1}),
    "beta-on-policy": ("dapo-token-iter1", {"beta": 0.1}),
    "beta-luspo-sequence": ("luspo-sequence-iter2", {"beta": 0.1}),
    "scale-batch": ("dapo-token-iter2", {"scale_rewards": "batch"}),
    "scale-none": ("dapo-token-iter2", {"scale_rewards": "none"}),
    "normalize-then-sum": ("dapo-token-iter2", {"multi_objective_aggregation": "normalize_then_sum"}),
    "mask-truncated": ("dapo-token-iter2", {"mask_truncated_completions": True}),
    "mask-truncated-grpo": ("grpo-token-iter2", {"mask_truncated_completions": True}),
    "top-entropy": ("dapo-token-iter2", {"top_entropy_quantile": 0.5}),
    "top-entropy-grpo-sequence": ("grpo-sequence-iter2", {"top_entropy_quantile": 0.5}),
    "entropy-coef": ("dapo-token-iter2", {"entropy_coef": 0.05}),
    "entropy-coef-top-entropy": ("entropy-coef", {"top_entropy_quantile": 0.5}),
    "off-policy-mask": ("dapo-token-iter2", {"off_policy_mask_threshold": 0.05}),
    "delta": ("dapo-token-iter2", {"delta": 1.3}),
    # below 1 + epsilon_high: TRL's clip metrics see the ratio capped at delta (high_mean 0)
    "delta-below-epsilon-high": ("dapo-token-iter2", {"delta": 1.1}),
    "epsilon-high": ("dapo-token-iter2", {"epsilon_high": 0.5}),
    "epsilon": ("grpo-token-iter2", {"epsilon": 0.1}),
    "cispo-epsilon-high": ("cispo-token-iter2", {"epsilon_high": 5.0}),
    "cispo-sequence": ("cispo-epsilon-high", {"importance_sampling_level": "sequence"}),
    "sapo-temperatures": ("sapo-token-iter2", {"sapo_temperature_pos": 0.5, "sapo_temperature_neg": 2.0}),
    "vespo-parameters": (
        "vespo-token-iter2",
        {"vespo_k_pos": 1.5, "vespo_lambda_pos": 2.0, "vespo_k_neg": 2.0, "vespo_lambda_neg": 1.5},
    ),
    "temperature": ("dapo-token-iter2", {"temperature": 0.7}),
}
for _name, (_base, _extra) in _SPECIAL.items():  # in order: a base may be an earlier special case
    GRPO_CASES[_name] = (_base, {**GRPO_CASES[_base][1], **_extra}, {})
GRPO_CASES["unscorable"] = ("dapo-token-iter2", GRPO_CASES["dapo-token-iter2"][1], {"unscorable": UNSCORABLE})
GRPO_CASES["unscorable-normalize-then-sum"] = (
    "normalize-then-sum",
    GRPO_CASES["normalize-then-sum"][1],
    {"unscorable": UNSCORABLE},
)
GRPO_CASES["lone-scored"] = (
    "dapo-token-iter2",
    GRPO_CASES["dapo-token-iter2"][1],
    {"unscorable": LONE_SCORED},
)
GRPO_CASES["lone-scored-scale-batch"] = (
    "scale-batch",
    GRPO_CASES["scale-batch"][1],
    {"unscorable": LONE_SCORED},
)
# Two micro-batches of 6 rows (20 and 18 completion tokens) for the loss types whose normaliser spans the
# step, the entropy bonus (a mean per micro-batch in TRL) and the entropy quantile (per micro-batch in TRL).
# No base check: for most of them the step does not depend on the split, which is what is tested.
for _loss in ["grpo", "bnpo", "dr_grpo", "dapo"]:
    GRPO_CASES[f"{_loss}-accumulation"] = (None, GRPO_CASES[f"{_loss}-token-iter2"][1], {"micro_batches": 2})
GRPO_CASES["entropy-coef-accumulation"] = (None, GRPO_CASES["entropy-coef"][1], {"micro_batches": 2})
GRPO_CASES["top-entropy-accumulation"] = (None, GRPO_CASES["top-entropy"][1], {"micro_batches": 2})

RLOO_CASES = {
    "beta0-iter1": (None, {"beta": 0.0}, {}),
    "beta0-iter2": (None, {"beta": 0.0, "num_iterations": 2}, {}),
    "beta-iter1": (None, {"beta": 0.05}, {}),
    "beta-iter2": (None, {"beta": 0.05, "num_iterations": 2}, {}),
    "normalize-advantages": (
        "beta-iter2",
        {"beta": 0.05, "num_iterations": 2, "normalize_advantages": True},
        {},
    ),
    "reward-clip-range": (
        "beta0-iter2",
        {"beta": 0.0, "num_iterations": 2, "reward_clip_range": (0.2, 1.2)},
        {},
    ),
    "epsilon-high": ("beta0-iter2", {"beta": 0.0, "num_iterations": 2, "epsilon_high": 0.28}, {}),
    "epsilon": ("beta0-iter2", {"beta": 0.0, "num_iterations": 2, "epsilon": 0.1}, {}),
    "mask-truncated": (
        "beta-iter2",
        {"beta": 0.05, "num_iterations": 2, "mask_truncated_completions": True},
        {},
    ),
    "temperature": ("beta-iter2", {"beta": 0.05, "num_iterations": 2, "temperature": 0.7}, {}),
    "unscorable": ("beta-iter2", {"beta": 0.05, "num_iterations": 2}, {"unscorable": UNSCORABLE}),
    "lone-scored": ("beta-iter2", {"beta": 0.05, "num_iterations": 2}, {"unscorable": LONE_SCORED}),
    "accumulation": (None, {"beta": 0.05, "num_iterations": 2}, {"micro_batches": 2}),
}

GENERATION_METRICS = [
    "reward",
    "reward_std",
    *[f"rewards/{name}/{stat}" for name in REWARD_NAMES for stat in ("mean", "std")],
    "frac_reward_zero_std",
    "completions/mean_length",
    "completions/min_length",
    "completions/max_length",
    "completions/clipped_ratio",
]
CLIP_METRICS = ["clip_ratio/low_mean", "clip_ratio/high_mean", "clip_ratio/region_mean"]


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


def policy_reference_updated(tokenizer, start=None):
    """(policy, reference, updated): `start` (default the tiny Qwen2) 3 SFT steps from its reference (see
    _trl_drivers), and the policy after one more AdamW step (lr 1e-3) on other problems: the weights of the
    second iteration."""
    policy, ref = trained_policy_and_reference(tokenizer, start)
    updated = copy.deepcopy(policy)
    texts = [r["prompt"] + r["completion"] + tokenizer.eos_token for r in embedded.rows()[32:64]]
    enc = tokenizer(texts, return_tensors="pt", padding=True)
    labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
    optimizer = torch.optim.AdamW(updated.parameters(), lr=1e-3)
    updated(**enc, labels=labels).loss.backward()
    optimizer.step()
    updated.zero_grad()
    return policy, ref, updated


@pytest.fixture(scope="module")
def models(tokenizer):
    return policy_reference_updated(tokenizer)


@pytest.fixture(scope="module")
def completions(tokenizer):
    """COMPLETIONS as token lists: the text's ids, then eos for those that ended."""
    eos = tokenizer.eos_token_id
    return [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] * ended for text, ended in COMPLETIONS
    ]


def rewards_of(unscorable: tuple = ()) -> torch.Tensor:
    """REWARDS (N, F), NaN for None, and NaN on every function for the rows `unscorable`."""
    rewards = torch.tensor(REWARDS)
    rewards[list(unscorable)] = NONE
    return rewards


def trl_case(algo: str, options: dict, run: dict, models, tokenizer, prompts, completions) -> dict:
    """TRL's result of a case (`trl_online_step`) on `models` (policy, reference, updated)."""
    policy, ref, updated = models
    return trl_online_step(
        algo,
        policy,
        ref,
        tokenizer,
        prompts,
        completions,
        rewards_of(run.get("unscorable", ())),
        REWARD_NAMES,
        updated=updated if options.get("num_iterations", 1) == 2 else None,
        micro_batches=run.get("micro_batches", 1),
        max_completion_length=MAX_COMPLETION_LENGTH,
        reward_weights=REWARD_WEIGHTS,
        **options,
    )


@pytest.fixture(scope="module")
def trl_results(models, tokenizer, completions):
    """TRL's result of a case, computed once per module (a base case serves its variants)."""
    cache = {}

    def result(algo: str, cases: dict, name: str) -> dict:
        if (algo, name) not in cache:
            _, options, run = cases[name]
            cache[algo, name] = trl_case(algo, options, run, models, tokenizer, PROMPTS, completions)
        return cache[algo, name]

    return result


def as_rollout(completions: list[list[int]], pad_token_id: int, eos_token_id: int) -> rollout.Rollout:
    """The completions as the rollout engine returns them: right-padded ids, the mask up to and including eos,
    sampler log-probs (zeros: TRL's transformers path has none), finished where the last token is eos."""
    n, width = len(completions), max(len(c) for c in completions)
    ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    mask = torch.zeros(n, width, dtype=torch.long)
    for i, tokens in enumerate(completions):
        ids[i, : len(tokens)] = torch.tensor(tokens)
        mask[i, : len(tokens)] = 1
    finished = torch.tensor([tokens[-1] == eos_token_id for tokens in completions])
    return rollout.Rollout(ids, mask, torch.zeros(n, width), finished)


def our_config(algo: str, options: dict, num_generations: int, micro_batches: int, tmp_path):
    """Our config for a case: the batch's shape as `trl_online_step` gives TRL's, and the case's options."""
    config_class = {"grpo": grpo.GRPOConfig, "rloo": rloo.RLOOConfig}[algo]
    n = len(COMPLETIONS)
    return config_class(
        output_dir=str(tmp_path),
        report_to="none",
        num_generations=num_generations,
        per_device_train_batch_size=n // micro_batches,
        gradient_accumulation_steps=micro_batches,
        max_completion_length=MAX_COMPLETION_LENGTH,
        reward_funcs=REWARD_NAMES,
        reward_weights=REWARD_WEIGHTS,
        **options,
    )


def our_step(algo, options, run, models, tokenizer, completions, prompt_ids, tmp_path) -> dict:
    """Our loss, gradients, batch and metrics (the generation batch's, then each micro-batch's summed) for the
    case, as `trl_online_step` runs it: the loop's pieces (`algorithm()`: prepare_batch, step_loss, units)
    with the micro-batches in row order."""
    pieces = {"grpo": grpo, "rloo": rloo}[algo].algorithm()
    micro_batches = run.get("micro_batches", 1)
    config = our_config(algo, options, len(completions) // len(prompt_ids), micro_batches, tmp_path)
    policy, ref, updated = models
    batch = pieces.prepare_batch(
        config,
        policy,
        ref if config.beta != 0 else None,
        prompt_ids,
        as_rollout(completions, tokenizer.pad_token_id, tokenizer.eos_token_id),
        rewards_of(run.get("unscorable", ())),
        reward_names=REWARD_NAMES,
        pad_token_id=tokenizer.pad_token_id,
    )
    model = copy.deepcopy(updated if config.num_iterations == 2 else policy)
    micro = grpo.split_batch(batch, micro_batches)
    for part in micro:
        part["micro_batches"] = micro_batches  # the step's count, as the loop marks them
    num_items = sum(torch.as_tensor(pieces.units(config, part)) for part in micro)
    loss, metrics = torch.zeros(()), {}
    for part in micro:
        part_loss, part_metrics = pieces.step_loss(model, part, num_items, config=config)
        part_loss.backward()
        loss += part_loss.detach()
        for name, value in part_metrics.items():
            metrics[name] = metrics.get(name, 0.0) + float(value)
    grads = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
    metrics.update({name: float(value) for name, value in batch["metrics"].items()})
    return {"loss": loss, "grads": grads, "metrics": metrics, "batch": batch}


def assert_same_loss_and_grads(ours: dict, theirs: dict):
    """The loss within RTOL of max(|TRL's|, LOSS_SCALE): it sums terms of ~0.1 whose advantages cancel (mean 0
    in each group), so its float32 rounding is ~1e-7 however small it is; then every gradient as
    `assert_same_step` (norm-relative, no such cancellation)."""
    error = abs(ours["loss"].item() - theirs["loss"].item())
    assert error <= RTOL * max(abs(theirs["loss"].item()), LOSS_SCALE), (ours["loss"], theirs["loss"])
    assert_same_step({**ours, "loss": theirs["loss"]}, theirs)


def assert_same_metrics(ours: dict, theirs: dict, required: list[str]):
    """Every required metric logged by us; every metric both log equal (relative 1e-5, absolute 1e-6 for the
    zeros of clip fractions)."""
    missing = [name for name in required if name not in ours]
    assert not missing, f"metrics we do not log: {missing}"
    for name in sorted(ours.keys() & theirs.keys()):
        if theirs[name] is None:  # TRL logs None when every value was NaN
            assert math.isnan(ours[name]), name
            continue
        assert math.isclose(ours[name], theirs[name], rel_tol=RTOL, abs_tol=1e-6), (
            name,
            ours[name],
            theirs[name],
        )


def assert_same_tensors(ours: dict, theirs: dict):
    """Advantages, and old / reference log-probs on the completion tokens where TRL computed them (ours span
    prompt + completion columns, TRL's the completion's)."""
    assert rel_err(ours["advantages"], theirs["advantages"]) <= RTOL
    mask = theirs["completion_mask"]
    for our_key, their_key in [("old_logps", "old_per_token_logps"), ("ref_logps", "ref_per_token_logps")]:
        if their_key in theirs:
            ours_ = ours[our_key][:, -mask.shape[1] :]
            assert rel_err(ours_ * mask, theirs[their_key] * mask) <= RTOL, our_key


def assert_option_bites(cases, name, theirs, trl_results, algo):
    """A case built on a base case must change TRL's gradients, else it would test nothing."""
    base = cases[name][0]
    if base is None:
        return
    flat = [
        torch.cat([g.flatten() for g in r["grads"].values()])
        for r in (theirs, trl_results(algo, cases, base))
    ]
    assert rel_err(*flat) > 1e-4, f"{name} gives {base}'s gradients"


@pytest.mark.parametrize("case", list(GRPO_CASES))
def test_grpo_step_matches_trl(
    case, models, tokenizer, completions, trl_results, tmp_path, shared_prefix_calls
):
    """One GRPO step of GRPO_CASES[case]: loss, gradients, advantages, old / reference log-probs, metrics."""
    _, options, run = GRPO_CASES[case]
    theirs = trl_results("grpo", GRPO_CASES, case)
    ours = our_step("grpo", options, run, models, tokenizer, completions, theirs["prompt_ids"], tmp_path)
    assert shared_prefix_calls  # each prompt's G rows ran it once
    assert_same_loss_and_grads(ours, theirs)
    assert_same_tensors(ours["batch"], theirs["batch"])
    required = GENERATION_METRICS + ["entropy"]
    required += CLIP_METRICS if options["loss_type"] in CLIPPED else []
    required += ["kl"] if options.get("beta", 0.0) else []
    assert_same_metrics(ours["metrics"], theirs["metrics"], required)
    assert_option_bites(GRPO_CASES, case, theirs, trl_results, "grpo")


@pytest.mark.parametrize("case", list(RLOO_CASES))
def test_rloo_step_matches_trl(
    case, models, tokenizer, completions, trl_results, tmp_path, shared_prefix_calls
):
    """One RLOO step of RLOO_CASES[case]: loss, gradients, advantages, old log-probs (TRL keeps each
    completion's sum), metrics."""
    _, options, run = RLOO_CASES[case]
    theirs = trl_results("rloo", RLOO_CASES, case)
    ours = our_step("rloo", options, run, models, tokenizer, completions, theirs["prompt_ids"], tmp_path)
    assert shared_prefix_calls
    assert_same_loss_and_grads(ours, theirs)
    assert rel_err(ours["batch"]["advantages"], theirs["batch"]["advantages"]) <= RTOL
    old_logps = (ours["batch"]["old_logps"] * ours["batch"]["completion_mask"]).sum(-1)
    assert rel_err(old_logps, theirs["batch"]["old_logps"]) <= RTOL
    required = GENERATION_METRICS + ["entropy"] + CLIP_METRICS + (["kl"] if options["beta"] else [])
    assert_same_metrics(ours["metrics"], theirs["metrics"], required)
    assert_option_bites(RLOO_CASES, case, theirs, trl_results, "rloo")


@pytest.mark.parametrize("conversational", [False, True], ids=["standard", "conversational"])
def test_our_prompt_tokens_give_trls_step(conversational, models, tokenizer, completions, tmp_path):
    """The prompts through our tokenization (`tokenize_prompts`, as `grpo.load_prompts` does) instead of
    TRL's ids: the same ids (for conversational prompts, the chat template with the generation prompt), the
    same step."""
    prompts = [
        [{"role": "system", "content": "Add."}, {"role": "user", "content": p}] if conversational else p
        for p in PROMPTS
    ]
    _, options, run = GRPO_CASES["beta"]
    theirs = trl_case("grpo", options, run, models, tokenizer, prompts, completions)
    prompt_ids = tokenize_prompts(tokenizer, prompts)
    assert [list(p) for p in prompt_ids] == [list(p) for p in theirs["prompt_ids"]]
    ours = our_step("grpo", options, run, models, tokenizer, completions, prompt_ids, tmp_path)
    assert_same_loss_and_grads(ours, theirs)


@pytest.fixture(scope="module")
def family_models(tokenizer):
    """family -> (policy, reference, updated) as `models`, for the tiny GPT-2 (absolute positions, the logits
    path of `rl.logprobs`) and Gemma 2 (attention and output soft-capping)."""
    from transformers import AutoModelForCausalLM

    built = {}

    def get(family):
        if family not in built:
            torch.manual_seed(0)
            start = AutoModelForCausalLM.from_config(family_config(family, tokenizer))
            built[family] = policy_reference_updated(tokenizer, start)
        return built[family]

    return get


@pytest.mark.parametrize("family", ["gpt2", "gemma2"])
@pytest.mark.parametrize("algo, case", [("grpo", "beta"), ("rloo", "beta-iter2")], ids=["grpo", "rloo"])
def test_step_matches_trl_on_other_families(
    family, algo, case, family_models, tokenizer, completions, tmp_path
):
    """As above on GPT-2 and Gemma 2, beta > 0, second iteration. GPT-2 on prompts of equal length: TRL 1.16
    passes no position_ids, so GPT-2 reads a left-padded prompt at shifted positions (see the next test)."""
    cases = GRPO_CASES if algo == "grpo" else RLOO_CASES
    _, options, run = cases[case]
    prompts = EQUAL_LENGTH_PROMPTS if family == "gpt2" else PROMPTS
    theirs = trl_case(algo, options, run, family_models(family), tokenizer, prompts, completions)
    ours = our_step(
        algo, options, run, family_models(family), tokenizer, completions, theirs["prompt_ids"], tmp_path
    )
    assert_same_loss_and_grads(ours, theirs)
    assert_same_metrics(ours["metrics"], theirs["metrics"], GENERATION_METRICS + ["entropy", "kl"])


def test_gpt2_left_padded_rows_score_as_alone(family_models, tokenizer, completions, tmp_path):
    """GPT-2 has absolute positions: our position_ids count each row's real tokens, so a left-padded row's
    old and reference log-probs are those of the row run alone, unpadded (TRL 1.16's are not: it passes no
    position_ids and GPT-2 then counts the pads, 0.07 off here; briefs/grpotrl-findings.md)."""
    policy, ref, _ = family_models("gpt2")
    G = len(completions) // len(PROMPTS)
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    assert len({len(p) for p in prompt_ids}) > 1  # the prompts are left-padded
    config = our_config("grpo", GRPO_CASES["beta"][1], G, 1, tmp_path)
    batch = grpo.prepare_batch(
        config,
        policy,
        ref,
        prompt_ids,
        as_rollout(completions, tokenizer.pad_token_id, tokenizer.eos_token_id),
        rewards_of(),
        reward_names=REWARD_NAMES,
        pad_token_id=tokenizer.pad_token_id,
    )
    for key, model in [("old_logps", policy), ("ref_logps", ref)]:
        for i, tokens in enumerate(completions):
            with torch.no_grad():
                logits = model(torch.tensor([prompt_ids[i // G] + tokens])).logits[0, -len(tokens) - 1 : -1]
            alone = logits.log_softmax(-1).gather(-1, torch.tensor(tokens)[:, None])[:, 0]
            ours = batch[key][i][batch["completion_mask"][i].bool()]
            assert rel_err(ours, alone) <= RTOL, (key, i)


# ---------------------------------------------------------------------------------------------------------
# The loop: GRPOTrainer.train and grpo.train / RLOOTrainer.train and rloo.train on the same completions
# ---------------------------------------------------------------------------------------------------------

TABLE = {  # (prompt, completion text) -> the two rewards, for the loops' reward functions
    (PROMPTS[i // 3], text): values
    for i, ((text, _), values) in enumerate(zip(COMPLETIONS, REWARDS, strict=True))
}


def table_exact_match(prompts, completions, **kwargs):
    """REWARDS' first column, looked up by (prompt, completion): a reward function for both loops (ours
    imports it as test_grpo_trl:table_exact_match; pytest puts tests/ on sys.path)."""
    return [None if math.isnan(v := TABLE[p, c][0]) else v for p, c in zip(prompts, completions, strict=True)]


def table_format(prompts, completions, **kwargs):
    """REWARDS' second column (None where NaN), as table_exact_match."""
    return [None if math.isnan(v := TABLE[p, c][1]) else v for p, c in zip(prompts, completions, strict=True)]


def fixed_generation(tokenizer, completions):
    """prompt ids -> the G completions of that prompt (COMPLETIONS), for either side's generation step."""
    G = len(completions) // len(PROMPTS)
    ids = [tuple(tokenizer(p)["input_ids"]) for p in PROMPTS]
    return {prompt: completions[i * G : (i + 1) * G] for i, prompt in enumerate(ids)}


TRAJECTORY_STEPS = 4  # two generation batches of all 4 prompts, each feeding 2 optimizer steps
TRAJECTORY_OPTIONS = dict(
    learning_rate=1e-3,
    lr_scheduler_type="constant",
    weight_decay=0.0,
    max_grad_norm=1.0,
    max_steps=TRAJECTORY_STEPS,
    per_device_train_batch_size=6,
    steps_per_generation=2,
    num_generations=3,
    max_completion_length=MAX_COMPLETION_LENGTH,
    reward_weights=REWARD_WEIGHTS,
    logging_steps=1,
    seed=0,
)
# what both must log when TRL does (generation metrics on the steps that generate)
TRAJECTORY_REQUIRED = ["loss", "grad_norm", "entropy", "kl", "num_tokens", "reward", "clip_ratio/region_mean"]
TRAJECTORIES = {
    "grpo-dapo": ("grpo", {"loss_type": "dapo", "beta": 0.1}),
    "grpo-bnpo": ("grpo", {"loss_type": "bnpo", "beta": 0.1}),
    "grpo-grpo-sequence": ("grpo", {"loss_type": "grpo", "importance_sampling_level": "sequence"}),
    "rloo": ("rloo", {"beta": 0.05}),
    # 2 micro-batches per step, each generation batch used twice: the loop's accumulation and iterations
    "grpo-iterations-accumulation": (
        "grpo",
        {"num_iterations": 2, "gradient_accumulation_steps": 2, "beta": 0.1, "entropy_coef": 0.05},
    ),
    "rloo-iterations-accumulation": ("rloo", {"num_iterations": 2, "gradient_accumulation_steps": 2}),
    # the reference mixed toward the policy after step 2 (steps 3 and 4 see it in kl)
    "grpo-sync-ref-model": ("grpo", {"beta": 0.1, "sync_ref_model": True, "ref_model_sync_steps": 2}),
    "grpo-mask-truncated": ("grpo", {"beta": 0.1, "mask_truncated_completions": True}),
}


@pytest.fixture(scope="module")
def start(models, tokenizer, tmp_path_factory):
    """A folder holding the policy of `models` and the tokenizer: where both loops start (and their reference)."""
    folder = tmp_path_factory.mktemp("start")
    models[0].save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def trl_trajectory(algo, folder, completions, out, **options) -> tuple[list[dict], list[dict]]:
    """TRL's logged records (one per step) of `algo`'s trainer.train from `folder`, its generation step
    returning COMPLETIONS, prompts in dataset order and each generation batch left unshuffled; and the rows
    of the last generation batch as its completions table keeps them (prompt, completion, rewards,
    advantage)."""
    from trl.trainer import grpo_trainer, rloo_trainer

    tokenizer = load_tokenizer(str(folder))
    config_class, trainer_class, module = {
        "grpo": (trl.GRPOConfig, trl.GRPOTrainer, grpo_trainer),
        "rloo": (trl.RLOOConfig, trl.RLOOTrainer, rloo_trainer),
    }[algo]
    args = config_class(output_dir=str(out), shuffle_dataset=False, **TRL_TRAIN, **options)
    trainer = trainer_class(
        model=str(folder),
        reward_funcs=[table_exact_match, table_format],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in PROMPTS]),
        processing_class=tokenizer,
    )
    table = fixed_generation(tokenizer, completions)

    def generate(prompt_ids, *args, **kwargs):  # each prompt G times in a row (TRL's RepeatSampler)
        G = len(completions) // len(PROMPTS)
        out = [table[tuple(ids)][i % G] for i, ids in enumerate(prompt_ids)]
        return (out, None) if algo == "grpo" else out

    trainer._generate_single_turn = generate
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(module, "shuffle_sequence_dict", lambda batch: batch)
        trainer.train()
    logs = trainer._logs
    rows = [
        {"prompt": prompt, "completion": completion, "advantage": advantage}
        for prompt, completion, advantage in zip(
            logs["prompt"], logs["completion"], logs["advantages"], strict=True
        )
    ]
    for name, values in logs["rewards"].items():
        for row, value in zip(rows, values, strict=True):
            row.setdefault("rewards", {})[name] = value
    return [r for r in trainer.state.log_history if "loss" in r], rows


def our_trajectory(algo, folder, completions, out, **options) -> tuple[list[dict], list[dict]]:
    """Our loop's metrics.jsonl records for the same run (the rollout engine returning COMPLETIONS, the
    prompts in dataset order, each generation batch left unshuffled, as trl_trajectory), and the
    completions.jsonl rows of its last generation batch."""
    tokenizer = load_tokenizer(str(folder))
    table = fixed_generation(tokenizer, completions)
    module = {"grpo": grpo, "rloo": rloo}[algo]
    config_class = {"grpo": grpo.GRPOConfig, "rloo": rloo.RLOOConfig}[algo]

    def generate(model, prompt_ids, *, num_generations, **kwargs):
        rows = [c for ids in prompt_ids for c in table[tuple(ids)]]
        return as_rollout(rows, tokenizer.pad_token_id, tokenizer.eos_token_id)

    split_batch = grpo.split_batch
    data = write_jsonl(out.parent / f"{out.name}-prompts.jsonl", [{"prompt": p} for p in PROMPTS])
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(rollout, "generate", generate)
        patch.setattr(loop, "epoch_order", lambda num_rows, *args, **kwargs: list(range(num_rows)))
        patch.setattr(grpo, "split_batch", lambda batch, k, generator=None: split_batch(batch, k))
        module.train(
            config_class(
                model_name_or_path=str(folder),
                dataset_name=data,
                output_dir=str(out),
                reward_funcs=["test_grpo_trl:table_exact_match", "test_grpo_trl:table_format"],
                save_steps=0,
                eval_steps=0,
                disable_tqdm=True,
                report_to="none",
                **options,
            )
        )
    rows = logged(out / grpo.COMPLETIONS_FILE, None)
    last = max(row["step"] for row in rows)
    return [r for r in logged(out / "metrics.jsonl", None) if "loss" in r], [
        r for r in rows if r["step"] == last
    ]


@pytest.mark.parametrize("case", list(TRAJECTORIES))
def test_loop_follows_trls_trajectory(case, start, completions, tmp_path):
    """4 optimizer steps of each loop from the same weights, on the same completions and rewards: two
    generation batches, each cut into 2 micro-batches that are 2 optimizer steps (steps_per_generation 2,
    gradient_accumulation_steps 1), so the second step of each uses old log-probs and dapo's normaliser is the
    generation batch's tokens over 2. Every number TRL logs that we log, each step, within 1e-5 (relative or
    absolute; they agree to ~1e-6): loss, grad_norm, kl, entropy, clip ratios, rewards, completion lengths,
    num_tokens, epoch; and the last generation batch's rows in completions.jsonl as TRL's completions table
    holds them (prompt, completion, rewards, advantage)."""
    algo, options = TRAJECTORIES[case]
    options = {**TRAJECTORY_OPTIONS, **options}
    theirs, their_rows = trl_trajectory(algo, start, completions, tmp_path / "trl", **options)
    ours, our_rows = our_trajectory(algo, start, completions, tmp_path / "ours", **options)
    assert len(ours) == len(theirs) == TRAJECTORY_STEPS
    for step, (a, b) in enumerate(zip(ours, theirs, strict=True), start=1):
        missing = [name for name in TRAJECTORY_REQUIRED if name in b and name not in a]
        assert not missing, (step, missing)
        for name in sorted(a.keys() & b.keys()):
            assert math.isclose(a[name], b[name], rel_tol=RTOL, abs_tol=RTOL), (step, name, a[name], b[name])
    assert abs(theirs[-1]["loss"] - theirs[0]["loss"]) > 1e-3  # the runs move: real updates are compared
    # the logged completions of the last generation batch
    assert len(our_rows) == len(their_rows) == len(COMPLETIONS)
    for a, b in zip(our_rows, their_rows, strict=True):
        assert (a["prompt"], a["completion"]) == (b["prompt"], b["completion"])
        assert math.isclose(a["advantage"], b["advantage"], rel_tol=RTOL, abs_tol=RTOL), (a, b)
        for name, value in b["rewards"].items():  # None: ours writes null, TRL's table NaN
            ours_ = a["rewards"][name]
            assert (ours_ is None and math.isnan(value)) or math.isclose(ours_, value), (name, a, b)
