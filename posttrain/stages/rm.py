"""`rm` stage: reward models from the policy's own samples.

1. Sample `rm.samples_per_prompt` responses for each of `rm.n_prompts` problems (fresh arithmetic ones, or rows of
   the data file no RL stage holds out: `rm_problems`) from the stage's input checkpoint (the SFT model), budgets
   cycled from `rm.budgets`, at `rm.temperature`; label each with the registered `rm.label_reward` (by default
   `exact_int` on the embedded task, `math` equivalence on a file; score >= 0.5 = correct); split by *problem* into
   train / holdout; balance the train classes by downsampling. Everything lands in ``samples.jsonl``.
2. GenRM (Zhang et al. 2024; format and scoring in `posttrain.verifier`): the SFT model fine-tuned with TRL's
   SFTTrainer to answer Yes/No, loss on the answer token and EOS only. Saved to ``genrm/``.
3. Optionally (`rm.scalar.enabled`) a scalar Bradley-Terry RM with TRL's RewardTrainer on (correct, incorrect)
   response pairs of the same problem, a sequence-classification head on the SFT model. Saved to ``scalar/``.

Both are evaluated on the held-out problems' samples (natural class balance): accuracy at threshold 0.5 (GenRM)
or pairwise accuracy (scalar), and ROC AUC; ``rm_report.json`` has everything. The stage returns no
"checkpoint": the policy of later stages stays the SFT model.
"""

from __future__ import annotations

import random
import shutil
from collections import defaultdict

import torch

from posttrain.budgets import entry_budget
from posttrain.runlog import log, write_json_atomic

# Problem seed offset: SFT's examples use seed+1 and its mode sampling seed+2; eval uses its own fixed seed.
RM_SEED_OFFSET = 7
GEN_BATCH_SIZE = 64


def _metrics_callback(metrics, prefix: str):
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                scalars = {f"{prefix}/{k}": v for k, v in logs.items() if isinstance(v, (int, float))}
                metrics.log(state.global_step, scalars)

    return JsonlMetrics()


def rm_problems(rc, seed: int) -> list:
    """`rm.n_prompts` problems to sample, from the recipe's task (`Task.rm_problems`): fresh ones of the embedded
    task, or rows no RL stage holds out for evaluation, first those the SFT stage does not train on, so that the
    samples' labels are not those of memorised answers where the rows allow."""
    from posttrain.tasks.task import build_task

    return build_task(rc).rm_problems(rc.rm.n_prompts, seed)


def _tests_field(problems: list) -> dict:
    """``{"tests": [...]}`` for problems that carry tests (`data.tests_column`, read by the `code` reward)."""
    tests = [getattr(p, "tests", None) for p in problems]
    return {"tests": tests} if any(t is not None for t in tests) else {}


def check_labeller(problems: list, label_reward: str) -> None:
    """Before any sampling: `label_reward` grades each problem's own answer (after `</think>`). A labeller that
    cannot read the data's answers (`exact_int` on `\\frac{1}{2}`), or that rejects half the gold answers or more,
    is an error naming the key; one that rejects more than a tenth is warned about."""
    from posttrain.rewards import build_reward
    from posttrain.tokenizer import THINK_END

    n = len(problems)
    try:
        out = build_reward(label_reward)([p.expression for p in problems],
                                         [f"{THINK_END}\n\n{p.answer}" for p in problems],
                                         answer=[p.answer for p in problems], budget=[None] * n, n_think=[0] * n,
                                         closed=[True] * n, difficulty=[p.difficulty for p in problems],
                                         **_tests_field(problems))
    except Exception as e:  # noqa: BLE001 - any labeller failure is the recipe's to fix
        raise ValueError(f"rm.label_reward: `{label_reward}` cannot grade a response against this data's answer "
                         f"({type(e).__name__}: {e}); it needs a reward that reads the answer alone: `exact_int` for "
                         "integers, `math` otherwise") from None
    right = sum(float(x) >= 0.5 for x in out.scores)
    if right < 0.5 * n:
        raise ValueError(f"rm.label_reward: `{label_reward}` counts only {right} of {n} gold answers of this data as "
                         "correct (each problem's own answer after </think>), so it would mislabel the samples; use "
                         "`math` for answers that are not integers")
    if right < 0.9 * n:
        log.warning("rm: rm.label_reward `%s` counts only %d of %d gold answers as correct; its labels may be wrong",
                    label_reward, right, n)


