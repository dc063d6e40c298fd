"""`posttrain bench`: our GRPO step against TRL's GRPOTrainer on the same checkpoint, prompts and settings, with
rollout and learner throughput, the time shares of a step, peak memory and rollout scaling, in one invocation.

    result = run_bench(BenchSettings(steps=5, warmup=1, out="runs/bench"))   # also writes bench.json
    print(format_table(result))

What is measured, in order (every figure on the same model and the recipe's `grpo` settings):
- `matmul`: this machine's fp32 matmul rate (a few 1024^3 `torch.matmul`), at 1 thread (a learner actor's) and
  at the bench's thread count: the ceiling the learner's achieved FLOP/s is read against;
- `ours`: `RLDriver.train_step` with Ray actors as the recipe's `ray` section sets them (the quickstart: rollout
  and learner 1 CPU each, rollout, learner and reference 2 torch threads each, reward 0 CPUs / 1 thread; the
  phases of a step run one after another, so at most 2 threads are ever busy), `warmup` steps then `steps` timed. Every proxy call is
  recorded, so a step splits into the time inside the actors (rollout, reward, reference, learner), weight sync
  (`time/sync_s`: learner -> driver -> rollout workers), the driver's own work (advantages), and Ray dispatch +
  transfer (each phase's wall time minus the time its actors were busy);
- `trl`: TRL 1.16's `GRPOTrainer` in this process at the bench's thread count (the same total as ours) and at
  1 thread (see `bench_trl`). Both the median and the fastest step are reported: on a shared machine other work
  only ever slows a step down, and a second thread suffers most (its partner is descheduled at every barrier);
- `rollout`: `RolloutWorker.generate` (the project's one decoder, `posttrain.decode.Decoder`) against HF
  `model.generate` (+ the same `ThinkCap` budget forcing: `posttrain.generate`'s reference implementation) on the
  same model object, batch (the step's prompts, each repeated group_size times), sampling and max_new_tokens,
  in this process at 1 thread (our rollout actor's) and at the bench's thread count, alternating run by run;
  new tokens (up to and including EOS) per second;
- `learner`: real (unpadded) prompt + response tokens per second of the learner actor's busy time, and achieved
  FLOP/s = 6 x active parameters x tokens / s (forward + backward, attention scores not counted; active
  parameters: every matrix a token passes through, with each routed-expert tensor counted top_k / num_experts of
  its size and the (tied) LM head counted as a matmul, the embedding lookup not);
- `ours_async`: the same step at `grpo.async.max_staleness: 1` (`BenchSettings.async_staleness`; issue #29): the
  next step's rollout generates while this one is scored, referenced and trained; `async_speedup` is the
  synchronous median step over this one's (the first timed steps follow `warmup` steps, so the pipeline is full);
- `scaling`: rollout seconds per step with 1 and 2 rollout actors (1 thread each) on the same batch;
- `grid`: our step and TRL's at prompts per step 8 -> 64 and max new tokens 64 -> 512, on a random-init model of
  the same shape (`posttrain.bench_grid`), with `bench_grid.png` (seconds per step against each, log-log);
- `fsdp`: the bytes of parameters, gradients and AdamW state one learner rank holds with FSDP2 over
  `fsdp_ranks` gloo processes against one unsharded learner, and each process's peak RSS, after one update each
  (`posttrain.bench_fsdp`);
- `memory`: peak summed RSS of this process and all its descendants (Ray's GCS, raylet and actor processes),
  sampled every 0.2 s by a background thread, overall and per phase; and PSS (which does not count shared pages
  twice; every 2 s, as it is ~10x dearer to read).
On a machine with CUDA, `ours`, `trl` and `rollout` run again with device cuda (bf16) under `cuda`.
The grpo settings are the quickstart recipe's (its defaults) except `dynamic_sampling: false` (so that, like
TRL, every group is trained on whatever the rewards) and no before/after evaluation.
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

# the report side (targets, memory sampler, summary, table); format_table is re-exported for the CLI and tests
from posttrain.bench_report import TARGETS, MemorySampler, format_table, met, summarize  # noqa: F401
from posttrain.bench_rollout import bench_rollout, bench_scaling



@dataclass
class BenchSettings:
    steps: int = 5  # timed GRPO steps per side (and rollout repetitions)
    warmup: int = 1  # untimed steps first
    model: str | None = None  # checkpoint; default: the quickstart SFT checkpoint, the cached base, or a random one
    out: str | None = None  # directory for bench.json
    quick: bool = False  # small batch (4 prompts x 4, 32 tokens): a smoke run, not the quickstart's settings
    recipe: str | None = "recipes/quickstart.yaml"  # its grpo/ray sections are the settings (defaults if absent)
    threads: int = 2  # torch threads in all, per side
    backend: str = "ray"  # `local`: every worker in this process (tests)
    trl: bool = True
    scaling: bool = True
    grid: bool = True  # the scaling table (posttrain.bench_grid): prompts 8 -> 64, max new tokens 64 -> 512
    grid_steps: int = 2  # timed steps per side at each of its points
    cuda: bool = True  # also on CUDA when there is one
    async_staleness: int = 1  # also time our step at grpo.async.max_staleness K (issue #29); 0: skip
    fsdp_ranks: int = 2  # the memory a learner rank holds with FSDP2 over this many gloo ranks (issue #25); 0: skip
    overrides: list[str] = field(default_factory=list)  # dotted.key=value recipe overrides, e.g. ray.learner.threads=2


# ------------------------------------------------------------------------------------------------ the model
def resolve_model(model: str | None, tmp: Path) -> tuple[Path, str]:
    """(checkpoint, what it is): `model`, else the quickstart's SFT checkpoint, else the cached base model of
    the default base settings, else a freshly initialised tiny MoE of the base stage's shape saved under tmp."""
    if model:
        return Path(model), "given"
    sft = Path("runs/quickstart/sft/checkpoint")
    if (sft / "config.json").is_file():
        return sft, "quickstart SFT checkpoint"
    from posttrain.config import BaseStageConfig
    from posttrain.stages.base import cache_key, cache_root

    base = BaseStageConfig()
    cached = cache_root(base) / cache_key(base, 0)
    if (cached / "config.json").is_file():
        return cached, "cached base model"
    return random_tiny_model(base, tmp / "random_tiny"), "random tiny MoE (untrained)"


