"""`posttrain bench`'s rollout measurements: our decoder against HF `generate` on the same batch (`bench_rollout`),
and the RL driver's rollout over 1 and 2 rollout actors (`bench_scaling`). See `posttrain.bench`."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass


def bench_rollout(rc, device, dtype, *, threads: int, reps: int, warmup: int) -> dict:
    """New tokens/s of `RolloutWorker.generate` and of HF `generate` (+ ThinkCap) on the same model and batch at
    `threads` torch threads; the two alternate run by run, so that a change in the machine's load hits both."""
    import torch
    from transformers import LogitsProcessorList

    from posttrain.decode import render_prompts
    from posttrain.generate import ThinkCap  # the reference's logits processor: HF generate as the peer
    from posttrain.tasks.task import build_task
    from posttrain.workers.rollout import RolloutWorker

    cfg = rc.grpo
    old = torch.get_num_threads()
    worker = RolloutWorker(rc.model.path, device=device, dtype=dtype, threads=threads,
                           experts_implementation=rc.model.experts_implementation)
    problems, budgets = build_task(rc).step_problems(cfg, 0)
    prompts = [p.expression for p in problems]
    tok, model = worker.tokenizer, worker.model
    side = tok.padding_side
    tok.padding_side = "left"
    enc = tok(render_prompts(tok, prompts, budgets), return_tensors="pt", padding=True, add_special_tokens=False)
    tok.padding_side = side
    ids = enc["input_ids"].repeat_interleave(cfg.group_size, 0).to(device)
    mask = enc["attention_mask"].repeat_interleave(cfg.group_size, 0).to(device)
    caps = [b for b in budgets for _ in range(cfg.group_size)]

    def ours(seed):
        b = worker.generate(prompts, budgets, cfg.group_size, cfg.max_new_tokens, temperature=cfg.temperature,
                            top_p=cfg.top_p, seed=seed)
        return int(b.response_mask.sum())

    def hf(seed):
        torch.manual_seed(seed)
        cap = ThinkCap(worker.think_end_id, caps, ids.shape[1], device)
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=cfg.temperature,
                             top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens, pad_token_id=worker.pad_id,
                             eos_token_id=worker.eos_id, logits_processor=LogitsProcessorList([cap]))
        gen = out[:, ids.shape[1]:]
        ended = gen == worker.eos_id
        return int(((ended.long().cumsum(1) - ended.long()) == 0).sum())  # up to and including the first EOS

    runs: dict[str, list[tuple[float, int]]] = {"ours": [], "hf": []}
    try:
        torch.set_num_threads(threads)
        for i in range(warmup + reps):
            for name, fn in (("ours", ours), ("hf", hf)):
                _sync(device)
                t0 = time.perf_counter()
                with torch.no_grad():
                    n = fn(i)
                _sync(device)
                if i >= warmup:
                    runs[name].append((time.perf_counter() - t0, n))
    finally:
        torch.set_num_threads(old)
    res: dict = {"threads": threads, "rows": int(ids.shape[0])}
    for name, rs in runs.items():
        res[name] = {"s": statistics.median(r[0] for r in rs), "new_tokens": statistics.median(r[1] for r in rs),
                     "tokens_per_s": statistics.median(r[1] / r[0] for r in rs)}
    res["speedup"] = res["ours"]["tokens_per_s"] / res["hf"]["tokens_per_s"]
    return res


def _sync(device) -> None:
    import torch

    if getattr(device, "type", str(device)) == "cuda":
        torch.cuda.synchronize()


def bench_scaling(rc, *, reps: int, warmup: int) -> dict:
    """Rollout seconds per step (the driver's `rollout`, prompts split evenly) with 1 and 2 rollout actors, each
    with 1 CPU and 1 torch thread (two 2-thread actors would oversubscribe two cores)."""
    import dataclasses
    from posttrain.model import load_tokenizer
    from posttrain.stages.rl import RLDriver
    from posttrain.stages.rl_workers import Workers
    from posttrain.workers.ray_cluster import recipe_actor_options as _options
    from posttrain.tasks.task import build_task
    from posttrain.workers.actors import spawn
    from posttrain.workers.rollout import RolloutWorker

    cfg = rc.grpo
    problems, budgets = build_task(rc).step_problems(cfg, 0)
    out = {}
    for n in (1, 2):
        driver = RLDriver(_Ctx(rc), "grpo")
        driver._pad_id = load_tokenizer(rc.model.path).pad_token_id
        opts = dataclasses.replace(_options(rc.ray.rollout), cpus=1.0, threads=1)
        rollouts = [spawn(RolloutWorker, rc.model.path, threads=opts.torch_threads,
                          experts_implementation=rc.model.experts_implementation, name=f"rollout{i}",
                          options=opts, backend=rc.ray.backend) for i in range(n)]
        driver.w = Workers(rollouts, [], None, None, None)
        try:
            times = []
            for i in range(warmup + reps):
                t0 = time.perf_counter()
                driver.rollout([p.expression for p in problems], budgets, seed=i)
                times.append(time.perf_counter() - t0)
        finally:
            for p in rollouts:
                p.kill()
        out[f"rollout_s_{n}_workers"] = statistics.median(times[warmup:] or times)
        out[f"rollout_s_{n}_workers_min"] = min(times[warmup:] or times)
    out["speedup_2_vs_1"] = out["rollout_s_1_workers"] / out["rollout_s_2_workers"]
    return out


@dataclass
class _Ctx:  # what RLDriver reads of a StageContext when it only rolls out
    cfg: object
    name: str | None = None
