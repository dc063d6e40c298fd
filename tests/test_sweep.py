"""`posttrain sweep`: Wilson intervals and aggregation against hand-worked numbers, model resolution, the rollout
workers' generation against HF `generate`, and the command end to end on the tiny random checkpoint (locally and
on Ray actors)."""

import json
from pathlib import Path

import pytest

from posttrain.eval.stats import paired_difference, quantile, wilson_interval
from posttrain.eval.sweep import MODES, ROW_KEYS, SweepError, aggregate, grade_responses, resolve_model
from posttrain.eval.sweep_options import parse_budgets, parse_difficulties
from posttrain.generate import Response
from posttrain.tasks.arithmetic import parse_expression


# ------------------------------------------------------------------------------------------- Wilson interval


def test_wilson_8_of_10_by_hand():
    # p = 0.8, n = 10, z = 1.96, z^2 = 3.8415
    # denom  = 1 + z^2/n               = 1.38415
    # centre = (p + z^2/(2n)) / denom  = (0.8 + 0.19207) / 1.38415 = 0.71674
    # half   = z/denom * sqrt(p(1-p)/n + z^2/(4n^2)) = 1.41600 * sqrt(0.016 + 0.0096037) = 1.41600 * 0.16001
    #        = 0.22658  ->  [0.4902, 0.9433] (the value in published Wilson tables)
    lo, hi = wilson_interval(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-4) and hi == pytest.approx(0.9433, abs=1e-4)


def test_wilson_edges():
    # 0/10: p = 0, centre = half = 0.19207 / 1.38415 = 0.13877 -> [0, 0.2775]; n/n mirrors it
    lo, hi = wilson_interval(0, 10)
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-4)
    lo, hi = wilson_interval(10, 10)
    assert lo == pytest.approx(1 - 0.2775, abs=1e-4) and hi == 1.0
    lo, hi = wilson_interval(1, 1)  # one success: still a wide interval, never [1, 1]
    assert 0.2 < lo < 0.21 and hi == 1.0
    assert all(x != x for x in wilson_interval(0, 0))  # nan: no data


def test_paired_difference_by_hand():
    # 100 items: 10 gained, 2 lost, 88 unchanged. diff = 8/100 = 0.08
    # var = (12 - 8^2/100) / 100^2 = 11.36e-4 -> half = 1.96 * 0.033705 = 0.066062
    # McNemar exact: m = 12, 2 * (C(12,0) + C(12,1) + C(12,2)) / 2^12 = 2 * 79 / 4096 = 0.038574
    before = [False] * 10 + [True] * 2 + [True] * 50 + [False] * 38
    after = [True] * 10 + [False] * 2 + [True] * 50 + [False] * 38
    d = paired_difference(before, after)
    assert (d["gained"], d["lost"], d["n"]) == (10, 2, 100)
    assert d["diff"] == pytest.approx(0.08)
    assert d["ci_low"] == pytest.approx(0.08 - 0.066062, abs=1e-5) and d["ci_high"] == pytest.approx(0.146062, abs=1e-5)
    assert d["p_value"] == pytest.approx(0.038574, abs=1e-6) and d["measurably"] == "above"
    # the mirror image is measurably below; 5 gained and 3 lost is not measurable (p = 2 * 93/256 = 0.7266)
    assert paired_difference(after, before)["measurably"] == "below"
    d = paired_difference([False] * 5 + [True] * 3, [True] * 5 + [False] * 3)
    assert d["p_value"] == pytest.approx(0.7265625) and d["measurably"] == "unchanged"
    assert paired_difference([True, False], [True, False])["p_value"] == 1.0  # nothing changed
    with pytest.raises(ValueError, match="equal"):
        paired_difference([True], [True, False])


def test_quantile_matches_statistics_inclusive():
    import statistics

    xs = [3, 4, 10, 5, 7, 1]
    assert quantile(xs, 0.5) == statistics.median(xs)
    assert quantile(xs, 0.9) == pytest.approx(statistics.quantiles(xs, n=10, method="inclusive")[-1])


# ------------------------------------------------------------------------------------------------ aggregation


def _resp(thinking: str, answer: str | None, n_think: int, forced: bool = False, budget=4) -> Response:
    text = thinking if answer is None else f"{thinking}</think>\n\n{answer}"
    return Response(text, [], n_think, answer is not None, forced, budget)


