"""The `distill` section of the recipe schema (`posttrain.config.RecipeConfig.distill`), and the checks that need the
whole recipe (`check_distill`: the teacher stage runs before `distill`)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Union, get_args

from pydantic import Discriminator, Field, Tag, field_validator

from posttrain.config_common import MAX_TOKENS, TOKENS_BOUND, Section, StageName
from posttrain.rounds import kind_of

# Stages whose done.json names a checkpoint: what `distill.teacher` may name.
TEACHER_STAGES = ("base", "sft", "grpo", "ppo")


class StudentSize(Section):
    """A student built from the teacher's architecture (Qwen3-MoE: the embedded family) with fewer layers, experts or
    a narrower width, and the teacher's tokenizer."""

    layers: int | None = Field(None, ge=1, description="Decoder layers. Empty: half the teacher's (at least 1).")
    experts: int | None = Field(None, ge=1, description="Experts per MoE layer (top-k becomes min(teacher's top-k, "
                                "experts)). Empty: the teacher's.")
    hidden: int | None = Field(None, ge=16, description="Model width. Empty: the teacher's; another width needs "
                               "`init: random`.")
    init: Literal["copy", "random"] = Field(
        "copy", description="`copy`: the teacher's embeddings, final norm and head, its first `layers` layers and, in "
        "each, the first `experts` experts and their router rows; `random`: the config's random initialisation.")


def _student_kind(v) -> str:
    return "path" if isinstance(v, (str, Path)) else "size"


StudentSpec = Annotated[Union[Annotated[StudentSize, Tag("size")], Annotated[str, Tag("path")]],
                        Discriminator(_student_kind)]


class DistillStageConfig(Section):
    """Distil the teacher into a smaller MoE student on the teacher's own samples (`posttrain.stages.distill`): the
    teacher's k-sparse next-token distributions are computed once and stored in RUN/distill/targets/."""

    teacher: str | None = Field(
        None, description="A model-producing stage of this recipe run before `distill` (base, sft, grpo, ppo, or a "
        "later round's, as `grpo@2`), or a local checkpoint directory. Empty: the model of the stage before (the "
        "run's latest model).")
    student: StudentSpec = Field(
        default_factory=StudentSize, description="`{layers, experts, hidden, init}`: the teacher's architecture made "
        "smaller; or a local checkpoint directory with the teacher's tokenizer.")
    loss: Literal["sparse_kl", "full_kl", "sft"] = Field(
        "sparse_kl", description="`sparse_kl`: forward KL to the teacher's stored top-k distribution; `full_kl`: to "
        "its full distribution, computed on the fly; `sft`: cross-entropy of the teacher's sampled tokens.")
    k: int = Field(16, ge=1, description="Teacher ids stored per position (top-k), at most the vocabulary size.")
    tail: Literal["renormalize", "bucket"] = Field(
        "renormalize", description="`sparse_kl`'s tail mass: `renormalize` the top-k, or one `bucket` for the rest.")
    n_examples: int = Field(2000, ge=1, description="Training problems the teacher answers (the task's training "
                            "examples, as SFT draws them), one sample each, modes and budgets as `sft.mix` and "
                            "`sft.budgets`.")
    max_new_tokens: int = Field(160, ge=1, le=MAX_TOKENS, description="Generation cap per teacher sample. "
                                + TOKENS_BOUND)
    temperature: float = Field(1.0, gt=0, description="Teacher sampling temperature (the stored distributions are "
                               "the teacher's own, at temperature 1).")
    steps: int = Field(300, ge=1, description="Student optimizer steps.")
    batch_size: int = Field(32, ge=1, description="Sequences per step (and per teacher forward).")
    learning_rate: float = Field(1e-3, gt=0, description="Peak AdamW learning rate (linear warmup, cosine decay).")
    warmup_ratio: float = Field(0.05, ge=0, le=1)
    logging_steps: int = Field(10, ge=1)
    save_every: int = Field(50, ge=0, description="Save the student's training state (weights, optimizer, data "
                            "order) every N steps into RUN/distill/state/, from which a killed run resumes (0: never).")
    keep_checkpoints: int = Field(2, ge=1, description="Saved training states kept (the newest).")

    @field_validator("student")
    @classmethod
    def _student_path(cls, v):
        if isinstance(v, str) and not Path(v).expanduser().is_dir():
            raise ValueError(f"directory {v!r} does not exist")
        return v


def check_distill(rc) -> list[str]:
    """Errors of the recipe `rc`'s `distill` section against its stages, each naming its key (empty when fine): the
    teacher stage must run before distill, and an export after it of a smaller student must be a merged one."""
    if "distill" not in rc.stages:
        return []
    teacher, stages = rc.distill.teacher, list(rc.stages)
    if ("export" in stages and stages.index("export") > stages.index("distill") and not rc.export.merged
            and isinstance(rc.distill.student, StudentSize)):
        return ["export.merged: the export after distill ships the student, whose architecture is not the base "
                "model's, so no LoRA adapter on the base holds it; set export.merged: true"]
    if teacher is None:
        return []
    if teacher in stages or teacher in get_args(StageName):
        if kind_of(teacher) not in TEACHER_STAGES:
            return [f"distill.teacher: stage {teacher!r} produces no model; name one of {', '.join(TEACHER_STAGES)} "
                    "or a checkpoint directory"]
        if teacher not in stages:
            return [f"distill.teacher: stage {teacher!r} is not in this recipe's stages ({', '.join(stages)})"]
        if stages.index(teacher) > stages.index("distill"):
            return [f"distill.teacher: stage {teacher!r} runs after distill; list it before distill in `stages`"]
        return []
    if not Path(teacher).expanduser().is_dir():
        return [f"distill.teacher: {teacher!r} is neither a stage run before distill "
                f"({', '.join(s for s in stages[:stages.index('distill')] if s in TEACHER_STAGES) or 'none'}) nor an "
                "existing directory"]
    return []
