"""The `distill` stage: the k-sparse KL against slow loop references and the full KL (k = vocabulary), the stored
targets' format, a tiny stage run through the pipeline (targets, summary, reuse on a rerun, a student that plain
transformers loads), and the recipe checks of the `distill` section."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from posttrain.algo.distill import distill_loss, full_kl, sampled_ce, sparse_kl, topk_targets


# ------------------------------------------------------------------------------------------------- loss math
def slow_log_softmax(row):
    m = max(row)
    z = m + math.log(sum(math.exp(x - m) for x in row))
    return [x - z for x in row]


def slow_sparse_kl(student_row, teacher_row, k, bucket):
    """KL(p_k || q) written out: the teacher's k most likely ids (ties by the lower id), their probabilities
    renormalised (or with the rest as one more outcome); the student's full softmax (or its mass off the k ids)."""
    logp, logq = slow_log_softmax(teacher_row), slow_log_softmax(student_row)
    top = sorted(range(len(logp)), key=lambda i: (-logp[i], i))[:k]
    p = [math.exp(logp[i]) for i in top]
    q = [math.exp(logq[i]) for i in top]
    if bucket:
        p.append(sum(math.exp(logp[i]) for i in range(len(logp)) if i not in top))
        q.append(sum(math.exp(logq[i]) for i in range(len(logq)) if i not in top))
    total = sum(p)
    p = [x / total for x in p]
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def slow_full_kl(student_row, teacher_row):
    logp, logq = slow_log_softmax(teacher_row), slow_log_softmax(student_row)
    return sum(math.exp(a) * (a - b) for a, b in zip(logp, logq))


@pytest.mark.parametrize("bucket", [False, True])
@pytest.mark.parametrize("k", [1, 3, 7])
def test_sparse_kl_matches_a_slow_loop(k, bucket):
    g = torch.Generator().manual_seed(k)
    teacher = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    student = torch.randn(6, 11, generator=g, dtype=torch.float64) * 2
    ids, logp, tail = topk_targets(teacher, k)
    got = sparse_kl(student, ids, logp.double(), tail.double() if bucket else None)
    want = [slow_sparse_kl(s.tolist(), t.tolist(), k, bucket) for s, t in zip(student, teacher)]
    torch.testing.assert_close(got.double(), torch.tensor(want, dtype=torch.float64), rtol=1e-5, atol=1e-6)
    assert (got >= -1e-6).all()


def test_hand_made_distributions():
    """p = (0.5, 0.3, 0.2), q uniform over 3: top-2 renormalised is (5/8, 3/8); the bucket keeps 0.2 apart."""
    teacher = torch.tensor([[0.5, 0.3, 0.2]]).log()
    student = torch.zeros(1, 3)
    ids, logp, tail = topk_targets(teacher, 2)
    assert ids.tolist() == [[0, 1]] and math.isclose(float(tail.exp()), 0.2, rel_tol=1e-6)
    renorm = 5 / 8 * math.log(5 / 8 * 3) + 3 / 8 * math.log(3 / 8 * 3)
    bucket = 0.5 * math.log(0.5 * 3) + 0.3 * math.log(0.3 * 3) + 0.2 * math.log(0.2 * 3)
    assert math.isclose(float(sparse_kl(student, ids, logp)), renorm, rel_tol=1e-5)
    assert math.isclose(float(sparse_kl(student, ids, logp, tail)), bucket, rel_tol=1e-5)
    # the bucket form over (top-2, rest) with every q in place equals the full KL when the rest is one token
    assert math.isclose(float(full_kl(student, teacher)), bucket, rel_tol=1e-5)


