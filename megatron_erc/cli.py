"""``megatron-erc`` command line: ``demo`` and ``convert``."""

from __future__ import annotations

import argparse
import sys
import warnings


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    # megatron-core announces at import that TE/apex are missing: expected on CPU.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core.*")
    parser = argparse.ArgumentParser(prog="megatron-erc")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="the embedded default job on this machine")
    demo.add_argument("--out", default="runs/demo", help="run directory")
    demo.add_argument("--steps", type=int, default=150)
    demo.add_argument("--seed", type=int, default=0)
    sub.add_parser("convert", help="HF <-> Megatron checkpoint conversion (see --help)",
                   add_help=False)
    args, rest = parser.parse_known_args(argv)
    if args.command == "demo":
        if rest:
            parser.error(f"unrecognized arguments: {' '.join(rest)}")
        from megatron_erc.demo import run_demo

        run_demo(args.out, steps=args.steps, seed=args.seed)
        return 0
    if args.command == "convert":
        from megatron_erc.models.convert import main as convert_main

        return convert_main(rest)
    return 2


if __name__ == "__main__":
    sys.exit(main())
