"""Our Online DPO step against TRL 1.16's experimental OnlineDPOTrainer: same tiny models, same prompts, same
completions, same rewards, float32.

TRL side (`_odpo_drivers.trl_online_dpo_step`): the trainer's `training_step` with its model's `generate`
returning fixed completions, so that TRL's prompt tokenization, eos truncation, reward scoring (reward
functions and / or a reward model), missing_eos_penalty, ranking, log-probs and loss run on them.
Our side: the loop's pieces (`online_dpo.algorithm()`: prepare_batch, units, the step loss; `grpo.split_batch`
in row order) on TRL's prompt ids, the same completions as a `rollout.Rollout`, and rewards from our own
scoring (`rewards.score`) of the same completions with the same functions / reward model.

Compared, relative error <= 1e-5: the loss, every parameter's gradient and every metric, as TRL logs them,
but for two departures (online_dpo's docstring). objective/kl, objective/entropy, objective/non_score_reward
and objective/rlhf_reward sum over completion tokens where TRL also sums the pad positions after an eos: they
are checked against TRL's own per-token log-probs (captured from its `_forward`) summed over the completion
mask, and, in the case whose completions all have one length, against TRL's logged values too. A step of
several micro-batches gets from TRL gradient_accumulation_steps times the gradient of the loss it logs: ours
is checked against TRL's divided by that count.

The batch: 4 prompts of 4 to 6 characters (left padding), 2 completions each that end in eos after 0 to 2
characters or are truncated at max_new_tokens 4; two reward functions weighted 1 and 0.5 (the second None on
one row) that rank 2 pairs, tie 1 pair of different completions (the first is chosen) and rank the last one
in the order missing_eos_penalty reverses. The policy is 3 SFT steps away from the reference, so that the
log-ratios (and rewards/accuracies) are not trivially 0. A case built on a base case also checks that its
option changes TRL's gradients, so that no case passes vacuously.
"""

import copy
import math

import pytest
import torch
from _odpo_drivers import as_rollout, lookup_reward_funcs, trl_online_dpo_step
from _optional import import_or_skip
from _trl_drivers import (
    assert_same_step,
    family_config,
    rel_err,
    trained_policy_and_reference,
)

from posttrain.data import embedded
from posttrain.data.tokenization import tokenize_prompts
from posttrain.rl import grpo, online_dpo, rewards
from posttrain.rl.models import disable_dropout

import_or_skip("trl")  # a failure under CI, where trl is installed

RTOL = 1e-5
MAX_NEW_TOKENS = 4
PROMPTS = ["1+2=", "13+27=", "5+5=", "17+8="]
NONE = float("nan")  # a reward function's None
# (completion text, ends in eos), each prompt's pair adjacent (first sampled first)
# fmt: off
COMPLETIONS = [
    ("3", True), ("4", True),  # the second wins
    ("40", True), ("4000", False),  # the first wins
    ("10", True), ("11", True),  # a tie of different completions: the first is chosen
    ("2525", False), ("2", True),  # the first wins on rewards, the second with missing_eos_penalty 1
]
REWARDS = [
    [0.0, 1.0], [1.0, 1.0],
    [1.0, 1.0], [0.0, NONE],
    [0.0, 1.0], [0.0, 1.0],
    [1.0, 0.0], [0.0, 1.0],
]
# fmt: on
EQUAL_LENGTH = [  # every completion 3 tokens: no padding, so TRL's logged kl / entropy are ours
    ("13", True),
    ("14", True),
    ("40", True),
    ("400", False),
    ("10", True),
    ("11", True),
    ("252", False),
    ("25", True),
]  # fmt: skip
REWARD_NAMES = ["exact_match", "format"]  # names our config accepts; the values are REWARDS
REWARD_WEIGHTS = [1.0, 0.5]
# metrics recomputed over the completion mask from TRL's own log-probs (see the module docstring)
MASKED = ("objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward")
REQUIRED = [
    "objective/kl", "objective/entropy", "objective/non_score_reward", "objective/rlhf_reward",
    "objective/scores", "objective/scores_margin", "rewards/chosen", "rewards/rejected", "rewards/margins",
    "rewards/accuracies", "logps/chosen", "logps/rejected", "val/contain_eos_token", "beta",
]  # fmt: skip

