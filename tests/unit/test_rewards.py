"""Reward grading: math-verify equivalence, timeouts, crashes and custom functions.

The graders run real worker processes and the real math-verify; the custom reward
functions below are imported by the workers through their dotted path.
"""

import math
import os
import signal
import time

import pytest

from megatron_erc.rewards import (
    MathGrader,
    RewardGrader,
    extract_last_boxed,
    load_reward_fn,
    math_reward,
    resolve_reward_path,
)

TIMEOUT_S = 1.5
GRACE_S = 0.5


def misbehaving_reward(response: str, answer: str, *, mode: str = "ok", **meta) -> float:
    """Behaves as ``mode`` says; ``ok`` is exact string match."""
    if mode == "raise":
        raise RuntimeError("grader bug")
    if mode == "sleep":
        time.sleep(60)
    if mode == "hang_uninterruptible":
        # Like a hang inside C code: the worker's SIGALRM can't get through, only a kill.
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(60)
    if mode == "crash":
        os._exit(3)
    if mode == "nan":
        return float("nan")
    if mode == "inf":
        return float("-inf")
    if mode == "string":
        return "1.0"
    return 1.0 if response == answer else 0.0


def reward_without_meta(response, answer):
    return 1.0


@pytest.fixture(scope="module")
def math_grader():
    with MathGrader(timeout_s=TIMEOUT_S, num_workers=2, kill_grace_s=GRACE_S) as grader:
        yield grader


@pytest.mark.parametrize(
    "text, expected",
    [
        (r"so \boxed{\frac{1}{2}}.", r"\frac{1}{2}"),
        (r"\boxed{1} no, \boxed{2}", "2"),
        (r"\fbox{7}", "7"),
        (r"\boxed {x = {3}}", "x = {3}"),
        ("no answer here", None),
        (r"\boxed{3", None),
        (r"\boxed{4} and \boxed{5", None),  # the last one never closes
        (r"\boxed 5", None),
    ],
)
def test_extract_last_boxed(text, expected):
    assert extract_last_boxed(text) == expected


CASES = [
    # (response, answer, reward)
    (r"Half of it: \boxed{\frac{1}{2}}", "0.5", 1.0),
    (r"\boxed{0.5}", r"\frac{1}{2}", 1.0),
    (r"\boxed{1/2}", "0.5", 1.0),
    (r"\boxed{\dfrac{3}{4}}", "0.75", 1.0),
    (r"\boxed{x=3}", "3", 1.0),
    (r"\boxed{3}", "x=3", 1.0),
    (r"37 + 48 = 85. The final answer is \boxed{85}.", "85", 1.0),
    (r"\boxed{84}", "85", 0.0),
    (r"\boxed{0.51}", "0.5", 0.0),
    (r"\boxed{-5}", "5", 0.0),
    ("The answer is 3", "3", 0.0),  # no boxed answer
    (r"\boxed{}", "3", 0.0),
    (r"First \boxed{3}, no wait: \boxed{4}", "4", 1.0),  # last boxed wins
    (r"First \boxed{4}, no wait: \boxed{3}", "4", 0.0),
    (r"\boxed{85}", r"\boxed{85}", 1.0),  # boxed reference answers work too
]


def test_math_reward_in_process_matches_table():
    # The plain function, in this (main) thread: the same answers the workers must give.
    for response, answer, expected in CASES:
        assert math_reward(response, answer) == expected, (response, answer)


def test_math_grader_batch(math_grader):
    responses, answers, expected = map(list, zip(*CASES, strict=True))
    result = math_grader.grade(responses, answers)
    assert result.rewards == expected
    assert result.statuses == ["ok"] * len(CASES)
    assert result.counts["reward/graded"] == len(CASES)
    assert result.counts["reward/timeouts"] == result.counts["reward/errors"] == 0


ADVERSARIAL = {
    "huge_number": r"\boxed{" + "9" * 100_001 + "}",
    "big_number_under_cap": r"\boxed{" + "7" * 9_000 + "}",
    "power_of_ten": r"\boxed{10^{100000}}",
    "power_tower": r"\boxed{2^{2^{2^{2^{2^{10}}}}}}",
    "nested_frac": r"\boxed{" + r"\frac{" * 500 + "1" + "}{2}" * 500 + "}",
    "unicode_junk": "\\boxed{" + "".join(chr(c) for c in range(0x2000, 0x2400)) + "\ud800}",
    "long_string": "blah " * 2_000_000 + r"\boxed{3}",
    "many_unclosed": r"\boxed{" * 100_000,
    "deep_braces": r"\boxed{" + "{" * 5_000 + "3" + "}" * 5_000 + "}",
}


