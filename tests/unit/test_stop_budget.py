"""The run's record of step and save times against the stop signal's lead time."""

from __future__ import annotations

import json

from megatron_erc.trainer.stop_budget import LEAD_ENV, StopBudget


def test_records_timings_and_warns_once_when_the_lead_is_too_short(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(LEAD_ENV, "100")
    budget = StopBudget(tmp_path, enabled=True)
    budget.step(30.0)
    budget.step(50.0)
    budget.step(40.0)
    budget.save(20.0)  # 50 + 20 fits in 100
    t = json.loads((tmp_path / "timings.json").read_text())
    assert t == {"longest_step_s": 50.0, "last_save_s": 20.0, "stop_lead_s": 100.0,
                 "needed_s": 70.0}
    assert "WARNING" not in capsys.readouterr().out
    budget.save(60.0)  # 50 + 60 does not
    budget.save(70.0)
    out = capsys.readouterr().out
    assert out.count("WARNING") == 1 and "--signal=B:USR1@" in out


def test_other_ranks_write_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv(LEAD_ENV, raising=False)
    budget = StopBudget(tmp_path, enabled=False)
    budget.step(1.0)
    budget.save(1.0)
    assert not (tmp_path / "timings.json").exists()
