"""The RL stage's workers: every role spawned (Ray actors unless `ray.backend` is local), data-parallel learners
joined into one process group, and the weight-sync backend chosen before any actor starts. `stages/rl.py`'s
driver calls `start_workers`; the fault tests replace the worker classes here (`rl_workers.RolloutWorker`, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from posttrain.runlog import log
from posttrain.stages.rl_sync import sync_backend
from posttrain.workers.actors import Proxy, gather, spawn
from posttrain.workers.engines import engine_class, engine_kwargs
from posttrain.workers.learner import CriticWorker, LearnerWorker, ReferenceWorker
from posttrain.workers.ray_cluster import init_ray, log_placement as _log_placement, recipe_actor_options as _options
from posttrain.workers.reward import RLRewardWorker, with_run_output
from posttrain.workers.rollout import RolloutWorker


@dataclass
class Workers:
    rollouts: list[Proxy[RolloutWorker]]
    learners: list[Proxy[LearnerWorker]]
    reward: Proxy[RLRewardWorker]
    reference: Proxy[ReferenceWorker] | None
    critic: Proxy[CriticWorker] | None
    sync_backend: str | None = None  # weight_sync.method broadcast: gloo or nccl

    def all(self) -> list[Proxy]:
        return [*self.rollouts, *self.learners, self.reward, *(p for p in (self.reference, self.critic) if p)]


def start_workers(rc, cfg, model_path, device, dtype, algo: str, rm_stage: str = "rm") -> Workers:
    """Spawn every role (Ray actors unless `ray.backend` is local); DP learners join one process group."""
    from posttrain.config_rl import off_policy

    ray_cfg = rc.ray
    backend = ray_cfg.backend
    with_critic = algo == "ppo" or cfg.adv_estimator == "gae"
    roles = ["rollout", "learner", "reward", *(["reference"] if cfg.kl_coef > 0 else []),
             *(["critic"] if with_critic else [])]
    res = {"nodes": 1}
    if backend == "ray":  # refuses actors that cannot fit (CPUs, GPUs, custom resources) before any starts
        res = init_ray(ray_cfg.address, ray_cfg.num_cpus, actors={
            f"ray.{r}": (getattr(ray_cfg, r).num, _options(getattr(ray_cfg, r))) for r in roles})
        log.info("%s: Ray %s with %g CPUs, %g GPUs", algo, res["address"], res["CPU"], res["GPU"])
    dev = "cuda" if device.type == "cuda" and backend == "ray" and ray_cfg.learner.gpus > 0 else str(device)
    dt = str(dtype).removeprefix("torch.")
    load = {"trust_remote_code": rc.model.trust_remote_code, "allow_pickle": rc.model.allow_pickle}
    common = {"device": dev, "dtype": dt, "experts_implementation": rc.model.experts_implementation, "load_options": load}
    path = str(model_path)
    correction, correction_cap, correction_lower = off_policy(cfg)  # `tis_cap` is the `tis` correction
    learner_kwargs = dict(
        lr=cfg.learning_rate, weight_decay=cfg.weight_decay, clip_low=cfg.clip_low, clip_high=cfg.clip_high,
        dual_clip_c=cfg.dual_clip_c, loss_agg=cfg.loss_agg, policy_loss=cfg.policy_loss,
        kl_coef=0.0 if cfg.kl_in_reward else cfg.kl_coef, kl_kind=cfg.kl_kind, entropy_coef=cfg.entropy_coef,
        router_aux_coef=cfg.router_aux_coef, max_grad_norm=cfg.max_grad_norm, max_len=cfg.max_new_tokens,
        routing_replay=cfg.routing_replay, ptx_coef=cfg.ptx_coef, correction=correction,
        correction_cap=correction_cap, correction_lower=correction_lower,
        router_bias_update_rate=cfg.router_bias_update_rate, fsdp=cfg.fsdp,
        micro_batch_tokens=cfg.micro_batch_tokens, gradient_checkpointing=cfg.gradient_checkpointing,
    )
    roll_dev = "cuda" if device.type == "cuda" and ray_cfg.rollout.gpus > 0 else ("cpu" if backend == "ray" else str(device))
    sync = sync_backend(cfg.weight_sync.backend, dev, roll_dev, f"{algo}.weight_sync.backend",
                        ray_cfg.learner.gpus >= 1 and ray_cfg.rollout.gpus >= 1) \
        if cfg.weight_sync.method == "broadcast" else None  # refused before any actor starts
    engine = cfg.rollout_engine.model_dump()  # `hf` spawns rl_workers.RolloutWorker itself (the fault tests patch it)
    roll_cls = RolloutWorker if engine["name"] == "hf" else engine_class(engine["name"])
    rollouts = [spawn(roll_cls, path, device=roll_dev, dtype=dtype, threads=_options(ray_cfg.rollout).torch_threads,
                      experts_implementation=rc.model.experts_implementation, load_options=load, name=f"rollout{i}",
                      options=_options(ray_cfg.rollout), backend=backend, **engine_kwargs(engine))
                for i in range(ray_cfg.rollout.num)]
    learners = [spawn(LearnerWorker, path, **common, seed=rc.seed, trainable=list(cfg.trainable) or None,
                      lora=cfg.lora.model_dump() if cfg.lora.enabled else None, lora_key=f"{algo}.lora",
                      **learner_kwargs, name=f"learner{i}",
                      options=_options(ray_cfg.learner, stateful=True), backend=backend)
                for i in range(ray_cfg.learner.num)]
    rewards = [with_run_output(s.model_dump(), Path(rc.run_dir) / rm_stage) for s in cfg.rewards]
    reward = spawn(RLRewardWorker, rewards, rc.data.grader_name, cfg.reward_combine.model_dump(), name="reward",
                   options=_options(ray_cfg.reward), backend=backend)
    reference = spawn(ReferenceWorker, path, **common, name="reference", options=_options(ray_cfg.reference),
                      backend=backend) if cfg.kl_coef > 0 else None
    critic = spawn(CriticWorker, path, **common, lr=cfg.critic_learning_rate, value_clip=cfg.value_clip,
                   max_grad_norm=cfg.max_grad_norm, seed=rc.seed, name="critic",
                   options=_options(ray_cfg.critic, stateful=True), backend=backend) if with_critic else None
    workers = Workers(rollouts, learners, reward, reference, critic, sync)
    try:  # a failure from here on ends every actor spawned, rather than leaving them holding their CPUs/GPUs
        if cfg.lora.enabled:
            gather([r.submit(RolloutWorker.enable_lora, cfg.lora.model_dump(), f"{algo}.lora") for r in rollouts])
        if len(learners) > 1:
            if backend != "ray":
                raise ValueError("ray.learner.num > 1 (data parallel) needs ray.backend: ray")
            url = learners[0].call(LearnerWorker.rendezvous)
            gather([p.submit(LearnerWorker.init_distributed, url, i, len(learners)) for i, p in enumerate(learners)])
            log.info("%s: %d data-parallel learners joined %s", algo, len(learners), url)
        if res["nodes"] > 1:
            _log_placement(algo, workers.all())
    except BaseException:
        for p in workers.all():
            p.kill()
        raise
    return workers
