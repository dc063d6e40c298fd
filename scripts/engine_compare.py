"""The vllm rollout engine against the hf engine on one checkpoint, in one run: greedy token identity per mode and
sampled throughput (issue #25).

    .venv/bin/python scripts/engine_compare.py --checkpoint runs/quickstart/sft/checkpoint \
        --vllm-python .venv-vllm/bin/python [--device cuda] [--out runs/engine_compare.json]

For each mode (capped: the budget in the prompt and `</think>` forced at it; natural: the budget only asked;
forced: no budget in the prompt, `</think>` forced at it) it decodes `--problems` held-out problems greedily on
both engines and counts the rows whose tokens are identical, and how many rows had `</think>` forced. Then it
times sampled GRPO-shaped batches (`--prompts` x `--group`, `--max-new-tokens`, temperature 1, budgets 4..48 and
autonomous) on each engine, after one warm-up batch, and prints the medians over `--repeats` and new tokens/s.
Both engines get `--threads` threads; the vllm engine runs vLLM in a child process under `--vllm-python`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True)
    ap.add_argument("--vllm-python", default=None)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--problems", type=int, default=320)
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import torch

    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.workers.rollout import RolloutWorker
    from posttrain.workers.vllm_rollout import VLLMRolloutWorker

    torch.set_num_threads(args.threads)
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    t0 = time.perf_counter()
    hf = RolloutWorker(args.checkpoint, device=args.device, dtype=dtype, threads=args.threads)
    t_hf = time.perf_counter() - t0
    t0 = time.perf_counter()
    vllm = VLLMRolloutWorker(args.checkpoint, device=args.device, dtype=dtype, threads=args.threads,
                             engine={"python": args.vllm_python})
    t_vllm = time.perf_counter() - t0
    report = {"checkpoint": args.checkpoint, "device": args.device, "threads": args.threads,
              "vllm_version": vllm.vllm_version, "start_s": {"hf": t_hf, "vllm": t_vllm}, "greedy": {}}
    try:
        budgets_cycle = [None, 0, 4, 8, 12, 16, 20, 24, 28, 32]
        prompts = [p.expression for p in generate_problems(args.problems, 777)]
        budgets = [budgets_cycle[i % len(budgets_cycle)] for i in range(len(prompts))]
        rows = lambda b: [b.response_ids[i][b.response_mask[i].bool()].tolist() for i in range(len(b))]  # noqa: E731
        for mode, kw in {"capped": {"cap": True}, "natural": {"cap": False},
                         "forced": {"cap": True, "budget_in_prompt": False}}.items():
            a = hf.generate(prompts, budgets, 1, 160, greedy=True, **kw)
            b = vllm.generate(prompts, budgets, 1, 160, greedy=True, **kw)
            same = sum(x == y for x, y in zip(rows(a), rows(b)))
            report["greedy"][mode] = {"rows": len(a), "identical": same, "forced_rows": sum(a.forced)}
            print(f"greedy {mode:8s} identical {same}/{len(a)} rows ({sum(a.forced)} with </think> forced)")

        sp = [p.expression for p in generate_problems(args.prompts, 99)]
        sb = [[None, 4, 8, 16, 24, 32, 48][i % 7] for i in range(len(sp))]
        timing = {}
        for name, worker in (("hf", hf), ("vllm", vllm)):
            worker.generate(sp, sb, args.group, args.max_new_tokens, temperature=1.0, seed=0)  # warm-up
            secs, toks = [], []
            for r in range(args.repeats):
                t0 = time.perf_counter()
                batch = worker.generate(sp, sb, args.group, args.max_new_tokens, temperature=1.0, seed=r + 1)
                secs.append(time.perf_counter() - t0)
                toks.append(int(batch.response_mask.sum()))
            timing[name] = {"median_s": statistics.median(secs), "tokens_per_s": statistics.median(
                t / s for t, s in zip(toks, secs))}
            print(f"sampled {name:5s} {args.prompts}x{args.group}, {args.max_new_tokens} tokens: median "
                  f"{timing[name]['median_s']:.2f} s, {timing[name]['tokens_per_s']:.0f} new tokens/s")
        timing["vllm_over_hf"] = timing["vllm"]["tokens_per_s"] / timing["hf"]["tokens_per_s"]
        print(f"vllm / hf tokens/s: {timing['vllm_over_hf']:.2f}x (start: hf {t_hf:.1f} s, vllm {t_vllm:.1f} s)")
        report["sampled"] = timing
        t0 = time.perf_counter()
        vllm.update_weights(dict(hf.model.state_dict()), version=1)
        report["sync"] = {"seconds": time.perf_counter() - t0, "bytes": vllm.last_sync_bytes}
        print(f"weight sync into vLLM: {report['sync']['seconds']:.2f} s, {report['sync']['bytes'] / 2**20:.1f} MiB")
    finally:
        vllm.close()
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
