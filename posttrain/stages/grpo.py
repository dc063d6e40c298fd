"""`grpo` stage: GRPO (Shao et al. 2024) with DAPO's clip-higher and dynamic sampling, controllable and autonomous
thinking trained together. The loop is `posttrain.stages.rl.RLDriver`; each role is a Ray actor."""

from __future__ import annotations


def run(ctx) -> dict:
    from posttrain.stages.rl import RLDriver

    return RLDriver(ctx, "grpo").fit()
