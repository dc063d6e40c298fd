"""Sharded learners (FSDP2 over two gloo ranks) take the one-learner step, with half the parameter memory per rank.

The setting of tests/test_learner_dp.py: three groups of four rows, rank 0 holding rows 0-8 (its group 1 dropped by
dynamic sampling), rank 1 rows 8-12. Each rank is a `LearnerWorker(fsdp=True)` (`shard_model` after
`init_distributed`: FSDP2 per decoder layer and the root, DTensor parameters, gradients and AdamW state); the
reference is one unsharded `Learner` on the whole batch. Per update: the ranks' losses sum to the one learner's, the
gathered gradients and the updated weights equal its own. With two mini-batches each rank has one it holds no loss
token of (rank 0's second holds only the dropped group, rank 1's first is empty), so the idle forward/backward that
keeps FSDP's collectives in step is tested too; so is the weight export (`weights`, gathered) and the save/resume.
"""


import pytest
import torch

from test_learner_dp import SHARES, T, _inputs, _learner, _run

# LoRA adapts the attention projections and the fused 3-D expert parameters
LORA = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"],
        "target_parameters": ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]}
# (loss_agg, mini-batches, LoRA, micro_batch_tokens on the ranks): with 24 tokens a micro-batch holds at most two of
# these rows, so rank 0 (8 rows, a dropped group) runs more micro-batches than rank 1 (4 rows) and pads with idle
# backwards; the reference is still one unsharded learner in one pass
CASES = [("token_mean", 1, None, None), ("seq_mean_token_mean", 1, None, None),
         ("seq_mean_token_sum_norm", 1, None, None), ("token_mean", 2, None, None), ("token_mean", 1, LORA, None),
         ("token_mean", 2, None, 24), ("seq_mean_token_mean", 1, None, 24)]


def _case(agg, mb, lora, micro) -> str:
    return f"{agg}/{mb}{'/lora' if lora else ''}{f'/micro{micro}' if micro else ''}"
KWARGS = dict(lr=1e-2, kl_coef=0.1, kl_kind="k3", entropy_coef=0.01, router_aux_coef=0.0, router_metrics=False,
              max_grad_norm=1e9, max_len=T + 2)


def _memory(learner) -> dict:
    """Elements of the trainable parameters and of their AdamW moments held by this rank, and in all."""
    local = sum(p.to_local().numel() for p in learner.params)
    full = sum(p.numel() for p in learner.params)
    moments = sum(s["exp_avg"].to_local().numel() + s["exp_avg_sq"].to_local().numel()
                  for s in learner.optimizer.state.values())
    return {"local": local, "full": full, "adam_local": moments}


def _rank_main(rank: int, world: int, rendezvous: str, model_dir: str, save_dir: str) -> dict:
    import torch.distributed as dist

    from posttrain.rlbatch import select_rows
    from posttrain.workers.learner import LearnerWorker

    batch, adv, mask, ref = _inputs(model_dir)
    lo, hi = SHARES[rank]
    part = (select_rows(batch, lo, hi), adv[lo:hi], mask[lo:hi], ref[lo:hi])
    results = {}
    for i, (agg, mb, lora, micro) in enumerate(CASES):
        w = LearnerWorker(model_dir, fsdp=True, loss_agg=agg, lora=lora, micro_batch_tokens=micro, **KWARGS)
        if i == 0:
            w.init_distributed(rendezvous, rank, world)
        else:  # the group is joined: shard as `init_distributed` does, rank set (rank 0 alone writes saves)
            w.rank, w.world_size = rank, world
            w._shard()
        assert w.learner.sharded
        res = _run(w.learner, *part, mb, step=w.step)
        res["weights"] = w.weights() if rank == 0 else None  # gathered after the step, on rank 0
        res["memory"] = _memory(w.learner)
        if i == 0:  # a checkpoint round trip: the whole state on rank 0, every rank's shards back
            w.save_state(save_dir)
            dist.barrier()
            again = LearnerWorker(model_dir, fsdp=True, loss_agg=agg, **KWARGS)
            again.rank, again.world_size = rank, world
            again._shard()
            again.load_state(save_dir)
            same = [bool(torch.equal(a.to_local(), b.to_local()))
                    for a, b in zip(again.learner.params, w.learner.params)]
            moments = [bool(torch.equal(again.learner.optimizer.state[a]["exp_avg"].to_local(),
                                        w.learner.optimizer.state[b]["exp_avg"].to_local()))
                       for a, b in zip(again.learner.params, w.learner.params)]
            res["resumed"] = all(same) and all(moments) and again.learner.updates == w.learner.updates
        if i == 0 or lora:  # the HF checkpoint rank 0 writes from the gathered weights (LoRA merged in)
            w.save_model(f"{save_dir}/model{i}", model_dir)
        results[_case(agg, mb, lora, micro)] = res
    dist.destroy_process_group()
    return results


