"""`ppo` stage: PPO (Schulman et al. 2017; the InstructGPT recipe for LMs) with a critic actor, GAE and the KL to
the reference as a per-token reward penalty. Same driver as `grpo` (`posttrain.stages.rl.RLDriver`)."""

from __future__ import annotations


def run(ctx) -> dict:
    from posttrain.stages.rl import RLDriver

    return RLDriver(ctx, "ppo").fit()
