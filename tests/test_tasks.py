"""The task interface (`posttrain.tasks`): one object per recipe owns its problems, held-out rows, grader,
difficulty and hooks; the embedded task keeps its generators, reasoning-gym datasets come in by name."""

import hashlib
import json
import random

import pytest

from posttrain.recipe import RecipeError, load_recipe
from posttrain.tasks.task import TASKS, build_task

GYM = ["data.source=reasoning_gym", "data.size=400"]


def gym_recipe(dataset: str, config: str = "{}", *extra):
    return load_recipe(None, ["stages=[sft,grpo]", "model.path=/tmp", *GYM, f"data.dataset={dataset}",
                              f"data.config={config}", *extra])


def test_the_registry_names_are_the_recipe_sources():
    from typing import get_args

    from posttrain.config import DataConfig

    assert set(TASKS.names()) == set(get_args(DataConfig.model_fields["source"].annotation))
    with pytest.raises(KeyError, match="unknown task 'arithmetik'.*Did you mean 'arithmetic'"):
        TASKS.get("arithmetik")


def test_the_embedded_task_draws_what_the_stages_drew_before_the_interface():
    """Independent references: the generator calls each stage made itself before the task owned them (an RL step
    from seed + step, its budgets from Random(seed + step); an eval budget from sha256(eval.seed/budget); the eval
    and sweep stages from their seed), so the quickstart's figures are unchanged."""
    from posttrain.budgets import draw_budget
    from posttrain.tasks.arithmetic import generate_problems

    rc = load_recipe("recipes/quickstart.yaml")
    task, diffs = build_task(rc), list(range(1, 9))
    problems, budgets = task.step_problems(rc.grpo, 7)
    assert problems == generate_problems(16, rc.seed + 7, diffs)
    rng = random.Random(rc.seed + 7)
    assert budgets == [draw_budget(rng, rc.grpo.budgets) for _ in problems]
    mixed = int.from_bytes(hashlib.sha256(f"{rc.eval.seed}/12".encode()).digest()[:8], "big")
    assert task.rl_eval_problems(rc.grpo, 12) == generate_problems(800, mixed, diffs)
    assert task.held_out(20, rc.sweep.seed) == generate_problems(160, rc.sweep.seed, diffs)
    assert task.rm_problems(5, 3) == generate_problems(5, 3, diffs)
    assert task.grader == "exact_int" and task.hooks_for(rc) >= {"first_error", "demonstrations", "corpus"}


def test_the_embedded_base_model_keeps_its_cache_key_and_corpus(tokenizer):
    """The base stage asks the task for its documents: the embedded task's stream is the one written before
    (same rng calls), and its cache key is computed as before (so a cached base is reused, figures unchanged)."""
    from posttrain.stages.base import CORPUS_VERSION, DocumentBatches, cache_key
    from posttrain.tasks.embedded import ArithmeticTask, corpus_document

    rc = load_recipe("recipes/quickstart.yaml")
    blob = json.dumps({"settings": rc.base.model_dump(exclude={"cache_dir"}), "seed": 0, "corpus": CORPUS_VERSION},
                      sort_keys=True)
    assert cache_key(rc.base, 0) == hashlib.sha256(blob.encode()).hexdigest()[:16]
    a, b = random.Random(5), random.Random(5)
    assert [ArithmeticTask.corpus_document_of(a) for _ in range(50)] == [
        corpus_document(b, b.randint(1, 8)) for _ in range(50)]
    batches = DocumentBatches(tokenizer, 64, 2, 0)
    assert batches.document == ArithmeticTask.corpus_document_of


def test_a_recipe_asking_for_a_hook_its_task_lacks_fails_naming_the_key():
    with pytest.raises(RecipeError, match=r"grpo.ptx_coef: 1.0 imitates demonstrations.*reasoning_gym has no "
                                          r"`demonstrations` hook"):
        gym_recipe("leg_counting", "{}", "grpo.ptx_coef=1")
    with pytest.raises(RecipeError, match=r"grpo.process_penalty: 1.0 blames the first wrong step.*`first_error`"):
        gym_recipe("chain_sum", "{}", "grpo.process_penalty=1")
    assert gym_recipe("chain_sum", "{}", "grpo.ptx_coef=1").grpo.ptx_coef == 1  # chain_sum has demonstrations


@pytest.mark.parametrize("over, shown", [
    (["data.dataset=chain_summ"], "'chain_summ' is not a reasoning-gym dataset (did you mean chain_sum"),
    (["data.dataset=chain_sum", "data.config={min_term: 2}"], "data.config: chain_sum:"),
    (["data.dataset=chain_sum", "data.config={min_terms: 5, max_terms: 2}"], "max_terms must be >= min_terms"),
    ([], "data.dataset: the reasoning-gym dataset to use is required"),
    (["data.grader=reasoning_gym", "data.source=arithmetic"], "grader: `reasoning_gym` reads reasoning-gym"),
])
def test_bad_reasoning_gym_settings_fail_when_the_recipe_loads(over, shown):
    with pytest.raises(RecipeError) as e:
        load_recipe(None, ["stages=[sft]", "model.path=/tmp", *GYM, *over])
    assert shown in str(e.value)


