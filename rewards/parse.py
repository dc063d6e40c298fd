"""Reading a response: its think block, its answer, and how many thinking tokens it spent.

The convention (see `posttrain/chat_template.jinja`): an assistant turn is
``<think>{thinking}</think>\\n\\n{answer}``. The generation prompt already ends with ``<think>``, so a
*completion* (the generated text or ids) normally starts inside the think block; a full assistant text starts
with ``<think>``. Both forms are accepted here.

Thinking tokens are the tokenizer's tokens strictly between ``<think>`` and ``</think>``. On ids that is exact;
on text we re-tokenize the span, which agrees with the generated ids whenever the generation decoded cleanly.

This module is the single place that knows the format: rewards, evaluation and budget shaping all call it, so
training and evaluation can never disagree about what the answer was.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

THINK_START = "<think>"
THINK_END = "</think>"

_END_MARKERS = ("<|im_end|>", "<|endoftext|>")
_INT_RE = re.compile(r"^\s*([+-]?\d+)\s*$")


@dataclass(frozen=True)
class ParsedResponse:
    thinking: str  # text strictly between <think> and </think> ("" when absent)
    answer: str  # text after </think>, stripped; the whole text when no </think> was written
    closed: bool  # True when a </think> was written
    n_think_blocks: int  # number of <think> openings (0 or 1 in a well-formed completion)


def split_think(text: str) -> ParsedResponse:
    """Split a completion or assistant turn into (thinking, answer).

    >>> split_think("7+3=10</think>\\n\\n10").answer
    '10'
    >>> split_think("<think>a</think>b").thinking
    'a'
    >>> split_think("never closed").closed
    False
    """
    n_open = text.count(THINK_START)
    body = text
    if body.lstrip().startswith(THINK_START):
        body = body.lstrip()[len(THINK_START):]
    if THINK_END not in body:
        return ParsedResponse(thinking=body, answer="", closed=False, n_think_blocks=n_open)
    thinking, answer = body.split(THINK_END, 1)
    answer = answer.strip()
    for marker in _END_MARKERS:  # an undecoded end-of-turn token is not part of the answer
        answer = answer.removesuffix(marker).strip()
    return ParsedResponse(thinking=thinking, answer=answer, closed=True, n_think_blocks=n_open)


def parse_int_answer(answer: str) -> int | None:
    """The integer an answer states, or None when the answer is not exactly one integer.

    >>> parse_int_answer(" 15 "), parse_int_answer("15 apples"), parse_int_answer("")
    (15, None, None)
    """
    m = _INT_RE.match(answer)
    return int(m.group(1)) if m else None


def grade_integer(completion: str, target: int | str) -> bool:
    """True when the completion closed its think block and then stated exactly the target integer.

    This is *the* grader for the embedded arithmetic task: the `exact_int` reward and every evaluation call it.
    """
    parsed = split_think(completion)
    if not parsed.closed:
        return False
    value = parse_int_answer(parsed.answer)
    return value is not None and value == int(target)


def count_think_tokens_ids(ids: Sequence[int], think_start_id: int, think_end_id: int) -> tuple[int, bool]:
    """Number of thinking tokens in a completion given as token ids, and whether `</think>` was reached.

    ids: (T,) completion ids. If they contain `think_start_id`, counting starts after its first occurrence;
    otherwise the completion is taken to start inside the think block (the generation prompt ended with
    `<think>`). Counting stops at the first `think_end_id` (exclusive); without one, every id counts.
    """
    ids = list(ids)
    start = ids.index(think_start_id) + 1 if think_start_id in ids else 0
    try:
        end = ids.index(think_end_id, start)
        return end - start, True
    except ValueError:
        return len(ids) - start, False


def count_think_tokens(text: str, tokenizer) -> int:
    """Number of thinking tokens in a completion given as text (re-tokenized with `tokenizer`)."""
    thinking = split_think(text).thinking
    if not thinking:
        return 0
    return len(tokenizer(thinking, add_special_tokens=False)["input_ids"])