def _hand_graded():
    problems = [parse_expression(e) for e in ("7+3", "2*4", "9-1", "1+2*3")]  # answers 10, 8, 8, 9
    responses = [
        _resp("7+3=10", "10", 3),                # right, closed by itself within budget: adherent
        _resp("2*4=", "9", 4, forced=True),      # wrong, cap forced </think> at 4: not adherent
        _resp("9-1=8 8 8 8", None, 10),          # never closed: wrong (the grader needs </think>), not adherent
        _resp("1+2=3\n*3=9", "9", 5),            # right, closed by itself but over the budget: not adherent
    ]
    return problems, responses


def test_aggregate_hand_graded_capped():
    problems, responses = _hand_graded()
    rows = aggregate(grade_responses(problems, responses), "m", 4, "capped")
    assert [r["difficulty"] for r in rows] == [1, 2, "all"]
    a = rows[-1]
    assert a["n"] == 4 and a["accuracy"] == 0.5 and (a["model"], a["budget"], a["mode"]) == ("m", 4, "capped")
    # thinking tokens [3, 4, 10, 5] -> sorted [3, 4, 5, 10]: mean 5.5, median (4+5)/2, p90 at 0.9*3 = 2.7:
    # 5 + 0.7 * (10 - 5) = 8.5
    assert a["think_tokens_mean"] == 5.5 and a["think_tokens_median"] == 4.5 and a["think_tokens_p90"] == 8.5
    assert a["adherence"] == 0.25 and a["forced_share"] == 0.25
    # |3-4|/4 + 0 + |10-4|/4 + |5-4|/4 = 0.25 + 0 + 1.5 + 0.25 = 2.0, over 4 responses
    assert a["rel_length_error"] == 0.5
    assert (a["accuracy_ci_low"], a["accuracy_ci_high"]) == wilson_interval(2, 4)
    d1 = rows[0]  # the three one-operator problems: [3, 4, 10]
    assert d1["n"] == 3 and d1["accuracy"] == pytest.approx(1 / 3)
    assert d1["think_tokens_median"] == 4 and d1["think_tokens_p90"] == pytest.approx(4 + 0.8 * 6)
    assert d1["adherence"] == pytest.approx(1 / 3)
    assert rows[1]["n"] == 1 and rows[1]["accuracy"] == 1.0 and rows[1]["adherence"] == 0.0


def test_aggregate_auto_and_zero_have_no_budget_metrics():
    problems, responses = _hand_graded()
    records = grade_responses(problems, responses)
    auto = aggregate(records, "m", None, "natural")[-1]
    assert auto["budget"] == "auto" and auto["adherence"] is None and auto["rel_length_error"] is None
    assert auto["forced_share"] is None  # natural mode never forces
    zero = aggregate(records, "m", 0, "natural")[-1]
    assert zero["budget"] == 0 and zero["rel_length_error"] is None and zero["adherence"] is not None
    assert set(ROW_KEYS) == set(auto)


# ---------------------------------------------------------------------------------------------- model paths


def _run_dir(root: Path, stages, done: dict) -> Path:
    run = root / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("stages: [" + ", ".join(stages) + "]\n")
    for stage, info in done.items():
        (run / stage).mkdir()
        (run / stage / "done.json").write_text(json.dumps(info))
    return run


