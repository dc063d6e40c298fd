"""The grpo and ppo stages end to end on the tiny model (local backend and Ray), and the pure step helpers."""

import functools
import json
import math

import pytest
import torch

from posttrain.recipe import load_recipe

TINY = ["threads=1", "task.max_difficulty=2", "{algo}.steps=2", "{algo}.prompts_per_step=3", "{algo}.group_size=2",
        "{algo}.budgets=[0,4,auto]", "{algo}.max_new_tokens=8", "{algo}.learning_rate=1e-3",
        "{algo}.mini_batches=2", "{algo}.eval_budgets=[4,auto]", "{algo}.eval_n_per_difficulty=1",
        "{algo}.eval_max_new_tokens=8"]


def _overrides(tmp_path, tiny_model_dir, algo, extra=()) -> list[str]:
    return [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", f"stages=[{algo}]",
            *[s.format(algo=algo) for s in TINY], *extra]


def _run(tmp_path, tiny_model_dir, algo, extra=()):
    from posttrain.pipeline import run_recipe

    cfg = load_recipe(None, _overrides(tmp_path, tiny_model_dir, algo, extra))
    info = run_recipe(cfg)[algo]
    lines = [json.loads(s) for s in (tmp_path / "run" / algo / "metrics.jsonl").read_text().splitlines()]
    return info, lines


def _changed(info, tiny_model_dir) -> bool:
    from posttrain.model import load_model

    trained, base = load_model(info["checkpoint"]), load_model(tiny_model_dir)
    b = dict(base.named_parameters())
    return any((p - b[n]).abs().max() > 0 for n, p in trained.named_parameters())


def test_grpo_stage_end_to_end_local(tiny_model_dir, tmp_path, monkeypatch, capsys, noisy_rewards):
    extra = ["ray.backend=local", "grpo.kl_coef=0.1", "grpo.router_aux_coef=0.01"]
    info, lines = _run(tmp_path, tiny_model_dir, "grpo", extra)
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        for key in ("reward/mean", "rollout/accuracy", "actor/pg_loss", "actor/clipfrac",
                    "actor/grad_norm", "actor/entropy", "actor/kl_loss", "actor/router_aux_loss",
                    "router/load_entropy", "router/max_share", "time/rollout_s", "time/reward_s",
                    "time/reference_s", "time/learner_s", "time/sync_s"):
            assert key in m and math.isfinite(m[key]), key
        assert any(k.startswith("budget/") and k.endswith("/think_tokens") for k in m)
    s = info["summary"]
    assert s["skipped_steps"] == 0
    assert set(s["before"]) == set(s["after"]) == {"4", "auto"}
    assert set(s["comparison"]["4"]) == {"accuracy", "accuracy_capped", "accuracy_forced", "adherence"}
    for r in s["comparison"]["4"].values():  # paired on the same problems: the interval holds the difference
        assert r["ci95"][0] <= r["diff"] <= r["ci95"][1] and r["measurably"] in ("above", "below", "unchanged")
        assert r["diff"] == pytest.approx(r["after"] - r["before"])
    v = s["verdict"]  # one eval budget: it is also the "middle" one; pooled over it alone = its own comparison
    assert v["budgets"] == v["middle_budgets"] == [4]
    assert v["adherence"]["diff"] == pytest.approx(s["comparison"]["4"]["adherence"]["diff"])
    assert v["accuracy_capped_middle"]["p_value"] == pytest.approx(s["comparison"]["4"]["accuracy_capped"]["p_value"])
    assert "correct" not in s["after"]["4"]  # per-problem lists stay in eval_after.json
    ev = json.loads((tmp_path / "run" / "grpo" / "eval_after.json").read_text())
    assert len(ev["4"]["correct"]) == len(ev["4"]["correct_capped"]) == len(ev["4"]["adherent"]) > 0
    assert "think_tokens_by_difficulty" in s["after"]["auto"]
    assert _changed(info, tiny_model_dir)
    # `posttrain run` again: the finished stage does nothing, and the closing printout gives its verdict
    from posttrain.cli import main

    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("{}\n")
    capsys.readouterr()
    assert main(["run", str(recipe), *_overrides(tmp_path, tiny_model_dir, "grpo", extra)]) == 0
    out = capsys.readouterr().out
    assert "grpo against its input model" in out and "summary.verdict" in out, out
    a = v["adherence"]
    assert f"adherence              {100 * a['before']:5.1f}% -> {100 * a['after']:5.1f}%" in out, out
    assert f"p {v['accuracy_capped_middle']['p_value']:.3g}  {v['accuracy_capped_middle']['measurably']}" in out


