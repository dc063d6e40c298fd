import os

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    import torch

    if os.environ.get("POSTTRAIN_CI_EXTRA") != "1":  # run by .ci/run after the suite, not by `make test`
        extra = pytest.mark.skip(reason="a slow end-to-end check .ci/run runs (POSTTRAIN_CI_EXTRA=1)")
        for item in items:
            if "ci_extra" in item.keywords:
                item.add_marker(extra)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from posttrain.tokenizer import build_tokenizer

    return build_tokenizer()


@pytest.fixture(scope="session")
def foreign_tokenizer():
    """`make()` -> a small byte-level BPE tokenizer with a chat template of its own and no think or ChatML tokens, as
    most foreign checkpoints have (what `posttrain prepare` adds them to)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def make():
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(["1+2*3 = 9, the answer is 9 tokens"] * 20, trainer=trainer)
        fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="</s>")
        fast.chat_template = "{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}"
        return fast

    return make


@pytest.fixture(scope="session")
def family_config():
    """`make(family, tokenizer)` -> the transformers config of a tiny model of one MoE family (mixtral, olmoe,
    qwen2_moe, qwen3_moe, deepseek_v3, gpt_oss, glm4_moe):
    hidden 32, 2 layers, 4 experts, top-2, the vocabulary and pad / eos ids of `tokenizer`. GLM4-MoE stands for
    sigmoid routing without expert groups."""

    def make(family: str, tokenizer):
        import transformers as tf

        common = dict(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, num_experts_per_tok=2,
                      pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
        mla = dict(kv_lora_rank=8, q_lora_rank=8, qk_rope_head_dim=8, v_head_dim=8, qk_nope_head_dim=8)
        return {
            "mixtral": lambda: tf.MixtralConfig(**common, num_local_experts=4),
            "olmoe": lambda: tf.OlmoeConfig(**common, num_experts=4),
            "qwen2_moe": lambda: tf.Qwen2MoeConfig(**common, num_experts=4, moe_intermediate_size=16,
                                                   shared_expert_intermediate_size=16),
            "qwen3_moe": lambda: tf.Qwen3MoeConfig(**common, num_experts=4, moe_intermediate_size=16, head_dim=16,
                                                   norm_topk_prob=True),
            # MLA, one shared expert, a dense first layer, experts in 2 groups of which the best 1 is routed to
            "deepseek_v3": lambda: tf.DeepseekV3Config(**{**common, "num_key_value_heads": 2}, **mla,
                                                       n_routed_experts=4, n_shared_experts=1, moe_intermediate_size=16,
                                                       n_group=2, topk_group=1, first_k_dense_replace=1),
            "gpt_oss": lambda: tf.GptOssConfig(**common, num_local_experts=4, head_dim=16),
            "glm4_moe": lambda: tf.Glm4MoeConfig(**common, n_routed_experts=4, n_shared_experts=1,
                                                 moe_intermediate_size=16, first_k_dense_replace=0,
                                                 routed_scaling_factor=1.5),
        }[family]()

    return make


@pytest.fixture(scope="session")
def arithmetic_sft(tokenizer):
    """`make(n, seed, budgets, budget_traces)` -> (examples, SFT rows) of the embedded task as the sft stage builds
    them (`Task.train_examples`, the task's `budget_demonstration` for budgeted rows), every row budgeted."""
    from types import SimpleNamespace

    from posttrain.config import BudgetMix, TaskConfig
    from posttrain.sft_data import build_sft_examples
    from posttrain.tasks.embedded import ArithmeticTask

    def make(n, seed, budgets, budget_traces="most_explicit"):
        sft = SimpleNamespace(budget_traces=budget_traces, full_trace_share=1.0, truncate_share=0.0,
                              autonomous_style="verbose")
        task = ArithmeticTask(SimpleNamespace(sft=sft, task=TaskConfig()))
        ex = task.train_examples(n, seed)
        return ex, build_sft_examples(tokenizer, ex, budgets, BudgetMix(budgeted=1, autonomous=0, zero=0), 0, 512,
                                      fit=task.budget_demonstration)

    return make


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    """A randomly initialised, very small Qwen3-MoE saved as an HF checkpoint (no training)."""
    import torch
    from transformers import AutoModelForCausalLM

    from posttrain.model import save_model, tiny_moe_config

    torch.manual_seed(0)
    cfg = tiny_moe_config(len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, hidden_size=32,
                          num_hidden_layers=2, num_experts=4, moe_intermediate_size=32, num_attention_heads=2,
                          num_key_value_heads=1, head_dim=16)
    model = AutoModelForCausalLM.from_config(cfg)
    return save_model(model, tokenizer, tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs Ray (starting one costs ~5 s)."""
    from posttrain.workers.ray_cluster import init_ray, shutdown_ray

    init_ray(num_cpus=4)  # logical CPUs: lets the fault tests and 2 DP learners be scheduled side by side
    yield
    shutdown_ray()


@pytest.fixture(scope="session")
def talkative_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny random model with larger random weights (at its init, greedy decoding just repeats the last prompt
    token, which would make token comparisons vacuous)."""
    import torch

    from posttrain.model import load_model, load_tokenizer, save_model

    model = load_model(tiny_model_dir)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, v in model.state_dict().items():
            if "norm" in k or "proj" in k:
                v.copy_(torch.randn(v.shape, generator=g) * (1.0 if "norm" in k else 0.3))
    return save_model(model, load_tokenizer(tiny_model_dir), tmp_path_factory.mktemp("talkative") / "model")


@pytest.fixture
def noisy_rewards(monkeypatch):
    """Per-row noise on the RL reward worker's real scores: the random tiny model never answers correctly, so every
    reward would be 0, every group dropped and nothing learnt; with the noise advantages (and the update) are
    non-zero. Correctness and the metrics stay the real ones."""
    import functools

    from posttrain.workers.reward import RLRewardWorker

    real = RLRewardWorker.score

    @functools.wraps(real)
    def noisy(self, *args, **kwargs):
        scores, correct, metrics = real(self, *args, **kwargs)
        return [s + 0.1 * (i % 3) for i, s in enumerate(scores)], correct, metrics

    monkeypatch.setattr(RLRewardWorker, "score", noisy)


@pytest.fixture(scope="session")
def ragged_batch():
    """`make(seed=0, T=5, group=2)` -> a `RolloutBatch` of 2 groups of `group` rows (4 rows at group 2) with ragged
    prompts (left-padded) and responses of 5, 3, 4, 2 tokens, and one forced token (row 1, position 1: out of the
    loss); log-probs 0. For learner tests on the tiny model."""
    import torch

    from posttrain.workers.rollout import RolloutBatch

    def make(seed: int = 0, T: int = 5, group: int = 2):
        g = torch.Generator().manual_seed(seed)
        n, P = 2 * group, 4
        prompt_mask = (torch.arange(P)[None] >= P - torch.randint(2, P + 1, (n,), generator=g)[:, None]).long()
        response_mask = (torch.arange(T)[None] < torch.tensor([5, 3, 4, 2])[:, None]).long()
        forced = torch.zeros(n, T, dtype=torch.bool)
        forced[1, 1] = True
        return RolloutBatch(prompt_ids=torch.randint(3, 100, (n, P), generator=g), prompt_mask=prompt_mask,
                            response_ids=torch.randint(3, 100, (n, T), generator=g), response_mask=response_mask,
                            logp=torch.zeros(n, T), forced_mask=forced, n_think=[1] * n, closed=[True] * n,
                            forced=[False, True, False, False], group_index=[i // group for i in range(n)],
                            budgets=[None] * n, texts=[""] * n)

    return make


@pytest.fixture(scope="session")
def loss_spy():
    """`spy(learner) -> list`: the list fills with each mini-batch loss the `posttrain.learner.Learner` applies."""

    def spy(learner) -> list[float]:
        losses, apply = [], learner._apply

        def record(loss):
            losses.append(float(loss.detach()))
            return apply(loss)

        learner._apply = record
        return losses

    return spy


@pytest.fixture()
def gloo_ranks(tmp_path):
    """`with gloo_ranks(target, *args, world=2, init=True) as results:` runs `target(rank, *args)` in `world`
    spawned processes joined in a gloo process group (file rendezvous; `init=False`: `target(rank, world,
    rendezvous, *args)` joins it itself) while the `with` body runs here (the one-process reference); after the
    block `results` holds each rank's return value (torch.save-able), or the test fails with the rank's
    traceback."""
    import contextlib
    import multiprocessing

    from spawned_ranks import rank_entry  # a module of its own: spawned processes import it by name

    @contextlib.contextmanager
    def run(target, *args, world: int = 2, init: bool = True, timeout: float = 600):
        import torch

        ctx = multiprocessing.get_context("spawn")
        outs = [str(tmp_path / f"rank{r}.pt") for r in range(world)]
        rdv = f"file://{tmp_path / 'rdv'}"
        procs = [ctx.Process(target=rank_entry, args=(target, r, world, rdv, outs[r], init, args))
                 for r in range(world)]
        for p in procs:
            p.start()
        results: list = []
        try:
            yield results
        finally:
            for p in procs:
                p.join(timeout=timeout)
        for p, out in zip(procs, outs):
            if p.exitcode != 0:
                err = tmp_path / (out.rsplit("/", 1)[1] + ".error")
                pytest.fail(f"rank exited with {p.exitcode}:\n{err.read_text() if err.exists() else '(no traceback)'}")
        results.extend(torch.load(out, weights_only=True) for out in outs)

    return run
