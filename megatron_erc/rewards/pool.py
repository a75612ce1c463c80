"""Grade responses in worker processes, with a per-item timeout.

Why processes: graders such as math-verify run sympy, which can take unbounded time on
adversarial model output, and Python can only interrupt it with ``signal`` in a main
thread. Each worker is the main thread of its own process, so it arms an interval timer
around every item (the *soft* timeout, which turns into reward 0). Code stuck in C
cannot be interrupted by a signal, so the parent also keeps a *hard* deadline
(``timeout_s + kill_grace_s``) and kills and replaces a worker that passes it. Either
way the item gets reward 0 and a counted metric; the trainer keeps running.

Metrics (``GradeResult.counts``, per batch):
    reward/graded          items in the batch
    reward/timeouts        items that hit the soft or hard timeout
    reward/errors          items whose function raised, returned a non-finite or
                           non-real value, or whose worker died
    reward/worker_restarts workers killed or found dead and replaced
"""

from __future__ import annotations

import logging
import math
import multiprocessing as mp
import numbers
import signal
import time
from collections import deque
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait

from megatron_erc.rewards.registry import load_reward_fn

logger = logging.getLogger(__name__)

OK, TIMEOUT, ERROR = "ok", "timeout", "error"
_MAX_ERROR_CHARS = 500
_STARTUP_FAILURES_BEFORE_GIVING_UP = 3


@dataclass
class GradeResult:
    """Rewards for one batch, in input order, with what went wrong."""

    rewards: list[float]
    """One reward per response; 0.0 for items that timed out or failed."""
    statuses: list[str]
    """Per item: ``"ok"``, ``"timeout"`` or ``"error"``."""
    counts: dict[str, int] = field(default_factory=dict)
    """Batch metrics, see the module docstring."""
    errors: list[str] = field(default_factory=list)
    """Up to a few error messages from this batch, for logs."""


class _ItemTimeout(BaseException):
    """Raised by the worker's SIGALRM handler. A BaseException so that graders that
    catch ``Exception`` (math-verify does) cannot swallow it and report a wrong answer."""


def _on_alarm(signum, frame):
    raise _ItemTimeout()


def _grade_one(fn, response, answer, meta, timeout_s) -> tuple[str, float, str]:
    # Re-armed per item: a reward function may have installed its own SIGALRM handler.
    signal.signal(signal.SIGALRM, _on_alarm)
    try:
        signal.setitimer(signal.ITIMER_REAL, timeout_s)
        try:
            value = fn(response, answer, **meta)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
    except _ItemTimeout:
        return TIMEOUT, 0.0, f"timed out after {timeout_s:g}s"
    except BaseException as e:  # noqa: BLE001 - anything a user function does is its error
        return ERROR, 0.0, f"{type(e).__name__}: {e}"[:_MAX_ERROR_CHARS]
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return ERROR, 0.0, f"reward function returned {type(value).__name__}, expected float"
    value = float(value)
    if not math.isfinite(value):
        return ERROR, 0.0, f"reward function returned non-finite value {value}"
    return OK, value, ""


def _worker_main(conn: Connection, fn_spec: str, timeout_s: float) -> None:
    # Ctrl-C goes to the whole process group; the parent decides when workers stop.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    fn = load_reward_fn(fn_spec)
    warmup = getattr(fn, "warmup", None)
    if callable(warmup):
        # Lazy imports and parser set-up must not eat the first item's time budget.
        warmup()
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg is None:
            return
        idx, response, answer, meta = msg
        conn.send((idx, *_grade_one(fn, response, answer, meta, timeout_s)))


class _Worker:
    def __init__(self, ctx, fn_spec: str, timeout_s: float):
        self.conn, child = ctx.Pipe(duplex=True)
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, fn_spec, timeout_s),
            daemon=True,
            name="megatron-erc-reward",
        )
        self.proc.start()
        child.close()  # so that recv() sees EOF when the worker dies
        self.started_at = time.monotonic()
        self.ready = False
        self.item: int | None = None
        self.deadline = math.inf

    def kill(self) -> None:
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(timeout=5)
        self.conn.close()