def sample_responses(model, tok, cfg, problems: list, seed: int, label_reward: str) -> list[dict]:
    """`cfg.samples_per_prompt` labelled responses per problem (anything with `expression`, `answer` and
    `difficulty`): one record per response, labelled by the registered reward `label_reward`."""
    from posttrain.generate import generate
    from posttrain.rewards import build_reward

    rng = random.Random(seed)
    recs = []
    for i, p in enumerate(problems):
        for j in range(cfg.samples_per_prompt):
            k = i * cfg.samples_per_prompt + j
            recs.append({"problem_id": i, "problem": p.expression, "answer": p.answer, "difficulty": p.difficulty,
                         "budget": entry_budget(rng, cfg.budgets[k % len(cfg.budgets)])})
    responses = generate(model, tok, [r["problem"] for r in recs], [r["budget"] for r in recs], cfg.max_new_tokens,
                         GEN_BATCH_SIZE, cap=False, do_sample=True, temperature=cfg.temperature, seed=seed)
    for r, resp in zip(recs, responses):
        r.update(response=resp.text, n_think=resp.n_think, closed=resp.closed)
    labeller = build_reward(label_reward)
    out = labeller([r["problem"] for r in recs], [r["response"] for r in recs], answer=[r["answer"] for r in recs],
                   budget=[r["budget"] for r in recs], n_think=[r["n_think"] for r in recs],
                   closed=[r["closed"] for r in recs], difficulty=[r["difficulty"] for r in recs],
                   **_tests_field([problems[r["problem_id"]] for r in recs]))
    for r, s in zip(recs, out.scores):
        r.update(label_score=float(s), correct=bool(s >= 0.5))
    return recs


def split_and_balance(recs: list[dict], holdout_fraction: float, balance: bool, seed: int) -> None:
    """Mark each record's `split` ("train"/"holdout", by problem) and `in_train` (after class balancing)."""
    rng = random.Random(seed)
    ids = sorted({r["problem_id"] for r in recs})
    rng.shuffle(ids)
    n_hold = min(len(ids) - 1, max(1, round(holdout_fraction * len(ids))))
    held = set(ids[:n_hold])
    for r in recs:
        r["split"] = "holdout" if r["problem_id"] in held else "train"
        r["in_train"] = r["split"] == "train"
    if not balance:
        return
    train = [r for r in recs if r["in_train"]]
    pos = [r for r in train if r["correct"]]
    neg = [r for r in train if not r["correct"]]
    larger, n_keep = (pos, len(neg)) if len(pos) > len(neg) else (neg, len(pos))
    if n_keep == 0:
        log.warning("rm: every training sample is %s; cannot balance", "correct" if pos else "incorrect")
        return
    for r in rng.sample(larger, len(larger) - n_keep):
        r["in_train"] = False


def _write_jsonl(path, rows: list[dict]) -> None:
    import json

    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def train_genrm(ctx, tok, train: list[dict], holdout: list[dict]) -> dict:
    """Fine-tune the SFT model into a Yes/No verifier; returns its held-out metrics."""
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from posttrain import verifier
    from posttrain.model import load_model, save_model

    cfg, rc = ctx.cfg.rm.genrm, ctx.cfg
    model = load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                       rc.model.experts_implementation)
    rows = [verifier.tokenize_example(tok, r["problem"], r["response"], r["correct"]) for r in train]
    max_len = max(len(r["input_ids"]) for r in rows)
    out = ctx.stage.path / "genrm_trainer"
    args = SFTConfig(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, cfg.steps // 20),
        weight_decay=0.0, logging_steps=max(1, cfg.steps // 10), save_strategy="no", report_to="none",
        seed=rc.seed, data_seed=rc.seed, max_length=max_len, completion_only_loss=True,
        train_sampling_strategy="group_by_length",  # verifier prompts vary 3x in length: pad less
        bf16=ctx.dtype == torch.bfloat16, use_cpu=ctx.device.type == "cpu", dataloader_num_workers=0,
        activation_checkpointing=False, disable_tqdm=True,
    )
    trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                         callbacks=[_metrics_callback(ctx.metrics, "genrm/train")])
    result = trainer.train()
    model = trainer.model.eval()
    path = save_model(model, tok, ctx.stage.path / "genrm")
    shutil.rmtree(out, ignore_errors=True)
    scores = verifier.score(model, tok, [r["problem"] for r in holdout], [r["response"] for r in holdout],
                            batch_size=GEN_BATCH_SIZE)
    for r, s in zip(holdout, scores):
        r["genrm_score"] = s
    labels = [r["correct"] for r in holdout]
    graded = len({r["difficulty"] for r in holdout}) > 1
    return {"path": str(path), "train_loss": result.training_loss, "train_examples": len(rows),
            "auc": verifier.roc_auc(scores, labels), "accuracy": verifier.accuracy(scores, labels),
            # what a verifier that only knew "longer problems fail more" would get: the bar to clear
            # None when every problem has the same difficulty (a data file without a difficulty column)
            "difficulty_baseline_auc": (verifier.roc_auc([-r["difficulty"] for r in holdout], labels)
                                        if graded else None),
            "within_difficulty_auc": (verifier.within_group_auc(scores, labels, [r["difficulty"] for r in holdout])
                                      if graded else None),
            "pairwise_accuracy": pairwise_accuracy(preference_pairs(holdout, ctx.cfg.seed), "genrm_score")}


