"""The `code` reward: run the Python in the answer against the example's tests in the sandbox (`sandbox.py`).

Tests (the ``tests`` field, one entry per example) come in three shapes:
  - a list of assert statements, e.g. ``["assert f(2) == 4", ...]``: the code runs once and the calls each test
    makes are evaluated after it, in its namespace, in one sandbox; each test's verdict is computed here from the
    values that come back (`code_tests.AssertTest`: expected values never enter the sandbox);
  - a list of ``{"input": stdin, "output": expected stdout}``: the program runs once per input, all in one sandbox;
    outputs are compared here (`code_tests.outputs_match`);
  - ``{"inputs": [...], "outputs": [...]}`` (the APPS/TACO layout), turned into the previous shape.
A JSON string holding any of these is decoded first. The sandbox runs under bubblewrap (``isolation: bwrap``, the
default); on a machine without it the reward refuses to start unless the recipe opts into ``isolation: process``,
which warns what it leaves unprotected.
"""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor

from .code_tests import AssertTest, outputs_match
from .parse import split_think
from .registry import RewardOutput, get_field, mean, register_reward
from .sandbox import ERROR_STATUSES, SandboxLimits, require_isolation, run_calls, run_inputs

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def extract_code(completion: str, require_closed: bool = True) -> str | None:
    """The code to run: the last ```python block of the answer, else its last fenced block, else the whole answer.

    >>> extract_code("think</think>\\n\\n```python\\nprint(1)\\n```")
    'print(1)\\n'
    >>> extract_code("think</think>print(2)")
    'print(2)'
    >>> extract_code("never closed ```python\\nprint(3)\\n```") is None
    True
    """
    parsed = split_think(completion)
    if not parsed.closed:
        if require_closed:
            return None
        text = completion
    else:
        text = parsed.answer
    blocks = _FENCE.findall(text)
    python = [body for lang, body in blocks if lang.lower() in ("python", "py", "python3")]
    if python:
        return python[-1]
    if blocks:
        return blocks[-1][1]
    return text if parsed.closed else None


def normalize_tests(tests) -> list:
    """Tests as a list of assert strings or of {"input", "output"} dicts (see the module docstring)."""
    if isinstance(tests, str):
        tests = json.loads(tests)
    if isinstance(tests, dict) and "inputs" in tests:
        return [{"input": i, "output": o} for i, o in zip(tests["inputs"], tests["outputs"])]
    tests = list(tests)
    for t in tests:
        if not (isinstance(t, str) or (isinstance(t, dict) and "input" in t and "output" in t)):
            raise ValueError(f"a test must be an assert string or an {{'input', 'output'}} dict, got {t!r:.80}")
    return tests


def _norm_output(text: str) -> str:
    return "\n".join(line.rstrip() for line in str(text).strip().splitlines())


