"""The typed recipe schema. YAML recipes nest exactly like these classes; each field's description is its doc.

Every model forbids extra keys, so a misspelt key is an error (see `posttrain.recipe` for the messages), never
silently ignored. The shared pieces (`Section`, budget entries, LoRA) live in `config_common`, the RL sections
(`grpo`/`ppo`, rewards, `ray`) in `config_rl`; both are re-exported here. The `distill` section and its checks
against the stages live in `config_distill`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, get_args

from pydantic import Field, field_validator, model_validator

from posttrain.config_common import (MAX_TOKENS, TOKENS_BOUND, Budget, BudgetRange, EvalBudget,  # noqa: F401
                                     LoraConfig, PositiveBudget, RolloutEngineConfig, Section, StageName,
                                     check_budgets)
from posttrain.config_data import DataConfig  # noqa: F401 - part of the schema's public names
from posttrain.config_distill import DistillStageConfig, check_distill
from posttrain.config_flywheel import FlywheelConfig
from posttrain.config_rl import (ActorGroupConfig, CriticGroupConfig, GRPORewardConfig,  # noqa: F401
                                 GRPOStageConfig, LearnerGroupConfig, PPOStageConfig, RayConfig,
                                 ReferenceGroupConfig, RewardGroupConfig, RLStageConfig, RolloutGroupConfig)

# Seeds go to numpy too (`np.random.seed`), which takes 0 <= seed < 2^32.
MAX_SEED = 2**32 - 1


class ModelConfig(Section):
    path: str | None = Field(
        None,
        description="Local Hugging Face checkpoint directory of a pretrained MoE causal LM. Empty: the `base` "
        "stage's embedded tiny model.",
    )
    trust_remote_code: bool = Field(False, description="Allow the checkpoint's own Python modelling code to run.")
    allow_pickle: bool = Field(
        False, description="Allow checkpoints that ship only pickled weights (loaded with weights_only=True)."
    )
    experts_implementation: Literal["grouped_mm", "eager"] = Field(
        "grouped_mm", description="MoE expert kernel (`batched_mm` exhausts memory on CPU and is not offered)."
    )

    @field_validator("path")
    @classmethod
    def _path_exists(cls, v: str | None) -> str | None:
        if v is not None and not Path(v).expanduser().exists():
            raise ValueError(f"directory {v!r} does not exist")
        return v


class TaskConfig(Section):
    """The embedded left-to-right arithmetic task (used when data.source is `arithmetic`, and by the `rm` stage)."""

    min_difficulty: int = Field(1, ge=1, le=8, description="Fewest operators in a problem.")
    max_difficulty: int = Field(8, ge=1, le=8, description="Most operators in a problem.")

    @model_validator(mode="after")
    def _order(self) -> "TaskConfig":
        if self.min_difficulty > self.max_difficulty:
            raise ValueError("min_difficulty must be <= max_difficulty")
        return self


class BaseStageConfig(Section):
    """Build and pretrain the embedded tiny Qwen3-MoE base model (cached by these settings)."""

    hidden_size: int = Field(128, ge=16, description="Model width.")
    num_layers: int = Field(4, ge=1, description="Decoder layers (all MoE).")
    num_experts: int = Field(8, ge=2, description="Experts per MoE layer.")
    top_k: int = Field(2, ge=1, description="Experts routed per token.")
    moe_intermediate_size: int = Field(256, ge=8, description="Each expert's hidden width.")
    num_heads: int = Field(4, ge=1, description="Attention heads (head_dim = hidden_size / num_heads).")
    vocab_size: int = Field(512, ge=400, description="BPE vocabulary size of the embedded tokenizer.")
    steps: int = Field(700, ge=1, description="Pretraining optimizer steps.")
    batch_size: int = Field(64, ge=1, description="Documents per step (one per row).")
    seq_len: int = Field(128, ge=16, le=MAX_TOKENS, description="Longest document in tokens. " + TOKENS_BOUND)
    learning_rate: float = Field(3e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    warmup_steps: int = Field(30, ge=0, description="Warmup steps.")
    weight_decay: float = Field(0.01, ge=0)
    cache_dir: str = Field(
        "~/.cache/posttrain/base",
        description="Where built base models are cached by their settings; a second run reuses them. The "
        "POSTTRAIN_CACHE environment variable overrides it.",
    )

    @model_validator(mode="after")
    def _shapes(self) -> "BaseStageConfig":
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size ({self.hidden_size}) must be divisible by num_heads ({self.num_heads})")
        return self


class BudgetMix(Section):
    budgeted: float = Field(0.6, ge=0, description="Share of samples with a budget in the prompt.")
    autonomous: float = Field(0.3, ge=0, description="Share with no budget (the model picks its length).")
    zero: float = Field(0.1, ge=0, description="Share with budget 0 (empty think block).")

    @model_validator(mode="after")
    def _positive(self) -> "BudgetMix":
        if self.budgeted + self.autonomous + self.zero <= 0:
            raise ValueError("at least one share must be positive")
        return self


BudgetTraces = Literal["most_explicit", "most_lines", "sampled", "full_or_empty", "full", "full_read_back"]


class SFTStageConfig(Section):
    """Supervised fine-tuning on the thinking format (TRL SFTTrainer, loss on the assistant part only)."""

    steps: int = Field(300, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Sequences per step.")
    learning_rate: float = Field(1e-3, gt=0, description="Peak learning rate.")
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    n_examples: int = Field(12000, ge=1, description="Training examples generated (arithmetic) or used (files).")
    budgets: list[PositiveBudget] = Field(
        default_factory=lambda: [8, 16, 24, 32, 48, 64, 96, 128],
        description="Budgets sampled for budgeted examples (thinking tokens): one entry drawn uniformly per "
                    "example; an entry `{low, high}` then draws its budget from that range (uniformly, or "
                    "log-uniformly with `scale: log`; `significant: N` rounds it to N significant digits). "
                    + TOKENS_BOUND,
    )
    mix: BudgetMix = Field(default_factory=BudgetMix, description="How examples split across thinking modes.")
    autonomous_style: Literal["verbose", "terse"] = Field(
        "verbose", description="Trace style of unbudgeted (autonomous) examples."
    )
    budget_traces: BudgetTraces | Annotated[list[BudgetTraces], Field(min_length=1)] = Field(
        "most_explicit",
        description="Embedded task, budgeted examples: `sampled` takes the full trace when it fits the budget, else "
                    "draws one among those that fit (any line count, any grouping: the model sees every way to "
                    "compress); `most_explicit` always takes the most "
                    "explicit trace of uniform grouping; `most_lines` the trace with the most lines that fits, its "
                    "operators grouped as evenly as possible (2-1-1 where `most_explicit` writes 2-2); `full_or_empty` "
                    "the full trace when it fits, else no thinking (what real data gives: no compressed traces, "
                    "compression left to RL); `full` the full trace whatever the budget, past it where it does not "
                    "fit (a teacher that never saw the budget, as distilled data gives: budgets then taught by RL; "
                    "RL's `ptx_traces: fitting` would imitate those overruns, `full` does not); `full_read_back` the "
                    "same after a line that reads the problem back (a preamble that computes nothing, wasted under a "
                    "budget). A list draws one of its demonstrators per example (docs/rl_findings.md compares them).",
    )
    full_trace_share: float = Field(
        1.0, ge=0, le=1,
        description="With `budget_traces: sampled`: the share of budgeted examples whose budget fits the full trace "
                    "that take it; the others draw among every trace that fits, as examples short of room do.",
    )
    truncate_share: float = Field(
        0.0, ge=0, le=1,
        description="With `budget_traces: sampled`: the share of budgeted examples, among those not taking the full "
                    "trace, whose thinking is the verbose trace cut to the budget (whole lines), the answer then "
                    "folding the rest, as after a forced `</think>`; the others draw a compressed trace.",
    )
    max_length: int = Field(256, ge=16, le=MAX_TOKENS, description="Longest training sequence in tokens. "
                            + TOKENS_BOUND)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    logging_steps: int = Field(10, ge=1)

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list) -> list:
        if not v or any(isinstance(b, int) and b <= 0 for b in v):
            raise ValueError("budgets must be a non-empty list of positive integers and {low, high} ranges")
        return v


class VerifierTrainConfig(Section):
    """One reward model's training (`rm.genrm`, the generative verifier, is on unless disabled)."""

    enabled: bool = Field(True, description="Train this reward model.")
    steps: int = Field(200, ge=1, description="Optimizer steps.")
    batch_size: int = Field(32, ge=1)
    learning_rate: float = Field(5e-4, gt=0)


