"""Reward functions for end-to-end tests (loaded by dotted path in grader workers)."""


def parity_reward(response: str, answer: str, **meta) -> float:
    """Non-constant rewards from any policy, random ones included, so every RL step has
    groups with non-equal rewards and exercises the update path."""
    return float(len(response) % 2)
