"""posttrain.algo against TRL 1.16's GRPOTrainer on the same tensors.

GRPOTrainer needs a model and a dataset, so it is not instantiated. Its per-token loss path has no standalone
function, so `_trl_loss` below is a copy of the formulas from the installed source,
``trl/trainer/grpo_trainer.py`` (TRL 1.16.0), with the line numbers cited; `test_trl_source_unchanged` fails if
those lines change in the installed TRL, so the copy cannot silently go stale. TRL's standalone helpers
(`trl.trainer.utils.nanstd`, `entropy_from_logits`) are called directly.
"""

import importlib.util
from pathlib import Path

import pytest
import torch

from posttrain.algo.advantages import compute_grpo_advantages
from posttrain.algo.kl import kl_loss
from posttrain.algo.losses import compute_policy_loss, entropy_bonus, entropy_from_logits, masked_mean, tis_weights

torch.set_num_threads(1)
trl_utils = pytest.importorskip("trl.trainer.utils")

# Exact lines of the installed trl/trainer/grpo_trainer.py that `_trl_loss` and `_trl_advantages` copy.
COPIED_LINES = {
    2662: "per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask",
    2665: "per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)",
    2765: "mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)",
    2770: "std_rewards = nanstd(rewards.view(-1, num_generations), dim=1)",
    2785: "advantages = rewards - mean_grouped_rewards",
    2787: "advantages = advantages / (std_rewards + 1e-4)",
    3083: "log_ratio = per_token_logps - old_per_token_logps",
    3087: "log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)",
    3095: "coef_1 = torch.exp(log_importance_weights)",
    3101: "torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1",
    3113: "coef_2 = torch.clamp(coef_1, 1 - self.epsilon_low, 1 + self.epsilon_high)",
    3120: "per_token_loss = -torch.min(per_token_loss1, per_token_loss2)",
    3147: 'per_token_loss = per_token_loss * inputs["importance_sampling_ratio"]',
    3150: "per_token_loss = per_token_loss + self.beta * per_token_kl",
    3154: "loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()",
    3159: "loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)",
    3164: "loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * self.max_completion_length)",
    3173: "loss = (per_token_loss * mask).sum() / normalizer",
    3274: "is_low_clipped = (coef_1 < 1 - self.epsilon_low) & (advantages < 0)",
    3275: "is_high_clipped = (coef_1 > 1 + self.epsilon_high) & (advantages > 0)",
}


def test_trl_source_unchanged():
    path = Path(importlib.util.find_spec("trl").origin).parent / "trainer" / "grpo_trainer.py"
    lines = path.read_text().splitlines()
    for lineno, text in COPIED_LINES.items():
        assert lines[lineno - 1].strip() == text, f"grpo_trainer.py:{lineno} changed; re-check the copy in this test"


def _trl_is_ratio(old_per_token_logps, sampling_per_token_logps, mask, clip_min, clip_max):
    """grpo_trainer.py L2662-2685, vllm_importance_sampling_mode="token_truncate"."""
    per_token_logps_diff = (old_per_token_logps - sampling_per_token_logps) * mask
    per_token_logps_diff = torch.nan_to_num(per_token_logps_diff, nan=0.0)
    vllm_importance_sampling_ratio = torch.exp(per_token_logps_diff)
    return torch.clamp(vllm_importance_sampling_ratio, min=clip_min, max=clip_max)


