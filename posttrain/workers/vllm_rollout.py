"""The `vllm` rollout engine: a `RolloutWorker` whose sampling runs in vLLM, with the HF engine's budget semantics.

`VLLMRolloutWorker` takes the same calls as `posttrain.workers.rollout.RolloutWorker` (the `hf` engine, the
reference): `generate` returns the same `RolloutBatch`, `load` serves another checkpoint (a PEFT adapter is merged
first, vLLM on CPU has no LoRA path), `update_weights` takes the learner's tensors by the names of the HF model's
state dict. vLLM itself runs in a child process (`posttrain.workers.vllm_server`) under the interpreter
`rollout_engine.python` names, so its pins may live in a virtualenv of their own; prompts are rendered and
responses decoded here, with the checkpoint's own tokenizer and chat template, so both engines see the same
prompt token ids.

Budget semantics, by stop-and-continue (no logits processor, so any vLLM version and device does it):
- a capped row (an int budget N with `cap`, or the prompt's budget 0) first samples at most N + 1 tokens, stopping
  at `</think>` or EOS. If the (N+1)-th token is not `</think>` (an EOS included), it is replaced by a forced
  `</think>` (marked in `forced_mask`, so the learner leaves it out of the loss; its log-prob is the model's
  log-prob of `</think>` there, read as the last prompt token's of the continuation), exactly where the HF loop
  forces it: after N thinking tokens, and only when the row's own sample was not `</think>` already;
- every row then continues to EOS or `max_new_tokens` in one more request (the prompt plus what it has so far);
- natural mode (`cap=False`) and autonomous rows are one request each.
Each row is its own request with its own seed (`seed` + row, the continuation `seed` + row + 2**31), so a batch is
reproducible and a group's samples differ. Greedy is temperature 0. Log-probs are vLLM's raw log-probs (the
policy at temperature 1, as the HF loop records). Routing is not recorded (`record_routing=True` is refused:
routing replay needs the `hf` engine), and a row cannot take new weights mid-sample (no partial rollouts).
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from posttrain.decode import RolloutBatch, check_generate_args, render_prompts
from posttrain.model import load_model, load_tokenizer
from posttrain.workers.rollout import RolloutWorker

SERVER = Path(__file__).with_name("vllm_server.py")
_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


class VLLMEngineError(RuntimeError):
    """The vLLM child process failed to start or to answer; the message carries its traceback or log tail."""


def vllm_python(python: str | None) -> str:
    """The interpreter that runs vLLM: `python` (the recipe's `rollout_engine.python`), else $POSTTRAIN_VLLM_PYTHON,
    else this one."""
    return python or os.environ.get("POSTTRAIN_VLLM_PYTHON") or sys.executable


class _Child:
    """One vLLM server process and its authenticated socket."""

    def __init__(self, python: str, env: Mapping[str, str], start_timeout_s: float):
        from multiprocessing.connection import Listener

        self._dir = tempfile.mkdtemp(prefix="posttrain-vllm-")
        address = os.path.join(self._dir, "sock")
        key = secrets.token_bytes(32)
        listener = Listener(address, family="AF_UNIX", authkey=key)
        self.log_path = os.path.join(self._dir, "server.log")
        child_env = {**os.environ, **env, "POSTTRAIN_VLLM_AUTHKEY": key.hex()}
        with open(self.log_path, "wb") as log:
            try:
                self.proc = subprocess.Popen([python, str(SERVER), address], env=child_env, stdout=log,
                                             stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except OSError as e:
                listener.close()
                shutil.rmtree(self._dir, ignore_errors=True)
                raise VLLMEngineError(f"rollout_engine.python: cannot run {python!r}: {e}") from e
        accepted: list = []
        thread = threading.Thread(target=lambda: accepted.append(listener.accept()), daemon=True)
        thread.start()
        deadline = time.monotonic() + start_timeout_s
        while thread.is_alive() and self.proc.poll() is None and time.monotonic() < deadline:
            thread.join(0.2)
        listener.close()
        if not accepted:
            why = self.tail()
            self.close()
            raise VLLMEngineError(f"the vLLM server ({python}) did not connect: {why}")
        self.conn = accepted[0]

    def tail(self, n: int = 20) -> str:
        try:
            lines = Path(self.log_path).read_text(errors="replace").splitlines()
        except OSError:
            return "(no log)"
        return "\n".join(lines[-n:]) or "(empty log)"

    def request(self, op: str, **kwargs):
        try:
            self.conn.send((op, kwargs))
            while not self.conn.poll(1.0):
                if self.proc.poll() is not None:
                    raise EOFError
            status, value = self.conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            raise VLLMEngineError(f"the vLLM server died during {op!r} (exit {self.proc.poll()}): "
                                  f"{self.tail()}") from e
        if status != "ok":
            raise VLLMEngineError(f"vLLM failed in {op!r}:\n{value}")
        return value

    def close(self) -> None:
        conn = getattr(self, "conn", None)
        if conn is not None and self.proc.poll() is None:
            try:
                conn.send(("close", {}))
                self.proc.wait(timeout=30)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)  # the socket and the server's log


class VLLMRolloutWorker(RolloutWorker):
    """A `RolloutWorker` that samples with vLLM (see the module docstring for what differs and what does not).

    `engine`: the recipe's `rollout_engine` section as a dict (`python`, `gpu_memory_utilization`,
    `kv_cache_gib`, `max_model_len`, `max_num_seqs`, `max_num_batched_tokens`, `enforce_eager`,
    `start_timeout_s`)."""

    def __init__(self, model_path, device="cpu", dtype=torch.float32, threads: int = 1,
                 experts_implementation: str = "grouped_mm", load_options: dict | None = None,
                 engine: dict | None = None):
        self.device = torch.device("cpu")  # the tensors of the batches live here; vLLM has its own device
        self.engine_device = torch.device(device)
        self.dtype, self.experts_implementation = dtype, experts_implementation
        self.load_options = load_options or {}
        self.engine = dict(engine or {})
        self.threads = threads
        env = {"OMP_NUM_THREADS": str(threads), "VLLM_CPU_OMP_THREADS_BIND": "nobind",
               "VLLM_CPU_KVCACHE_SPACE": str(int(self.engine.get("kv_cache_gib", 1))),
               "TOKENIZERS_PARALLELISM": "false"}
        self.child = _Child(vllm_python(self.engine.get("python")), env,
                            float(self.engine.get("start_timeout_s", 600)))
        self._merged_dir: tempfile.TemporaryDirectory | None = None
        try:
            self.load(model_path)
        except BaseException:
            self.close()  # no vLLM process left behind by a worker that failed to start
            raise

    # ------------------------------------------------------------------ models

    def load(self, checkpoint, adapter=None) -> None:
        """Serve `checkpoint`, with a PEFT adapter merged into it first when `adapter` is given (saved to a
        temporary directory, which vLLM then loads)."""
        served, tokenizer_dir = Path(checkpoint), Path(checkpoint)
        if adapter is not None and (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_dir = Path(adapter)
        tokenizer = load_tokenizer(tokenizer_dir, self.load_options.get("trust_remote_code", False))
        # this worker's CPU copy of the HF model (the adapter merged in): the names and shapes `update_weights`
        # checks, and the whole state dict it reloads into vLLM
        model = load_model(checkpoint, dtype=torch.float32, **self.load_options)
        if adapter is not None:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
            if self._merged_dir is not None:
                self._merged_dir.cleanup()
            self._merged_dir = tempfile.TemporaryDirectory(prefix="posttrain-vllm-merged-")
            served = Path(self._merged_dir.name)
            model.save_pretrained(served)
            tokenizer.save_pretrained(served)
        self.bind(model.eval(), tokenizer)
        kwargs = {"model": str(served), "dtype": _DTYPES.get(self.dtype, "auto"), "skip_tokenizer_init": True,
                  "enforce_eager": bool(self.engine.get("enforce_eager", True)), "seed": 0,
                  "trust_remote_code": bool(self.load_options.get("trust_remote_code", False)),
                  "gpu_memory_utilization": float(self.engine.get("gpu_memory_utilization", 0.5))}
        if self.engine.get("max_model_len"):
            kwargs["max_model_len"] = int(self.engine["max_model_len"])
        self.max_seqs = int(self.engine.get("max_num_seqs", 256))
        self.max_tokens = int(self.engine.get("max_num_batched_tokens", 16384))
        kwargs.update(max_num_seqs=self.max_seqs, max_num_batched_tokens=self.max_tokens)
        if self.engine_device.type == "cpu":
            kwargs.pop("gpu_memory_utilization")
        self.vllm_version = self.child.request("load", **kwargs)
        self.version = 0

    def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                       version: int | None = None) -> int:
        """Copy the given tensors (names of the HF model's state dict, a subset is fine) into vLLM's model; returns
        how many. Every name and shape is checked first, so a bad update changes nothing.

        vLLM repacks some weights after loading them (on CPU the router and experts), so a tensor cannot be
        swapped alone: the update goes into this worker's CPU copy of the HF model, and its whole state dict, in
        the checkpoint's serialized names and layout (`transformers`' `revert_weight_conversion`: fused 3-D
        experts back to one matrix per expert), is reloaded in place by vLLM (`Worker.reload_weights`, which
        reprocesses each layer). `last_sync_bytes`: the bytes sent."""
        from safetensors.torch import save
        from transformers.core_model_loading import revert_weight_conversion

        n = RolloutWorker.update_weights(self, named_tensors)  # checked, then copied into the CPU copy
        serial = revert_weight_conversion(self.model, {k: v.detach() for k, v in self.model.state_dict().items()})
        # safetensors bytes, not pickled tensors: torch's pickling would share storages by file descriptor, which
        # an unrelated process cannot take; the per-expert views of one fused tensor are copied apart first
        blob = save({k: v.clone().contiguous() for k, v in serial.items()})
        self.child.request("load_weights", weights=blob)
        self.last_sync_bytes = len(blob)
        if version is not None:
            self.version = int(version)
        return n

    def enable_lora(self, lora: dict, key: str = "lora") -> None:
        raise ValueError(f"{key}: the vllm rollout engine takes no LoRA adapter (vLLM's LoRA path needs Triton, and "
                         f"fused experts a mixed-MoE format); use rollout_engine.name: hf with LoRA")

    def close(self) -> None:
        """End the vLLM process (also at garbage collection)."""
        if getattr(self, "child", None) is not None:
            self.child.close()
            self.child = None
        if self._merged_dir is not None:
            self._merged_dir.cleanup()
            self._merged_dir = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # ------------------------------------------------------------------ sampling

    def _generate(self, requests: list[dict]) -> list:
        """Send `requests` in calls of at most `max_num_seqs` requests and `max_num_batched_tokens` prompt tokens,
        so that vLLM prefills every prompt of a call in its first step (never a chunked prefill)."""
        out, call, tokens = [], [], 0
        for r in requests:
            n = len(r["prompt_token_ids"])
            if n > self.max_tokens:
                raise ValueError(f"rollout_engine.max_num_batched_tokens: a prompt of {n} tokens does not fit in "
                                 f"{self.max_tokens}; raise it")
            if call and (len(call) == self.max_seqs or tokens + n > self.max_tokens):
                out += self.child.request("generate", requests=call)
                call, tokens = [], 0
            call.append(r)
            tokens += n
        if call:
            out += self.child.request("generate", requests=call)
        return out

    @torch.no_grad()
    def generate(self, prompts: list[str], budgets: list[int | None], group_size: int, max_new_tokens: int,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int | None = None, greedy: bool = False,
                 cap: bool = True, record_routing: bool = False, budget_in_prompt: bool = True,
                 generator: torch.Generator | None = None) -> RolloutBatch:
        """`Decoder.generate`'s contract (see it for every argument), sampled by vLLM."""
        check_generate_args(prompts, budgets, group_size, max_new_tokens, temperature, top_p)
        if record_routing:
            raise ValueError("the vllm rollout engine does not record routing: routing replay needs "
                             "rollout_engine.name: hf")
        greedy = greedy or temperature == 0
        if seed is None:
            seed = int(torch.randint(2**31 - 1, (1,), generator=generator).item())
        shown = budgets if budget_in_prompt else [None] * len(budgets)
        prompt_ids, prompt_mask = self._encode(render_prompts(self.tokenizer, prompts, shown))
        preclosed = [b == 0 for b in shown]
        rows = []  # per row: (its prompt ids, its thinking cap or None)
        for i, (b, pre) in enumerate(zip(budgets, preclosed)):
            ids = prompt_ids[i][prompt_mask[i].bool()].tolist()
            row_cap = int(b) if (not pre and cap and b is not None) else None
            rows += [(ids, row_cap)] * group_size
        temp = 0.0 if greedy else float(temperature)
        tp = 1.0 if greedy else float(top_p)

        def request(r, ids, max_tokens, stops, offset=0, prompt_logprob=False):
            return {"prompt_token_ids": ids, "max_tokens": max_tokens, "stop_token_ids": stops,
                    "temperature": temp, "top_p": tp, "seed": (seed + r + offset) % 2**63,
                    "prompt_logprob": prompt_logprob}

        # first pass: capped rows up to their cap + 1 (stopping at </think>), the others to the end
        first = []
        for r, (ids, c) in enumerate(rows):
            if c is None:
                first.append(request(r, ids, max_new_tokens, [self.eos_id]))
            else:
                first.append(request(r, ids, min(c + 1, max_new_tokens), [self.think_end_id, self.eos_id]))
        out = self._generate(first)
        tokens = [list(ids) for ids, _, _ in out]
        logps = [list(lp) for _, lp, _ in out]
        forced_at: list[int | None] = [None] * len(rows)
        again = []  # rows to continue: (row, needs the forced token's log-prob)
        for r, (ids, c) in enumerate(rows):
            toks = tokens[r]
            if c is None or not toks:
                continue
            if toks[-1] == self.think_end_id:
                if len(toks) < max_new_tokens:
                    again.append((r, False))
            elif len(toks) == c + 1:  # spent its budget with no </think>: force it in place of the sample (an
                toks[-1] = self.think_end_id  # EOS too, as the HF loop does)
                forced_at[r] = c
                again.append((r, True))
            # else: EOS before the budget ran out, or max_new_tokens reached: the row is done
        if again:
            second = [request(r, rows[r][0] + tokens[r], max(1, max_new_tokens - len(tokens[r])), [self.eos_id],
                              offset=2**31, prompt_logprob=forced) for r, forced in again]
            for (r, forced), (ids, lps, last) in zip(again, self._generate(second)):
                if forced:
                    logps[r][-1] = last
                room = max_new_tokens - len(tokens[r])
                tokens[r] += list(ids)[:room]
                logps[r] += list(lps)[:room]
        n = len(rows)
        tok_t = torch.full((n, max_new_tokens), self.pad_id, dtype=torch.long)
        logp_t = torch.zeros((n, max_new_tokens), dtype=torch.float32)
        forced_t = torch.zeros((n, max_new_tokens), dtype=torch.bool)
        for r in range(n):
            k = len(tokens[r])
            tok_t[r, :k] = torch.tensor(tokens[r], dtype=torch.long)
            logp_t[r, :k] = torch.tensor(logps[r], dtype=torch.float32)
            if forced_at[r] is not None:
                forced_t[r, forced_at[r]] = True
        batch = self._batch(prompt_ids, prompt_mask, tok_t, logp_t, forced_t, budgets, group_size, preclosed)
        batch.versions = [self.version] * len(batch)
        return batch
