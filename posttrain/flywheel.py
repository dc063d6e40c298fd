"""A later flywheel round's SFT data: the previous round's model answers fresh training problems under the SFT
stage's budget mix, and the answers the task's grader (and optionally the GenRM) accept become demonstrations.

Rejection-sampling fine-tuning, as in STaR (Zelikman et al., 2022, "Bootstrapping Reasoning With Reasoning"), RFT
(Yuan et al., 2023, "Scaling Relationship on Learning Mathematical Reasoning with LLMs") and the rounds of Llama 2/3
post-training, with a thinking budget: a budgeted sample is kept only when it is correct *and* closed `</think>` by
itself within its budget (`budgets.adherent`), so the round's model imitates its own budget-keeping successes, never
its overruns. Each kept sample is the exact token sequence the model sampled after the prompt as the decoder renders
it (on-policy tokens, EOS included). At most `keep_per_prompt` samples per problem, so easy problems do not crowd out
the rest. Fresh demonstrations of the task (drawn as round 1's are) are mixed in at `flywheel.demo_share`.

`sample_round_data` writes its samples and verdicts to `out` (atomic JSON, keyed by the sampling model and the
settings): a round's sft killed while training reuses them instead of sampling again.
"""

from __future__ import annotations

import random
from collections import Counter, defaultdict
from pathlib import Path

from posttrain.runlog import log

GEN_BATCH_SIZE = 64


def plan(problems: list, budgets: list, mix, samples_per_prompt: int, seed: int) -> list[tuple[int, int | None]]:
    """(problem index, budget) per sample: a mode drawn from `mix` per problem (budget 0, None: autonomous, or one
    drawn from `budgets`), the same for its `samples_per_prompt` samples."""
    from posttrain.budgets import draw_budget
    from posttrain.sft_data import sample_mode

    rng = random.Random(seed)
    out = []
    for i, _ in enumerate(problems):
        mode = sample_mode(rng, mix)
        budget = 0 if mode == "zero" else None if mode == "autonomous" else draw_budget(rng, budgets)
        out += [(i, budget)] * samples_per_prompt
    return out


def mode_of(budget: int | None) -> str:
    """The SFT mode of a sample's budget: None autonomous, 0 zero, any other budgeted."""
    return "autonomous" if budget is None else "zero" if budget == 0 else "budgeted"


def verdicts(samples: list[dict], keep_per_prompt: int) -> None:
    """Mark each sample's `kept` (in place): accepted by the grader (`correct`), within its budget when it has one
    (`adherent`), by the GenRM when it was asked (`genrm_ok`), and among the first `keep_per_prompt` such samples of
    its problem."""
    taken: Counter = Counter()
    for s in samples:
        ok = s["correct"] and s["adherent"] and s.get("genrm_ok", True)
        s["kept"] = bool(ok and taken[s["problem_id"]] < keep_per_prompt)
        taken[s["problem_id"]] += s["kept"]


def report_of(samples: list[dict]) -> dict:
    """Counts by mode (budgeted, autonomous, zero) and acceptance by difficulty: what the round's summary shows."""
    by_mode: dict = defaultdict(Counter)
    by_diff: dict = defaultdict(Counter)
    for s in samples:
        for c in (by_mode[mode_of(s["budget"])], by_diff[s["difficulty"]]):
            c["samples"] += 1
            c["correct"] += s["correct"]
            c["adherent"] += s["adherent"]
            c["rejected_by_genrm"] += s["correct"] and s["adherent"] and not s.get("genrm_ok", True)
            c["kept"] += s["kept"]
    return {"samples": len(samples), "kept": sum(s["kept"] for s in samples),
            "problems_kept": len({s["problem_id"] for s in samples if s["kept"]}),
            "by_mode": {k: dict(v) for k, v in sorted(by_mode.items())},
            "kept_share_by_difficulty": {str(d): v["kept"] / v["samples"] for d, v in sorted(by_diff.items())}}


