"""Math answer grading with math-verify.

Reward convention: 1.0 if the last ``\\boxed{...}`` in the response is mathematically
equivalent to the reference answer, 0.0 otherwise -- including when the response has no
boxed answer, the grader times out, or it fails. Equivalence is math-verify's: ``1/2``,
``0.5`` and ``\\frac{1}{2}`` agree, and ``x=3`` matches ``3``.

Only the last boxed expression is graded: a response that boxes several candidates gets
credit for its final one, not for any of them.
"""

from __future__ import annotations

import logging

from megatron_erc.rewards.pool import RewardGrader

_BOXED = ("\\boxed", "\\fbox")

#: Boxed answers longer than this are not parsed (reward 0): no real answer is this long,
#: and parsing megabytes of LaTeX only burns the timeout.
MAX_ANSWER_CHARS = 10_000


def extract_last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces
    balanced; ``None`` if there is none or its braces never close."""
    start = max(text.rfind(marker) for marker in _BOXED)
    while start >= 0:
        i = start + 1
        while i < len(text) and text[i].isalpha():
            i += 1
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            depth = 0
            for j in range(i, len(text)):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return text[i + 1 : j]
            return None
        # "\boxed 5" without braces, or a "\boxedfoo" macro: look further left.
        start = max(text.rfind(marker, 0, start) for marker in _BOXED)
    return None


def _math_verify():
    import math_verify

    # The worker arms its own timer around the whole item (see pool.py); math-verify's
    # signal.alarm would reset that timer, so its timeouts are turned off and its
    # "timeout is disabled" warning is expected noise.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    return math_verify


def math_reward(response: str, answer: str, **meta: object) -> float:
    """1.0 if the last boxed answer in ``response`` equals ``answer``, else 0.0.

    ``answer`` may be plain (``"85"``, ``"0.5"``), LaTeX (``"\\frac{1}{2}"``) or already
    boxed. No timeout of its own: run it through :class:`MathGrader`.
    """
    predicted = extract_last_boxed(response)
    if predicted is None or not predicted.strip() or len(predicted) > MAX_ANSWER_CHARS:
        return 0.0
    mv = _math_verify()
    configs = [mv.LatexExtractionConfig(boxed_match_priority=0), mv.ExprExtractionConfig()]
    gold_text = answer if extract_last_boxed(answer) is not None else f"\\boxed{{{answer}}}"
    gold = mv.parse(gold_text, extraction_config=configs, parsing_timeout=None)
    if not gold:
        raise ValueError(f"math-verify could not parse the reference answer {answer!r}")
    pred = mv.parse(f"\\boxed{{{predicted}}}", extraction_config=configs, parsing_timeout=None)
    if not pred:
        return 0.0
    return 1.0 if mv.verify(gold, pred, timeout_seconds=None) else 0.0


def _warmup() -> None:
    # The first call imports sympy and builds the LaTeX parser: about a second.
    math_reward("\\boxed{\\frac{1}{2}}", "0.5")


math_reward.warmup = _warmup


class MathGrader(RewardGrader):
    """:class:`RewardGrader` for :func:`math_reward`.

    >>> with MathGrader(timeout_s=5, num_workers=2) as grader:
    ...     grader.grade(["... so \\\\boxed{\\\\frac{1}{2}}"], ["0.5"]).rewards
    [1.0]
    """

    def __init__(self, *, timeout_s: float = 5.0, num_workers: int = 2, **kwargs):
        super().__init__(
            "megatron_erc.rewards.math_grader:math_reward",
            timeout_s=timeout_s,
            num_workers=num_workers,
            **kwargs,
        )