def test_ppo_stage_end_to_end_local(tiny_model_dir, tmp_path, monkeypatch, noisy_rewards):
    info, lines = _run(tmp_path, tiny_model_dir, "ppo", ["ray.backend=local"])
    for m in lines:
        for key in ("critic/vf_loss", "critic/vpred_mean", "actor/reward_kl_penalty", "actor/pg_loss"):
            assert key in m and math.isfinite(m[key]), key
    assert _changed(info, tiny_model_dir)


@pytest.mark.ray
def test_grpo_stage_on_ray_matches_local(tiny_model_dir, tmp_path, ray_session):
    """The same recipe on Ray actors (rollout, learner, reward) gives the same rollouts as in-process (the random
    tiny model earns no reward, so both runs keep their weights and sample the same tokens at each step)."""
    local_info, local = _run(tmp_path / "local", tiny_model_dir, "grpo", ["ray.backend=local"])
    ray_info, remote = _run(tmp_path / "ray", tiny_model_dir, "grpo", [])
    for a, b in zip(local, remote):
        assert a["rollout/response_tokens"] == b["rollout/response_tokens"]
        assert a["rollout/forced_share"] == b["rollout/forced_share"]
        assert a["reward/mean"] == b["reward/mean"]
    assert ray_info["summary"]["before"] == local_info["summary"]["before"]


def test_grpo_advantages_mask_dropped_groups_and_forced_tokens():
    """compute_advantages: group-normalised advantages; all-equal groups and forced tokens get mask 0."""
    from types import SimpleNamespace

    from posttrain.config import GRPOStageConfig
    from posttrain.stages.rl_step import compute_advantages

    forced = torch.zeros(4, 3, dtype=torch.bool)
    forced[1, 2] = True
    batch = SimpleNamespace(loss_mask=torch.ones(4, 3, dtype=torch.long) * (~forced).long(), group_index=[0, 0, 1, 1],
                            logp=torch.zeros(4, 3), response_mask=torch.ones(4, 3, dtype=torch.long))
    batch.__len__ = lambda: 4
    adv, mask, returns, m = compute_advantages(GRPOStageConfig(), batch, [1.0, 0.0, 0.5, 0.5])
    assert returns is None
    # by hand: mean 0.5, unbiased std sqrt(0.5) -> (1 - 0.5) / sqrt(0.5) = 0.7071
    torch.testing.assert_close(adv[:2], torch.tensor([0.7071, -0.7071]), atol=1e-3, rtol=1e-3)
    assert mask[1, 2] == 0 and mask[0].tolist() == [1, 1, 1]
    assert mask[2:].sum() == 0  # the second group's rewards are all equal: dropped


