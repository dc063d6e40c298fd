"""`posttrain bench`'s sharded-learner figure (issue #25): what one learner rank holds with FSDP2 over `ranks` gloo
processes, against one unsharded learner, on the bench's model, each after one real GRPO update.

Per rank, counted from the tensors themselves (exact, unlike RSS): the trainable parameters it holds (a DTensor's
local shard), AdamW's two moments, and the gradients (the parameters' size: held from the backward to the optimizer
step); and the process's peak RSS, which also counts what FSDP does not shard (the model as loaded before
`fully_shard`, the activations, torch itself). Data parallel as the RL stage runs it: the unsharded learner takes
the whole batch (`rows` rows), each rank its share of the groups. Every learner is a spawned process of its own (1
torch thread), the unsharded one first and alone, then the ranks together (file rendezvous), so no figure counts
another's memory.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

GROUP = 4


def _batch(vocab: int, rows: int, seed: int, prompt_len: int = 16, response_len: int = 48):
    """A GRPO batch of `rows` rows (groups of GROUP), random tokens of the model's vocabulary, ragged lengths."""
    import torch

    from posttrain.workers.rollout import RolloutBatch

    g = torch.Generator().manual_seed(seed)
    P, T = prompt_len, response_len
    prompt_mask = (torch.arange(P)[None] >= P - torch.randint(4, P + 1, (rows,), generator=g)[:, None]).long()
    response_mask = (torch.arange(T)[None] < torch.randint(T // 2, T + 1, (rows,), generator=g)[:, None]).long()
    batch = RolloutBatch(prompt_ids=torch.randint(3, vocab, (rows, P), generator=g), prompt_mask=prompt_mask,
                         response_ids=torch.randint(3, vocab, (rows, T), generator=g), response_mask=response_mask,
                         logp=-3.0 * response_mask.float(), forced_mask=torch.zeros(rows, T, dtype=torch.bool),
                         n_think=[1] * rows, closed=[True] * rows, forced=[False] * rows,
                         group_index=[i // GROUP for i in range(rows)], budgets=[None] * rows, texts=[""] * rows)
    return batch, torch.randn(rows, generator=g)


def held_bytes(learner) -> dict:
    """Bytes of the trainable parameters, of their gradients (the same size) and of AdamW's moments on this rank."""
    from posttrain.distributed import local_shard

    params = sum(local_shard(p).numel() * p.element_size() for p in learner.params)
    adam = sum(local_shard(t).numel() * t.element_size() for s in learner.optimizer.state.values()
               for k, t in s.items() if k in ("exp_avg", "exp_avg_sq"))
    return {"params": params, "grads": params, "adam": adam, "total": 2 * params + adam}


def _learner_main(rank: int, world: int, rendezvous: str, model_path: str, rows: int, out: str) -> None:
    """One learner process: load, join the group (world > 1: sharded), one update on its share, report."""
    import resource

    import torch

    from posttrain.rlbatch import select_rows
    from posttrain.workers.learner import LearnerWorker

    torch.set_num_threads(1)
    w = LearnerWorker(model_path, fsdp=world > 1, lr=1e-5, max_grad_norm=1.0, router_metrics=False)
    if world > 1:
        w.init_distributed(rendezvous, rank, world)
    vocab = w.learner.model.get_input_embeddings().weight.shape[0]
    batch, adv = _batch(vocab, rows, seed=0)
    share = rows // world
    lo, hi = rank * share, (rank + 1) * share
    t0 = time.perf_counter()
    metrics = w.step(select_rows(batch, lo, hi), adv[lo:hi], group_size=GROUP)
    seconds = time.perf_counter() - t0
    report = held_bytes(w.learner) | {"step_s": seconds, "updates": metrics.get("actor/updates", 0.0),
                                      "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    if world > 1:
        import torch.distributed as dist

        dist.destroy_process_group()
    Path(out).write_text(json.dumps(report))


def _spawn(world: int, model_path: Path, rows: int, tmp: Path, timeout: float) -> list[dict]:
    ctx = multiprocessing.get_context("spawn")
    rdv = f"file://{tmp / f'rdv{world}'}"
    outs = [tmp / f"fsdp_{world}_{r}.json" for r in range(world)]
    procs = [ctx.Process(target=_learner_main, args=(r, world, rdv, str(model_path), rows, str(outs[r])))
             for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    failed = [r for r, p in enumerate(procs) if p.exitcode != 0]
    for p in procs:
        if p.is_alive():
            p.kill()
    if failed:
        raise RuntimeError(f"bench fsdp: learner rank(s) {failed} of {world} failed (exit codes "
                           f"{[procs[r].exitcode for r in failed]}); their traceback is above")
    return [json.loads(o.read_text()) for o in outs]


def bench_fsdp(model_path: Path, ranks: int, tmp: Path, rows: int = 8, timeout: float = 600) -> dict:
    """The unsharded learner and `ranks` FSDP2 ranks, one update each on the same batch (see the module
    docstring). Returns both reports and the per-rank ratios (rank 0's bytes over the unsharded learner's)."""
    if rows % (ranks * GROUP):
        raise ValueError(f"bench fsdp: {rows} rows do not split into whole groups of {GROUP} over {ranks} ranks")
    tmp.mkdir(parents=True, exist_ok=True)
    [one] = _spawn(1, model_path, rows, tmp, timeout)
    sharded = _spawn(ranks, model_path, rows, tmp, timeout)
    return {"ranks": ranks, "rows": rows, "unsharded": one, "per_rank": sharded,
            "held_ratio": max(r["total"] for r in sharded) / one["total"],
            "peak_rss_ratio": max(r["peak_rss"] for r in sharded) / one["peak_rss"]}


def format_fsdp(f: dict) -> str:
    mib = 2 ** 20
    one, ranks = f["unsharded"], f["per_rank"]
    held = " / ".join(f"{r['total'] / mib:.1f}" for r in ranks)
    rss = " / ".join(f"{r['peak_rss'] / mib:.0f}" for r in ranks)
    return (f"fsdp: per learner rank at {f['ranks']} gloo ranks, params + grads + AdamW held {held} MiB against "
            f"{one['total'] / mib:.1f} unsharded ({f['held_ratio']:.2f}x); peak RSS {rss} MiB against "
            f"{one['peak_rss'] / mib:.0f} ({f['peak_rss_ratio']:.2f}x: the load before sharding, activations and "
            f"torch are not sharded); one update {max(r['step_s'] for r in ranks):.2f} s against "
            f"{one['step_s']:.2f} s on {f['rows']} rows")