def _ckpt(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def test_resolve_run_dir_takes_last_model_stage(tmp_path, tiny_model_dir):
    run = _run_dir(tmp_path, ["base", "sft", "rm", "eval", "grpo"], {  # grpo not run yet
        "base": {"checkpoint": "run/base/checkpoint"},
        "sft": {"checkpoint": "run/sft/checkpoint"},
        "rm": {"genrm": "elsewhere", "produces_model": False},
        "eval": {"rows": 3, "produces_model": False},
    })
    _ckpt(run / "base" / "checkpoint")
    _ckpt(run / "sft" / "checkpoint")
    spec = resolve_model(str(run))
    assert spec.label == str(run) and spec.checkpoint == run / "sft" / "checkpoint" and spec.adapter is None
    assert resolve_model(str(tiny_model_dir)).checkpoint == Path(tiny_model_dir)
    # reading a run directory creates nothing in it (no folder for the stage that has not run)
    assert sorted(p.name for p in run.iterdir()) == ["base", "eval", "recipe.yaml", "rm", "sft"]


def test_resolve_run_dir_uses_its_own_checkpoint_not_done_json_path(tmp_path, monkeypatch):
    """done.json's `checkpoint` is relative to where that run started: from a directory where the same relative
    path names another run's model (or with an absolute path left by a copied run), the run directory's own
    checkpoint is the one swept."""
    run = _run_dir(tmp_path, ["base", "sft", "grpo"], {
        "sft": {"checkpoint": "runs/a/sft/checkpoint"},
        "grpo": {"checkpoint": "runs/a/grpo/checkpoint"},
    })
    own = _ckpt(run / "grpo" / "checkpoint")
    _ckpt(run / "sft" / "checkpoint")
    cwd = tmp_path / "elsewhere"
    other = _ckpt(cwd / "runs" / "a" / "grpo" / "checkpoint")  # another run's model at done.json's relative path
    monkeypatch.chdir(cwd)
    assert resolve_model(str(run)).checkpoint == own
    (run / "grpo" / "done.json").write_text(json.dumps({"checkpoint": str(other)}))  # absolute, of a copied run
    assert resolve_model(str(run)).checkpoint == own
    # the last model stage finished but its checkpoint is gone: an error, not another run's (or stage's) model
    (own / "config.json").unlink()
    with pytest.raises(SweepError, match=r"stage 'grpo' finished with a model.*grpo/checkpoint has no config.json"):
        resolve_model(str(run))


def test_resolve_run_dir_falls_back_to_sft_checkpoint_and_errors(tmp_path):
    run = _run_dir(tmp_path, ["base", "sft"], {})
    with pytest.raises(SweepError, match=r"no checkpoint found \(no stage of its recipe.yaml finished with one, and no .*sft/checkpoint\)"):
        resolve_model(str(run))
    (run / "sft" / "checkpoint").mkdir(parents=True)
    (run / "sft" / "checkpoint" / "config.json").write_text("{}")
    assert resolve_model(str(run)).checkpoint == run / "sft" / "checkpoint"


def test_resolve_bad_paths(tmp_path):
    with pytest.raises(SweepError, match="not a directory"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(SweepError, match="neither a run directory"):
        resolve_model(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/no/such/base"}))
    with pytest.raises(SweepError, match="/no/such/base"):
        resolve_model(str(tmp_path))


# --------------------------------------------------------------------------------------------------- options


@pytest.mark.parametrize("spec", ["²", "1,²", "-1", "8,,auto", "auto8", " "])
def test_parse_budgets_rejects_non_ascii_digits_and_junk(spec):
    with pytest.raises(SweepError, match=r"--budgets"):
        parse_budgets(spec)


def test_parse_budgets_drops_repeats_in_first_order():
    assert parse_budgets("8,8,auto,auto") == [8, None]
    assert parse_budgets("auto, 16,0,016,auto,0") == [None, 16, 0]


@pytest.mark.parametrize("spec", ["abc", "0-9", "9", "3-1", "1-", "0", "1,x", "1-8-9"])
def test_parse_difficulties_rejects_bad_specs(spec):
    with pytest.raises(SweepError, match=r"--difficulties") as e:
        parse_difficulties(spec)
    assert repr(spec) in str(e.value)


def test_parse_difficulties_valid():
    from posttrain.tasks.arithmetic import MAX_DIFFICULTY, MIN_DIFFICULTY

    assert parse_difficulties(f"{MIN_DIFFICULTY}-{MAX_DIFFICULTY}") == list(range(MIN_DIFFICULTY, MAX_DIFFICULTY + 1))
    assert parse_difficulties("3-3") == [3] and parse_difficulties("5, 1,5") == [5, 1]


def _cuda_case():
    import torch

    return "cuda:7" if torch.cuda.is_available() and torch.cuda.device_count() < 8 else "cuda"


@pytest.mark.parametrize("kw, match", [
    (dict(n_per_difficulty=0), r"--n must be an integer >= 1, got 0"),
    (dict(n_per_difficulty=-2), r"--n must be an integer >= 1, got -2"),
    (dict(difficulties=[]), r"--difficulties: no difficulty"),
    (dict(difficulties=[0, 9]), r"--difficulties: 0 is outside the task's 1\.\.8"),
    (dict(batch_size=0), r"--batch-size must be an integer >= 1, got 0"),
    (dict(max_new_tokens=0), r"--max-new-tokens must be an integer >= 1, got 0"),
    (dict(workers=0), r"--workers must be an integer >= 1, got 0"),
    (dict(device="bogus"), r"--device 'bogus': expected auto, cpu or cuda\[:N\]"),
    (dict(device="cuda"), None),  # filled in below: depends on this machine
    (dict(backend="slurm"), r"--backend 'slurm'"),
    (dict(budgets=[-1]), r"--budgets: -1"),
])
def test_run_sweep_checks_options_before_any_model(tmp_path, kw, match):
    """Each bad setting is a SweepError naming the option and value, raised before models are even resolved (the
    model path here does not exist) and so before any loads."""
    from posttrain.eval.sweep import run_sweep

    if "device" in kw and kw["device"] == "cuda":
        kw = dict(device=_cuda_case())
        import torch

        if torch.cuda.is_available():
            match = r"--device 'cuda:7': this machine has \d+ CUDA device"
        else:
            match = r"--device 'cuda': CUDA is not available"
    args = dict(budgets=[0], n_per_difficulty=1, difficulties=[1], max_new_tokens=2, batch_size=1, workers=1,
                backend="local", device="cpu")
    args.update(kw)
    with pytest.raises(SweepError, match=match):
        run_sweep([str(tmp_path / "missing")], **args)


def test_ray_fit_message_names_the_sweep_options():
    """The sweep's own message when its workers do not fit Ray (init_ray's names recipe keys of the RL actors)."""
    from posttrain.eval.sweep import _check_ray_fits

    _check_ray_fits(2, 1, 0.0, 2.0, 0.0)  # fits: no error
    with pytest.raises(SweepError) as e:
        _check_ray_fits(3, 1, 0.0, 2.0, 0.0)
    msg = str(e.value)
    assert "--workers 3" in msg and "at most 2 workers of 1 CPU fit" in msg and "sweep.workers" in msg
    assert "ray.*.cpus" not in msg and "ray.num_cpus" not in msg
    with pytest.raises(SweepError, match=r"at most 1 worker of 2 CPUs fit.*--threads.*raise `ray.num_cpus`"):
        _check_ray_fits(2, 2, 0.0, 3.0, 0.0, recipe_ray=True)  # a recipe's sweep stage (Ray from its `ray` section)
    with pytest.raises(SweepError, match=r"not even one worker fits.*--threads"):
        _check_ray_fits(1, 8, 0.0, 2.0, 0.0)
    with pytest.raises(SweepError, match=r"Ray has 0 GPUs"):
        _check_ray_fits(2, 1, 0.5, 4.0, 0.0)


def test_distinct_models_drops_repeats_and_keeps_labels_distinct(tmp_path):
    from posttrain.eval.sweep import ModelSpec, distinct_models

    a, b = _ckpt(tmp_path / "a"), _ckpt(tmp_path / "b")
    specs = [resolve_model(str(a)), resolve_model(str(b)), resolve_model(str(a) + "/"),
             resolve_model(str(tmp_path / "b" / ".." / "a"))]
    assert [s.label for s in distinct_models(specs)] == [str(a), str(b)]  # the same model given again: dropped
    got = distinct_models([ModelSpec("m", a), ModelSpec("m", b), ModelSpec("m", a)])
    assert len(got) == 2 and len({s.label for s in got}) == 2 and all(s.label.startswith("m") for s in got)
    assert str(a) in got[0].label and str(b) in got[1].label


def test_table_and_plot_titles_keep_long_labels_apart():
    """Two long labels with the same last 29 characters: the table (and the plot titles) must not show both as one
    "...<tail>"."""
    from posttrain.eval.report import format_sweep_table, short_labels

    problems, responses = _hand_graded()
    records = grade_responses(problems, responses)
    tail = "/runs/quickstart/sft/checkpoint"
    labels = ["/data/experiment-one" + tail, "/data/experiment-two" + tail]
    rows = [r for label in labels for r in aggregate(records, label, 4, "natural")]
    lines = format_sweep_table(rows).splitlines()[2:]
    assert len(lines) == 2 and lines[0] != lines[1]
    assert lines[0].startswith(labels[0]) and lines[1].startswith(labels[1])
    assert short_labels(["x" * 50, "/short"], 32) == {"x" * 50: "..." + "x" * 29, "/short": "/short"}


def test_think_plot_y_axis_follows_the_data_not_the_largest_budget(tmp_path):
    from posttrain.eval.plots import plot_think_vs_budget

    problems, responses = _hand_graded()  # thinking tokens 3..10, mean 5.5
    records = grade_responses(problems, responses)
    rows = [r for b in (0, 4, 100000, None) for m in MODES for r in aggregate(records, "m", b, m)]
    fig = plot_think_vs_budget(rows, tmp_path / "think.png")
    lo, hi = fig.axes[0].get_ylim()
    assert (tmp_path / "think.png").stat().st_size > 0
    assert lo == 0 and 5.5 < hi < 10, (lo, hi)  # a little above the largest mean, not up at 100000


@pytest.mark.parametrize("cap", [False, True])
def test_rollout_path_matches_hf_generate_with_thinkcap(talkative_model_dir, cap):
    """The sweep generates on RolloutWorkers; HF `generate` with the ThinkCap logits processor is the independent
    reference (greedy): the same tokens, thinking counts and forcing, natural and capped."""
    import torch

    from posttrain.eval.sweep import generate_responses, start_workers
    from posttrain.generate import reference_generate as generate
    from posttrain.model import load_model, load_tokenizer
    from posttrain.tasks.arithmetic import generate_problems

    torch.set_num_threads(1)
    prompts = [p.expression for p in generate_problems(6, 3)]
    model, tok = load_model(talkative_model_dir), load_tokenizer(talkative_model_dir)
    pool = start_workers(talkative_model_dir, 2, "local", torch.device("cpu"))
    forced = 0
    for budget in (None, 0, 3):
        ref = generate(model, tok, prompts, [budget] * 6, max_new_tokens=10, batch_size=4, cap=cap)
        got = generate_responses(pool, prompts, budget, cap, max_new_tokens=10, batch_size=4)
        assert len({tuple(r.ids) for r in ref}) > 1  # not one degenerate repetition
        for r, g in zip(ref, got):
            assert (g.ids, g.text, g.n_think, g.closed, g.forced) == (r.ids, r.text, r.n_think, r.closed, r.forced)
        forced += sum(g.forced for g in got)
    assert (forced > 0) == cap  # budget 3 is forced only when capped


def test_capped_mode_reuses_the_responses_that_kept_the_budget(tmp_path, talkative_model_dir):
    """`capped_responses` against generating every prompt again with the cap (batches of one, so both see the same
    floats): identical responses, with some rows reused (closed within the budget) and some generated again."""
    import torch

    from posttrain.eval.sweep import capped_responses, generate_responses, start_workers
    from posttrain.model import load_model, load_tokenizer, save_model
    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.tokenizer import think_token_ids

    torch.set_num_threads(1)
    model, tok = load_model(talkative_model_dir), load_tokenizer(talkative_model_dir)
    with torch.no_grad():  # a larger </think> embedding: some rows close at once, others never
        model.get_output_embeddings().weight[think_token_ids(tok)[1]] *= 1.6
    pool = start_workers(save_model(model, tok, tmp_path / "m"), 1, "local", torch.device("cpu"))
    prompts = [p.expression for p in generate_problems(12, 3)]
    kept = redone = 0
    for budget in (1, 3, 5):
        natural = generate_responses(pool, prompts, budget, False, max_new_tokens=12, batch_size=1)
        full = generate_responses(pool, prompts, budget, True, max_new_tokens=12, batch_size=1)
        got = capped_responses(pool, prompts, natural, budget, max_new_tokens=12, batch_size=1)
        assert got == full
        ok = sum(r.closed and r.n_think <= budget for r in natural)
        kept, redone = kept + ok, redone + len(prompts) - ok
        assert sum(r.forced for r in got) == len(prompts) - ok  # every overrun is forced under the cap
    assert kept and redone, (kept, redone)
    for budget in (None, 0):  # no cap: the natural responses themselves
        natural = generate_responses(pool, prompts, budget, False, max_new_tokens=12, batch_size=4)
        assert capped_responses(pool, prompts, natural, budget, max_new_tokens=12, batch_size=4) == natural


def test_workers_load_an_adapter_merged_and_are_reused(tmp_path, tiny_model_dir, talkative_model_dir):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    from posttrain.eval.sweep import run_sweep
    from posttrain.model import load_model
    from posttrain.workers.rollout import RolloutWorker

    torch.set_num_threads(1)
    torch.manual_seed(0)
    peft = get_peft_model(load_model(tiny_model_dir), LoraConfig(r=2, target_modules=["q_proj"],
                                                                  init_lora_weights=False, task_type="CAUSAL_LM"))
    peft.save_pretrained(tmp_path / "adapter")
    cfg = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny_model_dir)
    spec = resolve_model(str(tmp_path / "adapter"))
    assert spec.adapter == tmp_path / "adapter" and spec.checkpoint == Path(tiny_model_dir)

    worker = RolloutWorker(talkative_model_dir)
    worker.load(tiny_model_dir, tmp_path / "adapter")  # replaces the talkative model
    assert not type(worker.model).__name__.startswith("Peft")  # merged: the decoding loop sees a plain model
    ids = torch.randint(0, 400, (2, 9))
    ref = PeftModel.from_pretrained(load_model(tiny_model_dir), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(worker.model(input_ids=ids).logits, ref(input_ids=ids).logits)

    models = [str(talkative_model_dir), str(tmp_path / "adapter")]
    rows = run_sweep(models, [2], n_per_difficulty=1, difficulties=[1, 2], max_new_tokens=3, workers=2).rows
    assert [r["model"] for r in rows if r["difficulty"] == "all"] == [models[0]] * 3 + [models[1]] * 3
    assert {(r["mode"], r["difficulty"]) for r in rows} == {(m, d) for m in MODES for d in (1, 2, "all")}


def test_run_sweep_is_deterministic_and_independent_of_worker_count(tmp_path, talkative_model_dir):
    import torch

    from posttrain.eval.plots import plot_all
    from posttrain.eval.report import write_outputs
    from posttrain.eval.sweep import run_sweep

    torch.set_num_threads(1)
    kw = dict(n_per_difficulty=3, difficulties=[1, 4], max_new_tokens=8, batch_size=2, backend="local")
    result = run_sweep([str(talkative_model_dir)], [0, 2, None], workers=1, **kw)
    assert run_sweep([str(talkative_model_dir)], [0, 2, None], workers=3, **kw) == result  # rows and forcing
    rows = result.rows
    assert any(r["think_tokens_mean"] > 0 for r in rows) and any(r["forced_share"] for r in rows)
    assert {r["budget"] for r in result.forcing} == {0, 2, "pooled"}
    out = write_outputs(rows, tmp_path / "out")
    plot_all(rows, out)
    for name in ("sweep.json", "sweep.csv", "accuracy_vs_budget.png", "think_tokens_vs_budget.png",
                 "accuracy_vs_difficulty.png"):
        assert (out / name).stat().st_size > 0, name
    saved = json.loads((out / "sweep.json").read_text())
    assert len(saved) == 3 * 3 * 3 and all(set(ROW_KEYS) <= set(r) for r in saved)
    assert {r["budget"] for r in saved} == {0, 2, "auto"} and {r["difficulty"] for r in saved} == {1, 4, "all"}


def test_run_sweep_sweeps_a_repeated_budget_difficulty_or_model_once(tmp_path, tiny_model_dir):
    import torch

    from posttrain.eval.plots import plot_all
    from posttrain.eval.report import format_sweep_table
    from posttrain.eval.sweep import run_sweep

    torch.set_num_threads(1)
    same = [str(tiny_model_dir), str(tiny_model_dir) + "/", str(Path(tiny_model_dir).parent / "." / "model")]
    rows = run_sweep(same, [2, 2, None, 2, None], n_per_difficulty=1, difficulties=[1, 1], max_new_tokens=2,
                     backend="local").rows
    head = [(r["model"], r["budget"], r["mode"]) for r in rows if r["difficulty"] == "all"]
    assert head == [(same[0], b, m) for b in (2, "auto") for m in MODES]
    assert len(rows) == 2 * 3 * 2 and all(r["n"] == 1 for r in rows)  # difficulty 1 once: one problem, not two
    assert len(format_sweep_table(rows).splitlines()) == 2 + 6
    plot_all(rows, tmp_path)


# --------------------------------------------------------------------------------------------- end to end
