"""The RL stages' part of the recipe schema (`posttrain.config`): the `grpo`/`ppo` sections, their reward
components, and the `ray` section (where the actors run, their resources and fault limits)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, create_model, field_validator, model_validator

from posttrain.config_common import (MAX_TOKENS, TOKENS_BOUND, Budget, EvalBudget, LoraConfig, RolloutEngineConfig,
                                     Section, check_budgets)


class GRPORewardConfig(Section):
    """One reward component (a registered reward) and the samples it scores."""

    name: str = Field(description="Registered reward name (e.g. budget_l1_max, length_group, exact_int).")
    weight: float = Field(1.0, description="Weight in the sum of components.")
    params: dict = Field(default_factory=dict, description="Keyword arguments of the reward's constructor.")
    key: str | None = Field(None, description="Metric key (defaults to `name`); keys must be unique per mode.")
    on: Literal["all", "budgeted", "auto"] = Field(
        "all", description="Which samples it scores: `budgeted` (an int budget, 0 included), `auto` (no budget) "
        "or `all`."
    )

    @field_validator("name")
    @classmethod
    def _known_reward(cls, v: str) -> str:
        from posttrain.rewards.registry import get_reward_cls

        get_reward_cls(v)  # raises naming the known rewards
        return v

    @model_validator(mode="after")
    def _params(self) -> "GRPORewardConfig":
        from posttrain.rewards.registry import check_reward_params

        check_reward_params(self.name, self.params)  # before any work, not when the reward actor starts
        return self


class RewardCombineConfig(Section):
    """How each kind's reward components (budgeted, autonomous) combine into one score
    (`posttrain.rewards.combine.CombinedReward`): `sum` (weighted), or a verifier and a judge (two component keys)
    with `gated` (HERO: right answers in [1-beta, 1], wrong ones in [0, beta], so a generative judge can never rank
    a wrong answer above a right one), `verifiable` (the verifier alone) or `generative` (the judge alone); the other
    components are added with their weights."""

    mode: Literal["sum", "verifiable", "generative", "gated"] = Field("sum", description="How to combine.")
    verifier: str | None = Field(None, description="Key of the verifiable component (e.g. exact_int, math, code).")
    judge: str | None = Field(None, description="Key of the generative component (e.g. genrm).")
    beta: float = Field(0.25, ge=0, lt=0.5, description="`gated`: the width of each band.")
    verifier_threshold: float = Field(1.0, description="`gated`: the verifier's score that counts as right.")


def _default_rl_rewards() -> list[GRPORewardConfig]:
    return [
        # budgeted prompts: correctness minus L1-Exact's gap to the budget (alpha per token, scaled to budgets of
        # tens of tokens), and a penalty when </think> had to be forced: the cap keeps every rollout within
        # budget, so only this term tells a model that stopped by itself from one that was stopped
        GRPORewardConfig(name="budget_l1_exact", params={"alpha": 0.005}, on="budgeted", key="correct_l1"),
        GRPORewardConfig(name="budget_forced", params={"penalty": 0.25}, on="budgeted"),
        # no budget: correctness plus a small bonus for being shorter than the group's other answers (Kimi k1.5)
        GRPORewardConfig(name="length_group", params={"weight": 0.05}, on="auto"),
    ]


class AsyncConfig(Section):
    """`grpo.async` / `ppo.async`: rollouts ahead of the learner (bounded staleness) and the off-policy correction
    (`posttrain.stages.rl_async`, `posttrain.algo.offpolicy`)."""

    max_staleness: int = Field(
        0, ge=0, description="K: the rollout workers generate the batches of the next K steps while the learner "
        "trains on the current one, so a batch is trained on by a policy up to K versions newer than the one that "
        "sampled it (a row older than K versions is dropped and counted, `async/dropped_stale`). 0: the synchronous "
        "step (rollout, then learner). With the HF rollout engine the weights reach the rollout workers between "
        "their batches, after each update.")
    correction: str = Field(
        "none", description="Off-policy correction (`posttrain.algo.offpolicy`) on the ratio of the learner's "
        "old-policy log-probs (recomputed by the learner before its update: one extra forward, no grad) to the "
        "rollout's: `tis` (token truncated IS: w = min(ratio, cap); `tis_cap` is this), `seq_tis` (sequence "
        "truncated IS), `mis` (tokens outside [lower, cap] masked out of the loss), `icepop` (weight = ratio inside "
        "[lower, cap], 0 outside; the tokens stay in the loss's count), `seq_mis` (rows, by the product of their "
        "token ratios), `geo_mis` (rows, by its geometric mean), `decoupled` (AReaL: weight = ratio, 0 above cap). "
        "`none`: the rollout's log-probs are the PPO ratio's old policy.")
    cap: float = Field(2.0, gt=0, description="The correction's upper threshold C (truncation or mask).")
    lower: float | None = Field(
        None, gt=0, description="The lower threshold: for the masking corrections and icepop the kept interval's "
        "lower end (default 1/cap), for tis/seq_tis a floor on the weights (default none); must be < cap.")
    partial: bool = Field(
        False, description="Partial rollouts (a row in generation continues under new weights): not supported by "
        "either rollout engine (hf, vllm), which cannot pause a row; true is an error.")

    @field_validator("correction")
    @classmethod
    def _known_correction(cls, v: str) -> str:
        from posttrain.algo.registry import OFF_POLICY_CORRECTIONS

        if v != "none" and v not in OFF_POLICY_CORRECTIONS:
            raise ValueError(f"unknown off-policy correction {v!r}; known: none, "
                             + ", ".join(OFF_POLICY_CORRECTIONS.names()))
        return v

    @field_validator("partial")
    @classmethod
    def _no_partial(cls, v: bool) -> bool:
        if v:
            raise ValueError("partial rollouts are not supported by either rollout engine (hf: posttrain.decode's "
                             "Decoder generates a batch to the end under one set of weights; vllm: a row's requests "
                             "run under the weights of their call): neither can pause a row and continue it under "
                             "new ones; set it to false")
        return v

    @model_validator(mode="after")
    def _thresholds(self) -> "AsyncConfig":
        if self.correction != "none":
            from posttrain.algo.offpolicy import check_thresholds

            check_thresholds(self.correction, self.cap, self.lower)  # "cap: ..." / "lower: ...": the key is named
        elif self.lower is not None:
            raise ValueError("lower: sets a threshold of a correction, and `correction` is none; name one (tis, "
                             "seq_tis, mis, ...) or leave it out")
        return self


class WeightSyncConfig(Section):
    """`grpo.weight_sync` / `ppo.weight_sync`: how the learner's weights reach the rollout workers after each step
    (`posttrain.workers.weight_sync`). Either way the driver never holds them."""

    method: Literal["object_store", "broadcast"] = Field(
        "object_store", description="`object_store`: learner 0 puts them in Ray's object store and each rollout worker "
        "fetches them from there. `broadcast`: learner 0 broadcasts them over a process group of its own with the "
        "rollout workers (gloo on CPU, NCCL on CUDA), for large models; needs ray.backend: ray. A failed broadcast "
        "(a worker died) falls back to the object store for that sync and builds the group anew.")
    backend: Literal["auto", "gloo", "nccl"] = Field(
        "auto", description="broadcast: `auto` is nccl when the learners and rollout workers are on CUDA, else gloo.")
    bucket_mib: int = Field(256, ge=1, description="broadcast: tensors of one dtype go in buffers of at most this "
                            "many MiB (one collective each); a larger tensor goes alone.")
    timeout_s: float = Field(600.0, gt=0, description="broadcast: how long joining the group and each collective "
                             "may take.")


class _RLStageFields(Section):
    """GRPO / PPO on the embedded arithmetic task, with per-prompt thinking budgets (controllable thinking) and
    budget-free prompts (autonomous thinking). Roles are Ray actors (see the `ray` section)."""

    steps: int = Field(60, ge=1, description="Optimizer steps (one rollout batch each).")
    prompts_per_step: int = Field(16, ge=1, description="Problems sampled per step.")
    group_size: int = Field(8, ge=1, description="Responses sampled per problem (a GRPO group; PPO may use 1).")
    budgets: list[Budget] = Field(
        default_factory=lambda: [0, 8, 16, 24, 32, 48, "auto"],
        description="Budgets drawn (one entry uniformly per problem) for the prompts; `auto` = no budget; an entry "
                    "`{low, high}` draws its budget from that range, uniformly or with `scale: log` log-uniformly, "
                    "rounded with `significant: N` (metrics then report it as `low-high`, or `low-highlog`). "
                    + TOKENS_BOUND,
    )
    max_new_tokens: int = Field(128, ge=1, le=MAX_TOKENS, description="Generation cap per response during "
                                "rollouts. " + TOKENS_BOUND)
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1 keeps the recorded logp on-policy).")
    top_p: float = Field(1.0, gt=0, le=1)
    learning_rate: float = Field(7e-5, gt=0, description="AdamW learning rate (constant).")
    weight_decay: float = Field(0.0, ge=0)
    adv_estimator: str = Field("grpo", description="Registered advantage estimator (`grpo`, `dr_grpo`, `gae`).")
    policy_loss: str = Field("vanilla", description="Registered policy loss (`vanilla`, `gspo`).")
    loss_agg: Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"] = Field("token_mean")
    clip_low: float = Field(0.2, ge=0, lt=1, description="Lower clip range of the ratio.")
    clip_high: float = Field(0.28, ge=0, description="Upper clip range (> clip_low: DAPO clip-higher).")
    dual_clip_c: float | None = Field(None, gt=1, description="Dual-clip constant for negative advantages (null: off).")
    tis_cap: float | None = Field(
        None, gt=0, description="Truncated importance sampling (Yao et al. 2025): the learner recomputes the old "
        "policy's log-probs itself before each step (one extra forward, no grad) and weights each token's policy "
        "loss by min(pi_learner / pi_rollout, tis_cap), correcting for the rollout's numerics differing from the "
        "learner's (verl's rollout_is_threshold, TRL's vllm_importance_sampling_cap; 2 is usual). null: off, the "
        "rollout's log-probs are the old policy's. The same as `async: {correction: tis, cap: ...}`.")
    mini_batches: int = Field(2, ge=1, description="Optimizer updates per rollout batch (split by groups).")
    micro_batch_tokens: int | None = Field(
        None, ge=1, description="Split each mini-batch's forward/backward into micro-batches of at most this many "
        "padded tokens (rows x (longest prompt + longest response)) and accumulate their gradients, each term "
        "scaled by its share of the mini-batch's counts, so the update is the same as in one pass. null: one pass.")
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass instead of keeping them (less memory, "
        "about a third more compute); not with routing_replay.")
    kl_coef: float = Field(0.05, ge=0, description="KL-to-reference coefficient; 0 skips the reference actor.")
    kl_kind: str = Field("k3", description="KL estimator (`k1`, `k2`, `k3`).")
    kl_in_reward: bool = Field(False, description="Apply the KL as a per-token reward penalty (PPO style) "
                               "instead of a loss term.")
    entropy_coef: float = Field(0.0, ge=0, description="Entropy bonus coefficient (0: metric only).")
    router_aux_coef: float = Field(0.001, ge=0, description="Router load-balancing loss coefficient (MoE).")
    routing_replay: bool = Field(False, description="R3: replay the rollout's top-k experts in the learner's forward.")
    router_bias_update_rate: float = Field(
        0.0, ge=0, description="DeepSeek-V3's auxiliary-loss-free balancing (arXiv 2412.19437, sec. 2.1.2): after "
        "each learner step, every router's e_score_correction_bias moves by this rate gamma towards balance, b_i += "
        "gamma * sign(mean load - load_i), load_i = the step's real tokens routed to expert i (the replayed experts "
        "under routing_replay; summed over data-parallel learners). The biases reach the rollout workers with the "
        "weights and are saved with the model. DeepSeek-V3 used 0.001. Only routers with a correction bias "
        "(DeepSeek-V3, GLM4-MoE); 0: off, the checkpoint's biases are kept.")
    ptx_coef: float = Field(
        0.0, ge=0, description="Embedded task: add this times the NLL of demonstrations of each step's problems "
        "(as the SFT stage writes them) to the policy loss, InstructGPT's PPO-ptx: keeps what SFT taught from "
        "eroding while RL changes how budgets are spent.")
    ptx_traces: Literal["fitting", "full"] = Field(
        "fitting", description="ptx demonstrations: `fitting`, the SFT stage's (the trace `sft.budget_traces` "
        "gives for each budget); `full`, only full verbose traces (no budget, or one they fit, whatever the SFT "
        "demonstrator wrote there), leaving compression (and budget 0's direct answers) to RL. A budget-blind SFT "
        "demonstrator (`full`, `full_read_back`) needs `full`: `fitting` would imitate its overruns.")
    process_penalty: float = Field(
        0.0, ge=0, description="Embedded task: subtract this from the advantage (GRPO) or reward (PPO) of the token "
        "where a response's first error is (the first trace line with a wrong value or a miscopied pair, else a wrong "
        "answer): a verifiable process reward that blames the step that went wrong, not every token of the trace.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient clipping threshold (total L2 norm).")
    trainable: list[str] = Field(default_factory=list, description="Regular expressions of the parameter names to "
                                 "train (empty: all); only these reach the rollout workers after each update.")
    rollout_engine: RolloutEngineConfig = Field(default_factory=RolloutEngineConfig,
                                                description="What samples the rollouts (hf or vllm).")
    weight_sync: WeightSyncConfig = Field(default_factory=WeightSyncConfig,
                                          description="How the learner's weights reach the rollout workers.")
    lora: LoraConfig = Field(default_factory=LoraConfig, description="Train a LoRA adapter on the policy; only the "
                             "adapter reaches the rollout workers after each update.")
    fsdp: bool = Field(
        False, description="Shard the learners' parameters, gradients and AdamW state across the data-parallel "
        "learners (`ray.learner.num`) with FSDP2, per decoder layer (docs/fsdp.md): the same step as unsharded "
        "learners, about 1/N of the memory each. On CUDA the weights and AdamW state are fp32 and the forward runs in "
        "`model.dtype` (mixed precision); on CPU no mixed precision. LoRA and `trainable` work too.")
    dynamic_sampling: bool = Field(
        True, description="Drop groups whose rewards are all equal (DAPO's filter; no resampling to refill)."
    )
    max_consecutive_skips: int = Field(5, ge=1, description="Stop the run after this many skipped (non-finite) steps "
                                       "in a row.")
    save_every: int = Field(20, ge=0, description="Save the training state every N steps (0: only at the end).")
    keep_checkpoints: int = Field(2, ge=1, description="Saved training states kept (the newest).")
    rewards: list[GRPORewardConfig] = Field(default_factory=_default_rl_rewards, description="Reward components.")
    reward_combine: RewardCombineConfig = Field(default_factory=RewardCombineConfig,
                                                description="How the components combine (sum, or HERO gating).")
    eval_budgets: list[EvalBudget] = Field(
        default_factory=lambda: [8, 16, 32, "auto"],
        description="Budgets of the before/after evaluation (natural: the budget is only an instruction). "
                    + TOKENS_BOUND,
    )
    eval_n_per_difficulty: int = Field(
        25, ge=0, description="Held-out problems per difficulty at each eval budget (0 = no eval). Each budget has "
        "problems of its own (seeded by eval.seed and the budget), the same before and after training.")
    eval_rows: int | None = Field(
        None, ge=1, description="Data files: rows held out per eval budget, spread through the file (default: "
        "eval_n_per_difficulty x the task's difficulty count), at most half the file in all.")
    eval_max_new_tokens: int = Field(160, ge=1, le=MAX_TOKENS, description="Generation cap per response in the "
                                     "before/after evaluation. " + TOKENS_BOUND)
    eval_batch_size: int = Field(256, ge=1, description="Prompts per generate call in the before/after evaluation.")
    # PPO only
    critic_learning_rate: float = Field(1e-4, gt=0, description="PPO: critic AdamW learning rate.")
    value_clip: float | None = Field(0.2, gt=0, description="PPO: value clipping range (null: off).")
    gamma: float = Field(1.0, ge=0, le=1, description="PPO: GAE discount.")
    lam: float = Field(0.95, ge=0, le=1, description="PPO: GAE lambda.")
    whiten_advantages: bool = Field(True, description="PPO: whiten GAE advantages over the batch.")

    @field_validator("budgets")
    @classmethod
    def _budgets(cls, v: list) -> list:
        return check_budgets(v)

    @model_validator(mode="after")
    def _check(self) -> "RLStageConfig":
        a = getattr(self, "async")
        if self.tis_cap is not None and a.correction != "none":
            raise ValueError(f"tis_cap: is the `tis` correction with cap {self.tis_cap:g} (`async: {{correction: tis, "
                             f"cap: {self.tis_cap:g}}}`); it cannot be combined with async.correction: {a.correction}; "
                             f"keep one of the two")
        if self.rollout_engine.name == "vllm":
            if self.lora.enabled:
                raise ValueError("rollout_engine.name: vllm takes no LoRA adapter (vLLM's LoRA path needs Triton, "
                                 "and fused experts a mixed-MoE format); with lora.enabled use rollout_engine.name: hf")
            if self.routing_replay:
                raise ValueError("rollout_engine.name: vllm does not record routing; routing_replay needs "
                                 "rollout_engine.name: hf")
        if self.gradient_checkpointing and self.routing_replay:
            raise ValueError("gradient_checkpointing cannot be combined with routing_replay: the recompute in the "
                             "backward pass would route by the router's own top-k, not the replayed experts")
        if self.mini_batches > self.prompts_per_step:
            raise ValueError("mini_batches must be <= prompts_per_step (mini-batches split by groups)")
        if not self.rewards:
            raise ValueError("rewards must name at least one reward")
        combine = self.reward_combine
        for role in {"verifiable": ("verifier",), "generative": ("judge",),
                     "gated": ("verifier", "judge")}.get(combine.mode, ()):
            key = getattr(combine, role)
            if key is None:
                raise ValueError(f"reward_combine.{role}: mode {combine.mode!r} needs the key of a reward component")
            for kind in ("budgeted", "auto"):
                keys = [r.key or r.name for r in self.rewards if r.on in ("all", kind)]
                if keys and key not in keys:
                    raise ValueError(f"reward_combine.{role}: {key!r} is not among the rewards that score {kind} "
                                     f"samples ({', '.join(keys)}); give it `on: all`")
        return self


RLStageConfig = create_model(  # `async` is a Python keyword: the field can only be added this way
    "RLStageConfig", __base__=_RLStageFields, __module__=__name__, __doc__=_RLStageFields.__doc__,
    **{"async": (AsyncConfig, Field(default_factory=AsyncConfig, description="Rollouts ahead of the learner "
                                    "(bounded staleness) and the off-policy correction."))})


def off_policy(cfg) -> tuple[str, float, float | None]:
    """(correction name, cap, lower) of a `grpo`/`ppo` section: `tis_cap` is the `tis` correction; ("none", ...)
    when off."""
    a = getattr(cfg, "async")
    return ("tis", cfg.tis_cap, None) if cfg.tis_cap is not None else (a.correction, a.cap, a.lower)


def max_staleness(cfg) -> int:
    """`grpo.async.max_staleness` / `ppo.async.max_staleness`."""
    return getattr(cfg, "async").max_staleness


class GRPOStageConfig(RLStageConfig):
    """GRPO (Shao et al. 2024) with DAPO's clip-higher and dynamic sampling."""


