"""Pretraining documents of a task's text for the embedded base model (the `corpus` hook's shared framing).

Where a problem sits in a document varies (plain text, a chat turn, a preamble), so the model learns to find the
problem by content rather than by its distance from the start of the document: a model that has only seen the
problem first cannot find it after a chat header, and SFT alone does not repair that.
"""

from __future__ import annotations

import random
from typing import Callable

FRAMES = (
    ("", "\n", "\n=", ""),
    ("Problem: ", "\nWork: ", "\nAnswer: ", ""),
    ("<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n<think>", "</think>\n\n", "<|im_end|>"),
    ("<|im_start|>system\nThinking budget: {b} tokens.<|im_end|>\n<|im_start|>user\n",
     "<|im_end|>\n<|im_start|>assistant\n<think>", "</think>\n\n", "<|im_end|>"),
)


def framed_document(rng: random.Random, prompt: str, trace: Callable[[random.Random], str], answer,
                    direct_share: float = 0.1, copy_share: float = 0.3) -> str:
    """`prompt`, a body and `answer` in one of `FRAMES`: with probability `direct_share` no reasoning, with
    `copy_share` the prompt copied verbatim instead of solved (every token is "the one after the token just
    written": the lookup, an induction head, each trace line needs to find its next operand), else `trace(rng)`.
    A budget frame shows a budget the body fits loosely (16-128 tokens)."""
    pre, mid, end, post = rng.choice(FRAMES)
    r = rng.random()
    if r < direct_share:
        body = ""
    elif r < direct_share + copy_share:
        return f"{pre}{prompt}{mid}{prompt}".replace("{b}", str(rng.choice((16, 32, 64))))
    else:
        body = trace(rng)
    doc = f"{pre}{prompt}{mid}{body}{end}{answer}{post}"
    return doc.replace("{b}", str(rng.choice((16, 32, 64, 128))))
