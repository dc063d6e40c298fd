"""Rollouts ahead of the learner, with bounded staleness (`grpo.async.max_staleness` / `ppo.async.max_staleness`).

With `max_staleness: K >= 1` the RL driver (`stages/rl.py`) gets each step's batch from a `RolloutPipeline`:

    step s:  batch_s <- the batch submitted during step s-K (or generated now: the first step, or after a resume)
             submit the batches of steps s+1..s+K not yet submitted (to the rollout workers, through the proxies'
               futures: on Ray they generate while the driver scores, runs the reference and the learner)
             reward, reference, critic, advantages on batch_s; rows sampled more than K versions ago dropped
             learner update (policy version s -> s+1)
             collect the batches submitted (the rollout workers finish them under the weights they had)
             sync: the new weights to the rollout workers (between their batches; version s+1)

Versions: the policy after s updates is version s; the rollout worker stamps every row with the version of its
weights (`RolloutBatch.versions`), so a row of batch_s sampled at version v has staleness s - v <= K. A batch
submitted during step s runs on the rollout workers before that step's weight sync (each actor runs its calls in
order), so it is sampled at version s and trained on at step s + K at the latest. A row older than K versions
(which this schedule never makes; a restarted worker or a bug could) is dropped: its loss mask (and the critic's)
is zeroed, as dynamic sampling drops a group, and counted (`async/dropped_stale`); its reward still counts in its
group's baseline. Each step's problems, budgets and sampling seed are those of the synchronous step (they come from
(seed, step)); only the weights that sample them are older. With `ray.backend: local` every call runs when it is
submitted, so the batches are the same as on Ray (same versions, seeds and weights) and nothing overlaps.

The HF rollout engine cannot take weights in the middle of a batch, and the driver syncs after each update, so
with one pool of rollout workers the overlap is one batch deep: K > 1 adds staleness but no more overlap.

Resume: the saved state (`posttrain.rlstate`) is the learner's after a step; batches in flight are not saved. A
run resumed at step s generates batch_s anew under version s (staleness 0) and refills the pipeline from there, so
a resumed run is not bit-identical to an uninterrupted one at K >= 1 (the first resumed batch is fresher), and the
bound holds throughout.

Metrics (K >= 1): `async/staleness_mean`, `async/staleness_max`, `async/staleness_<a>_share` (histogram over the
rows, a = 0..K), `async/dropped_stale` (rows), `time/rollout_wait_s` (the driver waiting for the batches in flight
after the update), `time/rollout_busy_s` (the rollout workers' own seconds on the batches collected this step) and
`time/overlap_s` (of those seconds, the ones the driver spent on other work: 0 with the local backend).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


def stale_rows(versions: list[int], current: int, max_staleness: int) -> tuple[torch.Tensor, dict[str, float]]:
    """((B,) bool: rows to keep, metrics) for rows sampled at policy `versions` reaching a learner at version
    `current`: a row whose staleness current - version exceeds `max_staleness` is dropped. Metrics:
    `async/staleness_mean`, `async/staleness_max`, `async/staleness_<a>_share` for a = 0..max_staleness (the
    staleness histogram; rows past the bound are the dropped ones) and `async/dropped_stale` (how many rows)."""
    ages = torch.tensor([current - v for v in versions], dtype=torch.long)
    keep = ages <= max_staleness
    n = max(1, len(versions))
    metrics = {"async/staleness_mean": float(ages.float().mean()) if len(versions) else 0.0,
               "async/staleness_max": float(ages.max()) if len(versions) else 0.0,
               "async/dropped_stale": float((~keep).sum())}
    for a in range(max_staleness + 1):
        metrics[f"async/staleness_{a}_share"] = float((ages == a).sum()) / n
    return keep, metrics


@dataclass
class InFlight:
    """One step's rollout, submitted to the rollout workers."""

    step: int
    problems: list
    budgets: list
    pending: list  # workers.actors.Pending, one per rollout worker
    submit_s: float  # driver seconds spent submitting (with the local backend: the whole generation)
    batch: object = None  # the RolloutBatch, once collected
    wait_s: float = 0.0  # driver seconds spent waiting for it
    collected: bool = False


