"""Line-by-line reading of embedded-task thinking traces: which grouping a model wrote and which lines were right.

Each trace line (`+3*2=20`: the restated pair, the new pairs, the running value) is parsed, its operators counted
and its value checked against the problem's running values; operators the trace did not reach are left for the
answer to fold. This is what showed that the tiny model's errors sit in lines that fold two or more operators
(docs/rl_findings.md). Run on a checkpoint:

    python -m posttrain.tasks.trace_lines CHECKPOINT --budgets 16,24,32 --n 25
"""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from dataclasses import dataclass

from posttrain.tasks.arithmetic import Problem

_LINE = re.compile(r"(\d{1,2}|[+\-*]\d)((?:[+\-*]\d)*)=(\d+)")


@dataclass(frozen=True)
class TraceReading:
    lines: tuple[tuple[int, bool], ...]  # (operators folded, value right) per parsed line
    malformed: bool  # a line that does not parse or restates the wrong pairs (reading stops there)
    left_to_answer: int  # operators after the last parsed line, folded by the answer
    answer_right: bool

    @property
    def grouping(self) -> tuple[int, ...]:
        return tuple(g for g, _ in self.lines)


def read_trace(p: Problem, response: str, think_end: str = "</think>") -> TraceReading:
    """Read one response (thinking, `think_end`, answer) to problem `p`."""
    think, _, answer = response.partition(think_end)
    pairs, values, pos, lines, malformed = p.pairs, p.running_values, 0, [], False
    for text in (t.strip() for t in think.strip().split("\n")):
        if not text:
            continue
        m = _LINE.fullmatch(text)
        new = re.findall(r"[+\-*]\d", m.group(2)) if m else []
        head = str(p.operands[0]) if pos == 0 else pairs[pos - 1]
        if not m or not new or m.group(1) != head or pairs[pos:pos + len(new)] != new:
            malformed = True
            break
        pos += len(new)
        lines.append((len(new), int(m.group(3)) == values[pos - 1]))
    digits = re.match(r"\s*(\d+)", answer)
    return TraceReading(tuple(lines), malformed, p.difficulty - pos,
                        bool(digits) and int(digits.group(1)) == p.answer)


def first_error_offset(p: Problem, response: str, think_end: str = "</think>") -> int | None:
    """Character offset in `response` where its first error starts, or None when the response is right.

    The first error is the value of the first trace line whose value is wrong, else the start of the first line
    that does not restate the problem's pairs (a miscopy), else the answer when it is wrong (it folded what the
    trace left, or miscopied the last value). Later lines build on the error, so they are not blamed.
    """
    think, sep, answer = response.partition(think_end)
    pairs, values, pos, start = p.pairs, p.running_values, 0, 0
    for raw in think.split("\n"):
        line_start, start = start, start + len(raw) + 1
        text = raw.strip()
        if not text:
            continue
        m = _LINE.fullmatch(text)
        new = re.findall(r"[+\-*]\d", m.group(2)) if m else []
        head = str(p.operands[0]) if pos == 0 else pairs[pos - 1]
        if not m or not new or m.group(1) != head or pairs[pos:pos + len(new)] != new:
            return line_start + (len(raw) - len(raw.lstrip()))
        pos += len(new)
        if int(m.group(3)) != values[pos - 1]:
            return line_start + raw.index("=") + 1
    digits = re.match(r"\s*(\d+)", answer)
    if digits and int(digits.group(1)) == p.answer:
        return None
    at = len(think) + len(sep)
    return at + (digits.start(1) if digits else len(answer) - len(answer.lstrip()))


def summarize(problems: list[Problem], responses: list[str], forced: list[bool] | None = None) -> dict:
    """Accuracy by difficulty, line accuracy by operators folded, and each difficulty's commonest groupings
    (`a<k>`: k operators left to the answer; `bad`: reading stopped at a malformed line; `F`: `</think>` forced)."""
    forced = forced or [False] * len(problems)
    by_d, by_ops = defaultdict(lambda: [0, 0]), defaultdict(lambda: [0, 0])
    groupings: dict[int, Counter] = defaultdict(Counter)
    right: dict[tuple, int] = Counter()
    for p, text, f in zip(problems, responses, forced):
        r = read_trace(p, text)
        by_d[p.difficulty][0] += r.answer_right
        by_d[p.difficulty][1] += 1
        for g, ok in r.lines:
            by_ops[g][0] += ok
            by_ops[g][1] += 1
        key = ("-".join(map(str, r.grouping)) or "none") + ("+bad" if r.malformed else
                                                             f"+a{r.left_to_answer}" if r.left_to_answer else "")
        key += "+F" if f else ""
        groupings[p.difficulty][key] += 1
        right[(p.difficulty, key)] += r.answer_right
    return {
        "accuracy_by_difficulty": {d: a / n for d, (a, n) in sorted(by_d.items())},
        "line_accuracy_by_ops": {g: {"right": a, "lines": n} for g, (a, n) in sorted(by_ops.items())},
        "groupings": {d: [{"grouping": k, "count": c, "right": right[(d, k)]} for k, c in cnt.most_common(4)]
                      for d, cnt in sorted(groupings.items())},
    }


def main(argv: list[str] | None = None) -> int:
    import argparse
    import json

    import torch

    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.workers.rollout import RolloutWorker

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--budgets", default="16,24,32", help="comma-separated budgets (capped, greedy)")
    ap.add_argument("--n", type=int, default=25, help="problems per difficulty")
    ap.add_argument("--seed", type=int, default=12345)
    args = ap.parse_args(argv)
    worker = RolloutWorker(args.checkpoint, "cpu", torch.float32, torch.get_num_threads())
    problems = generate_problems(8 * args.n, seed=args.seed)
    for budget in (int(b) for b in args.budgets.split(",")):
        batch = worker.generate([p.expression for p in problems], [budget] * len(problems), 1, 160, greedy=True,
                                cap=True)
        print(json.dumps({"budget": budget, **summarize(problems, batch.texts, list(batch.forced))}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