@register_reward("code")
class CodeReward:
    """Fraction of the example's tests the answer's code passes (or 1/0 for all-pass when ``partial=False``).

    Any sandbox error (timeout, memory, violation, output_limit, crash, sandbox_error) scores 0, whatever passed
    before it, when ``zero_on_error`` (the default). Metrics: ``pass_rate``, ``all_pass``, ``no_code`` (means) and
    the counts ``errors`` (samples with any sandbox error) and one per error kind. One sandbox per answer, for all of
    its tests; ``num_workers`` answers are checked at once.

    isolation: "bwrap" (kernel namespaces, the default) or "process" (weaker, see `sandbox.py`; asked for by name).
    packages: importable packages the code may use (read-only), e.g. ``[numpy]``; the standard library always.
    """

    def __init__(self, partial: bool = True, zero_on_error: bool = True, require_closed: bool = True,
                 timeout_s: float = 2.0, memory_mb: int = 512, disk_mb: int = 32, max_total_s: float = 30.0,
                 max_tests: int | None = None, num_workers: int = 2, isolation: str = "bwrap",
                 packages: tuple[str, ...] = (), read_paths: tuple[str, ...] = (),
                 forbidden_paths: tuple[str, ...] = (), network: str = "auto"):
        self.partial, self.zero_on_error, self.require_closed = partial, zero_on_error, require_closed
        self.limits = SandboxLimits(timeout_s=timeout_s, memory_mb=memory_mb, disk_mb=disk_mb,
                                    max_total_s=max_total_s)
        self.max_tests, self.num_workers = max_tests, max(1, int(num_workers))
        self.check_params({"isolation": isolation, "network": network})
        require_isolation(isolation)
        self.isolation = isolation
        self.sandbox_kw = {"read_paths": tuple(read_paths), "forbidden_paths": tuple(forbidden_paths),
                           "packages": tuple(packages), "network": network}

    @staticmethod
    def check_params(params: dict) -> None:
        """Refuse settings this machine cannot honour when the recipe loads, not when the first rollout is scored."""
        if params.get("network", "auto") not in ("auto", "netns", "none"):
            raise ValueError(f"network must be 'auto', 'netns' or 'none', got {params['network']!r}")
        if params.get("isolation", "bwrap") == "bwrap":
            require_isolation("bwrap")
        elif params.get("isolation") != "process":
            raise ValueError(f"isolation must be 'bwrap' or 'process', got {params['isolation']!r}")

    def score_one(self, completion: str, tests) -> tuple[float, str]:
        """(score, status) for one completion; status is "no_code", "ok", "failed" or one of ERROR_STATUSES."""
        code = extract_code(completion, self.require_closed)
        if code is None or not code.strip():
            return 0.0, "no_code"
        tests = normalize_tests(tests)[: self.max_tests]
        if not tests:
            raise ValueError("the example has no tests")
        if all(isinstance(t, str) for t in tests):
            parsed = [AssertTest.parse(t) for t in tests]
            result = run_calls(code, [e for t in parsed for e in t.exprs], self.limits, isolation=self.isolation,
                               **self.sandbox_kw)
            passed, k = [], 0
            for t in parsed:
                passed.append(t.verdict(list(result.values[k:k + len(t.exprs)])))
                k += len(t.exprs)
        elif any(isinstance(t, str) for t in tests):
            raise ValueError("mixed assert and input/output tests in one example")
        else:
            result = run_inputs(code, [str(t["input"]) for t in tests], self.limits, isolation=self.isolation,
                                **self.sandbox_kw)
            passed = [out.status == "ok" and outputs_match(out.stdout, t["output"])
                      for out, t in zip(result.outputs, tests)]
        if result.status == "runtime_error":  # the code does not compile: no test passes, not even a trivial one
            passed = [False] * len(tests)
        status = result.status if result.is_error else "ok"
        if result.status == "sandbox_error":  # the sandbox failed, not the answer: never a silent zero
            raise RuntimeError(f"code sandbox failed: {result.stderr.strip()[-300:]}")
        if status in ERROR_STATUSES and self.zero_on_error:
            return 0.0, status
        n_pass = sum(passed)
        score = n_pass / len(tests) if self.partial else float(n_pass == len(tests))
        return score, status if status in ERROR_STATUSES else ("ok" if n_pass == len(tests) else "failed")

    def _safe_score_one(self, args) -> tuple[float, str]:
        completion, tests = args
        try:
            return self.score_one(completion, tests)
        except (OSError, RuntimeError) as e:  # the sandbox itself failed (disk full, no fork): not the model's fault
            return 0.0, f"sandbox_error:{type(e).__name__}"

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        tests = get_field(fields, "tests", len(completions), reward="code")
        jobs = list(zip(completions, tests))
        if self.num_workers > 1 and len(jobs) > 1:
            with ThreadPoolExecutor(min(self.num_workers, len(jobs))) as pool:
                results = list(pool.map(self._safe_score_one, jobs))
        else:
            results = [self._safe_score_one(j) for j in jobs]
        scores = [s for s, _ in results]
        statuses = [st.split(":")[0] for _, st in results]
        metrics = {
            "pass_rate": mean(scores),
            "all_pass": mean([float(st == "ok") for st in statuses]),
            "no_code": mean([float(st == "no_code") for st in statuses]),
            "errors": float(sum(st in ERROR_STATUSES for st in statuses)),
        }
        for kind in ERROR_STATUSES:
            metrics[kind] = float(statuses.count(kind))
        return RewardOutput(scores, metrics)
