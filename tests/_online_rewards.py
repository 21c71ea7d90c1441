"""Reward functions for the GRPO / RLOO tests, imported by `module:function` path (tests/ is on sys.path)."""

import math


def length(completions, **kwargs):
    """The completion's length in characters: varied, so that groups have spread and advantages move."""
    return [float(len(c if isinstance(c, str) else c[0]["content"])) for c in completions]


def parity(completion_ids, **kwargs):
    """1 for an even number of completion tokens, else 0."""
    return [float(len(ids) % 2 == 0) for ids in completion_ids]


def answer_seen(completions, answer, **kwargs):
    """Reads the dataset's `answer` column (a keyword argument), logs a metric and an extra column."""
    kwargs["log_metric"]("answer_length", sum(len(a) for a in answer) / len(answer))
    kwargs["log_extra"]("answer", list(answer))
    return [float(str(a) in c) for a, c in zip(answer, completions, strict=True)]


def raises(completions, **kwargs):
    raise RuntimeError("the grader is down")


def nan_at_three(completions, **kwargs):
    return [math.nan if i == 3 else 0.0 for i in range(len(completions))]
