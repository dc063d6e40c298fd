"""The RL driver's side of `weight_sync.method: broadcast` (issue #25; the workers' side and the wire format are in
`posttrain.workers.weight_sync`).

The driver only starts calls: it builds the group (learner 0 = rank 0, rollout worker i = rank i + 1) before the
first sync and after anything broke it, then at each sync asks learner 0 to broadcast and every rollout worker to
receive, at once. The weights never pass through the driver or the object store, unless a broadcast fails (a worker
died in it): then that sync goes through the object store (`RLDriver.sync_weights`' other path) and the next one
builds a new group. A rollout worker restarted by Ray (`on_restart`) gets the weights through the object store too,
and the group is rebuilt, since the restarted process is not in it.
"""

from __future__ import annotations

from posttrain.runlog import log
from posttrain.workers.actors import gather
from posttrain.workers.learner import LearnerWorker
from posttrain.workers.rollout import RolloutWorker


def sync_backend(choice: str, learner_device: str, rollout_device: str, key: str, whole_gpus: bool = True) -> str:
    """gloo or nccl for `weight_sync.backend` `choice`; ValueError naming `key` for nccl without CUDA on both sides.

    auto: nccl when both sides are on CUDA with whole GPUs each (`whole_gpus`: ray.learner.gpus and
    ray.rollout.gpus >= 1). NCCL takes one rank per device, and actors given fractions of a GPU may share one, so
    they get gloo, which stages the tensors through host memory."""
    cuda = learner_device.startswith("cuda") and rollout_device.startswith("cuda")
    if choice == "nccl" and not cuda:
        raise ValueError(f"{key}: nccl broadcasts between CUDA devices, and the learner is on {learner_device}, the "
                         f"rollout workers on {rollout_device} (ray.learner.gpus / ray.rollout.gpus); use gloo or auto")
    return "nccl" if choice == "nccl" or (choice == "auto" and cuda and whole_gpus) else "gloo"


class BroadcastSync:
    """Builds and uses the broadcast group; `push` returns the bytes each rollout worker received, or None when the
    broadcast failed (the caller then sends the weights another way)."""

    def __init__(self, ws, backend: str, label: str):
        self.ws, self.backend, self.label = ws, backend, label
        self.generation = 0  # the current group; a new one each time it is built
        self.ready = False
        self.fallbacks = 0  # broadcasts that failed (and went through the object store instead)
        self.seconds = 0.0  # the last broadcast's time on learner 0

    def invalidate(self) -> None:
        """The group lost a member (a restarted worker): build a new one before the next sync."""
        self.ready = False

    def build(self, workers) -> None:
        """A new group: learner 0's rendezvous address and weight specs, then every member joins at once."""
        self.generation += 1
        learner, rollouts = workers.learners[0], workers.rollouts
        url = learner.call(LearnerWorker.rendezvous)
        specs = learner.call(LearnerWorker.weight_specs)
        world, bucket = 1 + len(rollouts), self.ws.bucket_mib << 20
        gather([learner.submit(LearnerWorker.join_weight_sync, url, world, self.backend, self.ws.timeout_s,
                               self.generation, bucket, specs),
                *(r.submit(RolloutWorker.join_weight_sync, url, i + 1, world, self.backend, self.ws.timeout_s,
                           self.generation, bucket, specs) for i, r in enumerate(rollouts))])
        self.ready = True
        log.info("%s: weight sync by %s broadcast, group %d: learner0 + %d rollout workers at %s (%d tensors)",
                 self.label, self.backend, self.generation, len(rollouts), url, len(specs))

    def push(self, workers, version: int) -> int | None:
        if not self.ready:
            self.build(workers)
        gen = self.generation
        sent = workers.learners[0].submit(LearnerWorker.broadcast_weights, gen)
        got = [r.submit(RolloutWorker.receive_weights, version, gen) for r in workers.rollouts]
        status, applied = sent.result(), gather(got)
        self.seconds = status["seconds"]
        if status["ok"] and all(n >= 0 for n in applied):
            return status["bytes"]
        self.ready, self.fallbacks = False, self.fallbacks + 1
        missed = [w.name for w, n in zip(workers.rollouts, applied) if n < 0]
        log.warning("%s: the weight broadcast of version %d failed (learner0: %s; not applied on: %s); sending it "
                    "through the object store, and building a new group for the next sync", self.label, version,
                    status["error"] or "ok", ", ".join(missed) or "none")
        return None