def random_tiny_model(base, out: Path) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.model import save_model, tiny_moe_config
    from posttrain.tokenizer import build_tokenizer

    torch.manual_seed(0)
    tok = build_tokenizer(base.vocab_size, 0)
    cfg = tiny_moe_config(len(tok), tok.pad_token_id, tok.eos_token_id, hidden_size=base.hidden_size,
                          num_hidden_layers=base.num_layers, num_experts=base.num_experts,
                          num_experts_per_tok=base.top_k, moe_intermediate_size=base.moe_intermediate_size,
                          intermediate_size=2 * base.hidden_size, num_attention_heads=base.num_heads,
                          num_key_value_heads=max(1, base.num_heads // 2), head_dim=base.hidden_size // base.num_heads)
    return save_model(AutoModelForCausalLM.from_config(cfg), tok, out)


def active_parameters(model_path) -> tuple[int, int]:
    """(all parameters, parameters one token passes through): routed experts count top_k / num_experts of their
    size, the embedding lookup is free and the LM head is a matmul (counted even when tied to the embedding)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_path)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    top_k = getattr(config, "num_experts_per_tok", None) or 1
    n_experts = next((getattr(config, k) for k in ("num_experts", "num_local_experts", "n_routed_experts")
                      if getattr(config, k, None)), 1)
    head = model.get_output_embeddings().weight
    total = active = 0
    for name, p in model.named_parameters():
        total += p.numel()
        if p is head:
            continue
        if "embed_tokens" in name:
            continue
        active += p.numel() * (top_k / n_experts if ".experts." in name else 1)
    return total, int(active + head.numel())


# ----------------------------------------------------------------------------------------------- the machine
def matmul_flops(threads: int, n: int = 1024, reps: int = 6) -> float:
    """fp32 FLOP/s of an n x n x n torch.matmul at `threads` torch threads (median of `reps`)."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - t0)
        return 2 * n**3 / statistics.median(times)
    finally:
        torch.set_num_threads(old)


# ---------------------------------------------------------------------------------------------------- recipe
def bench_recipe(model_path: Path, s: BenchSettings, device: str = "cpu"):
    """The RecipeConfig of the run: the recipe's grpo/ray settings on `model_path`, 1 CPU per rollout/learner."""
    from posttrain.recipe import load_recipe

    recipe = s.recipe if s.recipe and Path(s.recipe).is_file() else None
    over = [f"model.path={model_path}", "stages=[grpo]", f"device={device}", "grpo.dynamic_sampling=false",
            "grpo.eval_n_per_difficulty=0", "grpo.save_every=0", f"ray.backend={s.backend}",
            "ray.rollout.cpus=1", "ray.learner.cpus=1", f"ray.num_cpus={max(2, s.threads)}"]
    if device == "cpu":
        over.append("dtype=float32")
    else:
        over += ["ray.rollout.gpus=0.5", "ray.learner.gpus=0.5"]
    if s.quick:
        over += ["grpo.prompts_per_step=4", "grpo.group_size=4", "grpo.max_new_tokens=32", "grpo.mini_batches=2"]
    return load_recipe(recipe, over + list(s.overrides))


# -------------------------------------------------------------------------------------------------- our step
_PHASE = {"generate": "rollout", "score": "reward", "logp": "reference", "values": "critic_values",
          "weights": "sync", "update_weights": "sync", "broadcast_weights": "sync", "receive_weights": "sync"}


def _record_calls(proxy, calls: list) -> None:
    """Wrap `proxy.submit` (and `submit_shared`) so every call appends (proxy name, method, seconds busy in the
    actor, result)."""

    def wrap(submit):
        def recorded(method, *args, **kwargs):
            busy0 = proxy.busy
            pending = submit(method, *args, **kwargs)
            result = pending.result

            def finish(*a, **kw):
                out = result(*a, **kw)
                calls.append((proxy.name, method.__name__, proxy.busy - busy0, out))
                return out

            pending.result = finish
            return pending

        return recorded

    proxy.submit, proxy.submit_shared = wrap(proxy.submit), wrap(proxy.submit_shared)


def step_profile(metrics: dict, calls: list, active_params: int) -> dict:
    """One step's seconds by component (they add up to time/step_s) and its token counts."""
    busy: dict[str, list[float]] = {}
    from posttrain.workers.actors import tensor_bytes

    batches, sync_bytes = [], 0
    for name, method, b, out in calls:
        phase = ("critic" if name == "critic" else "learner") if method == "step" else _PHASE.get(method, method)
        busy.setdefault(f"{phase}:{method}", []).append(b)
        if method == "generate":
            batches.append(out)
        if method == "weights":  # a `Shared` reference on Ray (the weights go learner -> rollout directly)
            sync_bytes += getattr(out, "nbytes", None) or tensor_bytes(out)

    def par(key):  # calls of one phase run in parallel on different actors: the slowest is the phase's
        return max(busy.get(key, [0.0]))

    inside = {"rollout": par("rollout:generate"), "reward": par("reward:score"),
              "reference": par("reference:logp"), "learner": par("learner:step"), "critic": par("critic:step")}
    dispatch = sum(max(0.0, metrics.get(f"time/{p}_s", 0.0) - b) for p, b in inside.items())
    critic_values = par("critic_values:values")
    driver = max(0.0, metrics["time/critic_values_s"] - critic_values)
    prof = {**{f"{k}_s": v for k, v in inside.items()}, "critic_values_s": critic_values,
            "sync_s": metrics["time/sync_s"], "dispatch_s": dispatch, "driver_s": driver,
            "step_s": metrics["time/step_s"]}
    prof["sync_inside_s"] = par("sync:weights") + par("sync:update_weights")
    prof["sync_bytes"] = sync_bytes
    real = sum(int(b.prompt_mask.sum() + b.response_mask.sum()) for b in batches)
    new = sum(int(b.response_mask.sum()) for b in batches)
    rows = sum(len(b) for b in batches)
    width = max((b.prompt_ids.shape[1] + b.response_ids.shape[1] for b in batches), default=0)
    prof |= {"rows": rows, "learner_tokens": real, "learner_padded_tokens": rows * width, "new_tokens": new,
             "response_tokens_mean": new / max(1, rows)}
    prof["learner_tokens_per_s"] = real / prof["learner_s"] if prof["learner_s"] else 0.0
    prof["learner_flops"] = 6 * active_params * prof["learner_tokens_per_s"]
    return prof


def bench_ours(rc, device, dtype, *, warmup: int, steps: int, tmp: Path, active_params: int) -> dict:
    """Our driver's `train_step` with the recipe's actors; per-step profiles and medians of the timed steps."""
    from posttrain.pipeline import StageContext
    from posttrain.runlog import StageDir
    from posttrain.stages.rl import RLDriver

    model_path = Path(rc.model.path)
    ctx = StageContext(rc, tmp, StageDir(tmp, "grpo"), None, device, dtype, model_path)
    driver = RLDriver(ctx, "grpo")
    driver.start()
    calls: list = []
    for p in driver.w.all():
        _record_calls(p, calls)
    profiles = []
    try:
        for step in range(warmup + steps):
            calls.clear()
            profiles.append(step_profile(driver.train_step(step), calls, active_params))
    finally:
        for p in driver.w.all():
            p.kill()
    timed = profiles[warmup:] or profiles
    mean = {k: statistics.fmean(p[k] for p in timed) for k in timed[0]}
    return {"step_s": statistics.median(p["step_s"] for p in timed), "step_s_min": min(p["step_s"] for p in timed),
            "step_s_all": [p["step_s"] for p in timed],
            "mean": mean, "learner_tokens_per_s": statistics.median(p["learner_tokens_per_s"] for p in timed),
            "learner_flops": statistics.median(p["learner_flops"] for p in timed)}


# --------------------------------------------------------------------------------------------- the whole run
def _device_run(s: BenchSettings, model_path: Path, device_name: str, tmp: Path, active: int,
                mem: MemorySampler) -> dict:
    import torch

    from posttrain.bench_trl import bench_trl
    from posttrain.model import pick_dtype

    rc = bench_recipe(model_path, s, device_name)
    device = torch.device(device_name)
    dtype = pick_dtype(rc.dtype, device)
    res: dict = {"device": device_name, "dtype": str(dtype).removeprefix("torch.")}
    torch.set_num_threads(1)  # the driver only waits on the actors
    with mem.during(f"ours_{device_name}"):
        res["ours"] = bench_ours(rc, device, dtype, warmup=s.warmup, steps=s.steps, tmp=tmp / f"ours_{device_name}",
                                 active_params=active)
    if s.async_staleness > 0:  # the same step with rollouts one (K) version ahead of the learner
        rc_async = bench_recipe(model_path, replace(s, overrides=[*s.overrides,
                                                                f"grpo.async.max_staleness={s.async_staleness}"]),
                                device_name)
        with mem.during(f"ours_async_{device_name}"):
            res["ours_async"] = bench_ours(rc_async, device, dtype, warmup=s.warmup, steps=s.steps,
                                           tmp=tmp / f"ours_async_{device_name}", active_params=active)
    for threads in thread_counts(s) if device.type == "cpu" else [s.threads]:
        if s.trl:
            torch.set_num_threads(threads)
            with mem.during(f"trl_{device_name}"):
                res.setdefault("trl", {})[str(threads)] = bench_trl(
                    rc, model_path, device, dtype, warmup=s.warmup, steps=s.steps, out_dir=tmp / f"trl_{threads}")
        with mem.during(f"rollout_{device_name}"):
            res.setdefault("rollout", {})[str(threads)] = bench_rollout(rc, device, dtype, threads=threads,
                                                                        reps=s.steps, warmup=s.warmup)
    torch.set_num_threads(s.threads)
    return res


def describe_threads(rc) -> str:
    """Our actors' torch threads and reserved CPUs, as the recipe's `ray` section sets them."""
    from posttrain.workers.ray_cluster import recipe_actor_options as _options

    roles = [("rollout", rc.ray.rollout, rc.ray.rollout.num), ("learner", rc.ray.learner, rc.ray.learner.num),
             ("reward", rc.ray.reward, 1)]
    if rc.grpo.kl_coef > 0:
        roles.append(("reference", rc.ray.reference, 1))
    parts = [f"{n} {name} ({_options(g).torch_threads} thread, {g.cpus:g} CPU)" for name, g, n in roles]
    return ", ".join(parts) + "; a step's phases run one after another, the driver waits"


def thread_counts(s: BenchSettings) -> list[int]:
    """TRL and the rollout comparison run at the bench's thread count (TRL's equal share) and at 1 thread (what
    each of our actors has): on a shared machine a second thread can cost more than it brings."""
    return sorted({s.threads, 1}, reverse=True)


def run_bench(s: BenchSettings) -> dict:
    """Run every measurement (see the module docstring); writes `bench.json` into `s.out` when given."""
    import torch

    from posttrain.workers.ray_cluster import shutdown_ray

    from posttrain.pipeline import _ray_running

    t_start = time.perf_counter()
    ray_before = _ray_running()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    with tempfile.TemporaryDirectory(prefix="posttrain-bench-") as tmp_name, MemorySampler() as mem:
        tmp = Path(tmp_name)
        try:
            model_path, source = resolve_model(s.model, tmp)
            total, active = active_parameters(model_path)
            rc = bench_recipe(model_path, s)
            result: dict = {
                "settings": asdict(s), "model": str(model_path), "model_source": source,
                "params_total": total, "params_active": active,
                "grpo": {k: getattr(rc.grpo, k) for k in ("prompts_per_step", "group_size", "max_new_tokens",
                                                           "mini_batches", "learning_rate", "kl_coef", "clip_low",
                                                           "clip_high", "max_grad_norm", "temperature")},
                "threads": {"trl": s.threads, "ours": describe_threads(rc)},
                "matmul_flops_1_thread": matmul_flops(1), f"matmul_flops_{s.threads}_threads": matmul_flops(s.threads),
                "loadavg_start": os.getloadavg(),
            }
            cpu = _device_run(s, model_path, "cpu", tmp, active, mem)
            if s.scaling and s.backend == "ray":
                with mem.during("scaling"):
                    result["scaling"] = bench_scaling(bench_recipe(model_path, s), reps=s.steps, warmup=s.warmup)
            if s.grid:
                from posttrain.bench_grid import DEFAULT_POINTS, QUICK_POINTS, bench_grid, random_like

                with mem.during("grid"):
                    result["grid"] = bench_grid(s, random_like(model_path, tmp / "grid_model"),
                                                QUICK_POINTS if s.quick else DEFAULT_POINTS, tmp, active,
                                                bench_recipe, bench_ours)
            if s.fsdp_ranks > 1:
                from posttrain.bench_fsdp import bench_fsdp

                with mem.during("fsdp"):
                    result["fsdp"] = bench_fsdp(model_path, s.fsdp_ranks, tmp / "fsdp")
            if s.cuda and torch.cuda.is_available():
                result["cuda"] = summarize(_device_run(s, model_path, "cuda", tmp, active, mem), None, s.threads)
        finally:
            if s.backend == "ray" and not ray_before:  # stop only a Ray this run started
                shutdown_ray()
        result |= summarize(cpu, result["matmul_flops_1_thread"], s.threads)
        result["peak_rss_gib"] = mem.peak["rss"] / 2**30
        result["peak_pss_gib"] = mem.peak["pss"] / 2**30
        result["peak_rss_gib_by_phase"] = {k: v["rss"] / 2**30 for k, v in mem.by_phase.items()}
        result["peak_pss_gib_by_phase"] = {k: v["pss"] / 2**30 for k, v in mem.by_phase.items()}
    result["targets"] = {k: {"target": t, "value": result.get(k), "met": met(k, result.get(k), t)}
                         for k, t in TARGETS.items()}
    result["loadavg_end"] = os.getloadavg()
    result["bench_s"] = time.perf_counter() - t_start
    if s.out:
        out = Path(s.out)
        out.mkdir(parents=True, exist_ok=True)
        if result.get("grid"):
            from posttrain.bench_grid import plot_grid

            result["grid_png"] = str(plot_grid(result["grid"], out / "bench_grid.png"))
        (out / "bench.json").write_text(json.dumps(result, indent=1, default=str))
    return result
