"""Asynchronous RL (issue #29): rollouts ahead of the learner with bounded staleness (`grpo.async.max_staleness`,
`posttrain.stages.rl_async`) and the off-policy corrections (`grpo.async.correction`, `posttrain.algo.offpolicy`),
on the tiny model with the local backend (one Ray run)."""

import functools
import json
import math

import pytest
import torch

from posttrain.recipe import RecipeError, load_recipe

TINY = ["threads=1", "task.max_difficulty=2", "grpo.prompts_per_step=3", "grpo.group_size=2",
        "grpo.budgets=[0,4,auto]", "grpo.max_new_tokens=8", "grpo.learning_rate=1e-3", "grpo.mini_batches=2", "grpo.eval_n_per_difficulty=0",
        "grpo.kl_coef=0.1"]
CORRECTIONS = ["tis", "seq_tis", "mis", "seq_mis", "geo_mis", "decoupled"]


# ------------------------------------------------------------------------------------------- the corrections
def _inputs(seed=0):
    """(rollout_logp, old_logp, mask) (6, 7): ragged rows, one row without a loss token, garbage off the mask, a
    NaN rollout log-prob on a loss token, log-ratios from about -3 to 3 (rows 0-2 near 0, rows 3-5 far; row 4 biased)."""
    g = torch.Generator().manual_seed(seed)
    B, T = 6, 7
    mask = (torch.arange(T)[None] < torch.tensor([7, 5, 3, 6, 4, 0])[:, None]).long()
    old = -torch.rand(B, T, generator=g) * 4
    scale = torch.tensor([0.05, 0.2, 0.4, 0.8, 1.5, 1.0])[:, None]
    bias = torch.tensor([0.0, 0.0, 0.0, -0.2, 1.0, 0.0])[:, None]  # row 4: geometric mean ratio ~e
    rollout = old - bias - scale * torch.randn(B, T, generator=g)
    rollout = torch.where(mask.bool(), rollout, torch.full_like(rollout, 1e4))  # off the mask: never read
    rollout[1, 2] = float("nan")
    return rollout, old, mask


def _loop(name, rollout, old, mask, cap, lower):
    """The slow reference, element by element in float64, from the papers' and verl's/AReaL's definitions:
    (weights or None, keep or None), lists of lists. (tests/test_offpolicy_verl.py checks the same corrections
    against verl 0.9.1's own code.)"""
    B, T = mask.shape
    W, K = [[1.0] * T for _ in range(B)], [[True] * T for _ in range(B)]
    clamp = lambda x: max(-20.0, min(20.0, x))  # noqa: E731 - verl's SAFETY_BOUND
    lo = (1 / cap if lower is None else lower) if name.endswith("mis") or name == "icepop" else lower
    for i in range(B):
        toks = [j for j in range(T) if mask[i, j]]
        lr = {}
        for j in toks:
            d = float(old[i, j]) - float(rollout[i, j])
            lr[j] = 0.0 if math.isnan(d) else d
        total = sum(lr.values())  # seq_tis: the sum of the token log-ratios, clamped after (verl's sequence IS)
        clamped = sum(clamp(x) for x in lr.values())  # the rejections: each token clamped first (verl's k1 RS)
        inside = lambda log_r: math.log(lo) <= log_r <= math.log(cap)  # noqa: E731 - ratio in [lo, cap]
        for j in toks:
            if name == "tis":
                W[i][j] = min(math.exp(lr[j]), cap) if lower is None else max(lower, min(math.exp(lr[j]), cap))
            elif name == "seq_tis":
                w = min(math.exp(clamp(total)), cap)
                W[i][j] = w if lower is None else max(lower, w)
            elif name == "mis":
                K[i][j] = inside(clamp(lr[j]))
            elif name == "seq_mis":
                K[i][j] = inside(clamped)
            elif name == "geo_mis":
                K[i][j] = inside(clamped / len(toks))
            elif name == "icepop":
                rho = math.exp(clamp(lr[j]))
                W[i][j] = rho if lo <= rho <= cap else 0.0
            elif name == "decoupled":
                rho = math.exp(lr[j])
                W[i][j] = rho if rho <= cap else 0.0
    weights = None if name.endswith("mis") else W
    keep = K if name.endswith("mis") else None
    return weights, keep


