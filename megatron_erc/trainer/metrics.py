"""Per-step metrics: the loggers of ``run.loggers`` (``loggers.py``: metrics.jsonl,
TensorBoard, W&B offline, MLflow), written by global rank 0 only after the metrics are
reduced over ranks; the console line of each step; the end-of-run summary
(``summary.py``); and how each metric combines over ranks (``Reduce``)."""

from __future__ import annotations

import enum
import json
import sys
from pathlib import Path

from megatron_erc.algorithms import NON_ADDITIVE_METRICS, POLICY_LOSS_METRICS
from megatron_erc.rewards.pool import COUNT_NAMES
from megatron_erc.trainer.loggers import start_loggers


class MetricsWriter:
    """Every logger of ``loggers`` (started now: a failure is an error at start), fed with
    each step's metrics. ``enabled=False`` (ranks other than 0) starts and writes nothing."""

    def __init__(self, run_dir: str | Path, enabled: bool = True,
                 loggers=("jsonl", "tensorboard"), config: dict | None = None):
        self.enabled = enabled
        self.path = Path(run_dir) / "metrics.jsonl"
        self.loggers = []
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.loggers = start_loggers(loggers, Path(run_dir), config=config)

    def log(self, metrics: dict, step_key: str = "step") -> None:
        for logger in self.loggers:
            logger.log(metrics, step_key)

    def paths(self) -> dict[str, Path]:
        """Logger name -> where it writes."""
        return {logger.name: logger.path for logger in self.loggers}

    def close(self) -> None:
        loggers, self.loggers = self.loggers, []
        for logger in loggers:
            logger.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """All rows of ``metrics.jsonl`` (a torn last line from a killed run is skipped)."""
    rows = []
    for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


class Progress:
    """The console view of a run: one line per step (kept in logs) and, on a terminal, a
    tqdm bar below them with the step count, elapsed time and ETA. Rank 0 only."""

    def __init__(self, steps: int, start_step: int = 0, enabled: bool = True, file=None,
                 groups_per_step: int | None = None):
        from tqdm import tqdm

        self.steps, self.enabled = steps, enabled
        self.groups_per_step, self._explained = groups_per_step, False
        self._bar = tqdm(total=steps, initial=start_step, desc="[rl]", unit="step",
                         dynamic_ncols=True, leave=False, file=file,
                         disable=None if enabled else True)  # None: off unless a terminal

    def __call__(self, m: dict) -> None:
        if not self.enabled:
            return
        self._bar.write(progress_line(m, self.steps) + self._groups(m))
        sys.stdout.flush()
        if m.get("step", 0) > self._bar.n:
            self._bar.set_postfix(acc=f"{m.get('accuracy', 0):.1%}",
                                  erc_drop=f"{m.get('erc/dropped_frac', 0):.1%}", refresh=False)
            self._bar.update(m["step"] - self._bar.n)
            self._bar.refresh()  # a step takes seconds: never rate-limit the bar

    def _groups(self, m: dict) -> str:
        """`` groups K/N`` when dynamic sampling kept fewer groups than a full step (DAPO
        trains on them); the first time with one line saying what it means."""
        kept = m.get("dynamic_sampling/groups_kept")
        if kept is None or self.groups_per_step is None or kept >= self.groups_per_step:
            return ""
        note = ""
        if not self._explained:
            self._explained = True
            note = (f"\n[rl] note: groups {kept:.0f}/{self.groups_per_step}: dynamic sampling "
                    f"found only {kept:.0f} prompt groups with unequal rewards in "
                    "rollout.max_gen_batches rounds; a step trains on the groups it found "
                    "(none: the step is skipped)")
        return f"  groups {kept:.0f}/{self.groups_per_step}{note}"

    def close(self) -> None:
        self._bar.close()


def progress_line(m: dict, steps: int) -> str:
    val = f"  val_acc {m['val/accuracy']:.1%}" if "val/accuracy" in m else ""
    if m["step"] == 0:
        return f"[rl] step   0/{steps}  (before RL){val}"
    clip = m.get("clip/high_frac", 0.0) + m.get("clip/low_frac", 0.0)
    return (f"[rl] step {m['step']:3d}/{steps}  acc {m.get('accuracy', 0):.1%}  "
            f"reward {m.get('reward/mean', 0):+.3f}  erc_drop {m.get('erc/dropped_frac', 0):.1%}"
            f"  clip {clip:.2%}  grad_norm {m.get('grad_norm', 0):.2f}  "
            f"{m.get('time/step', 0):.1f}s{val}")


