"""Reading the user's rows: local JSONL/JSON/Parquet files, or `datasets` names (the `file` / `hub` tasks,
`tasks.files`, build on this).

Every row becomes an `Example`. File rows are validated: a line that is not JSON or not UTF-8, a missing field, a
wrong type, an empty prompt or an over-long prompt stops the run before training with the file and every bad row's
line (or row number) and field, or with `data.skip_bad_rows` the row is skipped, counted and listed in
`RUN_DIR/bad_rows.jsonl`.
"""

from __future__ import annotations

import codecs
import json
from dataclasses import dataclass, field
from pathlib import Path

from posttrain.config import DataConfig
from posttrain.runlog import log


@dataclass(frozen=True)
class Example:
    prompt: str
    answer: str
    difficulty: int | None = None
    reasoning: str | None = None
    source: str = "arithmetic"
    # what the grader compares with besides the answer: data.tests_column (the `code` grader runs them), or a
    # reasoning-gym entry (its `score_answer` reads it)
    tests: object = field(default=None, compare=False)


class DataError(ValueError):
    """Bad dataset input; the message names the file, row and field."""


def _read_rows(cfg: DataConfig) -> tuple[list[tuple[str, object]], str]:
    """([(where in the file, row)], source name): `line N` (JSONL, counting every line) or `row N`. A row that
    cannot be read (not JSON, not UTF-8) is `{"__error__": why}`, a bad row like any other."""
    if cfg.source == "hub":
        import datasets

        try:
            ds = datasets.load_dataset(cfg.path, split=cfg.split)
        except Exception as e:  # no hub here; say so plainly
            raise DataError(f"data.path: could not load dataset {cfg.path!r} split {cfg.split!r}: {e}") from None
        return [(f"row {i}", dict(r)) for i, r in enumerate(ds, 1)], f"{cfg.path}[{cfg.split}]"
    path = Path(cfg.path).expanduser()
    if path.is_dir():  # a `datasets` Dataset / DatasetDict written by `save_to_disk`
        return _saved_dataset_rows(path, cfg.split), f"{path}[{cfg.split}]"
    if path.suffix == ".parquet":
        return [(f"row {i}", r) for i, r in enumerate(_parquet_rows(path), 1)], str(path)
    if path.suffix in (".jsonl", ".json"):
        try:
            raw = path.read_bytes()
        except OSError as e:
            raise DataError(f"{path}: cannot read the file ({e.strerror or e})") from None
        bom = len(codecs.BOM_UTF8) if raw.startswith(codecs.BOM_UTF8) else 0
        raw = raw[bom:]
        if path.suffix == ".json" and raw.lstrip().startswith(b"["):
            return _json_array_rows(path, raw, bom), str(path)
        rows, start = [], bom
        for i, line in enumerate(raw.split(b"\n"), 1):  # (splitlines would also split at U+2028 inside strings)
            at, line_start, start = f"line {i}", start, start + len(line) + 1
            if not line.strip():
                continue
            try:
                text = line.decode("utf-8")
            except UnicodeDecodeError as e:
                rows.append((at, {"__error__": _not_utf8(line, e, line_start)}))
                continue
            try:
                rows.append((at, json.loads(text)))
            except json.JSONDecodeError as e:
                rows.append((at, {"__error__": f"not valid JSON ({e.msg}, column {e.colno})"}))
        return rows, str(path)
    raise DataError(f"data.path: {path} has an unsupported extension (use .jsonl, .json or .parquet)")


