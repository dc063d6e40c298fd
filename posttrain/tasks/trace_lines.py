"""Line-by-line reading of embedded-task thinking traces: which grouping a model wrote and which lines were right.

Each trace line (`+3*2=20`: the restated pair, the new pairs, the running value) is parsed, its operators counted
and its value checked against the problem's running values; operators the trace did not reach are left for the
answer to fold. A first line that reads the problem back (`7+3*2-5`, as `sft.budget_traces: full_read_back`
teaches) is noted and skipped. This reading is what showed that the tiny model's errors sit in lines that fold
two or more operators (docs/rl_findings.md). Run on a checkpoint with `python -m posttrain.eval.traces`.
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
    read_back: bool = False  # its first line reads the problem back (`read_back_trace`)

    @property
    def grouping(self) -> tuple[int, ...]:
        return tuple(g for g, _ in self.lines)


@dataclass(frozen=True)
class _Line:
    start: int  # offset in the thinking of the line's first non-space character
    ops: int  # operators it folds; 0 for a malformed line (the reading stops there)
    value_at: int  # offset of its value
    right: bool  # its value is the problem's running value


def _reads_back(p: Problem, think: str) -> bool:
    """The thinking's first non-blank line is the problem read back (`arithmetic.read_back_trace`)."""
    return next((line.strip() for line in think.split("\n") if line.strip()), "") == p.expression


def _scan(p: Problem, think: str, read_back: bool = True):
    """The thinking's non-blank lines as `_Line`s, up to and including the first malformed one (a line that does
    not parse or does not restate the problem's next pairs).

    With `read_back`, a first line that reads the problem back is skipped: it computes nothing, so it is not
    blamed, and only the outcome rewards tell a model it wasted the budget. A read-back cut short by a forced
    `</think>`, a second one, or one after a trace line is malformed like any other line that does not parse, as is
    every read-back without `read_back`.
    """
    pairs, values, pos, start = p.pairs, p.running_values, 0, 0
    skip = read_back and _reads_back(p, think)
    for raw in think.split("\n"):
        line_start, start = start, start + len(raw) + 1
        text = raw.strip()
        if not text:
            continue
        first = line_start + len(raw) - len(raw.lstrip())
        if skip:  # the problem read back (`read_back_trace`)
            skip = False
            continue
        m = _LINE.fullmatch(text)
        new = re.findall(r"[+\-*]\d", m.group(2)) if m else []
        head = str(p.operands[0]) if pos == 0 else pairs[pos - 1]
        if not m or not new or m.group(1) != head or pairs[pos:pos + len(new)] != new:
            yield _Line(first, 0, first, False)
            return
        pos += len(new)
        yield _Line(first, len(new), line_start + raw.index("=") + 1, int(m.group(3)) == values[pos - 1])


def _answer_digits(answer: str):
    return re.match(r"\s*(\d+)", answer)


def read_trace(p: Problem, response: str, think_end: str = "</think>") -> TraceReading:
    """Read one response (thinking, `think_end`, answer) to problem `p`."""
    think, _, answer = response.partition(think_end)
    scanned = list(_scan(p, think))
    lines = tuple((ln.ops, ln.right) for ln in scanned if ln.ops)
    digits = _answer_digits(answer)
    return TraceReading(lines, any(not ln.ops for ln in scanned), p.difficulty - sum(g for g, _ in lines),
                        bool(digits) and int(digits.group(1)) == p.answer, _reads_back(p, think))


def first_error_offset(p: Problem, response: str, think_end: str = "</think>", read_back: bool = False) -> int | None:
    """Character offset in `response` where its first error starts, or None when the response is right.

    The first error is the value of the first trace line whose value is wrong, else the start of the first line
    that does not restate the problem's pairs (a miscopy), else the answer when it is wrong (it folded what the
    trace left, or miscopied the last value). Later lines build on the error, so they are not blamed.
    `read_back`: the model was taught to read the problem back first (`sft.budget_traces: full_read_back`), so such
    a first line is no error (`_scan`); a model never taught it that writes the bare expression wrote a line
    without its value.
    """
    think, sep, answer = response.partition(think_end)
    for ln in _scan(p, think, read_back):
        if not ln.right:
            return ln.value_at
    digits = _answer_digits(answer)
    if digits and int(digits.group(1)) == p.answer:
        return None
    at = len(think) + len(sep)
    return at + (digits.start(1) if digits else len(answer) - len(answer.lstrip()))


def summarize(problems: list[Problem], responses: list[str], forced: list[bool] | None = None) -> dict:
    """Accuracy by difficulty, line accuracy by operators folded, and each difficulty's commonest groupings
    (`rb`: the problem read back first; `a<k>`: k operators left to the answer; `bad`: reading stopped at a
    malformed line; `F`: `</think>` forced)."""
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
        key = ("rb+" if r.read_back else "") + ("-".join(map(str, r.grouping)) or "none") + ("+bad" if r.malformed else
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


def teacher_forced_lines(model, tokenizer, n: int = 700, seed: int = 1234, batch_size: int = 64) -> dict:
    """Line-value accuracy by operators folded, teacher-forced: what a model can compute in one line, apart from
    which lines it would choose to write.

    Each of `n` problems (difficulty 2-8) gets a random grouping (a line count uniform in 1..d, then
    `random_groups`), written as a gold trace and answer in the chat frame without a budget. A line is right when
    the model's argmax predicts every token of its value given the gold text before it; the answer likewise.
    Returns {"1": {"right", "lines"}, ..., "4+": ..., "answer": ...}.
    """
    import random

    import torch

    from posttrain.tasks.arithmetic import make_trace_groups, random_groups, sample_problem
    from posttrain.tokenizer import THINK_END

    rng = random.Random(seed)
    docs, spans = [], []
    for _ in range(n):
        d = rng.randint(2, 8)
        p = sample_problem(rng, d)
        groups = random_groups(rng, d, rng.randint(1, d))
        trace = make_trace_groups(p, groups)
        head = tokenizer.apply_chat_template([{"role": "user", "content": p.expression}], add_generation_prompt=True,
                                             tokenize=False)
        tail = f"{THINK_END}\n\n{p.answer}{tokenizer.eos_token}"  # as `sft_data.tokenize_example` writes it
        row, pos = [], len(head)
        for line, g in zip(trace.split("\n"), groups):  # (start, end) of each line's value, its operator count
            row.append((pos + line.index("=") + 1, pos + len(line), str(g) if g < 4 else "4+"))
            pos += len(line) + 1
        answer_at = len(head) + len(trace) + len(f"{THINK_END}\n\n")
        row.append((answer_at, answer_at + len(str(p.answer)), "answer"))
        docs.append(head + trace + tail)
        spans.append(row)
    counts: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    for b in range(0, n, batch_size):
        enc = tokenizer(docs[b:b + batch_size], return_offsets_mapping=True, padding=True, return_tensors="pt",
                        add_special_tokens=False)
        with torch.no_grad():
            pred = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).logits.argmax(-1)
        for r in range(pred.shape[0]):
            offsets, ids = enc["offset_mapping"][r].tolist(), enc["input_ids"][r]
            for start, end, key in spans[b + r]:
                toks = [t for t, (o0, o1) in enumerate(offsets) if o1 > o0 and o0 >= start and o1 <= end]
                right = bool(toks) and all(int(pred[r, t - 1]) == int(ids[t]) for t in toks)
                counts[key][0] += right
                counts[key][1] += 1
    return {k: {"right": a, "lines": m} for k, (a, m) in sorted(counts.items())}
