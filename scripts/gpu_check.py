"""The GPU checks of issue #25 in one script, for a machine with a CUDA device (under 10 minutes on one H100):

    python scripts/gpu_check.py --out runs/gpu_check            # every size, on cuda, bf16
    python scripts/gpu_check.py --device cpu --sizes tiny        # the same code on CPU (what the test suite runs)

On a machine without CUDA and `--device cuda` (the default) it prints one line saying so and exits 0.

For each model size (random init, the project's byte-level tokenizer):
- `tiny`: the quickstart's embedded MoE (Qwen3-MoE, hidden 128, 4 layers, 8 experts top-2, ~3.4M parameters);
- `medium`: a Qwen3-MoE of a real model's shape at ~0.5B parameters (hidden 1024, 12 layers, 32 experts top-4,
  expert width 384, GQA 16/4 heads).
it runs
- rollouts with budgets through the RL stage's `RolloutWorker` (the project's decoder; budgets None, 8, 16, 32;
  capped: `</think>` forced at the budget): new tokens per second, and that every capped row kept its budget;
- GRPO learner steps (`LearnerWorker.step`, the learner the RL stage uses: PPO-clip loss, AdamW, the router aux
  loss) on those rollouts: learner tokens per second;
- peak device memory (`torch.cuda.max_memory_allocated`) after each part.
The `tiny` size also runs the real `sft` and `grpo` stages for 2 steps each on the device (`posttrain.pipeline`,
TRL's SFT trainer, Ray-free local backend), so the recipe path is exercised in bf16 end to end.
With `--vllm-python` (default $POSTTRAIN_VLLM_PYTHON: an interpreter with vLLM, `make vllm-venv`), each size
also samples the same batch through the vllm rollout engine (`VLLMRolloutWorker`): tokens per second, budgets
kept, and the share of greedy rows token-identical to the hf engine's (bf16 on a GPU: near ties may differ).
Then (unless `--no-sync`) the learner's weights of the largest size go to one rollout worker through the object
store and by broadcast (`scripts/sync_compare.py`; Ray actors sharing the device, so gloo through host memory:
NCCL takes one rank per device), timed.
Not covered: FSDP on several GPUs.

Prints a table and writes `gpu_check.json` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

SIZES = {
    "tiny": dict(hidden_size=128, num_hidden_layers=4, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
                 intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32),
    "medium": dict(hidden_size=1024, num_hidden_layers=12, num_experts=32, num_experts_per_tok=4,
                   moe_intermediate_size=384, intermediate_size=2048, num_attention_heads=16, num_key_value_heads=4,
                   head_dim=64, max_position_embeddings=2048),
}


def build(size: str, out: Path) -> tuple[Path, int]:
    """A random-init checkpoint of `size` with the project's tokenizer; (its directory, its parameter count)."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.model import save_model, tiny_moe_config
    from posttrain.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(512, 0)
    model = AutoModelForCausalLM.from_config(tiny_moe_config(len(tok), tok.pad_token_id, tok.eos_token_id,
                                                             **SIZES[size]))
    n = sum(p.numel() for p in model.parameters())
    return save_model(model, tok, out), n


