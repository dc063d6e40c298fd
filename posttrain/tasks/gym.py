"""Any reasoning-gym dataset as a task (`data.source: reasoning_gym`; the optional extra
`pip install posttrain[reasoning-gym]`, pinned in constraints.txt).

    data: {source: reasoning_gym, dataset: chain_sum, config: {min_terms: 2, max_terms: 6}, size: 20000}

`data.size` entries are generated once from the recipe's seed with the dataset's own config (`data.config`, any
keyword its config class takes) and then used exactly as a data file's rows (`tasks.files`): rows spread through
them are held out for evaluation, the rest trained on. Graded by the dataset's own `score_answer` on the answer
after `</think>` (grader `reasoning_gym`: full score only). Difficulty: each entry's values of the dataset's
difficulty parameters that vary (`metadata["difficulty"]` names them and their ranges; `data.difficulty_keys`
picks others), placed in their ranges (`entry_difficulty`).

Hooks: `corpus` for every dataset (the base model pretrains on the training entries' text), `demonstrations` for
the datasets whose reasoning we can write (`TRACES`: `chain_sum`'s running sum) and `budget_demonstrations` where it
can be folded to fit a budget (`FITTING_TRACES`: several terms a line); without them SFT teaches the format and the
budgets on empty thinking, and RL must find the reasoning.
"""

from __future__ import annotations

import functools
import json
import random

from posttrain.data import Example, TextProblem
from posttrain.tasks.corpus import framed_document
from posttrain.tasks.files import FileTask, rl_held_out_rows
from posttrain.tasks.gym_check import import_gym
from posttrain.tasks.task import register_task

def chain_sum_trace(entry: dict) -> str:
    """`4 - 1 - 7` -> `4 - 1 = 3\\n3 - 7 = -4`: the running sum, one term per line."""
    tokens = entry["metadata"]["expression"].split()
    acc, lines = int(tokens[0]), []
    for op, term in zip(tokens[1::2], tokens[2::2]):
        new = acc + int(term) if op == "+" else acc - int(term)
        lines.append(f"{acc} {op} {term} = {new}")
        acc = new
    return "\n".join(lines)


def chain_sum_fitting_trace(entry: dict, budget: int, count) -> str:
    """The most explicit running sum that fits `budget` tokens (`count(text)` counts them): `group` terms folded
    per line, the smallest group that fits (`4 - 1 - 7 = -4` folds two); empty when not even one line fits. As the
    embedded task's `fit_trace`: a budget buys fewer, harder steps rather than a cut-off trace."""
    tokens = entry["metadata"]["expression"].split()
    pairs = list(zip(tokens[1::2], tokens[2::2]))
    for group in range(1, len(pairs) + 1):
        acc, lines = int(tokens[0]), []
        for lo in range(0, len(pairs), group):
            chunk = pairs[lo:lo + group]
            new = acc + sum(int(t) if op == "+" else -int(t) for op, t in chunk)
            lines.append(f"{acc} " + " ".join(f"{op} {t}" for op, t in chunk) + f" = {new}")
            acc = new
        text = "\n".join(lines)
        if count(text) <= budget:
            return text
    return ""


# dataset name -> the full reasoning of an entry (the `demonstrations` hook), and the reasoning that fits a budget
# (`budget_demonstrations`; a dataset without one shows its full reasoning when it fits, none otherwise)
TRACES = {"chain_sum": chain_sum_trace}
FITTING_TRACES = {"chain_sum": chain_sum_fitting_trace}


@functools.lru_cache(maxsize=4)
def _generate(dataset: str, config: str, size: int, seed: int) -> list[dict]:
    """The dataset's first `size` entries from `seed` (`config`: its keywords as JSON), generated once per process
    (every stage builds its task anew)."""
    ds = import_gym().create_dataset(dataset, size=size, seed=seed, **json.loads(config))
    return [ds[i] for i in range(len(ds))]


