"""The sweep's options (`posttrain sweep`'s flags, the `sweep` stage's keys): parsed from the command line and checked
before any model loads; each error is a `SweepError` naming the option and its value."""

from __future__ import annotations

MODES = ("natural", "capped", "forced")  # the default modes; `forced` costs about one capped pass per budget


class SweepError(ValueError):
    """A model path that cannot be swept (the message says what was looked for) or a sweep option out of range (the
    message names the option and the value)."""


def _unique(xs: list) -> list:
    """`xs` without repeats, in the order of their first appearance."""
    return list(dict.fromkeys(xs))


def parse_budgets(spec: str) -> list[int | None]:
    """"0,16,auto" -> [0, 16, None]. A budget named twice (`8,08`, `auto,auto`) is kept once, where it first
    appears. Only ASCII digits make a budget (`str.isdigit` would also take "²")."""
    out: list[int | None] = []
    for part in spec.split(","):
        part = part.strip()
        if part == "auto":
            out.append(None)
        elif part and part.isascii() and part.isdigit():
            out.append(int(part))
        else:
            raise SweepError(f"--budgets {spec!r}: {part!r} is neither a non-negative integer nor 'auto'")
    return _unique(out)


def parse_modes(spec: str) -> list[str]:
    """"natural,forced" -> ["natural", "forced"], in `MODES`' order (a mode named twice is kept once)."""
    names = [part.strip() for part in spec.split(",")]
    bad = [m for m in names if m not in MODES]
    if bad:
        raise SweepError(f"--modes {spec!r}: {bad[0]!r} is not a mode; expected a comma-separated list of "
                         f"{', '.join(MODES)}")
    return [m for m in MODES if m in names]


def parse_difficulties(spec: str) -> list[int]:
    """"1-8" or "1,3,5" -> list of ints, each in the embedded task's MIN_DIFFICULTY..MAX_DIFFICULTY (a difficulty
    named twice is kept once, where it first appears)."""
    from posttrain.tasks.arithmetic import MAX_DIFFICULTY, MIN_DIFFICULTY

    def number(x: str) -> int:
        x = x.strip()
        if not (x.isascii() and x.isdigit()):
            raise SweepError(f"--difficulties {spec!r}: {x!r} is not an integer; expected a range like "
                             f"'{MIN_DIFFICULTY}-{MAX_DIFFICULTY}' or a list like '1,3,5'")
        return int(x)

    if "-" in spec:
        a, b = (number(x) for x in spec.split("-", 1))
        if a > b:
            raise SweepError(f"--difficulties {spec!r}: the range is empty ({a} > {b})")
        out = list(range(a, b + 1))
    else:
        out = [number(x) for x in spec.split(",")]
    bad = [d for d in out if not MIN_DIFFICULTY <= d <= MAX_DIFFICULTY]
    if bad:
        raise SweepError(f"--difficulties {spec!r}: difficulty {bad[0]} is outside the task's "
                         f"{MIN_DIFFICULTY}..{MAX_DIFFICULTY}")
    return _unique(out)


def check_options(budgets: list, n_per_difficulty: int, difficulties: list[int] | None, max_new_tokens: int,
                  batch_size: int, workers: int, backend: str, cpus_per_worker: int, modes=MODES) -> None:
    """The sweep's settings, checked before anything loads; the message names the option and its value
    (`difficulties` None: problems of a data file, which carry their own)."""
    from posttrain.tasks.arithmetic import MAX_DIFFICULTY, MIN_DIFFICULTY

    for b in budgets:
        if b is not None and (isinstance(b, bool) or not isinstance(b, int) or b < 0):
            raise SweepError(f"--budgets: {b!r} is neither a non-negative integer nor 'auto' (None)")
    if not budgets:
        raise SweepError("--budgets: no budget given")
    for name, value in (("--n", n_per_difficulty), ("--max-new-tokens", max_new_tokens),
                        ("--batch-size", batch_size), ("--workers", workers), ("cpus_per_worker", cpus_per_worker)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise SweepError(f"{name} must be an integer >= 1, got {value!r}")
    if difficulties is not None and not difficulties:
        raise SweepError("--difficulties: no difficulty given")
    for d in difficulties or []:
        if isinstance(d, bool) or not isinstance(d, int) or not MIN_DIFFICULTY <= d <= MAX_DIFFICULTY:
            raise SweepError(f"--difficulties: {d!r} is outside the task's {MIN_DIFFICULTY}..{MAX_DIFFICULTY}")
    if backend not in ("ray", "local"):
        raise SweepError(f"--backend {backend!r}: expected 'ray' or 'local'")
    if isinstance(modes, str) or not modes or any(m not in MODES for m in modes):
        raise SweepError(f"--modes {modes!r}: expected a non-empty list of {', '.join(MODES)}")
