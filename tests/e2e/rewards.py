"""Reward functions for end-to-end tests (loaded by dotted path in grader workers)."""


def parity_reward(response: str, answer: str, **meta) -> float:
    """Non-constant rewards from any policy, random ones included, so every RL step has
    groups with non-equal rewards and exercises the update path."""
    return float(len(response) % 2)


def half_constant_reward(response: str, answer: str, **meta) -> float:
    """Equal rewards for every response to a prompt whose answer has an even number of
    characters (dynamic sampling drops those groups); response-length parity otherwise. Which
    groups survive then depends on the prompts drawn, as with a real reward."""
    return 1.0 if len(answer) % 2 == 0 else float(len(response) % 2)


def constant_reward(response: str, answer: str, **meta) -> float:
    """Every group all-equal: dynamic sampling keeps nothing."""
    return 1.0


def slow_validation_reward(response: str, answer: str, **meta) -> float:
    """One second per validation item (answers prefixed ``slow:``); parity otherwise."""
    if answer.startswith("slow:"):
        import time

        time.sleep(1.0)
        return 0.0
    return float(len(response) % 2)
