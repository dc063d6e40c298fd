"""Learner, reference and critic workers of the RL stage: plain classes (no Ray), wrapped by `workers.actors`.

`LearnerWorker` loads the policy from a checkpoint, owns a `posttrain.learner.Learner` (the loss and the update),
and can join a torch.distributed group for data parallelism (gloo on CPU, nccl on CUDA). `ReferenceWorker` holds
the frozen initial policy and returns its log-probs (the KL anchor). `CriticWorker` holds PPO's value model: the
policy's backbone with a scalar head, trained with the clipped value loss.

Checkpoint state (`save_state` / `load_state`): the model weights (safetensors), the optimizer state and the RNG
states (torch.save, read back with `weights_only=True`) in a directory the caller names; the caller makes the
directory appear atomically and turns a failed write into one message (see `posttrain.rlstate`).
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

import torch

from posttrain.learner import Learner, response_forward
from posttrain.model import load_model


def _rng_state() -> dict:
    import numpy as np

    name, keys, pos, has_gauss, cached = np.random.get_state()
    # plain types and tensors only, so that torch.load(weights_only=True) can read it back
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype("int64")), pos, has_gauss, cached)}


def _set_rng_state(state: dict) -> None:
    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype("uint32"), pos, has_gauss, cached))


def _save_weights(model, path: Path) -> None:
    """safetensors' `save_model` (it de-duplicates tied weights such as embed_tokens / lm_head)."""
    from safetensors.torch import save_model as save_st

    save_st(model, str(path))


def _save_torch(obj, path: Path) -> None:
    """`torch.save` through a Python file, so that a write that fails (a full disk) raises the OSError it is (errno
    and all; it crosses from a Ray actor intact) rather than torch's bare "unexpected pos" RuntimeError."""
    with open(path, "wb") as f:
        try:
            torch.save(obj, f)
        except RuntimeError as e:
            cause = e.__context__
            if not isinstance(cause, OSError):
                raise
            raise OSError(cause.errno, cause.strerror, str(path)) from e


def _load_weights(model, path: Path) -> None:
    from safetensors.torch import load_model as load_st

    load_st(model, str(path), strict=True)


def apply_lora(model, lora: dict, key: str = "lora"):
    """Wrap `model` in a PEFT LoRA model from a recipe `lora` section (as a dict); the rollout workers wrap their
    copy the same way, so the adapter tensors have the same names on both sides."""
    from peft import get_peft_model

    from posttrain.config import LoraConfig
    from posttrain.model import peft_config

    torch.manual_seed(0)  # the same initial adapter everywhere (B = 0, so the wrapped model is the input model)
    return get_peft_model(model, peft_config(LoraConfig(**{**lora, "enabled": True}), model, key))


def freeze_except(model, patterns: list[str]) -> int:
    """Train only the parameters whose name matches one of the regular expressions; returns how many tensors
    stay trainable. An empty match is an error naming the patterns and a few parameter names."""
    import re

    regexes = [re.compile(p) for p in patterns]
    kept = 0
    for name, p in model.named_parameters():
        keep = any(r.search(name) for r in regexes)
        p.requires_grad_(keep)
        kept += keep
    if kept == 0:
        names = [n for n, _ in model.named_parameters()][:4]
        raise ValueError(f"trainable {patterns} matches no parameter (names look like {names})")
    return kept