def test_grpo_with_lora_syncs_only_the_adapter(tiny_model_dir, tmp_path, monkeypatch, noisy_rewards):
    """grpo.lora.enabled: the learner trains a LoRA adapter, only adapter tensors go to the rollout workers,
    and the stage's checkpoint is the merged model (different from the input)."""
    from posttrain.workers.rollout import RolloutWorker

    sent = []
    real = RolloutWorker.update_weights

    @functools.wraps(real)
    def spy(self, named, *args, **kwargs):  # the policy version after the tensors
        sent.append(sorted(dict(named)))
        return real(self, named, *args, **kwargs)

    monkeypatch.setattr(RolloutWorker, "update_weights", spy)
    info, _ = _run(tmp_path, tiny_model_dir, "grpo", ["ray.backend=local", "grpo.lora.enabled=true",
                                                       "grpo.lora.r=4"])
    assert sent and all(names and all("lora_" in n for n in names) for names in sent)
    assert any("experts" in n for n in sent[0]) and any("q_proj" in n for n in sent[0])
    assert _changed(info, tiny_model_dir)


def test_grpo_with_routing_replay(tiny_model_dir, tmp_path, monkeypatch, noisy_rewards):
    """grpo.routing_replay: rollouts record every token's experts and the learner replays them (R3); the run
    trains and reports router metrics."""
    from posttrain.learner import Learner

    seen = []
    real = Learner.forward

    @functools.wraps(real)
    def spy(self, batch, rows, router=False):
        seen.append(batch.routing is not None and self.routing_replay)
        return real(self, batch, rows, router)

    monkeypatch.setattr(Learner, "forward", spy)
    info, lines = _run(tmp_path, tiny_model_dir, "grpo", ["ray.backend=local", "grpo.routing_replay=true"])
    assert seen and all(seen)
    assert all(math.isfinite(m["router/max_share"]) for m in lines)
    assert _changed(info, tiny_model_dir)


def test_verdict_pools_adherence_over_budgets_and_accuracy_over_the_middle_ones():
    from posttrain.eval.stats import paired_difference
    from posttrain.stages.rl_eval import _verdict

    def ev(adh, cor, cap):
        return {"adherent": adh, "correct": cor, "correct_capped": cap}

    before = {"8": ev([0, 0, 1], [0, 0, 0], [0, 0, 0]), "16": ev([1, 0, 1], [0, 1, 0], [0, 0, 0]),
              "24": ev([1, 1, 1], [1, 0, 0], [1, 0, 0]), "auto": {"correct": [1, 1, 1]}}
    after = {"8": ev([1, 1, 1], [0, 0, 1], [0, 0, 1]), "16": ev([1, 1, 1], [1, 1, 1], [1, 1, 0]),
             "24": ev([1, 1, 0], [0, 0, 0], [0, 0, 0]), "auto": {"correct": [0, 0, 0]}}
    v = _verdict(before, after)
    assert v["budgets"] == [8, 16, 24] and v["middle_budgets"] == [16]
    adh = paired_difference([0, 0, 1, 1, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1, 1, 0])  # gained 3, lost 1
    assert v["adherence"]["diff"] == pytest.approx(2 / 9) == pytest.approx(adh["diff"])
    assert v["adherence"]["p_value"] == adh["p_value"] and v["adherence"]["before"] == pytest.approx(6 / 9)
    assert v["accuracy_middle"]["diff"] == pytest.approx(2 / 3)  # budget 16 only: 1 of 3 -> 3 of 3
    assert v["accuracy_capped_middle"]["after"] == pytest.approx(2 / 3)


def test_evaluations_of_other_problems_are_not_paired():
    """A before-evaluation of other problems at a budget (a run resumed by another version) is not compared there:
    no paired difference, and the verdict pools only the budgets whose problems match."""
    from posttrain.stages.rl_eval import _compare, _verdict, problems_fingerprint

    def ev(vec, problems):
        return {"adherence": sum(vec) / 3, "adherent": vec, "accuracy": 0.5, "correct": vec,
                "accuracy_capped": 0.5, "correct_capped": vec, "problems": problems}

    same, other = problems_fingerprint(["1+2", "3*4", "5-1"]), problems_fingerprint(["1+2", "3*4", "5-2"])
    assert same != other and len(same) == 16
    before = {"8": ev([0, 0, 0], same), "16": ev([0, 0, 0], other), "24": ev([0, 0, 0], same)}
    after = {"8": ev([1, 1, 1], same), "16": ev([1, 1, 1], same), "24": ev([1, 1, 1], same)}
    cmp = _compare(before, after)
    assert "diff" in cmp["8"]["adherence"] and "diff" not in cmp["16"]["adherence"]
    assert _verdict(before, after)["budgets"] == [8, 24]
    before["24"] = ev([0, 0], same) | {"correct_capped": [0, 0]}  # fewer problems (another n_per_difficulty)
    assert "diff" not in _compare(before, after)["24"]["adherence"] and _verdict(before, after)["budgets"] == [8]


