"""Truncated importance sampling (`grpo.tis_cap` / `ppo.tis_cap`) on the real tiny model: the learner recomputes the
old policy's log-probs itself and weights each token's policy loss by min(exp(old - rollout), cap)."""

import math

import pytest
import torch

torch.set_num_threads(1)
GROUP, T = 2, 5


def _worker(model_dir, **kw):
    from posttrain.workers.learner import LearnerWorker

    return LearnerWorker(str(model_dir), lr=1e-2, router_aux_coef=0.0, router_metrics=False, kl_coef=0.0, **kw)


@pytest.mark.parametrize("mini_batches", [1, 2])
def test_weights_are_one_and_the_update_is_unchanged_when_the_rollout_logp_is_the_learners(
        tiny_model_dir, mini_batches, ragged_batch, loss_spy):
    """Rollout log-probs equal to the learner's own: every weight is exactly 1 and the step (every mini-batch's
    loss, the weights after it) is bit for bit the step without TIS, whose old policy is the rollout's."""
    from posttrain.learner import group_bounds

    batch, adv = ragged_batch(0), torch.tensor([1.0, -1.0, 0.5, -2.0])
    tis, plain = _worker(tiny_model_dir, tis_cap=2.0), _worker(tiny_model_dir)
    tis.learner.model.train()
    batch.logp = tis.learner.old_logp(batch, group_bounds(len(batch), GROUP, mini_batches), batch.loss_mask)
    assert batch.logp[batch.loss_mask.bool()].abs().min() > 0  # real log-probs on every loss token
    seen = [loss_spy(w.learner) for w in (tis, plain)]
    metrics = [w.step(batch, adv, mini_batches=mini_batches, group_size=GROUP) for w in (tis, plain)]
    assert metrics[0]["actor/updates"] == metrics[1]["actor/updates"] == mini_batches
    assert metrics[0]["rollout/tis_weight_mean"] == metrics[0]["rollout/tis_weight_max"] == 1.0
    assert metrics[0]["rollout/tis_clipfrac"] == 0.0 and "rollout/tis_weight_mean" not in metrics[1]
    assert seen[0] == seen[1]
    w_tis, w_plain = tis.weights(), plain.weights()
    assert all(torch.equal(w_tis[n], w_plain[n]) for n in w_plain)


def test_policy_loss_is_weighted_by_the_capped_ratio_of_learner_to_rollout(tiny_model_dir, ragged_batch,
                                                                         loss_spy):
    """Rollout log-probs off the learner's by -1.5 to +1.5: the first update's loss is the hand computation
    mean over loss tokens of -A * min(exp(old - rollout), cap) (the learner's ratio to its own old policy is 1),
    the metrics report the weights' mean and max, and without TIS the loss is a different one."""
    from posttrain.learner import group_bounds

    cap = 1.5
    batch, adv = ragged_batch(1), torch.tensor([1.0, -1.0, 0.5, -2.0])
    tis, plain = _worker(tiny_model_dir, tis_cap=cap), _worker(tiny_model_dir)
    tis.learner.model.train()
    own = tis.learner.old_logp(batch, group_bounds(len(batch), GROUP, 1), batch.loss_mask)
    shift = torch.linspace(-1.5, 1.5, len(batch) * T).view(len(batch), T)
    batch.logp = (own + shift) * batch.response_mask
    seen = [loss_spy(w.learner) for w in (tis, plain)]
    metrics = tis.step(batch, adv, group_size=GROUP)
    plain.step(batch, adv, group_size=GROUP)

    mask = batch.loss_mask
    weights = [(i, j, min(math.exp(own[i, j].item() - batch.logp[i, j].item()), cap))
               for i in range(len(batch)) for j in range(T) if mask[i, j]]
    want = sum(-adv[i].item() * w for i, j, w in weights) / len(weights)
    assert seen[0][0] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert metrics["rollout/tis_weight_mean"] == pytest.approx(sum(w for *_, w in weights) / len(weights), rel=1e-6)
    assert metrics["rollout/tis_weight_max"] == pytest.approx(cap)
    assert 0 < metrics["rollout/tis_clipfrac"] < 1
    assert seen[1][0] != pytest.approx(want, rel=1e-3)


def test_tis_cap_must_be_positive_in_the_learner_and_the_recipe():
    from posttrain.learner import Learner
    from posttrain.recipe import RecipeError, load_recipe

    with pytest.raises(ValueError, match="tis_cap"):
        Learner(torch.nn.Linear(2, 2), tis_cap=0.0)
    cfg = load_recipe(None, ["grpo.tis_cap=2"])
    assert cfg.grpo.tis_cap == 2.0 and cfg.ppo.tis_cap is None  # off by default
    for override, words in (("grpo.tis_cap=0", "greater than 0"), ("ppo.tis_cap=-1", "greater than 0"),
                            ("grpo.tis_cap=often", "valid number")):
        with pytest.raises(RecipeError) as ei:
            load_recipe(None, [override])
        assert f"{override.split('=')[0]}: " in str(ei.value) and words in str(ei.value)
