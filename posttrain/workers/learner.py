"""Learner, reference and critic workers of the RL stage: plain classes (no Ray), wrapped by `workers.actors`.

`LearnerWorker` loads the policy from a checkpoint, owns a `posttrain.learner.Learner` (the loss and the update),
and can join a torch.distributed group for data parallelism (gloo on CPU, nccl on CUDA); with `fsdp` its model is
sharded across that group with FSDP2 (`shard_model`; see `posttrain.learner` and docs/fsdp.md). `ReferenceWorker`
holds the frozen initial policy and returns its log-probs (the KL anchor). `CriticWorker` holds PPO's value model:
the policy's backbone with a scalar head, trained with the clipped value loss.

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
from posttrain.workers.weight_sync import BroadcastSender


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


def decoder_layers(model) -> list[torch.nn.Module]:
    """The model's transformer blocks (the modules named in HF's `_no_split_modules`, through a PEFT wrapper),
    FSDP's units of sharding."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    layers = [m for m in base.modules() if type(m).__name__ in names]
    if not layers:  # a model without `_no_split_modules`: the blocks of its `layers` ModuleList
        layers = [m for name, lst in base.named_modules() if name.endswith("layers")
                  and isinstance(lst, torch.nn.ModuleList) for m in lst]
    return layers


