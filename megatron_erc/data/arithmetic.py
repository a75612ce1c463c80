"""A generated arithmetic task for the embedded demo: small add / sub / mul problems.

Prompts look like ``"What is 37 + 48? Put the final answer in \\boxed{}."`` with answer
``"85"``; :func:`sft_target` gives a worked completion ending in ``\\boxed{85}`` for a
supervised warm start. The math grader scores the completions.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

OPS = ("+", "-", "*")
PROMPT_FORMAT = "What is {a} {op} {b}? Put the final answer in \\boxed{{}}."


@dataclass(frozen=True)
class ArithmeticProblem:
    a: int
    op: str
    b: int

    @property
    def prompt(self) -> str:
        return PROMPT_FORMAT.format(a=self.a, op=self.op, b=self.b)

    @property
    def answer(self) -> str:
        a, b = self.a, self.b
        return str(a + b if self.op == "+" else a - b if self.op == "-" else a * b)

    @property
    def sft_target(self) -> str:
        """A correct completion: ``"37 + 48 = 85. The final answer is \\boxed{85}."``"""
        c = self.answer
        return f"{self.a} {self.op} {self.b} = {c}. The final answer is \\boxed{{{c}}}."

    @property
    def short_target(self) -> str:
        """The answer alone, ``"\\boxed{85}"``: a response of a few tokens (the ablation's
        miniature, where generation time bounds how many RL runs fit in an hour)."""
        return f"\\boxed{{{self.answer}}}"


def generate_problems(
    n: int, *, seed: int = 0, difficulty: int = 2, ops: tuple[str, ...] = OPS
) -> list[ArithmeticProblem]:
    """``n`` problems drawn from ``random.Random(seed)``.

    ``difficulty`` is the number of digits of the operands (1 -> 0..9, 2 -> 0..99, ...);
    for ``*`` the second operand has at most one digit, so products stay short. Subtraction
    puts the larger number first, so answers are never negative.
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 1 <= difficulty <= 6:
        raise ValueError(f"difficulty is the number of operand digits, 1..6; got {difficulty}")
    if not ops or any(op not in OPS for op in ops):
        raise ValueError(f"ops must be a non-empty subset of {OPS}, got {ops}")
    rng = random.Random(seed)
    high = 10**difficulty - 1
    problems = []
    for _ in range(n):
        op = rng.choice(ops)
        a = rng.randint(0, high)
        b = rng.randint(0, min(high, 9) if op == "*" else high)
        if op == "-" and b > a:
            a, b = b, a
        problems.append(ArithmeticProblem(a=a, op=op, b=b))
    return problems


def write_arithmetic_jsonl(
    path: str | Path, n: int, *, seed: int = 0, difficulty: int = 2
) -> list[ArithmeticProblem]:
    """Write ``n`` problems as JSONL records ``{"prompt", "answer", "target"}`` (the
    default field names of :class:`~megatron_erc.data.prompts.PromptDataConfig`)."""
    problems = generate_problems(n, seed=seed, difficulty=difficulty)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for p in problems:
            record = {"prompt": p.prompt, "answer": p.answer, "target": p.sft_target}
            f.write(json.dumps(record) + "\n")
    return problems