def _peak(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def check_vllm(path: Path, device_name: str, dtype, hf, prompts: list, budgets: list, group: int, new_tokens: int,
               python: str) -> dict:
    """The vllm engine on the model at `path`: a sampled batch's tokens/s and budgets kept, and the share of
    greedy rows identical to the hf engine `hf`'s."""
    from posttrain.workers.vllm_rollout import VLLMRolloutWorker

    t0 = time.perf_counter()
    eng = VLLMRolloutWorker(str(path), device=device_name, dtype=dtype, threads=1, engine={"python": python})
    start = time.perf_counter() - t0
    try:
        eng.generate(prompts[:2], budgets[:2], group_size=1, max_new_tokens=8, seed=0)  # warm-up
        t0 = time.perf_counter()
        batch = eng.generate(prompts, budgets, group_size=group, max_new_tokens=new_tokens, seed=1)
        secs = time.perf_counter() - t0
        kept = [n <= b for n, b in zip(batch.n_think, batch.budgets) if b is not None]
        a = hf.generate(prompts, budgets, 1, new_tokens, greedy=True)
        b = eng.generate(prompts, budgets, 1, new_tokens, greedy=True)
        same = sum(a.response_ids[i][a.response_mask[i].bool()].tolist()
                   == b.response_ids[i][b.response_mask[i].bool()].tolist() for i in range(len(a)))
    finally:
        eng.close()
    return {"start_s": start, "tokens_per_s": int(batch.response_mask.sum()) / secs,
            "budget_kept_share": sum(kept) / max(1, len(kept)), "greedy_identical_share": same / len(a),
            "vllm": eng.vllm_version}


def check_size(size: str, device_name: str, tmp: Path, prompts_n: int, group: int, new_tokens: int,
               steps: int, vllm_python: str | None = None) -> dict:
    """Rollouts with budgets and learner steps on a random model of `size`; the figures as a dict."""
    import torch

    from posttrain.tasks.arithmetic import generate_problems
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    path, n_params = build(size, tmp / size)
    res: dict = {"size": size, "params": n_params, "device": device_name, "dtype": str(dtype).removeprefix("torch.")}
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    roll = RolloutWorker(str(path), device=device_name, dtype=dtype, threads=1)
    prompts = [p.expression for p in generate_problems(prompts_n, 0, list(range(1, 9)))]
    budgets = [[None, 8, 16, 32][i % 4] for i in range(prompts_n)]
    roll.generate(prompts[:2], budgets[:2], group_size=1, max_new_tokens=8, seed=0)  # warm-up (kernels, caches)
    _sync(device)
    t0 = time.perf_counter()
    batch = roll.generate(prompts, budgets, group_size=group, max_new_tokens=new_tokens, seed=1)
    _sync(device)
    secs = time.perf_counter() - t0
    new = int(batch.response_mask.sum())
    kept = [n <= b for n, b in zip(batch.n_think, batch.budgets) if b is not None]
    res["rollout"] = {"rows": len(batch), "new_tokens": new, "seconds": secs, "tokens_per_s": new / secs,
                      "budget_kept_share": sum(kept) / max(1, len(kept)), "peak_gib": _peak(device)}
    if vllm_python:
        res["vllm"] = check_vllm(path, device_name, dtype, roll, prompts, budgets, group, new_tokens, vllm_python)
    del roll
    learner = LearnerWorker(str(path), device=device_name, dtype=res["dtype"], lr=1e-5, seed=0)
    adv = torch.randn(len(batch))
    learner.step(batch, adv, batch.loss_mask, group_size=group)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        metrics = learner.step(batch, adv, batch.loss_mask, group_size=group)
    _sync(device)
    secs = (time.perf_counter() - t0) / steps
    tokens = int(batch.prompt_mask.sum() + batch.response_mask.sum())
    res["learner"] = {"seconds_per_step": secs, "tokens_per_s": tokens / secs, "peak_gib": _peak(device),
                      "loss": metrics.get("actor/loss"), "finite": all(
                          v == v for v in metrics.values() if isinstance(v, float))}
    return res


def check_stages(model_dir: Path, device_name: str, run_dir: Path) -> dict:
    """The real `sft` and `grpo` stages, 2 steps each, on the device (local backend): seconds and that both
    finished."""
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    over = [f"run_dir={run_dir}", f"model.path={model_dir}", "stages=[sft,grpo]", f"device={device_name}",
            "threads=1", "sft.steps=2", "sft.n_examples=32", "sft.batch_size=8", "grpo.steps=2",
            "grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=16", "grpo.eval_budgets=[8]",
            "grpo.eval_n_per_difficulty=1", "grpo.eval_max_new_tokens=16", "ray.backend=local"]
    t0 = time.perf_counter()
    out = run_recipe(load_recipe(None, over))
    return {"stages": sorted(out), "seconds": time.perf_counter() - t0,
            "finished": all((run_dir / s / "done.json").is_file() for s in ("sft", "grpo"))}


def check_sync(size: str, device_name: str, out: Path) -> dict:
    """`scripts/sync_compare.py` in a process of its own (it starts a local Ray instance): one rollout worker, the
    object store against the broadcast (NCCL on CUDA); its result, with `ok` (it ran and both ways sent the same
    bytes)."""
    import subprocess

    cmd = [sys.executable, str(Path(__file__).with_name("sync_compare.py")), "--sizes", size, "--rollouts", "1",
           "--device", device_name.split(":")[0], "--reps", "3", "--out", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ok": False, "error": (proc.stderr or proc.stdout)[-2000:]}
    (r,) = json.loads((out / "sync_compare.json").read_text())
    return {"ok": r["object_store"]["bytes"] == r["broadcast"]["bytes"] > 0, **r}


def format_table(results: list[dict]) -> str:
    lines = [f"{'size':8}{'params':>10}{'device':>8}{'rollout tok/s':>15}{'budget kept':>13}"
             f"{'learner tok/s':>15}{'peak GiB':>10}"]
    for r in results:
        if "size" not in r:
            continue
        lines.append(f"{r['size']:8}{r['params'] / 1e6:>9.1f}M{r['device']:>8}{r['rollout']['tokens_per_s']:>15.0f}"
                     f"{r['rollout']['budget_kept_share']:>13.0%}{r['learner']['tokens_per_s']:>15.0f}"
                     f"{max(r['rollout']['peak_gib'], r['learner']['peak_gib']):>10.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default; skipped without a CUDA device) or cpu")
    ap.add_argument("--sizes", default="tiny,medium", help="comma-separated: tiny, medium")
    ap.add_argument("--prompts", type=int, default=32, help="prompts per rollout batch")
    ap.add_argument("--group", type=int, default=4, help="samples per prompt")
    ap.add_argument("--new-tokens", type=int, default=128, help="max new tokens per sample")
    ap.add_argument("--steps", type=int, default=3, help="timed learner steps")
    ap.add_argument("--no-stages", action="store_true", help="skip the sft/grpo stage run on the tiny model")
    ap.add_argument("--no-sync", action="store_true", help="skip the weight sync check (scripts/sync_compare.py)")
    ap.add_argument("--out", help="directory for gpu_check.json")
    ap.add_argument("--vllm-python", default=os.environ.get("POSTTRAIN_VLLM_PYTHON"),
                    help="an interpreter with vLLM: also check the vllm rollout engine (default $POSTTRAIN_VLLM_PYTHON)")
    args = ap.parse_args(argv)
    import torch

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("gpu_check: no CUDA device on this machine: skipped (run with --device cpu to exercise the code)")
        return 0
    sizes = [s for s in args.sizes.split(",") if s]
    unknown = [s for s in sizes if s not in SIZES]
    if unknown:
        ap.error(f"--sizes: unknown {unknown}; known: {sorted(SIZES)}")
    results: list[dict] = []
    info = {"torch": torch.__version__, "device_name": torch.cuda.get_device_name(0)
            if args.device.startswith("cuda") else "cpu"}
    with tempfile.TemporaryDirectory(prefix="posttrain-gpu-check-") as tmp_name:
        tmp = Path(tmp_name)
        for size in sizes:
            results.append(check_size(size, args.device, tmp, args.prompts, args.group, args.new_tokens, args.steps,
                                      args.vllm_python))
            print(format_table(results[-1:]), flush=True)
            if "vllm" in results[-1]:
                print(f"  vllm engine: {json.dumps(results[-1]['vllm'])}", flush=True)
        if "tiny" in sizes and not args.no_stages:
            info["stages"] = check_stages(tmp / "tiny", args.device, tmp / "run")
        if not args.no_sync:
            info["sync"] = check_sync(sizes[-1], args.device, tmp / "sync")
    report = {"info": info, "results": results}
    print(format_table(results))
    if "stages" in info:
        print(f"sft + grpo stages on {args.device}: {info['stages']}")
    if args.out:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        (Path(args.out) / "gpu_check.json").write_text(json.dumps(report, indent=1))
    if "sync" in info:
        print(f"weight sync ({sizes[-1]}, 1 rollout worker, {args.device}): {json.dumps(info['sync'])}")
    ok = info.get("sync", {}).get("ok", True) and all(r["learner"]["finite"] and r["rollout"]["budget_kept_share"] == 1.0
             and r.get("vllm", {}).get("budget_kept_share", 1.0) == 1.0 for r in results)
    return 0 if ok and info.get("stages", {}).get("finished", True) else 1


if __name__ == "__main__":
    sys.exit(main())
