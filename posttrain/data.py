"""Datasets: the embedded arithmetic task, local JSONL/Parquet files, or `datasets` hub names.

Every source yields `Example`s. File rows are validated: a missing field, a wrong type, an empty prompt or an
over-long prompt stops the run before training with the file, row number and field, or with
`data.skip_bad_rows` the row is skipped, counted and listed in `RUN_DIR/bad_rows.jsonl`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from posttrain.config import DataConfig, TaskConfig
from posttrain.tasks.arithmetic import generate_problems
from posttrain.runlog import log


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    difficulty: int | None = None
    reasoning: str | None = None
    source: str = "arithmetic"


class DataError(ValueError):
    """Bad dataset input; the message names the file, row and field."""


def arithmetic_examples(n: int, seed: int, task: TaskConfig) -> list[Example]:
    diffs = list(range(task.min_difficulty, task.max_difficulty + 1))
    return [Example(p.expression, str(p.answer), p.difficulty) for p in generate_problems(n, seed, diffs)]


def _read_rows(cfg: DataConfig) -> tuple[list[tuple[str, object]], str]:
    """([(where in the file, row)], source name): `line N` (JSONL, counting every line) or `row N`."""
    if cfg.source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        except Exception as e:  # no hub here; say so plainly
            raise DataError(f"data.path: could not load dataset {cfg.path!r} split {cfg.split!r}: {e}") from None
        return [(f"row {i}", dict(r)) for i, r in enumerate(ds, 1)], f"{cfg.path}[{cfg.split}]"
    path = Path(cfg.path).expanduser()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return [(f"row {i}", r) for i, r in enumerate(pq.read_table(path).to_pylist(), 1)], str(path)
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8-sig")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                rows = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
            return [(f"row {i}", r) for i, r in enumerate(rows, 1)], str(path)
        rows = []
        for i, line in enumerate(text.split("\n"), 1):  # (splitlines would also split at U+2028 inside strings)
            if not line.strip():
                continue
            try:
                rows.append((f"line {i}", json.loads(line)))
            except json.JSONDecodeError as e:
                rows.append((f"line {i}", {"__error__": f"not valid JSON ({e.msg}, column {e.colno})"}))
        return rows, str(path)
    raise DataError(f"data.path: {path} has an unsupported extension (use .jsonl, .json or .parquet)")


def _convert(row: dict, cfg: DataConfig) -> Example:
    """One row to an Example, or ValueError naming the field."""
    if "__error__" in row:
        raise ValueError(row["__error__"])
    for col in (cfg.prompt_column, cfg.answer_column):
        if col not in row or row[col] is None:
            raise ValueError(f"field {col!r} is missing")
    prompt, answer = row[cfg.prompt_column], row[cfg.answer_column]
    if not isinstance(prompt, str):
        raise ValueError(f"field {cfg.prompt_column!r} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise ValueError(f"field {cfg.prompt_column!r} is empty")
    if len(prompt) > cfg.max_prompt_chars:
        raise ValueError(f"field {cfg.prompt_column!r} is {len(prompt)} characters, over data.max_prompt_chars="
                         f"{cfg.max_prompt_chars}")
    if not isinstance(answer, (str, int, float)) or isinstance(answer, bool):
        raise ValueError(f"field {cfg.answer_column!r} must be a string or number, got {type(answer).__name__}")
    if isinstance(answer, float) and answer.is_integer():
        answer = int(answer)  # a float column's 27.0 is the answer 27
    answer, reasoning = str(answer), None
    if cfg.answer_delimiter:
        if cfg.answer_delimiter not in answer:
            raise ValueError(f"field {cfg.answer_column!r} has no {cfg.answer_delimiter!r} delimiter")
        reasoning, answer = (s.strip() for s in answer.rsplit(cfg.answer_delimiter, 1))
    if not answer.strip():
        raise ValueError(f"field {cfg.answer_column!r} has an empty answer")
    if cfg.reasoning_column and row.get(cfg.reasoning_column) is not None:  # else the delimiter's, if any
        reasoning = row[cfg.reasoning_column]
        if not isinstance(reasoning, str):
            raise ValueError(f"field {cfg.reasoning_column!r} must be a string")
    difficulty = None
    if cfg.difficulty_column:
        difficulty = row.get(cfg.difficulty_column)
        if not isinstance(difficulty, int):
            raise ValueError(f"field {cfg.difficulty_column!r} must be an integer")
    return Example(prompt.strip(), answer.strip(), difficulty, reasoning, source="file")


def file_examples(cfg: DataConfig, bad_rows_file: Path | None = None) -> list[Example]:
    rows, where = _read_rows(cfg)
    if cfg.reasoning_column and rows and not any(isinstance(r, dict) and cfg.reasoning_column in r for _, r in rows):
        fields = sorted({k for _, r in rows[:100] if isinstance(r, dict) for k in r if k != "__error__"})
        raise DataError(f"{where}: data.reasoning_column {cfg.reasoning_column!r} is in no row (fields: "
                        f"{', '.join(fields)})")
    examples, bad = [], []
    for at, row in rows:
        try:
            if not isinstance(row, dict):
                raise ValueError(f"row is a {type(row).__name__}, not an object")
            examples.append(_convert(row, cfg))
        except ValueError as e:
            if not cfg.skip_bad_rows:
                raise DataError(f"{where}, {at}: {e} (set data.skip_bad_rows: true to skip such rows)") from None
            bad.append({"at": at, "error": str(e)})
    if bad:
        listed = f", listed in {bad_rows_file}" if bad_rows_file is not None else ""
        log.warning("data: skipped %d bad rows of %d in %s (first: %s: %s)%s", len(bad), len(rows), where,
                    bad[0]["at"], bad[0]["error"], listed)
        if bad_rows_file is not None:
            bad_rows_file.write_text("".join(json.dumps(b) + "\n" for b in bad))
    if not examples:
        raise DataError(f"{where}: no usable rows ({len(bad)} bad)")
    return examples


def load_examples(data: DataConfig, task: TaskConfig, n: int, seed: int, bad_rows_file: Path | None = None,
                  held_out=None) -> list[Example]:
    """`n` training examples from the configured source (files: the first `n` rows, all if fewer). `held_out(rows)`
    gives how many of a file's rows to leave out (spread through it: those the RL stages evaluate on)."""
    if data.source == "arithmetic":
        return arithmetic_examples(n, seed, task)
    rows = file_examples(data, bad_rows_file)
    k = held_out(len(rows)) if held_out is not None else 0
    train, _ = split_held_out(rows, k)
    if k:
        log.info("data: %d rows spread through the file are held out for the RL stages' evaluation; %d remain", k,
                 len(train))
    return train[:n]