class PPOStageConfig(RLStageConfig):
    """PPO (Schulman et al. 2017) with a critic and GAE; group_size 1 by default."""

    group_size: int = Field(4, ge=1, description="Responses sampled per problem.")
    adv_estimator: str = Field("gae", description="Advantage estimator; PPO uses `gae`.")
    kl_coef: float = Field(0.02, ge=0, description="KL coefficient (as a reward penalty with kl_in_reward).")
    kl_kind: str = Field("k1", description="KL estimator; k1 is the classic in-reward penalty.")
    kl_in_reward: bool = Field(True, description="PPO applies the KL as a per-token reward penalty.")
    dynamic_sampling: bool = Field(False, description="PPO keeps every sample (the critic is the baseline).")


def _cpus(default: float):
    return Field(default, ge=0, description="CPUs reserved per actor; its torch threads = max(1, int(cpus)).")


def _ray_restarts(default: int):
    return Field(default, ge=0, description="Restarts Ray may make after the actor dies or hangs (the driver "
                 "restoring its state: a rollout worker gets the current weights), after which the run stops.")


def _step_loop_recoveries(default: int):
    return Field(default, ge=0, description="Recoveries of the whole step loop after this actor dies or hangs "
                 "(`backend: ray`; one count shared by learner and critic): every actor restarted, training resumed "
                 "from the last saved state (the steps since it redone; from step 0 before the first save). Ray never "
                 "restarts it alone: it holds the training state, and would come back with the input model and a "
                 "fresh optimizer. A failure outside the step loop (evaluation, final save) stops the run.")