def node_ip() -> str:
    """This node's address for other nodes: Ray's view of it inside a Ray worker, else 127.0.0.1."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class LearnerWorker:
    """The trained policy and its optimizer. `learner_kwargs` go to `Learner` (lr, clip ranges, loss_agg, kl_coef,
    tis_cap, ...: the recipe's `grpo`/`ppo` keys of the same meaning)."""

    def __init__(self, model_path: str, *, device: str = "cpu", dtype: str = "float32",
                 experts_implementation: str = "grouped_mm", lora: dict | None = None, load_options: dict | None = None,
                 lora_key: str = "lora",
                 trainable: list[str] | None = None, seed: int = 0, **learner_kwargs):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        model = load_model(model_path, device=self.device, dtype=getattr(torch, dtype),
                           experts_implementation=experts_implementation, **(load_options or {}))
        if lora:
            model = apply_lora(model, lora, lora_key)
        elif trainable:
            freeze_except(model, trainable)
        self.learner = Learner(model, **learner_kwargs)
        self.rank, self.world_size = 0, 1

    # ----------------------------------------------------------------------------------- data parallelism
    def rendezvous(self) -> str:
        """A free `tcp://host:port` on this node for `init_distributed` (called on rank 0). Inside a Ray worker the
        host is this node's IP as Ray knows it (`ray.util.get_node_ip_address`), which the other nodes of a cluster
        reach; outside Ray (tests, one process per rank) the loopback address."""
        host = node_ip()
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return f"tcp://{host}:{port}"

    def init_distributed(self, init_method: str, rank: int, world_size: int) -> int:
        """Join the process group (all ranks call this at once); returns the rank."""
        import torch.distributed as dist

        backend = "nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        return rank

    # ----------------------------------------------------------------------------------------- training
    def step(self, batch, advantages, mask=None, *, mini_batches: int = 1, group_size: int = 1,
             ref_logp=None, demos=None) -> dict[str, float]:
        """`Learner.step` on this rank's share of the batch (whole groups) and of the ptx demonstrations."""
        dev = self.device
        batch = _to(batch, dev)
        return self.learner.step(batch, advantages.to(dev), None if mask is None else mask.to(dev),
                                 mini_batches=mini_batches, group_size=group_size,
                                 ref_logp=None if ref_logp is None else ref_logp.to(dev),
                                 demos=None if demos is None else _to(demos, dev))

    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights on CPU (all of them for full fine-tuning, the adapter for LoRA)."""
        return self.learner.trainable_weights()

    def counters(self) -> dict[str, int]:
        return {"updates": self.learner.updates, "skipped_steps": self.learner.skipped_steps}

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_state(self, directory: str) -> None:
        """Weights, optimizer, RNG and counters into `directory` (which must exist)."""
        d = Path(directory)
        _save_weights(self.learner.model, d / "model.safetensors")
        _save_torch({"optimizer": self.learner.optimizer.state_dict(), "rng": _rng_state(),
                     "updates": self.learner.updates, "skipped_steps": self.learner.skipped_steps},
                    d / "learner.pt")

    def load_state(self, directory: str) -> None:
        d = Path(directory)
        _load_weights(self.learner.model, d / "model.safetensors")
        state = torch.load(d / "learner.pt", weights_only=True)
        self.learner.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.learner.updates, self.learner.skipped_steps = state["updates"], state["skipped_steps"]

    def save_model(self, directory: str, tokenizer_path: str) -> str:
        """The trained policy as an HF checkpoint (LoRA merged in), written atomically."""
        from posttrain.model import load_tokenizer, save_model

        model = self.learner.model
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.eval()
        save_model(model, load_tokenizer(tokenizer_path), directory)
        return directory


class ReferenceWorker:
    """The frozen initial policy: log-probs of rollout tokens for the KL term."""

    def __init__(self, model_path: str, *, device: str = "cpu", dtype: str = "float32",
                 experts_implementation: str = "grouped_mm", load_options: dict | None = None):
        self.device = torch.device(device)
        self.model = load_model(model_path, device=self.device, dtype=getattr(torch, dtype),
                                experts_implementation=experts_implementation,
                                **(load_options or {})).eval().requires_grad_(False)

    @torch.no_grad()
    def logp(self, batch, chunk: int = 32) -> torch.Tensor:
        """(B, T) reference log-probs of the batch's response tokens (0 off the response), on CPU."""
        from posttrain.learner import gather_logp

        from posttrain.rlbatch import compact

        b = _to(batch, self.device)
        out = torch.zeros(b.response_ids.shape, dtype=torch.float32)
        for lo in range(0, len(b), chunk):  # blocks of rows with their own padding trimmed
            part, cols = compact(b, lo, min(lo + chunk, len(b)))
            logits, _ = response_forward(self.model, part.prompt_ids, part.prompt_mask, part.response_ids,
                                         part.response_mask)
            out[lo:lo + chunk, cols] = (gather_logp(logits, part.response_ids) * part.response_mask).cpu()
        return out


class ValueModel(torch.nn.Module):
    """A causal LM's backbone with a scalar value head on the last hidden state (as TRL's/OpenRLHF's critics)."""

    def __init__(self, lm):
        super().__init__()
        self.backbone = lm.model
        self.head = torch.nn.Linear(lm.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, prompt_ids, prompt_mask, response_ids, response_mask) -> torch.Tensor:
        """(B, T) value of the state before each response token (the state the token's action is taken in)."""
        ids = torch.cat([prompt_ids, response_ids], dim=1)
        mask = torch.cat([prompt_mask, response_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        hidden = self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions,
                               use_cache=False).last_hidden_state
        P, T = prompt_ids.shape[1], response_ids.shape[1]
        return self.head(hidden[:, P - 1:P + T - 1].float()).squeeze(-1)


class CriticWorker:
    """PPO's critic: values at rollout time and clipped value-loss updates (AdamW)."""

    def __init__(self, model_path: str, *, device: str = "cpu", dtype: str = "float32",
                 experts_implementation: str = "grouped_mm", lr: float = 1e-4, value_clip: float | None = 0.2,
                 max_grad_norm: float = 1.0, seed: int = 0, load_options: dict | None = None):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        lm = load_model(model_path, device=self.device, dtype=getattr(torch, dtype),
                        experts_implementation=experts_implementation, **(load_options or {}))
        self.model = ValueModel(lm).to(self.device)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=lr)
        self.value_clip, self.max_grad_norm = value_clip, max_grad_norm
        self.skipped_steps = 0

    @torch.no_grad()
    def values(self, batch) -> torch.Tensor:
        """(B, T) values of the batch's response positions, on CPU (0 off the response)."""
        b = _to(batch, self.device)
        self.model.eval()
        return (self.model(b.prompt_ids, b.prompt_mask, b.response_ids, b.response_mask) * b.response_mask).cpu()

    def step(self, batch, returns: torch.Tensor, old_values: torch.Tensor, mask: torch.Tensor, *,
             mini_batches: int = 1, group_size: int = 1) -> dict[str, float]:
        """One clipped value-loss update per mini-batch; a non-finite loss or gradient skips the update."""
        import math

        from posttrain.algo.losses import clip_grad_norm, compute_value_loss, finite_or_skip
        from posttrain.learner import _average, group_bounds

        b = _to(batch, self.device)
        returns, old_values, mask = returns.to(self.device), old_values.to(self.device), mask.to(self.device)
        self.model.train()
        collected = []
        for lo, hi in group_bounds(len(b), group_size, mini_batches):
            r = slice(lo, hi)
            if hi <= lo or not bool(mask[r].any()):
                continue
            v = self.model(b.prompt_ids[r], b.prompt_mask[r], b.response_ids[r], b.response_mask[r])
            loss, metrics = compute_value_loss(v, old_values[r], returns[r], mask[r], clip=self.value_clip)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            norm = clip_grad_norm(self.params, self.max_grad_norm)
            ok, _ = finite_or_skip(loss, self.params)
            if ok and math.isfinite(norm):
                self.optimizer.step()
            else:
                self.skipped_steps += 1
            metrics["critic/grad_norm"] = norm
            collected.append(metrics)
        self.model.eval()
        out = _average(collected) if collected else {}
        out.pop("actor/clipfrac", None)
        return out | {"critic/skipped_steps": float(self.skipped_steps)}

    def save_state(self, directory: str) -> None:
        d = Path(directory)
        _save_weights(self.model, d / "critic.safetensors")
        _save_torch({"optimizer": self.optimizer.state_dict(), "skipped_steps": self.skipped_steps},
                    d / "critic.pt")

    def load_state(self, directory: str) -> None:
        d = Path(directory)
        _load_weights(self.model, d / "critic.safetensors")
        state = torch.load(d / "critic.pt", weights_only=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.skipped_steps = state["skipped_steps"]


def _to(batch, device):
    """The batch with its tensors on `device` (a no-op on the same device)."""
    import dataclasses

    if all(not isinstance(v, torch.Tensor) or v.device == device for v in vars(batch).values()):
        return batch
    return dataclasses.replace(batch, **{k: v.to(device) for k, v in vars(batch).items()
                                         if isinstance(v, torch.Tensor)})