def test_each_eval_budget_has_problems_of_its_own():
    """The before/after evaluation draws each budget's problems from the eval seed and the budget: reproducible,
    different between budgets (so the verdict's pooled budgets are independent problems), cycling the difficulties,
    and a budget's problems do not depend on which other budgets are evaluated."""
    from posttrain.tasks.task import build_task

    def eval_problems(n, seed, budget):
        rc = load_recipe(None, [f"eval.seed={seed}", f"grpo.eval_n_per_difficulty={n}"])
        return build_task(rc).rl_eval_problems(rc.grpo, budget)

    diffs = [1, 2, 3, 4, 5, 6, 7, 8]
    sets = {b: [p.expression for p in eval_problems(25, 12345, b)] for b in (8, 12, 16, "auto")}
    assert all(len(v) == 200 for v in sets.values())
    assert sets[12] == [p.expression for p in eval_problems(25, 12345, 12)]
    assert [p.difficulty for p in eval_problems(25, 12345, 12)] == diffs * 25
    for a, b in [(8, 12), (12, 16), (16, "auto"), (8, "auto")]:
        long_a = {e for e, p in zip(sets[a], eval_problems(25, 12345, a)) if p.difficulty >= 4}
        assert len(long_a & set(sets[b])) <= 2, (a, b)  # long problems hardly ever repeat by chance
    assert sets[12] != [p.expression for p in eval_problems(25, 54321, 12)]


