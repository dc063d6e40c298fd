"""Real datasets: local JSONL/Parquet with a column mapping, GSM8K-style answers, and bad rows."""

import json

import pytest

from posttrain.config import DataConfig
from posttrain.data import DataError, file_examples

GSM8K = [
    {"question": "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
                 "How many clips did Natalia sell altogether in April and May?",
     "answer": "Natalia sold 48/2 = 24 clips in May.\nNatalia sold 48+24 = 72 clips altogether in April and May.\n#### 72"},
    {"question": "Weng earns $12 an hour for babysitting. Yesterday, she just did 50 minutes of babysitting. "
                 "How much did she earn?",
     "answer": "Weng earns 12/60 = $0.2 per minute.\nWorking 50 minutes, she earned 0.2 x 50 = $10.\n#### 10"},
    {"question": "Betty has 3 apples and buys 4 more. How many apples does she have?", "answer": "3+4 = 7\n#### 7"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def gsm8k_cfg(path, **kw):
    return DataConfig(source="file", path=str(path), prompt_column="question", answer_column="answer",
                      answer_delimiter="####", **kw)


def test_gsm8k_jsonl_with_column_mapping(tmp_path):
    ex = file_examples(gsm8k_cfg(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)))
    assert [e.answer for e in ex] == ["72", "10", "7"]
    assert ex[0].reasoning.startswith("Natalia sold 48/2 = 24") and "####" not in ex[0].reasoning
    assert ex[0].prompt.startswith("Natalia sold clips") and ex[0].source == "file"


def test_parquet_matches_jsonl(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(GSM8K), tmp_path / "gsm.parquet")
    a = file_examples(gsm8k_cfg(tmp_path / "gsm.parquet"))
    b = file_examples(gsm8k_cfg(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)))
    assert a == b


@pytest.mark.parametrize("row,field,why", [
    ({"answer": "#### 1"}, "question", "missing"),
    ({"question": 5, "answer": "#### 1"}, "question", "must be a string"),
    ({"question": "   ", "answer": "#### 1"}, "question", "empty"),
    ({"question": "x" * 3000, "answer": "#### 1"}, "question", "over data.max_prompt_chars"),
    ({"question": "q?", "answer": "1"}, "answer", "no '####' delimiter"),
])
def test_bad_row_stops_with_file_row_and_field(tmp_path, row, field, why):
    path = write_jsonl(tmp_path / "bad.jsonl", GSM8K[:2] + [row])
    with pytest.raises(DataError) as ei:
        file_examples(gsm8k_cfg(path))
    msg = str(ei.value)
    assert str(path) in msg and "line 3:" in msg and f"'{field}'" in msg and why in msg


def test_bad_rows_skipped_counted_and_listed(tmp_path):
    path = tmp_path / "mixed.jsonl"
    path.write_text(json.dumps(GSM8K[0]) + "\n{not json\n" + json.dumps({"question": ""}) + "\n" + json.dumps(GSM8K[2]) + "\n")
    listed = tmp_path / "bad_rows.jsonl"
    ex = file_examples(gsm8k_cfg(path, skip_bad_rows=True), listed)
    assert [e.answer for e in ex] == ["72", "7"]
    bad = [json.loads(line) for line in listed.read_text().splitlines()]
    assert [b["at"] for b in bad] == ["line 2", "line 3"] and "not valid JSON" in bad[0]["error"]


def test_arithmetic_source_respects_difficulty_range():
    from posttrain.recipe import load_recipe
    from posttrain.tasks.task import build_task

    ex = build_task(load_recipe(None, ["task.min_difficulty=3", "task.max_difficulty=4"])).train_examples(50, 0)
    assert len(ex) == 50 and {e.difficulty for e in ex} == {3, 4}
    assert all(int(e.answer) == eval(_nest(e.prompt)) for e in ex)


def _nest(expr):
    out = expr[0]
    for i in range(1, len(expr), 2):
        out = f"({out}{expr[i]}{expr[i + 1]})"
    return out


