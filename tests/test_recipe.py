"""Recipe errors: the messages themselves (key path, what was expected, nearest valid key)."""

import pytest

from posttrain.recipe import RecipeError, load_recipe


def error_of(tmp_path, text=None, overrides=()):
    path = None
    if text is not None:
        path = tmp_path / "r.yaml"
        path.write_text(text)
    with pytest.raises(RecipeError) as ei:
        load_recipe(path, list(overrides))
    return str(ei.value)


def test_defaults_validate():
    cfg = load_recipe(None)
    assert cfg.stages == ["base", "sft", "eval"] and cfg.base.num_experts == 8 and cfg.base.top_k == 2


def test_quickstart_recipe_validates():
    cfg = load_recipe("recipes/quickstart.yaml")
    assert cfg.run_dir == "runs/quickstart"


def test_budget_blind_recipe_is_the_quickstart_but_for_its_sft_demonstrators():
    """recipes/budget_blind.yaml says it shares the quickstart's base (one cache entry) and GRPO settings, and that
    only the SFT stage's demonstrators differ: kept true as either recipe changes."""
    from posttrain.stages.base import cache_key

    quick, blind = load_recipe("recipes/quickstart.yaml"), load_recipe("recipes/budget_blind.yaml")
    assert cache_key(blind.base, blind.seed) == cache_key(quick.base, quick.seed)
    assert blind.grpo == quick.grpo and blind.task == quick.task and blind.sweep == quick.sweep and blind.ray == quick.ray
    assert blind.sft.model_dump(exclude={"budget_traces"}) == quick.sft.model_dump(exclude={"budget_traces"})
    assert blind.sft.budget_traces == [quick.sft.budget_traces, "full_read_back"]


def test_ptx_imitating_a_budget_blind_demonstrator_is_refused():
    """`ptx_traces: fitting` imitates whatever SFT demonstrated, a budget-blind teacher's overruns included."""
    msg = error_of(None, overrides=["stages=[base,sft,grpo]", "sft.budget_traces=[most_explicit,full_read_back]",
                                    "grpo.ptx_coef=1", "grpo.ptx_traces=fitting"])
    assert "grpo.ptx_traces: `fitting`" in msg and "full_read_back ignores the budget" in msg
    load_recipe(None, ["stages=[base,sft,grpo]", "sft.budget_traces=full", "grpo.ptx_coef=0", "grpo.ptx_traces=fitting"])


def test_misspelt_key_names_path_and_nearest(tmp_path):
    msg = error_of(tmp_path, "sft:\n  lerning_rate: 0.1\n")
    assert "sft.lerning_rate: unknown key" in msg and "did you mean 'sft.learning_rate'" in msg
    msg = error_of(tmp_path, "sft:\n  lora:\n    rnak: 4\n")
    assert "sft.lora.rnak: unknown key" in msg and "valid keys here: enabled, r, alpha" in msg


def test_wrong_type_and_range(tmp_path):
    msg = error_of(tmp_path, "sft:\n  steps: many\n")
    assert "sft.steps" in msg and "valid integer" in msg and "'many'" in msg
    msg = error_of(tmp_path, overrides=["sft.lora.r=0"])
    assert "sft.lora.r" in msg and "greater than or equal to 1" in msg
    msg = error_of(tmp_path, overrides=["base.top_k=9"])
    assert "top_k (9) must be <= num_experts (8)" in msg


def test_unknown_stage_suggests(tmp_path):
    msg = error_of(tmp_path, "stages: [base, sfft]\n")
    assert "stages.1" in msg and "did you mean 'sft'" in msg


def test_missing_files(tmp_path):
    msg = error_of(tmp_path, overrides=["stages=[sft]", "model.path=/no/such/dir"])
    assert "model.path: directory '/no/such/dir' does not exist" in msg
    msg = error_of(tmp_path, overrides=["data.source=file", "data.path=/no/file.jsonl"])
    assert "data.path: path '/no/file.jsonl' does not exist" in msg
    with pytest.raises(RecipeError, match="recipe file .* does not exist"):
        load_recipe(tmp_path / "missing.yaml")


def test_bad_yaml_and_overrides(tmp_path):
    assert "not valid YAML" in error_of(tmp_path, "sft: [unclosed\n")
    assert "must be a mapping" in error_of(tmp_path, "- a\n- b\n")
    assert "key.path=value" in error_of(tmp_path, overrides=["sft.steps"])


def test_yaml_is_parsed_safely(tmp_path):
    msg = error_of(tmp_path, "seed: !!python/object/apply:os.system ['echo pwned']\n")
    assert "not valid YAML" in msg


def test_overrides_parse_yaml_values():
    cfg = load_recipe(None, ["sft.budgets=[4, 8]", "sft.lora.enabled=true", "seed=7"])
    assert cfg.sft.budgets == [4, 8] and cfg.sft.lora.enabled is True and cfg.seed == 7