def test_first_error_marks_land_on_the_token_that_went_wrong(tokenizer):
    """grpo.process_penalty: the mark sits on the first wrong value's token (found through the tokens' decoded
    pieces), right rows get none, and compute_advantages adds the marks to the group advantages per token."""
    from types import SimpleNamespace

    from posttrain.config import GRPOStageConfig
    from posttrain.stages.rl_step import compute_advantages
    from posttrain.stages.rl_task import first_error_marks
    from posttrain.tasks.arithmetic import parse_expression

    p = parse_expression("7+3*2-5")  # running values 10, 20, 15
    think_end = "</think>"
    bodies = ["7+3=10\n+3*2=20\n*2-5=15", "7+3=10\n+3*2=21\n*2-5=16", "7+3=10\n+3*2=20\n*2-5=15", ""]
    answers = ["15", "16", "14", "15"]
    rows = [tokenizer(b + think_end + "\n\n" + a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            for b, a in zip(bodies, answers)]
    rows[3] = tokenizer("15", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]  # budget 0
    width = max(map(len, rows))
    ids = torch.full((4, width), tokenizer.pad_token_id)
    mask = torch.zeros((4, width), dtype=torch.long)
    for r, row in enumerate(rows):
        ids[r, :len(row)], mask[r, :len(row)] = torch.tensor(row), 1
    texts = [tokenizer.decode(r, skip_special_tokens=True) for r in rows]
    texts[3] = "</think>\n\n" + texts[3]
    batch = SimpleNamespace(response_ids=ids, response_mask=mask, texts=texts, group_index=[0, 0, 0, 0],
                            loss_mask=mask, logp=torch.zeros(4, width))
    batch.__len__ = lambda: 4
    marks = first_error_marks(tokenizer, batch, [p], 0.5)
    assert marks[0].abs().sum() == 0 and marks[3].abs().sum() == 0  # right rows: no mark
    for r, wrong in ((1, "21"), (2, "14")):
        (t,) = marks[r].nonzero().squeeze(1).tolist()
        assert marks[r, t] == -0.5 and tokenizer.decode(rows[r][t]).startswith(wrong[0])
        assert tokenizer.decode(rows[r][:t]).endswith("=" if r == 1 else "\n\n")
    adv, _, _, m = compute_advantages(GRPOStageConfig(), batch, [1.0, 0.0, 0.0, 1.0], marks=marks)
    plain, _, _, _ = compute_advantages(GRPOStageConfig(), batch, [1.0, 0.0, 0.0, 1.0])
    assert adv.shape == (4, width) and m["process/first_error_share"] == 0.5
    torch.testing.assert_close(adv, plain[:, None] + marks)


def test_grpo_with_ptx_and_process_penalty(tiny_model_dir, tmp_path, monkeypatch, noisy_rewards):
    """grpo.ptx_coef and grpo.process_penalty: the stage trains and reports the demonstrations' NLL and the share
    of responses whose first error was marked (the random tiny model is wrong everywhere)."""
    info, lines = _run(tmp_path, tiny_model_dir, "grpo", ["ray.backend=local", "grpo.ptx_coef=0.5",
                                                           "grpo.process_penalty=0.5"])
    assert all(math.isfinite(m["actor/ptx_nll"]) and m["actor/ptx_nll"] > 0 for m in lines)
    assert all(0 < m["process/first_error_share"] <= 1 for m in lines)
    assert _changed(info, tiny_model_dir)


def test_process_marks_join_the_token_rewards_before_gae():
    """PPO (adv_estimator gae): a mark is a token reward, so the advantages equal GAE over (outcome at the last
    token + marks), computed here by hand with gamma = lambda = 1 and zero values, then whitened."""
    from types import SimpleNamespace

    from posttrain.algo.advantages import masked_whiten
    from posttrain.config import PPOStageConfig
    from posttrain.stages.rl_step import compute_advantages

    cfg = PPOStageConfig(kl_coef=0.0, gamma=1.0, lam=1.0)
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    class Batch(SimpleNamespace):
        def __len__(self):
            return 2

    batch = Batch(loss_mask=mask, response_mask=mask, logp=torch.zeros(2, 4), group_index=[0, 1])
    marks = torch.zeros(2, 4)
    marks[0, 1] = -0.5
    adv, _, returns, _ = compute_advantages(cfg, batch, [1.0, 0.0], values=torch.zeros(2, 4), marks=marks)
    # returns-to-go: row 0 gets 1 at its last token and -0.5 at token 1; row 1 nothing
    expected_returns = torch.tensor([[0.5, 0.5, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    torch.testing.assert_close(returns * mask, expected_returns)
    torch.testing.assert_close(adv, masked_whiten(expected_returns, mask.bool()) * mask)


def _word_problems(path, n=40):
    rows = [{"q": f"What is {i % 7} plus {i % 5}?", "a": (i % 7) + (i % 5), "lvl": 1 + i % 2} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_file_problems_split_held_out_rows_per_budget_and_sample_the_rest(tmp_path):
    from posttrain.stages.rl_problems import ProblemSource

    rows = _word_problems(tmp_path / "d.jsonl")
    rc = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path}", "stages=[grpo]",
                            "data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q",
                            "data.answer_column=a", "data.difficulty_column=lvl", "task.max_difficulty=2",
                            "grpo.eval_budgets=[4,auto]", "grpo.eval_n_per_difficulty=3", "grpo.prompts_per_step=5"])
    src = ProblemSource(rc, rc.grpo)
    held = {b: src.eval(b) for b in ("4", "auto")}
    assert [len(v) for v in held.values()] == [6, 6]  # 3 per difficulty x 2 difficulties each
    # 12 rows spread through the 40 ((2j + 1) * 40 // 24), every other one to each budget
    held_rows = [1, 5, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38]
    assert [p.expression for p in held["4"]] == [rows[i]["q"] for i in held_rows[0::2]]
    assert [p.expression for p in held["auto"]] == [rows[i]["q"] for i in held_rows[1::2]]
    assert held["4"][0].answer == str(rows[1]["a"]) and held["4"][0].difficulty == rows[1]["lvl"]
    held_q = {rows[i]["q"] for i in held_rows}
    seen = set()
    for step in range(20):
        problems, budgets = src.step(step)
        assert len(problems) == len(budgets) == 5 and problems == src.step(step)[0]  # deterministic per step
        seen |= {p.expression for p in problems}
    assert seen <= {r["q"] for r in rows} - held_q and len(seen) > 5  # never held out
    assert src.grade(held["4"][:2], [type("R", (), {"text": f"x</think>\n\n{held['4'][0].answer}", "n_think": 1,
                                                    "closed": True, "forced": False})()] * 2)[0].correct


def test_grpo_trains_and_evaluates_on_a_data_file(tiny_model_dir, tmp_path, monkeypatch, noisy_rewards):
    _word_problems(tmp_path / "d.jsonl")
    info, lines = _run(tmp_path, tiny_model_dir, "grpo", [
        "ray.backend=local", "data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q",
        "data.answer_column=a", "grpo.rewards=[{name: math, on: all}, {name: budget_forced, on: budgeted}]"])
    assert [m["step"] for m in lines] == [0, 1] and all("reward/math/mean" in m or "reward/mean" in m for m in lines)
    before = json.loads((tmp_path / "run" / "grpo" / "eval_before.json").read_text())
    assert len(before["4"]["correct"]) == len(before["auto"]["correct"]) == 2  # 1 per difficulty x 2
    from posttrain.stages.rl_eval import problems_fingerprint

    rows = (tmp_path / "d.jsonl").read_text().splitlines()
    # 4 rows spread through the 40: 5, 15, 25, 35; every other one to each budget
    assert before["4"]["problems"] == problems_fingerprint([json.loads(rows[i])["q"] for i in (5, 25)])
    assert before["auto"]["problems"] == problems_fingerprint([json.loads(rows[i])["q"] for i in (15, 35)])
    assert set(info["summary"]["comparison"]) == {"4", "auto"}


def test_eval_and_sweep_stages_on_a_data_file_evaluate_the_rows_grpo_held_out(tiny_model_dir, tmp_path, monkeypatch,
                                                                           noisy_rewards):
    from posttrain.tasks.files import first_per_difficulty
    from posttrain.pipeline import run_recipe
    from posttrain.tasks.task import build_task

    rows = _word_problems(tmp_path / "d.jsonl")
    data = ["data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q", "data.answer_column=a",
            "data.difficulty_column=lvl"]
    base = [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", *[s.format(algo="grpo") for s in TINY],
            *data, "ray.backend=local", "sweep.backend=local", "sweep.budgets=[0,4,auto]", "sweep.n_per_difficulty=2",
            "sweep.max_new_tokens=6", "grpo.eval_n_per_difficulty=3"]
    with pytest.raises(Exception, match="sweep evaluates the rows a grpo or ppo stage holds out"):
        load_recipe(None, [*base, "stages=[sweep]"])
    rc = load_recipe(None, [*base, "stages=[eval,grpo,sweep]", "eval.budgets=[0,auto]", "eval.n_per_difficulty=1",
                            "eval.max_new_tokens=6"])
    import posttrain.eval.sweep as sweep_module

    graded, real = [], sweep_module.grade_responses  # what every stage actually graded, and by which grader

    def spy(problems, responses, grader="exact_int"):
        graded.append([p.expression for p in problems])
        assert grader == "math"  # a data file's answers: the data's grader, everywhere
        return real(problems, responses, grader)

    monkeypatch.setattr(sweep_module, "grade_responses", spy)
    info = run_recipe(rc)
    out = info["sweep"]
    quick = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())  # the held-out rows, 1 per difficulty
    assert {(r["budget"], r["difficulty"], r["n"]) for r in quick} == {
        (b, d, 2 if d == "all" else 1) for b in ("0", "auto") for d in (1, 2, "all")}
    swept = first_per_difficulty(build_task(rc).evaluation_rows(), 2)
    held = {rows[i]["q"] for i in (1, 5, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38)}  # 6 per eval budget, 2 budgets
    assert {p.expression for p in swept} <= held and [p.difficulty for p in swept].count(1) == 2
    assert graded and all(set(g) <= held for g in graded)  # eval, grpo's before/after and sweep: held-out rows only
    assert [p.expression for p in swept] in graded  # the sweep's 2 per difficulty
    assert [p.expression for p in first_per_difficulty(build_task(rc).evaluation_rows(), 1)] in graded  # the eval stage's 1
    saved = json.loads((tmp_path / "run" / "sweep" / "sweep.json").read_text())
    assert {r["model"] for r in saved} == {"grpo"} and {r["difficulty"] for r in saved} == {1, 2, "all"}
    assert all(r["n"] == (4 if r["difficulty"] == "all" else 2) for r in saved)
    assert {r["budget"] for r in out["summary"]} == {0, 4, "auto"}


def test_no_rl_stage_trains_on_rows_another_holds_out(tmp_path):
    """grpo holds out 12 rows, ppo 4: ppo trains on none of grpo's 12 either (eval and sweep evaluate all 12)."""
    from posttrain.stages.rl_problems import ProblemSource
    from posttrain.tasks.task import build_task

    rows = _word_problems(tmp_path / "d.jsonl", n=34)  # no repeated prompts
    rc = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path}", "stages=[grpo,ppo]",
                            "data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q",
                            "data.answer_column=a", "task.max_difficulty=2", "grpo.eval_budgets=[4,auto]",
                            "grpo.eval_n_per_difficulty=3", "ppo.eval_budgets=[4,auto]", "ppo.eval_n_per_difficulty=1"])
    ppo = ProblemSource(rc, rc.ppo)
    grpo_rows = [1, 4, 7, 9, 12, 15, 18, 21, 24, 26, 29, 32]  # 12 spread through the 34
    assert [p.expression for p in ppo.task.stage_split(rc.ppo)[0]] == [r["q"] for i, r in enumerate(rows) if i not in grpo_rows]
    # ppo's own 4 are spread among grpo's 12 (its 2nd, 5th, 8th and 11th), every other one to each budget
    assert [p.expression for p in ppo.eval("4")] == [rows[4]["q"], rows[21]["q"]]
    assert [p.expression for p in ppo.eval("auto")] == [rows[12]["q"], rows[29]["q"]]
    assert [p.expression for p in build_task(rc).evaluation_rows()] == [rows[i]["q"] for i in grpo_rows]


