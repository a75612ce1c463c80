"""Is the stop signal's lead time long enough? Measured step and save times against it.

On Slurm the job gets USR1 ``--signal=B:USR1@LEAD`` seconds before its time limit; the ranks
then finish their current generation round or update, save and exit. That only works when
LEAD exceeds the longest step plus a checkpoint save. ``slurm/train.sbatch`` passes its lead
time as ``MEGATRON_ERC_STOP_LEAD_S``; the run writes ``RUN_DIR/timings.json`` (the longest step
and the last save, in seconds) after every save and warns once when they do not fit.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

LEAD_ENV = "MEGATRON_ERC_STOP_LEAD_S"
STOP_FILE_ENV = "MEGATRON_ERC_STOP_FILE"
"""A path every rank checks between generation rounds and updates: once it exists, the run
saves and exits as on SIGTERM (how ``slurm/train.sbatch`` stops its ranks)."""


class StopBudget:
    """Rank 0's record of step and save times (``enabled=False`` on other ranks)."""

    def __init__(self, run_dir: Path, enabled: bool):
        self.path, self.enabled = Path(run_dir) / "timings.json", enabled
        lead = os.environ.get(LEAD_ENV)
        self.lead_s = float(lead) if lead else None
        self.step_s = self.save_s = 0.0
        self._warned = False

    def step(self, seconds: float) -> None:
        self.step_s = max(self.step_s, seconds)

    def save(self, seconds: float) -> None:
        self.save_s = seconds
        if not self.enabled:
            return
        need = self.step_s + self.save_s
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"longest_step_s": round(self.step_s, 3),
                                   "last_save_s": round(self.save_s, 3),
                                   "stop_lead_s": self.lead_s, "needed_s": round(need, 3)}))
        tmp.replace(self.path)
        if self.lead_s is not None and need > self.lead_s and not self._warned:
            self._warned = True
            print(f"[train] WARNING: a stop before the time limit needs about {need:.0f} s "
                  f"(longest step {self.step_s:.0f} s + save {self.save_s:.0f} s) but the stop "
                  f"signal comes {self.lead_s:.0f} s before it: a time-limit stop would not "
                  f"save. Submit with --signal=B:USR1@{int(need * 1.5) + 60} and "
                  f"{LEAD_ENV}={int(need * 1.5) + 60}.", flush=True)