def test_sft_examples_from_file(tmp_path, tokenizer):
    from posttrain.config import BudgetMix
    from posttrain.sft_data import build_sft_examples

    ex = file_examples(gsm8k_cfg(write_jsonl(tmp_path / "gsm.jsonl", GSM8K)))
    rows = build_sft_examples(tokenizer, ex, [4096], BudgetMix(budgeted=0, autonomous=1, zero=0), 0, 512)
    assert len(rows) == 3
    text = tokenizer.decode([t for t, m in zip(rows[0]["input_ids"], rows[0]["completion_mask"]) if m])
    assert text.startswith("Natalia sold 48/2 = 24") and text.endswith("</think>\n\n72<|im_end|>")


@pytest.mark.parametrize("budget_traces", ["most_explicit", "most_lines", "sampled", ["most_explicit", "most_lines"]])
def test_sft_budgeted_examples_fit_and_follow_budget_traces(tokenizer, arithmetic_sft, budget_traces):
    from posttrain.tasks.arithmetic import fit_trace, most_lines_trace, parse_expression
    from posttrain.tokenizer import THINK_END, count_tokens

    ex, rows = arithmetic_sft(200, 0, [16, 24], budget_traces)
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    differs, took = 0, {"most_explicit": 0, "most_lines": 0}
    for e, row in zip(ex, rows):
        think = tokenizer.decode([t for t, m in zip(row["input_ids"], row["completion_mask"]) if m]).split(THINK_END)[0]
        assert 0 < row["n_think"] == count(think) <= row["budget"], (e.prompt, think)
        p = parse_expression(e.prompt)
        explicit, lines = fit_trace(p, row["budget"], count), most_lines_trace(p, row["budget"], count)
        if budget_traces == "most_explicit":
            assert think == explicit
        elif budget_traces == "most_lines":
            assert think == lines
        elif isinstance(budget_traces, list):  # one of the two, drawn per example
            assert think in (explicit, lines)
            if explicit != lines:
                took["most_explicit" if think == explicit else "most_lines"] += 1
        differs += think != explicit
    assert (differs == 0) == (budget_traces == "most_explicit")
    if isinstance(budget_traces, list):
        assert min(took.values()) >= 5, took


def test_budget_traces_config_rejects_unknown_and_empty():
    from pydantic import ValidationError

    from posttrain.config import SFTStageConfig

    assert SFTStageConfig(budget_traces=["most_lines", "sampled"]).budget_traces == ["most_lines", "sampled"]
    for bad in ("shortest", [], ["most_lines", "shortest"]):
        with pytest.raises(ValidationError, match="budget_traces"):
            SFTStageConfig(budget_traces=bad)