def test_reasoning_gym_grades_with_the_datasets_own_score_answer():
    """The grader is `score_answer` of the entry's dataset on the answer after `</think>` (full score only), and
    the RL reward worker's correctness and the `reasoning_gym` reward agree with it row for row."""
    import reasoning_gym

    from posttrain.workers.reward import RLRewardWorker

    for name in ("chain_sum", "number_sorting", "letter_counting"):
        task = build_task(gym_recipe(name))
        p = task.held_out(1, 0)[0]
        entry = p.tests
        assert entry["question"] == p.expression and str(entry["answer"]) == p.answer
        score = reasoning_gym.get_score_answer_fn(name)
        assert score(p.answer, entry) == 1.0 and task.grade(f"x</think>\n\n{p.answer}", p)
        assert not task.grade(p.answer, p)  # never closed its thinking
        wrong = f"x</think>\n\n{p.answer}9"
        assert score(f"{p.answer}9", entry) < 1.0 and not task.grade(wrong, p)
        worker = RLRewardWorker([{"name": "reasoning_gym", "weight": 1.0, "params": {}, "key": None, "on": "all"}],
                                "reasoning_gym")
        scores, correct, _ = worker.score([p.expression] * 2, [f"x</think>\n\n{p.answer}", wrong], [p.answer] * 2,
                                          [8, None], [1, 1], [0, 1], [False] * 2, tests=[entry, entry])
        assert scores == [1.0, 0.0] and correct == [True, False]


def test_reasoning_gym_difficulty_comes_from_the_datasets_parameters():
    """chain_sum's one varying integer parameter is its own scale (num_terms 2..5 -> 1..4); count_bits' huge
    range is placed on data.difficulty_levels; a dataset with no numeric parameter has one group (0), unless
    data.difficulty_keys names an entry field."""
    rows = build_task(gym_recipe("chain_sum", "{min_terms: 2, max_terms: 5, max_digits: 1}"))._rows
    assert {p.difficulty for p in rows} == {1, 2, 3, 4}
    assert all(p.difficulty == p.tests["metadata"]["num_terms"] - 1 for p in rows)
    bits = {p.difficulty for p in build_task(gym_recipe("count_bits", "{}", "data.difficulty_levels=4"))._rows}
    assert bits <= {1, 2, 3, 4} and len(bits) >= 3
    assert {p.difficulty for p in build_task(gym_recipe("letter_counting"))._rows} == {0}
    keyed = build_task(gym_recipe("letter_counting", "{}", "data.difficulty_keys=[span_length]"))._rows
    assert len({p.difficulty for p in keyed}) >= 3


def test_reasoning_gym_holds_rows_out_and_never_trains_or_pretrains_on_them():
    rc = gym_recipe("chain_sum", "{min_terms: 2, max_terms: 4, max_digits: 1}", "grpo.eval_budgets=[8,auto]",
                    "grpo.eval_n_per_difficulty=5", "task.max_difficulty=3")
    task = build_task(rc)
    held = {p.expression for p in task.evaluation_rows()}
    assert held == {p.expression for b in ("8", "auto") for p in task.rl_eval_problems(rc.grpo, b)}
    assert len(held) == 30
    trained = {e.prompt for e in task.train_examples(10_000, 1)}
    trained |= {p.expression for s in range(20) for p in task.step_problems(rc.grpo, s)[0]}
    trained |= {p.expression for p in task.rm_problems(50, 3)}
    assert trained and not trained & held
    rng = random.Random(0)
    docs = [task.corpus_document(rng) for _ in range(3000)]
    assert not any(q in d for d in docs for q in held)
    assert sum("=" in d.split("Answer:")[0] for d in docs) > 1000  # running-sum traces, not only answers
    key = task.corpus_key()
    assert key["dataset"] == "chain_sum" and key["held_out"] == 30
    ex = task.train_examples(1, 0)[0]
    assert ex.reasoning.splitlines()[-1].endswith(f"= {ex.answer}")  # the running sum ends at the answer


def test_chain_sum_budget_demonstrations_fold_terms_to_fit_and_end_at_the_answer(tokenizer):
    """The `budget_demonstrations` hook: the most explicit running sum that fits (terms folded per line), every
    line's value right, the last one the answer; none when not even one line fits; SFT's budgeted rows use it."""
    from posttrain.config import BudgetMix
    from posttrain.sft_data import build_sft_examples
    from posttrain.tokenizer import THINK_END, count_tokens

    rc = gym_recipe("chain_sum", "{min_terms: 5, max_terms: 6, max_digits: 1}")
    task = build_task(rc)
    assert "budget_demonstrations" in task.hooks_for(rc)
    count = lambda t: count_tokens(tokenizer, t)  # noqa: E731
    folded = 0
    for ex in task.train_examples(40, 0):
        full = ex.reasoning
        for budget in (4, 12, 24, 64):
            got = task.budget_demonstration(ex, budget, count, random.Random(0))
            assert count(got) <= budget
            if got:
                assert got.splitlines()[-1].endswith(f"= {ex.answer}")
                for line in got.splitlines():
                    lhs, rhs = line.split(" = ")
                    assert eval(lhs) == int(rhs)  # noqa: S307 - sums of integers written by the task
                folded += len(got.splitlines()) < len(full.splitlines())
            if count(full) <= budget:
                assert got == full  # the full trace whenever it fits
    assert folded > 10
    ex = task.train_examples(30, 0)
    rows = build_sft_examples(tokenizer, ex, [24], BudgetMix(budgeted=1, autonomous=0, zero=0), 0, 512,
                              fit=task.budget_demonstration)
    shown = [tokenizer.decode([t for t, m in zip(r["input_ids"], r["completion_mask"]) if m]).split(THINK_END)[0]
             for r in rows]
    assert any(s and s != e.reasoning for s, e in zip(shown, ex)) and all(r["n_think"] <= 24 for r in rows)
