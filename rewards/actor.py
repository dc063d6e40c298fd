"""The reward worker: a plain class that scores batches (testable without Ray) and its thin Ray actor wrapper.

Ray runs a synchronous actor's methods on the worker process's main thread, so math-verify's signal-based timeout
stays available there (see `math.py`); the sandbox's subprocesses are started without `preexec_fn`, so they are
safe from any thread.
"""

from __future__ import annotations

from typing import Any

from .combine import CombinedReward
from .registry import RewardOutput


class RewardWorker:
    """Holds a `CombinedReward` and scores batches with it.

    reward: a `CombinedReward`, or the keyword arguments to build one (``{"rewards": [...], "mode": ...}``).
    num_threads: torch intra-op threads for this process (the CPUs the worker was given), when torch is installed.
    """

    def __init__(self, reward: CombinedReward | dict[str, Any], num_threads: int | None = None):
        self.reward = reward if isinstance(reward, CombinedReward) else CombinedReward(**reward)
        if num_threads:
            try:
                import torch
            except ImportError:
                pass
            else:
                torch.set_num_threads(int(num_threads))

    def score(self, prompts: list[str], completions: list[str], **fields) -> RewardOutput:
        """Scores (B,) and metrics (``reward/<key>/...``) for one batch; never raises because of a reward."""
        return self.reward(prompts, completions, **fields)

    def ping(self) -> bool:
        return True


def make_reward_actor(num_cpus: float = 1, **ray_options):
    """The `ray.remote` class for `RewardWorker` (Ray is imported here, not at package import).

    Usage: ``actor = make_reward_actor(num_cpus=2).remote(reward_cfg, num_threads=2)``, then
    ``ray.get(actor.score.remote(prompts, completions, answer=...))``.
    """
    import ray

    return ray.remote(num_cpus=num_cpus, **ray_options)(RewardWorker)


def start_reward_actor(reward: CombinedReward | dict[str, Any], num_cpus: float = 1, **ray_options):
    """Start a reward actor with `num_cpus` CPUs whose torch uses as many threads; returns the actor handle."""
    cls = make_reward_actor(num_cpus=num_cpus, **ray_options)
    return cls.remote(reward, num_threads=max(1, int(num_cpus)))