def test_two_fsdp_ranks_take_the_one_learner_step_on_half_the_memory(tiny_model_dir, tmp_path, gloo_ranks):
    from posttrain.model import load_model
    from posttrain.workers.learner import LearnerWorker

    (tmp_path / "state").mkdir()
    with gloo_ranks(_rank_main, str(tiny_model_dir), str(tmp_path / "state"), init=False) as ranks:
        batch, adv, mask, ref = _inputs(str(tiny_model_dir))
        single = {}
        for agg, mb, lora, micro in CASES:
            learner = (LearnerWorker(str(tiny_model_dir), loss_agg=agg, lora=lora, **KWARGS).learner if lora
                       else _learner(str(tiny_model_dir), agg))
            res = _run(learner, batch, adv, mask, ref, mb)
            weights = {n: p.detach().clone() for n, p in learner.named_params}
            single[_case(agg, mb, lora, micro)] = res | {"weights": weights}
    for case, one in single.items():
        dp = [r[case] for r in ranks]
        assert len(one["loss"]) == len(dp[0]["loss"]) == len(dp[1]["loss"]), case
        for u, want in enumerate(one["loss"]):
            assert sum(r["loss"][u] for r in dp) == pytest.approx(want, rel=1e-5, abs=1e-7), (case, u)
        for u, grads in enumerate(one["grads"]):
            scale = max(float(g.abs().max()) for g in grads.values())
            for name, want in grads.items():
                for r in dp:
                    torch.testing.assert_close(r["grads"][u][name], want, atol=1e-5 * scale, rtol=1e-4,
                                               msg=lambda m: f"{case}, update {u}, {name}: {m}")
        assert dp[0]["metrics"]["actor/updates"] == one["metrics"]["actor/updates"]
        # the weights rank 0 exports (gathered from the shards) are the one learner's (test_learner_dp's tolerance)
        gathered = dp[0]["weights"]
        assert set(gathered) >= set(one["weights"]), case
        for name, want in one["weights"].items():
            torch.testing.assert_close(gathered[name], want, atol=1e-4, rtol=1e-4, msg=lambda m: f"{case}, {name}: {m}")
    for i, (agg, mb, lora, micro) in enumerate(CASES):  # the saved HF checkpoints are the one learner's model
        if i == 0 or lora:
            case = _case(agg, mb, lora, micro)
            want = LearnerWorker(str(tiny_model_dir), loss_agg=agg, lora=lora, **KWARGS)
            with torch.no_grad():
                for (name, p), w in zip(want.learner.named_params, single[case]["weights"].items()):
                    assert name == w[0]
                    p.copy_(w[1])
            want.save_model(str(tmp_path / f"single{i}"), str(tiny_model_dir))
            got = load_model(str(tmp_path / "state" / f"model{i}")).state_dict()
            for name, t in load_model(str(tmp_path / f"single{i}")).state_dict().items():
                torch.testing.assert_close(got[name], t, atol=1e-4, rtol=1e-4,
                                           msg=lambda m: f"{case}, saved {name}: {m}")
    for rank, r in enumerate(ranks):
        mem = r["token_mean/1"]["memory"]
        share = mem["local"] / mem["full"]
        print(f"rank {rank}: {mem['local']} of {mem['full']} parameter elements ({share:.1%}), "
              f"{mem['adam_local']} AdamW moment elements (unsharded: {2 * mem['full']})")
        assert share < 0.6 and mem["adam_local"] < 0.6 * 2 * mem["full"], mem
        assert r["token_mean/1"]["resumed"], "the saved sharded state did not load back"


def test_fsdp_with_the_local_backend_is_refused_naming_the_key():
    from posttrain.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"grpo\.fsdp: true shards .* ray\.backend: local"):
        load_recipe(None, ["stages=[base,sft,grpo]", "grpo.fsdp=true", "ray.backend=local"])
    assert load_recipe(None, ["stages=[base,sft,grpo]", "grpo.fsdp=true", "ray.backend=ray", "ray.learner.num=2"]).grpo.fsdp


@pytest.mark.ray
@pytest.mark.ci_extra
def test_grpo_stage_with_fsdp_learners_matches_plain_data_parallel(tiny_model_dir, tmp_path, ray_session):
    """The RL stage wired to sharded learners (Ray, 2 learners): saves every step (every rank takes part, rank 0
    writes), syncs weights to the rollout worker and writes the final checkpoint; it ends with the weights of the
    same run on unsharded data-parallel learners. No dynamic sampling: every step trains (the router aux loss moves
    the weights even where the random model's advantages are 0)."""
    from safetensors.torch import load_file

    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    common = ["stages=[grpo]", f"model.path={tiny_model_dir}", "threads=1", "task.max_difficulty=2", "grpo.steps=2",
              "grpo.save_every=1", "grpo.prompts_per_step=2", "grpo.group_size=2", "grpo.max_new_tokens=6",
              "grpo.budgets=[4,auto]", "grpo.dynamic_sampling=false", "grpo.eval_n_per_difficulty=0",
              "grpo.learning_rate=1e-3", "ray.backend=ray", "ray.learner.num=2", "ray.learner.cpus=0.5",
              "ray.rollout.cpus=0.5"]
    out = {}
    for name, extra in (("dp", []), ("fsdp", ["grpo.fsdp=true"])):
        run_recipe(load_recipe(None, [f"run_dir={tmp_path / name}", *common, *extra]))
        assert (tmp_path / name / "grpo" / "state" / "step_000001").is_dir()  # the last step ends in checkpoint
        out[name] = load_file(str(tmp_path / name / "grpo" / "checkpoint" / "model.safetensors"))
    start = load_file(str(tiny_model_dir / "model.safetensors"))
    assert set(out["fsdp"]) == set(out["dp"])
    moved = 0
    for k, v in out["dp"].items():
        torch.testing.assert_close(out["fsdp"][k], v, atol=1e-4, rtol=1e-4, msg=lambda m: f"{k}: {m}")
        moved += not torch.equal(v, start[k])
    assert moved > 0  # the steps did train
