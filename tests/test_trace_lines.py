"""Reading embedded-task traces line by line (posttrain.tasks.trace_lines; its command, posttrain.eval.traces),
checked on traces built by hand."""

from posttrain.tasks.arithmetic import make_trace, make_trace_groups, parse_expression
from posttrain.tasks.trace_lines import read_trace, summarize

P = parse_expression("7+3*2-5*3")  # running values 10, 20, 15, 45


def respond(thinking: str, answer: int) -> str:
    return f"{thinking}</think>\n\n{answer}<|im_end|>"


def test_reads_groupings_line_values_and_what_is_left_to_the_answer():
    r = read_trace(P, respond(make_trace(P), 45))
    assert r.lines == ((1, True),) * 4 and r.left_to_answer == 0 and r.answer_right and not r.malformed
    r = read_trace(P, respond("7+3=10\n+3*2-5=16\n-5*3=45", 45))  # 2-operator line with a wrong value (15)
    assert r.grouping == (1, 2, 1) and [ok for _, ok in r.lines] == [True, False, True] and r.answer_right
    r = read_trace(P, respond("7+3=10\n+3*2=20", 44))  # cut after two lines: the answer folds the last two
    assert r.grouping == (1, 1) and r.left_to_answer == 2 and not r.answer_right
    r = read_trace(P, respond(make_trace_groups(P, [3, 1]), 45))
    assert r.lines == ((3, True), (1, True))
    assert read_trace(P, respond("", 45)).left_to_answer == 4  # no thinking: the answer folds everything


def test_a_line_restating_the_wrong_pair_stops_the_reading():
    r = read_trace(P, respond("7+3=10\n*2-5=15\n-5*3=45", 45))  # the second line skips +3's restatement
    assert r.malformed and r.grouping == (1,)
    assert read_trace(P, respond("7+3=10\nso 20", 20)).malformed


def test_a_first_line_reading_the_problem_back_is_skipped_and_blamed_for_nothing():
    from posttrain.tasks.arithmetic import read_back_trace
    from posttrain.tasks.trace_lines import first_error_offset

    assert read_back_trace(P) == "7+3*2-5*3\n" + make_trace(P)
    r = read_trace(P, respond(read_back_trace(P), 45))
    assert r.lines == ((1, True),) * 4 and not r.malformed and r.answer_right and r.read_back
    assert not read_trace(P, respond(make_trace(P), 45)).read_back
    assert summarize([P], [respond("7+3*2-5*3\n7+3=10", 45)], [True])["groupings"][4] == [
        {"grouping": "rb+1+a3+F", "count": 1, "right": 1}]
    cut = respond("7+3*2-5*3\n7+3=10", 45)  # read back, one line, then forced: the answer folds three operators
    assert read_trace(P, cut).left_to_answer == 3 and first_error_offset(P, cut, read_back=True) is None
    assert first_error_offset(P, cut) == 0  # a model never taught to read back wrote a line without its value
    assert first_error_offset(P, respond("7+3*2-5*3\n7+3=11", 45), read_back=True) == len("7+3*2-5*3\n7+3=")
    # only the problem itself, once, and first: anything else is a malformed line
    assert read_trace(P, respond("7+3*2-5*4\n7+3=10", 45)).malformed
    assert read_trace(P, respond("7+3=10\n7+3*2-5*3", 45)).malformed
    assert read_trace(P, respond("7+3*2-5*3\n7+3*2-5*3\n7+3=10", 45)).malformed
    assert first_error_offset(P, respond("7+3*2-5*3\n7+3*2-5*3\n7+3=10", 45), read_back=True) == len("7+3*2-5*3\n")
    cut = respond("7+3*2", 45)  # a read-back cut by the forced </think>: a malformed line, blamed at its start
    assert read_trace(P, cut).malformed and not read_trace(P, cut).read_back
    assert first_error_offset(P, cut, read_back=True) == 0


