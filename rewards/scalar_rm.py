"""`scalar_rm`: the scalar Bradley-Terry reward model (trained by the `rm` stage with `rm.scalar.enabled`) as a
reward: its score of the problem and response as one conversation (`posttrain.verifier.scalar_scores`).

A Bradley-Terry score is a logit, unbounded and centred wherever training left it: in a sum with verifiable
rewards give it a small `weight`, or use it as the judge behind a verifier (`reward_combine: gated`, HERO).
torch and transformers are imported on the first call (`checkpoint.CheckpointReward`).
"""

from __future__ import annotations

from .checkpoint import CheckpointReward
from .registry import RewardOutput, mean, register_reward


@register_reward("scalar_rm")
class ScalarRMReward(CheckpointReward):
    """The scalar RM's score per sample.

    path: the RM's checkpoint directory; unset, the `rm` stage's of this run (``RUN_DIR/rm/scalar``, which the
    recipe must produce: `rm` before the RL stage, `rm.scalar.enabled`). batch_size: conversations per forward pass.
    device: where the RM runs. The model loads once, lazily, and is dropped when the object is pickled.
    """

    run_output = "scalar"  # the rm stage's output directory this reward reads when `path` is unset
    auto_class = "AutoModelForSequenceClassification"

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        from posttrain.verifier import scalar_scores

        if len(prompts) != len(completions):
            raise ValueError(f"reward 'scalar_rm': {len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return RewardOutput([], {"score": 0.0})
        model, tok = self._load()
        recs = [{"problem": p, "response": c} for p, c in zip(prompts, completions)]
        scores = scalar_scores(model, tok, recs, self.batch_size)
        return RewardOutput(scores, {"score": mean(scores)})