def shard_model(model, device: torch.device, param_dtype: torch.dtype | None = None):
    """Shard `model` in place with FSDP2 (`fully_shard`) over the default process group: each decoder layer, then
    the root (embeddings, final norm, head). Parameters (fused 3-D experts included: plain nn.Parameters), their
    gradients and the optimizer state built on them become DTensors sharded on dim 0 across the ranks.

    Gradients are summed, not averaged, across ranks (divide factor 1): each rank's loss is already scaled by its
    share of the global count (`Learner.step`). Parameters a rank's forward did not use (experts no token of its
    share was routed to, in an MoE without fused experts) reduce as zeros, so that every rank's reduce-scatter
    matches. `param_dtype` (CUDA only, e.g. bf16): FSDP mixed precision, computing in that dtype while the sharded
    parameters, the reduced gradients (reduce_dtype fp32) and AdamW's state stay in the parameters' own dtype
    (fp32 master weights: load the model in fp32)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    if param_dtype is not None and device.type != "cuda":
        raise ValueError(f"FSDP mixed precision is for CUDA learners, not {device.type}")
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    mp = MixedPrecisionPolicy(param_dtype=param_dtype, reduce_dtype=torch.float32) if param_dtype else None
    kwargs = {"mesh": mesh} | ({"mp_policy": mp} if mp is not None else {})
    for layer in decoder_layers(model):
        fully_shard(layer, **kwargs)
    fully_shard(model, **kwargs)
    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.set_gradient_divide_factor(1.0)
            if device.type != "cuda":  # gloo has no PREMUL_SUM, which a divide factor asks for: plain SUM
                m.set_force_sum_reduction_for_comms(True)
            m.set_reduce_scatter_unused_params(True, recurse=False)
    return model


def node_ip() -> str:
    """This node's address for other nodes: Ray's view of it inside a Ray worker, else 127.0.0.1."""
    try:
        import ray
    except ImportError:
        return "127.0.0.1"
    return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"


class LearnerWorker(BroadcastSender):
    """The trained policy and its optimizer. `learner_kwargs` go to `Learner` (lr, clip ranges, loss_agg, kl_coef,
    tis_cap, ...: the recipe's `grpo`/`ppo` keys of the same meaning).

    fsdp (the recipe's `grpo.fsdp` / `ppo.fsdp`): the model is sharded with FSDP2 (`shard_model`) when the learner
    joins its process group (`init_distributed`), or, a single learner, on first use in a process group of its own.
    On CUDA it is loaded in fp32 (the master weights, as AdamW's state) and computes in `dtype` (mixed precision);
    on CPU it is loaded in `dtype`, without mixed precision. Sharded, `step`, `save_state`, `load_state` and
    `save_model` are collective (every rank calls them; rank 0 writes), and `weights` (rank 0) returns the whole
    weights gathered after the last applied step."""

    def __init__(self, model_path: str, *, device: str = "cpu", dtype: str = "float32",
                 experts_implementation: str = "grouped_mm", lora: dict | None = None, load_options: dict | None = None,
                 lora_key: str = "lora",
                 trainable: list[str] | None = None, seed: int = 0, fsdp: bool = False, **learner_kwargs):
        torch.manual_seed(seed)
        self.device = torch.device(device)
        self.fsdp, self.learner_kwargs = fsdp, learner_kwargs
        self._input = {"model_path": model_path, "dtype": getattr(torch, dtype), "lora": lora, "lora_key": lora_key,
                       "experts_implementation": experts_implementation, "load_options": load_options or {}}
        # sharded on CUDA: fp32 master weights, loaded on the CPU and moved to the GPU layer by layer by `fully_shard`
        mixed = fsdp and self.device.type == "cuda"
        self.param_dtype = getattr(torch, dtype) if mixed and dtype != "float32" else None
        model = load_model(model_path, device=torch.device("cpu") if mixed else self.device,
                           dtype=torch.float32 if mixed else getattr(torch, dtype),
                           experts_implementation=experts_implementation, **(load_options or {}))
        if lora:
            model = apply_lora(model, lora, lora_key)
        elif trainable:
            freeze_except(model, trainable)
        self.learner = Learner(model, **learner_kwargs)
        self.rank, self.world_size = 0, 1
        self._weights: dict[str, torch.Tensor] | None = None  # sharded: rank 0's gathered weights (`weights`)

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

        # CUDA: NCCL for the gradients and FSDP's collectives, gloo for the CPU tensors (counts, agreed skips)
        backend = "cpu:gloo,cuda:nccl" if self.device.type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
        self.rank, self.world_size = rank, world_size
        if self.fsdp:
            self._shard()
        return rank

    def _shard(self) -> None:
        """FSDP2 over the process group (joined first, one rank of its own, for a single learner); the `Learner`
        is built anew on the sharded parameters (before any step: nothing of its state is lost)."""
        import torch.distributed as dist

        if not dist.is_initialized():
            self.init_distributed(self.rendezvous(), 0, 1)  # shards on its way (fsdp)
            return
        model = shard_model(self.learner.model, self.device, self.param_dtype)
        self.learner = Learner(model, **self.learner_kwargs)
        self._gather_weights()

    def _ensure_sharded(self) -> None:
        if self.fsdp and not self.learner.sharded:
            self._shard()

    def _gather_weights(self) -> None:
        """Sharded: the whole trainable weights gathered from every rank (collective), kept on rank 0."""
        full = self.learner.trainable_weights(keep=self.rank == 0)
        if self.param_dtype is not None:  # fp32 masters: the rollout workers compute in the recipe's dtype
            full = {k: v.to(self.param_dtype) if v.is_floating_point() else v for k, v in full.items()}
        self._weights = full if self.rank == 0 else None

    # ----------------------------------------------------------------------------------------- training
    def step(self, batch, advantages, mask=None, *, mini_batches: int = 1, group_size: int = 1,
             ref_logp=None, demos=None) -> dict[str, float]:
        """`Learner.step` on this rank's share of the batch (whole groups) and of the ptx demonstrations."""
        self._ensure_sharded()
        dev = self.device
        batch = _to(batch, dev)
        metrics = self.learner.step(batch, advantages.to(dev), None if mask is None else mask.to(dev),
                                    mini_batches=mini_batches, group_size=group_size,
                                    ref_logp=None if ref_logp is None else ref_logp.to(dev),
                                    demos=None if demos is None else _to(demos, dev))
        if self.learner.sharded and metrics.get("actor/updates", 0.0) > 0:  # every rank agrees on it
            self._gather_weights()
        return metrics

    def weights(self) -> dict[str, torch.Tensor]:
        """The trainable weights on CPU (all of them for full fine-tuning, the adapter for LoRA). Sharded: rank 0's
        copy, gathered after the last applied step (so that the driver can ask rank 0 alone)."""
        self._ensure_sharded()
        if not self.learner.sharded:
            return self.learner.trainable_weights()
        if self._weights is None:
            raise RuntimeError(f"sharded learner rank {self.rank}: the whole weights are gathered on rank 0 only")
        return self._weights

    def counters(self) -> dict[str, int]:
        return {"updates": self.learner.updates, "skipped_steps": self.learner.skipped_steps}

    # ---------------------------------------------------------------------------------------- checkpoints
    def save_state(self, directory: str) -> None:
        """Weights, optimizer, RNG and counters into `directory` (which must exist), by rank 0; the other ranks of
        plain data parallelism do nothing. Sharded, every rank must call it: the whole weights and optimizer state
        are gathered to rank 0 (`_sharded_state`), which writes them."""
        self._ensure_sharded()
        weights, optimizer = (self._sharded_state() if self.learner.sharded
                              else (None, self.learner.optimizer.state_dict()))
        if self.rank != 0:
            return
        d = Path(directory)
        if weights is None:
            _save_weights(self.learner.model, d / "model.safetensors")
        else:
            from safetensors.torch import save_file

            save_file(weights, str(d / "model.safetensors"))
        _save_torch({"optimizer": optimizer, "rng": _rng_state(),
                     "updates": self.learner.updates, "skipped_steps": self.learner.skipped_steps},
                    d / "learner.pt")

    def _sharded_state(self) -> tuple[dict, dict]:
        """(model state dict, optimizer state dict keyed by parameter name), whole, on rank 0's CPU (collective;
        empty on the other ranks). The tied weights are separate copies (safetensors' `save_file` would refuse
        shared ones), so a sharded learner's state resumes into a sharded learner."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model, optim = self.learner.model, self.learner.optimizer
        weights = {k: v.detach().clone().contiguous() for k, v in get_model_state_dict(model, options=opts).items()}
        return weights, get_optimizer_state_dict(model, optim, options=opts)

    def load_state(self, directory: str) -> None:
        """What `save_state` wrote (every rank loads it; sharded, each rank keeps its shards)."""
        self._ensure_sharded()
        d = Path(directory)
        state = torch.load(d / "learner.pt", weights_only=True)
        if self.learner.sharded:
            from safetensors.torch import load_file
            from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                                 set_optimizer_state_dict)

            opts = StateDictOptions(full_state_dict=True)
            model, optim = self.learner.model, self.learner.optimizer
            set_model_state_dict(model, load_file(str(d / "model.safetensors")), options=opts)
            set_optimizer_state_dict(model, optim, state["optimizer"], options=opts)
        else:
            _load_weights(self.learner.model, d / "model.safetensors")
            self.learner.optimizer.load_state_dict(state["optimizer"])
        _set_rng_state(state["rng"])
        self.learner.updates, self.learner.skipped_steps = state["updates"], state["skipped_steps"]
        if self.learner.sharded:
            self._gather_weights()

    def save_model(self, directory: str, tokenizer_path: str) -> str:
        """The trained policy as an HF checkpoint (LoRA merged in), written atomically by rank 0. Sharded, every
        rank must call it: rank 0 loads the gathered weights into an unsharded copy of the input model."""
        from posttrain.model import load_tokenizer, save_model

        self._ensure_sharded()
        if self.learner.sharded:
            model = self._unsharded_copy()
        elif self.rank != 0:
            return directory
        else:
            model = self.learner.model
        if model is None:
            return directory
        if hasattr(model, "merge_and_unload"):
            import copy

            model = copy.deepcopy(model).merge_and_unload()
        model.eval()
        save_model(model, load_tokenizer(tokenizer_path), directory)
        return directory

    def _unsharded_copy(self):
        """Rank 0: the input model (LoRA-wrapped as trained), on the CPU in the recipe's dtype, with the sharded
        model's whole weights (gathered: collective); None on the other ranks."""
        from posttrain.distributed import full_tensor

        # tensor by tensor, under the model's own state-dict names (those of the copy: PEFT's prefixes included)
        full = {}
        for k, v in self.learner.model.state_dict().items():
            t = full_tensor(v.detach())
            if self.rank == 0:
                full[k] = t.cpu()
        if self.rank != 0:
            return None
        i = self._input
        model = load_model(i["model_path"], device=torch.device("cpu"), dtype=i["dtype"],
                           experts_implementation=i["experts_implementation"], **i["load_options"])
        if i["lora"]:
            model = apply_lora(model, i["lora"], i["lora_key"])
        model.load_state_dict(full)
        return model


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
