"""Stage registry: the names are the strings recipes list under `stages`."""

from __future__ import annotations

import importlib

STAGES = {"base": "posttrain.stages.base", "sft": "posttrain.stages.sft", "rm": "posttrain.stages.rm",
          "grpo": "posttrain.stages.grpo", "ppo": "posttrain.stages.ppo", "eval": "posttrain.stages.eval",
          "sweep": "posttrain.stages.sweep", "export": "posttrain.stages.export"}


def get_stage(name: str):
    if name not in STAGES:
        raise KeyError(f"unknown stage {name!r}; known stages: {', '.join(STAGES)}")
    return importlib.import_module(STAGES[name]).run
