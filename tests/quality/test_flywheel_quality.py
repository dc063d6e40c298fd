"""Quality of a finished recipes/flywheel.yaml run (issue #24's flywheel criterion): two rounds on the embedded task,
and the second round's SFT model at least as accurate as the first's at every budget on the same held-out
problems, i.e. not measurably below at any of them (paired, 95%), and not measurably worse at keeping its budgets.

These read `$POSTTRAIN_FLYWHEEL_RUN`; `.ci/run` sets it after `make flywheel` (round 1 copied from the quickstart's
run, round 2 ~9 minutes). Without the variable they are skipped.
"""

import json
import math
import os
from pathlib import Path

import pytest

RUN = os.environ.get("POSTTRAIN_FLYWHEEL_RUN")
pytestmark = pytest.mark.skipif(not RUN, reason="set POSTTRAIN_FLYWHEEL_RUN to a finished flywheel run")


def _evals(stage):
    d = Path(RUN) / stage
    return json.loads((d / "eval_before.json").read_text()), json.loads((d / "eval_after.json").read_text())


def _paired_ci(a, b):
    """Mean of b - a over paired 0/1 outcomes and its normal 95% interval, written out by hand (the reference the
    stored comparison, which `eval.stats.paired_difference` computes, is checked against)."""
    d = [y - x for x, y in zip(a, b, strict=True)]
    n = len(d)
    mean = sum(d) / n
    sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (n - 1))
    return mean, mean - 1.96 * sd / math.sqrt(n), mean + 1.96 * sd / math.sqrt(n)


def test_round_two_sft_is_at_least_as_accurate_as_round_one_at_every_budget():
    r1, _ = _evals("grpo")  # eval_before of each round's RL stage: that round's SFT model
    r2, _ = _evals("grpo@2")
    stored = json.loads((Path(RUN) / "rounds.json").read_text())["against_round_1"]["2"]["sft"]["per_budget"]
    assert set(r1) == set(r2) == set(stored) and len(r1) >= 4, sorted(r1)
    for b in r1:
        assert r1[b]["problems"] == r2[b]["problems"], b  # the same held-out problems: a paired comparison
        mean, low, high = _paired_ci(r1[b]["correct"], r2[b]["correct"])
        acc = stored[b]["accuracy"]
        assert acc["diff"] == pytest.approx(mean) and acc["ci95"][0] == pytest.approx(low, abs=0.01), (b, acc)
        assert acc["measurably"] != "below" and high >= 0, (b, mean, low, high)
        if b != "auto":  # and it keeps its budgets as well (natural accuracy counts answers past the budget)
            mean, low, high = _paired_ci(r1[b]["adherent"], r2[b]["adherent"])
            assert high >= 0, ("adherence", b, mean, low, high)


def test_round_two_trained_on_accepted_samples_of_the_round_one_model():
    """sft@2's data: samples of the round-1 GRPO model that the grader, the budget and the round-1 GenRM accepted,
    one per problem, with every mode represented; rm@2 re-trained the GenRM on the round-2 SFT model's samples."""
    from posttrain.rewards.verifiable import judge

    info = json.loads((Path(RUN) / "sft@2" / "done.json").read_text())
    fw = info["flywheel"]
    assert fw["sampled_by"].endswith("grpo/checkpoint") and fw["sampled_rows"] >= 1000
    samples = json.loads((Path(RUN) / "sft@2" / "flywheel_samples.json").read_text())["samples"]
    kept = [s for s in samples if s["kept"]]
    assert len(kept) == fw["kept"] and len({s["problem_id"] for s in kept}) == len(kept)
    for s in kept[:500]:
        assert judge("exact_int", s["response"], s["answer"]) and s["p_yes"] >= 0.5, s
        assert s["budget"] is None or s["n_think"] <= s["budget"], s
    assert all(fw["by_mode"][m]["kept"] > 0 for m in ("budgeted", "autonomous", "zero")), fw["by_mode"]
    report = json.loads((Path(RUN) / "rm@2" / "rm_report.json").read_text())
    assert report["model"].endswith("sft@2/checkpoint") and report["genrm"]["auc"] > 0.8, report["genrm"]
