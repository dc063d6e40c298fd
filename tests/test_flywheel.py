"""Flywheel rounds (`posttrain.rounds`, `posttrain.flywheel`): stage names with a round suffix, the expansion of
`flywheel.rounds` in the recipe, the rejection-sampled SFT data of a later round, and a two-round run of the real
tiny model end to end, killed mid-round and resumed."""

import json

import pytest
import yaml

from posttrain.recipe import RecipeError, load_recipe
from posttrain.rounds import check_stages, expand_rounds, kind_of, latest, rounds_of, split_stage


def test_stage_names_split_and_bad_names_are_named():
    assert split_stage("sft") == ("sft", 1) and split_stage("grpo@3") == ("grpo", 3) and kind_of("rm@2") == "rm"
    with pytest.raises(ValueError, match=r"unknown stage 'grpp'; did you mean 'grpo'"):
        split_stage("grpp")
    assert check_stages(["sft", "grpo", "sft@2", "grpo@2"]) == []
    problems = check_stages(["sft", "sweep@2", "grpo@1", "rm@2", "sft", "sfx"])
    assert any("'sweep@2': only sft, rm, eval, grpo, ppo repeat" in p for p in problems)
    assert any("'grpo@1': round 1 is the plain name 'grpo'" in p for p in problems)
    assert any("stages.3 'rm@2' needs 'rm' before it" in p for p in problems)
    assert any("must not repeat" in p for p in problems)
    assert any(p.startswith("stages.5: unknown stage 'sfx'") for p in problems)


def test_expand_rounds_keeps_later_stages_last_and_latest_finds_the_round():
    stages = expand_rounds(["base", "sft", "rm", "grpo", "sweep", "export"], 3)
    assert stages == ["base", "sft", "rm", "grpo", "sft@2", "rm@2", "grpo@2", "sft@3", "rm@3", "grpo@3", "sweep",
                      "export"]
    assert expand_rounds(["sft", "grpo"], 1) == ["sft", "grpo"] and rounds_of(stages) == 3
    assert latest(stages, "sft@3", "rm") == "rm@2" and latest(stages, "grpo@2", "rm") == "rm@2"
    assert latest(stages, "sft", "rm") is None and latest(stages, "sweep", "grpo") == "grpo@3"


def test_recipe_expands_rounds_round_trips_and_refuses_a_conflicting_list(tmp_path):
    cfg = load_recipe(None, ["stages=[base,sft,rm,grpo,sweep]", "flywheel.rounds=2"])
    assert cfg.stages == ["base", "sft", "rm", "grpo", "sft@2", "rm@2", "grpo@2", "sweep"]
    saved = tmp_path / "recipe.yaml"  # what a run directory records: the expanded list, read back unchanged
    saved.write_text(yaml.safe_dump(cfg.model_dump(mode="json")))
    assert load_recipe(str(saved)).stages == cfg.stages
    with pytest.raises(RecipeError, match=r"list round 1's stages only"):
        load_recipe(None, ["stages=[base,sft,grpo,sft@2]", "flywheel.rounds=3"])
    # named by hand with rounds left at 1: no expansion, and the round stages are checked
    assert load_recipe(None, ["stages=[base,sft,grpo,sft@2]"]).stages == ["base", "sft", "grpo", "sft@2"]
    with pytest.raises(RecipeError, match=r"needs 'grpo' before it"):
        load_recipe(None, ["stages=[base,sft,grpo@2]"])


def test_flywheel_genrm_without_an_rm_stage_is_refused_at_load_time():
    with pytest.raises(RecipeError, match=r"flywheel.genrm: sft@2 .* there is none"):
        load_recipe(None, ["stages=[base,sft,grpo]", "flywheel.rounds=2", "flywheel.genrm=true"])
    with pytest.raises(RecipeError, match=r"rm.genrm.enabled is false"):
        load_recipe(None, ["stages=[base,sft,rm,grpo]", "flywheel.rounds=2", "flywheel.genrm=true",
                           "rm.genrm.enabled=false"])


