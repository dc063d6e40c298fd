"""Bad recipes end in one clear message, exit code 2 and no traceback (issue #30), checked through the CLI.

Each fault is written to a recipe file (or given as a `key=value` override) and run with `posttrain.cli.main`, as
`posttrain run` would: the message must name the key path, no model may load and no run directory may change.
"""

import subprocess
import sys
from pathlib import Path

import pytest

from posttrain.cli import main
from posttrain.recipe import load_recipe, safe_load

RECIPES = Path(__file__).resolve().parents[1] / "recipes"
ACTOR_GROUPS = ("rollout", "learner", "reference", "critic", "reward")

# (recipe text after `run_dir:`, the message line it must give)
BAD_VALUES = [
    ("grpo: {learning_rate: .inf}", "grpo.learning_rate: Input should be a finite number (got inf)"),
    ("ppo: {learning_rate: .nan}", "ppo.learning_rate: Input should be a finite number (got nan)"),
    ("ppo: {critic_learning_rate: .inf}", "ppo.critic_learning_rate: Input should be a finite number"),
    ("sft: {learning_rate: .inf}", "sft.learning_rate: Input should be a finite number"),
    ("base: {learning_rate: -.inf}", "base.learning_rate: Input should be a finite number"),
    ("rm: {genrm: {learning_rate: .inf}}", "rm.genrm.learning_rate: Input should be a finite number"),
    ("rm: {scalar: {learning_rate: .nan}}", "rm.scalar.learning_rate: Input should be a finite number"),
    ("grpo: {max_grad_norm: .inf}", "grpo.max_grad_norm: Input should be a finite number"),
    ("grpo: {rewards: [{name: exact_int, weight: .inf}]}", "grpo.rewards.0.weight: Input should be a finite number"),
    ("sft: {mix: {zero: .nan}}", "sft.mix.zero: Input should be a finite number"),
    ("ray: {learner: {cpus: .inf}}", "ray.learner.cpus: Input should be a finite number"),
    ("grpo: {max_new_tokens: 100000000}", "grpo.max_new_tokens: Input should be less than or equal to 1048576"),
    ("ppo: {eval_max_new_tokens: 100000000}", "ppo.eval_max_new_tokens: Input should be less than or equal to"),
    ("eval: {max_new_tokens: 100000000}", "eval.max_new_tokens: Input should be less than or equal to 1048576"),
    ("grpo: {budgets: [0, 100000000000000000000, auto]}", "grpo.budgets.1: Input should be less than or equal to"),
    ("rm: {budgets: [100000000000000000000]}", "rm.budgets.0: Input should be less than or equal to 1048576"),
    ("sft: {budgets: [{low: 1, high: 100000000000000000000}]}", "sft.budgets.0.high: Input should be less than"),
    ("sweep: {budgets: [0, 100000000000000000000]}", "sweep.budgets.1: Input should be less than or equal to"),
    ("eval: {budgets: [-1, auto]}", "eval.budgets.0: Input should be greater than or equal to 0"),
    ("seed: -1", "seed: Input should be greater than or equal to 0 (got -1)"),
    ("seed: 4294967296", "seed: Input should be less than or equal to 4294967295"),
    ("sft: {steps: true}", "sft.steps: expected a number, not the boolean true"),
    ("grpo: {steps: true}", "grpo.steps: expected a number, not the boolean true"),
    ("grpo: {learning_rate: true}", "grpo.learning_rate: expected a number, not the boolean true"),
    ("grpo: {eval_rows: false}", "grpo.eval_rows: expected a number, not the boolean false"),
    ("grpo: {budgets: [true, auto]}", "grpo.budgets.0: Input should be a valid integer (got True)"),
    ("grpo: {eval_budgets: [8, true]}", "grpo.eval_budgets.1: Input should be a valid integer (got True)"),
    ("stages: []", "stages: List should have at least 1 item"),
    ("ray: {reward: {num: 2}}", "ray.reward.num: Input should be less than or equal to 1"),
]


