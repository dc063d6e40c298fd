"""Batched generation through the chat template, with an optional hard cap on thinking.

`budget` per prompt: an int N renders the budget instruction (0 = empty think block pre-filled) and `None` is
autonomous thinking. With `cap=True`, a row that has spent N thinking tokens without closing its think block
gets `</think>` forced as its next token (and is marked `forced`): the "hard cap" of budget-forcing
(Muennighoff et al. 2025, s1), used by sweeps for capped accuracy and by rollouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.rewards.parse import count_think_tokens_ids
from posttrain.tokenizer import think_token_ids


@dataclass
class Response:
    text: str  # decoded completion (starts inside the think block unless budget 0)
    ids: list[int]  # completion ids, up to and including EOS
    n_think: int  # thinking tokens (strictly between <think> and </think>)
    closed: bool  # </think> was written (by the model or forced)
    forced: bool  # </think> was forced by the cap
    budget: int | None


class ThinkCap:
    """LogitsProcessor: force `</think>` for rows whose thinking reached their cap (None = no cap)."""

    def __init__(self, think_end_id: int, caps: list[int | None], prompt_len: int, device):
        self.end_id = think_end_id
        self.prompt_len = prompt_len
        big = 10**9
        self.caps = torch.tensor([big if c is None else c for c in caps], device=device)
        self.closed = torch.tensor([c is not None and c == 0 for c in caps], device=device)  # budget 0: pre-closed
        self.forced = torch.zeros(len(caps), dtype=torch.bool, device=device)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        gen = input_ids[:, self.prompt_len :]
        if gen.shape[1]:
            self.closed |= gen[:, -1] == self.end_id
        n_think = gen.shape[1]  # every generated token so far is thinking while the row is still open
        force = (~self.closed) & (n_think >= self.caps)
        if force.any():
            # a row whose own first choice is already </think> closes by itself: not counted as forced (with
            # sampling this is judged by the most likely token, since the sampled one is not known yet)
            self.forced |= force & (scores.argmax(-1) != self.end_id)
            scores[force] = float("-inf")
            scores[force, self.end_id] = 0.0
        return scores


def render_prompts(tokenizer, prompts: list[str], budgets: list[int | None]) -> list[str]:
    out = []
    for p, b in zip(prompts, budgets):
        kw = {} if b is None else {"thinking_budget": int(b)}
        out.append(tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                                 tokenize=False, **kw))
    return out


@torch.no_grad()
def generate(
    model,
    tokenizer,
    prompts: list[str],
    budgets: list[int | None],
    max_new_tokens: int = 160,
    batch_size: int = 64,
    cap: bool = False,
    do_sample: bool = False,
    temperature: float = 1.0,
    seed: int | None = None,
) -> list[Response]:
    """Generate one response per prompt. Prompts are sorted by length into batches to waste little padding."""
    from transformers import LogitsProcessorList

    start_id, end_id = think_token_ids(tokenizer)
    texts = render_prompts(tokenizer, prompts, budgets)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    results: list[Response | None] = [None] * len(texts)
    device = next(model.parameters()).device
    padding_side, tokenizer.padding_side = tokenizer.padding_side, "left"  # restored below
    if seed is not None:
        torch.manual_seed(seed)
    was_training = model.training
    model.eval()
    for lo in range(0, len(order), batch_size):
        idx = order[lo : lo + batch_size]
        enc = tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True, add_special_tokens=False).to(device)
        plen = enc["input_ids"].shape[1]
        caps = [budgets[i] if cap else (0 if budgets[i] == 0 else None) for i in idx]
        proc = ThinkCap(end_id, caps, plen, device)
        out = model.generate(
            **enc,
            max_new_tokens=max_new_tokens,
            do_sample=do_sample,
            temperature=temperature if do_sample else None,
            top_p=None,
            top_k=None,
            logits_processor=LogitsProcessorList([proc]),
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row, i in enumerate(idx):
            ids = out[row, plen:].tolist()
            if tokenizer.eos_token_id in ids:
                ids = ids[: ids.index(tokenizer.eos_token_id) + 1]
            if budgets[i] == 0:  # the prompt already closed the think block
                n_think, closed = 0, True
            else:
                n_think, closed = count_think_tokens_ids(ids, start_id, end_id)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if budgets[i] == 0:
                text = "</think>\n\n" + text
            results[i] = Response(text, ids, n_think, closed, bool(proc.forced[row]), budgets[i])
    if was_training:
        model.train()
    tokenizer.padding_side = padding_side
    return results  # type: ignore[return-value]
