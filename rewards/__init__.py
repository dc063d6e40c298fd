"""Rewards: the registry, verifiable rewards (exact_int, math, code, format), budget shaping and combination.

Kept light: importing the package imports no torch, Ray, sympy or math-verify. Registered rewards are loaded on
the first registry lookup (`build_reward`, `get_reward_cls`, `list_rewards`).
"""

from .registry import RewardOutput, UnknownRewardError, build_reward, get_reward_cls, list_rewards, register_reward

__all__ = ["RewardOutput", "UnknownRewardError", "build_reward", "get_reward_cls", "list_rewards", "register_reward"]