@pytest.mark.parametrize("lower", [None, 0.7], ids=["default_lower", "lower"])
@pytest.mark.parametrize("name", CORRECTIONS + ["icepop"])
def test_each_correction_equals_the_loop_reference(name, lower):
    from posttrain.algo.offpolicy import Correction
    from posttrain.algo.registry import get_correction

    if name == "decoupled" and lower is not None:
        with pytest.raises(ValueError, match="lower"):
            get_correction(name)(*_inputs(), cap=2.0, lower=lower)
        return
    rollout, old, mask = _inputs()
    cap = 1.6
    out = get_correction(name)(rollout, old, mask, cap=cap, lower=lower)
    assert isinstance(out, Correction)
    weights, keep = _loop(name, rollout, old, mask, cap, lower)
    if weights is None:
        assert out.weights is None
    else:
        torch.testing.assert_close(out.weights, torch.tensor(weights, dtype=torch.float32), atol=1e-6, rtol=1e-6)
        assert not out.weights.requires_grad
    if keep is None:
        assert out.keep is None
    else:
        assert out.keep.tolist() == keep
        rejected = [(i, j) for i in range(6) for j in range(7) if mask[i, j] and not keep[i][j]]
        assert rejected, "the inputs must make the mask do something"
        n = int(mask.sum())
        assert out.metrics["offpolicy/masked_token_share"] == pytest.approx(len(rejected) / n)
        rows = {i for i, _ in rejected}
        assert out.metrics["offpolicy/masked_row_share"] == pytest.approx(len(rows) / 5)  # 5 rows hold loss tokens
    # the mismatch KL (k3 of KL(mu || pi_old)) over the loss tokens, NaN log-prob as ratio 1
    k3 = [math.exp(d) - d - 1 for d in (0.0 if math.isnan(float(old[i, j] - rollout[i, j])) else
                                          float(old[i, j] - rollout[i, j])
                                          for i in range(6) for j in range(7) if mask[i, j])]
    assert out.metrics["offpolicy/mismatch_kl"] == pytest.approx(sum(k3) / len(k3), rel=1e-5)


def test_corrections_are_identities_on_identical_log_probs_and_engage_on_far_ones():
    """Rollout log-probs equal to the learner's (the same numerics): weight 1 everywhere, nothing masked, mismatch
    KL 0. Shifted by +-3 nats on the rows (far from any cap): every row truncated or masked."""
    from posttrain.algo.registry import get_correction

    _, old, mask = _inputs()
    for name in CORRECTIONS:
        out = get_correction(name)(old.clone(), old, mask, cap=2.0)
        if out.weights is not None:
            assert bool((out.weights[mask.bool()] == 1).all()), name
        if out.keep is not None:
            assert bool(out.keep.all()), name
        assert out.metrics["offpolicy/mismatch_kl"] == 0.0
    shifted = old - 3.0 * torch.tensor([1, -1, 1, -1, 1, 1])[:, None]  # ratio e^3 or e^-3 on every token
    assert get_correction("mis")(shifted, old, mask, cap=2.0).metrics["offpolicy/masked_token_share"] == 1.0
    assert get_correction("seq_mis")(shifted, old, mask, cap=2.0).metrics["offpolicy/masked_row_share"] == 1.0
    tis = get_correction("tis")(shifted, old, mask, cap=2.0)
    assert tis.metrics["rollout/tis_clipfrac"] == pytest.approx((7 + 3 + 4) / 25)  # the tokens of rows 0, 2, 4


