"""The console progress view: per-step lines on stdout, a tqdm bar only on a terminal."""

import io

from megatron_erc.trainer.metrics import Progress


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def _step(i):
    return {"step": i, "accuracy": 0.25, "reward/mean": 0.5, "erc/dropped_frac": 0.1,
            "time/step": 1.0}


def test_bar_on_a_terminal_counts_steps_and_lines_go_to_stdout(capsys):
    term = _Terminal()
    p = Progress(10, start_step=2, file=term)
    p({"step": 0, "val/accuracy": 0.5})  # validation before RL: a line, no bar movement
    p(_step(3))
    p(_step(4))
    p.close()
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("[rl] step   0/10") and "val_acc 50.0%" in out[0]
    assert [line.split()[2] for line in out[1:]] == ["3/10", "4/10"]
    bar = term.getvalue()
    assert "4/10" in bar and "5/10" not in bar and "erc_drop=10.0%" in bar


def test_no_bar_off_a_terminal_and_nothing_on_other_ranks(capsys):
    pipe = io.StringIO()
    Progress(10, file=pipe)(_step(1))
    assert pipe.getvalue() == ""
    assert capsys.readouterr().out.startswith("[rl] step   1/10")
    Progress(10, enabled=False, file=pipe)(_step(2))
    assert capsys.readouterr().out == "" and pipe.getvalue() == ""


def test_steps_short_of_groups_say_so_on_their_line_and_explain_once(capsys):
    p = Progress(10, groups_per_step=16, file=io.StringIO())
    for kept in (16.0, 12.0, 9.0):
        p({**_step(1), "dynamic_sampling/groups_kept": kept})
    p.close()
    out = capsys.readouterr().out.splitlines()
    assert "groups" not in out[0]
    assert out[1].endswith("  groups 12/16") and out[3].endswith("  groups 9/16")
    assert out[2].startswith("[rl] note: groups 12/16: dynamic sampling found only 12 prompt")
    assert len(out) == 4
