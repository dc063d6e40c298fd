"""The benchmark's report: targets, the memory sampler, the summary of a run and its table (see `bench.py`)."""

from __future__ import annotations

import os
import threading
from contextlib import contextmanager

TARGETS = {"grpo_speedup": 1.5, "rollout_speedup": 1.5, "dispatch_sync_share": 0.10, "peak_rss_gib": 6.0}


class MemorySampler:
    """Peak summed RSS / PSS (bytes) of this process and its descendants (Ray's processes), overall and per phase."""

    def __init__(self, interval: float = 0.2, pss_every: int = 10):
        import psutil

        self.root, self.interval, self.pss_every = psutil.Process(), interval, pss_every
        self.phase = "setup"
        self.peak = {"rss": 0, "pss": 0}
        self.by_phase: dict[str, dict[str, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bench-memory")

    def sample(self, pss: bool = True) -> dict[str, int]:
        """Summed RSS (cheap: /proc/PID/statm) and, with `pss`, PSS (smaps_rollup: ~1 ms a process)."""
        import psutil

        out = {"rss": 0, "pss": 0} if pss else {"rss": 0}
        try:
            procs = [self.root, *self.root.children(recursive=True)]
        except psutil.Error:
            procs = [self.root]
        for p in procs:
            try:  # a process may end between listing and reading
                if pss:
                    info = p.memory_full_info()
                    out["rss"] += info.rss
                    out["pss"] += getattr(info, "pss", info.rss)
                else:
                    out["rss"] += p.memory_info().rss
            except psutil.Error:
                continue
        return out

    def _run(self) -> None:
        tick = 0
        while not self._stop.is_set():
            now = self.sample(pss=tick % self.pss_every == 0)  # PSS less often: it costs ~10x more to read
            tick += 1
            ph = self.by_phase.setdefault(self.phase, {"rss": 0, "pss": 0})
            for k, v in now.items():
                self.peak[k] = max(self.peak[k], v)
                ph[k] = max(ph[k], v)
            self._stop.wait(self.interval)

    @contextmanager
    def during(self, phase: str):
        old, self.phase = self.phase, phase
        try:
            yield
        finally:
            self.phase = old

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def met(key: str, value, target) -> bool | None:
    if value is None:
        return None
    return value <= target if key in ("dispatch_sync_share", "peak_rss_gib") else value >= target


def summarize(run: dict, matmul_1: float | None, threads: int) -> dict:
    """The flat headline keys of one device's run (and the run itself under `detail`). TRL's step is taken at the
    bench's thread count (the same total as ours); the rollout comparison at 1 thread (our rollout actor's)."""
    ours, mean = run["ours"], run["ours"]["mean"]
    step = mean["step_s"]
    shares = {k: mean[f"{k}_s"] / step for k in ("rollout", "reward", "reference", "learner", "critic", "sync",
                                                 "dispatch", "driver", "critic_values")}
    roll = run["rollout"].get("1") or next(iter(run["rollout"].values()))
    out = {"grpo_step_s_ours": ours["step_s"], "grpo_step_s_ours_min": ours["step_s_min"],
           "rollout_speedup": roll["speedup"],
           "rollout_tokens_per_s_ours": roll["ours"]["tokens_per_s"],
           "rollout_tokens_per_s_hf": roll["hf"]["tokens_per_s"],
           "rollout_speedup_by_threads": {k: v["speedup"] for k, v in run["rollout"].items()},
           "learner_tokens_per_s": ours["learner_tokens_per_s"], "learner_flops": ours["learner_flops"],
           "learner_padding_share": 1 - mean["learner_tokens"] / max(1.0, mean["learner_padded_tokens"]),
           "step_shares": shares, "dispatch_sync_share": shares["dispatch"] + shares["sync"],
           "response_tokens_mean_ours": mean["response_tokens_mean"], "detail": run}
    if "ours_async" in run:  # issue #29: rollouts one version ahead, same run
        a = run["ours_async"]
        out["grpo_step_s_async"], out["grpo_step_s_async_min"] = a["step_s"], a["step_s_min"]
        out["async_speedup"] = ours["step_s"] / a["step_s"]
        out["async_speedup_min"] = ours["step_s_min"] / a["step_s_min"]
    if matmul_1:
        out["learner_flops_utilisation"] = ours["learner_flops"] / matmul_1
    if "trl" in run:
        trl = run["trl"]
        out["grpo_step_s_trl"] = trl[str(threads)]["step_s"]
        out["grpo_speedup"] = out["grpo_step_s_trl"] / ours["step_s"]
        out["grpo_step_s_trl_by_threads"] = {k: v["step_s"] for k, v in trl.items()}
        out["grpo_speedup_by_trl_threads"] = {k: v["step_s"] / ours["step_s"] for k, v in trl.items()}
        # the fastest step of each side: other work on a shared machine only ever slows a step down
        out["grpo_step_s_trl_min_by_threads"] = {k: v["step_s_min"] for k, v in trl.items()}
        out["grpo_speedup_min_by_trl_threads"] = {k: v["step_s_min"] / ours["step_s_min"] for k, v in trl.items()}
        out["response_tokens_mean_trl"] = trl[str(threads)]["completion_tokens_mean"]
    return out


# ----------------------------------------------------------------------------------------------------- table
def format_table(r: dict) -> str:
    """The headline figures, both sides and their ratios, the step's time shares and the targets."""
    g = r["grpo"]
    lines = [
        f"model: {r['model']} ({r['model_source']}; {r['params_total'] / 1e6:.2f}M parameters, "
        f"{r['params_active'] / 1e6:.2f}M active per token)",
        f"settings: {g['prompts_per_step']} prompts x {g['group_size']} samples, max {g['max_new_tokens']} new "
        f"tokens, {g['mini_batches']} updates per step, AdamW lr {g['learning_rate']:g}, clip {g['clip_low']}/"
        f"{g['clip_high']}, kl_coef {g['kl_coef']:g} (TRL beta {g['kl_coef']:g})",
        f"threads: TRL {r['threads']['trl']} torch threads in-process (also timed at 1); ours: "
        f"{r['threads']['ours']}",
        "",
        f"{'':38}{'ours':>12}{'TRL / HF':>12}{'ratio':>9}",
    ]

    def row(label, ours, theirs, ratio, fmt="{:.3f}"):
        f = lambda v: (fmt.format(v) if v is not None else "-")  # noqa: E731
        lines.append(f"{label:38}{f(ours):>12}{f(theirs):>12}{(f'{ratio:.2f}x' if ratio else '-'):>9}")

    for t, secs in r.get("grpo_step_s_trl_by_threads", {"-": None}).items():
        row(f"GRPO step s, median (TRL {t} thr)", r["grpo_step_s_ours"], secs,
            r["grpo_speedup_by_trl_threads"][t] if secs else None)
        if secs:
            row(f"GRPO step s, fastest (TRL {t} thr)", r["grpo_step_s_ours_min"],
                r["grpo_step_s_trl_min_by_threads"][t], r["grpo_speedup_min_by_trl_threads"][t])
    if "async_speedup" in r:
        k = r["settings"].get("async_staleness", 1)
        lines.append(f"{f'GRPO step s, median, max_staleness {k}':38}{r['grpo_step_s_async']:>12.3f}"
                     f"{r['grpo_step_s_ours']:>12.3f}{r['async_speedup']:>8.2f}x  (vs ours synchronous; fastest "
                     f"{r['grpo_step_s_async_min']:.3f} vs {r['grpo_step_s_ours_min']:.3f} s, "
                     f"{r['async_speedup_min']:.2f}x)")
    row("  mean completion tokens", r["response_tokens_mean_ours"], r.get("response_tokens_mean_trl"), None,
        "{:.1f}")
    for t, ro in r["detail"]["rollout"].items():
        row(f"rollout tokens/s ({ro['rows']} rows, {t} thr)", ro["ours"]["tokens_per_s"], ro["hf"]["tokens_per_s"],
            ro["speedup"], "{:.0f}")
    mm = r["matmul_flops_1_thread"]
    threads = r["settings"]["threads"]
    mm_key = f"matmul_flops_{threads}_threads"
    lines += [
        "",
        f"learner: {r['learner_tokens_per_s']:.0f} tokens/s, {r['learner_flops'] / 1e9:.2f} GFLOP/s achieved "
        f"= {100 * r['learner_flops'] / mm:.1f}% of this machine's 1-thread fp32 matmul rate "
        f"({mm / 1e9:.1f} GFLOP/s; {r[mm_key] / 1e9:.1f} at {threads} threads); "
        f"padding {100 * r['learner_padding_share']:.0f}% of the positions",
        "step time shares (ours, mean of the timed steps): " + ", ".join(
            f"{k} {100 * v:.1f}%" for k, v in r["step_shares"].items() if v > 0.0005),
    ]
    if "scaling" in r:
        sc = r["scaling"]
        lines.append(f"scaling: rollout {sc['rollout_s_1_workers']:.3f} s/step with 1 worker, "
                     f"{sc['rollout_s_2_workers']:.3f} s with 2 ({sc['speedup_2_vs_1']:.2f}x; fastest "
                     f"{sc['rollout_s_1_workers_min']:.3f} vs {sc['rollout_s_2_workers_min']:.3f} s)")
    if r.get("grid"):
        from posttrain.bench_grid import format_grid

        lines.append(format_grid(r["grid"]) + (f"\n(plotted: {r['grid_png']})" if r.get("grid_png") else ""))
    if "fsdp" in r:
        from posttrain.bench_fsdp import format_fsdp

        lines.append(format_fsdp(r["fsdp"]))
    ph = ", ".join(f"{k} {v:.2f}" for k, v in r["peak_rss_gib_by_phase"].items())
    lines.append(f"peak memory: RSS {r['peak_rss_gib']:.2f} GiB (PSS {r['peak_pss_gib']:.2f}), this process and "
                 f"its descendants, Ray's included; by phase (RSS GiB): {ph}")
    if "cuda" in r:
        c = r["cuda"]
        lines.append(f"cuda: step {c['grpo_step_s_ours']:.3f} s ours vs {c.get('grpo_step_s_trl', float('nan')):.3f}"
                     f" s TRL ({c.get('grpo_speedup', float('nan')):.2f}x), rollout {c['rollout_speedup']:.2f}x")
    lines.append(f"load average (1 min) at start/end: {r['loadavg_start'][0]:.1f} / {r['loadavg_end'][0]:.1f} on "
                 f"{os.cpu_count()} cores (other work on the machine slows both sides, a second thread most)")
    lines.append("targets: " + "; ".join(_target_text(k, t) for k, t in r["targets"].items()))
    return "\n".join(lines)


def _target_text(key: str, t: dict) -> str:
    value = "-" if t["value"] is None else f"{t['value']:.3g}"
    op = "<=" if key in ("dispatch_sync_share", "peak_rss_gib") else ">="
    verdict = "n/a" if t["met"] is None else ("met" if t["met"] else "NOT met")
    return f"{key} {value} ({op} {t['target']:g}: {verdict})"
