"""The embedded task (`data.source: arithmetic`): left-to-right arithmetic, generated from seeds (`tasks.arithmetic`).

Problems are drawn fresh from a seed wherever a stage needs them (SFT from `seed + 1`, an RL step from
`seed + step`, the RM from its own seed, each RL eval budget from (`eval.seed`, budget), the eval and sweep stages
from their `seed`); graded by `exact_int`. It offers every hook: full and budget-compressed demonstrations
(`sft.budget_traces`), the first wrong step of a response (`trace_lines.first_error_offset`) and the base model's
corpus.
"""

from __future__ import annotations

import hashlib
import random

from posttrain.budgets import draw_budget
from posttrain.data import Example
from posttrain.tasks.arithmetic import (fit_trace, generate_problems, make_trace, most_lines_trace, parse_expression,
                                       read_back_trace, sample_fitting_trace, sample_problem, trace_ladder)
from posttrain.tasks.corpus import framed_document
from posttrain.tasks.task import Task, register_task


@register_task("arithmetic")
class ArithmeticTask(Task):
    """The embedded arithmetic task over the recipe's `task.min/max_difficulty`."""

    name = "arithmetic"
    hooks = frozenset({"demonstrations", "budget_demonstrations", "first_error", "corpus"})
    default_grader = "exact_int"

    def train_examples(self, n: int, seed: int, bad_rows_file=None) -> list[Example]:
        style = self.rc.sft.autonomous_style
        return [Example(p.expression, str(p.answer), p.difficulty, make_trace(p, style, 1))
                for p in generate_problems(n, seed, self.difficulties)]

    def rm_problems(self, n: int, seed: int) -> list:
        return generate_problems(n, seed, self.difficulties)

    def step_problems(self, cfg, step: int) -> tuple[list, list]:
        problems = generate_problems(cfg.prompts_per_step, self.rc.seed + step, self.difficulties)
        rng = random.Random(self.rc.seed + step)
        return problems, [draw_budget(rng, cfg.budgets) for _ in problems]

    def rl_eval_problems(self, cfg, budget) -> list:
        """`eval_n_per_difficulty` per difficulty, from a seed made of `eval.seed` and the budget, so each budget
        has problems of its own and adding a budget leaves the others' unchanged."""
        mixed = int.from_bytes(hashlib.sha256(f"{self.rc.eval.seed}/{budget}".encode()).digest()[:8], "big")
        return generate_problems(cfg.eval_n_per_difficulty * len(self.difficulties), mixed, self.difficulties)

    def held_out(self, n_per_difficulty: int, seed: int) -> list:
        return generate_problems(n_per_difficulty * len(self.difficulties), seed, self.difficulties)

    # hooks
    def demonstration(self, problem) -> str:
        return make_trace(_problem(problem), "verbose", 1)

    def budget_demonstration(self, problem, budget: int, count, rng: random.Random) -> str:
        sft = self.rc.sft
        return budget_trace(_problem(problem), budget, count, rng, sft.budget_traces, sft.full_trace_share,
                            sft.truncate_share)

    def first_error(self, problem, text: str) -> int | None:
        """`trace_lines.first_error_offset`; a first line that reads the problem back is no error when the SFT
        stage taught it (`sft.budget_traces: full_read_back`)."""
        from posttrain.tasks.trace_lines import first_error_offset

        return first_error_offset(_problem(problem), text, read_back=teaches_read_back(self.rc.sft.budget_traces))

    def corpus_document(self, rng: random.Random, direct_share: float = 0.1) -> str:
        return self.corpus_document_of(rng, direct_share)

    @staticmethod
    def corpus_document_of(rng: random.Random, direct_share: float = 0.1) -> str:
        """A document of a problem of any difficulty 1-8 (the base model's corpus whatever the recipe's range)."""
        return corpus_document(rng, rng.randint(1, 8), direct_share)


def _problem(p):
    """An arithmetic `Problem` (one given, or parsed from an example's prompt)."""
    return p if hasattr(p, "operands") else parse_expression(getattr(p, "expression", None) or p.prompt)


def corpus_document(rng: random.Random, difficulty: int, direct_share: float = 0.1, copy_share: float = 0.3) -> str:
    """One pretraining document: a problem of `difficulty` with a trace of the ladder (the verbose style favoured:
    it carries the per-step facts the model must learn), framed (`corpus.framed_document`)."""
    p = sample_problem(rng, difficulty)

    def trace(rng: random.Random) -> str:
        ladder = trace_ladder(p)
        weights = [3.0] + [2.0 / max(1, len(ladder) - 1)] * (len(ladder) - 1)
        style, group = rng.choices(ladder, weights=weights)[0]
        return make_trace(p, style, group)

    return framed_document(rng, p.expression, trace, p.answer, direct_share, copy_share)


def budget_trace(p, budget: int, count_tokens, rng: random.Random, budget_traces: str | list[str] = "most_explicit",
                 full_trace_share: float = 1.0, truncate_share: float = 0.0) -> str:
    """The thinking a budgeted example of arithmetic problem `p` demonstrates (`sft.budget_traces`; a list: one of
    its demonstrators drawn uniformly per example)."""
    if isinstance(budget_traces, (list, tuple)):
        if not budget_traces:
            raise ValueError("budget_traces: an empty list names no demonstrator")
        budget_traces = rng.choice(list(budget_traces))
    if budget_traces == "most_explicit":
        return fit_trace(p, budget, count_tokens)
    if budget_traces == "most_lines":
        return most_lines_trace(p, budget, count_tokens)
    if budget_traces == "sampled":
        return sample_fitting_trace(p, budget, count_tokens, rng, full_trace_share, truncate_share)
    if budget_traces == "full_or_empty":
        full = make_trace(p, "verbose", 1)
        return full if count_tokens(full) <= budget else ""
    if budget_traces == "full":
        return make_trace(p, "verbose", 1)
    if budget_traces == "full_read_back":
        return read_back_trace(p)
    raise ValueError("budget_traces must be most_explicit, most_lines, sampled, full_or_empty, full or "
                     f"full_read_back, "
                     f"got {budget_traces!r}")


def teaches_read_back(budget_traces: str | list[str]) -> bool:
    """Whether SFT demonstrates reading the problem back first (`full_read_back`), so that such a first line is no
    error to blame (`first_error_offset`'s `read_back`)."""
    return "full_read_back" in (budget_traces if isinstance(budget_traces, (list, tuple)) else [budget_traces])