class RewardGrader:
    """Batch reward computation in a pool of worker processes.

    Args:
        reward_fn: dotted path (``"pkg.mod:fn"`` / ``"pkg.mod.fn"``) or built-in name of a
            function ``fn(response: str, answer: str, **meta) -> float``
            (see :mod:`megatron_erc.rewards.registry`).
        timeout_s: per-item time limit; items over it get reward 0 and count as timeouts.
        num_workers: worker processes; graded items run in parallel across them.
        kill_grace_s: extra time after ``timeout_s`` before a worker that does not
            answer (stuck outside the interpreter) is killed and replaced.
        start_method: multiprocessing start method. ``"forkserver"`` (default) and
            ``"spawn"`` are safe in a trainer that already runs threads; ``"fork"`` is not.
        startup_timeout_s: time a new worker may take to import the reward function and
            run its optional ``warmup()`` (see :mod:`megatron_erc.rewards.registry`).

    Use as a context manager, or call :meth:`close`. Not thread-safe: call :meth:`grade`
    from one thread. With ``forkserver``/``spawn`` the main script must guard its entry
    point with ``if __name__ == "__main__":``, as multiprocessing requires.
    """

    def __init__(
        self,
        reward_fn: str,
        *,
        timeout_s: float = 5.0,
        num_workers: int = 2,
        kill_grace_s: float = 1.0,
        start_method: str = "forkserver",
        startup_timeout_s: float = 60.0,
    ):
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be > 0 seconds, got {timeout_s}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be >= 1, got {num_workers}")
        if kill_grace_s < 0:
            raise ValueError(f"kill_grace_s must be >= 0, got {kill_grace_s}")
        # Import in the parent first so a bad path fails here, with a clear message,
        # rather than as dying workers.
        load_reward_fn(reward_fn)
        self.reward_fn = reward_fn
        self.timeout_s = float(timeout_s)
        self.kill_grace_s = float(kill_grace_s)
        self.startup_timeout_s = float(startup_timeout_s)
        self._ctx = mp.get_context(start_method)
        self._workers = [self._spawn() for _ in range(num_workers)]
        self.total_counts: dict[str, int] = _zero_counts()
        """Counts summed over every batch graded so far."""

    def _spawn(self) -> _Worker:
        return _Worker(self._ctx, self.reward_fn, self.timeout_s)

    def _replace(self, i: int, counts: dict[str, int]) -> None:
        self._workers[i].kill()
        self._workers[i] = self._spawn()
        counts["reward/worker_restarts"] += 1

    def grade(
        self,
        responses: list[str],
        answers: list[str],
        metas: list[dict] | None = None,
    ) -> GradeResult:
        """Grade ``responses[i]`` against ``answers[i]`` (with ``metas[i]`` as ``**meta``)."""
        if self._workers is None:
            raise RuntimeError("RewardGrader is closed")
        n = len(responses)
        if len(answers) != n or (metas is not None and len(metas) != n):
            raise ValueError(
                f"responses ({n}), answers ({len(answers)})"
                + (f" and metas ({len(metas)})" if metas is not None else "")
                + " must have the same length"
            )
        metas = metas if metas is not None else [{}] * n
        rewards = [0.0] * n
        statuses: list[str | None] = [None] * n
        errors: list[str] = []
        counts = _zero_counts()
        counts["reward/graded"] = n
        pending = deque(range(n))
        startup_failures = 0

        def finish(idx: int, status: str, value: float, message: str) -> None:
            rewards[idx], statuses[idx] = value, status
            if status == TIMEOUT:
                counts["reward/timeouts"] += 1
            elif status == ERROR:
                counts["reward/errors"] += 1
            if message and len(errors) < 5:
                errors.append(f"item {idx}: {message}")

        while pending or any(w.item is not None for w in self._workers):
            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if not (w.ready and w.item is None and pending):
                    continue
                idx = pending.popleft()
                try:
                    w.conn.send((idx, responses[idx], answers[idx], dict(metas[idx])))
                except (BrokenPipeError, EOFError, OSError):
                    pending.appendleft(idx)  # the worker was already dead; not the item's fault
                    self._replace(i, counts)
                    continue
                w.item, w.deadline = idx, now + self.timeout_s + self.kill_grace_s

            deadlines = [
                w.deadline if w.ready else w.started_at + self.startup_timeout_s
                for w in self._workers
            ]
            wait_s = max(0.0, min(deadlines) - time.monotonic())
            for conn in wait([w.conn for w in self._workers], timeout=wait_s):
                i = next(j for j, w in enumerate(self._workers) if w.conn is conn)
                w = self._workers[i]
                try:
                    msg = conn.recv()
                except (EOFError, OSError):
                    if w.item is not None:
                        finish(w.item, ERROR, 0.0, f"worker died (exit code {w.proc.exitcode})")
                    elif not w.ready:
                        startup_failures += 1
                    self._replace(i, counts)
                    continue
                if msg == ("ready",):
                    w.ready, startup_failures = True, 0
                    continue
                idx, status, value, message = msg
                finish(idx, status, value, message)
                w.item, w.deadline = None, math.inf

            now = time.monotonic()
            for i, w in enumerate(self._workers):
                if w.item is not None and now >= w.deadline:
                    finish(w.item, TIMEOUT, 0.0, "worker unresponsive past the hard deadline")
                    self._replace(i, counts)
                elif not w.ready and now >= w.started_at + self.startup_timeout_s:
                    startup_failures += 1
                    self._replace(i, counts)
            if startup_failures >= _STARTUP_FAILURES_BEFORE_GIVING_UP * len(self._workers):
                raise RuntimeError(
                    f"reward workers for {self.reward_fn!r} keep failing to start; check that "
                    f"the function imports in a fresh Python process"
                )

        for key, value in counts.items():
            self.total_counts[key] += value
        if errors:
            logger.warning("reward grading problems (%s): %s", counts, "; ".join(errors))
        return GradeResult(rewards=rewards, statuses=statuses, counts=counts, errors=errors)

    def close(self) -> None:
        """Stop the workers (idempotent)."""
        if self._workers is None:
            return
        for w in self._workers:
            try:
                w.conn.send(None)
            except (BrokenPipeError, EOFError, OSError):
                pass
        deadline = time.monotonic() + 2.0
        for w in self._workers:
            w.proc.join(timeout=max(0.0, deadline - time.monotonic()))
            w.kill()
        self._workers = None

    def __enter__(self) -> RewardGrader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


COUNT_NAMES = ("reward/graded", "reward/timeouts", "reward/errors", "reward/worker_restarts")
"""The keys of ``GradeResult.counts``."""


def _zero_counts() -> dict[str, int]:
    return dict.fromkeys(COUNT_NAMES, 0)
