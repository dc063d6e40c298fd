"""Throughput of the `code` reward: answers (problems) scored per second, asserts and stdin/stdout tests.

``python -m posttrain.rewards.bench_code [--n 32] [--isolation bwrap]`` prints one line per test shape. Each answer
is a correct solution checked against 5 tests, scored with the reward's default 2 workers, as an RL step would.
"""

from __future__ import annotations

import argparse
import time

from posttrain.rewards import build_reward

ASSERT_ANSWER = "</think>\n```python\ndef add(a, b):\n    return a + b\n```\n"
STDIN_ANSWER = "</think>\n```python\na, b = map(int, input().split())\nprint(a + b)\n```\n"
ASSERTS = [f"assert add({i}, {i + 1}) == {2 * i + 1}" for i in range(5)]
IO = [{"input": f"{i} {i + 1}\n", "output": f"{2 * i + 1}\n"} for i in range(5)]


def measure(n: int, **params) -> dict[str, float]:
    reward = build_reward("code", **params)
    out = {}
    for shape, answer, tests in (("asserts", ASSERT_ANSWER, ASSERTS), ("stdin", STDIN_ANSWER, IO)):
        reward([""], [answer], tests=[tests])  # warm-up (the isolation probe)
        t0 = time.perf_counter()
        scores = reward([""] * n, [answer] * n, tests=[tests] * n).scores
        out[shape] = n / (time.perf_counter() - t0)
        assert scores == [1.0] * n, scores
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--isolation", default=None, help="bwrap or process (default: the reward's default)")
    args = ap.parse_args()
    params = {} if args.isolation is None else {"isolation": args.isolation}
    for shape, rate in measure(args.n, **params).items():
        print(f"{shape}: {rate:.1f} problems/s (5 tests each, {args.n} problems)")


if __name__ == "__main__":
    main()