def sample_round_data(model, tok, problems: list, fw, sft_cfg, seed: int, grader: str, genrm_path: Path | None,
                      out: Path, key: dict) -> list[dict]:
    """The previous round's `model` samples `problems` under `sft_cfg`'s budgets and mix (`fw`: the recipe's
    flywheel section); each sample graded, checked against its budget and, with `genrm_path`, scored by that
    GenRM. Returns the samples with `ids` (completion token ids) and `kept`; reused from `out` when it holds the
    same `key`."""
    from posttrain.budgets import adherent
    from posttrain.generate import generate
    from posttrain.rewards.verifiable import judge
    from posttrain.runlog import read_json, write_json_atomic

    if out.is_file():
        saved = read_json(out, "the flywheel samples of an earlier attempt")
        if saved.get("key") == key:
            log.info("sft: reusing the %d flywheel samples in %s", len(saved["samples"]), out)
            return saved["samples"]
    pairs = plan(problems, sft_cfg.budgets, sft_cfg.mix, fw.samples_per_prompt, seed)
    prompts = [problems[i].expression for i, _ in pairs]
    budgets = [b for _, b in pairs]
    responses = generate(model, tok, prompts, budgets, fw.max_new_tokens, GEN_BATCH_SIZE, cap=False, do_sample=True,
                         temperature=fw.temperature, seed=seed)
    samples = []
    for (i, b), r in zip(pairs, responses):
        p = problems[i]
        samples.append({"problem_id": i, "problem": p.expression, "answer": p.answer, "difficulty": p.difficulty,
                        "budget": b, "response": r.text, "ids": list(r.ids), "n_think": r.n_think,
                        "correct": bool(judge(grader, r.text, p.answer, getattr(p, "tests", None))),
                        "adherent": bool(r.closed) if b is None else adherent(r.closed, r.forced, r.n_think, b)})
    if genrm_path is not None:
        from posttrain.rewards import build_reward

        scored = [s for s in samples if s["correct"] and s["adherent"]]
        p_yes = build_reward("genrm", path=str(genrm_path))([s["problem"] for s in scored],
                                                            [s["response"] for s in scored]).scores
        for s, v in zip(scored, p_yes):
            s.update(p_yes=float(v), genrm_ok=bool(v >= fw.genrm_threshold))
    verdicts(samples, fw.keep_per_prompt)
    write_json_atomic(out, {"key": key, "samples": samples})
    return samples


def sample_rows(tok, samples: list[dict], max_length: int) -> list[dict]:
    """SFT rows (`input_ids`, `completion_mask`, `mode`, `budget`, `n_think`) of the kept samples: the prompt as the
    decoder rendered it, then the sampled completion ids, the loss on the completion only. Longer than `max_length`
    tokens: left out."""
    from posttrain.decode import render_prompts

    kept = [s for s in samples if s["kept"]]
    if not kept:
        return []
    texts = render_prompts(tok, [s["problem"] for s in kept], [s["budget"] for s in kept])
    rows = []
    for s, prompt in zip(kept, tok(texts, add_special_tokens=False)["input_ids"]):
        if len(prompt) + len(s["ids"]) > max_length:
            continue
        b = s["budget"]
        rows.append({"input_ids": prompt + s["ids"], "completion_mask": [0] * len(prompt) + [1] * len(s["ids"]),
                     "mode": mode_of(b), "budget": -1 if b is None else b, "n_think": s["n_think"],
                     "source": "sampled"})
    return rows


def demo_count(n_sampled: int, demo_share: float) -> int:
    """Demonstrations to mix with `n_sampled` sampled rows so that they make `demo_share` of the whole.

    >>> demo_count(600, 0.5), demo_count(600, 0.25), demo_count(600, 0.0)
    (600, 200, 0)
    """
    return round(n_sampled * demo_share / (1 - demo_share))
