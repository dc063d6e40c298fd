"""`grpo` stage: GRPO (Shao et al. 2024) with per-prompt thinking budgets on the embedded arithmetic task.

Single process, no Ray yet: the `RolloutWorker` and the `Learner` live side by side, each with its own copy of
the policy, and the learner's weights are copied into the worker (`update_weights`) after every step. Per step:

    problems  <- prompts_per_step arithmetic problems (seed = seed + step), each with a budget from grpo.budgets
    rollouts  <- group_size samples per problem (budget forcing closes </think> at the budget)
    rewards   <- CombinedReward of the components for the sample's kind (budgeted: L1-Max; auto: length_group)
    A         <- group-relative advantages; groups with equal rewards dropped (DAPO's dynamic sampling)
    update    <- clipped policy loss (0.2 / 0.28, token mean) on loss_mask, optional k3 KL, grad clip, AdamW

Differences from the papers: dynamic sampling drops all-equal groups but does not sample more prompts to refill
the batch; the old policy is the rollout's own recorded `logp` (one rollout, `mini_batches` updates on it). At the
end the input and trained models are evaluated on held-out problems at `eval_budgets` without a cap (the budget is
only an instruction), and their adherence and accuracy go into the returned summary.
"""

from __future__ import annotations

import random
import time
from collections import defaultdict

import torch

from posttrain.runlog import log


def build_rewards(specs) -> dict:
    """{"budgeted": CombinedReward, "auto": CombinedReward} from the grpo.rewards components (by their `on`)."""
    from posttrain.rewards.combine import CombinedReward

    out = {}
    for kind in ("budgeted", "auto"):
        chosen = [{"name": s.name, "weight": s.weight, "params": dict(s.params), "key": s.key}
                  for s in specs if s.on in ("all", kind)]
        if chosen:
            out[kind] = CombinedReward(chosen)
    return out


def sample_step_problems(cfg, task, seed: int, step: int):
    """(problems, budgets) of one step; the budgets are int or None (auto)."""
    from posttrain.tasks.arithmetic import generate_problems

    diffs = list(range(task.min_difficulty, task.max_difficulty + 1))
    problems = generate_problems(cfg.prompts_per_step, seed + step, diffs)
    rng = random.Random(seed + step)
    budgets = [rng.choice(cfg.budgets) for _ in problems]
    return problems, [None if b == "auto" else int(b) for b in budgets]


def score(rewards: dict, batch, answers: list[int]) -> tuple[list[float], dict[str, float]]:
    """Per-row rewards from the CombinedReward of each row's kind; metrics prefixed by the kind."""
    n = len(batch)
    total = [0.0] * n
    metrics: dict[str, float] = {}
    for kind, reward in rewards.items():
        rows = [i for i in range(n) if (batch.budgets[i] is None) == (kind == "auto")]
        if not rows:
            continue
        out = reward([""] * len(rows), [batch.texts[i] for i in rows], answer=[answers[i] for i in rows],
                     budget=[batch.budgets[i] for i in rows], n_think=[batch.n_think[i] for i in rows],
                     group=[batch.group_index[i] for i in rows])
        for i, s in zip(rows, out.scores):
            total[i] = float(s)
        metrics |= {k.replace("reward/", f"reward/{kind}/", 1): v for k, v in out.metrics.items()}
    metrics["reward/mean"] = sum(total) / n
    return total, metrics


def rollout_metrics(batch, correct: list[bool]) -> dict[str, float]:
    """Accuracy, thinking tokens and adherence (closed within budget without forcing) overall and by budget."""
    by: dict[str, list[int]] = defaultdict(list)
    for i, b in enumerate(batch.budgets):
        by["auto" if b is None else str(b)].append(i)
    m = {"rollout/accuracy": sum(correct) / len(correct),
         "rollout/response_tokens": float(batch.response_mask.sum(1).float().mean()),
         "rollout/forced_share": sum(batch.forced) / len(batch)}
    adherent_all = []
    for label, rows in by.items():
        m[f"budget/{label}/accuracy"] = sum(correct[i] for i in rows) / len(rows)
        m[f"budget/{label}/think_tokens"] = sum(batch.n_think[i] for i in rows) / len(rows)
        if label != "auto":
            b = int(label)
            adh = [batch.closed[i] and not batch.forced[i] and batch.n_think[i] <= b for i in rows]
            m[f"budget/{label}/adherence"] = sum(adh) / len(adh)
            if b > 0:
                adherent_all += adh
    if adherent_all:
        m["rollout/adherence"] = sum(adherent_all) / len(adherent_all)
    return m