def test_stage_settings_of_a_later_round_include_the_flywheel_section():
    from posttrain.pipeline import stage_settings

    recipe = load_recipe(None, ["stages=[base,sft,grpo]", "flywheel.rounds=2"]).model_dump(mode="json")
    first, second = stage_settings(recipe, "sft"), stage_settings(recipe, "sft@2")
    assert not any(k.startswith("flywheel.") for k in first)
    assert second["flywheel.n_prompts"] == recipe["flywheel"]["n_prompts"] and "flywheel.rounds" not in second
    assert {k: v for k, v in second.items() if not k.startswith("flywheel.")} == first
    assert stage_settings(recipe, "grpo@2") == stage_settings(recipe, "grpo")


def _sample(pid, budget, correct=True, adherent=True, genrm_ok=None, difficulty=1):
    s = {"problem_id": pid, "budget": budget, "correct": correct, "adherent": adherent, "difficulty": difficulty}
    if genrm_ok is not None:
        s["genrm_ok"] = genrm_ok
    return s


def test_verdicts_keep_graded_adherent_genrm_accepted_samples_up_to_the_cap():
    from posttrain.flywheel import report_of, verdicts

    samples = [_sample(0, 8), _sample(0, 8), _sample(1, None, correct=False), _sample(1, None),
               _sample(2, 16, adherent=False), _sample(2, 16, genrm_ok=False), _sample(3, 0, difficulty=2)]
    verdicts(samples, keep_per_prompt=1)
    assert [s["kept"] for s in samples] == [True, False, False, True, False, False, True]
    verdicts(samples, keep_per_prompt=2)
    assert [s["kept"] for s in samples] == [True, True, False, True, False, False, True]
    report = report_of(samples)
    assert report["kept"] == 4 and report["problems_kept"] == 3 and report["samples"] == 7
    assert report["by_mode"]["budgeted"] == {"samples": 4, "correct": 4, "adherent": 3, "rejected_by_genrm": 1,
                                             "kept": 2}
    assert report["by_mode"]["autonomous"]["kept"] == 1 and report["by_mode"]["zero"]["kept"] == 1
    assert report["kept_share_by_difficulty"] == {"1": 3 / 6, "2": 1.0}