class ScalarRMTrainConfig(VerifierTrainConfig):
    """The scalar Bradley-Terry reward model's training (off unless enabled), with its own default so that a
    partly given `rm.scalar` section does not turn it on."""

    enabled: bool = Field(False, description="Train this reward model.")


class RMStageConfig(Section):
    """Reward models from the policy's own samples: a generative verifier (GenRM, Zhang et al. 2024) that answers
    Yes/No to "Is the answer correct?" (reward = P(Yes)), and optionally a scalar Bradley-Terry RM (TRL
    RewardTrainer) on chosen/rejected pairs. Samples come from the previous stage's checkpoint and are labelled
    by `label_reward`."""

    n_prompts: int = Field(600, ge=2, description="Problems to sample responses for.")
    samples_per_prompt: int = Field(4, ge=1, description="Responses sampled per problem.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    budgets: list[Budget] = Field(
        default_factory=lambda: ["auto", 16, 32, 64],
        description="Budgets the sampled prompts are given (cycled; a `{low, high}` entry draws from its range, "
        "log-uniformly with `scale: log`). " + TOKENS_BOUND,
    )
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="Generation cap per sampled response. "
                                + TOKENS_BOUND)
    label_reward: str | None = Field(
        None, description="Registered verifiable reward that labels samples (>= 0.5 = correct); by default the "
        "data's grader (`data.grader`: `exact_int` on the embedded task, `math` on a data file).")
    holdout_fraction: float = Field(0.2, gt=0, lt=1, description="Share of problems held out for accuracy and AUC.")
    balance: bool = Field(True, description="Balance correct/incorrect training samples by downsampling.")
    genrm: VerifierTrainConfig = Field(default_factory=VerifierTrainConfig, description="Generative verifier.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list) -> list:
        return check_budgets(v)

    @field_validator("label_reward")
    @classmethod
    def _known_reward(cls, v: str | None) -> str | None:
        from posttrain.rewards.registry import get_reward_cls

        if v is not None:
            get_reward_cls(v)  # raises naming the known rewards
        return v
    scalar: ScalarRMTrainConfig = Field(
        default_factory=ScalarRMTrainConfig, description="Scalar Bradley-Terry reward model."
    )


class EvalStageConfig(Section):
    """Quick accuracy table by difficulty for a few budgets, on held-out problems of the embedded task (with a data
    file: the rows the RL stages hold out, `n_per_difficulty` of each difficulty)."""

    n_per_difficulty: int = Field(40, ge=1, description="Problems per difficulty.")
    budgets: list[EvalBudget] = Field(
        default_factory=lambda: [0, "auto"], description="Budgets to evaluate; `auto` = no budget (autonomous). "
        + TOKENS_BOUND
    )
    max_new_tokens: int = Field(160, ge=1, le=MAX_TOKENS, description="Generation cap per response. " + TOKENS_BOUND)
    batch_size: int = Field(64, ge=1)
    seed: int = Field(12345, ge=0, le=MAX_SEED, description="Seed of the embedded task's held-out problems "
                      "(distinct from training seeds; unused with a data file).")


class SweepStageConfig(Section):
    """Budget-vs-accuracy sweep of this run's models (natural and capped, by difficulty, with 95% intervals) into
    RUN/sweep/: sweep.json, sweep.csv and plots. Greedy generation on rollout workers reused for every model."""

    models: list[str] = Field(
        default_factory=list,
        description="Stage names of this run (sft, grpo, ppo, distill) or model paths (checkpoint, run directory, "
        "PEFT adapter). Empty: every sft/grpo/ppo/distill stage listed before `sweep`, or the latest model if there "
        "is none.",
    )
    budgets: list[EvalBudget] = Field(
        default_factory=lambda: [0, 8, 16, 32, 64, "auto"], description="Budgets; `auto` = no budget (autonomous). "
        + TOKENS_BOUND
    )
    n_per_difficulty: int = Field(20, ge=1, description="Held-out problems per difficulty (with a data file: the "
                                  "first of the rows the RL stages hold out, per `data.difficulty_column` value).")
    seed: int = Field(12345, ge=0, le=MAX_SEED, description="Seed of the embedded task's held-out problems (the "
                      "same for every model and budget; unused with a data file).")
    max_new_tokens: int = Field(160, ge=1, le=MAX_TOKENS, description="Generation cap per response. " + TOKENS_BOUND)
    batch_size: int = Field(64, ge=1, description="Prompts per generate call.")
    rollout_engine: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig,
                                                description="What generates the sweep's responses (hf or vllm).")
    workers: int = Field(1, ge=1, description="Rollout workers generating in parallel (the run's threads are split "
                         "across them).")
    backend: Literal["ray", "local"] = Field("ray", description="Workers as Ray actors, or in the driver process.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list) -> list:
        return check_budgets(v)


class ExportStageConfig(Section):
    """Ship the run's latest model to RUN/export/adapter as a standard PEFT LoRA adapter with the tokenizer (the
    trained adapter of a LoRA run; extracted by per-matrix SVD from a full fine-tune), or as a merged checkpoint."""

    rank: int = Field(16, ge=1, description="Rank of an adapter extracted from a full fine-tune.")
    merged: bool = Field(False, description="Write a full HF checkpoint (RUN/export/merged) instead of an adapter.")
    target_modules: list[str] | None = Field(
        None, description="Linear modules an extracted adapter covers; unset: the family's (attention, MLA "
        "projections, shared experts where PEFT allows: docs/moe_families.md). An entry that matches nothing is an "
        "error.")
    target_parameters: list[str] | None = Field(
        None, description="Parameters (fused 3-D experts, routers) an extracted adapter covers via PEFT "
        "`target_parameters`; unset: the family's fused experts and `mlp.gate.weight` routers.")
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules (name suffixes) an extracted adapter stores whole with their tuned weights (PEFT "
        "`modules_to_save`), for changes a low-rank delta does not carry: `norm` matches every RMSNorm, "
        "`embed_tokens` the embedding (and a tied output layer). Costs their full size in the adapter. Used as "
        "given; `carry_embeddings` and `carry_small_tensors` add what training changed that it leaves out.",
    )
    carry_embeddings: bool = Field(True, description="Carry the embedding and output-head rows training changed "
                                   "(the tokens `posttrain prepare` added): only those rows (PEFT "
                                   "`trainable_token_indices`) while at most a quarter of the vocabulary changed, else "
                                   "the module whole; a tied head follows the embedding.")
    carry_small_tensors: bool = Field(True, description="Carry the changed norms and biases a low-rank delta cannot: "
                                      "small non-target modules whole (`modules_to_save`, names matching exactly "
                                      "them), LoRA layers' biases as PEFT `bias: lora_only` (docs/export.md); and, "
                                      "whole, the changed layers PEFT cannot adapt (DeepSeek-V3's and GLM4-MoE's "
                                      "shared experts and dense MLP layers, docs/moe_families.md).")
    max_kl: float = Field(0.1, gt=0, description="Largest mean per-token KL(trained || base + adapter), in nats, on "
                          "held-out prompts, of an extracted adapter loaded in plain PEFT; above it the export fails "
                          "(`posttrain export --max-kl`).")
    allow_lossy: bool = Field(False, description="Write an extracted adapter further than `max_kl` from the trained "
                              "model anyway, with a warning (`posttrain export --allow-lossy`).")


class RecipeConfig(Section):
    run_dir: str = Field("runs/quickstart", description="Directory the run writes into (resumes if it exists).")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="Global seed (0 to 2^32-1, numpy's range).")
    device: str = Field("auto", description="`auto`, `cpu`, `cuda` or `cuda:N`.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Training dtype; auto = bf16 on CUDA, fp32 on CPU."
    )
    threads: int = Field(0, ge=0, description="torch CPU threads (0 = all cores).")
    stages: list[str] = Field(
        default_factory=lambda: ["base", "sft", "eval"], min_length=1,
        description="Stages to run, in order (at least one): " + ", ".join(get_args(StageName)) + ". A later "
                    "round of sft, rm, eval, grpo or ppo is `name@2`, `name@3`, ... (or `flywheel.rounds`).",
    )
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    task: TaskConfig = Field(default_factory=TaskConfig)
    base: BaseStageConfig = Field(default_factory=BaseStageConfig)
    sft: SFTStageConfig = Field(default_factory=SFTStageConfig)
    rm: RMStageConfig = Field(default_factory=RMStageConfig)
    grpo: GRPOStageConfig = Field(default_factory=GRPOStageConfig)
    ppo: PPOStageConfig = Field(default_factory=PPOStageConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    eval: EvalStageConfig = Field(default_factory=EvalStageConfig)
    distill: DistillStageConfig = Field(default_factory=DistillStageConfig)
    sweep: SweepStageConfig = Field(default_factory=SweepStageConfig)
    export: ExportStageConfig = Field(default_factory=ExportStageConfig)
    flywheel: FlywheelConfig = Field(default_factory=FlywheelConfig)

    @model_validator(mode="before")
    @classmethod
    def _expand_rounds(cls, data):
        """`flywheel.rounds` N >= 2: `stages` with the round stages repeated (`posttrain.rounds.expand_rounds`). A
        list that already names later rounds (a run directory's recipe.yaml) must be that expansion."""
        from posttrain.rounds import expand_rounds

        if not isinstance(data, dict):
            return data
        fw, stages = data.get("flywheel"), data.get("stages")
        rounds = fw.get("rounds", 1) if isinstance(fw, dict) else getattr(fw, "rounds", 1)
        if not isinstance(rounds, int) or rounds < 2 or not isinstance(stages, list) \
                or not all(isinstance(s, str) for s in stages):
            return data
        first = [s for s in stages if "@" not in s]
        expanded = expand_rounds(first, rounds)
        if len(first) < len(stages) and stages != expanded:
            raise ValueError(f"stages: with flywheel.rounds: {rounds} list round 1's stages only (they expand to "
                             f"{expanded}), or name every round's stages yourself and leave flywheel.rounds at 1")
        return {**data, "stages": expanded}

    @field_validator("stages")
    @classmethod
    def _stage_names(cls, v: list[str]) -> list[str]:
        from posttrain.rounds import check_stages

        problems = check_stages(v)
        if problems:
            raise ValueError("; ".join(problems))
        return v

    @model_validator(mode="before")
    @classmethod
    def _resolve_label_reward(cls, data):
        """`rm.label_reward` unset: the data's grader (`data.grader`), written into the recipe
        (and so into the run's recipe.yaml and the rerun guard) as the labeller actually used."""
        if not isinstance(data, dict):
            return data
        rm, source = data.get("rm"), data.get("data")
        grader = (source.get("grader", "auto") if isinstance(source, dict) else getattr(source, "grader", "auto"))
        source = (source.get("source", "arithmetic") if isinstance(source, dict)
                  else getattr(source, "source", "arithmetic"))
        if grader != "auto":
            label = grader
        else:  # the task's own grader (DataConfig.grader_name)
            from posttrain.tasks.task import TASKS

            label = TASKS.get(source).default_grader if source in TASKS else "math"
        if rm is None or isinstance(rm, dict) and rm.get("label_reward") is None:
            return {**data, "rm": {**(rm or {}), "label_reward": label}}
        if isinstance(rm, RMStageConfig) and rm.label_reward is None:
            return {**data, "rm": rm.model_copy(update={"label_reward": label})}
        return data

    @model_validator(mode="after")
    def _sweep_models(self) -> "RecipeConfig":
        for m in self.sweep.models:
            if m not in self.stages and not Path(m).expanduser().is_dir():
                raise ValueError(f"sweep.models: {m!r} is neither a stage of this recipe ({', '.join(self.stages)}) "
                                 "nor an existing directory")
        return self

    @model_validator(mode="after")
    def _flywheel_genrm(self) -> "RecipeConfig":
        """`flywheel.genrm` filters a later round's sft samples by the GenRM of the latest rm stage before it: refused
        at load time, not after round 1 has trained, when there is no such stage."""
        from posttrain.rounds import latest, split_stage

        if not self.flywheel.genrm:
            return self
        for s in self.stages:
            kind, r = split_stage(s)
            missing = "there is none" if latest(self.stages, s, "rm") is None else \
                None if self.rm.genrm.enabled else "rm.genrm.enabled is false"
            if kind == "sft" and r > 1 and missing:
                raise ValueError(f"flywheel.genrm: {s} filters its samples by the GenRM of the latest rm stage before "
                                 f"it, and {missing}; run rm (with rm.genrm.enabled) before it, or set "
                                 "flywheel.genrm: false")
        return self

    @model_validator(mode="after")
    def _moe_features(self) -> "RecipeConfig":
        """`grpo`/`ppo` `routing_replay` and `router_aux_coef` against what model.path's router supports (its
        config.json alone, `posttrain.moe.check_moe_features`), so a recipe is refused before any stage runs."""
        if self.model.path is not None and any(a in self.stages for a in ("grpo", "ppo")):
            from posttrain.moe import check_moe_features

            problems = check_moe_features(Path(self.model.path).expanduser(), self)
            if problems:
                raise ValueError("; ".join(problems))
        return self

    @model_validator(mode="after")
    def _fsdp_needs_actors(self) -> "RecipeConfig":
        """`fsdp` shards over learners in their own processes: with `ray.backend: local` the process group would
        start inside this driver process."""
        for algo in ("grpo", "ppo"):
            if algo in self.stages and getattr(self, algo).fsdp and self.ray.backend == "local":
                raise ValueError(f"{algo}.fsdp: true shards the learners' weights across their processes, and "
                                 "ray.backend: local runs them inside this one; use ray.backend: ray")
        return self

    @model_validator(mode="after")
    def _broadcast_needs_actors(self) -> "RecipeConfig":
        """A broadcast meets learner 0 and the rollout workers in a process group: with `ray.backend: local` they
        are all this one process, which cannot be several ranks at once."""
        for algo in ("grpo", "ppo"):
            if algo in self.stages and getattr(self, algo).weight_sync.method == "broadcast" \
                    and self.ray.backend == "local":
                raise ValueError(f"{algo}.weight_sync.method: broadcast sends the weights between the learner's and "
                                 "the rollout workers' processes, and ray.backend: local runs them all in this one; "
                                 "use ray.backend: ray, or weight_sync.method: object_store")
        return self

    def _check_rm_rewards(self, algo: str) -> None:
        """A reward that reads this run's `rm` stage output (`genrm`, `scalar_rm` without `params.path`) needs that
        stage before `algo`, and `scalar_rm` needs `rm.scalar.enabled`."""
        from posttrain.rewards.registry import get_reward_cls

        for i, r in enumerate(getattr(self, algo).rewards):
            sub = getattr(get_reward_cls(r.name), "run_output", None)
            if sub is None or (r.params or {}).get("path") is not None:
                continue
            key = f"{algo}.rewards.{i}.params.path"
            if "rm" not in self.stages or self.stages.index("rm") > self.stages.index(algo):
                raise ValueError(f"{key}: reward {r.name!r} without a path reads this run's rm stage output "
                                 f"(rm/{sub}); run the rm stage before {algo}, or give the checkpoint's path")
            if sub == "scalar" and not self.rm.scalar.enabled:
                raise ValueError(f"{key}: reward 'scalar_rm' reads the rm stage's scalar RM; set "
                                 "rm.scalar.enabled: true, or give the checkpoint's path")

    @model_validator(mode="after")
    def _stage_inputs(self) -> "RecipeConfig":
        if "base" not in self.stages and self.model.path is None and any(s != "base" for s in self.stages):
            raise ValueError("model.path is required when the `base` stage is not run")
        if "base" in self.stages and self.model.path is not None:
            raise ValueError("set either model.path (an existing checkpoint) or the `base` stage, not both")
        evaluating = [s for s in ("eval", "sweep") if s in self.stages]
        if self.data.source != "arithmetic" and evaluating and not any(
                a in self.stages and getattr(self, a).eval_budgets and getattr(self, a).eval_n_per_difficulty > 0
                for a in ("grpo", "ppo")):
            raise ValueError(f"stages: with data.source: {self.data.source}, {' and '.join(evaluating)} "
                             f"evaluate{'s' if len(evaluating) == 1 else ''} the "
                             "rows a grpo or ppo stage holds out for its evaluation (no stage trains on them), and "
                             "this recipe has no such stage; add one, or sweep a file of held-out problems with "
                             "`posttrain sweep --data FILE`")
        for algo in ("grpo", "ppo"):
            if algo in self.stages:
                self._check_rm_rewards(algo)
        from posttrain.tasks.task import missing_hooks

        problems = missing_hooks(self) + check_distill(self)
        if problems:
            raise ValueError("; ".join(problems))
        for algo in ("grpo", "ppo"):
            section = getattr(self, algo)
            traces = self.sft.budget_traces
            blind = sorted(set(traces if isinstance(traces, list) else [traces]) & {"full", "full_read_back"})
            if algo in self.stages and section.ptx_coef > 0 and section.ptx_traces == "fitting" and blind:
                raise ValueError(f"{algo}.ptx_traces: `fitting` imitates the SFT stage's demonstrations, and "
                                 f"sft.budget_traces {', '.join(blind)} ignores the budget, so {algo} would imitate "
                                 f"its overruns; set {algo}.ptx_traces: full (full traces within budget only)")
        return self