@pytest.fixture
def no_work(monkeypatch):
    """Replace the pipeline with a recorder: a bad recipe must stop before any stage (or model load) starts."""
    import posttrain.pipeline

    started = []
    monkeypatch.setattr(posttrain.pipeline, "run_recipe", lambda cfg: started.append(cfg) or {})
    return started


def run_cli(capsys, *args) -> tuple[int, str]:
    """`posttrain run ARGS...` in this process: its exit code and stderr."""
    code = main(["run", *map(str, args)])
    return code, capsys.readouterr().err


def assert_one_error(code: int, err: str, expected: str) -> None:
    """Exit code 2, one `error:` line, the expected message (naming the key path), and no traceback."""
    assert code == 2, err
    assert len([line for line in err.splitlines() if line.startswith("error:")]) == 1, err
    assert expected in err and "Traceback" not in err, err


def snapshot(directory: Path) -> dict[str, bytes]:
    """Every file under `directory` with its bytes."""
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("body, expected", BAD_VALUES, ids=[b for b, _ in BAD_VALUES])
def test_bad_value_in_a_recipe_file_is_one_error_naming_the_key(tmp_path, capsys, no_work, body, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\n{body}\n")
    code, err = run_cli(capsys, recipe)
    assert_one_error(code, err, expected)
    head, *mistakes = err.splitlines()
    assert head == f"error: invalid recipe {recipe}:" and len(mistakes) == 1 and mistakes[0].startswith(f"  {expected}")
    assert not no_work and not (tmp_path / "run").exists()


@pytest.mark.parametrize("override, expected", [
    ("grpo.learning_rate=.inf", "grpo.learning_rate: Input should be a finite number (got inf)"),
    ("grpo.max_new_tokens=100000000", "grpo.max_new_tokens: Input should be less than or equal to 1048576"),
    ("grpo.budgets=[0, 100000000000000000000]", "grpo.budgets.1: Input should be less than or equal to 1048576"),
    ("seed=-1", "seed: Input should be greater than or equal to 0"),
    ("sft.steps=true", "sft.steps: expected a number, not the boolean true"),
    ("stages=[]", "stages: List should have at least 1 item"),
])
def test_bad_override_is_one_error_and_leaves_the_run_directory_as_it_was(tmp_path, capsys, no_work, override,
                                                                          expected):
    run = tmp_path / "run"
    (run / "sft").mkdir(parents=True)
    (run / "recipe.yaml").write_text("seed: 0\n")
    (run / "sft" / "done.json").write_text("{}")
    before = snapshot(run)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {run}\nstages: [base, sft, grpo]\n")
    code, err = run_cli(capsys, recipe, override)
    assert_one_error(code, err, expected)
    assert not no_work and snapshot(run) == before


@pytest.mark.parametrize("text", ["", "# only a comment\n\n# and another\n", "---\n", "~\n"])
def test_empty_recipe_file_is_refused_rather_than_run_with_every_default(tmp_path, capsys, monkeypatch, no_work,
                                                                         text):
    """An empty file read as "all defaults" would run the default stages into runs/quickstart."""
    monkeypatch.chdir(tmp_path)
    recipe = tmp_path / "empty.yaml"
    recipe.write_text(text)
    code, err = run_cli(capsys, recipe)
    assert_one_error(code, err, f"error: recipe {recipe} is empty")
    assert not no_work and not (tmp_path / "runs").exists()
    # with overrides too: they do not fill an empty file in
    code, err = run_cli(capsys, recipe, f"run_dir={tmp_path / 'run'}")
    assert_one_error(code, err, f"error: recipe {recipe} is empty")


def test_unreadable_recipe_file_is_one_error(tmp_path, capsys, no_work):
    recipe = tmp_path / "latin1.yaml"
    recipe.write_bytes("run_dir: caf\u00e9\n".encode("latin-1"))
    code, err = run_cli(capsys, recipe)
    assert_one_error(code, err, f"error: recipe {recipe} cannot be read")
    assert not no_work


def test_posttrain_process_reports_a_bad_value_without_a_traceback(tmp_path):
    """The installed command end to end (its own process, exit status and stderr)."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"run_dir: {tmp_path / 'run'}\ngrpo:\n  learning_rate: .inf\n")
    exe = Path(sys.executable).with_name("posttrain")
    proc = subprocess.run([str(exe), "run", str(recipe), "seed=-1"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.splitlines() == [f"error: invalid recipe {recipe}:",
                                        "  seed: Input should be greater than or equal to 0 (got -1)",
                                        "  grpo.learning_rate: Input should be a finite number (got inf)"]
    assert not (tmp_path / "run").exists()


def schema_defaults(capsys) -> dict:
    """What `posttrain schema` prints, read back as a recipe."""
    assert main(["schema"]) == 0
    return safe_load(capsys.readouterr().out)


def test_schema_prints_each_actor_groups_real_defaults(capsys):
    printed = schema_defaults(capsys)
    assert printed["ray"]["learner"]["max_restarts"] == 0 and printed["ray"]["critic"]["max_restarts"] == 0
    assert printed["ray"]["rollout"]["cpus"] == 1.0 and printed["ray"]["learner"]["cpus"] == 1.0
    assert all(printed["ray"][g]["cpus"] == 0.0 for g in ("reference", "critic", "reward"))
    assert printed["rm"]["scalar"]["enabled"] is False and printed["rm"]["genrm"]["enabled"] is True
    # and they are the values a recipe without the section gets
    cfg = load_recipe(None)
    for group in ACTOR_GROUPS:
        assert printed["ray"][group] == getattr(cfg.ray, group).model_dump(mode="json"), group


@pytest.mark.parametrize("group", ACTOR_GROUPS)
def test_actor_group_defaults_do_not_depend_on_how_much_of_the_section_is_given(tmp_path, group):
    absent = getattr(load_recipe(None).ray, group)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"ray:\n  {group}: {{}}\n")
    assert getattr(load_recipe(recipe).ray, group) == absent
    recipe.write_text(f"ray:\n  {group}: {{timeout_s: 5}}\n")
    assert getattr(load_recipe(recipe).ray, group) == absent.model_copy(update={"timeout_s": 5.0})


def test_a_learner_section_keeps_the_learners_restart_default():
    """`ray: {learner: {cpus: 1}}` used to turn on 2 recoveries (the generic actor default) without a word."""
    assert load_recipe(None, ["ray.learner.cpus=1"]).ray.learner.max_restarts == 0
    assert load_recipe(None, ["ray.critic.gpus=0"]).ray.critic.max_restarts == 0
    assert load_recipe(None, ["rm.scalar.steps=5"]).rm.scalar.enabled is False


@pytest.mark.parametrize("recipe", sorted(RECIPES.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_recipes_still_validate(recipe, tmp_path, monkeypatch):
    """Every recipe in recipes/ stays within the new bounds (the model paths they name made to exist)."""
    monkeypatch.chdir(tmp_path)
    for d in ("runs/quickstart/sft/checkpoint", "runs/quickstart/rm/genrm", "runs/quickstart/grpo/checkpoint"):
        (tmp_path / d).mkdir(parents=True)
    cfg = load_recipe(recipe)
    assert cfg.stages and cfg.ray.learner.max_restarts == 0


def test_learner_out_of_its_own_restarts_says_which_limit_was_reached():
    """A learner is never restarted by Ray alone (its recipe max_restarts counts the driver's recoveries), so its
    failure must not read as if the recipe's limit were 0."""
    from posttrain.workers.actors import ActorOptions, Proxy, WorkerFailed

    with pytest.raises(WorkerFailed) as ei:
        Proxy(object, "learner0", ActorOptions(max_restarts=0))._recover("step(): the actor process died")
    assert str(ei.value) == ("actor 'learner0' failed: step(): the actor process died; restart limit max_restarts=0 "
                             "reached (the actor alone is not restarted)")
    rollout = Proxy(object, "rollout0", ActorOptions(max_restarts=2))
    rollout.restarts = 2
    with pytest.raises(WorkerFailed, match=r"max_restarts=2 reached \(restarted 2 times already\)"):
        rollout._recover("generate(): the actor process died")
