"""Smoke test of `posttrain bench` (the API the subcommand calls) on the random tiny model: every headline key is
there and finite, the table prints, bench.json is written, and the FSDP ranks hold their share of the learner's
state. No timing is asserted: timings belong to the bench."""

import json
import math

import pytest


def test_bench_smoke(tiny_model_dir, tmp_path, capsys):
    from posttrain.bench import format_table
    from posttrain.cli import main

    assert main(["bench", "--quick", "--steps", "1", "--warmup", "0", "--model", str(tiny_model_dir), "--threads",
                 "1", "--backend", "local", "--no-scaling", "--out", str(tmp_path)]) == 0
    assert "GRPO step" in capsys.readouterr().out
    r = json.loads((tmp_path / "bench.json").read_text())
    for key in ("grpo_step_s_ours", "grpo_step_s_trl", "grpo_speedup", "rollout_speedup", "peak_rss_gib",
                "learner_tokens_per_s", "learner_flops", "dispatch_sync_share", "matmul_flops_1_thread",
                "grpo_step_s_async", "async_speedup"):
        assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] > 0, key
    shares = r["step_shares"]
    assert {"rollout", "reward", "reference", "learner", "sync", "dispatch"} <= set(shares)
    assert sum(shares.values()) == pytest.approx(1.0, abs=1e-6)  # the components add up to the step
    assert r["params_active"] < r["params_total"]  # 2 of 4 experts per token
    assert set(r["targets"]) == {"grpo_speedup", "rollout_speedup", "dispatch_sync_share", "peak_rss_gib"}
    assert r["detail"]["ours_async"]["step_s_all"]  # timed at max_staleness 1 (issue #29)
    assert "GRPO step" in format_table(r) and "max_staleness 1" in format_table(r)  # the table reads bench.json
    # FSDP2 over 2 spawned gloo ranks against one unsharded learner, one update each (issue #25): the ranks' shards
    # partition the learner's parameters and AdamW state, so each holds about half
    f = r["fsdp"]
    one, ranks = f["unsharded"], f["per_rank"]
    assert len(ranks) == 2 and all(x["updates"] == 1.0 for x in [one, *ranks]), f
    assert one["adam"] == 2 * one["params"] > 0  # fp32 AdamW: two moments the parameters' size
    for key in ("params", "adam", "total"):
        assert sum(x[key] for x in ranks) == one[key], key
        assert max(x[key] for x in ranks) <= 0.55 * one[key], key
    assert 0.45 <= f["held_ratio"] <= 0.55 and "per learner rank at 2 gloo ranks" in format_table(r)
    # the scaling table (issue #27): every point timed on both sides, on a random-init model that talks to the limit
    grid = r["grid"]
    assert [(g["prompts"], g["max_new_tokens"]) for g in grid] == [(2, 8), (4, 8), (2, 16)]
    for g in grid:
        assert g["ours_step_s"] > 0 and g["trl_step_s"] > 0 and g["ratio"] > 0
        assert 0 < g["ours_response_tokens_mean"] <= g["max_new_tokens"] + 1  # + a forced </think>
    assert grid[2]["ours_response_tokens_mean"] > grid[0]["ours_response_tokens_mean"]  # 16 tokens run longer than 8
    assert (tmp_path / "bench_grid.png").stat().st_size > 10_000 and "scaling (random-init" in format_table(r)


def test_active_parameters_count_top_k_experts(tiny_model_dir):
    """Active = total - embedding + LM head (tied: a matmul all the same) - the unrouted experts' share."""
    from transformers import AutoConfig

    from posttrain.bench import active_parameters
    from posttrain.model import load_model

    cfg = AutoConfig.from_pretrained(tiny_model_dir)
    model = load_model(tiny_model_dir)
    experts = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    embed = model.get_input_embeddings().weight.numel()
    total, active = active_parameters(tiny_model_dir)
    assert total == sum(p.numel() for p in model.parameters())
    assert active == total - experts + experts * cfg.num_experts_per_tok // cfg.num_experts
    assert cfg.tie_word_embeddings and embed == model.get_output_embeddings().weight.numel()


def test_trl_reward_is_our_grader():
    from posttrain.bench_trl import exact_int_reward
    from posttrain.rewards.parse import grade_integer

    texts, answers = ["1+1=2</think>\n\n2", "1+1=2</think>\n\n3", "no answer"], ["2", "2", "2"]
    assert exact_int_reward(texts, answer=answers) == [float(grade_integer(t, a)) for t, a in zip(texts, answers)]


@pytest.mark.ray
def test_bench_scaling_times_one_and_two_rollout_workers(tiny_model_dir, ray_session):
    """`bench_scaling` (on by default in `posttrain bench`, off in the smoke test): the driver's rollout over 1 and 2
    Ray rollout workers, both timed."""
    from posttrain.bench import BenchSettings, bench_recipe, bench_scaling

    rc = bench_recipe(tiny_model_dir, BenchSettings(quick=True, threads=1))
    sc = bench_scaling(rc, reps=1, warmup=0)
    assert sc["rollout_s_1_workers"] > 0 and sc["rollout_s_2_workers"] > 0 and sc["speedup_2_vs_1"] > 0
