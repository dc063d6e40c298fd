"""exact_int, format and math rewards against hand-checked cases."""

import threading

import pytest

from posttrain.rewards import build_reward
from posttrain.rewards.math import extract_math_answer, last_boxed, math_equal
from posttrain.rewards.parse import grade_integer
from posttrain.rewards.verifiable import is_well_formed


def test_exact_int_is_the_eval_grader():
    completions = ["7+3=10</think>\n\n10", "7+3=10</think>\n\n 10 ", "</think>\n\n10 apples", "10", "<think>x</think>-4"]
    answers = [10, "10", 10, 10, -4]
    out = build_reward("exact_int")([""] * 5, completions, answer=answers)
    assert out.scores == [1.0, 1.0, 0.0, 0.0, 1.0]  # "10 apples" is not an integer; "10" never closed thinking
    assert out.scores == [float(grade_integer(c, a)) for c, a in zip(completions, answers)]
    assert out.metrics["accuracy"] == pytest.approx(3 / 5)


@pytest.mark.parametrize("text, ok", [
    ("reasoning</think>\n\n42", True),
    ("<think>reasoning</think>\n\n42", True),
    ("  <think>r</think>x", True),
    ("reasoning</think>\n\n", False),  # empty answer
    ("reasoning without close", False),
    ("a<think>b</think>c", False),  # nested opening inside the thinking
    ("<think>a<think>b</think>c", False),  # two openings
    ("r</think>4</think>2", False),  # stray close in the answer
    ("r</think>answer <think>", False),  # stray open in the answer
])
def test_format(text, ok):
    assert is_well_formed(text) is ok
    assert build_reward("format")([""], [text]).scores == [float(ok)]


@pytest.mark.parametrize("pred, gold", [
    ("0.5", r"\frac{1}{2}"),
    (r"\frac{1}{2}", "0.5"),
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"),
    ("1/2", "0.5"),
    (r"$\frac{6}{4}$", "1.5"),
    (r"\boxed{x(x+2)}", "x^2+2x"),
])
def test_math_equivalent(pred, gold):
    assert math_equal(extract_math_answer("t</think>\n\n" + pred), gold)


@pytest.mark.parametrize("pred, gold", [
    ("0.51", r"\frac{1}{2}"),
    (r"\boxed{2\sqrt{3}}", r"\sqrt{8}"),
    ("3", "2"),
    (r"\boxed{2.83}", r"\sqrt{8}"),  # a rounded value is not the exact answer
    ("", "2"),
])
def test_math_not_equivalent(pred, gold):
    assert not math_equal(extract_math_answer("t</think>\n\n" + pred) or "", gold)


def test_math_reward_takes_last_box_after_think_and_requires_close():
    r = build_reward("math")
    comps = [
        r"I guess \boxed{7}</think>\n\nSo $\boxed{1}$, no wait: $\boxed{\frac{1}{2}}$",  # last box after think
        r"I guess \boxed{0.5}</think>\n\nThe answer is \boxed{3}.",  # the think block's box does not count
        r"never closed \boxed{0.5}",
    ]
    assert r([""] * 3, comps, answer=["0.5"] * 3).scores == [1.0, 0.0, 0.0]
    assert build_reward("math", require_closed=False)([""], [comps[2]], answer=["1/2"]).scores == [1.0]
    assert last_boxed(r"\boxed{a{b}c} then \boxed{d}") == "d"
    assert last_boxed(r"\boxed{a{b}c}") == "a{b}c"


def test_math_reward_works_off_the_main_thread():
    # math-verify's signal-based timeout raises off the main thread; the reward must drop it there, not fail.
    result, errors = {}, []

    def work():
        try:
            result["out"] = build_reward("math")(["", ""], ["t</think>0.5", "t</think>0.6"], answer=["1/2", "1/2"])
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=work)
    t.start()
    t.join(60)
    assert not errors and result["out"].scores == [1.0, 0.0]


def test_math_overlong_answer_scores_zero_without_parsing():
    comp = "t</think>" + "1+" * 20 + "1"  # 41 characters that evaluate to 21
    assert build_reward("math", max_answer_chars=10)([""], [comp], answer=["21"]).scores == [0.0]
    assert build_reward("math", max_answer_chars=100)([""], [comp], answer=["21"]).scores == [1.0]
