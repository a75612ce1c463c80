"""Does ERC stabilise off-policy RL, and how does it compare with its rivals? Ablation v2:
DAPO, DAPO+ERC at three bands, GPPO, GPPO+ERC, DAPO+Clip-Cov, DAPO+KL-Cov, CISPO and DPPO, at
2 and 8 updates per rollout, several seeds, from one shared supervised warm start
(``docs/ablation.md``).

    python -m megatron_erc.studies.ablation run --out runs/ablation  # SFT, 10 x 2 x 5 RL runs
    python -m megatron_erc.studies.ablation report --out runs/ablation  # docs/ablation.md + PNGs

Every RL run is its own process (megatron's parallel state is process-global); finished
runs are skipped when ``run`` is repeated, so an interrupted ablation resumes where it
stopped. The runner records the git commit and the exact commands in ``manifest.json``.
The variants and paths are in ``ablation_spec.py``, the report in ``ablation_report.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shlex
import subprocess
import sys
import time
import warnings

from megatron_erc.studies.ablation_report import write_report
from megatron_erc.studies.ablation_spec import (
    CONFIG,
    MODULE,
    REGIMES,
    REPO,
    SFT_CONFIG,
    SFT_OVERRIDES,
    SFT_STEPS,
    TASK,
    VARIANTS,
    rel,
    run_dir,
)

QUICK = {"seeds": [0], "steps": 4, "sft_steps": 40, "variants": ["dapo", "dapo_erc_095"]}
DEFAULTS = {"seeds": [0, 1, 2, 3, 4], "steps": 25, "sft_steps": SFT_STEPS,
            "variants": list(VARIANTS)}


def git_commit() -> dict:
    def git(*args):
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout
    return {"commit": git("rev-parse", "HEAD").strip() or "unknown",
            "dirty_files": [ln[3:] for ln in git("status", "--porcelain").splitlines()
                            if ln[3:].startswith(("megatron_erc/", "examples/ablation/"))]}


def _env(threads: int) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads),
                MKL_NUM_THREADS=str(threads))


def rl_overrides(root: pathlib.Path, regime: str, variant: str, seed: int, steps: int,
                 extra: list[str]) -> list[str]:
    task = root / "task"
    return [f"run.dir={run_dir(root, regime, variant, seed)}", f"run.seed={seed}",
            f"run.steps={steps}", f"model.path={root / 'sft' / 'hf'}",
            f"model.tokenizer={task / 'tokenizer.model'}",
            f"data.path={task / 'data' / 'train.jsonl'}",
            f"validation.path={task / 'data' / 'val.jsonl'}", *REGIMES[regime],
            *VARIANTS[variant], *extra]


def prepare_task(root: pathlib.Path, seed: int = 0) -> None:
    """The miniature's task files, tokenizer and random-init model under ``root``
    (``ablation_spec.TASK``): the demo's preparation with + and - only, bare ``"3 + 4 = "``
    prompts, answer-only targets and more validation prompts."""
    from megatron_erc.cli.demo import write_task  # torch and transformers: only to prepare
    from megatron_erc.data.arithmetic import generate_problems

    ops, digits = TASK["ops"], TASK["difficulty"]
    train = generate_problems(TASK["n_train"], seed=seed, difficulty=digits, ops=ops)
    val = generate_problems(TASK["n_val"], seed=seed + 10_000, difficulty=digits, ops=ops)
    write_task(root, train, val, prompt=lambda p: TASK["prompt"].format(a=p.a, op=p.op, b=p.b),
               target=lambda p: p.short_target, vocab_size=TASK["vocab_size"], seed=seed)


def warm_start(root: pathlib.Path, sft_steps: int, sft_extra: list[str], threads: int) -> list:
    """Task + tokenizer + random init, then one SFT run every RL run starts from."""
    cmds = []
    if not (root / "task" / "init").exists():
        print(f"[ablation] preparing the task in {root / 'task'}", flush=True)
        prepare_task(root / "task", seed=0)
    task = root / "task"
    sft = [sys.executable, "-m", "megatron_erc.cli", "sft", "--config", str(SFT_CONFIG),
           f"run.dir={root / 'sft'}", f"run.steps={sft_steps}", "run.seed=0",
           f"model.path={task / 'init'}", f"model.tokenizer={task / 'tokenizer.model'}",
           f"data.path={task / 'data' / 'train.jsonl'}", *SFT_OVERRIDES, *sft_extra]
    cmds.append(shlex.join(sft))
    if not (root / "sft" / "hf" / "config.json").exists():
        print(f"[ablation] SFT warm start ({sft_steps} steps)", flush=True)
        t0 = time.time()
        with open(root / "sft.log", "w") as log:
            subprocess.run(sft, cwd=REPO, env=_env(threads), stdout=log,
                           stderr=subprocess.STDOUT, check=True)
        (root / "sft" / "seconds.json").write_text(json.dumps(round(time.time() - t0, 1)))
    return cmds


def run_ablation(root: pathlib.Path, seeds: list[int], steps: int, sft_steps: int,
                 variants: list[str], extra: list[str], sft_extra: list[str],
                 jobs: int = 2, command: str | None = None,
                 regimes: list[str] | None = None) -> dict:
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    threads = max(1, (os.cpu_count() or 2) // jobs)
    regimes = list(REGIMES) if regimes is None else regimes
    manifest = {"code": git_commit(),
                "command": command or f"python -m {MODULE} run",
                "config": rel(CONFIG),
                "seeds": seeds, "steps": steps, "sft_steps": sft_steps, "variants": variants,
                "regimes": {r: REGIMES[r] for r in regimes},
                "extra_overrides": extra, "started": time.strftime("%Y-%m-%d %H:%M:%S UTC",
                                                                    time.gmtime())}
    manifest["sft_command"] = warm_start(root, sft_steps, sft_extra, threads)
    secs = root / "sft" / "seconds.json"
    manifest["sft_seconds"] = json.loads(secs.read_text()) if secs.exists() else None
    # seed-major order: if the budget runs out, every variant and regime has the same seeds
    queue = [(r, v, s) for s in seeds for r in regimes for v in variants]
    running: list[tuple] = []
    runs = manifest["runs"] = {}

    inv = {k: manifest[k] for k in ("command", "code", "started")} | {"jobs": jobs, "ran": []}
    manifest["invocations"] = _previous_invocations(root) + [inv]

    def save_manifest():  # after every run, so a cut-short ablation still reports its code
        inv.update(total_seconds=round(time.time() - t0, 1),
                   finished=time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()))
        manifest.update(total_seconds=inv["total_seconds"], jobs=jobs, finished=inv["finished"])
        (root / "manifest.json").write_text(json.dumps(manifest, indent=2))

    save_manifest()
    while queue or running:
        while queue and len(running) < jobs:
            r, v, s = queue.pop(0)
            d, key = run_dir(root, r, v, s), f"{r}/{v}/seed{s}"
            cmd = [sys.executable, "-m", MODULE, "train-one", "--config",
                   str(CONFIG), *rl_overrides(root, r, v, s, steps, extra)]
            runs[key] = {"regime": r, "variant": v, "seed": s, "dir": str(d),
                         "command": shlex.join(cmd)}
            if (d / "done.json").exists():
                runs[key].update(json.loads((d / "done.json").read_text()))
                continue
            if d.exists():  # a killed attempt: start it again from scratch
                subprocess.run(["rm", "-rf", str(d)], check=True)
            d.mkdir(parents=True)
            log = open(d / "train.log", "w")  # noqa: SIM115 - closed when it exits
            proc = subprocess.Popen(cmd, cwd=REPO, env=_env(threads), stdout=log,
                                    stderr=subprocess.STDOUT)
            running.append((key, d, proc, log, time.time()))
            print(f"[ablation] started {key}", flush=True)
        time.sleep(2)
        for item in list(running):
            key, d, proc, log, start = item
            if proc.poll() is None:
                continue
            running.remove(item)
            log.close()
            if proc.returncode != 0:
                for _, _, other, _, _ in running:  # leave no orphan behind
                    other.terminate()
                tail = (d / "train.log").read_text()[-3000:]
                raise RuntimeError(f"{key} failed ({proc.returncode}):\n{tail}")
            done = {"seconds": round(time.time() - start, 1)}
            (d / "done.json").write_text(json.dumps(done))
            runs[key].update(done)
            inv["ran"].append(key)
            print(f"[ablation] finished {key} in {done['seconds']} s", flush=True)
            save_manifest()
    save_manifest()
    return manifest


def _previous_invocations(root: pathlib.Path) -> list[dict]:
    """Earlier ``run`` calls on the same directory (a resumed or extended ablation)."""
    path = root / "manifest.json"
    if not path.exists():
        return []
    old = json.loads(path.read_text())
    if "invocations" in old:
        return old["invocations"]
    return [{k: old.get(k) for k in ("command", "code", "started", "finished", "total_seconds",
                                     "jobs")} | {"ran": [k for k, r in old.get("runs", {}).items()
                                                          if "seconds" in r]}]


def train_one(config: str, overrides: list[str]) -> None:
    """One RL run with step-0 validation of the warm start (the CLI has none)."""

    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core.*")
    from megatron_erc.config import load_config
    from megatron_erc.trainer.config import TrainConfig
    from megatron_erc.trainer.run import run_train

    run_train(load_config(TrainConfig, config, overrides), validate_first=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="warm start + every regime x variant x seed (resumable)")
    run.add_argument("--out", default="runs/ablation")
    run.add_argument("--quick", action="store_true",
                     help=f"smoke setting: {QUICK} unless given explicitly")
    run.add_argument("--seeds", type=int, nargs="+")
    run.add_argument("--steps", type=int, help=f"RL steps per run (default {DEFAULTS['steps']})")
    run.add_argument("--sft-steps", type=int,
                     help=f"warm-start SFT steps (default {DEFAULTS['sft_steps']})")
    run.add_argument("--variants", nargs="+", choices=list(VARIANTS),
                     help="default: all (--quick: dapo dapo_erc_095)")
    run.add_argument("--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES),
                     help="updates per rollout: u2, u8 (both by default)")
    run.add_argument("--jobs", type=int, default=2,
                     help="RL runs in parallel (2 on a 2-core machine: one thread each)")
    run.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="extra overrides for every RL run, e.g. optim.lr=5e-4")
    run.add_argument("--sft-set", nargs="*", default=[], metavar="KEY=VALUE",
                     help="extra overrides for the SFT warm start")
    run.add_argument("--report", metavar="DOCS_DIR",
                     help="also write the report (DOCS_DIR/ablation.md + DOCS_DIR/ablation/)")
    rep = sub.add_parser("report", help="write ablation.md and plots from a finished run")
    rep.add_argument("--out", default="runs/ablation")
    rep.add_argument("--docs", default=str(REPO / "docs"))
    one = sub.add_parser("train-one", help=argparse.SUPPRESS)
    one.add_argument("--config", required=True)
    one.add_argument("overrides", nargs="*")
    argv = sys.argv[1:] if argv is None else argv
    args = p.parse_args(argv)
    if args.command == "train-one":
        train_one(args.config, args.overrides)
        return 0
    if args.command == "run":
        defaults = QUICK if args.quick else DEFAULTS
        m = run_ablation(pathlib.Path(args.out), args.seeds or defaults["seeds"],
                         args.steps or defaults["steps"],
                         args.sft_steps or defaults["sft_steps"],
                         args.variants or defaults["variants"], args.set, args.sft_set,
                         jobs=args.jobs, command=shlex.join(["python", "-m", MODULE, *argv]),
                         regimes=args.regimes)
        print(f"[ablation] {len(m['runs'])} runs in {m['total_seconds']} s", flush=True)
        if not args.report:
            return 0
        args.docs = args.report
    print(write_report(pathlib.Path(args.out), pathlib.Path(args.docs)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