@pytest.mark.parametrize("bucket", [False, True])
def test_k_equal_to_the_vocabulary_is_the_full_kl(bucket):
    g = torch.Generator().manual_seed(1)
    teacher = torch.randn(9, 17, generator=g, dtype=torch.float64) * 3
    student = torch.randn(9, 17, generator=g, dtype=torch.float64, requires_grad=True)
    ids, logp, tail = topk_targets(teacher, 17)
    assert torch.isneginf(tail).all()
    got = sparse_kl(student, ids, logp.double(), tail.double() if bucket else None)
    want = full_kl(student, teacher)
    torch.testing.assert_close(got.double(), want.double(), rtol=1e-12, atol=1e-12)
    got.sum().backward()
    assert torch.isfinite(student.grad).all()
    grad, student.grad = student.grad.clone(), None
    want.sum().backward()
    torch.testing.assert_close(grad, student.grad, rtol=1e-10, atol=1e-12)
    assert [slow_full_kl(s.tolist(), t.tolist()) for s, t in zip(student, teacher)] == pytest.approx(
        want.tolist(), rel=1e-9)


def test_gradients_are_finite_with_an_empty_tail_and_fp16_targets():
    """A teacher whose top-k holds all its mass (tail -inf) and fp16-stored log-probs: finite loss and gradients."""
    teacher = torch.full((4, 8), -1e4)
    teacher[:, :3] = torch.tensor([2.0, 1.0, 0.0])
    ids, logp, tail = topk_targets(teacher, 3)
    student = torch.randn(4, 8, requires_grad=True)
    loss, m = distill_loss("sparse_kl", student, ids=ids.int(), logp=logp.half(), tail_logp=tail.half(), tail="bucket")
    loss.backward()
    assert math.isfinite(float(loss.detach())) and torch.isfinite(student.grad).all()
    assert 0 <= m["distill/top1_match"] <= 1


@pytest.mark.parametrize("bucket", [False, True])
def test_minimising_the_sparse_kl_recovers_the_k_sparse_target(bucket):
    """Free student logits trained on the loss end at its minimiser: the teacher's top-k renormalised (no mass left
    off the k ids), or with the bucket the teacher's own top-k probabilities and its tail mass off them."""
    teacher = torch.tensor([[3.0, 2.0, 1.0, 0.5, 0.0, -1.0]])
    ids, logp, tail = topk_targets(teacher, 3)
    student = torch.zeros(1, 6, requires_grad=True)
    opt = torch.optim.Adam([student], lr=0.1)
    for _ in range(600):
        loss, _ = distill_loss("sparse_kl", student, ids=ids, logp=logp, tail_logp=tail,
                               tail="bucket" if bucket else "renormalize")
        opt.zero_grad()
        loss.backward()
        opt.step()
    q = torch.softmax(student.detach(), -1)[0]
    p = logp.exp()[0]
    want = p if bucket else p / p.sum()
    torch.testing.assert_close(q[:3], want, atol=2e-3, rtol=0)
    assert math.isclose(float(q[3:].sum()), float(tail.exp()) if bucket else 0.0, abs_tol=2e-3)


def test_sft_loss_is_the_sampled_tokens_cross_entropy():
    student = torch.randn(5, 7, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 6, 3, 3, 1])
    torch.testing.assert_close(sampled_ce(student, target), torch.nn.functional.cross_entropy(student, target,
                                                                                               reduction="none"))
    with pytest.raises(ValueError, match="unknown distillation loss 'kl'"):
        distill_loss("kl", student, target_ids=target)