def test_eval_rows_sets_the_held_out_rows_per_budget_of_a_data_file(tmp_path):
    from posttrain.stages.rl_problems import ProblemSource
    from posttrain.tasks.files import rl_held_out_rows

    rows = _word_problems(tmp_path / "d.jsonl", n=34)
    base = [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path}", "stages=[grpo]", "data.source=file",
            f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q", "data.answer_column=a",
            "grpo.eval_budgets=[4,auto]"]
    rc = load_recipe(None, [*base, "grpo.eval_rows=5"])
    src = ProblemSource(rc, rc.grpo)
    assert [len(src.eval(b)) for b in ("4", "auto")] == [5, 5] and rl_held_out_rows(rc, len(rows)) == 10
    assert [p.expression for p in src.eval("auto")] == [rows[i]["q"] for i in (5, 11, 18, 25, 32)]  # of 1, 5, 8, ...
    rc = load_recipe(None, [*base, "grpo.eval_rows=100"])  # at most half the file: 34 // 4 = 8 per budget
    assert [len(ProblemSource(rc, rc.grpo).eval(b)) for b in ("4", "auto")] == [8, 8]


def test_repeated_held_out_prompts_shrink_every_eval_slice_alike(tmp_path):
    from posttrain.stages.rl_problems import ProblemSource

    rows = [{"q": f"q{i}", "a": i} for i in range(20)] + [{"q": f"h{i % 4}", "a": i % 4} for i in range(8)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # its last 8 rows: 4 prompts twice
    rc = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path}", "stages=[grpo]",
                            "data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q",
                            "data.answer_column=a", "task.max_difficulty=2", "grpo.eval_budgets=[4,auto]",
                            "grpo.eval_n_per_difficulty=2"])
    # 4 held out per budget asked: rows 1, 5, 8, 12, 15, 19, 22, 26 of 28, whose last two are both h2: 7 distinct
    # prompts, so 3 per budget, spread among the 7 (all but the 4th, q12)
    src = ProblemSource(rc, rc.grpo)
    slices = [[p.expression for p in src.eval(b)] for b in ("4", "auto")]
    assert slices == [["q1", "q8", "q19"], ["q5", "q15", "h2"]]
    assert not {p.expression for p in src.task.stage_split(rc.grpo)[0]} & {"q1", "q5", "q8", "q12", "q15", "q19", "h2"}
    assert sum(p.expression.startswith("h") for p in src.task.stage_split(rc.grpo)[0]) == 6  # h0, h1, h3 twice each


