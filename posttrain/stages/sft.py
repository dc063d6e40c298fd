"""`sft` stage: teach the thinking format and rough budget following with TRL's SFTTrainer.

Loss on the assistant part only (`completion_mask`). Full fine-tune, or LoRA (PEFT) on the attention projections
and, through `target_parameters`, the fused 3-D expert weights. A LoRA run saves the adapter (`adapter/`) and
the merged model (`checkpoint/`), so later stages load one kind of checkpoint either way.
"""

from __future__ import annotations

import shutil
from collections import Counter

import torch

from posttrain.runlog import log


def _metrics_callback(metrics):
    from transformers import TrainerCallback

    class JsonlMetrics(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                metrics.log(state.global_step, {f"train/{k}": v for k, v in logs.items() if isinstance(v, (int, float))})

    return JsonlMetrics()


def run(ctx) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from posttrain.model import check_chat_template, load_model, load_tokenizer, peft_config, save_model
    from posttrain.prepare import check_added_tokens
    from posttrain.sft_data import build_sft_examples
    from posttrain.tasks.task import build_task

    cfg, rc = ctx.cfg.sft, ctx.cfg
    tok = load_tokenizer(ctx.model_path, rc.model.trust_remote_code)
    check_chat_template(tok, ctx.model_path)
    check_added_tokens(ctx.model_path, cfg.lora, "sft.lora", rc.model.trust_remote_code)
    model = load_model(ctx.model_path, ctx.device, ctx.dtype, rc.model.trust_remote_code, rc.model.allow_pickle,
                       rc.model.experts_implementation)
    task = build_task(rc)
    examples = task.train_examples(cfg.n_examples, rc.seed + 1, ctx.run_dir / "bad_rows.jsonl")
    rows = build_sft_examples(tok, examples, cfg.budgets, cfg.mix, rc.seed + 2, cfg.max_length,
                              fit=task.budget_demonstration)
    if not rows:
        raise ValueError(f"sft: every example is longer than sft.max_length={cfg.max_length} tokens")
    modes = Counter(r["mode"] for r in rows)
    log.info("sft: %d examples (%s)", len(rows), ", ".join(f"{k} {v}" for k, v in sorted(modes.items())))
    ds = Dataset.from_list([{"input_ids": r["input_ids"], "completion_mask": r["completion_mask"]} for r in rows])

    out = ctx.stage.path / "trainer"
    args = SFTConfig(
        output_dir=str(out),
        max_steps=cfg.steps,
        per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=int(cfg.warmup_ratio * cfg.steps),
        weight_decay=0.0,
        logging_steps=cfg.logging_steps,
        save_strategy="no",
        report_to="none",
        seed=rc.seed,
        data_seed=rc.seed,
        max_length=cfg.max_length,
        completion_only_loss=True,
        bf16=ctx.dtype == torch.bfloat16,
        use_cpu=ctx.device.type == "cpu",
        dataloader_num_workers=0,
        disable_tqdm=False,
    )
    trainer = SFTTrainer(
        model=model,
        args=args,
        train_dataset=ds,
        processing_class=tok,
        peft_config=peft_config(cfg.lora, model) if cfg.lora.enabled else None,
        callbacks=[_metrics_callback(ctx.metrics)],
    )
    result = trainer.train()
    trained = trainer.model
    info = {"train_loss": result.training_loss, "examples": len(rows), "modes": dict(modes), "lora": cfg.lora.enabled}
    if cfg.lora.enabled:
        trained.save_pretrained(ctx.stage.path / "adapter", safe_serialization=True)
        tok.save_pretrained(ctx.stage.path / "adapter")
        trained = trained.merge_and_unload()
        info["adapter"] = str(ctx.stage.path / "adapter")
    trained.eval()
    save_model(trained, tok, ctx.stage.checkpoint)
    shutil.rmtree(out, ignore_errors=True)
    info["checkpoint"] = str(ctx.stage.checkpoint)
    return info
