"""`posttrain bench`'s scaling table (issue #27 item 3): our GRPO step and TRL's at growing prompts per step and
response lengths, on the same model in the same run, so that the cost growth of each is visible.

The points are (prompts per step, max new tokens): prompts 8 -> 64 at 128 tokens, and 64 -> 512 tokens at 16
prompts, by default; group size, mini-batches, optimizer and KL stay the recipe's. They run on a random-init model
of the checkpoint's shape (`random_like`: its config, fresh weights, its tokenizer): a trained model
ends most answers in a few dozen tokens whatever the limit, so only an untrained one (which seldom samples EOS)
makes the response-length axis mean anything. Each point times `steps` steps after `warmup` on each side (ours:
`bench.bench_ours`, Ray actors as the recipe sets them; TRL: `bench_trl.bench_trl` at the bench's thread count),
records the mean response length each side generated, and `plot_grid` draws both sides' seconds per step against
prompts and against length (log-log) into a PNG.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

DEFAULT_POINTS = ((8, 128), (16, 128), (32, 128), (64, 128), (16, 64), (16, 256), (16, 512))
QUICK_POINTS = ((2, 8), (4, 8), (2, 16))  # `bench --quick`: the code path in seconds


def random_like(model_path: Path, out: Path) -> Path:
    """A random-init model of `model_path`'s config (seed 0), saved with its tokenizer under `out`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from posttrain.model import load_tokenizer, save_model

    torch.manual_seed(0)
    cfg = AutoConfig.from_pretrained(model_path)
    return save_model(AutoModelForCausalLM.from_config(cfg), load_tokenizer(model_path), out)


def bench_grid(s, model_path: Path, points, tmp: Path, active: int, bench_recipe, bench_ours) -> list[dict]:
    """One row per point: {prompts, max_new_tokens, ours_step_s, trl_step_s, ratio (TRL's time over ours), the
    mean response tokens each side generated, and our response tokens per second}. `bench_recipe`, `bench_ours`:
    `posttrain.bench`'s (passed in, which keeps this module below it)."""
    import torch

    from posttrain.bench_trl import bench_trl
    from posttrain.model import pick_dtype

    rows = []
    mini_batches = bench_recipe(model_path, s).grpo.mini_batches  # the recipe's, at most one per prompt
    for prompts, length in points:
        point = replace(s, overrides=[*s.overrides, f"grpo.prompts_per_step={prompts}", f"grpo.max_new_tokens={length}",
                                      f"grpo.mini_batches={min(mini_batches, prompts)}"])
        rc = bench_recipe(model_path, point)
        device = torch.device("cpu")
        dtype = pick_dtype(rc.dtype, device)
        torch.set_num_threads(1)  # the driver only waits on the actors
        ours = bench_ours(rc, device, dtype, warmup=s.warmup, steps=s.grid_steps,
                          tmp=tmp / f"grid_ours_{prompts}_{length}", active_params=active)
        row = {"prompts": prompts, "max_new_tokens": length, "group_size": rc.grpo.group_size,
               "ours_step_s": ours["step_s"], "ours_response_tokens_mean": ours["mean"]["response_tokens_mean"],
               "ours_response_tokens_per_s": ours["mean"]["new_tokens"] / ours["step_s"]}
        if s.trl:
            torch.set_num_threads(s.threads)
            trl = bench_trl(rc, model_path, device, dtype, warmup=s.warmup, steps=s.grid_steps,
                            out_dir=tmp / f"grid_trl_{prompts}_{length}")
            row |= {"trl_step_s": trl["step_s"], "trl_response_tokens_mean": trl["completion_tokens_mean"],
                    "ratio": trl["step_s"] / ours["step_s"]}
        torch.set_num_threads(s.threads)
        rows.append(row)
    return rows


def format_grid(rows: list[dict]) -> str:
    lines = ["scaling (random-init model of the same shape; seconds per GRPO step, median):",
             f"{'prompts':>7} {'max_new':>7} {'ours s':>8} {'TRL s':>8} {'TRL/ours':>8} {'ours len':>8} {'TRL len':>8}"]
    for r in rows:
        trl = r.get("trl_step_s")
        lines.append(f"{r['prompts']:>7} {r['max_new_tokens']:>7} {r['ours_step_s']:>8.2f} "
                     f"{trl if trl is not None else float('nan'):>8.2f} {r.get('ratio', float('nan')):>8.2f} "
                     f"{r['ours_response_tokens_mean']:>8.1f} {r.get('trl_response_tokens_mean') or float('nan'):>8.1f}")
    return "\n".join(lines)


def plot_grid(rows: list[dict], path: Path) -> Path:
    """Two panels, log-log: seconds per step against prompts per step (at the most common length) and against
    max new tokens (at the most common prompt count), ours and TRL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from collections import Counter

    length = Counter(r["max_new_tokens"] for r in rows).most_common(1)[0][0]
    prompts = Counter(r["prompts"] for r in rows).most_common(1)[0][0]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, (key, fixed, other, label) in zip(axes, [("prompts", length, "max_new_tokens", "prompts per step"),
                                                     ("max_new_tokens", prompts, "prompts", "max new tokens")]):
        pts = sorted((r for r in rows if r[other] == fixed), key=lambda r: r[key])
        xs = [r[key] for r in pts]
        ax.plot(xs, [r["ours_step_s"] for r in pts], "o-", label="posttrain")
        if all("trl_step_s" in r for r in pts):
            ax.plot(xs, [r["trl_step_s"] for r in pts], "s--", label="TRL GRPOTrainer")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("seconds per GRPO step")
        ax.set_title(f"{label} ({other.replace('_', ' ')} = {fixed})")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
