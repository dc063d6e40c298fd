"""The RL driver shared by the `grpo` and `ppo` stages: one driver process, each role a Ray actor.

Per step (`RLDriver.train_step`), the paper's pseudocode:

    problems, budgets <- prompts_per_step problems (seed + step), each with a budget from the recipe (or `auto`)
    batch   <- rollout workers: group_size samples per problem; thinking forced closed at the budget
    r       <- reward actor: correctness + budget shaping (budgeted) / + length cost (auto)
    ref     <- reference actor: log-probs of the frozen initial policy (only when kl_coef > 0)
    V       <- critic actor: values at rollout time (PPO)
    A       <- GRPO group-relative advantages (dynamic sampling drops all-equal groups) | GAE on r - KL (PPO);
               with process_penalty, minus that on the token where each response's first error starts
    update  <- learner actors (data parallel over whole groups): clipped policy loss on the loss mask
               (forced tokens excluded) + KL + router load balancing (+ ptx_coef * the NLL of demonstrations
               of the step's problems: InstructGPT's PPO-ptx); critic: clipped value loss
    sync    <- the learner's trainable weights to every rollout worker (the policy version: steps done)

Every `save_every` steps the training state is saved atomically (`posttrain.rlstate`); a stage started on a run
directory with a saved state resumes from it. SIGINT/SIGTERM stop the loop at the next step boundary after a save.
With `async.max_staleness` K >= 1 the rollouts of the next K steps are submitted before the learner's update and
collected after it (`stages/rl_async.py`: bounded staleness, rows older than K versions dropped); 0 is the
synchronous step above, unchanged.
Differences from the papers: dynamic sampling drops groups but does not refill the batch; the old policy is the
rollout's own recorded log-probs (one rollout, `mini_batches` updates on it) unless an off-policy correction
(`async.correction`, `tis_cap`) has the learner recompute it.
"""

from __future__ import annotations

import math
import random
import signal
import time
from contextlib import contextmanager

from posttrain.stages.rl_eval import (_brief, _compare, _paired, _verdict, _without_vectors, evaluate_budget,
                                       format_comparison)
from posttrain.stages.rl_async import RolloutPipeline, overlap_threads_warning
from posttrain.stages.rl_step import compute_advantages, rollout_metrics
from posttrain.stages.rl_sync import BroadcastSync
from posttrain.stages.rl_workers import Workers, start_workers
from posttrain.stages.rl_task import demo_batch, first_error_marks
from posttrain.runlog import log, write_json_atomic
from posttrain.workers.actors import Shared, WorkerFailed, gather, tensor_bytes
from posttrain.workers.learner import CriticWorker, LearnerWorker, ReferenceWorker
from posttrain.workers.reward import RLRewardWorker
from posttrain.workers.rollout import RolloutWorker


class TrainingStopped(RuntimeError):
    """The run stopped on purpose (too many skipped steps); the message says why."""


def _split(n: int, parts: int) -> list[tuple[int, int]]:
    cuts = [round(i * n / parts) for i in range(parts + 1)]
    return list(zip(cuts, cuts[1:]))


