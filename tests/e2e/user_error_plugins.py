"""Reward functions with user mistakes in them, for ``tests/e2e/test_user_errors.py``."""

import os

if os.environ.get("RANK") == "1":  # as if a package were installed on one host only
    import megatron_erc_package_missing_on_this_host  # noqa: F401


def parity_reward(response: str, answer: str, **meta) -> float:
    """Imports everywhere but on rank 1 (see above)."""
    return float(len(response) % 2)


def no_meta_reward(response: str, answer: str) -> float:
    """Forgets ``**meta``: the grader passes the record's other fields as keywords."""
    return 0.0