# name -> (base case or None, options (both configs' names), run arguments)
CASES = {
    "sigmoid": (None, {}, {}),
    "ipo": (None, {"loss_type": "ipo"}, {}),
    "beta": ("sigmoid", {"beta": 0.5}, {}),
    "missing-eos-penalty": ("sigmoid", {"missing_eos_penalty": 1.0}, {}),
    "ipo-missing-eos-penalty": ("ipo", {"loss_type": "ipo", "missing_eos_penalty": 1.0}, {}),
    "max-length": ("sigmoid", {"max_length": 7}, {}),  # keeps each prompt's last 3 tokens
    "equal-length": (None, {}, {"completions": EQUAL_LENGTH}),
    "accumulation": (None, {"missing_eos_penalty": 1.0}, {"micro_batches": 2}),
    "reward-model": (None, {}, {"reward": "model"}),
    "reward-model-penalty": ("reward-model", {"missing_eos_penalty": 1.0}, {"reward": "model"}),
    "reward-model-and-function": (None, {"reward_weights": [0.5, 1.0]}, {"reward": "model+function"}),
}


@pytest.fixture(scope="module")
def tokenizer():
    return embedded.build_tokenizer()


@pytest.fixture(scope="module")
def models(tokenizer):
    return trained_policy_and_reference(tokenizer)


@pytest.fixture(scope="module")
def reward_model(tokenizer, tmp_path_factory):
    """A one-label tiny Qwen2 classifier (random head, so its scores differ per completion), saved with the
    tokenizer for our side; (model, path)."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(
        0
    )  # a head that prefers a truncated completion to its eos-ended pair: the penalty bites
    model = AutoModelForSequenceClassification.from_config(family_config("qwen2", tokenizer, num_labels=1))
    disable_dropout(model)
    path = tmp_path_factory.mktemp("reward_model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model.eval(), str(path)


def token_lists(tokenizer, completions):
    eos = tokenizer.eos_token_id
    return [
        tokenizer(text, add_special_tokens=False)["input_ids"] + [eos] * ended for text, ended in completions
    ]


def case_inputs(name, tokenizer, reward_model):
    """(completions as token lists, TRL's reward_funcs, TRL's reward_processing_classes, our config's reward
    options, our scoring: a list of `rewards.Reward` or None for the fixed REWARDS)."""
    _, options, run = CASES[name]
    texts = run.get("completions", COMPLETIONS)
    completions = token_lists(tokenizer, texts)
    kind = run.get("reward", "functions")
    functions = lookup_reward_funcs(PROMPTS, [t for t, _ in texts], torch.tensor(REWARDS), REWARD_NAMES)
    if kind == "functions":
        return (
            completions,
            functions,
            None,
            {"reward_funcs": REWARD_NAMES, "reward_weights": REWARD_WEIGHTS},
            None,
        )
    model, path = reward_model
    ours = rewards.resolve([], reward_model_name_or_path=path)
    trl_funcs, classes = [model], [tokenizer]
    our_options = {"reward_model_name_or_path": path, "reward_funcs": []}
    if kind == "model+function":
        trl_funcs, classes = [model, functions[0]], [tokenizer, None]
        ours = ours + rewards.resolve([functions[0]])
        our_options["reward_funcs"] = [functions[0]]
    return completions, trl_funcs, classes, our_options, ours


@pytest.fixture(scope="module")
def trl_results(models, tokenizer, reward_model):
    cache = {}

    def result(name):
        if name not in cache:
            _, options, run = CASES[name]
            completions, funcs, classes, _, _ = case_inputs(name, tokenizer, reward_model)
            policy, ref = models
            cache[name] = trl_online_dpo_step(
                policy, ref, tokenizer, PROMPTS, completions, funcs, reward_processing_classes=classes,
                micro_batches=run.get("micro_batches", 1), max_new_tokens=MAX_NEW_TOKENS,
                **({"reward_weights": REWARD_WEIGHTS} if run.get("reward", "functions") == "functions" else {}),
                **options,
            )  # fmt: skip
        return cache[name]

    return result


def our_step(name, models, tokenizer, reward_model, prompt_ids, tmp_path) -> dict:
    """Our loss, gradients and metrics for a case, through the loop's pieces (micro-batches in row order)."""
    _, options, run = CASES[name]
    completions, _, _, reward_options, scorers = case_inputs(name, tokenizer, reward_model)
    micro_batches = run.get("micro_batches", 1)
    config = online_dpo.OnlineDPOConfig(
        output_dir=str(tmp_path), report_to="none", dataset_name="unused",  # TRL's defaults, not the embedded task's
        per_device_train_batch_size=len(PROMPTS) // micro_batches,
        gradient_accumulation_steps=micro_batches, max_completion_length=MAX_NEW_TOKENS,
        **{**reward_options, **options},
    )  # fmt: skip
    ro = as_rollout(completions, tokenizer.pad_token_id, tokenizer.eos_token_id)
    if scorers is None:
        values = torch.tensor(REWARDS)
    else:
        prompts = [p for p in PROMPTS for _ in range(2)]
        scored = rewards.score(
            scorers, prompts=prompts, completions=grpo.completion_texts(tokenizer, PROMPTS, ro),
            completion_ids=completions, columns={}, trainer_state=rewards.TrainerState(0, 0.0, 1),
        )  # fmt: skip
        values = scored.values
    pieces = online_dpo.algorithm()
    policy, ref = models
    batch = pieces.prepare_batch(
        config, policy, ref, prompt_ids, ro, values, reward_names=None, pad_token_id=tokenizer.pad_token_id
    )
    metrics = batch.pop("metrics")
    batch.pop("log_columns")
    model = copy.deepcopy(policy)
    micro = grpo.split_batch(batch, micro_batches)
    num_items = sum(torch.as_tensor(pieces.units(config, part)) for part in micro)
    loss = torch.zeros(())
    for part in micro:
        part_loss, part_metrics = pieces.step_loss(model, part, num_items, config=config)
        part_loss.backward()
        loss += part_loss.detach()
        for key, value in part_metrics.items():
            metrics[key] = metrics.get(key, 0.0) + float(value)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return {"loss": loss, "grads": grads, "metrics": metrics, "config": config}