class RLDriver:
    """Owns the workers and the loop; `fit` runs the remaining steps (resuming from a saved state)."""

    def __init__(self, ctx, algo: str):
        self.ctx, self.algo = ctx, algo
        self.label = ctx.name or algo  # `grpo@2` in a later flywheel round: what the log lines say
        self.rc = ctx.cfg
        self.cfg = getattr(ctx.cfg, algo)
        self.w: Workers | None = None
        self.weights: dict | None = None  # the latest weights pushed to the rollout workers
        self.version = 0  # the learner's policy version: the steps it has trained (what `sync_weights` pushes)
        self.weights_version = 0  # the version of `self.weights`
        self.learner_version = 0  # the version of the learners' weights (ahead of the rollouts' between learn and sync)
        self.broadcast: BroadcastSync | None = None  # weight_sync.method: broadcast
        self.pipeline: RolloutPipeline | None = None  # async.max_staleness >= 1: the batches in flight
        self.stop_requested = False
        self.consecutive_skips = 0
        self._saved: tuple | None = None  # the newest saved state, verified by `start`, loaded by `resume`

    # ------------------------------------------------------------------------------------------- the roles
    def rollout(self, prompts: list[str], budgets: list, *, seed: int, greedy: bool = False, cap: bool = True,
                max_new_tokens: int | None = None, group_size: int | None = None, record_routing: bool = False):
        """Generate over all rollout workers (prompts split evenly) and join the results in prompt order."""
        return self.join_rollout(self.submit_rollout(prompts, budgets, seed=seed, greedy=greedy, cap=cap,
                                                     max_new_tokens=max_new_tokens, group_size=group_size,
                                                     record_routing=record_routing))

    def submit_rollout(self, prompts: list[str], budgets: list, *, seed: int, greedy: bool = False, cap: bool = True,
                       max_new_tokens: int | None = None, group_size: int | None = None,
                       record_routing: bool = False) -> list:
        """`rollout`'s calls, submitted (one per rollout worker with prompts); `join_rollout` collects them."""
        parts = [(lo, hi) for lo, hi in _split(len(prompts), len(self.w.rollouts)) if hi > lo]
        kwargs = dict(temperature=self.cfg.temperature, top_p=self.cfg.top_p, greedy=greedy, cap=cap)
        if record_routing:
            kwargs["record_routing"] = True
        pending = [w.submit(RolloutWorker.generate, prompts[lo:hi], budgets[lo:hi],
                            group_size or self.cfg.group_size, max_new_tokens or self.cfg.max_new_tokens,
                            seed=seed + 7919 * i, **kwargs)
                   for i, (w, (lo, hi)) in enumerate(zip(self.w.rollouts, parts))]
        return pending

    def join_rollout(self, pending: list):
        """The batch of `submit_rollout`'s calls, joined in prompt order."""
        from posttrain.rlbatch import concat_batches

        return concat_batches(gather(pending), self._pad_id)

    def learn(self, batch, adv, mask, ref_logp, demos=None) -> dict[str, float]:
        """The update on every learner, each on its share of whole groups (and of the demonstrations of those
        groups' problems); metrics averaged over ranks."""
        from posttrain.learner import group_bounds
        from posttrain.rlbatch import select_rows

        n = len(self.w.learners)
        shares = group_bounds(len(batch), self.cfg.group_size, n)
        pending = []
        for w, (lo, hi) in zip(self.w.learners, shares):
            part = select_rows(batch, lo, hi)
            g0, g1 = batch.group_index[lo] if hi > lo else 0, batch.group_index[hi - 1] + 1 if hi > lo else 0
            mine = None if demos is None else demos.rows(g0, g1)
            pending.append(w.submit(LearnerWorker.step, part, adv[lo:hi], mask[lo:hi],
                                    mini_batches=self.cfg.mini_batches, group_size=self.cfg.group_size,
                                    ref_logp=None if ref_logp is None else ref_logp[lo:hi], demos=mine))
        results = gather(pending)
        out = {}
        for k in results[0]:
            vals = [r[k] for r in results if isinstance(r.get(k), float)]
            out[k] = sum(vals) / len(vals) if vals else results[0][k]
        return out

    def sync_weights(self) -> None:
        """The learner's weights (policy version `self.version`) to every rollout worker without the driver (issue
        #25): by broadcast (`weight_sync.method: broadcast`, `stages/rl_sync.py`), or learner -> object store ->
        rollout workers, the driver holding only the reference (`Proxy.share`; also when a broadcast failed). Sets
        `self.sync_bytes`, the bytes each rollout worker receives."""
        if self.broadcast is not None:
            sent = self.broadcast.push(self.w, self.version)
            if sent is not None:
                self.weights, self.weights_version, self.sync_bytes = None, self.version, sent
                return
        self.weights, self.weights_version = self.w.learners[0].share(LearnerWorker.weights), self.version
        self.sync_bytes = self.weights.nbytes if isinstance(self.weights, Shared) else tensor_bytes(self.weights)
        gather([w.submit(RolloutWorker.update_weights, self.weights, self.version) for w in self.w.rollouts])

    def _restore_rollout(self, proxy) -> None:
        """on_restart hook: a restarted rollout worker reloads the input model; give it the LoRA wrapper (the
        weights sent are adapter tensors) and the current weights: those last pushed, or with a broadcast group
        (which the restarted process is no longer in; rebuilt before the next sync) the learner's, through the
        object store."""
        if self.cfg.lora.enabled:
            proxy.call(RolloutWorker.enable_lora, self.cfg.lora.model_dump(), f"{self.algo}.lora")
        if self.broadcast is not None:
            self.broadcast.invalidate()
            if self.learner_version > 0:
                proxy.call(RolloutWorker.update_weights, self.w.learners[0].share(LearnerWorker.weights),
                           self.learner_version)
        elif self.weights is not None:
            proxy.call(RolloutWorker.update_weights, self.weights, self.weights_version)

    # --------------------------------------------------------------------------------------------- a step
    def train_step(self, step: int) -> dict[str, float]:
        cfg, rc = self.cfg, self.rc
        t = {"start": time.perf_counter()}
        self.version = step  # the learner's policy: `step` updates
        if self.pipeline is None:
            problems, budgets = self.problems.step(step)
            batch = self.rollout([p.expression for p in problems], budgets, seed=rc.seed + step,
                                 record_routing=cfg.routing_replay)
        else:  # sampled up to K versions ago; the next steps' rollouts are submitted
            problems, budgets, batch = self.pipeline.take(step)
        t["rollout"] = time.perf_counter()
        answers = [problems[g].answer for g in batch.group_index]
        questions = [problems[g].expression for g in batch.group_index]
        tests = [getattr(problems[g], "tests", None) for g in batch.group_index]
        scores, correct, metrics = self.w.reward.call(RLRewardWorker.score, questions, batch.texts, answers,
                                                      batch.budgets, batch.n_think, batch.group_index, batch.forced,
                                                      tests if any(x is not None for x in tests) else None)
        t["reward"] = time.perf_counter()
        if not all(math.isfinite(s) for s in scores):  # the learner skips the step (non-finite advantages)
            metrics["reward/non_finite"] = float(sum(not math.isfinite(s) for s in scores))
        ref_logp = self.w.reference.call(ReferenceWorker.logp, batch) if self.w.reference else None
        t["reference"] = time.perf_counter()
        values = self.w.critic.call(CriticWorker.values, batch) if self.w.critic else None
        task = self.problems.task
        marks = (first_error_marks(self._tokenizer, batch, problems, cfg.process_penalty, task.first_error)
                 if cfg.process_penalty > 0 else None)
        adv, mask, returns, adv_metrics = compute_advantages(cfg, batch, scores, values, ref_logp, marks)
        metrics |= adv_metrics
        critic_mask = batch.response_mask
        if self.pipeline is not None:  # rows older than K versions leave the loss (the critic's too)
            keep, stale_metrics = self.pipeline.drop_stale(batch, step)
            metrics |= stale_metrics
            if keep is not None:
                mask, critic_mask = mask * keep[:, None].to(mask.dtype), critic_mask * keep[:, None].to(mask.dtype)
        t["critic_values"] = time.perf_counter()
        rng = random.Random(rc.seed + step)  # the SFT stage's demonstrator, drawn per step
        demos = (demo_batch(self._tokenizer, problems, budgets, self._pad_id, cfg.ptx_traces,
                            lambda p, b, count: task.budget_demonstration(p, b, count, rng), task.demonstration)
                 if cfg.ptx_coef > 0 else None)
        metrics |= self.learn(batch, adv, mask, None if cfg.kl_in_reward else ref_logp, demos)
        self.learner_version = step + 1
        t["learner"] = time.perf_counter()
        if self.w.critic is not None:
            metrics |= self.w.critic.call(CriticWorker.step, batch, returns, values, critic_mask,
                                          mini_batches=cfg.mini_batches, group_size=cfg.group_size)
        t["critic"] = time.perf_counter()
        if self.pipeline is not None:
            self.pipeline.collect()  # the batches generated while the learner trained
            t["rollout_wait"] = time.perf_counter()
            metrics |= self.pipeline.step_metrics()
        self.version = step + 1
        self.sync_weights()
        t["sync"] = time.perf_counter()
        metrics |= rollout_metrics(batch, correct, cfg.budgets)
        names = list(t)
        for a, b in zip(names, names[1:]):
            metrics[f"time/{b}_s"] = t[b] - t[a]
        metrics["time/step_s"] = t["sync"] - t["start"]
        metrics["sync/bytes"] = float(self.sync_bytes)
        if self.broadcast is not None:
            metrics["sync/broadcast_s"] = self.broadcast.seconds
            metrics["sync/fallbacks"] = float(self.broadcast.fallbacks)
        self._check_skips(metrics, step)
        return metrics

    def _check_skips(self, metrics: dict, step: int) -> None:
        skipped = "actor/skip_reason" in metrics
        self.consecutive_skips = self.consecutive_skips + 1 if skipped else 0
        if skipped:
            log.warning("%s: step %d: update skipped (%s); %d in a row, the limit is %d", self.label, step,
                        metrics["actor/skip_reason"], self.consecutive_skips, self.cfg.max_consecutive_skips)
        if self.consecutive_skips >= self.cfg.max_consecutive_skips:
            raise TrainingStopped(
                f"{self.label}: {self.consecutive_skips} steps in a row were skipped because the rewards, advantages, "
                f"loss or gradients were not finite (last: {metrics.get('actor/skip_reason')}); stopping. The last "
                f"saved state is intact; lower {self.algo}.learning_rate or check the rewards.")

    # ----------------------------------------------------------------------------------------- evaluation
    def evaluate(self) -> dict:
        """Held-out problems, greedy, per eval budget: natural, capped and forced (`rl_eval.evaluate_budget`, which
        lists the measures), per problem for paired comparisons.

        Each budget has its own problems (`rl_problems.ProblemSource.eval`: the task's `rl_eval_problems`), the
        same for every model, so that budgets pooled in the verdict count each problem once.
        """
        cfg = self.cfg
        if cfg.eval_n_per_difficulty == 0:
            return {}
        out = {}
        for b in cfg.eval_budgets:
            problems = self.problems.eval(b)
            if problems:
                out[str(b)] = evaluate_budget(self.w.rollouts, problems, None if b == "auto" else int(b),
                                              self.problems.grade, cfg.eval_max_new_tokens, cfg.eval_batch_size)
        return out

    # ----------------------------------------------------------------------------------------- checkpoints
    def save(self, step: int) -> None:
        from posttrain.rlstate import save_state

        def write(d):
            # every learner: sharded (fsdp) ones gather to rank 0, which writes; unsharded ranks > 0 write nothing
            gather([w.submit(LearnerWorker.save_state, str(d)) for w in self.w.learners])
            if self.w.critic is not None:
                self.w.critic.call(CriticWorker.save_state, str(d))

        path = save_state(self.ctx.stage.path / "state", step, write, {"consecutive_skips": self.consecutive_skips},
                          keep=self.cfg.keep_checkpoints)
        log.info("%s: saved the training state after step %d to %s", self.label, step, path)

    def resume(self) -> int:
        """Load the newest good saved state into the workers; returns the first step to run (0 when none)."""
        from posttrain.rlstate import latest

        found = self._saved if self._saved is not None else latest(self.ctx.stage.path / "state")
        self._saved = None
        if self.pipeline is not None:
            self.pipeline.reset()  # batches in flight are not saved: generated anew (module rl_async)
        if found is None:
            self.ctx.metrics.resume_at(0)  # what a run killed before its first save logged
            self.weights, self.consecutive_skips = None, 0  # nothing of a failed attempt carries over
            self.version = self.weights_version = self.learner_version = 0
            return 0
        d, driver = found
        self._check_saved_steps(d, driver)
        gather([w.submit(LearnerWorker.load_state, str(d)) for w in self.w.learners])
        if self.w.critic is not None:
            self.w.critic.call(CriticWorker.load_state, str(d))
        self.consecutive_skips = int(driver.get("consecutive_skips", 0))
        self.version = self.learner_version = int(driver["step"])
        self.sync_weights()
        self.ctx.metrics.resume_at(int(driver["step"]))
        log.info("%s: resuming from %s (step %d of %d)", self.label, d, driver["step"], self.cfg.steps)
        return int(driver["step"])

    def _steps(self, start: int, history: dict) -> None:
        """Train steps `start`..steps-1 (saving every `save_every`), their metrics into `history` by step."""
        from tqdm.auto import tqdm

        ctx, cfg = self.ctx, self.cfg
        bar = tqdm(range(start, cfg.steps), desc=self.label, initial=start, total=cfg.steps, leave=False)
        with self._graceful_stop():
            for step in bar:
                metrics = self.train_step(step)
                ctx.metrics.log(step, metrics)
                history[step] = metrics
                bar.set_postfix(reward=f"{metrics['reward/mean']:.2f}", acc=f"{metrics['rollout/accuracy']:.2f}",
                                adh=f"{metrics.get('rollout/adherence', float('nan')):.2f}")
                done = step + 1
                if (cfg.save_every and done % cfg.save_every == 0 and done < cfg.steps) or self.stop_requested:
                    self.save(done)
                if self.stop_requested:
                    raise KeyboardInterrupt(f"{self.label} stopped by a signal after step {done}; state saved")

    def _recoveries_allowed(self, actor: str) -> int:
        """How often a failure of `actor` in the step loop may be recovered by restarting every actor from the last
        saved state (one count shared by learners and critic): the recipe's `max_restarts` of a stateful group
        (learners, critic); 0 for the others, whose own restarts (the proxy's) are spent when their failure
        reaches here. Failures outside the step loop (evaluation, the final save) stop the run."""
        if self.rc.ray.backend != "ray":
            return 0
        if actor.startswith("learner"):
            return self.rc.ray.learner.max_restarts
        return self.rc.ray.critic.max_restarts if actor == "critic" else 0

    def _check_saved_steps(self, d, driver: dict) -> None:
        if int(driver["step"]) > self.cfg.steps:
            from posttrain.recipe import RecipeError

            raise RecipeError(f"{self.algo}.steps is {self.cfg.steps} but the saved training state {d} is already at "
                              f"step {driver['step']}: raise {self.algo}.steps to at least {driver['step']}, or "
                              f"delete {self.ctx.stage.path / 'state'} to train from the start")

    @contextmanager
    def _graceful_stop(self):
        """SIGINT/SIGTERM set a flag the loop checks between steps (a second signal interrupts at once)."""
        import threading

        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum, frame):
            if self.stop_requested:
                raise KeyboardInterrupt
            self.stop_requested = True
            log.warning("%s: stop requested (signal %d); saving after the current step", self.label, signum)

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # ------------------------------------------------------------------------------------------------ fit
    def start(self) -> Workers:
        """Spawn the workers (`start_workers`) and hook the rollout workers' restarts; `fit` calls it first, and
        `train_step` can be driven by hand after it (the benchmark does). The caller kills the workers."""
        from posttrain.config_rl import max_staleness
        from posttrain.model import check_chat_template, load_tokenizer
        from posttrain.prepare import check_added_tokens
        from posttrain.rlstate import latest
        from posttrain.stages.rl_problems import ProblemSource

        ctx = self.ctx
        self._saved = found = latest(ctx.stage.path / "state")  # verified once; `resume` loads it
        if found is not None:
            self._check_saved_steps(*found)  # a resume that cannot work stops before any actor starts
        self.problems = ProblemSource(self.rc, self.cfg)  # so does a bad data file
        self._tokenizer = load_tokenizer(ctx.model_path)
        check_chat_template(self._tokenizer, ctx.model_path)
        check_added_tokens(ctx.model_path, self.cfg.lora, f"{self.algo}.lora", self.rc.model.trust_remote_code)
        self._pad_id = self._tokenizer.pad_token_id
        self.w = start_workers(self.rc, self.cfg, ctx.model_path, ctx.device, ctx.dtype, self.algo,
                               ctx.latest("rm") or "rm")
        for r in self.w.rollouts:
            r.on_restart = self._restore_rollout
        self.broadcast = BroadcastSync(self.cfg.weight_sync, self.w.sync_backend, self.label) \
            if self.w.sync_backend else None
        k = max_staleness(self.cfg)
        self.pipeline = RolloutPipeline(self, k) if k > 0 else None
        if (crowded := overlap_threads_warning(self.rc, self.cfg, self.algo, ctx.device.type)) is not None:
            log.warning(crowded)
        return self.w

    def fit(self) -> dict:
        ctx, cfg = self.ctx, self.cfg
        self.start()
        try:
            start = self.resume()
            before = self.evaluate() if start == 0 else _read_json(ctx.stage.path / "eval_before.json")
            if start == 0:
                write_json_atomic(ctx.stage.path / "eval_before.json", before)
            log.info("%s: input model %s", self.label, _brief(before))
            history: dict[int, dict] = {}
            recoveries, restart = 0, False
            while True:
                try:
                    if restart:  # every actor anew, from the last saved state (or the input model: step 0)
                        for p in self.w.all():
                            p.kill()
                        self.start()
                        start = self.resume()
                        history = {s: m for s, m in history.items() if s < start}
                    self._steps(start, history)
                    break
                except WorkerFailed as e:
                    budget = self._recoveries_allowed(e.actor)
                    if self.stop_requested or recoveries >= budget:
                        raise
                    recoveries, restart = recoveries + 1, True
                    log.warning("%s: %s; restarting every actor and resuming from the last saved state (recovery %d "
                                "of %d)", self.label, e, recoveries, budget)
            history = [history[s] for s in sorted(history)]
            gather([w.submit(LearnerWorker.save_model, str(ctx.stage.checkpoint), str(ctx.model_path))
                    for w in self.w.learners])  # all ranks: sharded ones gather to rank 0, which writes
            after = self.evaluate()
            write_json_atomic(ctx.stage.path / "eval_after.json", after)
            unpaired = [b for b in after if b in before and not _paired(before, after, b)]
            if unpaired:
                log.warning("%s: eval_before.json holds other problems at budgets %s (another version or other eval "
                            "settings): those budgets are not compared", self.label, ", ".join(unpaired))
            log.info("%s: trained model %s", self.label, _brief(after))
            log.info("%s: against the input model (95%% paired intervals)\n%s", self.label,
                     format_comparison(_compare(before, after), _verdict(before, after)))
            counters = self.w.learners[0].call(LearnerWorker.counters)
        finally:
            for p in self.w.all():
                p.kill()
        summary = {"before": _without_vectors(before), "after": _without_vectors(after),
                   "skipped_steps": counters["skipped_steps"], "comparison": _compare(before, after),
                   "verdict": _verdict(before, after)}
        if history:
            last = history[-max(1, len(history) // 5):]
            summary["final_reward_mean"] = sum(m["reward/mean"] for m in last) / len(last)
            summary["final_accuracy"] = sum(m["rollout/accuracy"] for m in last) / len(last)
        return {"checkpoint": str(ctx.stage.checkpoint), "summary": summary, "steps": cfg.steps}


def _read_json(path) -> dict:
    from posttrain.runlog import read_json

    return read_json(path, "the evaluation before training") if path.is_file() else {}
