"""Reward functions, the reward model as a reward, and `rewards.score` (TRL 1.16's calling convention).

References: the built-ins against hand-written expectations; the reward-model scorer against a straight
recomputation (each text alone, unpadded, scored at its last token) and against TRL 1.16's
`GRPOTrainer._calculate_rewards` on the same model and rows (float32, relative error <= 1e-5).
"""

import asyncio
import functools
import math
import sys
import textwrap

import pytest
import torch
from _optional import import_or_skip
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from posttrain.data import embedded
from posttrain.rl import rewards
from posttrain.rl.config import ConfigError
from posttrain.rl.rewards import Reward, RewardError, TrainerState

RTOL = 1e-5


def conv(role, text):
    return [{"role": role, "content": text}]


def run(funcs, prompts, completions=None, columns=None, row_offset=0, step=0):
    """score() on rows with one-token completion ids; funcs: callables, named by their __name__."""
    completions = completions if completions is not None else ["0"] * len(prompts)
    return rewards.score(
        [Reward(rewards.callable_name(f), f) for f in funcs],
        prompts=prompts,
        completions=completions,
        completion_ids=[[7]] * len(prompts),
        columns=columns or {},
        trainer_state=TrainerState(global_step=step),
        row_offset=row_offset,
    )


# ---------------------------------------------------------------------------------------------------------
# Built-ins
# ---------------------------------------------------------------------------------------------------------


def test_exact_match_standard_and_conversational():
    prompts = ["3+4=", "3+4=", "3+4=", "12+29=", "hello", " 0+0= "]
    completions = ["7", " 7\n", "8", "41", "7", "0"]
    # 12+29 = 41; "hello" is not an embedded-task prompt: not applicable (None)
    expected = [1.0, 1.0, 0.0, 1.0, None, 1.0]
    assert rewards.exact_match(prompts=prompts, completions=completions) == expected
    conv_prompts = [conv("user", p) for p in prompts]
    conv_completions = [conv("assistant", c) for c in completions]
    assert rewards.exact_match(prompts=conv_prompts, completions=conv_completions) == expected


def test_format_standard_and_conversational():
    completions = ["42", " 7\n", "4 2", "-3", "²", "", "41<|im_end|>", "0x1"]
    expected = [1.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]
    assert rewards.format(completions=completions) == expected
    assert rewards.format(completions=[conv("assistant", c) for c in completions]) == expected


def test_builtin_names_a_malformed_completion():
    with pytest.raises(RewardError, match=r"'format' raised on rows 4\.\.5: ValueError: the batch's row 1: "):
        run([rewards.format], ["1+1=", "1+1="], ["2", [{"role": "assistant"}]], row_offset=4)


