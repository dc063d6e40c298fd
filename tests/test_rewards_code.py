"""The `code` reward end to end: extraction, both test formats, partial credit, and escape attempts scoring 0."""

import json

import pytest

from posttrain.rewards import build_reward
from posttrain.rewards.code import extract_code, normalize_tests
from posttrain.rewards.combine import CombinedReward

FAST = dict(timeout_s=1.0, memory_mb=256)
ASSERTS = ["assert add(1, 2) == 3", "assert add(-1, 1) == 0", "assert add(2, 2) == 5"]  # the last one is wrong
IO = [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10"}, {"input": "0 0\n", "output": "1\n"}]


def answer(code: str) -> str:
    return f"let me think</think>\n\nHere you go:\n```python\n{code}\n```\n"


def test_extract_code():
    assert extract_code(answer("print(1)")) == "print(1)\n"
    two = "t</think>```\nprint(0)\n```\nand\n```python\nprint(1)\n```\nthen ```text\nx\n```"
    assert extract_code(two) == "print(1)\n"  # the last python block, not the last block
    assert extract_code("t</think>```\nprint(2)\n```") == "print(2)\n"
    assert extract_code("t</think>print(3)") == "print(3)"
    assert extract_code("```python\nprint(4)\n```") is None  # never closed the think block
    assert extract_code("```python\nprint(4)\n```", require_closed=False) == "print(4)\n"


def test_normalize_tests():
    assert normalize_tests(json.dumps({"inputs": ["1"], "outputs": ["2"]})) == [{"input": "1", "output": "2"}]
    with pytest.raises(ValueError, match="assert string"):
        normalize_tests([{"stdin": "1"}])


def test_asserts_partial_and_all_pass():
    good = answer("def add(a, b):\n    return a + b")
    assert build_reward("code", **FAST)([""], [good], tests=[ASSERTS]).scores == pytest.approx([2 / 3])
    assert build_reward("code", partial=False, **FAST)([""], [good], tests=[ASSERTS]).scores == [0.0]
    assert build_reward("code", partial=False, **FAST)([""], [good], tests=[ASSERTS[:2]]).scores == [1.0]


def test_stdin_stdout_tests():
    good = answer("a, b = map(int, input().split())\nprint(a + b)")
    out = build_reward("code", **FAST)([""], [good], tests=[IO])
    assert out.scores == pytest.approx([2 / 3])  # "10" matches "10\n" after normalisation; 0+0 != 1
    assert out.metrics["errors"] == 0.0


def test_batch_metrics_and_escapes_score_zero():
    comps = [
        answer("def add(a, b):\n    return a + b"),                      # 2/3
        answer("def add(a, b):\n    while True: pass"),                   # timeout
        answer("import os\nwhile True: os.fork()"),                       # violation (fork bomb)
        answer("x = bytearray(10**11)"),                                  # memory
        answer("print(open('/etc/passwd').read())\ndef add(a, b): return a + b"),  # violation (read)
        answer("open('/var/tmp/posttrain_code_pwned', 'w')\ndef add(a, b): return a + b"),  # violation (write)
        answer("import socket\nsocket.create_connection(('1.1.1.1', 80))"),  # violation (network)
        "never closed the think block",                                    # no code
        answer("def add(a, b):\n    return a - b"),                       # 0/3... add(-1,1)=-2: fails all
    ]
    reward = build_reward("code", num_workers=2, **FAST)
    out = reward([""] * len(comps), comps, tests=[ASSERTS] * len(comps))
    assert out.scores == pytest.approx([2 / 3, 0, 0, 0, 0, 0, 0, 0, 0])
    m = out.metrics
    assert (m["errors"], m["timeout"], m["memory"], m["violation"]) == (6.0, 1.0, 1.0, 4.0)
    assert m["no_code"] == pytest.approx(1 / 9)


def test_zero_on_error_false_keeps_tests_passed_before_a_timeout():
    code = answer("def add(a, b):\n    if a == 2:\n        while True: pass\n    return a + b")
    keep = build_reward("code", zero_on_error=False, **FAST)([""], [code], tests=[ASSERTS])
    assert keep.scores == pytest.approx([2 / 3]) and keep.metrics["timeout"] == 1.0


def test_sandbox_errors_reach_the_combined_errors_metric():
    comps = [answer("def add(a, b):\n    return a + b"), answer("import os\nos.system('ls')")]
    out = CombinedReward([{"name": "code", "params": FAST}])([""] * 2, comps, tests=[ASSERTS[:2]] * 2)
    assert out.scores == [1.0, 0.0]
    assert out.metrics["reward/code/errors"] == 1.0 and out.metrics["reward/code/violation"] == 1.0


def test_bad_tests_data_is_a_counted_error_not_a_crash():
    comps = [answer("print(1)")] * 2
    out = CombinedReward([{"name": "code", "params": FAST}])([""] * 2, comps, tests=[[{"in": 1}], [{"input": "", "output": "1"}]])
    assert out.scores == [0.0, 1.0] and out.metrics["reward/code/errors"] == 1.0
