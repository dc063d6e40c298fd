"""The rollout engines by their recipe names (`rollout_engine.name`): the worker class and its extra arguments.

- `hf`: `posttrain.workers.rollout.RolloutWorker`, the project's own decoding loop (`posttrain.decode`): the
  reference, on any device, with LoRA and routing recording.
- `vllm`: `posttrain.workers.vllm_rollout.VLLMRolloutWorker`, vLLM in a child process, the same calls and budget
  semantics (token-identical greedy rollouts on the embedded model, `tests/test_vllm_engine.py`).
Both take `(model_path, device, dtype, threads, experts_implementation=..., load_options=...)`; `engine_kwargs`
adds what the engine needs beyond that.
"""

from __future__ import annotations

from collections.abc import Mapping


def engine_class(name: str) -> type:
    """The worker class of engine `name` (imported on demand: the vllm engine's module needs no vLLM here, but
    there is no reason to load it for the hf engine)."""
    if name == "hf":
        from posttrain.workers.rollout import RolloutWorker

        return RolloutWorker
    if name == "vllm":
        from posttrain.workers.vllm_rollout import VLLMRolloutWorker

        return VLLMRolloutWorker
    raise ValueError(f"rollout_engine.name: unknown engine {name!r}; known: hf, vllm")


def engine_kwargs(engine: Mapping | None) -> dict:
    """Keyword arguments the engine's worker takes beyond the common ones, from the recipe's `rollout_engine`
    section as a dict (None: the hf engine)."""
    if not engine or engine.get("name", "hf") == "hf":
        return {}
    return {"engine": {k: v for k, v in engine.items() if k != "name"}}