def test_adversarial_inputs_finish_within_timeout(math_grader):
    names = list(ADVERSARIAL)
    start = time.monotonic()
    result = math_grader.grade([ADVERSARIAL[k] for k in names], ["3"] * len(names))
    elapsed = time.monotonic() - start
    # Two workers: each item takes at most timeout + grace (+ a worker restart).
    bound = math.ceil(len(names) / 2) * (TIMEOUT_S + GRACE_S + 1.0)
    assert elapsed < bound, f"{elapsed:.1f}s for {len(names)} items"
    by_name = dict(zip(names, zip(result.rewards, result.statuses, strict=True), strict=True))
    for name, (reward, status) in by_name.items():
        assert status in ("ok", "timeout", "error"), name
        assert reward in (0.0, 1.0), name
        if status != "ok":
            assert reward == 0.0, name
    assert by_name["long_string"] == (1.0, "ok")
    assert by_name["huge_number"] == (0.0, "ok")
    counts = result.counts
    assert counts["reward/timeouts"] == result.statuses.count("timeout")
    assert counts["reward/errors"] == result.statuses.count("error")
    # The power tower cannot be evaluated in time; it must show up as a timeout.
    assert by_name["power_tower"] == (0.0, "timeout")

    # ...and the grader keeps grading correctly afterwards.
    after = math_grader.grade([r"\boxed{12}", r"\boxed{13}"], ["12", "12"])
    assert after.rewards == [1.0, 0.0]
    assert after.statuses == ["ok", "ok"]


def test_custom_function_failures_are_counted_and_zero():
    modes = ["ok", "raise", "sleep", "nan", "inf", "string", "hang_uninterruptible", "crash"]
    expected_status = {
        "ok": "ok",
        "raise": "error",
        "sleep": "timeout",
        "nan": "error",
        "inf": "error",
        "string": "error",
        "hang_uninterruptible": "timeout",
        "crash": "error",
    }
    spec = f"{__name__}:misbehaving_reward"
    with RewardGrader(spec, timeout_s=1.0, num_workers=2, kill_grace_s=0.5) as grader:
        start = time.monotonic()
        result = grader.grade(["a"] * len(modes), ["a"] * len(modes), [{"mode": m} for m in modes])
        elapsed = time.monotonic() - start
        assert elapsed < 6.0
        assert result.statuses == [expected_status[m] for m in modes]
        assert result.rewards == [1.0] + [0.0] * (len(modes) - 1)
        assert result.counts["reward/errors"] == 5
        assert result.counts["reward/timeouts"] == 2
        # The uninterruptible hang and the crash each cost a worker.
        assert result.counts["reward/worker_restarts"] == 2
        assert any("grader bug" in e for e in result.errors)

        # Still working, with fresh workers: a clean batch is graded correctly.
        again = grader.grade(["a", "b", "c"], ["a", "x", "c"])
        assert again.rewards == [1.0, 0.0, 1.0]
        assert again.counts["reward/errors"] == again.counts["reward/timeouts"] == 0
        assert grader.total_counts["reward/graded"] == len(modes) + 3
        assert grader.total_counts["reward/errors"] == 5


def test_worker_killed_while_idle_is_replaced():
    with RewardGrader(f"{__name__}:misbehaving_reward", timeout_s=1.0, num_workers=1) as grader:
        assert grader.grade(["a"], ["a"]).rewards == [1.0]
        worker = grader._workers[0]
        os.kill(worker.proc.pid, signal.SIGKILL)
        worker.proc.join(timeout=5)
        result = grader.grade(["a", "b"], ["a", "b"])
        assert result.rewards == [1.0, 1.0]
        assert result.counts["reward/worker_restarts"] == 1


def test_grade_argument_checks_and_close():
    grader = RewardGrader(f"{__name__}:misbehaving_reward", timeout_s=1.0, num_workers=1)
    assert grader.grade([], []).rewards == []
    with pytest.raises(ValueError, match="same length"):
        grader.grade(["a"], [])
    grader.close()
    grader.close()
    with pytest.raises(RuntimeError, match="closed"):
        grader.grade(["a"], ["a"])


def test_load_reward_fn_paths():
    assert load_reward_fn("math") is math_reward
    assert load_reward_fn("megatron_erc.rewards.math_grader:math_reward") is math_reward
    assert load_reward_fn("megatron_erc.rewards.math_grader.math_reward") is math_reward
    assert resolve_reward_path("a.b:c") == ("a.b", "c")
    assert resolve_reward_path("a.b.c") == ("a.b", "c")


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("", ValueError, "non-empty"),
        ("nodots", ValueError, "package.module"),
        ("no_such_module_xyz:fn", ImportError, "no_such_module_xyz"),
        ("megatron_erc.rewards.math_grader:nope", AttributeError, "nope"),
        ("megatron_erc.rewards.math_grader:MAX_ANSWER_CHARS", ValueError, "non-callable"),
        (f"{__name__}:reward_without_meta", ValueError, r"\*\*meta"),
    ],
)
def test_load_reward_fn_errors(spec, error, match):
    with pytest.raises(error, match=match):
        load_reward_fn(spec)


def test_grader_rejects_bad_config_before_starting_workers():
    with pytest.raises(ImportError):
        RewardGrader("no_such_module_xyz:fn")
    with pytest.raises(ValueError, match="timeout_s"):
        MathGrader(timeout_s=0)
    with pytest.raises(ValueError, match="num_workers"):
        MathGrader(num_workers=0)