# ------------------------------------------------------------------------------------------------- storage
def test_shard_round_trips(tmp_path):
    from posttrain.distill_targets import Sequence, read_shard, shard_sequences, write_shard

    seqs = [(torch.arange(7), 3, 5), (torch.arange(10, 14), 2, None)]
    tensors = {
        "input_ids": torch.cat([s for s, _, _ in seqs]).int(),
        "seq_offsets": torch.tensor([0, 7, 11]),
        "prompt_len": torch.tensor([3, 2], dtype=torch.int32),
        "budget": torch.tensor([5, -1], dtype=torch.int32),
        "topk_ids": torch.arange(6 * 2, dtype=torch.int32).view(6, 2),
        "topk_logp": -torch.rand(6, 2).half(),
        "tail_logp": torch.tensor([-1, -2, -3, -4, float("-inf"), -6]).half(),
    }
    write_shard(tmp_path / "s.safetensors", tensors, 2)
    back = shard_sequences(read_shard(tmp_path / "s.safetensors"))
    assert [type(s) for s in back] == [Sequence, Sequence]
    assert back[0].input_ids.tolist() == list(range(7)) and back[0].prompt_len == 3 and back[0].budget == 5
    assert back[1].budget is None and back[1].topk_ids.tolist() == [[8, 9], [10, 11]]
    assert back[0].topk_logp.dtype == torch.float16 and torch.isneginf(back[1].tail_logp[0])


# ------------------------------------------------------------------------------------------------- the stage
def stage_overrides(run_dir, model_dir, *extra):
    return [f"run_dir={run_dir}", f"model.path={model_dir}", "stages=[distill]", "threads=1",
            f"distill.teacher={model_dir}", "distill.student={layers: 1, experts: 2}", "distill.k=4",
            "distill.n_examples=6", "distill.max_new_tokens=6", "distill.steps=3", "distill.batch_size=4",
            "task.max_difficulty=2", *extra]


@pytest.fixture(scope="module")
def distilled(tmp_path_factory, tiny_model_dir):
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    run_dir = tmp_path_factory.mktemp("distill") / "run"
    info = run_recipe(load_recipe(None, stage_overrides(run_dir, tiny_model_dir)))["distill"]
    return run_dir, info


def test_stage_writes_targets_of_the_stored_format(distilled, tiny_model_dir):
    from safetensors import safe_open

    run_dir, info = distilled
    targets = run_dir / "distill" / "targets"
    index = json.loads((targets / "index.json").read_text())
    assert index["sequences"] == 6 and index["k"] == 4 and index["files"][0]["file"] == "shard-00000.safetensors"
    with safe_open(str(targets / "shard-00000.safetensors"), "pt") as f:
        t = {name: f.get_tensor(name) for name in f.keys()}
    n_pos = index["target_positions"]
    assert t["topk_ids"].dtype == torch.int32 and t["topk_ids"].shape == (n_pos, 4)
    assert t["topk_logp"].dtype == torch.float16 and t["topk_logp"].shape == (n_pos, 4)
    assert t["tail_logp"].dtype == torch.float16 and t["tail_logp"].shape == (n_pos,)
    lengths = t["seq_offsets"].diff()
    assert int((lengths - t["prompt_len"]).sum()) == n_pos and t["input_ids"].shape == (int(lengths.sum()),)
    # log-probs sorted, and with the tail they hold the whole mass (up to fp16 rounding)
    lp = t["topk_logp"].float()
    assert (lp[:, :-1] >= lp[:, 1:]).all()
    mass = lp.exp().sum(-1) + t["tail_logp"].float().exp()
    torch.testing.assert_close(mass, torch.ones_like(mass), atol=3e-3, rtol=0)
    assert not list(targets.glob("*.tmp"))


def test_stage_summary_reports_storage_speed_and_sizes(distilled):
    run_dir, info = distilled
    s = info["summary"]
    vocab = s["vocab"]
    assert s["bytes_per_token_sparse"] == 4 * (4 + 2) + 2 and s["bytes_per_token_full"] == 2 * vocab
    assert s["storage_fraction"] == pytest.approx(26 / (2 * vocab))
    assert s["tokens_per_s"] > 0 and math.isfinite(s["final_loss"]) and s["final_loss"] >= 0
    assert s["student"] == {"layers": 1, "experts": 2, "hidden": 32, "top_k": 2, "init": "copy"}
    assert 0 < s["student_parameters"] < s["teacher_parameters"]
    done = json.loads((run_dir / "distill" / "done.json").read_text())
    assert done["summary"]["bytes_per_token_sparse"] == 26 and done["checkpoint"] == info["checkpoint"]
    assert s["targets"]["reused"] is False and 0 < s["targets"]["tail_mass_mean"] <= s["targets"]["tail_mass_max"] < 1


