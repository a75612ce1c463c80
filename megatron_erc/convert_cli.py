"""HF <-> Megatron checkpoint conversion CLI (thin wrapper over
``megatron_erc.models.hf_checkpoint``).

    python tools/convert.py hf-to-megatron --hf-dir D --out O --tp 2 --pp 1
    python tools/convert.py megatron-to-hf --ckpt O --out D2 [--tokenizer-dir T]

Ranks are spawned here (tp * pp for hf-to-megatron, one for megatron-to-hf) unless the
command runs under torchrun with that many ranks.
"""

from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-erc convert",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("hf-to-megatron", help="HF safetensors dir -> torch_dist checkpoint")
    a.add_argument("--hf-dir", required=True, help="directory with config.json + safetensors")
    a.add_argument("--out", required=True, help="checkpoint directory to create")
    a.add_argument("--tp", type=int, default=1, help="tensor-parallel size of the layout")
    a.add_argument("--pp", type=int, default=1, help="pipeline-parallel size of the layout")
    a.add_argument("--pad-vocab-multiple", type=int, default=128,
                   help="vocabulary padded to a multiple of this * tp (as in ParallelConfig)")
    a.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="parameter dtype stored in the checkpoint")
    a.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    b = sub.add_parser("megatron-to-hf", help="torch_dist checkpoint (any TP/PP) -> HF dir")
    b.add_argument("--ckpt", required=True, help="checkpoint written by hf-to-megatron")
    b.add_argument("--out", required=True, help="HF directory to create")
    b.add_argument("--tokenizer-dir", default=None,
                   help="copy tokenizer files from here (default: those stored at conversion)")
    b.add_argument("--max-shard-mb", type=int, default=5000, help="safetensors shard size")
    b.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return parser


def main(argv: list[str] | None = None) -> None:
    """Entry point; exits with ``convert: error: <message>`` when conversion is refused."""
    from megatron_erc.models.hf_checkpoint import ConvertError, hf_to_megatron, megatron_to_hf

    args = build_parser().parse_args(argv)
    try:
        if args.command == "hf-to-megatron":
            hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, force=args.force,
                           pad_vocab_multiple=args.pad_vocab_multiple, params_dtype=args.dtype)
        else:
            megatron_to_hf(args.ckpt, args.out, tokenizer_dir=args.tokenizer_dir,
                           force=args.force, max_shard_bytes=args.max_shard_mb * 2**20)
    except (ConvertError, ValueError, KeyError, NotImplementedError, OSError) as e:
        sys.exit(f"convert: error: {e}")


if __name__ == "__main__":
    main()
