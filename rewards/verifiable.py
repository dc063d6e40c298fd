"""Rule-based rewards on the response format and the integer answer, and the table of correctness graders.

`exact_int` is the same grader evaluation uses (`parse.grade_integer`), so a training reward of 1 means exactly
what an evaluation hit means. The budget rewards pick their correctness check from `GRADERS` by name.
"""

from __future__ import annotations

import functools
from typing import Callable

from .parse import THINK_END, THINK_START, grade_integer, split_think
from posttrain.algo.registry import Registry, UnknownAlgoError

from .registry import RewardOutput, get_field, mean, register_reward


class UnknownGraderError(UnknownAlgoError):
    """An unknown grader name (a ValueError and a KeyError)."""


def _grade_math(completion: str, answer) -> bool:
    from .math import math_equal_completion  # lazy: math-verify pulls in sympy

    return math_equal_completion(completion, answer)


def normalize_text_answer(text: str) -> str:
    """An answer as `grade_exact` compares it: the last ``\\boxed{}``'s content if any, whitespace collapsed,
    surrounding quotes and one trailing period dropped, case folded.

    >>> normalize_text_answer("  The  Cat. "), normalize_text_answer("so \\\\boxed{B}")
    ('the cat', 'b')
    """
    from .math import last_boxed  # no sympy: math-verify is imported only by math_equal

    boxed = last_boxed(text)
    text = " ".join((boxed if boxed is not None else text).split())
    text = text.strip("\"'`")
    if text.endswith("."):
        text = text[:-1]
    return text.strip().casefold()


def grade_exact(completion: str, answer) -> bool:
    """The answer after ``</think>`` equals the gold answer as text (`normalize_text_answer` on both): for answers
    that are words, letters or lists rather than numbers. No credit without ``</think>``.

    >>> grade_exact("r</think>\\n\\nParis.", "paris"), grade_exact("r</think>Lyon", "Paris"), grade_exact("Paris", "Paris")
    (True, False, False)
    """
    parsed = split_think(completion)
    return parsed.closed and normalize_text_answer(parsed.answer) == normalize_text_answer(str(answer))


def grade_code(completion: str, tests) -> bool:
    """The code in the answer passes every one of `tests` (the example's tests, not a text answer: see `gold`) in
    the sandbox (`code.CodeReward`, bubblewrap isolation)."""
    return _code_judge().score_one(completion, tests)[0] == 1.0


@functools.lru_cache(maxsize=None)
def _code_judge():
    """One all-or-nothing `code` reward for the process (built lazily: the sandbox is probed when code is first
    graded)."""
    from .code import CodeReward

    return CodeReward(partial=False, num_workers=1)


def grade_reasoning_gym(completion: str, entry: dict) -> bool:
    """The answer after ``</think>`` gets the full score of the entry's reasoning-gym dataset (its own
    `score_answer`, which reads the whole entry: answer and metadata). No credit without ``</think>``."""
    parsed = split_think(completion)
    if not parsed.closed:
        return False
    return _gym_scorer(entry["metadata"]["source_dataset"])(parsed.answer.strip(), entry) >= 1.0


@functools.lru_cache(maxsize=None)
def _gym_scorer(dataset: str):
    import reasoning_gym  # the optional extra: only reasoning-gym tasks carry such entries

    return reasoning_gym.get_score_answer_fn(dataset)


# (completion, gold) -> bool by name: the `data.grader` strings
GRADERS = Registry("grader", error=UnknownGraderError)
for _name, _fn in (("exact_int", grade_integer), ("math", _grade_math), ("exact", grade_exact), ("code", grade_code),
                   ("reasoning_gym", grade_reasoning_gym)):
    GRADERS.register(_name)(_fn)
# graders that read the example's `tests` field (code: its tests; reasoning_gym: its entry), not its answer
GRADES_TESTS = frozenset({"code", "reasoning_gym"})


def gold_field(grader: str) -> str:
    """The per-example field `grader` compares a completion with: `tests` or `answer` (`gold`)."""
    return "tests" if grader in GRADES_TESTS else "answer"


def gold(grader: str, answer, tests=None):
    """What `grader` compares a completion with: the example's tests for "code" (its reasoning-gym entry for
    "reasoning_gym"), its answer otherwise."""
    if grader in GRADES_TESTS:
        if tests is None:
            raise ValueError(f"the {grader} grader needs the example's tests or entry (data.tests_column, or a "
                             "reasoning-gym task)")
        return tests
    return answer