def _trl_loss(per_token_logps, old_per_token_logps, advantages, mask, *, loss_type, importance_sampling_level,
              epsilon_low, epsilon_high, beta, ref_per_token_logps=None, importance_sampling_ratio=None,
              max_completion_length=None, num_items_in_batch=None):
    """GRPOTrainer._compute_loss, grpo_trainer.py L3020-3278, for one process, no gradient accumulation
    (current_gradient_accumulation_steps = steps_per_generation = num_processes = 1), delta=None, no entropy mask,
    no off-policy mask. Returns (loss, metrics) with TRL's metric names."""
    if advantages.dim() == 1:  # L3058-3059
        advantages = advantages.unsqueeze(1)
    log_ratio = per_token_logps - old_per_token_logps  # L3083-3095
    if importance_sampling_level == "token":
        log_importance_weights = log_ratio
    else:
        log_importance_weights = (log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)
        log_importance_weights = log_importance_weights.unsqueeze(-1)
    coef_1 = torch.exp(log_importance_weights)
    if beta != 0.0:  # L3098-3102
        per_token_kl = (
            torch.exp(ref_per_token_logps - per_token_logps) - (ref_per_token_logps - per_token_logps) - 1
        )
    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)  # L3112-3120
    per_token_loss1 = coef_1 * advantages
    per_token_loss2 = coef_2 * advantages
    per_token_loss = -torch.min(per_token_loss1, per_token_loss2)
    if importance_sampling_ratio is not None:  # L3146-3147
        per_token_loss = per_token_loss * importance_sampling_ratio
    if beta != 0.0:  # L3149-3150
        per_token_loss = per_token_loss + beta * per_token_kl
    if loss_type == "grpo":  # L3153-3173
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * max_completion_length)
    elif loss_type == "dapo":
        normalizer = num_items_in_batch.clamp(min=1.0)
        loss = (per_token_loss * mask).sum() / normalizer

    def global_masked_mean(x):  # L3259-3266, without the cross-process reduce
        if x.shape[1] == 1:
            return (x.sum() / x.shape[0]).item()
        return ((x * mask).sum() / mask.sum().float().clamp(min=1.0)).item()

    metrics = {
        "clip_ratio/low_mean": global_masked_mean(((coef_1 < 1 - epsilon_low) & (advantages < 0)).float()),
        "clip_ratio/high_mean": global_masked_mean(((coef_1 > 1 + epsilon_high) & (advantages > 0)).float()),
    }
    if beta != 0.0:
        metrics["kl"] = global_masked_mean(per_token_kl)
    return loss, metrics


def _trl_advantages(rewards, num_generations, scale_rewards):
    """grpo_trainer.py L2765-2787, sum_then_normalize with one reward function."""
    mean_grouped_rewards = torch.nanmean(rewards.view(-1, num_generations), dim=1)
    mean_grouped_rewards = mean_grouped_rewards.repeat_interleave(num_generations, dim=0)
    std_rewards = trl_utils.nanstd(rewards.view(-1, num_generations), dim=1)
    std_rewards = std_rewards.repeat_interleave(num_generations, dim=0)
    advantages = rewards - mean_grouped_rewards
    if scale_rewards != "none":
        advantages = advantages / (std_rewards + 1e-4)
    return advantages


# TRL loss_type -> our (agg, extra kwargs)
AGG = {"grpo": "seq_mean_token_mean", "bnpo": "token_mean", "dr_grpo": "seq_mean_token_sum_norm", "dapo": "token_mean"}


