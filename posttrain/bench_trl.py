"""The TRL side of `posttrain bench`: TRL's `GRPOTrainer` at the settings of our `grpo` stage, step times only.

One of our GRPO steps is one rollout of `prompts_per_step x group_size` rows followed by `mini_batches` AdamW
updates, each on a contiguous slice of whole groups, with the rollout's recorded log-probs as the old policy. The
closest TRL 1.16 configuration (field names from `trl/trainer/grpo_config.py`):

    generation_batch_size = prompts_per_step * group_size      one generate call per step, the same prompts
    per_device_train_batch_size = generation_batch_size / mini_batches,  steps_per_generation = mini_batches
    num_generations = group_size, num_iterations = 1, max_completion_length = max_new_tokens
    epsilon = clip_low, epsilon_high = clip_high, loss_type = "dapo" (token mean over the mini-batch = our
    token_mean), scale_rewards = "group" (our `grpo` estimator; "none" for `dr_grpo`), beta = kl_coef (k3 KL as a loss term, as ours
    with kl_in_reward false; 0: no reference model on either side)
    AdamW with our learning_rate / weight_decay, constant schedule, max_grad_norm, router_aux_loss_coef
    temperature, top_p, top_k = 0; no gradient checkpointing, no bf16 autocast on CPU

so one of our steps is `mini_batches` consecutive TRL optimizer steps, and the bench times them together.
Remaining mismatches, each in TRL's disfavour or neutral for time:
- TRL computes the old log-probs with an extra no-grad forward over the whole batch (because
  steps_per_generation > 1); our rollout records them while sampling;
- TRL has no budget forcing: a budgeted prompt's row runs until EOS or the length cap (ours forces `</think>`
  at the budget); the bench reports both sides' mean completion lengths;
- TRL shuffles rows before splitting the batch into mini-batches (ours: contiguous whole groups);
- the reward is `exact_int` alone (ours: the recipe's rewards; both cost well under a millisecond a row).
"""

from __future__ import annotations

import statistics
import time

from posttrain.rewards.parse import grade_integer


def exact_int_reward(completions: list[str], answer: list, **kwargs) -> list[float]:
    """TRL reward function: 1.0 where our `exact_int` grader (`grade_integer`) accepts the completion.

    >>> exact_int_reward(["7+3=10</think>\\n\\n10", "7+3=10"], answer=["10", "10"])
    [1.0, 0.0]
    """
    return [1.0 if grade_integer(c, a) else 0.0 for c, a in zip(completions, answer)]


def grpo_config_kwargs(cfg, *, max_steps: int, seed: int, use_cpu: bool, bf16: bool) -> dict:
    """`GRPOConfig` keyword arguments matching our RLStageConfig `cfg` (see the module docstring)."""
    rows = cfg.prompts_per_step * cfg.group_size
    if cfg.prompts_per_step % cfg.mini_batches:
        raise ValueError(f"the TRL comparison needs prompts_per_step ({cfg.prompts_per_step}) divisible by "
                         f"mini_batches ({cfg.mini_batches}): TRL's mini-batches all have the same size")
    if cfg.loss_agg != "token_mean" or cfg.adv_estimator not in ("grpo", "dr_grpo") or cfg.policy_loss != "vanilla" or (
            cfg.kl_coef > 0 and (cfg.kl_in_reward or cfg.kl_kind != "k3")):
        raise ValueError("the TRL comparison covers loss_agg=token_mean, adv_estimator=grpo or dr_grpo, "
                         "policy_loss=vanilla and a k3 KL loss term")
    return dict(
        per_device_train_batch_size=rows // cfg.mini_batches, steps_per_generation=cfg.mini_batches,
        gradient_accumulation_steps=1, num_generations=cfg.group_size, num_iterations=1,
        max_completion_length=cfg.max_new_tokens, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0,
        learning_rate=cfg.learning_rate, weight_decay=cfg.weight_decay, lr_scheduler_type="constant",
        warmup_steps=0, max_grad_norm=cfg.max_grad_norm, optim="adamw_torch", beta=cfg.kl_coef,
        epsilon=cfg.clip_low, epsilon_high=cfg.clip_high, loss_type="dapo",
        scale_rewards="group" if cfg.adv_estimator == "grpo" else "none",  # dr_grpo: no std division
        router_aux_loss_coef=cfg.router_aux_coef, activation_checkpointing=False, bf16=bf16, use_cpu=use_cpu,
        shuffle_dataset=False, max_steps=max_steps, seed=seed, logging_steps=10**9, save_strategy="no",
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, remove_unused_columns=False,
    )


def step_prompts(rc, tokenizer, n_steps: int) -> list[dict]:
    """The rows {prompt, answer} our driver's steps 0..n_steps-1 use, rendered with the same chat template."""
    from posttrain.generate import render_prompts
    from posttrain.tasks.task import build_task

    rows = []
    for step in range(n_steps):
        problems, budgets = build_task(rc).step_problems(rc.grpo, step)
        texts = render_prompts(tokenizer, [p.expression for p in problems], budgets)
        rows += [{"prompt": t, "answer": str(p.answer)} for t, p in zip(texts, problems)]
    return rows


def bench_trl(rc, model_path, device, dtype, *, warmup: int, steps: int, out_dir) -> dict:
    """Median seconds per GRPO step (`mini_batches` TRL optimizer steps) over `steps` steps after `warmup`."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from posttrain.model import load_tokenizer

    cfg = rc.grpo
    k = cfg.mini_batches
    marks: list[float] = []
    lengths: list[float] = []  # TRL's completions/mean_length, one per generation

    class StepTimer(TrainerCallback):
        def on_train_begin(self, args, state, control, **kw):
            marks.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kw):
            marks.append(time.perf_counter())
            # the trainer's metric buffer (never flushed: logging_steps is huge) holds one value per generation
            lengths[:] = trainer._metrics.get("train", {}).get("completions/mean_length", [])

    tokenizer = load_tokenizer(model_path)
    args = GRPOConfig(output_dir=str(out_dir), **grpo_config_kwargs(
        cfg, max_steps=k * (warmup + steps), seed=rc.seed, use_cpu=device.type == "cpu",
        bf16=str(dtype) == "torch.bfloat16"),
        # the policy and (beta > 0) the reference load from the checkpoint like ours: same dtype, same expert kernel
        model_init_kwargs={"dtype": dtype, "experts_implementation": rc.model.experts_implementation})
    trainer = GRPOTrainer(model=str(model_path), reward_funcs=[exact_int_reward], args=args,
                          train_dataset=Dataset.from_list(step_prompts(rc, tokenizer, warmup + steps)),
                          processing_class=tokenizer, callbacks=[StepTimer()])
    trainer.remove_callback(PrinterCallback)  # the end-of-training metrics dict
    trainer.train()
    per_step = [marks[(i + 1) * k] - marks[i * k] for i in range((len(marks) - 1) // k)][warmup:]
    return {"step_s": statistics.median(per_step), "step_s_min": min(per_step), "step_s_all": per_step,
            "completion_tokens_mean": statistics.fmean(lengths[warmup:] or lengths) if lengths else None,
            "optimizer_steps_per_step": k}
