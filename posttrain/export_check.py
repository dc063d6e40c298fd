"""The check an extracted adapter must pass (`posttrain.export`): loaded as a user loads it (plain
`PeftModel.from_pretrained` on a fresh copy of the base checkpoint), its mean per-token KL to the fine-tuned model on
held-out chat prompts with the fine-tuned model's own greedy answers; and the message that says, naming the recipe
keys, why an adapter over `export.max_kl` is lossy and what to do."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.no_grad()
def mean_token_kl(p_model, q_model, input_ids: torch.Tensor, mask: torch.Tensor) -> float:
    """Mean over masked positions of KL(p || q) between next-token distributions. input_ids/mask (B, T)."""
    lp = torch.log_softmax(p_model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
    lq = torch.log_softmax(q_model(input_ids=input_ids, attention_mask=mask).logits.float(), -1)
    kl = (lp.exp() * (lp - lq)).sum(-1)
    return float((kl * mask).sum() / mask.sum())


def check_reloaded(adapter_dir: Path, base: Path, tuned_model, ids, mask, load: dict) -> tuple[float, float]:
    """(KL(tuned || base + adapter), KL(tuned || base)) with the adapter in `adapter_dir` loaded as a user loads it:
    plain `PeftModel.from_pretrained` on a fresh copy of the base checkpoint, no posttrain code in between."""
    from peft import PeftModel

    from posttrain.model import load_model

    base_model = load_model(base, **load).eval()
    kl_base = mean_token_kl(tuned_model, base_model, ids, mask)
    adapted = PeftModel.from_pretrained(base_model, adapter_dir).eval()
    return mean_token_kl(tuned_model, adapted, ids, mask), kl_base


def lossy_message(report: dict, max_kl: float) -> str:
    """Why the adapter is lossy and what to do, naming the recipe keys."""
    fix = []
    if report.get("uncovered_changed_params"):
        fix.append(f"Training changed {len(report['uncovered_changed_params'])} tensors the adapter does not carry "
                   f"(e.g. {', '.join(list(report['uncovered_changed_params'])[:3])}): name their modules in "
                   "export.modules_to_save (stored whole), or matrices in export.target_modules / "
                   "export.target_parameters")
    if report["max_relative_frobenius_error"] > 1e-3:
        fix.append(f"The rank-{report['rank']} factors leave a relative error up to "
                   f"{report['max_relative_frobenius_error']:.3g}: raise export.rank")
    return (f"the exported adapter, loaded in plain PEFT, is measurably worse than the trained model: "
            f"KL(trained || base + adapter) {report['kl_tuned_vs_adapted']:.4g} nats/token on held-out prompts "
            f"exceeds export.max_kl {max_kl:g} (without the adapter: {report['kl_tuned_vs_base']:.4g}). "
            + ("; ".join(fix) + ". " if fix else "")
            + "To ship it anyway set export.allow_lossy: true (posttrain export --allow-lossy) or raise "
            "export.max_kl (--max-kl); export.merged: true (posttrain export --merged) writes the trained model whole")


def heldout_batch(tokenizer, tuned_model, n: int = 32, seed: int = 4242, prompts: list[str] | None = None):
    """Held-out chat prompts (autonomous and budgeted) with the fine-tuned model's own greedy responses: the first
    `n` of `prompts` (the export stage gives its task's held-out problems), else `n` embedded-task problems."""
    from posttrain.generate import generate, render_prompts
    from posttrain.tasks.arithmetic import generate_problems

    problems = list(prompts)[:n] if prompts else [p.expression for p in generate_problems(n, seed)]
    n = len(problems)
    budgets = [None if i % 2 else 32 for i in range(n)]
    responses = generate(tuned_model, tokenizer, problems, budgets, max_new_tokens=64)
    texts = [p + r.text for p, r in zip(render_prompts(tokenizer, problems, budgets), responses)]
    side, tokenizer.padding_side = tokenizer.padding_side, "right"
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    tokenizer.padding_side = side
    return enc["input_ids"], enc["attention_mask"]
