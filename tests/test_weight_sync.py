"""Weight sync by broadcast (`posttrain.workers.weight_sync`, issue #25): the bucket plan, the wire format, and real
gloo groups between a sender and rollout workers (ranks in threads of this process, each with its own group
object, as in separate actors). The RL stage with `weight_sync.method: broadcast` on Ray actors, with workers dying
in it, is in `test_reliability_ray.py`."""

import threading

import pytest
import torch

from posttrain.workers.weight_sync import (BroadcastGroup, BroadcastReceiver, BroadcastSender, buckets, pack,
                                           specs_of, unpack)


def _url() -> str:
    from posttrain.workers.learner import LearnerWorker

    return LearnerWorker.rendezvous(None)


def _ranks(*targets, timeout=60):
    """Run each target(rank) in a thread of its own; their results (or re-raised errors) in rank order."""
    out, errors = [None] * len(targets), []

    def run(i, f):
        try:
            out[i] = f(i)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, f)) for i, f in enumerate(targets)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a rank hung"
    if errors:
        raise errors[0]
    return out


def _mixed() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {"a": torch.randn(3, 5, generator=g), "b": torch.randn(7, generator=g).to(torch.bfloat16),
            "c": torch.randn(2, 2, 2, generator=g).to(torch.bfloat16), "d": torch.randn(40, generator=g),
            "e": torch.randn(1, generator=g), "f": torch.randint(0, 9, (4,), generator=g)}


def test_buckets_keep_order_one_dtype_each_and_the_size_limit():
    specs = specs_of(_mixed())
    for limit in (1, 16, 64, 200, 1 << 20):
        plan = buckets(specs, limit)
        assert [i for b in plan for i in b] == list(range(len(specs)))
        for b in plan:
            assert len({specs[i][2] for i in b}) == 1
            size = sum(torch.Size(specs[i][1]).numel() * getattr(torch, specs[i][2]).itemsize for i in b)
            assert size <= limit or len(b) == 1
    # by hand at 64 bytes: a (60 B fp32) | b, c (14 + 16 B bf16) | d (160 B: alone) | e (4 B fp32) | f (int64)
    assert buckets(specs, 64) == [[0], [1, 2], [3], [4], [5]]
    assert buckets(specs, 1 << 20) == [[0], [1, 2], [3, 4], [5]]


def test_pack_and_unpack_are_inverse():
    named = _mixed()
    specs = specs_of(named)
    for idx in buckets(specs, 64):
        part = [specs[i] for i in idx]
        back = unpack(pack([named[s[0]] for s in part], torch.device("cpu")), part)
        for s, t in zip(part, back):
            assert t.dtype == named[s[0]].dtype and torch.equal(t, named[s[0]])
    with pytest.raises(ValueError, match="holds 15 by its specs"):
        unpack(torch.zeros(16), [specs[0]])


def test_a_gloo_group_delivers_every_tensor_bit_for_bit():
    named, url = _mixed(), _url()
    specs = specs_of(named)

    def sender(rank):
        return BroadcastGroup(url, rank, 3, "gloo", 30).send(named, specs, 64)

    def receiver(rank):
        return BroadcastGroup(url, rank, 3, "gloo", 30).recv(specs, 64)

    sent, *received = _ranks(sender, receiver, receiver)
    assert sent == sum(t.numel() * t.element_size() for t in named.values())
    for got in received:
        assert list(got) == list(named)
        assert all(got[k].dtype == v.dtype and torch.equal(got[k], v) for k, v in named.items())


class _Learner(BroadcastSender):
    """What `BroadcastSender` needs of a learner: `weights()` (and `rendezvous`, not used here)."""

    def __init__(self, named):
        self.named = named

    def weights(self):
        return self.named


def test_rollout_workers_take_the_broadcast_as_their_weights_or_keep_theirs_on_abort(tiny_model_dir):
    """Two real rollout workers and a sender holding perturbed weights of the same model (a subset, in fp32):
    after a sync both models hold exactly those weights at the given version. A sender whose weights no longer match
    the group's specs aborts: every receiver reports -1 at once (no hang) and keeps its weights; a worker asked for
    another group generation does nothing."""
    from posttrain.workers.rollout import RolloutWorker

    workers = [RolloutWorker(str(tiny_model_dir)) for _ in range(2)]
    state = workers[0].model.state_dict()
    g = torch.Generator().manual_seed(1)
    names = [k for k in state if k.endswith(("q_proj.weight", "gate.weight", "experts.gate_up_proj"))]
    update = {k: state[k] + torch.randn(state[k].shape, generator=g) for k in names}
    learner, url = _Learner(update), _url()
    specs = learner.weight_specs()

    def join(rank):
        if rank == 0:
            return learner.join_weight_sync(url, 3, "gloo", 30, 1, 1 << 10, specs)
        return workers[rank - 1].join_weight_sync(url, rank, 3, "gloo", 30, 1, 1 << 10, specs)

    _ranks(join, join, join)
    status, *applied = _ranks(lambda r: learner.broadcast_weights(1),
                              *[lambda r: workers[r - 1].receive_weights(5, 1)] * 2)
    assert status["ok"] and status["bytes"] == sum(t.numel() * 4 for t in update.values()) and applied == [len(names)] * 2
    for w in workers:
        held = w.model.state_dict()
        assert w.version == 5 and all(torch.equal(held[k], v) for k, v in update.items())

    learner.named = {**update, names[0]: torch.zeros(1)}  # a shape the group was not built for
    status, *applied = _ranks(lambda r: learner.broadcast_weights(1),
                              *[lambda r: workers[r - 1].receive_weights(6, 1)] * 2)
    assert not status["ok"] and "no longer match" in status["error"] and applied == [-1, -1]
    assert all(w.version == 5 and torch.equal(w.model.state_dict()[names[0]], update[names[0]]) for w in workers)
    assert workers[0].receive_weights(7, 2) == -1 and workers[0].version == 5  # not in group 2
    assert learner.broadcast_weights(1)["ok"] is False  # the failed sync closed the sender's side


def test_nccl_needs_cuda_on_both_sides_and_auto_picks_the_backend():
    from posttrain.stages.rl_sync import sync_backend

    assert sync_backend("auto", "cpu", "cpu", "k") == "gloo"
    assert sync_backend("auto", "cuda", "cpu", "k") == "gloo"
    assert sync_backend("auto", "cuda", "cuda", "k") == "nccl"
    assert sync_backend("gloo", "cuda", "cuda", "k") == "gloo"
    assert sync_backend("auto", "cuda", "cuda", "k", whole_gpus=False) == "gloo"  # NCCL: one rank per device
    with pytest.raises(ValueError, match="grpo.weight_sync.backend: nccl broadcasts between CUDA devices"):
        sync_backend("nccl", "cuda", "cpu", "grpo.weight_sync.backend")


def test_broadcast_with_the_local_backend_is_refused_when_the_recipe_loads(tiny_model_dir):
    from posttrain.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="ppo.weight_sync.method: broadcast .* use ray.backend: ray"):
        load_recipe(None, [f"model.path={tiny_model_dir}", "stages=[ppo]", "ray.backend=local",
                           "ppo.weight_sync.method=broadcast"])
    with pytest.raises(RecipeError, match="weight_sync.backend"):
        load_recipe(None, [f"model.path={tiny_model_dir}", "stages=[grpo]", "grpo.weight_sync.backend=mpi"])
    assert load_recipe(None, [f"model.path={tiny_model_dir}", "stages=[grpo]",
                              "grpo.weight_sync.method=broadcast"]).grpo.weight_sync.bucket_mib == 256
