"""The `math` reward: symbolic equivalence of the final answer with the gold answer, via math-verify.

The answer is the text after ``</think>`` (when it holds a ``\\boxed{}``, the last one); `0.5`, `\\frac{1}{2}`
and `1/2` agree, as do `\\boxed{2\\sqrt{2}}` and `\\sqrt{8}`.

Timeouts and threads: math-verify's `parse(parsing_timeout=...)` / `verify(timeout_seconds=...)` implement their
timeout with `signal.alarm`, which only works on the main thread of the main interpreter (elsewhere it raises
ValueError). We pass the timeout only when running on the main thread (a plain process or a Ray actor's method,
which Ray runs on the worker's main thread), and `None` otherwise; in worker threads the only guard against a
pathological sympy expression is `max_answer_chars`, which bounds the text we hand to the parser. Note that the
alarm replaces any SIGALRM timer the caller had armed.
"""

from __future__ import annotations

import threading

from .parse import split_think
from .registry import RewardOutput, get_field, mean, register_reward

_BOXED = "\\boxed"


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in `text` (braces matched), or None.

    >>> last_boxed(r"so \\boxed{1} or rather \\boxed{\\frac{1}{2}}.")
    '\\\\frac{1}{2}'
    >>> last_boxed("no box") is None
    True
    """
    start = text.rfind(_BOXED + "{")
    if start < 0:
        return None
    i = start + len(_BOXED) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_math_answer(completion: str, require_closed: bool = True) -> str | None:
    """The answer text to grade: the last ``\\boxed{}`` after ``</think>``, else the whole answer.

    Without a ``</think>``: None when `require_closed` (the convention `grade_integer` follows), else the last
    ``\\boxed{}`` anywhere in the text (None when there is none).
    """
    parsed = split_think(completion)
    if not parsed.closed:
        return None if require_closed else last_boxed(completion)
    boxed = last_boxed(parsed.answer)
    return boxed if boxed is not None else parsed.answer


def _wrap_latex(text: str) -> str:
    # math-verify only reads LaTeX inside an anchor ($...$, \boxed{}); a bare "\sqrt{8}" would not parse.
    return text if ("$" in text or _BOXED in text) else f"${text}$"


def _timeout(timeout_s: float | None) -> int | None:
    if not timeout_s or threading.current_thread() is not threading.main_thread():
        return None
    return max(1, int(round(timeout_s)))


def math_equal(pred: str, gold, timeout_s: float | None = 5.0, max_answer_chars: int = 2000) -> bool:
    """True when the predicted answer text is mathematically equivalent to the gold answer (math-verify)."""
    from math_verify import parse, verify  # lazy: sympy is slow to import

    pred = pred.strip()
    if not pred or len(pred) > max_answer_chars:
        return False
    t = _timeout(timeout_s)
    gold_parsed = parse(_wrap_latex(str(gold).strip()), parsing_timeout=t)
    pred_parsed = parse(_wrap_latex(pred), parsing_timeout=t)
    if not gold_parsed or not pred_parsed:
        return False
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=t))


def math_equal_completion(completion: str, gold, require_closed: bool = True, timeout_s: float | None = 5.0,
                          max_answer_chars: int = 2000) -> bool:
    """`math_equal` on the answer `extract_math_answer` finds in a completion."""
    pred = extract_math_answer(completion, require_closed)
    return pred is not None and math_equal(pred, gold, timeout_s, max_answer_chars)


@register_reward("math")
class MathReward:
    """1.0 when the answer is equivalent to the gold ``answer`` field under math-verify, else 0.0.

    Params: require_closed (no credit without ``</think>``), timeout_s (math-verify's per-call timeout, main thread
    only, see module docstring), max_answer_chars (longer answers score 0 without being parsed).
    """

    def __init__(self, require_closed: bool = True, timeout_s: float = 5.0, max_answer_chars: int = 2000):
        self.require_closed = require_closed
        self.timeout_s = timeout_s
        self.max_answer_chars = max_answer_chars

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        answers = get_field(fields, "answer", len(completions), reward="math")
        scores = [
            1.0 if math_equal_completion(c, a, self.require_closed, self.timeout_s, self.max_answer_chars) else 0.0
            for c, a in zip(completions, answers)
        ]
        return RewardOutput(scores, {"accuracy": mean(scores)})
