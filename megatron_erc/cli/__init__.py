"""``megatron-erc``: demo, train, sft, eval, plot, convert.

Configs are YAML files with ``section.field=value`` overrides after them, e.g.
``megatron-erc train --config examples/tiny/dapo_erc.yaml algo.erc.low=0.9``.
Multi-rank runs: ``torchrun --nproc-per-node N -m megatron_erc.cli train ...``.
"""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # megatron-core announces at import that TE/apex are missing: expected on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core.*")
    parser = argparse.ArgumentParser(prog="megatron-erc", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded default job on this machine")
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--sft-steps", type=int, default=150)
    demo.add_argument("--rl-steps", type=int, default=60)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--loggers", nargs="+", metavar="LOGGER",
                      help="the RL run's run.loggers: jsonl tensorboard wandb mlflow")
    for name, text in (("train", "RL training (DAPO/GPPO + ERC)"),
                       ("sft", "supervised warm start, exported as an HF directory"),
                       ("eval", "validation accuracy of a model on a prompt file")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--config", help="YAML config file")
        p.add_argument("overrides", nargs="*", help="section.field=value")
    plot = sub.add_parser("plot", help="PNG dashboard of a run's metrics, or of several runs "
                          "overlaid (RUN_DIR, LABEL=RUN_DIR or a directory of runs)")
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR")
    plot.add_argument("--out", help="PNG path (default: RUN_DIR/dashboard.png for one run, "
                      "comparison.png for several)")
    sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion (see convert -h)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    # Each command imports what it runs only now, so --help and argument errors are instant.
    if args.command == "convert":
        from megatron_erc.cli.convert import main as convert_main

        return convert_main(rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    from megatron_erc.errors import run_command

    # A mistake in the inputs (UserError) is one line on stderr and exit code 2, printed
    # once for the job; anything else is a bug and keeps its traceback.
    return run_command(args.command, lambda: _run(args))


def _run(args) -> None:
    from megatron_erc.config import load_config

    if args.command == "demo":
        from megatron_erc.cli.demo import run_demo

        run_demo(args.out, sft_steps=args.sft_steps, rl_steps=args.rl_steps, seed=args.seed,
                 loggers=args.loggers)
    elif args.command == "train":
        from megatron_erc.trainer.config import TrainConfig
        from megatron_erc.trainer.run import run_train

        run_train(load_config(TrainConfig, args.config, args.overrides))
    elif args.command == "sft":
        from megatron_erc.trainer.sft import SFTConfig, run_sft

        out, loss = run_sft(load_config(SFTConfig, args.config, args.overrides))
        print(f"[sft] final loss {loss:.3f}; HF model in {out}")
    elif args.command == "eval":
        from megatron_erc.trainer.config import TrainConfig
        from megatron_erc.trainer.run import run_eval

        acc = run_eval(load_config(TrainConfig, args.config, args.overrides))
        print(f"[eval] accuracy {acc:.2%}")
    elif args.command == "plot":
        from megatron_erc.cli.plot import find_runs, plot_run, plot_runs

        runs = find_runs(args.run_dirs)
        if len(runs) == 1 and len(args.run_dirs) == 1 and "=" not in args.run_dirs[0]:
            print(plot_run(next(iter(runs.values())), args.out))
        else:
            print(plot_runs(runs, args.out or "comparison.png"))