def masked_trl_metrics(theirs: dict, beta: float) -> dict:
    """TRL's kl / entropy / non_score_reward / rlhf_reward recomputed from its own per-token log-probs, summed
    over the completion mask only; micro-batch means averaged, as its log averages its stats."""
    out = {key: 0.0 for key in MASKED}
    n = len(theirs["forwards"])
    for logps, ref_logps, mask in theirs["forwards"]:
        kl = ((logps - ref_logps) * mask).sum(1).mean().item()
        out["objective/kl"] += kl / n
        out["objective/entropy"] += -(logps * mask).sum(1).mean().item() / n
    out["objective/non_score_reward"] = -beta * out["objective/kl"]
    out["objective/rlhf_reward"] = theirs["metrics"]["objective/scores"] - beta * out["objective/kl"]
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_online_dpo_step_matches_trl(
    case, models, tokenizer, reward_model, trl_results, tmp_path, shared_prefix_calls
):
    theirs = trl_results(case)
    ours = our_step(case, models, tokenizer, reward_model, theirs["prompt_ids"], tmp_path)
    assert shared_prefix_calls  # a pair's prompt ran once
    # TRL back-propagates each micro-batch's mean loss unscaled (the loss it logs is divided by the
    # accumulation steps, its gradient is not); ours is the gradient of the loss both log
    accumulation = CASES[case][2].get("micro_batches", 1)
    assert_same_step(ours, {**theirs, "grads": {n: g / accumulation for n, g in theirs["grads"].items()}})
    missing = [key for key in REQUIRED if key not in ours["metrics"]]
    assert not missing, f"metrics we do not log: {missing}"
    expected = dict(theirs["metrics"])
    beta = ours["config"].beta_at(0.0)
    masked = masked_trl_metrics(theirs, beta)
    if CASES[case][2].get("completions") is EQUAL_LENGTH:  # no padding: TRL's logged values are ours
        for key in MASKED:
            assert math.isclose(masked[key], expected[key], rel_tol=RTOL, abs_tol=1e-6), key
    expected.update(masked)
    for key in REQUIRED:
        assert math.isclose(ours["metrics"][key], expected[key], rel_tol=RTOL, abs_tol=1e-6), (
            key,
            ours["metrics"][key],
            expected[key],
        )
    base = CASES[case][0]
    if base is not None:  # the option must change TRL's gradients, else the case tests nothing
        flat = [torch.cat([g.flatten() for g in r["grads"].values()]) for r in (theirs, trl_results(base))]
        assert rel_err(*flat) > 1e-4, f"{case} gives {base}'s gradients"


def test_our_prompt_tokenization_is_trls(tokenizer, trl_results):
    assert tokenize_prompts(tokenizer, PROMPTS) == trl_results("sigmoid")["prompt_ids"]