def spread(n: int, k: int) -> list[int]:
    """`k` indices of `range(n)` spread evenly (the middle of each of `k` equal parts), increasing; all of them when
    `k >= n`. A file sorted by difficulty or topic gives a held-out set like the whole file."""
    if k >= n:
        return list(range(n))
    return [(2 * j + 1) * n // (2 * k) for j in range(k)]


def split_held_out(rows: list, k: int, prompt=lambda r: r.prompt) -> tuple[list, list]:
    """(train, held): `k` rows spread evenly through the file (`spread`) are held out, each prompt once (a repeat
    would count one problem twice in a paired comparison), and a training row whose prompt is also held out is
    dropped, so that no stage trains on a problem the evaluation asks (a file may repeat a prompt)."""
    if k <= 0:
        return list(rows), []
    picked = spread(len(rows), k)
    held, asked = [], set()
    for i in picked:  # the first picked row of each prompt
        if prompt(rows[i]) not in asked:
            asked.add(prompt(rows[i]))
            held.append(rows[i])
    chosen = set(picked)
    train = [r for i, r in enumerate(rows) if i not in chosen and prompt(r) not in asked]
    if len(train) < len(rows) - len(chosen):
        log.info("data: %d training rows repeat a held-out prompt and are left out",
                 len(rows) - len(chosen) - len(train))
    return train, held
