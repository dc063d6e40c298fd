"""Workers of the RL stage: plain classes (rollout, learner, reference, reward) that run and test without Ray.

Kept light: import the worker modules themselves (`posttrain.workers.rollout`); a separate module wraps them as
Ray actors.
"""
