"""The `flywheel` section of the recipe schema: how later rounds (`sft@2`, ...; `posttrain.rounds`) make their
SFT data from the previous round's model."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from posttrain.config_common import MAX_TOKENS, TOKENS_BOUND, Section


class FlywheelConfig(Section):
    """Data-flywheel rounds: each round's SFT data rejection-sampled from the previous round's final model."""

    rounds: int = Field(1, ge=1, le=20, description="Rounds of the recipe's round stages (sft, rm, eval, grpo, ppo): "
                        "2 or more repeats them as `sft@2`, `rm@2`, ... after round 1's and before the stages that "
                        "follow (sweep, export). Stages may also be listed with their round suffix directly.")
    n_prompts: int = Field(2000, ge=1, description="Training problems the previous round's model answers (the "
                           "task's RM problems, drawn afresh each round), under the SFT stage's budget mix.")
    samples_per_prompt: int = Field(2, ge=1, description="Samples per problem and budget.")
    keep_per_prompt: int = Field(1, ge=1, description="Accepted samples kept per problem at most (more bias the "
                                 "data towards the problems the model already solves).")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature.")
    max_new_tokens: int = Field(160, ge=1, le=MAX_TOKENS, description="Longest sample. " + TOKENS_BOUND)
    genrm: bool = Field(False, description="Also require the GenRM of the latest rm stage before this round's sft "
                        "to accept a sample (P(Yes) >= genrm_threshold); the task's grader must accept it always.")
    genrm_threshold: float = Field(0.5, ge=0, le=1, description="P(Yes) a sample needs with `genrm: true`.")
    demo_share: float = Field(0.5, ge=0, lt=1, description="Share of the round's SFT examples that are the task's "
                              "demonstrations (drawn afresh for the round, as round 1's are drawn); the rest are "
                              "accepted samples. 0: samples only.")
    init: Literal["previous", "base"] = Field(
        "previous", description="What the round's SFT fine-tunes: the previous round's final model (`previous`), or "
        "the model round 1's SFT started from (`base`, as STaR and ReST-EM restart each iteration). On the embedded "
        "task `previous` gained at most budgets and `base` came out level with round 1 (docs/flywheel.md).")
    steps: int | None = Field(None, ge=1, description="The round's SFT optimizer steps (unset: sft.steps).")
    learning_rate: float | None = Field(None, gt=0, description="The round's SFT peak learning rate (unset: "
                                        "sft.learning_rate).")
