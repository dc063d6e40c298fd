"""Flywheel rounds: stage names with a round suffix (`sft@2`), the expansion of `flywheel.rounds`, and the run's
per-round summary.

A recipe may repeat the stages that build a model from the previous one: `sft`, `rm`, `eval`, `grpo`, `ppo`
(`ROUND_STAGES`). Round 1 is the plain name; round r >= 2 is `name@r` and runs the stage of that name with its own
directory (`RUN/sft@2/`), so a killed run resumes mid-round as it resumes any stage. `flywheel.rounds: N` writes the
same list for you: the round stages of `stages` again for rounds 2..N, after round 1's, before the stages that
follow them (`sweep`, `export`, `distill`). What changes in a later round:

- `sft@r` fine-tunes on data the previous round's final model wrote, kept where the task's grader (and optionally
  the GenRM) accept it (`posttrain.flywheel`), mixed with the task's demonstrations;
- `rm@r` samples and labels the round's new SFT model, so the GenRM learns that model's mistakes;
- an RL stage of round r reads the GenRM of the latest `rm` stage before it (`rm@r` when the round has one).

Pure: names and lists (the run's per-round summary is `posttrain.stages.rounds_report`).
"""

from __future__ import annotations

import difflib
import re

STAGE_KINDS = ("base", "sft", "rm", "grpo", "ppo", "distill", "eval", "sweep", "export")
ROUND_STAGES = ("sft", "rm", "eval", "grpo", "ppo")
MODEL_KINDS = ("sft", "grpo", "ppo", "distill")  # stages that write a checkpoint later stages start from

_NAME = re.compile(r"^([a-z]+)(?:@(\d+))?$")


def split_stage(name: str) -> tuple[str, int]:
    """(kind, round) of a stage name: `sft` -> ("sft", 1), `grpo@2` -> ("grpo", 2). Unknown names raise."""
    m = _NAME.match(name)
    if not m or m.group(1) not in STAGE_KINDS:
        near = difflib.get_close_matches(name.split("@")[0], STAGE_KINDS, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        raise ValueError(f"unknown stage {name!r}{hint} (stages: {', '.join(STAGE_KINDS)}; the round stages "
                         f"{', '.join(ROUND_STAGES)} may carry a round suffix, as `sft@2`)")
    return m.group(1), int(m.group(2) or 1)


def kind_of(name: str) -> str:
    return split_stage(name)[0]


def check_stages(stages: list[str]) -> list[str]:
    """Problems of a stage list's names (empty when fine): unknown names, a round suffix on a stage that does not
    repeat, round 1 written as `@1`, a round's stage without that stage in the round before it, repeats."""
    problems = []
    for i, name in enumerate(stages):
        try:
            kind, r = split_stage(name)
        except ValueError as e:
            problems.append(f"stages.{i}: {e}")
            continue
        if "@" not in name:
            continue
        if kind not in ROUND_STAGES:
            problems.append(f"stages.{i} {name!r}: only {', '.join(ROUND_STAGES)} repeat in rounds")
        elif r < 2:
            problems.append(f"stages.{i} {name!r}: round 1 is the plain name {kind!r}; later rounds are @2, @3, ...")
        else:
            prev = kind if r == 2 else f"{kind}@{r - 1}"
            if prev not in stages[:i]:
                problems.append(f"stages.{i} {name!r} needs {prev!r} before it (round {r - 1} of the same stage)")
    if len(set(stages)) != len(stages):
        problems.append("stages must not repeat (a later round of a stage is `name@2`, `name@3`, ...)")
    return problems


def expand_rounds(stages: list[str], rounds: int) -> list[str]:
    """`stages` with its round stages repeated for rounds 2..`rounds`, each round after the previous one and
    before the stages that follow the last round stage: [base, sft, rm, grpo, sweep] with 2 rounds is
    [base, sft, rm, grpo, sft@2, rm@2, grpo@2, sweep]."""
    idx = [i for i, s in enumerate(stages) if s in ROUND_STAGES]
    if rounds <= 1 or not idx:
        return list(stages)
    block = [s for s in stages[idx[0]: idx[-1] + 1] if s in ROUND_STAGES]
    later = [f"{s}@{r}" for r in range(2, rounds + 1) for s in block]
    return list(stages[: idx[-1] + 1]) + later + list(stages[idx[-1] + 1:])


def latest(stages: list[str], before: str, kind: str) -> str | None:
    """The last stage of `kind` (any round) listed before `before`; None when there is none."""
    found = [s for s in stages[: stages.index(before)] if kind_of(s) == kind]
    return found[-1] if found else None


def rounds_of(stages: list[str]) -> int:
    return max((split_stage(s)[1] for s in stages), default=1)