def test_masked_tokens_leave_the_learners_loss(tiny_model_dir, ragged_batch, loss_spy):
    """`mis` in the learner: rollout log-probs off the learner's own by -1.5..1.5 nats; the update equals, bit for
    bit, the update without a correction on the learner's own log-probs with the masked tokens taken out by hand."""
    import dataclasses

    from posttrain.learner import group_bounds
    from posttrain.workers.learner import LearnerWorker

    def worker(**kw):
        return LearnerWorker(str(tiny_model_dir), lr=1e-2, router_aux_coef=0.0, router_metrics=False, kl_coef=0.0,
                             **kw)

    GROUP, T = 2, 5
    batch, adv = ragged_batch(1, T, GROUP), torch.tensor([1.0, -1.0, 0.5, -2.0])
    mis, plain = worker(correction="mis", correction_cap=2.0), worker()
    mis.learner.model.train()
    own = mis.learner.old_logp(batch, group_bounds(len(batch), GROUP, 1), batch.loss_mask)
    shift = torch.linspace(-1.5, 1.5, len(batch) * T).view(len(batch), T)
    batch.logp = (own + shift) * batch.response_mask
    keep = torch.tensor([[0.5 <= math.exp(-float(shift[i, j])) <= 2.0 for j in range(T)] for i in range(len(batch))])
    mask = batch.loss_mask * keep.long()
    assert 0 < int(mask.sum()) < int(batch.loss_mask.sum())
    seen = [loss_spy(w.learner) for w in (mis, plain)]
    metrics = mis.step(batch, adv, group_size=GROUP)
    plain.step(dataclasses.replace(batch, logp=own), adv, mask=mask, group_size=GROUP)
    assert seen[0] == seen[1]
    assert all(torch.equal(a, b) for a, b in zip(mis.weights().values(), plain.weights().values()))
    assert metrics["offpolicy/masked_token_share"] == pytest.approx(1 - float(mask.sum() / batch.loss_mask.sum()))


# ----------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("overrides,key,words", [
    (["grpo.async.max_staleness=-1"], "grpo.async.max_staleness", "greater than or equal to 0"),
    (["ppo.async.correction=tiss"], "ppo.async.correction", "unknown off-policy correction 'tiss'; known: none, "),
    (["grpo.async.partial=true"], "grpo.async.partial", "not supported by either rollout engine"),
    (["grpo.async.correction=mis", "grpo.async.cap=0.8"], "grpo.async.cap", "empty interval"),
    (["grpo.async.correction=mis", "grpo.async.lower=3"], "grpo.async.cap", "empty interval"),
    (["grpo.async.correction=seq_tis", "grpo.async.lower=3"], "grpo.async.lower", "lower must be < cap"),
    (["grpo.async.correction=decoupled", "grpo.async.cap=1"], "grpo.async.cap", "must be > 1"),
    (["grpo.async.lower=0.5"], "grpo.async.lower", "`correction` is none"),
    (["grpo.tis_cap=2", "grpo.async.correction=seq_tis"], "grpo.tis_cap", "cannot be combined"),
])
def test_recipe_errors_name_the_key(overrides, key, words):
    with pytest.raises(RecipeError) as ei:
        load_recipe(None, overrides)
    assert f"{key}: " in str(ei.value) and words in str(ei.value), str(ei.value)


def test_recipe_defaults_and_tis_cap_is_the_tis_correction():
    from posttrain.config_rl import max_staleness, off_policy
    from posttrain.recipe import dump_recipe, safe_load

    cfg = load_recipe(None, ["grpo.tis_cap=1.5", "ppo.async.max_staleness=2", "ppo.async.correction=geo_mis"])
    assert off_policy(cfg.grpo) == ("tis", 1.5, None) and max_staleness(cfg.grpo) == 0
    assert off_policy(cfg.ppo) == ("geo_mis", 2.0, None) and max_staleness(cfg.ppo) == 2
    dumped = safe_load(dump_recipe(cfg))  # the run directory's recipe.yaml loads back as it was
    assert dumped["ppo"]["async"]["correction"] == "geo_mis"
    again = load_recipe(None, [f"{k}.async={json.dumps(dumped[k]['async'])}" for k in ("grpo", "ppo")]
                        + ["grpo.tis_cap=1.5"])
    assert getattr(again.ppo, "async") == getattr(cfg.ppo, "async")


