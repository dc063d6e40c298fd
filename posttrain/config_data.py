"""The recipe's `data` section (`posttrain.config`): which task, and how its rows are read and graded."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from posttrain.config_common import Section


class DataConfig(Section):
    source: Literal["arithmetic", "file", "hub", "reasoning_gym"] = Field(
        "arithmetic", description="The task (`posttrain.tasks`): `arithmetic`: the embedded task; `file`: local "
        "JSONL/JSON/Parquet; `hub`: a `datasets` name (needs a reachable hub); `reasoning_gym`: the reasoning-gym "
        "dataset `dataset` with `config` (`pip install posttrain[reasoning-gym]`). `file`, `hub` and "
        "`reasoning_gym` feed sft, rm, grpo, ppo, eval and sweep: the first four train on their rows, except the "
        "rows the RL stages hold out (spread evenly through them) for their evaluation, which the eval and sweep "
        "stages evaluate."
    )
    dataset: str | None = Field(None, description="source=reasoning_gym: the dataset's name (e.g. chain_sum).")
    config: dict = Field(default_factory=dict, description="source=reasoning_gym: the dataset's config keywords "
                         "(e.g. {min_terms: 2, max_terms: 6}); its difficulty parameters are among them.")
    size: int = Field(20000, ge=10, description="source=reasoning_gym: how many entries to generate (from the "
                      "recipe's seed); held-out rows are taken from them as from a file's.")
    difficulty_keys: list[str] | None = Field(
        None, description="source=reasoning_gym: the entry metadata fields that make up an entry's difficulty (by "
        "default the dataset's own difficulty parameters, `metadata.difficulty`).")
    difficulty_levels: int = Field(8, ge=1, le=100, description="source=reasoning_gym: the difficulty scale's "
                                   "levels (1..levels) (one integer parameter of at most `levels` values is its "
                                   "own scale: num_terms 2..8 gives difficulties 1..7; none gives 0).")
    path: str | None = Field(None, description="source=file: a .jsonl/.json/.parquet file, or a directory written by "
                             "`datasets`' save_to_disk; source=hub: a dataset name.")
    split: str = Field("train", description="The split of a hub dataset or of a saved DatasetDict.")
    prompt_column: str = Field("prompt", description="Column holding the user prompt.")
    answer_column: str = Field("answer", description="Column holding the reference answer.")
    reasoning_column: str | None = Field(None, description="Optional column with a reference reasoning trace.")
    answer_delimiter: str | None = Field(
        None, description="If set (GSM8K uses '####'), the answer column is 'reasoning DELIM final answer'."
    )
    difficulty_column: str | None = Field(None, description="Optional integer column: every row must carry it, "
                                          "and it is kept with each example (`Example.difficulty`): the RL "
                                          "stages' autonomous thinking and the sweep are grouped by it.")
    max_prompt_chars: int = Field(2000, gt=0, description="Longer prompts are bad rows.")
    skip_bad_rows: bool = Field(
        False, description="Skip (and list in the run directory) rows with missing/wrong/empty fields instead of "
        "stopping before training."
    )
    tests_column: str | None = Field(
        None, description="Optional column of tests for code answers (assert strings, or {input, output} pairs, or "
        "{inputs, outputs}; a JSON string of one of these): read by `grader: code` and the `code` reward.")
    grader: Literal["auto", "exact_int", "math", "exact", "code", "reasoning_gym"] = Field(
        "auto", description="How an answer is judged right, by every stage alike (the RL rewards' correctness, the "
        "RM labels, the eval and RL evaluations, the sweep): `exact_int` (the integer after `</think>`), `math` "
        "(math-verify equivalence of the answer after `</think>`, or of its last \\boxed{}: fractions, decimals, "
        "expressions), `exact` (the answer as text, case and spacing ignored: words, letters, lists), `code` (the "
        "answer's code passes every test of `tests_column`, run in the sandbox; the answer column is then the "
        "reference solution SFT imitates), `reasoning_gym` (the dataset's own `score_answer`, full score). `auto`: "
        "the task's own: `exact_int` on the embedded task, `math` on a data file, `reasoning_gym` on reasoning-gym.")

    @property
    def grader_name(self) -> str:
        """The grader `grader` resolves to (`posttrain.rewards.verifiable.GRADERS`): the task's own for `auto`."""
        if self.grader != "auto":
            return self.grader
        from posttrain.tasks.task import task_class

        return task_class(self.source).default_grader

    @model_validator(mode="after")
    def _check_source(self) -> "DataConfig":
        if self.source in ("file", "hub") and not self.path:
            raise ValueError(f"`path` is required when source is {self.source!r}")
        if self.source == "file" and not Path(self.path).expanduser().exists():
            raise ValueError(f"path: path {self.path!r} does not exist (a JSONL/JSON/Parquet file, or a directory "
                             "written by `datasets`' save_to_disk)")
        if self.source == "reasoning_gym":
            from posttrain.tasks.gym_check import check_dataset

            check_dataset(self.dataset, self.config)
        elif self.dataset is not None or self.config:
            raise ValueError(f"dataset / config: they choose a reasoning-gym dataset, and source is {self.source!r}")
        if self.grader == "reasoning_gym" and self.source != "reasoning_gym":
            raise ValueError("grader: `reasoning_gym` reads reasoning-gym entries; set source: reasoning_gym")
        if self.grader == "code":
            if not self.tests_column:
                raise ValueError("grader: `code` runs each row's tests: set data.tests_column")
            from posttrain.rewards.code import CodeReward

            try:  # the sandbox must run here, before any model is loaded
                CodeReward.check_params({})
            except RuntimeError as e:
                raise ValueError(f"grader: code: {e}") from None
        return self
