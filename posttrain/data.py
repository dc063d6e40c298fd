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


def _read_rows(cfg: DataConfig) -> tuple[list[dict], str]:
    if cfg.source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        except Exception as e:  # no hub here; say so plainly
            raise DataError(f"data.path: could not load dataset {cfg.path!r} split {cfg.split!r}: {e}") from None
        return [dict(r) for r in ds], f"{cfg.path}[{cfg.split}]"
    path = Path(cfg.path).expanduser()
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist(), str(path)
    if path.suffix in (".jsonl", ".json"):
        text = path.read_text()
        if path.suffix == ".json" and text.lstrip().startswith("["):
            return json.loads(text), str(path)
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                rows.append({"__error__": f"line {i} is not valid JSON ({e.msg})"})
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
    answer, reasoning = str(answer), None
    if cfg.answer_delimiter:
        if cfg.answer_delimiter not in answer:
            raise ValueError(f"field {cfg.answer_column!r} has no {cfg.answer_delimiter!r} delimiter")
        reasoning, answer = (s.strip() for s in answer.rsplit(cfg.answer_delimiter, 1))
    if cfg.reasoning_column:
        reasoning = row.get(cfg.reasoning_column)
        if reasoning is not None and not isinstance(reasoning, str):
            raise ValueError(f"field {cfg.reasoning_column!r} must be a string")
    difficulty = None
    if cfg.difficulty_column:
        difficulty = row.get(cfg.difficulty_column)
        if not isinstance(difficulty, int):
            raise ValueError(f"field {cfg.difficulty_column!r} must be an integer")
    return Example(prompt.strip(), answer.strip(), difficulty, reasoning, source="file")


def file_examples(cfg: DataConfig, bad_rows_file: Path | None = None) -> list[Example]:
    rows, where = _read_rows(cfg)
    examples, bad = [], []
    for i, row in enumerate(rows, 1):
        try:
            if not isinstance(row, dict):
                raise ValueError(f"row is a {type(row).__name__}, not an object")
            examples.append(_convert(row, cfg))
        except ValueError as e:
            if not cfg.skip_bad_rows:
                raise DataError(f"{where}, row {i}: {e} (set data.skip_bad_rows: true to skip such rows)") from None
            bad.append({"row": i, "error": str(e)})
    if bad and bad_rows_file is not None:
        bad_rows_file.write_text("".join(json.dumps(b) + "\n" for b in bad))
    if not examples:
        raise DataError(f"{where}: no usable rows ({len(bad)} bad)")
    return examples


def load_examples(data: DataConfig, task: TaskConfig, n: int, seed: int, bad_rows_file: Path | None = None) -> list[Example]:
    """`n` training examples from the configured source (files: the first `n` rows, all if fewer)."""
    if data.source == "arithmetic":
        return arithmetic_examples(n, seed, task)
    return file_examples(data, bad_rows_file)[:n]
