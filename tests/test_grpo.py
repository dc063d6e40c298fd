"""The `grpo` stage end to end on the tiny model, and the learner's loss weighting of forced tokens."""

import json
import math

import pytest
import torch

from posttrain.recipe import load_recipe


def test_grpo_stage_end_to_end(tiny_model_dir, tmp_path, monkeypatch):
    from posttrain.model import load_model
    from posttrain.pipeline import run_recipe
    from posttrain.stages import grpo

    # The random tiny model never answers correctly, so every reward is 0 and nothing would be learnt; add
    # per-row noise to the real scores so that advantages (and the update) are non-zero.
    real_score = grpo.score

    def noisy_score(rewards, batch, answers):
        scores, metrics = real_score(rewards, batch, answers)
        return [s + 0.1 * i for i, s in enumerate(scores)], metrics

    monkeypatch.setattr(grpo, "score", noisy_score)

    cfg = load_recipe(None, [
        f"run_dir={tmp_path / 'run'}", f"model.path={tiny_model_dir}", "stages=[grpo]", "threads=2",
        "task.max_difficulty=2", "grpo.steps=2", "grpo.prompts_per_step=3", "grpo.group_size=2",
        "grpo.budgets=[0,4,auto]", "grpo.max_new_tokens=8", "grpo.learning_rate=1e-3", "grpo.kl_coef=0.1",
        "grpo.mini_batches=2", "grpo.dynamic_sampling=false", "grpo.eval_budgets=[4]",
        "grpo.eval_n_per_difficulty=1", "grpo.eval_max_new_tokens=8",
    ])
    info = run_recipe(cfg)["grpo"]
    lines = [json.loads(s) for s in (tmp_path / "run" / "grpo" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [0, 1]
    for m in lines:
        for key in ("reward/mean", "rollout/accuracy", "actor/pg_loss", "actor/clipfrac", "actor/grad_norm",
                    "actor/entropy", "actor/kl_loss", "time/rollout_s", "time/reward_s", "time/learner_s"):
            assert key in m and math.isfinite(m[key]), key
    assert any(k.startswith("budget/") and k.endswith("/think_tokens") for m in lines for k in m)
    assert info["summary"]["skipped_steps"] == 0
    assert set(info["summary"]["before"]) == set(info["summary"]["after"]) == {"4"}
    trained, base = load_model(info["checkpoint"]), load_model(tiny_model_dir)
    b = dict(base.named_parameters())
    assert any((p - b[n]).abs().max() > 0 for n, p in trained.named_parameters())  # the steps changed weights


class _Batch:
    """A hand-made rollout batch: 2 rows, the second with a forced token at position 1."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.prompt_ids = torch.randint(3, 100, (2, 4), generator=g)
        self.prompt_mask = torch.ones(2, 4, dtype=torch.long)
        self.response_ids = torch.randint(3, 100, (2, 3), generator=g)
        self.response_mask = torch.ones(2, 3, dtype=torch.long)
        self.forced_mask = torch.tensor([[False, False, False], [False, True, False]])
        self.logp = torch.zeros(2, 3)

    @property
    def loss_mask(self):
        return self.response_mask * (~self.forced_mask).long()

    def __len__(self):
        return 2


def test_forced_tokens_get_zero_loss_weight(tiny_model_dir):
    """d loss / d logp is 0 on the forced token and equal to -A / n_tokens on the others (token mean, ratio 1)."""
    from posttrain.learner import Learner, response_logits
    from posttrain.model import load_model

    learner = Learner(load_model(tiny_model_dir), clip_low=0.2, clip_high=0.28)
    batch = _Batch()
    with torch.no_grad():
        batch.logp, _ = learner.token_logp(batch)
    captured = {}
    real = learner.token_logp

    def spy(b, rows=None, model=None):
        logp, logits = real(b, rows, model)
        logp.retain_grad()
        captured["logp"] = logp
        return logp, logits

    learner.token_logp = spy
    adv = torch.tensor([1.0, -2.0])
    loss, _ = learner.loss(batch, adv, batch.loss_mask)
    loss.backward()
    grad = captured["logp"].grad
    n = batch.loss_mask.sum()
    expected = -adv[:, None] * batch.loss_mask / n
    assert grad[1, 1] == 0
    torch.testing.assert_close(grad, expected)

    # a teacher-forced pass over prompt + response scores the same tokens as scoring each row on its own
    logits = response_logits(learner.model, batch.prompt_ids, batch.prompt_mask, batch.response_ids,
                             batch.response_mask)
    one = learner.model(input_ids=torch.cat([batch.prompt_ids[:1], batch.response_ids[:1]], 1)).logits[:, 3:6]
    torch.testing.assert_close(logits[:1], one.float(), atol=1e-4, rtol=1e-4)


def test_unknown_reward_is_a_recipe_error(tmp_path, tiny_model_dir):
    with pytest.raises(Exception, match="budget_l1_max"):
        load_recipe(None, [f"model.path={tiny_model_dir}", "stages=[grpo]", "grpo.rewards=[{name: budget_l1_mx}]"])


def test_non_finite_step_is_skipped_and_counted(tiny_model_dir):
    from posttrain.learner import Learner
    from posttrain.model import load_model

    learner = Learner(load_model(tiny_model_dir), lr=1e-2)
    batch = _Batch()
    before = {n: p.detach().clone() for n, p in learner.model.named_parameters()}
    out = learner.step(batch, torch.tensor([float("nan"), 1.0]), group_size=1)
    assert learner.skipped_steps == 1 and out["actor/skipped_steps"] == 1.0
    assert all(torch.equal(p, before[n]) for n, p in learner.model.named_parameters())
    learner.step(batch, torch.tensor([1.0, -1.0]), group_size=1)
    assert learner.skipped_steps == 1
    assert any(not torch.equal(p, before[n]) for n, p in learner.model.named_parameters())