class RolloutPipeline:
    """The batches in flight of an `RLDriver` at `max_staleness` K >= 1 (see the module docstring)."""

    def __init__(self, driver, max_staleness: int):
        if max_staleness < 1:
            raise ValueError(f"async.max_staleness must be >= 1 for a pipeline, got {max_staleness}")
        self.driver, self.k = driver, max_staleness
        self.flights: dict[int, InFlight] = {}
        self._collected: list[InFlight] = []  # collected during the current step, for its metrics

    def reset(self) -> None:
        """Forget the batches in flight (a resume: the workers were restarted or the weights replaced)."""
        self.flights.clear()
        self._collected.clear()

    def _submit(self, step: int) -> None:
        d = self.driver
        t0 = time.perf_counter()
        problems, budgets = d.problems.step(step)
        pending = d.submit_rollout([p.expression for p in problems], budgets, seed=d.rc.seed + step,
                                   record_routing=d.cfg.routing_replay)
        self.flights[step] = InFlight(step, problems, budgets, pending, time.perf_counter() - t0)

    def _collect(self, f: InFlight) -> None:
        if f.collected:
            return
        t0 = time.perf_counter()
        f.batch = self.driver.join_rollout(f.pending)
        f.wait_s, f.collected = time.perf_counter() - t0, True
        self._collected.append(f)

    def take(self, step: int) -> tuple[list, list, object]:
        """(problems, budgets, batch) of `step`, generated now when it is not in flight; then the batches of steps
        step+1..step+K (within the stage's steps) are submitted."""
        if step not in self.flights:
            self._submit(step)
        f = self.flights.pop(step)
        self._collect(f)
        for s in range(step + 1, min(step + self.k, self.driver.cfg.steps - 1) + 1):
            if s not in self.flights:
                self._submit(s)
        return f.problems, f.budgets, f.batch

    def collect(self) -> None:
        """Wait for every batch in flight (before the weight sync: they were submitted under the current
        weights, and each rollout worker runs its calls in order anyway)."""
        for s in sorted(self.flights):
            self._collect(self.flights[s])

    def drop_stale(self, batch, step: int) -> tuple[torch.Tensor | None, dict[str, float]]:
        """((B,) bool rows to keep or None when all are kept, metrics) of `batch` reaching the learner at version
        `step` (`stale_rows`); no versions (a worker that does not stamp them): nothing dropped, no metrics."""
        if batch.versions is None:
            return None, {}
        keep, metrics = stale_rows(batch.versions, step, self.k)
        return (None if bool(keep.all()) else keep), metrics

    def step_metrics(self) -> dict[str, float]:
        """Timing of the batches collected since the last call: `time/rollout_busy_s` (the rollout workers' own
        seconds, the slowest worker per batch) and `time/overlap_s` (of those, the ones not spent by the driver
        submitting or waiting for them: generation hidden behind the other roles)."""
        busy = overlap = 0.0
        for f in self._collected:
            b = max((p.busy or 0.0) for p in f.pending) if f.pending else 0.0
            busy += b
            overlap += max(0.0, b - f.submit_s - f.wait_s)
        self._collected.clear()
        return {"time/rollout_busy_s": busy, "time/overlap_s": overlap}


def overlap_threads_warning(rc, cfg, algo: str, device_type: str) -> str | None:
    """At `max_staleness` >= 1 on CPU the rollout workers generate while the reference and the learners run: a
    message when their torch threads together exceed this machine's cores (oversubscribed threads slow every role
    several times over: measured 0.30x the synchronous step on 2 cores with 2 threads each); None when they fit."""
    import os

    from posttrain.config_rl import max_staleness

    if max_staleness(cfg) < 1 or device_type != "cpu":
        return None
    from posttrain.workers.actors import ActorOptions

    ray = rc.ray
    roles = [("rollout", ray.rollout, ray.rollout.num), ("learner", ray.learner, ray.learner.num)]
    if cfg.kl_coef > 0:
        roles.append(("reference", ray.reference, 1))
    threads = {name: ActorOptions(cpus=g.cpus, threads=g.threads).torch_threads * n for name, g, n in roles}
    cores = os.cpu_count() or 1
    if sum(threads.values()) <= cores:
        return None
    return (f"{algo}.async.max_staleness {max_staleness(cfg)}: the roles that now run at once ask for "
            f"{sum(threads.values())} torch threads ({', '.join(f'{k} {v}' for k, v in threads.items())}) on "
            f"{cores} cores; oversubscribed, each slows several times (README, Asynchronous RL). Give them fewer "
            "threads (ray.<role>.threads) or keep max_staleness 0")

