"""Every user mistake ends in one clear message, on every rank, without a traceback.

Each case runs a command with one bad input and asserts exit code 2, the message (what,
where, what to do), that it is printed once, and that no traceback appears. Mistakes caught
by the checks at start run in this process through the CLI's ``main`` (they stop before any
process group or model exists); a few run as real processes: a one-rank launch, the resume
that skips a damaged checkpoint, and two-rank ``torchrun`` launches, where one rank's
problem must stop both ranks with a single report and no hang.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys

import pytest

from tests.e2e.test_train import CONFIG, REPO, env, task  # noqa: F401

pytestmark = pytest.mark.xdist_group("user_errors")  # one worker: shared fixtures built once
SFT_CONFIG = REPO / "examples" / "tiny" / "sft.yaml"
PLUGINS = "tests.e2e.user_error_plugins"


def base(task, run_dir, *extra: str) -> list[str]:  # noqa: F811
    return [f"run.dir={run_dir}", "run.steps=2", f"model.path={task / 'init'}",
            f"model.tokenizer={task / 'tokenizer.model'}",
            f"data.path={task / 'data' / 'train.jsonl'}", "validation.path=null",
            "rollout.engine=embedded", "rollout.prompts_per_step=2", "rollout.n=2",
            "rollout.max_response_tokens=4", "run.micro_batch_size=4",
            "run.updates_per_rollout=1", "rollout.reward_fn=tests.e2e.rewards:parity_reward",
            *extra]


def assert_reported(rc: int, out: str, err: str, command: str, kind: str, *needles: str):
    """Exit code 2, one ``megatron-erc CMD: KIND error:`` line holding ``needles``, no
    traceback anywhere."""
    assert rc == 2, (rc, out[-2000:], err[-4000:])
    assert "Traceback" not in out + err, err[-4000:]
    lines = re.findall(rf"^megatron-erc {command}: {kind} error: .*$", err, re.MULTILINE)
    assert len(lines) == 1, err[-4000:]
    for needle in needles:
        assert needle in err, (needle, err[-4000:])


@pytest.fixture(scope="module")
def bad(tmp_path_factory, task):  # noqa: F811
    """Broken inputs: prompt files, model directories."""
    root = tmp_path_factory.mktemp("bad")
    (root / "malformed.jsonl").write_text('{"prompt": "a", "answer": "1"}\n'
                                         '{"prompt": "b", "answer": \n')
    (root / "no_answer.jsonl").write_text('{"prompt": "a", "answer": "1"}\n{"prompt": "b"}\n')
    (root / "empty.jsonl").write_text("")
    (root / "no_config").mkdir()
    (root / "no_config" / "model.safetensors").write_bytes(b"")
    config = json.loads((task / "init" / "config.json").read_text())
    (root / "config_only").mkdir()
    shutil.copy(task / "init" / "config.json", root / "config_only")
    (root / "small_vocab").mkdir()
    (root / "small_vocab" / "config.json").write_text(json.dumps({**config, "vocab_size": 100}))
    (root / "small_vocab" / "model.safetensors").write_bytes(b"")  # never read: checks stop
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory, task):  # noqa: F811
    """A run directory with the complete checkpoints of steps 1 and 2 (a real run)."""
    run_dir = tmp_path_factory.mktemp("trained")
    proc = subprocess.run([sys.executable, "-m", "megatron_erc.cli", "train", "--config",
                           str(CONFIG), *base(task, run_dir, "checkpoint.every=1")],
                          cwd=REPO, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return run_dir


def damaged_copy(trained, tmp_path, *steps: int):
    """A copy of the run whose checkpoints ``steps`` have a truncated trainer_state.pt."""
    run_dir = tmp_path / "run"
    shutil.copytree(trained, run_dir)
    for step in steps:
        state = run_dir / "checkpoints" / f"step_{step:08d}" / "trainer_state.pt"
        state.write_bytes(state.read_bytes()[:100])
    return run_dir


# ---------------------------------------------------------------- in this process, 1 rank
def in_process_cases(task, bad, trained, tmp_path):  # noqa: F811
    """``name: (argv, command, kind, needles)``; a function so fixtures fill in paths."""
    def t(*extra):
        return ["train", "--config", str(CONFIG), *base(task, tmp_path / "r", *extra)]

    def ev(*extra):
        return ["eval", "--config", str(CONFIG), *base(task, tmp_path / "r", *extra)]

    def sft(*extra):
        return ["sft", "--config", str(SFT_CONFIG), f"run.dir={tmp_path / 's'}",
                f"model.path={task / 'init'}", f"model.tokenizer={task / 'tokenizer.model'}",
                f"data.path={task / 'data' / 'train.jsonl'}", *extra]

    ckpt = trained / "checkpoints"
    hf = ["convert", "hf-to-megatron", "--out", str(tmp_path / "converted")]
    blocked = tmp_path / "blocked"  # a run dir where MLflow's store cannot be created
    blocked.mkdir()
    (blocked / "mlruns").write_text("a file, not the store's directory")
    return {
        "unknown logger": (t("run.loggers=[jsonl,neptune]"), "train", "config",
                           ["run.loggers=['jsonl', 'neptune']"]),
        "logger that cannot start": (
            ["train", "--config", str(CONFIG), *base(task, blocked, "run.loggers=[mlflow]")],
            "train", "config", ["run.loggers: mlflow failed to start in"]),
        "unknown config field": (t("algo.erc.lowww=0.9"), "train", "config",
                                 ["algo.erc.lowww"]),
        "config file missing": (["train", "--config", str(tmp_path / "nope.yaml")], "train",
                                "config", ["nope.yaml: no such file"]),
        "train without data": (t("data=null"), "train", "config", ["train needs data.path"]),
        "data file missing": (t(f"data.path={bad / 'nope.jsonl'}"), "train", "data",
                              ["data.path: prompt file", "nope.jsonl' does not exist"]),
        "malformed JSON line": (t(f"data.path={bad / 'malformed.jsonl'}"), "train", "data",
                                ["malformed.jsonl:2: invalid JSON"]),
        "record without answer": (t(f"data.path={bad / 'no_answer.jsonl'}"), "train", "data",
                                  ["no_answer.jsonl:2: missing field 'answer'",
                                   "data.answer_field"]),
        "empty prompt file": (t(f"data.path={bad / 'empty.jsonl'}"), "train", "data",
                              ["empty.jsonl: contains no prompts"]),
        "every prompt too long": (t("data.max_prompt_tokens=3"), "train", "data",
                                  ["all 4000 prompts are longer than max_prompt_tokens=3",
                                   "data.overlong=truncate_left"]),
        "validation file missing": (t(f"validation.path={bad / 'val.jsonl'}"), "train",
                                    "data", ["validation.path: prompt file"]),
        "model path missing": (t(f"model.path={bad / 'nope'}"), "train", "model",
                               ["model.path=", "nope: no such directory"]),
        "model dir without config.json": (t(f"model.path={bad / 'no_config'}"), "train",
                                          "model", ["no_config has no config.json"]),
        "forgotten model.path (no weights)": (t("model.path=examples/tiny"), "train", "model",
                                              ["no safetensors weights",
                                               "model.random_init=true"]),
        "random init, model vocab past the tokenizer": (
            t("model.path=examples/tiny", "model.random_init=true"), "train", "model",
            ["a random model samples ids the tokenizer cannot decode",
             "set vocab_size to 320"]),
        "tokenizer missing": (t(f"model.tokenizer={bad / 'tok.model'}"), "train", "model",
                              ["model.tokenizer=", "tok.model: no such file"]),
        "tokenizer directory without tokenizer": (t(f"model.tokenizer={task / 'init'}"),
                                                  "train", "model", ["no tokenizer files"]),
        "tokenizer larger than the model vocab": (t(f"model.path={bad / 'small_vocab'}"),
                                                  "train", "model",
                                                  ["model's vocab_size is 100"]),
        "tp not dividing the heads": (t("parallel.tp=3"), "train", "layout",
                                      ["parallel.tp=3 must divide", "parallel.tp in [1, 2]"]),
        "pp not dividing the layers": (t("parallel.pp=3"), "train", "layout",
                                       ["4 layers", "pp * parallel.vpp = 3"]),
        "rollout.tp larger than the world": (t("rollout.engine=auto", "rollout.tp=2"),
                                             "train", "layout",
                                             ["rollout.tp=2 must divide the number of ranks"]),
        "reward module not importable": (t("rollout.reward_fn=no_such_pkg.rewards:score"),
                                         "train", "plugin",
                                         ["cannot import module 'no_such_pkg.rewards'"]),
        "reward function missing": (t(f"rollout.reward_fn={PLUGINS}:nope"), "train",
                                    "plugin", ["has no attribute 'nope'"]),
        "reward function without **meta": (t(f"rollout.reward_fn={PLUGINS}:no_meta_reward"),
                                           "train", "plugin", ["add '**meta'"]),
        "resume path missing": (t(f"checkpoint.resume={ckpt / 'step_00000009'}"), "train",
                                "checkpoint", ["step_00000009: no such directory",
                                               "checkpoint.resume=auto"]),
        "resume a checkpoints root": (t(f"checkpoint.resume={ckpt}"), "train", "checkpoint",
                                      ["is a directory of checkpoints"]),
        "eval without validation.path": (ev(), "eval", "config",
                                         ["eval needs validation.path"]),
        "eval on a malformed file": (ev(f"validation.path={bad / 'malformed.jsonl'}"), "eval",
                                     "data", ["validation.path:", "malformed.jsonl:2"]),
        "eval with a model dir without config.json": (
            ev(f"validation.path={task / 'data' / 'val.jsonl'}",
               f"model.path={bad / 'no_config'}"), "eval", "model", ["has no config.json"]),
        "sft data without its target field": (sft("target_field=solution"), "sft", "data",
                                              [":1: no target field 'solution'"]),
        "sft example longer than seq_len": (sft("run.seq_len=8"), "sft", "data",
                                            ["more than run.seq_len + 1 = 9"]),
        "sft without data": (sft("data=null"), "sft", "config", ["sft needs data.path"]),
        "convert: HF dir missing": ([*hf, "--hf-dir", str(bad / "nope")], "convert", "model",
                                    ["--hf-dir=", "nope: no such directory"]),
        "convert: HF dir without config.json": ([*hf, "--hf-dir", str(bad / "no_config")],
                                                "convert", "model", ["has no config.json"]),
        "convert: tp not dividing the heads": ([*hf, "--hf-dir", str(task / "init"),
                                                "--tp", "3"], "convert", "layout",
                                               ["--tp 3 must divide the attention heads (4)"]),
        "convert: output exists": ([*hf[:2], "--out", str(task), "--hf-dir",
                                    str(task / "init")], "convert", "checkpoint",
                                   ["already exists; pass --force"]),
        "convert: checkpoint missing": (["convert", "megatron-to-hf", "--ckpt",
                                         str(bad / "nope"), "--out", str(tmp_path / "hf")],
                                        "convert", "checkpoint", ["no such directory"]),
        "convert: a checkpoints root": (["convert", "megatron-to-hf", "--ckpt", str(ckpt),
                                         "--out", str(tmp_path / "hf")], "convert",
                                        "checkpoint", ["pass one of them",
                                                       "step_00000002"]),
    }


def test_mistakes_caught_at_start(task, bad, trained, tmp_path, capsys):  # noqa: F811
    from megatron_erc.cli import main

    failures = []
    for name, (argv, command, kind, needles) in in_process_cases(task, bad, trained,
                                                                 tmp_path).items():
        rc = main(argv)
        out, err = capsys.readouterr()
        try:
            assert_reported(rc, out, err, command, kind, *needles)
        except AssertionError as e:
            failures.append(f"{name}: {e}")
    assert not failures, "\n".join(failures)
    assert not (tmp_path / "r").exists(), "a check must stop the run before it starts"


def test_damaged_checkpoints_are_named(trained, task, tmp_path, capsys):  # noqa: F811
    from megatron_erc.cli import main

    run_dir = damaged_copy(trained, tmp_path, 2)
    step2 = run_dir / "checkpoints" / "step_00000002"
    argv = ["train", "--config", str(CONFIG),
            *base(task, run_dir, f"checkpoint.resume={step2}")]
    assert_reported(main(argv), *capsys.readouterr(), "train", "checkpoint",
                    f"{step2 / 'trainer_state.pt'} has 100 bytes where",
                    "use an intact one", "step_00000001")
    convert = ["convert", "megatron-to-hf", "--ckpt", str(step2), "--out", str(tmp_path / "h")]
    assert_reported(main(convert), *capsys.readouterr(), "convert", "checkpoint",
                    "is damaged", "trainer_state.pt has 100 bytes")
    (step2 / "COMPLETE").unlink()  # an interrupted save
    assert_reported(main(argv), *capsys.readouterr(), "train", "checkpoint",
                    "not a complete training checkpoint (no valid COMPLETE marker")


def test_genuine_bug_keeps_its_traceback(monkeypatch, task, tmp_path):  # noqa: F811
    import megatron_erc.trainer.run as run
    from megatron_erc.cli import main

    def broken(cfg):
        raise KeyError("a bug")

    monkeypatch.setattr(run, "run_train", broken)
    with pytest.raises(KeyError, match="a bug"):
        main(["train", "--config", str(CONFIG), *base(task, tmp_path)])


# ---------------------------------------------------------------- real processes
def launch(command: str, args: list[str], nproc: int = 1, timeout: int = 300):
    cmd = [sys.executable, "-m", "megatron_erc.cli", command, *args]
    if nproc > 1:
        cmd[1:3] = ["-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--standalone",
                    "-m", "megatron_erc.cli"]
    return subprocess.run(cmd, cwd=REPO, env=env(), capture_output=True, text=True,
                          timeout=timeout)


def assert_reported_by_torchrun(proc, command: str, kind: str, *needles: str):
    """One report for the job, ranks exit 2 without tracebacks; torchrun's own failure
    summary (its ChildFailedError traceback) shows the message too."""
    err = proc.stdout + proc.stderr
    assert proc.returncode != 0, err[-4000:]
    blocks = err.split("Traceback (most recent call last):")[1:]
    assert all("raise ChildFailedError(" in b for b in blocks), err[-6000:]  # torchrun's
    assert "exitcode  : 2" in err, err[-4000:]
    lines = re.findall(rf"^megatron-erc {command}: {kind} error: .*$", err, re.MULTILINE)
    assert len(lines) == 1, err[-6000:]
    for needle in needles:
        assert needle in lines[0], (needle, err[-4000:])
    assert f"traceback : megatron-erc {command}: {kind} error" in err  # the summary


def test_one_rank_process_exits_2_without_traceback(task, bad, tmp_path):  # noqa: F811
    proc = launch("train", ["--config", str(CONFIG),
                            *base(task, tmp_path, f"data.path={bad / 'malformed.jsonl'}")])
    assert_reported(proc.returncode, proc.stdout, proc.stderr, "train", "data",
                    "malformed.jsonl:2: invalid JSON")
    proc = launch("convert", ["hf-to-megatron", "--hf-dir", str(task / "init"), "--out",
                              str(tmp_path / "c"), "--pp", "3"])
    assert_reported(proc.returncode, proc.stdout, proc.stderr, "convert", "layout",
                    "--pp 3 must divide the 4 layers")


def test_random_init_only_when_asked(task, bad, tmp_path):  # noqa: F811
    """The case a forgotten model.path used to fall into, now on purpose: config.json only."""
    proc = launch("train", ["--config", str(CONFIG), *base(
        task, tmp_path, f"model.path={bad / 'config_only'}", "model.random_init=true",
        "run.steps=1")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step   1/1" in proc.stdout


def test_resume_auto_skips_a_damaged_newest_checkpoint(trained, task, tmp_path):  # noqa: F811
    run_dir = damaged_copy(trained, tmp_path, 2)
    proc = launch("train", ["--config", str(CONFIG),
                            *base(task, run_dir, "checkpoint.resume=auto")])
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "step_00000002 is damaged" in proc.stderr and "skipping it" in proc.stderr
    assert "resumed from step 1" in proc.stdout
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 2]  # step 2 trained again, from step 1
    assert rows[2]["grad_norm"] == pytest.approx(rows[1]["grad_norm"], rel=1e-6)


@pytest.mark.parametrize("case", ["world_vs_pp", "eval_val_missing", "sft_target_missing",
                                  "import_fails_on_rank_1"])
def test_two_ranks_report_once(case, task, bad, tmp_path):  # noqa: F811
    train = ["--config", str(CONFIG)]
    if case == "world_vs_pp":
        proc = launch("train", [*train, *base(task, tmp_path, "parallel.pp=4")], nproc=2)
        assert_reported_by_torchrun(proc, "train", "layout",
                                    "world size 2 is not a multiple of parallel.tp * "
                                    "parallel.pp = 1 * 4 = 4")
    elif case == "eval_val_missing":
        proc = launch("eval", [*train, *base(task, tmp_path,
                                             f"validation.path={bad / 'val.jsonl'}")], nproc=2)
        assert_reported_by_torchrun(proc, "eval", "data", "validation.path: prompt file")
    elif case == "sft_target_missing":
        proc = launch("sft", ["--config", str(SFT_CONFIG), f"run.dir={tmp_path}",
                              f"model.path={task / 'init'}",
                              f"model.tokenizer={task / 'tokenizer.model'}",
                              f"data.path={task / 'data' / 'train.jsonl'}",
                              "target_field=solution"], nproc=2)
        assert_reported_by_torchrun(proc, "sft", "data", "no target field 'solution'")
    else:  # only rank 1 sees it: rank 0 reports it for rank 1, neither waits for the other
        proc = launch("train", [*train, *base(task, tmp_path,
                                              f"rollout.reward_fn={PLUGINS}:parity_reward")],
                      nproc=2)
        assert_reported_by_torchrun(proc, "train", "plugin", "[rank 1] rollout.reward_fn=",
                                    "No module named 'megatron_erc_package_missing")
        assert "[rank 0]" not in proc.stderr


def test_two_ranks_stop_together_after_start(trained, task, tmp_path):  # noqa: F811
    """Every checkpoint damaged with resume=auto: found after the model and engines exist
    (rank 0 looks, every rank learns); both ranks tear down and exit, nothing hangs."""
    run_dir = damaged_copy(trained, tmp_path, 1, 2)
    proc = launch("train", ["--config", str(CONFIG),
                            *base(task, run_dir, "checkpoint.resume=auto")], nproc=2)
    assert_reported_by_torchrun(proc, "train", "checkpoint",
                                "every complete checkpoint under", "is damaged")
