"""Reward functions and the process-pool grader that runs them with timeouts."""

from megatron_erc.rewards.math_grader import MathGrader, extract_last_boxed, math_reward
from megatron_erc.rewards.pool import GradeResult, RewardGrader
from megatron_erc.rewards.registry import BUILTIN_REWARDS, load_reward_fn, resolve_reward_path

__all__ = [
    "BUILTIN_REWARDS",
    "GradeResult",
    "MathGrader",
    "RewardGrader",
    "extract_last_boxed",
    "load_reward_fn",
    "math_reward",
    "resolve_reward_path",
]