def test_file_rows_are_named_by_their_line_and_edge_values_are_checked(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n" + json.dumps(GSM8K[0]) + "\n\n" + json.dumps({"question": "q?", "answer": "r #### "}) + "\n")
    with pytest.raises(DataError, match=r"d.jsonl, line 4: field 'answer' has an empty answer"):
        file_examples(gsm8k_cfg(path))
    floats = tmp_path / "f.jsonl"
    floats.write_text(json.dumps({"prompt": "3*9?", "answer": 27.0}) + "\n" + json.dumps({"prompt": "x", "answer": 0.5}) + "\n")
    ex = file_examples(DataConfig(source="file", path=str(floats)))
    assert [e.answer for e in ex] == ["27", "0.5"]
    broken = tmp_path / "a.json"
    broken.write_text('[{"prompt": "a", "answer": "1"},\n {prompt: "b"}]')
    with pytest.raises(DataError, match=r"a.json: not valid JSON at line 2, column 3"):
        file_examples(DataConfig(source="file", path=str(broken)))


def test_reasoning_column_named_nowhere_is_an_error_and_a_missing_one_keeps_the_delimiters(tmp_path):
    path = write_jsonl(tmp_path / "g.jsonl", GSM8K[:2])
    with pytest.raises(DataError, match=r"data.reasoning_column 'whyy' is in no row \(fields: answer, question\)"):
        file_examples(gsm8k_cfg(path, reasoning_column="whyy"))
    path = write_jsonl(tmp_path / "h.jsonl", [{**GSM8K[0], "why": "because"}, GSM8K[1]])
    ex = file_examples(gsm8k_cfg(path, reasoning_column="why"))
    assert ex[0].reasoning == "because" and ex[1].reasoning and "####" not in ex[1].reasoning


def test_split_held_out_counts_each_held_prompt_once_and_trains_on_none_of_them():
    from types import SimpleNamespace as R

    from posttrain.data import split_held_out

    from posttrain.data import spread

    # k of n rows, the middle of each of k equal parts: (2j + 1) * n // 2k
    assert spread(10, 3) == [1, 5, 8] and spread(7, 4) == [0, 2, 4, 6] and spread(3, 5) == [0, 1, 2]
    rows = [R(prompt=p) for p in ["a", "b", "c", "d", "b", "e", "d"]]
    train, held = split_held_out(rows, 4)  # rows 0, 2, 4, 6: a, c, b, d
    assert [r.prompt for r in held] == ["a", "c", "b", "d"]
    assert [r.prompt for r in train] == ["e"]  # rows 1 (b) and 3 (d) repeat a held-out prompt
    rows = [R(prompt=p) for p in ["a", "b", "c", "b", "e", "f", "g", "b"]]
    train, held = split_held_out(rows, 4)  # rows 1, 3, 5, 7: b, b, f, b
    assert [r.prompt for r in held] == ["b", "f"]  # b once, where it first comes
    assert [r.prompt for r in train] == ["a", "c", "e", "g"]
    assert split_held_out(rows, 0) == (rows, [])


def test_a_bad_data_file_stops_the_run_before_any_model_loads(tmp_path, capsys):
    """The data file is read before the first stage: its bad rows are named even where loading the model would have
    failed first (here the checkpoint's config.json is broken, and the error is about the data)."""
    import json as _json

    from posttrain.cli import main

    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{not json")
    rows = [{"prompt": "p1", "answer": "1"}, {"prompt": "", "answer": "2"}, {"prompt": "p3"}]
    (tmp_path / "d.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    (tmp_path / "r.yaml").write_text(f"stages: [sft]\nmodel: {{path: {ckpt}}}\n"
                                     f"data: {{source: file, path: {tmp_path / 'd.jsonl'}}}\n")
    rc = main(["run", str(tmp_path / "r.yaml"), "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2 and "line 2" in err and "line 3" in err and "config.json" not in err and "Traceback" not in err


def test_a_dataset_saved_to_disk_is_read_like_a_file(tmp_path):
    """`data.path` may be a directory written by `datasets`' save_to_disk: a Dataset, or a DatasetDict whose
    `data.split` is read; its rows are validated like a file's."""
    import datasets

    rows = [{"question": r["question"], "answer": r["answer"]} for r in GSM8K]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "one"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2]),
                          "test": datasets.Dataset.from_list(rows[2:])}).save_to_disk(str(tmp_path / "dict"))
    assert [e.answer for e in file_examples(gsm8k_cfg(tmp_path / "one"))] == ["72", "10", "7"]
    assert [e.answer for e in file_examples(gsm8k_cfg(tmp_path / "dict", split="test"))] == ["7"]
    with pytest.raises(DataError, match=r"data.split: .*dict has no split 'dev' \(it has: train, test\)"):
        file_examples(gsm8k_cfg(tmp_path / "dict", split="dev"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="is a directory but not a dataset saved with `save_to_disk`"):
        file_examples(gsm8k_cfg(tmp_path / "empty"))
    datasets.Dataset.from_list([{"question": "q", "answer": "no delimiter"}]).save_to_disk(str(tmp_path / "bad"))
    with pytest.raises(DataError, match=r"bad\[train\], row 1: field 'answer' has no '####' delimiter"):
        file_examples(gsm8k_cfg(tmp_path / "bad"))