def test_file_data_is_refused_where_a_stage_needs_the_embedded_task(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    msg = error_of(tmp_path, overrides=["stages=[sft,eval,grpo,sweep]", f"model.path={tmp_path}", "data.source=file",
                                        f"data.path={data}", "grpo.eval_n_per_difficulty=0"])
    assert "eval and sweep evaluate the rows a grpo or ppo stage holds out" in msg
    msg = error_of(tmp_path, overrides=["stages=[grpo]", f"model.path={tmp_path}", "data.source=file",
                                        f"data.path={data}", "grpo.ptx_coef=1"])
    assert "grpo.ptx_coef: 1.0 imitates demonstrations of the step's problems (PPO-ptx), and the task of " \
           "data.source: file has no `demonstrations` hook; set it to 0" in msg
    msg = error_of(tmp_path, overrides=["stages=[grpo]", f"model.path={tmp_path}", "data.source=file",
                                        f"data.path={data}", "grpo.process_penalty=0.5"])
    assert "grpo.process_penalty: 0.5 blames the first wrong step" in msg and "no `first_error` hook" in msg
    # a file with a reasoning column demonstrates its rows: PPO-ptx can imitate them
    load_recipe(None, [f"run_dir={tmp_path / 'p'}", "stages=[grpo]", f"model.path={tmp_path}", "data.source=file",
                       f"data.path={data}", "data.reasoning_column=why", "grpo.ptx_coef=1"])
    ok = load_recipe(None, [f"run_dir={tmp_path / 'r'}", "stages=[sft,rm,eval,grpo,sweep,export]", f"model.path={tmp_path}",
                            "data.source=file", f"data.path={data}"])
    assert ok.data.source == "file"


def test_reward_params_are_checked_when_the_recipe_loads(tmp_path):
    msg = error_of(tmp_path, overrides=["stages=[base,sft,grpo]", "grpo.rewards=[{name: genrm, on: all}]"])
    assert "grpo.rewards.0.params.path: reward 'genrm' without a path reads this run's rm stage output" in msg
    msg = error_of(tmp_path, overrides=["ppo.rewards=[{name: math, params: {tolerence: 1}}]"])
    assert "ppo.rewards.0: reward 'math' got an unknown parameter 'tolerence'" in msg


def test_rerun_guard_of_file_data_stages_covers_the_rows_the_rl_stages_hold_out(tmp_path):
    """With a data file, which rows grpo/ppo hold out decides what sft and RL train on and what eval and sweep
    evaluate, so their eval budgets and size count as those stages' settings; with the embedded task they do not."""
    from posttrain.pipeline import stage_settings

    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "2+2?", "answer": "4"}\n')
    rc = load_recipe(None, [f"run_dir={tmp_path / 'r'}", "stages=[sft,eval,grpo,sweep]", f"model.path={tmp_path}",
                            "data.source=file", f"data.path={data}", "grpo.eval_n_per_difficulty=7"])
    recipe = rc.model_dump(mode="json")
    for stage in ("sft", "eval", "grpo", "sweep"):
        assert stage_settings(recipe, stage)["held_out.grpo"][1] == 7 and "held_out.ppo" not in stage_settings(recipe, stage)
    embedded = load_recipe(None, [f"run_dir={tmp_path / 'r'}", "stages=[sft,grpo]", f"model.path={tmp_path}"]).model_dump(mode="json")
    assert not any(k.startswith("held_out") for k in stage_settings(embedded, "sft"))
    # rm samples the rows no RL stage holds out, first those sft does not train on
    rm = load_recipe(None, [f"run_dir={tmp_path / 'r'}", "stages=[rm,grpo]", f"model.path={tmp_path}",
                            "data.source=file", f"data.path={data}", "sft.n_examples=30"]).model_dump(mode="json")
    assert stage_settings(rm, "rm")["held_out.grpo"] and stage_settings(rm, "rm")["sft.n_examples"] == 30
    assert stage_settings(rm, "rm")["rm.label_reward"] == "math"  # resolved when the recipe loads


def test_rerun_guard_ignores_a_key_added_since_while_it_keeps_its_default():
    """A stage finished before a recipe key existed recorded no value for it: the key's default is what it ran
    with, so only a non-default value is a change."""
    from posttrain.pipeline import _changes, stage_settings

    now = stage_settings(load_recipe(None).model_dump(mode="json"), "sft")
    recorded = {k: v for k, v in now.items() if k != "sft.lora.modules_to_save"}
    assert now["sft.lora.modules_to_save"] == [] and _changes(recorded, now, "sft") == []
    changed = {**now, "sft.lora.modules_to_save": ["embed_tokens"]}
    assert _changes(recorded, changed, "sft") == ["sft.lora.modules_to_save: None -> ['embed_tokens']"]
    assert _changes({**recorded, "sft.steps": 1}, now, "sft") == [f"sft.steps: 1 -> {now['sft.steps']}"]
    # a key that has left the schema is no change; a derived one that vanished (an RL stage removed) is
    assert _changes({**now, "sft.retired_option": 3}, now, "sft") == []
    assert _changes({**now, "held_out.grpo": [[8], 100, None]}, now, "sft") == ["held_out.grpo: [[8], 100, None] -> None"]


def test_rm_label_reward_resolves_from_the_data_source_however_the_recipe_is_built(tmp_path):
    from posttrain.config import RecipeConfig, RMStageConfig

    (tmp_path / "x.jsonl").write_text('{"prompt": "2+2?", "answer": "4"}\n')
    file = {"source": "file", "path": str(tmp_path / "x.jsonl")}
    assert RecipeConfig().rm.label_reward == "exact_int"
    assert RecipeConfig(rm=RMStageConfig(), data=file, stages=["sft"], model={"path": str(tmp_path)}).rm.label_reward == "math"
    assert RecipeConfig(rm={"n_prompts": 8}, data=file, stages=["sft"], model={"path": str(tmp_path)}).rm.n_prompts == 8
    assert RecipeConfig(rm={"label_reward": "format"}).rm.label_reward == "format"