# ---------------------------------------------------------------------------------------------------------
# resolve
# ---------------------------------------------------------------------------------------------------------


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        textwrap.dedent(
            """
            def length_reward(completions, **kwargs):
                return [float(len(c)) for c in completions]

            class Judge:
                @staticmethod
                def strict(completions, **kwargs):
                    return [0.0 for c in completions]

            NOT_CALLABLE = 3
            """
        )
    )
    (tmp_path / "broken_rewards.py").write_text("import no_such_package_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    return tmp_path


def test_resolve_builtins_and_import_paths(user_module):
    # the last entry in TRL's dotted form
    entries = [
        "exact_match",
        "my_rewards:length_reward",
        "format",
        "my_rewards:Judge.strict",
        "my_rewards.Judge",
    ]
    resolved = rewards.resolve(entries)
    assert [r.name for r in resolved] == ["exact_match", "length_reward", "format", "strict", "Judge"]
    assert resolved[0].fn is rewards.exact_match and resolved[2].fn is rewards.format
    assert resolved[1].fn(completions=["ab", "abc"]) == [2.0, 3.0]


def test_resolve_finds_a_module_in_the_working_folder(tmp_path, monkeypatch):
    # a console script's sys.path does not hold the working folder; TRL's script adds it, so do we
    (tmp_path / "cwd_rewards.py").write_text(
        "def shout(completions, **kw):\n    return [1.0] * len(completions)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    (shout,) = rewards.resolve(["cwd_rewards:shout"])
    assert shout.name == "shout" and shout.fn(completions=["a"]) == [1.0]


@pytest.mark.parametrize(
    "entry, message",
    [
        ("exact", r"unknown reward 'exact'; built-ins: exact_match, format, or an import path"),
        ("./my_rm", r"'./my_rm' is not an import path 'package.module:function' \(a reward model goes in"),
        ("no_such_module_xyz:f", r"'no_such_module_xyz:f': module 'no_such_module_xyz' does not import: "),
        ("broken_rewards:f", r"'broken_rewards:f': module 'broken_rewards' does not import: ModuleNotFound"),
        ("my_rewards:missing", r"'my_rewards:missing': module 'my_rewards' has no 'missing'"),
        ("my_rewards:NOT_CALLABLE", r"'my_rewards:NOT_CALLABLE' is a int, not a function"),
        ("my_rewards:", r"'my_rewards:' is not an import path 'package.module:function'"),
        ("my_rewards.missing", r"'my_rewards.missing': module 'my_rewards' has no 'missing'"),
    ],
)
def test_resolve_names_a_bad_entry(user_module, entry, message):
    with pytest.raises(ConfigError, match="^reward_funcs: " + message):
        rewards.resolve(["format", entry])


def test_resolve_refuses_nothing_and_duplicates(user_module):
    with pytest.raises(ConfigError, match="reward_funcs is empty and no reward_model_name_or_path"):
        rewards.resolve([])
    with pytest.raises(ConfigError, match="two rewards are named 'format'"):
        rewards.resolve(["format", "format"])


class AsyncJudge:
    async def __call__(self, prompts, **kwargs):
        return [1.0] * len(prompts)


async def async_judge(prompts, **kwargs):
    return [1.0] * len(prompts)


def test_names_and_async_detection_as_trl():
    # TRL's helpers on the same forms: functions, partials, callable instances, async ones of each
    trl_utils = import_or_skip("trl.trainer.utils")
    forms = [rewards.format, functools.partial(rewards.format), AsyncJudge(), async_judge]
    forms.append(functools.partial(async_judge))
    assert [rewards.callable_name(f) for f in forms] == [
        "format",
        "format",
        "AsyncJudge",
        "async_judge",
        "async_judge",
    ]
    assert [rewards.callable_name(f) for f in forms] == [trl_utils.get_callable_name(f) for f in forms]
    assert [rewards.is_async(f) for f in forms] == [False, False, True, True, True]
    assert [rewards.is_async(f) for f in forms] == [trl_utils.is_async_callable(f) for f in forms]
    assert run([AsyncJudge(), functools.partial(async_judge)], ["1+1="]).values.tolist() == [[1.0, 1.0]]


# ---------------------------------------------------------------------------------------------------------
# score: calling convention, order, async, logging
# ---------------------------------------------------------------------------------------------------------


def test_score_passes_every_argument_and_column():
    seen = {}

    def spy(prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **columns):
        seen.update(
            prompts=prompts, completions=completions, ids=completion_ids, step=trainer_state.global_step
        )
        seen["columns"] = columns
        return [float(a) for a in columns["answer"]]

    prompts = ["1+1=", "1+1=", "2+3="]
    out = run(
        [spy],
        prompts,
        ["2", "3", "5"],
        # "prompt" / "completion" / "completion_ids" columns are not passed on (they arrive as the arguments), as TRL
        columns={
            "answer": ["2", "2", "5"],
            "level": [1, 1, 2],
            "prompt": prompts,
            "completion": ["", "", ""],
            "completion_ids": [[], [], []],
        },
        step=17,
    )
    assert seen == {
        "prompts": prompts,
        "completions": ["2", "3", "5"],
        "ids": [[7]] * 3,
        "step": 17,
        "columns": {"answer": ["2", "2", "5"], "level": [1, 1, 2]},
    }
    assert out.values.dtype == torch.float32 and out.values.tolist() == [[2.0], [2.0], [5.0]]


def test_score_table_order_none_and_return_types():
    calls = []

    def first(prompts, **kw):
        calls.append("first")
        return [None, 1.0]  # None: not applicable -> NaN

    async def late(prompts, **kw):
        calls.append("late")
        return (2, True)  # any real number, in a tuple

    def second(prompts, **kw):
        calls.append("second")
        return torch.tensor([3.5, -1.0])  # a vector

    out = run([first, late, second], ["1+1=", "1+2="])
    assert calls == ["first", "second", "late"]  # sync ones in order, then the async ones (TRL's order)
    assert out.values.shape == (2, 3)
    assert math.isnan(out.values[0, 0]) and out.values[0, 1:].tolist() == [2.0, 3.5]
    assert out.values[1].tolist() == [1.0, 1.0, -1.0]


def test_async_rewards_run_concurrently():
    # Each waits for an event only the other sets: awaited one after the other, the first would never finish.
    ping, pong = asyncio.Event(), asyncio.Event()

    async def a(prompts, **kw):
        ping.set()
        await asyncio.wait_for(pong.wait(), 30)  # a failure instead of a hang
        return [1.0] * len(prompts)

    async def b(prompts, **kw):
        pong.set()
        await asyncio.wait_for(ping.wait(), 30)
        return [2.0] * len(prompts)

    assert run([a, b], ["1+1="]).values.tolist() == [[1.0, 2.0]]


def test_async_rewards_inside_a_running_event_loop():
    async def c(prompts, **kw):
        await asyncio.sleep(0)
        return [4.0] * len(prompts)

    async def caller():  # a notebook: score() is called while this thread runs a loop
        return run([c], ["1+1="]).values.tolist()

    assert asyncio.run(caller()) == [[4.0]]


def test_log_metric_and_log_extra_collected():
    def f(completions, log_metric, log_extra, **kw):
        log_metric("f/len", 2.5)
        log_metric("shared", 1.0)
        log_extra("judge", ["good", "bad"])
        return [0.0, 0.0]

    async def g(completions, log_metric, log_extra, **kw):
        log_metric("shared", torch.tensor(3.0))
        log_extra("why", [1, 2])
        return [1.0, 1.0]

    out = run([f, g], ["1+1=", "1+1="])
    assert out.metrics == {"f/len": [2.5], "shared": [1.0, 3.0]}
    assert out.extras == {"judge": ["good", "bad"], "why": [1, 2]}
    # nothing kept between calls
    assert run([rewards.format], ["1+1="]).metrics == {}


# ---------------------------------------------------------------------------------------------------------
# score: bad output is named (function, row) before later functions run
# ---------------------------------------------------------------------------------------------------------


class Later:
    """A reward that records whether it ran."""

    def __init__(self):
        self.ran = False
        self.__name__ = "later"

    def __call__(self, prompts, **kw):
        self.ran = True
        return [0.0] * len(prompts)


def _bad(output=None, exc=None):
    def bad(prompts, **kw):
        if exc is not None:
            raise exc
        return output

    return bad


@pytest.mark.parametrize(
    "bad, message",
    [
        (
            _bad(exc=KeyError("answer")),
            r"^reward function 'bad' raised on rows 10\.\.12: KeyError: 'answer'$",
        ),
        (_bad([1.0, 2.0]), r"^reward function 'bad' returned 2 rewards for 3 rows \(10\.\.12\)"),
        (_bad({"a": 1.0}), r"^reward function 'bad' returned a dict; expected a list of 3 floats"),
        (_bad(1.0), r"^reward function 'bad' returned a float; expected a list of 3 floats"),
        (_bad([1.0, math.nan, 0.0]), r"^reward function 'bad' returned nan for row 11; expected a finite"),
        (_bad([1.0, 0.0, -math.inf]), r"^reward function 'bad' returned -inf for row 12; expected a finite"),
        (
            _bad([1.0, "0.5", 0.0]),
            r"^reward function 'bad' returned '0.5' \(str\) for row 11; expected a float",
        ),
    ],
)
def test_bad_reward_output_is_named(bad, message):
    later = Later()
    with pytest.raises(RewardError, match=message) as err:
        run([rewards.format, bad, later], ["1+1="] * 3, row_offset=10)
    assert not later.ran
    if "raised" in message:
        assert isinstance(err.value.__cause__, KeyError)


def test_async_reward_errors_are_named():
    async def judge(prompts, **kw):
        raise ConnectionError("judge down")

    async def judge2(prompts, **kw):
        return [math.nan] * len(prompts)

    with pytest.raises(
        RewardError, match=r"^reward function 'judge' raised on rows 0\.\.1: ConnectionError"
    ) as e:
        run([judge], ["1+1="] * 2)
    assert isinstance(e.value.__cause__, ConnectionError)
    with pytest.raises(RewardError, match=r"^reward function 'judge2' returned nan for row 5"):
        run([judge2], ["1+1="] * 2, row_offset=5)


def test_row_with_no_reward_is_named():
    def only_first(prompts, **kw):
        return [1.0] + [None] * (len(prompts) - 1)

    # exact_match does not apply to "hi there" (None), only_first scores row 0 only: row 1 has no reward
    with pytest.raises(
        RewardError,
        match=r"^row 21: every reward function returned None \(exact_match, only_first\); prompt: 'hi there'$",
    ):
        run(
            [rewards.exact_match, only_first],
            ["hi there", "hi there", "1+1="],
            ["2", "2", "2"],
            row_offset=20,
        )
    with pytest.raises(RewardError, match=r"^row 0: .*; prompt: '1{199}\.\.\.$"):
        run([rewards.exact_match], ["1" * 300])
    # one applicable reward per row is enough
    out = run([rewards.exact_match, only_first], ["hi there", "1+1="], ["2", "2"])
    assert math.isnan(out.values[0, 0]) and out.values[0, 1] == 1.0 and out.values[1, 0] == 1.0


def test_bad_logging_is_named():
    def short(completions, log_extra, **kw):
        log_extra("note", ["x"])
        return [0.0, 0.0]

    def twice(completions, log_extra, **kw):
        log_extra("note", ["x", "y"])
        log_extra("note", ["x", "y"])
        return [0.0, 0.0]

    def word(completions, log_metric, **kw):
        log_metric("m", "high")
        return [0.0, 0.0]

    with pytest.raises(
        RewardError, match=r"^reward function 'short': log_extra\('note', \.\.\.\): 1 values for 2 rows"
    ):
        run([short], ["1+1="] * 2)
    with pytest.raises(
        RewardError, match=r"^reward function 'twice': log_extra\('note', \.\.\.\): the column was already"
    ):
        run([twice], ["1+1="] * 2)
    with pytest.raises(
        RewardError, match=r"^reward function 'word': log_metric\('m', 'high'\) is not a number"
    ):
        run([word], ["1+1="] * 2)


def test_bad_batch_is_named():
    with pytest.raises(ValueError, match="score: no rewards to score with"):
        run([], ["1+1="])
    with pytest.raises(ValueError, match="score: answer has 1 rows, prompts has 2"):
        run([rewards.format], ["1+1="] * 2, columns={"answer": ["2"]})
    with pytest.raises(
        ValueError, match="score: dataset column 'trainer_state' has the name of a reward-function"
    ):
        run([rewards.format], ["1+1="], columns={"trainer_state": [0]})


# ---------------------------------------------------------------------------------------------------------
# The reward model as a reward
# ---------------------------------------------------------------------------------------------------------

PROMPTS = ["3+4=", "12+29=", "0+0=", "7+1=", "29+29="]
COMPLETIONS = ["7", "41", "00000", "9", "58"]


@pytest.fixture(scope="module")
def reward_model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("rm")
    tokenizer = embedded.build_tokenizer()
    torch.manual_seed(0)
    config = embedded.tiny_model_config(num_labels=1, pad_token_id=tokenizer.pad_token_id)
    AutoModelForSequenceClassification.from_config(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def straight_scores(path, texts):
    """Each text alone (no padding, no special tokens added), scored at its last token."""
    model = AutoModelForSequenceClassification.from_pretrained(path).eval()
    tokenizer = embedded.build_tokenizer()
    with torch.no_grad():
        return torch.stack(
            [
                model(torch.tensor([tokenizer(t, add_special_tokens=False)["input_ids"]])).logits[0, 0]
                for t in texts
            ]
        )


def rel_err(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("conversational", [False, True])
def test_reward_model_equals_straight_recomputation(reward_model_dir, conversational):
    # batches of 2 over 5 rows of different lengths: padding inside a batch, a short last batch
    (rm,) = rewards.resolve([], reward_model_name_or_path=str(reward_model_dir), reward_model_batch_size=2)
    assert rm.name == reward_model_dir.name
    prompts = [conv("user", p) for p in PROMPTS] if conversational else PROMPTS
    completions = [conv("assistant", c) for c in COMPLETIONS] if conversational else COMPLETIONS
    if conversational:  # the chat template, prompt + completion messages
        texts = [
            f"<|im_start|>user\n{p}<|im_end|>\n<|im_start|>assistant\n{c}<|im_end|>\n"
            for p, c in zip(PROMPTS, COMPLETIONS, strict=True)
        ]
    else:
        texts = [p + c for p, c in zip(PROMPTS, COMPLETIONS, strict=True)]
    out = rewards.score(
        [rm],
        prompts=prompts,
        completions=completions,
        completion_ids=[[7]] * 5,
        columns={},
        trainer_state=TrainerState(),
    )
    expected = straight_scores(reward_model_dir, texts)
    assert rel_err(out.values[:, 0], expected) <= RTOL
    assert out.values[:, 0].unique().numel() == 5  # distinct scores: the comparison sees each row


def test_reward_model_errors(tmp_path, reward_model_dir):
    with pytest.raises(ConfigError, match=r"^reward_model_name_or_path='/no/such/rm': no such file"):
        rewards.resolve(["format"], reward_model_name_or_path="/no/such/rm")
    AutoModelForCausalLM.from_config(embedded.tiny_model_config()).save_pretrained(tmp_path)
    embedded.build_tokenizer().save_pretrained(tmp_path)
    with pytest.raises(ConfigError, match=r"not a trained reward model .*\['Qwen2ForCausalLM'\]"):
        rewards.resolve(["format"], reward_model_name_or_path=str(tmp_path))
    two = tmp_path / "two_labels"
    AutoModelForSequenceClassification.from_config(embedded.tiny_model_config(num_labels=2)).save_pretrained(
        two
    )
    embedded.build_tokenizer().save_pretrained(two)
    with pytest.raises(
        ConfigError, match=r"two_labels': its head has 2 labels; a reward model gives one score"
    ):
        rewards.resolve(["format"], reward_model_name_or_path=str(two))
    (rm,) = rewards.resolve([], reward_model_name_or_path=str(reward_model_dir))
    with pytest.raises(
        RewardError,
        match=r"raised on rows 3\.\.4: ValueError: the batch's row 1: prompt \+ completion is 260 tokens, longer than the reward model's context \(max_position_embeddings=256\)",
    ):
        rewards.score(
            [rm],
            prompts=["1+1=", "1" * 256 + "+1="],
            completions=["2", "3"],
            completion_ids=[[7], [7]],
            columns={},
            trainer_state=TrainerState(),
            row_offset=3,
        )


# ---------------------------------------------------------------------------------------------------------
# Against TRL 1.16's GRPOTrainer._calculate_rewards
# ---------------------------------------------------------------------------------------------------------


def judged(prompts, completions, answer, log_metric, log_extra, **kwargs):
    """A reward function that reads a column, returns None (answer "0"), and logs through TRL's callbacks."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    hits = [t == a for t, a in zip(texts, answer, strict=True)]
    log_metric("judged/hits", float(sum(hits)))
    log_extra("verdict", ["hit" if h else "miss" for h in hits])
    return [1.0 if h else (None if a == "0" else -0.5) for h, a in zip(hits, answer, strict=True)]


@pytest.fixture(scope="module")
def trl_trainer(reward_model_dir, tmp_path_factory):
    """A GRPOTrainer with `judged` and the same reward model, which TRL loads (model and tokenizer) itself."""
    import_or_skip("trl")
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    args = GRPOConfig(
        output_dir=str(tmp_path_factory.mktemp("grpo")),
        use_cpu=True,
        bf16=False,
        report_to=[],
        per_device_train_batch_size=2,
        num_generations=2,
        max_completion_length=4,
    )
    return GRPOTrainer(
        model=embedded.build_model(),
        reward_funcs=[str(reward_model_dir), judged],  # TRL's script's order: the reward model first
        args=args,
        train_dataset=Dataset.from_list([{"prompt": "1+1=", "answer": "2"}] * 2),
        processing_class=embedded.build_tokenizer(),
    )


@pytest.mark.parametrize("conversational", [False, True])
def test_score_equals_trl_calculate_rewards(trl_trainer, reward_model_dir, conversational):
    answers = ["7", "40", "0", "8", "58"]  # rows 1 and 3 miss (-0.5), row 2 misses with answer "0" (None)
    prompts = [conv("user", p) for p in PROMPTS] if conversational else PROMPTS
    completions = [conv("assistant", c) for c in COMPLETIONS] if conversational else COMPLETIONS
    ids = [[3 + i] for i in range(5)]
    trl_trainer._pending_metrics.clear()
    trl_trainer._pending_extra_logs.clear()
    inputs = [{"prompt": p, "answer": a} for p, a in zip(prompts, answers, strict=True)]
    expected = trl_trainer._calculate_rewards(inputs, prompts, completions, ids)

    resolved = rewards.resolve([judged], reward_model_name_or_path=str(reward_model_dir))
    ours = rewards.score(
        resolved,
        prompts=prompts,
        completions=completions,
        completion_ids=ids,
        columns={"answer": answers},
        trainer_state=TrainerState(),
    )
    assert [r.name for r in resolved] == trl_trainer.reward_func_names
    assert torch.equal(torch.isnan(ours.values), torch.isnan(expected))
    assert torch.isnan(ours.values[2, 1]) and ours.values[1, 1] == -0.5
    assert torch.equal(ours.values[:, 1].nan_to_num(), expected[:, 1].nan_to_num())
    assert rel_err(ours.values[:, 0], expected[:, 0]) <= RTOL
    assert ours.metrics == dict(trl_trainer._pending_metrics)
    assert ours.extras == dict(trl_trainer._pending_extra_logs)