def evaluate(model, tok, cfg, rc) -> dict:
    """{budget: {"accuracy", "adherence", "think_tokens"}} on held-out problems, natural (no cap) mode."""
    from posttrain.eval.quick import evaluate_budgets

    if cfg.eval_n_per_difficulty == 0:
        return {}
    model.eval()
    rows = evaluate_budgets(model, tok, list(cfg.eval_budgets), cfg.eval_n_per_difficulty, rc.eval.seed,
                            list(range(rc.task.min_difficulty, rc.task.max_difficulty + 1)),
                            max_new_tokens=cfg.eval_max_new_tokens, cap=False)
    return {r["budget"]: {"accuracy": r["accuracy"], "adherence": r["adherence"],
                          "think_tokens": r["think_tokens_mean"]} for r in rows if r["difficulty"] == "all"}


def train_step(step, cfg, rc, worker, learner, rewards) -> dict[str, float]:
    """One GRPO step: rollout, reward, advantages, update, weight sync. Returns the step's metrics."""
    from posttrain.algo.advantages import dynamic_sampling_mask
    from posttrain.algo.registry import get_adv_estimator
    from posttrain.rewards.parse import grade_integer

    t0 = time.time()
    problems, budgets = sample_step_problems(cfg, rc.task, rc.seed, step)
    batch = worker.generate([p.expression for p in problems], budgets, cfg.group_size, cfg.max_new_tokens,
                            temperature=cfg.temperature, top_p=cfg.top_p, seed=rc.seed + step)
    t1 = time.time()
    answers = [problems[g].answer for g in batch.group_index]
    scores, metrics = score(rewards, batch, answers)
    correct = [grade_integer(t, a) for t, a in zip(batch.texts, answers)]
    t2 = time.time()

    r = torch.tensor(scores, dtype=torch.float32)
    groups = torch.tensor(batch.group_index)
    adv = get_adv_estimator(cfg.adv_estimator)(r, groups).to(batch.logp.device)
    mask = batch.loss_mask
    if cfg.dynamic_sampling:
        keep, ds_metrics = dynamic_sampling_mask(r, groups)
        mask = mask * keep.to(mask.device).long()[:, None]
        metrics |= ds_metrics
    metrics |= learner.step(batch, adv, mask, mini_batches=cfg.mini_batches, group_size=cfg.group_size)
    worker.update_weights(learner.named_weights())
    t3 = time.time()
    metrics |= rollout_metrics(batch, correct)
    metrics |= {"time/rollout_s": t1 - t0, "time/reward_s": t2 - t1, "time/learner_s": t3 - t2}
    return metrics


def run(ctx) -> dict:
    from posttrain.learner import Learner
    from posttrain.model import load_model, load_tokenizer, save_model
    from posttrain.workers.rollout import RolloutWorker

    cfg, rc = ctx.cfg.grpo, ctx.cfg

    def load():
        return load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                          rc.model.experts_implementation)

    tok = load_tokenizer(ctx.model_path, rc.model.trust_remote_code)
    model = load()
    before = evaluate(model, tok, cfg, rc)
    log.info("grpo: input model %s", before)
    ref = load() if cfg.kl_coef > 0 else None
    learner = Learner(model, lr=cfg.learning_rate, weight_decay=cfg.weight_decay, clip_low=cfg.clip_low,
                      clip_high=cfg.clip_high, loss_agg=cfg.loss_agg, policy_loss=cfg.policy_loss,
                      kl_coef=cfg.kl_coef, kl_kind=cfg.kl_kind, max_grad_norm=cfg.max_grad_norm, ref_model=ref)
    worker = RolloutWorker(ctx.model_path, device=ctx.device, dtype=ctx.dtype,
                           threads=torch.get_num_threads(), experts_implementation=rc.model.experts_implementation)
    rewards = build_rewards(cfg.rewards)

    history = []
    for step in range(cfg.steps):
        metrics = train_step(step, cfg, rc, worker, learner, rewards)
        ctx.metrics.log(step, metrics)
        history.append(metrics)
        log.info("grpo step %d: reward %.3f acc %.2f adherence %.2f grad %.2f (%.1fs rollout, %.1fs learner)",
                 step, metrics["reward/mean"], metrics["rollout/accuracy"], metrics.get("rollout/adherence", -1),
                 metrics.get("actor/grad_norm", 0.0), metrics["time/rollout_s"], metrics["time/learner_s"])

    model.eval()
    save_model(model, tok, ctx.stage.checkpoint)
    after = evaluate(model, tok, cfg, rc)
    log.info("grpo: trained model %s", after)
    last = history[-max(1, len(history) // 5):]
    summary = {
        "before": before,
        "after": after,
        "skipped_steps": learner.skipped_steps,
        "final_reward_mean": sum(m["reward/mean"] for m in last) / len(last),
        "final_accuracy": sum(m["rollout/accuracy"] for m in last) / len(last),
    }
    return {"checkpoint": str(ctx.stage.checkpoint), "summary": summary, "steps": cfg.steps}
