"""``megatron-erc convert``: HF <-> Megatron checkpoint conversion (a thin layer over
``megatron_erc.checkpoint.hf``).

    megatron-erc convert hf-to-megatron --hf-dir D --out O --tp 2 --pp 1
    megatron-erc convert megatron-to-hf --ckpt O --out D2 [--tokenizer-dir T]

Ranks are spawned here (tp * pp for hf-to-megatron, one for megatron-to-hf) unless the
command runs under torchrun with that many ranks.
"""

from __future__ import annotations

import argparse
import pathlib
from types import SimpleNamespace

from megatron_erc.checkpoint.hf import ConvertError, hf_to_megatron, megatron_to_hf
from megatron_erc.checkpoint.steps import COMPLETE_FILE, check_resumable, list_complete
from megatron_erc.errors import UserError, run_command
from megatron_erc.trainer.preflight import check_model


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


def main(argv: list[str] | None = None) -> int:
    """Entry point: 0, or 2 with ``megatron-erc convert: KIND error: MESSAGE`` on stderr
    when the inputs are wrong or conversion is refused (see ``megatron_erc.errors``)."""

    args = build_parser().parse_args(argv)
    return run_command("convert", lambda: _convert(args))


def _convert(args) -> None:
    try:
        if args.command == "hf-to-megatron":
            _check_hf_dir(args.hf_dir, args.tp, args.pp)
            hf_to_megatron(args.hf_dir, args.out, tp=args.tp, pp=args.pp, force=args.force,
                           pad_vocab_multiple=args.pad_vocab_multiple, params_dtype=args.dtype)
        else:
            _check_ckpt(args.ckpt)
            megatron_to_hf(args.ckpt, args.out, tokenizer_dir=args.tokenizer_dir,
                           force=args.force, max_shard_bytes=args.max_shard_mb * 2**20)
    except UserError:
        raise
    except (ConvertError, OSError) as e:
        raise UserError(str(e), kind="checkpoint") from None
    except (ValueError, NotImplementedError) as e:  # a model these conversions do not map
        raise UserError(str(e), kind="model") from None


def _check_hf_dir(hf_dir: str, tp: int, pp: int) -> None:
    """A supported HF model directory with weights, whose heads and layers the layout
    splits evenly."""

    hf = check_model(SimpleNamespace(path=hf_dir), name="--hf-dir")
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if tp < 1 or heads % tp or groups % tp:
        raise UserError(f"--tp {tp} must divide the attention heads ({heads}) and key/value "
                        f"heads ({groups}) of {hf_dir}/config.json", kind="layout")
    if pp < 1 or hf["num_hidden_layers"] % pp:
        raise UserError(f"--pp {pp} must divide the {hf['num_hidden_layers']} layers of "
                        f"{hf_dir}/config.json", kind="layout")


def _check_ckpt(ckpt: str) -> None:
    """A directory written by hf-to-megatron or a training checkpoint; a training one must
    be complete and intact."""

    path = pathlib.Path(ckpt)
    if not path.is_dir():
        raise UserError(f"--ckpt {ckpt}: no such directory; pass a directory written by "
                        "hf-to-megatron or a training checkpoint RUN_DIR/checkpoints/step_*",
                        kind="checkpoint")
    found = list_complete(path)
    if found:
        raise UserError(f"--ckpt {ckpt} is a directory of training checkpoints; pass one of "
                        f"them, e.g. {found[-1][1]}", kind="checkpoint")
    if (path / COMPLETE_FILE).exists() or path.name.startswith("step_"):  # training one
        check_resumable(path, name="--ckpt")

