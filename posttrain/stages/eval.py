"""`eval` stage: the quick table of accuracy by difficulty, with no thinking (budget 0) and autonomous thinking.

Uses the last model-producing stage's checkpoint and held-out problems: the embedded task's (their own seed), or
with a data file the rows the RL stages hold out (`rl_problems.evaluation_rows`). Full budget sweeps with
confidence intervals, capped accuracy and plots are `posttrain sweep`'s job.
"""

from __future__ import annotations

from posttrain.runlog import log, write_json_atomic


def run(ctx) -> dict:
    from posttrain.eval.quick import evaluate_budgets, format_table
    from posttrain.model import check_chat_template, load_model, load_tokenizer

    cfg, rc = ctx.cfg.eval, ctx.cfg
    tok = load_tokenizer(ctx.model_path, rc.model.trust_remote_code)
    check_chat_template(tok, ctx.model_path)
    model = load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                       rc.model.experts_implementation)
    diffs = list(range(rc.task.min_difficulty, rc.task.max_difficulty + 1))
    from posttrain.stages.rl_problems import stage_problems

    problems = stage_problems(rc, cfg.n_per_difficulty, cfg.seed)  # with a data file: rows no stage trains on
    rows = evaluate_budgets(model, tok, list(cfg.budgets), cfg.n_per_difficulty, cfg.seed, diffs,
                            cfg.max_new_tokens, cfg.batch_size, problems=problems, grader=rc.data.grader_name)
    for r in rows:
        r["model"] = str(ctx.model_path)
    write_json_atomic(ctx.stage.path / "eval.json", rows)
    table = format_table(rows)
    (ctx.stage.path / "table.txt").write_text(table + "\n")
    for r in rows:
        if r["difficulty"] == "all":
            ctx.metrics.log(0, {f"eval/accuracy/budget_{r['budget']}": r["accuracy"],
                                f"eval/think_tokens/budget_{r['budget']}": r["think_tokens_mean"]})
    log.info("eval: %s\n%s", ctx.model_path, table)
    return {"rows": len(rows), "table": table, "produces_model": False}