def test_sample_rows_are_the_rendered_prompt_then_the_sampled_ids(tokenizer):
    from posttrain.decode import render_prompts
    from posttrain.flywheel import sample_rows

    ids = tokenizer("<think>\n3+4=7\n</think>\n7", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    samples = [{"problem": "3+4", "budget": b, "ids": ids, "n_think": 1, "kept": k}
               for b, k in ((12, True), (None, True), (0, False))]
    rows = sample_rows(tokenizer, samples, max_length=512)
    assert [r["mode"] for r in rows] == ["budgeted", "autonomous"] and [r["budget"] for r in rows] == [12, -1]
    for row, b in zip(rows, (12, None)):
        prompt = tokenizer(render_prompts(tokenizer, ["3+4"], [b])[0], add_special_tokens=False)["input_ids"]
        assert row["input_ids"] == prompt + ids
        assert row["completion_mask"] == [0] * len(prompt) + [1] * len(ids)
    assert "12" in tokenizer.decode(rows[0]["input_ids"]) and "12" not in tokenizer.decode(rows[1]["input_ids"])
    assert sample_rows(tokenizer, samples, max_length=len(ids) + 2) == []  # too long: left out


def test_a_later_rounds_lora_adapter_on_the_previous_model_is_not_what_export_ships(tmp_path):
    """sft@2 with LoRA on the previous round's model saves `round_adapter`: export, which ships a stage's `adapter`
    as an adapter of the run's base, extracts one from the merged checkpoint instead."""
    from posttrain.export import trained_adapter
    from posttrain.stages.sft import adapter_key

    assert adapter_key(1, "previous") == adapter_key(2, "base") == "adapter"
    assert adapter_key(2, "previous") == adapter_key(3, "previous") == "round_adapter"
    stage = tmp_path / "sft@2"
    for sub, name in (("checkpoint", "config.json"), ("round_adapter", "adapter_config.json")):
        (stage / sub).mkdir(parents=True)
        (stage / sub / name).write_text("{}")
    (stage / "done.json").write_text(json.dumps({"round_adapter": str(stage / "round_adapter")}))
    assert trained_adapter(stage / "checkpoint") is None
    (stage / "round_adapter").rename(stage / "adapter")  # round 1's layout: the adapter is shipped
    (stage / "done.json").write_text(json.dumps({"adapter": str(stage / "adapter")}))
    assert trained_adapter(stage / "checkpoint") == stage / "adapter"


def _overrides(run_dir, model_dir):
    return [f"run_dir={run_dir}", f"model.path={model_dir}", "stages=[sft,rm,grpo]", "flywheel.rounds=2",
            "threads=2", "task.max_difficulty=1", "sft.steps=150", "sft.batch_size=16", "sft.learning_rate=3e-3",
            "sft.n_examples=2000", "sft.budgets=[8,16]", "sft.mix={budgeted: 0.5, autonomous: 0.5, zero: 0}",
            "rm.n_prompts=12", "rm.samples_per_prompt=2", "rm.budgets=[8,auto]", "rm.max_new_tokens=24",
            "rm.genrm.steps=2", "rm.genrm.batch_size=4",
            "flywheel.n_prompts=100", "flywheel.max_new_tokens=24", "flywheel.steps=10", "flywheel.genrm=true",
            "flywheel.genrm_threshold=0", "flywheel.demo_share=0.5",
            "grpo.steps=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.budgets=[8,auto]",
            "grpo.max_new_tokens=24", "grpo.eval_budgets=[8,auto]", "grpo.eval_n_per_difficulty=20",
            "grpo.eval_max_new_tokens=24", "ray.backend=local", "grpo.ptx_coef=0", "grpo.kl_coef=0"]


def test_two_rounds_end_to_end_killed_mid_round_and_resumed(tmp_path, tiny_model_dir, monkeypatch):
    """Round 1 (sft, rm, grpo) of the real tiny model, then round 2: sft@2 samples the round-1 GRPO model, keeps
    what the grader and the round-1 GenRM accept, and is killed while training; run again, it reuses its samples,
    finishes, and the run summary holds both rounds on the same held-out problems."""
    from trl import SFTTrainer

    from posttrain.pipeline import run_recipe

    run = tmp_path / "run"
    cfg = load_recipe(None, _overrides(run, tiny_model_dir))
    assert cfg.stages == ["sft", "rm", "grpo", "sft@2", "rm@2", "grpo@2"]
    train = SFTTrainer.train

    def killed_in_round_2(self, *a, **k):
        if "sft@2" in str(self.args.output_dir):
            raise KeyboardInterrupt("killed mid-round")
        return train(self, *a, **k)

    monkeypatch.setattr(SFTTrainer, "train", killed_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run_recipe(cfg)
    assert all((run / s / "done.json").is_file() for s in ("sft", "rm", "grpo"))
    assert not (run / "sft@2" / "done.json").exists()
    saved = json.loads((run / "sft@2" / "flywheel_samples.json").read_text())
    samples = saved["samples"]
    assert len(samples) == 100 * 2 and saved["key"]["model"]
    kept = [s for s in samples if s["kept"]]
    assert kept and all(s["correct"] and s["adherent"] and s["genrm_ok"] for s in kept)
    assert all("p_yes" in s for s in samples if s["correct"] and s["adherent"])
    assert len({s["problem_id"] for s in kept}) == len(kept)  # keep_per_prompt: 1
    done_before = {s: (run / s / "done.json").read_text() for s in ("sft", "rm", "grpo")}

    monkeypatch.setattr(SFTTrainer, "train", train)
    results = run_recipe(load_recipe(None, _overrides(run, tiny_model_dir)))
    log = (run / "run.log").read_text()
    assert "reusing the 200 flywheel samples" in log and "grpo@2: input model" in log  # lines name the round
    assert {s: (run / s / "done.json").read_text() for s in done_before} == done_before  # round 1 untouched
    fw = results["sft@2"]["flywheel"]
    assert fw["kept"] == len(kept) and fw["sampled_by"].endswith("grpo/checkpoint")
    assert results["sft@2"]["examples"] == fw["sampled_rows"] + fw["demo_rows"] and fw["demo_rows"] == fw[
        "sampled_rows"]  # demo_share 0.5
    # rm@2 sampled the round-2 SFT model (its GenRM learns that model's mistakes)
    assert json.loads((run / "rm@2" / "rm_report.json").read_text())["model"].endswith("sft@2/checkpoint")
    summary = json.loads((run / "rounds.json").read_text())
    assert sorted(summary["rounds"]) == ["1", "2"] and summary["rounds"]["2"]["stage"] == "grpo@2"
    cmp = summary["against_round_1"]["2"]["sft"]["per_budget"]
    assert set(cmp) == {"8", "auto"} and all("diff" in cmp[b]["accuracy"] for b in cmp)
    # the same held-out problems in both rounds: the paired comparison needs them
    before1 = json.loads((run / "grpo" / "eval_before.json").read_text())
    before2 = json.loads((run / "grpo@2" / "eval_before.json").read_text())
    assert before1["8"]["problems"] == before2["8"]["problems"] and len(before2["8"]["correct"]) == 20
    assert "r2 sft" in (run / "rounds.txt").read_text()


def test_a_round_on_a_data_file_samples_training_rows_and_names_an_empty_harvest(tmp_path, tiny_model_dir):
    """With `data.source: file` a later round samples the file's training rows, never those the RL stages hold out
    for their evaluation; when the previous model gets none right (the random tiny model here), the round stops
    with an error that says so and what to raise, after writing its samples (a rerun reuses them)."""
    from posttrain.pipeline import run_recipe
    from posttrain.tasks.task import build_task

    rows = [{"q": f"What is {i} halved?", "a": f"\\frac{{{i}}}{{2}}"} for i in range(40)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    over = [f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "threads=2", "stages=[sft,grpo]",
            "flywheel.rounds=2", "data.source=file", f"data.path={tmp_path / 'd.jsonl'}", "data.prompt_column=q",
            "data.answer_column=a", "task.max_difficulty=2", "sft.steps=1", "sft.n_examples=20",
            "flywheel.n_prompts=50", "flywheel.max_new_tokens=8", "grpo.steps=1", "grpo.prompts_per_step=2",
            "grpo.group_size=2", "grpo.budgets=[4,auto]", "grpo.max_new_tokens=8", "grpo.eval_budgets=[4,auto]",
            "grpo.eval_n_per_difficulty=3", "grpo.eval_max_new_tokens=8", "ray.backend=local", "grpo.ptx_coef=0"]
    rc = load_recipe(None, over)
    held = {p.expression for p in build_task(rc).evaluation_rows()}
    with pytest.raises(ValueError, match=r"sft@2: none of the 56 samples of .*grpo/checkpoint was accepted .* Raise "
                                         r"flywheel.n_prompts"):
        run_recipe(rc)
    samples = json.loads((tmp_path / "run" / "sft@2" / "flywheel_samples.json").read_text())["samples"]
    asked = {s["problem"] for s in samples}
    assert len(held) == 12 and len(asked) == 28 and not asked & held  # 28 training rows, all of them, none held out
    assert not any(s["kept"] for s in samples) and all(s["answer"] == f"\\frac{{{s['problem'].split()[2]}}}{{2}}"
                                                       for s in samples)