def test_summary_counts_by_hand():
    q = parse_expression("4+5")
    responses = [respond(make_trace(P), 45), respond("7+3*2=20\n*2-5*3=45", 45), respond("7+3=10", 9),
                 respond("4+5=9", 9)]
    s = summarize([P, P, P, q], responses, forced=[False, False, True, False])
    assert s["accuracy_by_difficulty"] == {1: 1.0, 4: 2 / 3}
    assert s["line_accuracy_by_ops"] == {1: {"right": 6, "lines": 6}, 2: {"right": 2, "lines": 2}}
    assert s["groupings"][4] == [{"grouping": "1-1-1-1", "count": 1, "right": 1},
                                 {"grouping": "2-2", "count": 1, "right": 1},
                                 {"grouping": "1+a3+F", "count": 1, "right": 0}]


def test_first_error_is_the_first_wrong_value_else_a_miscopy_else_the_answer():
    from posttrain.tasks.trace_lines import first_error_offset

    assert first_error_offset(P, respond(make_trace(P), 45)) is None
    assert first_error_offset(P, respond("7+3*2=20\n*2-5*3=45", 45)) is None  # folded lines, all right
    text = respond("7+3=10\n+3*2=21\n*2-5=16\n-5*3=48", 48)  # 21 is the first error; the rest build on it
    assert text[first_error_offset(P, text):].startswith("21\n")
    text = respond("7+3=10\n-5*3=15", 45)  # the second line restates -5 instead of +3: the miscopy is blamed
    assert text[first_error_offset(P, text):].startswith("-5*3")
    text = respond("7+3=10\n+3*2=20", 44)  # right lines, the answer folds the rest wrongly
    assert text[first_error_offset(P, text):].startswith("44<|im_end|>")
    text = "</think>\n\n46"  # budget 0: the answer alone
    assert first_error_offset(P, text) == len("</think>\n\n")
    assert first_error_offset(P, "7+3=10\n+3*2=20") == len("7+3=10\n+3*2=20")  # unclosed: nothing to blame in it


def test_teacher_forced_lines_aligns_values_with_the_predictions_that_score_them(tokenizer):
    """An oracle that predicts each next token scores every line and answer right; one that repeats the current
    token scores none; the line counts add up to the groupings drawn (with the same seed)."""
    from types import SimpleNamespace

    import torch

    from posttrain.tasks.trace_lines import teacher_forced_lines

    class Oracle(torch.nn.Module):
        def __init__(self, shift):
            super().__init__()
            self.shift = shift

        def forward(self, input_ids, attention_mask=None):
            target = input_ids.roll(-self.shift, dims=1)  # shift 1: position t predicts token t + 1
            return SimpleNamespace(logits=torch.nn.functional.one_hot(target, len(tokenizer)).float())

    right = teacher_forced_lines(Oracle(1), tokenizer, n=40, batch_size=16)
    assert all(v["right"] == v["lines"] > 0 for v in right.values()), right
    assert right["answer"]["lines"] == 40 and sum(v["lines"] for k, v in right.items() if k != "answer") > 40
    wrong = teacher_forced_lines(Oracle(0), tokenizer, n=40, batch_size=16)
    assert all(v["right"] == 0 for v in wrong.values()), wrong


def test_trace_reading_command_reads_a_checkpoint(tiny_model_dir, capsys):
    """`python -m posttrain.eval.traces CHECKPOINT`: one JSON reading per budget of the checkpoint's greedy capped
    traces (one problem per difficulty with `--n 1`), or the teacher-forced line accuracy."""
    import json

    from posttrain.eval.traces import main

    assert main([str(tiny_model_dir), "--budgets", "2,4", "--n", "1"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["budget"] for r in rows] == [2, 4]
    for r in rows:
        assert list(r["accuracy_by_difficulty"]) == [str(d) for d in range(1, 9)]
        assert sum(g["count"] for groups in r["groupings"].values() for g in groups) == 8
    assert main([str(tiny_model_dir), "--teacher-forced", "8"]) == 0
    forced = json.loads(capsys.readouterr().out)
    assert forced["answer"]["lines"] == 8