def entry_difficulty(meta: dict, keys: list[str] | None, ranges: dict, levels: int) -> int:
    """The entry's difficulty from the keys (`keys`, else those `ranges` names) whose value is a number and whose
    range spans more than one value: with one such key of at most `levels` integers, its value's place in the range
    (1 for the low end: `num_terms` 2..8 gives 1..7); otherwise the mean of where each value lies in its range, on
    a scale 1..`levels`; 0 when no key qualifies."""
    parts = []
    for k in keys or list(ranges):
        v, r = meta.get(k), ranges.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not isinstance(r, (list, tuple)) or len(r) != 2:
            continue
        lo, hi = r
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and hi > lo:
            parts.append((v, lo, hi))
    if not parts:
        return 0
    if len(parts) == 1 and all(isinstance(x, int) for x in parts[0]) and parts[0][2] - parts[0][1] < levels:
        v, lo, hi = parts[0]
        return min(max(v, lo), hi) - lo + 1
    frac = sum(min(1.0, max(0.0, (v - lo) / (hi - lo))) for v, lo, hi in parts) / len(parts)
    return 1 + round((levels - 1) * frac)


@register_task("reasoning_gym")
class ReasoningGymTask(FileTask):
    name = "reasoning_gym"
    default_grader = "reasoning_gym"

    @classmethod
    def hooks_for(cls, rc) -> frozenset[str]:
        name = rc.data.dataset
        return frozenset({"corpus"} | ({"demonstrations"} if name in TRACES else set())
                         | ({"budget_demonstrations"} if name in FITTING_TRACES else set()))

    def budget_demonstration(self, problem, budget: int, count, rng: random.Random) -> str:
        fit = FITTING_TRACES.get(self.rc.data.dataset)
        if fit is None or getattr(problem, "tests", None) is None:
            return super().budget_demonstration(problem, budget, count, rng)
        return fit(problem.tests, budget, count)

    @property
    def where(self) -> str:
        return f"reasoning-gym {self.rc.data.dataset}"

    @property
    def _entries(self) -> list[dict]:
        d = self.rc.data
        return _generate(d.dataset, json.dumps(d.config, sort_keys=True), d.size, self.rc.seed)

    def examples(self, bad_rows_file=None) -> list[Example]:
        d = self.rc.data
        trace = TRACES.get(d.dataset)
        ranges = {}
        for e in self._entries[:1]:
            ranges = e["metadata"].get("difficulty") or {}
        if d.difficulty_keys:  # ranges of the chosen keys from the entries themselves where the dataset names none
            for k in d.difficulty_keys:
                vals = [e["metadata"].get(k) for e in self._entries]
                if k not in ranges and all(isinstance(v, (int, float)) for v in vals):
                    ranges[k] = (min(vals), max(vals))
        out = []
        for e in self._entries:
            diff = entry_difficulty(e["metadata"], d.difficulty_keys, ranges, d.difficulty_levels)
            out.append(Example(e["question"], str(e["answer"]), diff, trace(e) if trace else None,
                               source="reasoning_gym", tests=e))
        return out

    # the base model's corpus: the training entries only (never a held-out one)
    @functools.cached_property
    def _corpus_rows(self) -> list[TextProblem]:
        return self._split[0]

    def corpus_document(self, rng: random.Random, direct_share: float = 0.1) -> str:
        p = rng.choice(self._corpus_rows)
        trace = TRACES.get(self.rc.data.dataset)
        share = direct_share if trace else 1.0  # no reasoning to show: answers only
        return framed_document(rng, p.expression, lambda _: trace(p.tests), p.answer, share)

    def corpus_key(self) -> dict:
        d = self.rc.data
        return {"task": self.name, "dataset": d.dataset, "config": d.config, "size": d.size, "seed": self.rc.seed,
                "held_out": rl_held_out_rows(self.rc, d.size)}

    def tokenizer_texts(self, seed: int) -> list[str]:
        rng = random.Random(seed)
        rows = self._corpus_rows
        return [self.corpus_document(rng, 0.0) for _ in range(min(2000, 4 * len(rows)))]