def test_sft_leaves_out_the_rows_the_rl_stages_evaluate_on_and_answers_are_graded_as_text(tmp_path):
    from posttrain.stages.rl_problems import ProblemSource
    from posttrain.tasks.files import rl_held_out_rows
    from posttrain.tasks.task import build_task
    from posttrain.workers.reward import RLRewardWorker

    rows = _word_problems(tmp_path / "d.jsonl")
    rc = load_recipe(None, [f"run_dir={tmp_path / 'run'}", f"model.path={tmp_path}", "stages=[sft,grpo]",
                            "data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q",
                            "data.answer_column=a", "task.max_difficulty=2", "grpo.eval_budgets=[4,4,auto]",
                            "grpo.eval_n_per_difficulty=3"])
    assert rl_held_out_rows(rc, len(rows)) == 12  # 6 rows for each of 2 distinct budgets
    sft = build_task(rc).train_examples(1000, 0)
    held_rows = [1, 5, 8, 11, 15, 18, 21, 25, 28, 31, 35, 38]  # 12 spread through the 40
    held_q = {rows[i]["q"] for i in held_rows}
    # the prompts repeat every 35 rows: rows 0, 3 and 36 ask what held-out rows 35, 38 and 1 ask, so no stage trains
    # on them
    assert [e.prompt for e in sft] == [r["q"] for i, r in enumerate(rows) if i not in held_rows + [0, 3, 36]]
    assert not held_q & {e.prompt for e in sft}
    src = ProblemSource(rc, rc.grpo)
    assert {p.expression for b in ("4", "auto") for p in src.eval(b)} == held_q
    assert [p.expression for p in src.task.stage_split(rc.grpo)[0]] == [e.prompt for e in sft]
    # the training accuracy is judged as the evaluation judges it: math equivalence of text answers
    spec = {"weight": 1.0, "params": {}, "key": None, "on": "all"}
    worker = RLRewardWorker([{**spec, "name": "math"}, {**spec, "name": "exact_int"}], "math")
    scores, correct, _ = worker.score(["q", "q"], ["x</think>\n\n\\boxed{1/2}", "x</think>\n\n3"], ["\\frac{1}{2}", "1/2"],
                                      [None, None], [1, 1], [0, 0], [False, False])
    assert correct == [True, False] and scores == [1.0, 0.0]  # exact_int raising on "1/2" is caught, counted, 0