class Reduce(enum.Enum):
    """How a step metric combines over ranks (``reduce_metrics``)."""

    TOKEN_SUM = "token_sum"
    """Each rank holds its share of a global token-mean (divided by the global token count):
    the job's value is the sum."""
    MEAN = "mean"
    """Mean of the ranks' values."""
    MAX = "max"
    """The largest value (times: the slowest rank sets the pace; flags)."""
    QUANTILE = "quantile"
    """A per-rank quantile: averaged over ranks that have one (an approximation)."""
    SAME = "same"
    """Already the job's value, identical on every rank (computed from the global batch, or
    reduced by the optimizer): taken as is."""


def _declared() -> dict[str, Reduce]:
    same = ["reward/mean", "accuracy", "response/len_mean", "response/len_max",
            "response/clipped_frac", "dynamic_sampling/groups_kept", "dynamic_sampling/rounds",
            "grad_norm", "lr", "val/accuracy", *COUNT_NAMES,
            # trainer/moe_step.py: reduced over the job already
            "moe/aux_loss", "moe/z_loss", "moe/expert_load_max", "moe/expert_load_min",
            "moe/replay_misses"]
    slowest = ["time/generate", "time/score", "time/forward", "time/update", "time/sync",
               "time/step", "sync/seconds", "sync/bytes", "skipped_steps",
               "memory/offloaded_gib", "memory/trainer_freed_gib"]
    return {**{k: Reduce.SAME for k in same}, **{k: Reduce.MAX for k in slowest},
            **{k: Reduce.TOKEN_SUM for k in POLICY_LOSS_METRICS | {"loss"}},
            **{k: Reduce.QUANTILE for k in NON_ADDITIVE_METRICS},
            "tokens_per_s": Reduce.MEAN, "sync/gib_per_s": Reduce.MEAN}


REDUCTIONS: dict[str, Reduce] = {}
"""Every step metric's reduction over ranks (filled on first use; see ``reduction``)."""


def reduction(name: str) -> Reduce:
    """The declared reduction of metric ``name``; an undeclared metric is a programming error
    (a new metric must say how it combines over ranks)."""
    if not REDUCTIONS:
        REDUCTIONS.update(_declared())
    try:
        return REDUCTIONS[name]
    except KeyError:
        raise KeyError(f"metric {name!r} declares no reduction over ranks: add it to "
                       "megatron_erc/trainer/metrics.py") from None


def combine(name: str, values: list[float]) -> float:
    """The job's value of metric ``name`` from every rank's value (``reduction(name)``)."""
    how = reduction(name)
    if how is Reduce.TOKEN_SUM:
        return float(sum(values))
    if how is Reduce.MAX:
        return float(max(values))
    if how is Reduce.SAME:
        return float(values[0])
    finite = [v for v in values if v == v]  # quantiles of ranks without tokens are NaN
    return float(sum(finite) / len(finite)) if finite else float("nan")


def reduce_metrics(m: dict, *, dp_group, pp_group) -> dict:
    """Step metrics of the whole job. Loss metrics exist on the last pipeline stage only:
    they are first copied to the other stages over ``pp_group``; then every metric is
    combined over ``dp_group`` by its declared reduction."""
    import torch.distributed as dist

    if dist.get_world_size(pp_group) > 1:
        last = [m]
        dist.broadcast_object_list(last, src=dist.get_global_rank(
            pp_group, dist.get_world_size(pp_group) - 1), group=pp_group)
        m = {**last[0], **m}
    for k in m:
        reduction(k)  # fail on an undeclared metric at any DP size
    if dist.get_world_size(dp_group) == 1:
        return dict(m)
    gathered = [None] * dist.get_world_size(dp_group)
    dist.all_gather_object(gathered, dict(m), group=dp_group)
    keys = sorted({k for g in gathered for k in g})
    return {k: combine(k, [g[k] for g in gathered if k in g]) for k in keys}
