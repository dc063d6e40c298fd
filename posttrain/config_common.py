"""Shared pieces of the recipe schema (`posttrain.config`): the strict base section, thinking-budget entries and
the LoRA section that several stages use."""

from __future__ import annotations

from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

StageName = Literal["base", "sft", "rm", "grpo", "ppo", "eval", "sweep", "export"]


def check_budgets(v: list) -> list:
    """A recipe's list of thinking budgets: non-empty, each a non-negative integer, "auto" or a range."""
    if not v or any(isinstance(b, int) and b < 0 for b in v):
        raise ValueError("budgets must be a non-empty list of non-negative integers, 'auto' and {low, high} ranges")
    return v


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=True)


class BudgetRange(Section):
    """A budget entry drawn from `low..high` (both included), e.g. `{low: 8, high: 48}`. Trained on a few fixed
    budgets, a model follows only those (budget 12 is then an unknown instruction); trained on ranges, it learns
    the budget as a number. `scale: log` draws log-uniformly (each decade equally often), so a range over orders
    of magnitude (`{low: 49, high: 32768, scale: log}`) shows every length of number, not mostly the longest."""

    low: int = Field(..., ge=1, description="Smallest budget drawn (thinking tokens).")
    high: int = Field(..., ge=1, description="Largest budget drawn (thinking tokens).")
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


# One entry of a budget list. The discriminator sends a mapping to BudgetRange alone, so a bad range gets one
# error naming its key (`grpo.budgets.1.high`), not one per kind of entry.
Budget = Annotated[Union[Annotated[int, Tag("int")], Annotated[Literal["auto"], Tag("auto")],
                         Annotated[BudgetRange, Tag("range")]], Discriminator(_budget_kind)]
PositiveBudget = Annotated[Union[Annotated[int, Tag("int")], Annotated[BudgetRange, Tag("range")]],
                           Discriminator(_range_or_int)]


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
