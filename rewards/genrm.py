"""`genrm`: a generative verifier (trained by the `rm` stage) as a reward: P(Yes) that the response is correct.

See `posttrain.verifier` for the prompt format and why P(Yes) is the two-way [Yes, No] softmax. torch and
transformers are imported on the first call, not when the registry imports this module.
"""

from __future__ import annotations

from .checkpoint import CheckpointReward
from .registry import RewardOutput, mean, register_reward


@register_reward("genrm")
class GenRMReward(CheckpointReward):
    """P(Yes) from a GenRM verifier checkpoint, in [0, 1] per sample.

    path: the verifier's HF checkpoint directory; unset, the `rm` stage's of this run (``RUN_DIR/rm/genrm``: the
    recipe must run `rm` before the RL stage). batch_size: verifier prompts per forward pass. device: where the
    verifier runs ("cpu", "cuda", "cuda:N").

    `prompts` are the raw problems (the user messages), `completions` the generated texts as
    `posttrain.generate` returns them. Needs no fields. The verifier loads once, lazily on the first call, and is
    dropped when the object is pickled, so an instance can be shipped to a Ray actor before or after use.
    """

    run_output = "genrm"  # the rm stage's output directory this reward reads when `path` is unset

    def __call__(self, prompts, completions, **fields) -> RewardOutput:
        from posttrain.verifier import score

        if len(prompts) != len(completions):
            raise ValueError(f"reward 'genrm': {len(prompts)} prompts for {len(completions)} completions")
        if not completions:
            return RewardOutput([], {"p_yes": 0.0})
        model, tok = self._load()
        scores = score(model, tok, list(prompts), list(completions), self.batch_size)
        return RewardOutput(scores, {"p_yes": mean(scores)})
