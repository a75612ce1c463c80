"""megatron-erc plot: one run's dashboard, several runs overlaid with their labels (run
directories, LABEL=RUN_DIR, a directory of runs such as an ablation's), clear errors."""

from __future__ import annotations

import json

import pytest

from megatron_erc.cli import main
from megatron_erc.cli.plot import find_runs


def fake_run(d, acc: float, steps: int = 4):
    d.mkdir(parents=True)
    with open(d / "metrics.jsonl", "w") as f:
        for s in range(1, steps + 1):
            f.write(json.dumps({"step": s, "accuracy": acc * s, "val/accuracy": acc,
                                "erc/dropped_frac": 0.1, "time/step": 1.0}) + "\n")
    return d


def test_labels_of_runs_labelled_runs_and_a_directory_of_runs(tmp_path):
    a = fake_run(tmp_path / "abl" / "rl" / "dapo" / "seed0", 0.1)
    b = fake_run(tmp_path / "abl" / "rl" / "dapo_erc" / "seed0", 0.2)
    c = fake_run(tmp_path / "demo" / "rl", 0.05)
    assert find_runs([str(tmp_path / "abl" / "rl")]) == {"dapo/seed0": a, "dapo_erc/seed0": b}
    assert list(find_runs([str(a), str(c)])) == ["abl/rl/dapo/seed0", "demo/rl"]
    assert find_runs([f"base={a}", f"new={b}"]) == {"base": a, "new": b}
    assert list(find_runs([f"abl={tmp_path / 'abl' / 'rl'}", f"demo={c}"])) == [
        "abl/dapo/seed0", "abl/dapo_erc/seed0", "demo"]


def test_plot_command_overlays_runs_and_keeps_the_single_run_dashboard(tmp_path, capsys):
    a = fake_run(tmp_path / "a", 0.1)
    b = fake_run(tmp_path / "b", 0.2)
    out = tmp_path / "cmp.png"
    assert main(["plot", str(a), f"other={b}", "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out) and out.stat().st_size > 20_000
    assert main(["plot", str(a)]) == 0
    assert (a / "dashboard.png").stat().st_size > 20_000


@pytest.mark.parametrize("make", ["nothing", "same-label", "no-steps"])
def test_plot_mistakes_are_one_line_errors(tmp_path, capsys, make):
    a = fake_run(tmp_path / "x" / "rl", 0.1)
    args = {"nothing": [str(tmp_path / "missing")],
            "same-label": [f"r={a}", f"r={a}"],
            "no-steps": [str(a), str(fake_run(tmp_path / "y", 0.1, steps=0))]}[make]
    assert main(["plot", *args, "--out", str(tmp_path / "o.png")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("megatron-erc plot: data error: ") and len(err.splitlines()) == 1