def _saved_dataset_rows(path: Path, split: str) -> list[tuple[str, object]]:
    """The rows of a dataset saved with `save_to_disk` (a DatasetDict: its `split`), as `row N`."""
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except (FileNotFoundError, ValueError) as e:
        raise DataError(f"data.path: {path} is a directory but not a dataset saved with `save_to_disk` ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"data.split: {path} has no split {split!r} (it has: {', '.join(ds)})")
        ds = ds[split]
    return [(f"row {i}", dict(r)) for i, r in enumerate(ds, 1)]


def _not_utf8(data: bytes, e: UnicodeDecodeError, offset: int) -> str:
    """Why the bytes `data` (at byte `offset` of the file) are a bad row: the first byte that is not UTF-8, where it
    is, and the field it lies in when the rest is JSON."""
    where = f"byte 0x{data[e.start]:02x} at byte offset {offset + e.start} of the file"
    try:
        row = json.loads(data.decode("utf-8", "surrogateescape"))  # undecodable bytes kept as lone surrogates
    except json.JSONDecodeError:
        return f"not UTF-8 text ({where})"
    return f"{_undecodable_field(row)}not UTF-8 text ({where})"


def _undecodable_field(row) -> str:
    """`field 'name' is ` for the first field of `row` holding a byte that was not UTF-8, else ``."""
    if isinstance(row, dict):
        for k, v in row.items():
            if _has_undecodable(k) or _has_undecodable(v):
                return f"field {k!r} is "
    return ""


def _has_undecodable(value) -> bool:
    """Whether a value read with `surrogateescape` holds a byte that was not UTF-8 (U+DC80..U+DCFF)."""
    if isinstance(value, str):
        return any("\udc80" <= c <= "\udcff" for c in value)
    if isinstance(value, dict):
        return any(_has_undecodable(k) or _has_undecodable(v) for k, v in value.items())
    if isinstance(value, list):
        return any(_has_undecodable(v) for v in value)
    return False


def _json_array_rows(path: Path, raw: bytes, bom: int) -> list[tuple[str, object]]:
    """The rows of a `.json` file holding one array; a row with bytes that are not UTF-8 is a bad row naming the
    field (the array itself must parse)."""
    try:
        text, undecodable = raw.decode("utf-8"), None
    except UnicodeDecodeError as e:
        text, undecodable = raw.decode("utf-8", "surrogateescape"), e
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if undecodable is not None:
            line = raw[: undecodable.start].count(b"\n") + 1
            raise DataError(f"{path}: not UTF-8 text at line {line} (byte 0x{raw[undecodable.start]:02x} at byte "
                            f"offset {bom + undecodable.start} of the file)") from None
        raise DataError(f"{path}: not valid JSON at line {e.lineno}, column {e.colno} ({e.msg})") from None
    out = []
    for i, r in enumerate(rows, 1):
        if undecodable is not None and _has_undecodable(r):
            r = {"__error__": f"{_undecodable_field(r)}not UTF-8 text"}
        out.append((f"row {i}", r))
    return out


def _parquet_rows(path: Path) -> list:
    """The rows of a Parquet file as dicts; a row whose string holds bytes that are not UTF-8 (Parquet does not
    check on write) is a bad row naming the field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except (OSError, pa.ArrowException) as e:
        why = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise DataError(f"{path}: not a readable Parquet file ({why})") from None
    try:
        return table.to_pylist()
    except UnicodeDecodeError:
        pass
    rows = []
    for i in range(table.num_rows):  # slow path, only for a file with undecodable strings: find them row by row
        try:
            rows.append(table.slice(i, 1).to_pylist()[0])
        except UnicodeDecodeError as e:
            bad = []
            for name in table.column_names:
                try:
                    table.column(name)[i].as_py()
                except UnicodeDecodeError:
                    bad.append(name)
            field = f"field {bad[0]!r} is " if bad else ""
            rows.append({"__error__": f"{field}not UTF-8 text (byte 0x{e.object[e.start]:02x} at byte {e.start} of "
                                      "the value)"})
    return rows


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
    tests = None
    if cfg.tests_column:
        from posttrain.rewards.code import normalize_tests

        if row.get(cfg.tests_column) in (None, "", []):
            raise ValueError(f"field {cfg.tests_column!r} is missing or empty")
        try:
            tests = normalize_tests(row[cfg.tests_column])
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise ValueError(f"field {cfg.tests_column!r}: {e}") from None
        if all(isinstance(t, str) for t in tests):
            from posttrain.rewards.code_tests import AssertTest

            try:
                for t in tests:
                    AssertTest.parse(t)  # a test the verdict cannot be computed for is a bad row, not a 0 later
            except ValueError as e:
                raise ValueError(f"field {cfg.tests_column!r}: {e}") from None
    return Example(prompt.strip(), answer.strip(), difficulty, reasoning, source="file", tests=tests)


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
            bad.append({"at": at, "error": str(e)})
    if bad and not cfg.skip_bad_rows:
        raise DataError(bad_rows_message(where, bad, len(rows)))
    if bad:
        listed = f", listed in {bad_rows_file}" if bad_rows_file is not None else ""
        log.warning("data: skipped %d bad rows of %d in %s (first: %s: %s)%s", len(bad), len(rows), where,
                    bad[0]["at"], bad[0]["error"], listed)
        if bad_rows_file is not None:
            bad_rows_file.write_text("".join(json.dumps(b) + "\n" for b in bad))
    if not examples:
        raise DataError(f"{where}: no usable rows ({len(bad)} bad)")
    return examples


@dataclass(frozen=True)
class TextProblem:
    """A row as a problem, read like the embedded task's `Problem` (RL stages, the sweep, rm)."""

    expression: str  # the user prompt (named as the embedded task's Problem, which the driver reads)
    answer: str
    difficulty: int = 0
    tests: object = field(default=None, compare=False)  # what the grader reads besides the answer (`Example.tests`)
    reasoning: str | None = field(default=None, compare=False)  # a reference trace (PPO-ptx imitates it)


def text_problems(data) -> list[TextProblem]:
    """The rows of the data file `data` (a `DataConfig`) as problems (difficulty 0 without a difficulty column)."""
    return [TextProblem(e.prompt, e.answer, e.difficulty or 0, e.tests, e.reasoning) for e in file_examples(data)]


def bad_rows_message(where: str, bad: list[dict], n_rows: int, shown: int = 20) -> str:
    """Every bad row of a file at once (the first `shown` of them), each with its line or row and why, so that one
    pass fixes them all."""
    first = f"{where}, {bad[0]['at']}: {bad[0]['error']} (set data.skip_bad_rows: true to skip such rows)"
    if len(bad) == 1:
        return first
    lines = [f"  {where}, {b['at']}: {b['error']}" for b in bad[1:shown]]
    if len(bad) > shown:
        lines.append(f"  ... and {len(bad) - shown} more")
    return f"{first}; {len(bad) - 1} more bad rows of {n_rows}:\n" + "\n".join(lines)


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
