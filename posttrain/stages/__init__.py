"""Stage registry: the names are the strings recipes list under `stages` (each stage's module, imported when run)."""

from __future__ import annotations

import importlib

from posttrain.algo.registry import Registry

STAGES = Registry("stage")
for _name in ("base", "sft", "rm", "grpo", "ppo", "distill", "eval", "sweep", "export"):
    STAGES.register(_name)(f"posttrain.stages.{_name}")


def get_stage(name: str):
    """The `run(ctx)` function of stage `name`; an unknown name lists the known ones."""
    return importlib.import_module(STAGES.get(name)).run