def preference_pairs(recs: list[dict], seed: int) -> list[tuple[dict, dict]]:
    """Every (correct, incorrect) pair of responses to the same problem, shuffled."""
    by_problem = defaultdict(list)
    for r in recs:
        by_problem[r["problem_id"]].append(r)
    pairs = [(c, w) for group in by_problem.values() for c in group if c["correct"]
             for w in group if not w["correct"]]
    random.Random(seed).shuffle(pairs)
    return pairs


def pairwise_accuracy(pairs: list[tuple[dict, dict]], key: str) -> float:
    """Share of (correct, incorrect) pairs of the same problem where the correct one scores strictly higher."""
    return sum(c[key] > w[key] for c, w in pairs) / len(pairs) if pairs else float("nan")


def train_scalar(ctx, tok, train: list[dict], holdout: list[dict]) -> dict:
    """Bradley-Terry RM (TRL RewardTrainer) on correct-vs-incorrect pairs; returns its held-out metrics."""
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from posttrain import verifier
    from posttrain.model import load_model, save_model
    from posttrain.verifier import conversation_ids, scalar_scores

    cfg, rc = ctx.cfg.rm.scalar, ctx.cfg
    pairs = preference_pairs(train, rc.seed)
    if not pairs:
        log.warning("rm: no problem has both a correct and an incorrect training response; skipping the scalar RM")
        return {"skipped": "no preference pairs"}
    model = load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                       rc.model.experts_implementation, auto_class=AutoModelForSequenceClassification, num_labels=1)
    model.config.pad_token_id = tok.pad_token_id
    rows = [{"chosen_ids": conversation_ids(tok, c["problem"], c["response"]),
             "rejected_ids": conversation_ids(tok, w["problem"], w["response"])} for c, w in pairs]
    out = ctx.stage.path / "scalar_trainer"
    args = RewardConfig(
        output_dir=str(out), max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, cfg.steps // 20),
        logging_steps=max(1, cfg.steps // 10), save_strategy="no", report_to="none", seed=rc.seed,
        data_seed=rc.seed, max_length=None, bf16=ctx.dtype == torch.bfloat16, use_cpu=ctx.device.type == "cpu",
        dataloader_num_workers=0, activation_checkpointing=False, disable_tqdm=True,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tok,
                            callbacks=[_metrics_callback(ctx.metrics, "scalar/train")])
    result = trainer.train()
    model = trainer.model.eval()
    saved = save_model(model, tok, ctx.stage.path / "scalar")
    shutil.rmtree(out, ignore_errors=True)
    scores = scalar_scores(model, tok, holdout, GEN_BATCH_SIZE)
    for r, s in zip(holdout, scores):
        r["scalar_score"] = s
    hold_pairs = preference_pairs(holdout, rc.seed)
    return {"path": str(saved), "train_loss": result.training_loss, "train_pairs": len(rows),
            "holdout_pairs": len(hold_pairs), "pairwise_accuracy": pairwise_accuracy(hold_pairs, "scalar_score"),
            "auc": verifier.roc_auc(scores, [r["correct"] for r in holdout])}


def _rate(recs: list[dict]) -> float:
    return sum(r["correct"] for r in recs) / len(recs) if recs else float("nan")


def run(ctx) -> dict:
    from posttrain.model import check_chat_template, load_model, load_tokenizer

    cfg, rc = ctx.cfg.rm, ctx.cfg
    seed = rc.seed + RM_SEED_OFFSET
    tok = load_tokenizer(ctx.model_path, rc.model.trust_remote_code)
    check_chat_template(tok, ctx.model_path)
    label_reward = cfg.label_reward  # resolved from data.source when the recipe loads (RecipeConfig)
    problems = rm_problems(rc, seed)
    check_labeller(problems, label_reward)  # before the model loads: a labeller that cannot read the data stops here
    policy = load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                        rc.model.experts_implementation)
    recs = sample_responses(policy, tok, cfg, problems, seed, label_reward)
    del policy
    split_and_balance(recs, cfg.holdout_fraction, cfg.balance, seed)
    train = [r for r in recs if r["in_train"]]
    holdout = [r for r in recs if r["split"] == "holdout"]
    report = {"model": str(ctx.model_path), "label_reward": label_reward, "samples": len(recs),
              "sample_accuracy": _rate(recs),
              "train_samples": len(train), "train_positive_rate": _rate(train),
              "holdout_samples": len(holdout), "holdout_positive_rate": _rate(holdout)}
    log.info("rm: %d samples (%.1f%% correct); %d train (after balancing), %d held out", len(recs),
             100 * report["sample_accuracy"], len(train), len(holdout))
    if not train:
        raise ValueError("rm: no training samples (raise rm.n_prompts or lower rm.holdout_fraction)")
    info: dict = {}
    if cfg.genrm.enabled:
        report["genrm"] = train_genrm(ctx, tok, train, holdout)
        info.update(genrm=report["genrm"]["path"], genrm_auc=report["genrm"]["auc"],
                    genrm_accuracy=report["genrm"]["accuracy"])
        ctx.metrics.log(cfg.genrm.steps, {k: v for k, v in (
            ("rm/genrm/auc", report["genrm"]["auc"]), ("rm/genrm/accuracy", report["genrm"]["accuracy"]),
            ("rm/genrm/within_difficulty_auc", report["genrm"]["within_difficulty_auc"])) if v is not None})
    if cfg.scalar.enabled:
        # pairs are balanced by construction: use every train-split sample, not only the downsampled ones
        report["scalar"] = train_scalar(ctx, tok, [r for r in recs if r["split"] == "train"], holdout)
        if "path" in report["scalar"]:
            info.update(scalar=report["scalar"]["path"], scalar_auc=report["scalar"]["auc"],
                        scalar_pairwise_accuracy=report["scalar"]["pairwise_accuracy"])
            ctx.metrics.log(cfg.scalar.steps, {"rm/scalar/auc": report["scalar"]["auc"],
                                               "rm/scalar/pairwise_accuracy": report["scalar"]["pairwise_accuracy"]})
    _write_jsonl(ctx.stage.path / "samples.jsonl", recs)
    write_json_atomic(ctx.stage.path / "rm_report.json", report)
    ctx.metrics.log(0, {"rm/sample_accuracy": report["sample_accuracy"],
                        "rm/holdout_positive_rate": report["holdout_positive_rate"]})
    info["summary"] = summarize(report)
    log.info("rm:\n%s", info["summary"])
    return {**info, "report": str(ctx.stage.path / "rm_report.json"), "produces_model": False}


def summarize(report: dict) -> str:
    lines = [f"samples {report['samples']} ({100 * report['sample_accuracy']:.1f}% correct), "
             f"held out {report['holdout_samples']} ({100 * report['holdout_positive_rate']:.1f}% correct)"]
    if "genrm" in report:
        g = report["genrm"]
        by_difficulty = (f" (difficulty alone {g['difficulty_baseline_auc']:.3f}, within difficulty "
                         f"{g['within_difficulty_auc']:.3f})" if g["difficulty_baseline_auc"] is not None else "")
        lines.append(f"genrm   held-out AUC {g['auc']:.3f}{by_difficulty}  accuracy@0.5 {g['accuracy']:.3f}  "
                     f"pairwise accuracy {g['pairwise_accuracy']:.3f}  -> {g['path']}")
    if "scalar" in report and "path" in report["scalar"]:
        s = report["scalar"]
        lines.append(f"scalar  held-out AUC {s['auc']:.3f}  pairwise accuracy {s['pairwise_accuracy']:.3f}"
                     f" ({s['holdout_pairs']} pairs)  -> {s['path']}")
    return "\n".join(lines)