def _one_actor(role: str):
    return Field(1, ge=1, le=1, description=f"Always 1: one {role} actor serves the whole batch.")


class ActorGroupConfig(Section):
    """Resources and fault limits of one kind of Ray actor. Each role has its own subclass, so that its defaults
    are the same whether its section is absent, empty or partly given (and `posttrain schema` prints them)."""

    num: int = Field(1, ge=1, description="How many actors of this kind.")
    cpus: float = _cpus(1.0)
    gpus: float = Field(0.0, ge=0, description="GPUs per actor.")
    threads: int | None = Field(None, ge=1, description="torch threads (default from cpus).")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Custom Ray resources each actor reserves, `{label: amount}`: it runs only "
        "on a node started with that label (`ray start --address HEAD --resources '{\"gpu_node\": 8}'`), which "
        "places the role on chosen nodes of a cluster (`ray.address`). A label no node has is an error at start "
        "(and at recipe load when no cluster is given: a local instance has none). A role without one may run on "
        "any node with CPUs to spare. CPUs and GPUs go in `cpus` / `gpus`.")
    max_restarts: int = _ray_restarts(2)
    timeout_s: float | None = Field(600.0, gt=0, description="Seconds any call may take before the actor is "
                                    "treated as hung (killed, restarted, the call retried).")

    @field_validator("resources")
    @classmethod
    def _resources(cls, v: dict[str, float]) -> dict[str, float]:
        for label, amount in v.items():
            if label in ("CPU", "GPU"):
                raise ValueError(f"{label!r}: give CPUs and GPUs as `cpus` / `gpus`, not as a custom resource")
            if not label.strip():
                raise ValueError("a resource label must not be empty")
            if not amount > 0 or round(amount, 4) != amount:  # Ray counts resources in units of 0.0001
                raise ValueError(f"{label}: {amount!r} is not a positive amount in steps of 0.0001")
        return v


