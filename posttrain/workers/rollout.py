"""Rollout worker of the RL stage and the sweep: a `posttrain.decode.Decoder` that owns its model.

A plain class (no Ray; a thin actor wrapper lives elsewhere). The decoding itself (`generate`: groups of sampled
responses with per-token log-probs, budget forcing and routing recording, returned as a `RolloutBatch`) is the
`Decoder`'s, the project's one decoding loop, described in `posttrain.decode`; this worker adds what a long-lived
copy of the policy needs: loading a checkpoint (with a PEFT adapter merged), taking new weights from the learner,
and wrapping the policy in the learner's LoRA adapter. It knows the policy version of its weights (the learner
updates they include, given with each `update_weights`; 0 for the model it loaded) and stamps every row it
generates with it (`RolloutBatch.versions`), which the asynchronous RL driver checks against its staleness bound.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from posttrain.decode import Decoder, RolloutBatch
from posttrain.model import load_model, load_tokenizer
from posttrain.workers.weight_sync import BroadcastReceiver

__all__ = ["RolloutBatch", "RolloutWorker"]  # RolloutBatch: re-exported, where the RL code has always found it


class RolloutWorker(Decoder, BroadcastReceiver):
    """Holds a copy of the policy, samples groups of responses, and takes new weights from the learner."""

    def __init__(self, model_path, device="cpu", dtype=torch.float32, threads: int = 1,
                 experts_implementation: str = "grouped_mm", load_options: dict | None = None):
        torch.set_num_threads(threads)
        self.device = torch.device(device)
        self.dtype, self.experts_implementation = dtype, experts_implementation
        self.load_options = load_options or {}  # model.trust_remote_code / model.allow_pickle of the recipe
        self.load(model_path)  # no Decoder.__init__: `load` binds the model and tokenizer
        self.version = 0  # the policy version of the weights held: learner updates they include

    def generate(self, *args, **kwargs) -> RolloutBatch:
        """`Decoder.generate`, every row stamped with the version of the weights that sampled it."""
        batch = super().generate(*args, **kwargs)
        batch.versions = [self.version] * len(batch)
        return batch

    def load(self, checkpoint, adapter=None) -> None:
        """Serve another model: a checkpoint directory, or `checkpoint` with a PEFT adapter directory merged into
        it (`merge_and_unload`, so the decoding loop sees a plain model). The tokenizer comes from the adapter
        directory when it holds one. Lets one set of workers generate for every model of a sweep."""
        model = load_model(checkpoint, device=self.device, dtype=self.dtype,
                           experts_implementation=self.experts_implementation, **self.load_options)
        tokenizer_dir = checkpoint
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            if (Path(adapter) / "tokenizer_config.json").is_file():
                tokenizer_dir = adapter
        self.bind(model.eval(), load_tokenizer(tokenizer_dir))
        self.version = 0

    # ------------------------------------------------------------------ weights

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> int:
        """Copy the given tensors into the model (a subset of its state dict is fine); returns how many. `version`:
        the policy version they are (the rows generated from now on carry it); None keeps the current one.

        Every name and shape is checked before anything is copied, so a bad update leaves the model unchanged.
        """
        items = list(named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors)
        state = self.model.state_dict()  # tensors share storage with the parameters
        self._check_update(state, items)
        with torch.no_grad():
            for name, value in items:
                state[name].copy_(value)
        if version is not None:
            self.version = int(version)
        return len(items)

    @staticmethod
    def _check_update(state: Mapping[str, torch.Tensor], items: list[tuple[str, torch.Tensor]]) -> None:
        """Raise ValueError naming the first of `items` whose name is not in `state` or whose shape differs."""
        for name, value in items:
            if name not in state:
                near = difflib.get_close_matches(name, list(state), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
                raise ValueError(f"update_weights: the model has no tensor named {name!r}{hint}")
            if tuple(value.shape) != tuple(state[name].shape):
                raise ValueError(f"update_weights: {name!r} has shape {tuple(value.shape)}, "
                                 f"the model expects {tuple(state[name].shape)}")

    def enable_lora(self, lora: dict, key: str = "lora") -> None:
        """Wrap the policy in the same LoRA adapter as the learner's (see `workers.learner.apply_lora`), so that
        weight updates carry only the adapter tensors (and the modules it trains whole); `key` names the recipe
        section in errors."""
        from posttrain.workers.learner import apply_lora

        self.model = apply_lora(self.model, lora, key).eval()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> int:
        return self.update_weights(state)