# ------------------------------------------------------------------------------------------ staleness, stage
def test_stale_rows_are_dropped_past_the_bound():
    from posttrain.stages.rl_async import stale_rows

    keep, m = stale_rows([5, 4, 4, 2, 5], current=5, max_staleness=1)
    assert keep.tolist() == [True, True, True, False, True]
    assert m["async/dropped_stale"] == 1 and m["async/staleness_max"] == 3
    assert m["async/staleness_mean"] == pytest.approx((0 + 1 + 1 + 3 + 0) / 5)
    assert (m["async/staleness_0_share"], m["async/staleness_1_share"]) == (0.4, 0.4)


def _run(run_dir, model, *extra):
    from posttrain.pipeline import run_recipe

    cfg = load_recipe(None, [f"run_dir={run_dir}", f"model.path={model}", "stages=[grpo]", *TINY, *extra])
    info = run_recipe(cfg)["grpo"]
    lines = [json.loads(s) for s in (run_dir / "grpo" / "metrics.jsonl").read_text().splitlines()]
    return info, lines


def _weights(info):
    from safetensors.torch import load_file

    return load_file(f"{info['checkpoint']}/model.safetensors")


def _untimed(m):
    return {k: v for k, v in m.items() if not k.startswith("time")}


def test_k0_is_the_synchronous_step_and_k1_trains_on_batches_one_version_old(tiny_model_dir, tmp_path, monkeypatch,
                                                                              noisy_rewards):
    """K=0 written out is the recipe without an `async` section: the same metrics and weights, no async metrics.
    K=1: step 0's batch is the synchronous one (version 0 both ways); later rows are one version old; a row stamped
    three versions older than it is never reaches the learner (its loss mask is 0) and is counted each step."""
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    local = ["ray.backend=local", "grpo.steps=3"]
    sync_info, sync = _run(tmp_path / "sync", tiny_model_dir, *local)
    k0_info, k0 = _run(tmp_path / "k0", tiny_model_dir, *local, "grpo.async.max_staleness=0",
                       "grpo.async.correction=none")
    assert [_untimed(m) for m in k0] == [_untimed(m) for m in sync]
    assert not any(k.startswith("async/") or k == "time/rollout_wait_s" for m in sync for k in m)
    a, b = _weights(sync_info), _weights(k0_info)
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    real_generate, masks = RolloutWorker.generate, []

    @functools.wraps(real_generate)
    def one_row_stale(self, *args, **kwargs):
        batch = real_generate(self, *args, **kwargs)
        batch.versions[0] -= 3
        return batch

    real_step = LearnerWorker.step

    @functools.wraps(real_step)
    def spy(self, batch, advantages, mask=None, **kwargs):
        masks.append(mask.clone())
        return real_step(self, batch, advantages, mask, **kwargs)

    monkeypatch.setattr(RolloutWorker, "generate", one_row_stale)
    monkeypatch.setattr(LearnerWorker, "step", spy)
    _, k1 = _run(tmp_path / "k1", tiny_model_dir, *local, "grpo.async.max_staleness=1")
    rows = 3 * 2
    for m in k1:
        age = 0 if m["step"] == 0 else 1
        assert m["async/dropped_stale"] == 1 and m["async/staleness_max"] == age + 3
        assert m[f"async/staleness_{age}_share"] == pytest.approx((rows - 1) / rows)
        assert m["time/overlap_s"] == 0.0 and m["time/rollout_busy_s"] >= 0  # the local backend overlaps nothing
    assert len(masks) == 3 and all(int(mk[0].sum()) == 0 for mk in masks)
    for key in ("rollout/response_tokens", "rollout/forced_share", "rollout/accuracy"):
        assert k1[0][key] == sync[0][key]  # step 0: the same seed and weights (version 0)


