"""SFT examples for the thinking format: budgeted, autonomous and budget-0 samples, tokenized with the chat template.

Each example is `{"input_ids", "completion_mask", "mode", "budget", "n_think"}`; the completion (assistant part)
is the only part with loss. Budgeted samples carry a trace that fits the sampled budget (`budget_trace`): with
`budget_traces="sampled"` the full trace when it fits, else one drawn among all that fit
(`posttrain.tasks.arithmetic.sample_fitting_trace`); with `"most_explicit"` the most explicit one of uniform
grouping (`fit_trace`); with `"most_lines"` the one with the most lines, evenly grouped (`most_lines_trace`);
with `"full_or_empty"` the full trace when it fits, else none (as real data, whose reference reasoning is kept only
when it fits); with `"full"` the full trace whatever the budget (a teacher that never saw it: the example
thinks past a budget the trace does not fit); with `"full_read_back"` the same after a line that reads the problem
back (`read_back_trace`), a teacher whose preamble a budget makes wasteful; with a list of these, one drawn per
example. A budget entry `{low, high}` draws the example's budget from that range.
Autonomous samples carry the full trace, budget-0 samples none. This only teaches budgets roughly (the model sees
traces that fit, never a penalty for overrunning, and not which way of fitting it gets right most often):
sharpening both is RL's job.
"""

from __future__ import annotations

import random

from posttrain.budgets import draw_budget
from posttrain.config import BudgetMix
from posttrain.data import Example
from posttrain.tokenizer import THINK_END, count_tokens


def sample_mode(rng: random.Random, mix: BudgetMix) -> str:
    return rng.choices(["budgeted", "autonomous", "zero"], weights=[mix.budgeted, mix.autonomous, mix.zero])[0]


def tokenize_example(tokenizer, prompt: str, budget: int | None, thinking: str, answer: str) -> dict:
    """Prompt ids from the chat template (generation prompt included), completion = thinking, </think>, answer."""
    kw = {} if budget is None else {"thinking_budget": budget}
    prompt_ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                               tokenize=True, return_dict=False, **kw)
    completion = f"{answer}{tokenizer.eos_token}" if budget == 0 else f"{thinking}{THINK_END}\n\n{answer}{tokenizer.eos_token}"
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    return {"input_ids": list(prompt_ids) + completion_ids, "completion_mask": [0] * len(prompt_ids) + [1] * len(completion_ids)}


def build_sft_examples(tokenizer, examples: list[Example], budgets: list, mix: BudgetMix, seed: int,
                       max_length: int, fit=None) -> list[dict]:
    """Tokenized SFT rows of `examples`, each in a mode drawn from `mix`: autonomous (no budget, the example's full
    reasoning `Example.reasoning`), zero (budget 0, no thinking) or budgeted (a budget drawn from `budgets`, and the
    thinking `fit(example, budget, count_tokens, rng)` gives: the task's `budget_demonstration`; by default the
    full reasoning when it fits, none otherwise). Rows longer than `max_length` tokens are left out."""
    rng = random.Random(seed)
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    out = []
    for ex in examples:
        mode = sample_mode(rng, mix)
        full = ex.reasoning or ""
        if mode == "zero":
            budget, thinking = 0, ""
        elif mode == "autonomous":
            budget, thinking = None, full
        else:
            budget = draw_budget(rng, budgets)
            thinking = fit(ex, budget, count, rng) if fit is not None else full_or_empty(full, budget, count)
        row = tokenize_example(tokenizer, ex.prompt, budget, thinking, ex.answer)
        if len(row["input_ids"]) > max_length:
            continue
        row.update(mode=mode, budget=-1 if budget is None else budget, n_think=count(thinking))
        out.append(row)
    return out


def full_or_empty(full: str, budget: int, count_tokens) -> str:
    """The whole reasoning when it fits the budget, else none: never cut mid-thought."""
    return full if count_tokens(full) <= budget else ""
