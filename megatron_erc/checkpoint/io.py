"""Checkpoint directories on disk, written once for HF exports, converted and training
checkpoints: the atomic publish, the side-file copy and the model metadata.

* ``staging_dir(out)`` then ``publish(tmp, out)``: a directory is built under a temporary
  name next to its final one and renamed into place only when complete, so a writer killed
  at any point leaves the previous directory or the new one, never a half-written one.
* ``copy_side_files``: an HF directory's config, tokenizer and generation files (everything
  but weights) travel with the weights.
* ``write_model_meta`` (``megatron_erc.json``): the layout a Megatron checkpoint was written
  at, so ``megatron-to-hf`` rebuilds a matching model from a converted or a training
  checkpoint alike.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import uuid

from megatron_erc.models.gpt import ParallelConfig, padded_vocab_size

MODEL_FORMAT = "megatron_erc.hf_convert/1"
META_FILE = "megatron_erc.json"
HF_SUBDIR = "hf"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".msgpack", ".h5", ".ckpt",
                   ".safetensors.index.json", ".bin.index.json")


def staging_path(out: pathlib.Path) -> pathlib.Path:
    """``.<name>.partial`` next to ``out``: where ``out`` is built."""
    return out.parent / f".{out.name}.partial"


def staging_dir(out: pathlib.Path) -> pathlib.Path:
    """``staging_path(out)``, created empty."""
    tmp = staging_path(out)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def publish(tmp: pathlib.Path, final: pathlib.Path) -> None:
    """Rename ``tmp`` to ``final``; a previous ``final`` is moved aside first (a directory
    cannot be replaced atomically) and removed once the new one is in place."""
    old = None
    if final.exists():
        old = final.parent / f".{final.name}.old-{uuid.uuid4().hex}"
        os.replace(final, old)
    os.replace(tmp, final)
    fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True) if old.is_dir() else old.unlink()


def write_synced(path: pathlib.Path, text: str) -> None:
    """Write ``text`` to ``path`` and flush it to the disk."""
    with open(path, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def copy_side_files(src: pathlib.Path, dst: pathlib.Path, skip: tuple[str, ...] = ()) -> None:
    """Copy the files of HF directory ``src`` that are not weights (config, tokenizer,
    generation config) into ``dst``, except those named in ``skip``."""
    dst.mkdir(parents=True, exist_ok=True)
    for f in pathlib.Path(src).iterdir():
        if f.is_file() and not f.name.endswith(WEIGHT_SUFFIXES) and f.name not in skip:
            shutil.copy2(f, dst / f.name)


def write_model_meta(directory: pathlib.Path, parallel: ParallelConfig, vocab_size: int,
                     source: str) -> None:
    """``megatron_erc.json``: format, the TP/PP the checkpoint was written at, the parameter
    dtype and the vocabulary padding (``padded_vocab_size`` rebuilds the saved rows)."""
    meta = {"format": MODEL_FORMAT, "tp": parallel.tp, "pp": parallel.pp,
            "params_dtype": parallel.params_dtype,
            "pad_vocab_multiple": parallel.pad_vocab_multiple,
            "padded_vocab_size": padded_vocab_size(vocab_size, parallel.tp,
                                                   parallel.pad_vocab_multiple),
            "source": source}
    (directory / META_FILE).write_text(json.dumps(meta, indent=2))
