"""The cost of one weight sync, learner -> rollout workers, by Ray's object store and by broadcast (issue #25):

    python scripts/sync_compare.py --sizes tiny medium --rollouts 2            # CPU: gloo
    python scripts/sync_compare.py --device cuda --sizes medium --rollouts 1   # one GPU shared: gloo
    python scripts/sync_compare.py --device cuda --whole-gpus --rollouts 1     # a GPU each (2 here): NCCL

For each size (`scripts/gpu_check.py`'s random-init Qwen3-MoE checkpoints: `tiny` ~3.4M parameters, `medium`
~0.5B) it starts one `LearnerWorker` and N `RolloutWorker`s as Ray actors on a local instance, then syncs the
learner's whole trainable weights `--reps` times each way, as the RL driver does (`RLDriver.sync_weights`):
- `object_store`: learner 0 puts them in the object store, every rollout worker fetches and applies them;
- `broadcast`: `stages/rl_sync.BroadcastSync` (the group built once, outside the timing; gloo on CPU; on CUDA,
  NCCL when every actor has a GPU of its own, else gloo through host memory: NCCL takes one rank per device).
It prints the median seconds per sync (the driver's wall time until every worker has applied the weights), the bytes
each worker received, and the learner's own time in the broadcast. Writes `sync_compare.json` into `--out`.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

sys.path.insert(0, str(Path(__file__).resolve().parent))


def compare(model_dir: Path, rollouts: int, device: str, reps: int, whole_gpus: bool = False) -> dict:
    from posttrain.config_rl import WeightSyncConfig
    from posttrain.stages.rl_sync import BroadcastSync, sync_backend
    from posttrain.workers.actors import ActorOptions, gather, spawn
    from posttrain.workers.learner import LearnerWorker
    from posttrain.workers.rollout import RolloutWorker

    gpus = (1.0 if whole_gpus else 1 / (rollouts + 1)) if device == "cuda" else 0.0
    options = ActorOptions(cpus=0, gpus=gpus, threads=1)
    learner = spawn(LearnerWorker, str(model_dir), device=device, name="learner0", options=options, lr=1e-5)
    workers = [spawn(RolloutWorker, str(model_dir), device=device, name=f"rollout{i}", options=options)
               for i in range(rollouts)]
    w = SimpleNamespace(learners=[learner], rollouts=workers)
    try:
        out = {"rollouts": rollouts, "device": device}
        times = []
        for v in range(1, reps + 1):
            t0 = time.perf_counter()
            ref = learner.share(LearnerWorker.weights)
            gather([r.submit(RolloutWorker.update_weights, ref, v) for r in workers])
            times.append(time.perf_counter() - t0)
        out["object_store"] = {"seconds": statistics.median(times), "bytes": ref.nbytes}
        sync = BroadcastSync(WeightSyncConfig(method="broadcast"), sync_backend("auto", device, device, "--device", gpus >= 1),
                             "sync_compare")
        t0 = time.perf_counter()
        sync.build(w)
        build_s = time.perf_counter() - t0
        times, on_learner = [], []
        for v in range(reps + 1, 2 * reps + 1):
            t0 = time.perf_counter()
            sent = sync.push(w, v)
            times.append(time.perf_counter() - t0)
            on_learner.append(sync.seconds)
            if sent is None:
                raise RuntimeError("the broadcast failed (see the log)")
        out["broadcast"] = {"backend": sync.backend, "seconds": statistics.median(times), "bytes": sent,
                            "learner_seconds": statistics.median(on_learner), "group_build_seconds": build_s}
        return out
    finally:
        for p in [learner, *workers]:
            p.kill()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", nargs="+", default=["tiny", "medium"])
    ap.add_argument("--rollouts", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--whole-gpus", action="store_true", help="cuda: a GPU per actor (NCCL) instead of one shared")
    ap.add_argument("--out", type=Path, default=Path("runs/sync_compare"))
    args = ap.parse_args(argv)

    from gpu_check import build

    from posttrain.workers.ray_cluster import init_ray, shutdown_ray

    init_ray(num_cpus=max(2, args.rollouts + 1))
    results = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for size in args.sizes:
                path, n = build(size, Path(tmp) / size)
                r = {"size": size, "parameters": n, **compare(path, args.rollouts, args.device, args.reps, args.whole_gpus)}
                results.append(r)
                o, b = r["object_store"], r["broadcast"]
                print(f"{size} ({n / 1e6:.1f}M parameters, {o['bytes'] / 2**20:.1f} MiB a worker, {args.rollouts} "
                      f"rollout workers, {args.device}): object store {o['seconds']:.3f} s, {b['backend']} broadcast "
                      f"{b['seconds']:.3f} s ({o['seconds'] / b['seconds']:.2f}x; learner {b['learner_seconds']:.3f}"
                      f" s; group built in {b['group_build_seconds']:.2f} s)", flush=True)
    finally:
        shutdown_ray()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sync_compare.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