def test_student_copies_the_teacher_and_loads_with_plain_transformers(distilled, tiny_model_dir):
    run_dir, _ = distilled
    ckpt = run_dir / "distill" / "checkpoint"
    code = ("import sys, torch\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1]); tok = AutoTokenizer.from_pretrained(sys.argv[1])\n"
            "ids = tok('1+2', return_tensors='pt')['input_ids']\n"
            "assert m(input_ids=ids).logits.shape[-1] == len(tok)\n"
            "print(m.config.num_hidden_layers, m.config.num_experts)\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(ckpt)], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["1", "2"]


def test_student_init_copies_first_layers_and_experts(tiny_model_dir, tokenizer):
    from posttrain.config_distill import StudentSize
    from posttrain.distill_student import build_student
    from posttrain.model import load_model

    teacher = load_model(tiny_model_dir)
    student, desc = build_student(StudentSize(layers=1, experts=3), teacher, tokenizer, "cpu", torch.float32, {})
    t, s = teacher.state_dict(), student.state_dict()
    assert desc["layers"] == 1 and set(k for k in s if ".layers.1." in k) == set()
    torch.testing.assert_close(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    torch.testing.assert_close(s["model.layers.0.self_attn.q_proj.weight"], t["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(s["model.layers.0.mlp.gate.weight"], t["model.layers.0.mlp.gate.weight"][:3])
    torch.testing.assert_close(s["model.layers.0.mlp.experts.down_proj"], t["model.layers.0.mlp.experts.down_proj"][:3])


def test_rerun_reuses_the_targets(distilled, tiny_model_dir):
    """(Runs after the other tests of the `distilled` run: it trains that run's student again.)"""
    import shutil

    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    run_dir, first = distilled
    shard = run_dir / "distill" / "targets" / "shard-00000.safetensors"
    before = (shard.stat().st_mtime_ns, shard.read_bytes())
    # as if killed after the targets, before the student was saved: the rerun trains on the stored targets
    for loss in ("sft", "full_kl"):
        (run_dir / "distill" / "done.json").unlink()
        shutil.rmtree(run_dir / "distill" / "checkpoint")
        again = run_recipe(load_recipe(None, stage_overrides(run_dir, tiny_model_dir, f"distill.loss={loss}")))
        s = again["distill"]["summary"]
        assert s["targets"]["reused"] is True and s["loss"] == loss and math.isfinite(s["final_loss"])
    assert (shard.stat().st_mtime_ns, shard.read_bytes()) == before
    # other targets' settings (k) resample them, in place of the old ones
    (run_dir / "distill" / "done.json").unlink()
    again = run_recipe(load_recipe(None, stage_overrides(run_dir, tiny_model_dir, "distill.k=3")))["distill"]
    assert again["summary"]["targets"]["reused"] is False and again["summary"]["bytes_per_token_sparse"] == 20
    assert json.loads((shard.parent / "index.json").read_text())["k"] == 3


def test_a_student_checkpoint_with_another_vocabulary_is_refused(tmp_path, tiny_model_dir, tokenizer):
    from posttrain.distill_student import build_student
    from posttrain.model import load_model, open_tokenizer
    from posttrain.recipe import RecipeError

    other = tmp_path / "other"
    import shutil

    shutil.copytree(tiny_model_dir, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # two tokens swap ids: same size, other vocabulary
    (other / "tokenizer.json").write_text(json.dumps(tok))
    (other / "manifest.json").unlink()
    assert open_tokenizer(other).get_vocab() != tokenizer.get_vocab()
    teacher = load_model(tiny_model_dir)
    with pytest.raises(RecipeError, match=r"^distill.student: .*tokenizer is not the teacher's"):
        build_student(str(other), teacher, tokenizer, "cpu", torch.float32, {})
    student, desc = build_student(str(tiny_model_dir), teacher, tokenizer, "cpu", torch.float32, {})
    assert desc == {"path": str(tiny_model_dir)} and student.config.num_hidden_layers == 2


def test_k_beyond_the_vocabulary_and_a_student_larger_than_the_teacher_are_refused(tmp_path, tiny_model_dir):
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError, match=r"^distill.k: 100000 is more than the teacher's vocabulary"):
        run_recipe(load_recipe(None, stage_overrides(tmp_path / "a", tiny_model_dir, "distill.k=100000")))
    with pytest.raises(RecipeError, match=r"^distill.student.layers: 3 is more than the teacher's 2 layers"):
        run_recipe(load_recipe(None, stage_overrides(tmp_path / "b", tiny_model_dir, "distill.student={layers: 3}")))
    assert not (tmp_path / "b" / "distill" / "targets").exists()  # refused before the teacher samples anything


# ------------------------------------------------------------------------------------------------- the recipe
@pytest.mark.parametrize("overrides, message", [
    (["stages=[base, sft, distill]", "distill.teacher=grpo"], "distill.teacher: stage 'grpo' is not in this recipe"),
    (["stages=[base, distill, sft]", "distill.teacher=sft"], "distill.teacher: stage 'sft' runs after distill"),
    (["stages=[base, sft, eval, distill]", "distill.teacher=eval"], "distill.teacher: stage 'eval' produces no model"),
    (["stages=[base, sft, distill]", "distill.teacher=gpro"], "distill.teacher: 'gpro' is neither a stage run before "
                                                              "distill (base, sft) nor an existing directory"),
    (["stages=[base, distill]", "distill.k=0"], "distill.k: Input should be greater than or equal to 1"),
    (["stages=[base, distill, export]"], "export.merged: the export after distill ships the student"),
    (["stages=[base, distill]", "distill.loss=kl"], "distill.loss: Input should be 'sparse_kl', 'full_kl' or 'sft'"),
    (["stages=[base, distill]", "distill.student={layer: 1}"], "distill.student.layer: unknown key; did you mean "
                                                               "'distill.student.layers'?"),
])
def test_recipe_errors_name_the_distill_key(overrides, message):
    from posttrain.recipe import RecipeError, load_recipe

    with pytest.raises(RecipeError) as e:
        load_recipe(None, overrides)
    assert message in str(e.value)


def test_distill_example_recipe_validates_and_sweeps_teacher_and_student():
    from posttrain.recipe import load_recipe

    quick, rc = load_recipe("recipes/quickstart.yaml"), load_recipe("recipes/distill_example.yaml")
    assert rc.stages == ["base", "sft", "distill", "sweep"] and rc.distill.teacher == "sft"
    assert rc.sweep.models == ["sft", "distill"] and rc.distill.student.layers == 2
    assert rc.base == quick.base and rc.sft == quick.sft  # the quickstart's cached base and its SFT model


def test_distill_example_recipe_runs_at_toy_size(tmp_path, monkeypatch):
    """recipes/distill_example.yaml end to end (base, sft, distill of the sft model, sweep of both) with every size
    cut down: the student is the sft stage's distillation and the sweep overlays the two."""
    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    monkeypatch.setenv("POSTTRAIN_CACHE", str(tmp_path / "cache"))
    toy = [f"run_dir={tmp_path / 'run'}", "threads=1", "task.max_difficulty=2",
           "base={hidden_size: 32, num_layers: 3, num_experts: 4, top_k: 2, moe_intermediate_size: 32, num_heads: 2, "
           "steps: 3, batch_size: 4, seq_len: 32}",
           "sft.steps=2", "sft.batch_size=4", "sft.n_examples=16", "distill.n_examples=6",
           "distill.max_new_tokens=8", "distill.steps=2", "distill.batch_size=4", "sweep.n_per_difficulty=1",
           "sweep.budgets=[0, auto]", "sweep.max_new_tokens=8", "sweep.workers=1", "sweep.backend=local"]
    out = run_recipe(load_recipe("recipes/distill_example.yaml", toy))
    assert out["distill"]["teacher"] == str(tmp_path / "run" / "sft" / "checkpoint")
    assert out["distill"]["summary"]["student"]["layers"] == 2 and out["distill"]["summary"]["k"] == 16
    assert out["sweep"]["models"] == {"sft": str(tmp_path / "run" / "sft" / "checkpoint"),
                                      "distill": str(tmp_path / "run" / "distill" / "checkpoint")}
    assert {r["model"] for r in out["sweep"]["summary"]} == {"sft", "distill"}


def test_sweep_takes_distill_as_a_model_stage(tmp_path):
    from types import SimpleNamespace

    from posttrain.recipe import load_recipe
    from posttrain.runlog import StageDir
    from posttrain.stages.sweep import sweep_models

    rc = load_recipe(None, [f"run_dir={tmp_path}", "stages=[base, sft, distill, sweep]", "distill.teacher=sft"])
    for name in ("sft", "distill"):
        stage = StageDir(tmp_path, name)
        stage.checkpoint.mkdir()
        (stage.checkpoint / "config.json").write_text("{}")
        stage.mark_done({"checkpoint": str(stage.checkpoint)})
    specs = sweep_models(SimpleNamespace(cfg=rc, run_dir=tmp_path, model_path=None))
    assert [(s.label, s.checkpoint) for s in specs] == [("sft", tmp_path / "sft" / "checkpoint"),
                                                        ("distill", tmp_path / "distill" / "checkpoint")]


def test_distill_recipe_distils_the_quickstart_grpo_model(tmp_path, monkeypatch, tiny_model_dir):
    """recipes/distill.yaml (`make distill` after the quickstart) at toy size, the quickstart's GRPO model stood in
    for by the tiny one: its teacher is that checkpoint, it samples under the quickstart's SFT budget mix, and the
    sweep overlays teacher and student."""
    import shutil
    from pathlib import Path

    from posttrain.pipeline import run_recipe
    from posttrain.recipe import load_recipe

    recipes = Path(__file__).resolve().parents[1] / "recipes"
    quick = load_recipe(recipes / "quickstart.yaml")
    monkeypatch.chdir(tmp_path)
    teacher = Path("runs/quickstart/grpo/checkpoint")
    shutil.copytree(tiny_model_dir, teacher)
    rc = load_recipe(recipes / "distill.yaml")
    assert rc.stages == ["distill", "sweep"] and rc.distill.teacher == str(teacher) and rc.distill.loss == "sparse_kl"
    assert (rc.sft.budgets, rc.sft.mix, rc.task) == (quick.sft.budgets, quick.sft.mix, quick.task)
    assert rc.sweep.models == [str(teacher), "distill"]
    toy = ["threads=1", "task.max_difficulty=2", "distill.n_examples=6", "distill.max_new_tokens=8", "distill.steps=2",
           "distill.batch_size=4", "sweep.n_per_difficulty=1", "sweep.budgets=[0, auto]", "sweep.max_new_tokens=8",
           "sweep.workers=1", "sweep.backend=local"]
    out = run_recipe(load_recipe(recipes / "distill.yaml", toy))
    s = out["distill"]["summary"]
    assert out["distill"]["teacher"] == str(teacher) and s["student"]["layers"] == 2 and s["k"] == 16
    assert s["bytes_per_token_sparse"] == 98 and s["bytes_per_token_full"] == 2 * s["vocab"] and s["tokens_per_s"] > 0
    assert {r["model"] for r in out["sweep"]["summary"]} == {str(teacher), "distill"}
