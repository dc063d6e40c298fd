"""Batched generation in process, one response per prompt, with an optional hard cap on thinking.

`generate` wraps the project's one decoder, `posttrain.decode.Decoder` (the rollout worker's loop), around an
in-process model: the eval stage, the RM stage's samples and the export check use it, and the sweep and the RL
stage decode with the same loop on their `RolloutWorker`s, so a model gets the same tokens, thinking counts and
forcing everywhere.

`budget` per prompt: an int N renders the budget instruction (0 = empty think block pre-filled) and `None` is
autonomous thinking. With `cap=True`, a row that has spent N thinking tokens without closing its think block
gets `</think>` forced as its next token (and is marked `forced`): the "hard cap" of budget-forcing
(Muennighoff et al. 2025, s1), used by sweeps for capped accuracy and by rollouts. With `budget_in_prompt=False` the
prompt states no budget (autonomous) and the cap still forces `</think>` after N thinking tokens: s1's own setting,
the sweep's `forced` mode.

`reference_generate` (HF `model.generate` + the `ThinkCap` logits processor) is an independent implementation kept
only as the tests' check of the decoder and as `posttrain bench`'s peer; no stage uses it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from posttrain.decode import Decoder, RolloutBatch, render_prompts
from posttrain.rewards.parse import count_think_tokens_ids
from posttrain.tokenizer import think_token_ids

__all__ = ["Response", "generate", "batch_responses", "render_prompts", "reference_generate", "ThinkCap"]


@dataclass
class Response:
    text: str  # decoded completion: starts inside the think block, or "</think>\n\n..." for budget 0 in the prompt
    ids: list[int]  # completion ids, up to and including EOS
    n_think: int  # thinking tokens: generated before </think> (all when unclosed; 0 for budget 0 in the prompt)
    closed: bool  # </think> was written (by the model or forced)
    forced: bool  # </think> was forced by the cap
    budget: int | None


def batch_responses(batch: RolloutBatch) -> list[Response]:
    """A `RolloutBatch`'s B rows as `Response`s, in row order (ids cut after EOS, budgets the rows' own)."""
    lengths = batch.response_mask.sum(1).tolist()
    return [Response(batch.texts[i], batch.response_ids[i, : lengths[i]].tolist(), batch.n_think[i],
                     batch.closed[i], batch.forced[i], batch.budgets[i]) for i in range(len(batch))]


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
    budget_in_prompt: bool = True,
) -> list[Response]:
    """One response per prompt from `Decoder(model, tokenizer)`, in prompt order: greedy, or sampled at
    `temperature` (no top-p) with `do_sample`. Prompts are sorted by rendered length into batches of `batch_size`
    to waste little padding; when sampling, one generator seeded by `seed` (None: drawn from torch's global RNG)
    runs through all batches. `cap=False` never forces (the budget is only the prompt's instruction);
    `budget_in_prompt=False`: no budget in the prompt; with `cap`, `</think>` is still forced at `budgets[i]`.
    The model is put in eval mode and back in training mode afterwards if it was."""
    if len(prompts) != len(budgets):
        raise ValueError(f"{len(prompts)} prompts but {len(budgets)} budgets")
    if not prompts:
        return []
    decoder = Decoder(model, tokenizer)
    shown = budgets if budget_in_prompt else [None] * len(budgets)
    texts = render_prompts(tokenizer, prompts, shown)
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    gen = None
    if do_sample:
        gen = torch.Generator(device=decoder.device)
        gen.manual_seed(seed if seed is not None else int(torch.randint(2**62, (1,)).item()))
    results: list[Response | None] = [None] * len(prompts)
    was_training = model.training
    try:
        for lo in range(0, len(order), batch_size):
            idx = order[lo : lo + batch_size]
            batch = decoder.generate([prompts[i] for i in idx], [budgets[i] for i in idx], 1, max_new_tokens,
                                     temperature=temperature if do_sample else 1.0, greedy=not do_sample, cap=cap,
                                     budget_in_prompt=budget_in_prompt, generator=gen)
            for i, r in zip(idx, batch_responses(batch)):
                results[i] = r
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


# ----------------------------------------------------------------------------------- the reference (tests, bench)


class ThinkCap:
    """LogitsProcessor of `reference_generate` and the bench's HF peer: force `</think>` for rows whose thinking
    reached their cap (None = no cap). `preclosed`: the rows whose prompt closed the think block already (default:
    those of cap 0, budget 0 in the prompt). `__call__`: (B, prompt_len + t) ids, (B, V) scores -> (B, V) scores."""

    def __init__(self, think_end_id: int, caps: list[int | None], prompt_len: int, device,
                 preclosed: list[bool] | None = None):
        self.end_id = think_end_id
        self.prompt_len = prompt_len
        big = 10**9
        self.caps = torch.tensor([big if c is None else c for c in caps], device=device)
        if preclosed is None:
            preclosed = [c is not None and c == 0 for c in caps]
        self.closed = torch.tensor(preclosed, dtype=torch.bool, device=device)
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


@torch.no_grad()
def reference_generate(
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
    budget_in_prompt: bool = True,
) -> list[Response]:
    """The reference: `generate`'s contract on HF `model.generate` + `ThinkCap`, for the tests and the bench only.

    Differs from `generate` in two conventions: `n_think` is `count_think_tokens_ids`'s (a second `<think>` restarts
    the count) and a row counts as forced when its argmax was not `</think>`; when sampling, HF's own sampler
    (global torch RNG, seeded by `seed`) draws the tokens. Greedy, on responses that write no second `<think>`, the
    two agree token for token."""
    from transformers import LogitsProcessorList

    start_id, end_id = think_token_ids(tokenizer)
    shown = budgets if budget_in_prompt else [None] * len(budgets)
    preclosed = [b == 0 for b in shown]  # budget 0 in the prompt pre-fills an empty think block
    texts = render_prompts(tokenizer, prompts, shown)
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
        caps = [budgets[i] if cap else (0 if preclosed[i] else None) for i in idx]
        proc = ThinkCap(end_id, caps, plen, device, [preclosed[i] for i in idx])
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
            if preclosed[i]:  # the prompt already closed the think block
                n_think, closed = 0, True
            else:
                n_think, closed = count_think_tokens_ids(ids, start_id, end_id)
            text = tokenizer.decode(ids, skip_special_tokens=True)
            if preclosed[i]:
                text = "</think>\n\n" + text
            results[i] = Response(text, ids, n_think, closed, bool(proc.forced[row]), budgets[i])
    if was_training:
        model.train()
    tokenizer.padding_side = padding_side
    return results  # type: ignore[return-value]