def judge(grader: str, completion: str, answer, tests=None) -> bool:
    """Whether `completion` answers a problem (its `answer`, and its `tests`: a code task's tests or a reasoning-gym
    entry) by the grader named `grader`: the one verdict of the RL rewards' correctness, the RM labels and every
    evaluation."""
    return bool(get_grader(grader)(completion, gold(grader, answer, tests)))


def get_grader(name: str) -> Callable[[str, object], bool]:
    """The grader registered under `name` (`GRADERS`: "exact_int", "math", "exact", "code", "reasoning_gym"): the
    one function by which the RL reward's correctness, the RM labels and every evaluation judge an answer to a
    task; it takes the completion and `gold(name, answer, tests)`."""
    return GRADERS.get(name)


class GraderReward:
    """1.0 when `grader` (a `GRADERS` name) judges the completion right, else 0.0: a grader as a reward, reading the
    per-example field the grader compares with (`gold_field`: ``answer``, or ``tests`` for code and reasoning-gym)."""

    grader = ""

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        scores = correctness(self.grader, completions, fields, self.reward_name)
        return RewardOutput(scores, {"accuracy": mean(scores)})


def correctness(grader: str, completions, fields: dict, reward: str) -> list[float]:
    """1.0 or 0.0 per completion by `grader`, against the batch field it compares with (`gold_field`); `reward`
    names the reward in a missing-field error. What the grader rewards and the budget rewards' correctness share."""
    golds = get_field(fields, gold_field(grader), len(completions), reward=reward)
    grade = get_grader(grader)
    return [1.0 if grade(c, g) else 0.0 for c, g in zip(completions, golds)]


@register_reward("exact_int")
class ExactIntReward(GraderReward):
    """1.0 when the completion closed its think block and then stated exactly the gold integer, else 0.0.

    Fields: ``answer`` (B,) gold integers (int or str). A gold answer that is not an integer raises (a data bug).

    >>> ExactIntReward()(["q"], ["7+3</think>\\n\\n10"], answer=[10]).scores
    [1.0]
    """

    grader = "exact_int"


@register_reward("reasoning_gym")
class ReasoningGymReward(GraderReward):
    """1.0 when the answer after ``</think>`` gets the full score of its reasoning-gym dataset
    (`grade_reasoning_gym`), else 0.0. Fields: ``tests`` (B,) the examples' reasoning-gym entries."""

    grader = "reasoning_gym"


@register_reward("exact")
class ExactReward(GraderReward):
    """1.0 when the answer after ``</think>`` equals the gold ``answer`` as text (`grade_exact`), else 0.0.

    >>> ExactReward()(["q"], ["hm</think>\\n\\nParis"], answer=["paris"]).scores
    [1.0]
    """

    grader = "exact"


def is_well_formed(completion: str) -> bool:
    """Exactly one think block and a non-empty answer after it, with no stray think tags anywhere else.

    The completion may start inside the think block (the generation prompt ended with ``<think>``) or with
    ``<think>``; at most one ``<think>`` (only as the very first thing), exactly one ``</think>``.

    >>> is_well_formed("reasoning</think>\\n\\n42"), is_well_formed("<think>r</think>42")
    (True, True)
    >>> is_well_formed("r</think>"), is_well_formed("a<think>b</think>c"), is_well_formed("r</think>4</think>2")
    (False, False, False)
    """
    if completion.count(THINK_START) > 1 or completion.count(THINK_END) != 1:
        return False
    if THINK_START in completion and not completion.lstrip().startswith(THINK_START):
        return False  # a <think> that is not the opening one is nested inside the thinking
    parsed = split_think(completion)
    return parsed.closed and bool(parsed.answer) and THINK_START not in parsed.answer


@register_reward("format")
class FormatReward:
    """1.0 for a well-formed response (see `is_well_formed`), else 0.0. Needs no fields."""

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        scores = [1.0 if is_well_formed(c) else 0.0 for c in completions]
        closed = [1.0 if THINK_END in c else 0.0 for c in completions]
        return RewardOutput(scores, {"well_formed": mean(scores), "closed": mean(closed)})