def _inputs(seed, b=6, t=9, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    logp = -torch.rand(b, t, generator=g, dtype=dtype) * 3
    old = logp + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)
    ref = logp + 0.3 * torch.randn(b, t, generator=g, dtype=dtype)
    sampling = old + 0.5 * torch.randn(b, t, generator=g, dtype=dtype)
    sampling[0, 1] = float("nan")  # vLLM sometimes has no log-prob for a token
    rewards = torch.randint(0, 3, (b,), generator=g).to(dtype)
    lengths = torch.randint(1, t + 1, (b,), generator=g)
    mask = (torch.arange(t)[None] < lengths[:, None]).to(dtype)
    return logp, old, ref, sampling, rewards, mask


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
@pytest.mark.parametrize("level", ["token", "sequence"])
@pytest.mark.parametrize("eps", [(0.2, 0.2), (0.2, 0.28)])
@pytest.mark.parametrize("beta", [0.0, 0.04])
@pytest.mark.parametrize("vllm_is", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_loss_and_grad_match_trl(loss_type, level, eps, beta, vllm_is, seed):
    logp0, old, ref, sampling, rewards, mask = _inputs(seed)
    t = mask.shape[1]
    adv = _trl_advantages(rewards, 3, "group")
    is_ratio = _trl_is_ratio(old, sampling, mask, None, 2.0) if vllm_is else None
    max_len = t + 2
    n_items = mask.sum()

    trl_logp = logp0.clone().requires_grad_(True)
    want, trl_metrics = _trl_loss(trl_logp, old, adv, mask, loss_type=loss_type, importance_sampling_level=level,
                                  epsilon_low=eps[0], epsilon_high=eps[1], beta=beta, ref_per_token_logps=ref,
                                  importance_sampling_ratio=is_ratio, max_completion_length=max_len,
                                  num_items_in_batch=n_items)
    want.backward()

    ours_logp = logp0.clone().requires_grad_(True)
    kw = dict(agg=AGG[loss_type], max_len=max_len, num_tokens=n_items if loss_type == "dapo" else None)
    weights = tis_weights(sampling, old, mask, 2.0)[0] if vllm_is else None
    if vllm_is:
        assert torch.equal(weights, is_ratio)
    got, metrics = compute_policy_loss(ours_logp, old, adv, mask, clip_low=eps[0], clip_high=eps[1], level=level,
                                       is_weights=weights, **kw)
    if beta:
        kl, kl_metrics = kl_loss(ours_logp, ref, mask, kind="k3", **kw)
        got = got + beta * kl
        assert kl_metrics["actor/kl_loss"] == pytest.approx(trl_metrics["kl"], rel=1e-12)
    got.backward()

    assert got.item() == pytest.approx(want.item(), rel=1e-12, abs=1e-14)
    torch.testing.assert_close(ours_logp.grad, trl_logp.grad, rtol=1e-10, atol=1e-14)
    if level == "token":  # at sequence level TRL averages the clip indicator per sequence, we per token
        assert metrics["actor/clipfrac_low"] == pytest.approx(trl_metrics["clip_ratio/low_mean"])
        assert metrics["actor/clipfrac_high"] == pytest.approx(trl_metrics["clip_ratio/high_mean"])


def test_dapo_micro_batches_sum_to_trl_batch_loss():
    logp, old, _, _, rewards, mask = _inputs(3, b=8)
    adv = _trl_advantages(rewards, 4, "group")
    want, _ = _trl_loss(logp, old, adv, mask, loss_type="dapo", importance_sampling_level="token", epsilon_low=0.2,
                        epsilon_high=0.28, beta=0.0, num_items_in_batch=mask.sum())
    parts = [compute_policy_loss(logp[s], old[s], adv[s], mask[s], clip_high=0.28, num_tokens=mask.sum())[0]
             for s in (slice(0, 3), slice(3, 8))]
    assert sum(parts).item() == pytest.approx(want.item(), rel=1e-12)
    # and a plain per-micro-batch token mean would not
    naive = sum(compute_policy_loss(logp[s], old[s], adv[s], mask[s], clip_high=0.28)[0] for s in (slice(0, 3),
                                                                                                     slice(3, 8)))
    assert naive.item() != pytest.approx(want.item(), rel=1e-6)


@pytest.mark.parametrize("scale_rewards", ["group", "none"])
@pytest.mark.parametrize("seed,groups,size", [(0, 1, 2), (1, 3, 4), (2, 5, 8)])
def test_advantages_match_trl(scale_rewards, seed, groups, size):
    g = torch.Generator().manual_seed(seed)
    rewards = torch.randint(0, 4, (groups * size,), generator=g).float() / 3
    want = _trl_advantages(rewards, size, scale_rewards)
    got = compute_grpo_advantages(rewards, group_size=size, norm_by_std=scale_rewards == "group", eps=1e-4)
    torch.testing.assert_close(got, want)


def test_entropy_matches_trl():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 17, generator=g) * 3
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    trl_ent = trl_utils.entropy_from_logits(logits)
    torch.testing.assert_close(entropy_from_logits(logits), trl_ent)
    want = ((trl_ent * mask).sum() / mask.sum()).item()  # TRL's "entropy" metric, L3270 (global_masked_mean, L3259)
    assert entropy_bonus(logits, mask)[1]["actor/entropy"] == pytest.approx(want, rel=1e-6)
    assert float(masked_mean(trl_ent, mask)) == pytest.approx(want, rel=1e-6)
