"""Reward functions loaded by name or dotted path.

A reward function has the signature::

    def reward(response: str, answer: str, **meta) -> float

``response`` is the decoded model completion, ``answer`` the reference answer from the
prompt file, and ``meta`` the remaining fields of the prompt record (it may be empty).
The function must return a finite real number; the built-in math grader returns 1.0 for
a correct answer and 0.0 otherwise. Functions run inside grader worker processes (see
:mod:`megatron_erc.rewards.pool`), so they must be importable by path -- lambdas and
closures are not supported -- and they are never given anything to ``eval``.

A function may carry a ``warmup`` attribute: a no-argument callable each worker runs once
before taking work (for lazy imports), so start-up cost does not count against the first
item's timeout.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from typing import Protocol


class RewardFn(Protocol):
    def __call__(self, response: str, answer: str, **meta: object) -> float: ...


#: Short names accepted wherever a reward function path is.
BUILTIN_REWARDS: dict[str, str] = {
    "math": "megatron_erc.rewards.math_grader:math_reward",
}


def resolve_reward_path(spec: str) -> tuple[str, str]:
    """Split ``"pkg.mod:fn"``, ``"pkg.mod.fn"`` or a built-in name into (module, attribute)."""
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(
            f"reward function must be a non-empty string such as 'my_pkg.rewards:score' "
            f"or one of {sorted(BUILTIN_REWARDS)}; got {spec!r}"
        )
    spec = BUILTIN_REWARDS.get(spec.strip(), spec.strip())
    if ":" in spec:
        module, _, attr = spec.partition(":")
    else:
        module, _, attr = spec.rpartition(".")
    if not module or not attr or ":" in attr:
        raise ValueError(
            f"reward function path {spec!r} must look like 'package.module:function' or "
            f"'package.module.function'"
        )
    return module, attr


def load_reward_fn(spec: str) -> Callable[..., float]:
    """Import the reward function named by ``spec`` and check its signature.

    Raises ``ValueError`` (bad path or signature) or ``ImportError``/``AttributeError``
    with the path in the message, so a misconfigured run fails before training starts.
    """
    module_name, attr = resolve_reward_path(spec)
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ImportError(
            f"cannot import module {module_name!r} for reward function {spec!r}: {e}. "
            f"Is the package installed or on PYTHONPATH?"
        ) from e
    fn = module
    for part in attr.split("."):
        try:
            fn = getattr(fn, part)
        except AttributeError as e:
            raise AttributeError(
                f"module {module_name!r} has no attribute {attr!r} (reward function {spec!r})"
            ) from e
    if not callable(fn):
        raise ValueError(f"reward function {spec!r} resolves to a non-callable {type(fn)}")
    check_reward_signature(fn, spec)
    return fn


def check_reward_signature(fn: Callable[..., object], name: str) -> None:
    """Require ``fn(response, answer, **meta)``: two positional parameters and ``**meta``.

    Requiring ``**meta`` up front means every function accepts the same call; the grader
    never has to guess which keyword arguments a particular function tolerates.
    """
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return  # builtins without a signature: checked at call time instead
    try:
        sig.bind("response", "answer", __probe_meta_key__=None)
    except TypeError as e:
        raise ValueError(
            f"reward function {name!r} has signature {sig}; it must accept "
            f"(response: str, answer: str, **meta) -- add '**meta' if it ignores metadata"
        ) from e