class RolloutGroupConfig(ActorGroupConfig):
    """The rollout workers: generate each step's responses (the current weights pushed to them after each update)."""


class LearnerGroupConfig(ActorGroupConfig):
    """The learners: hold the policy and its optimizer, and update it (several: data parallel)."""

    max_restarts: int = _step_loop_recoveries(0)


class ReferenceGroupConfig(ActorGroupConfig):
    """The reference model: log-probabilities for the KL penalty (not started when kl_coef is 0)."""

    num: int = _one_actor("reference")
    cpus: float = _cpus(0.0)


class CriticGroupConfig(ActorGroupConfig):
    """The critic (PPO, or `adv_estimator: gae`): the value model and its optimizer."""

    num: int = _one_actor("critic")
    cpus: float = _cpus(0.0)
    max_restarts: int = _step_loop_recoveries(0)


class RewardGroupConfig(ActorGroupConfig):
    """The reward worker: scores every response with the recipe's reward components."""

    num: int = _one_actor("reward")
    cpus: float = _cpus(0.0)


RAY_ROLES = ("rollout", "learner", "reference", "critic", "reward")  # the `ray.<role>` sections


class RayConfig(Section):
    """Where the RL actors run: a local Ray instance (default) or a cluster (`address`)."""

    address: str | None = Field(None, description="Ray cluster address (the head's `host:6379` as `ray start` prints it, or `auto`); "
                                "null joins `RAY_ADDRESS` when set (as under `ray job submit`), else starts a "
                                "local instance. A cluster with token authentication (Ray's default) needs "
                                "RAY_AUTH_MODE=token and its token in this process's environment.")
    num_cpus: float | None = Field(None, gt=0, description="CPUs of the local instance (default: all cores).")
    backend: Literal["ray", "local"] = Field("ray", description="`local` runs every worker in the driver process "
                                             "(no Ray; for debugging).")
    rollout: RolloutGroupConfig = Field(default_factory=RolloutGroupConfig)
    learner: LearnerGroupConfig = Field(default_factory=LearnerGroupConfig)
    reference: ReferenceGroupConfig = Field(default_factory=ReferenceGroupConfig)
    critic: CriticGroupConfig = Field(default_factory=CriticGroupConfig)
    reward: RewardGroupConfig = Field(default_factory=RewardGroupConfig)

    @model_validator(mode="after")
    def _resources_need_a_cluster(self) -> "RayConfig":
        """Custom resources are given to nodes by `ray start --resources`: the local instance started when neither
        `address` nor RAY_ADDRESS names a cluster has none, and its actors would wait for them forever."""
        import os

        if self.backend != "ray" or self.address not in (None, "local") or (
                self.address is None and os.environ.get("RAY_ADDRESS")):
            return self
        for role in RAY_ROLES:
            labels = [k for k in getattr(self, role).resources if not k.startswith("node:")]
            if labels:
                raise ValueError(
                    f"ray.{role}.resources: {', '.join(map(repr, labels))} would place the actor on a node started "
                    "with that label, but with no `ray.address` (nor RAY_ADDRESS) a local Ray instance starts and "
                    "has no custom resources; set ray.address to a cluster whose nodes carry it (`ray start "
                    "--address HEAD --resources ...`), or remove the key")
        return self

    @field_validator("address")
    @classmethod
    def _address(cls, v: str | None) -> str | None:
        import re

        if v is None or v in ("auto", "local") or re.fullmatch(r"(ray://)?[\w.\-\[\]:]+:\d+", v):
            return v
        raise ValueError(f"{v!r} is not a Ray address: give the head's host:port (10.0.0.5:6379), auto, "
                         "ray://host:port, or null (the default) for a local instance")