def test_k1_resumes_after_a_failure_with_the_bound_kept(tiny_model_dir, tmp_path, monkeypatch, noisy_rewards):
    """A run at K=1 that fails in step 2's update resumes from the step-2 save: every step once in metrics.jsonl,
    the resumed step's batch generated anew (staleness 0), the bound kept throughout."""
    from posttrain.rlstate import latest
    from posttrain.workers.learner import LearnerWorker

    real, calls = LearnerWorker.step, [0]

    @functools.wraps(real)
    def fail_third(self, *args, **kwargs):
        calls[0] += 1
        if calls[0] == 3:
            raise RuntimeError("injected learner failure")
        return real(self, *args, **kwargs)

    args = ("ray.backend=local", "grpo.steps=4", "grpo.save_every=2", "grpo.async.max_staleness=1",
            "grpo.async.correction=tis")
    monkeypatch.setattr(LearnerWorker, "step", fail_third)
    with pytest.raises(RuntimeError, match="injected learner failure"):
        _run(tmp_path / "run", tiny_model_dir, *args)
    assert latest(tmp_path / "run" / "grpo" / "state")[1]["step"] == 2
    monkeypatch.setattr(LearnerWorker, "step", real)
    _, lines = _run(tmp_path / "run", tiny_model_dir, *args)
    assert [m["step"] for m in lines] == [0, 1, 2, 3]
    assert [m["async/staleness_max"] for m in lines] == [0, 1, 0, 1]
    assert all(m["async/dropped_stale"] == 0 and "offpolicy/mismatch_kl" in m for m in lines)


@pytest.mark.ray
def test_k1_on_ray_gives_the_local_batches(tiny_model_dir, tmp_path, ray_session):
    """On Ray actors the rollout of the next step runs while the driver scores and trains: the same batches as the
    local backend (the random tiny model earns no reward, so the weights stay and sample the same tokens), rows
    one version old, and the rollout workers' own time measured."""
    _, local = _run(tmp_path / "local", tiny_model_dir, "ray.backend=local", "grpo.steps=2",
                    "grpo.async.max_staleness=1")
    _, remote = _run(tmp_path / "ray", tiny_model_dir, "grpo.steps=2", "grpo.async.max_staleness=1")
    for a, b in zip(local, remote):
        for key in ("rollout/response_tokens", "rollout/forced_share", "reward/mean", "async/staleness_max"):
            assert a[key] == b[key], key
    assert remote[0]["time/rollout_busy_s"] > 0 and remote[0]["time/overlap_s"] >= 0


def test_overlapping_roles_asking_for_more_threads_than_cores_are_warned_about(monkeypatch):
    """At K >= 1 on CPU the rollout, reference and learner run at once: more torch threads than cores is named
    (measured 0.30x the synchronous step on 2 cores); threads that fit, K = 0, or a GPU say nothing."""
    import os

    from posttrain.recipe import load_recipe
    from posttrain.stages.rl_async import overlap_threads_warning

    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    rc = load_recipe(None, ["grpo.async.max_staleness=1", "ray.rollout.threads=2", "ray.learner.threads=2",
                            "grpo.kl_coef=0.01"])
    msg = overlap_threads_warning(rc, rc.grpo, "grpo", "cpu")
    assert msg.startswith("grpo.async.max_staleness 1: the roles that now run at once ask for ")
    assert "on 2 cores" in msg and "rollout 2" in msg and "learner 2" in msg
    assert overlap_threads_warning(rc, rc.grpo, "grpo", "cuda") is None
    fits = load_recipe(None, ["grpo.async.max_staleness=1", "ray.rollout.threads=1", "ray.learner.threads=1",
                              "grpo.kl_coef=0"])
    assert overlap_threads_warning(fits, fits.grpo, "grpo", "cpu") is None
    sync = load_recipe(None, ["ray.rollout.threads=2", "ray.learner.threads=2"])
    assert overlap_threads_warning(sync, sync.grpo, "grpo", "cpu") is None
