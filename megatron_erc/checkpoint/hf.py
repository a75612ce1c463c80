"""HF directories <-> megatron-core distributed checkpoints (torch_dist), at any TP/PP.

A converted checkpoint directory holds what ``dist_checkpointing.save`` writes for
``{"model": chunk.sharded_state_dict()}`` plus:

* ``megatron_erc.json``: format version, the TP/PP it was written at, ``params_dtype``,
  ``pad_vocab_multiple`` and ``padded_vocab_size`` (needed to rebuild a matching model);
* ``hf/``: the source's ``config.json`` and its tokenizer / generation files.

``hf_to_megatron`` runs one gloo/NCCL rank per TP x PP position: each reads from the
safetensors only the tensors its shard needs (``hf_adapter.load_hf_weights``).
``megatron_to_hf`` loads the checkpoint into a single TP=1/PP=1 model (dist_checkpointing
reshards whatever layout it was saved at) and streams ``hf_adapter.iter_hf_weights`` into
safetensors shards. Both run their ranks in fresh processes (``spawn`` + a file store),
or in the current ranks when started by ``torchrun`` (``platform.spawn.run_ranks``).
Outputs are written to ``.<name>.partial`` next to the target and renamed only when
complete (``checkpoint.io``).

megatron-core and transformers are imported inside the functions that use them: they take
seconds to import, and the commands check their inputs before they load.
"""

from __future__ import annotations

import json
import os
import pathlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_erc import platform
from megatron_erc.checkpoint.io import (
    HF_SUBDIR,
    META_FILE,
    MODEL_FORMAT,
    copy_side_files,
    publish,
    staging_dir,
    staging_path,
    write_model_meta,
)
from megatron_erc.models.gpt import ParallelConfig, build_model_chunks
from megatron_erc.models.hf_adapter import (
    HFLayout,
    check_hf_shape,
    is_ignored_hf_name,
    iter_hf_weights,
    load_hf_weights,
)
from megatron_erc.models.moe import is_moe
from megatron_erc.platform.spawn import RankFailure, run_ranks


class ConvertError(RuntimeError):
    """A conversion that cannot proceed; the message says which tensor or path and why."""


def _log(msg: str) -> None:
    rank = dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", 0))
    if rank == 0:
        print(f"[convert] {msg}", flush=True)


# ---------------------------------------------------------------- HF safetensors directories
class SafetensorsReader:
    """Lazy access to the tensors of an HF directory (single file or sharded with index)."""

    def __init__(self, hf_dir: str | os.PathLike):
        d = pathlib.Path(hf_dir)
        index = d / "model.safetensors.index.json"
        if index.exists():
            weight_map = json.loads(index.read_text())["weight_map"]
        elif (d / "model.safetensors").exists():
            weight_map = None
        else:
            raise ConvertError(f"{d}: no model.safetensors or model.safetensors.index.json")
        files = sorted(set(weight_map.values())) if weight_map else ["model.safetensors"]
        self._handles = {f: safe_open(str(d / f), framework="pt") for f in files}
        self.weight_map = weight_map or {n: files[0] for n in self._handles[files[0]].keys()}

    def names(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handles[self.weight_map[name]].get_slice(name).get_shape())

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise ConvertError(f"{name} is missing from the HF checkpoint")
        return self._handles[self.weight_map[name]].get_tensor(name)


def check_hf_dir(hf_dir: str | os.PathLike, hf_config) -> None:
    """Every tensor the config implies is present with the config's shape (reads headers
    only). Raises ``ConvertError`` naming the first offending tensor."""
    layout = HFLayout.from_config(hf_config)
    reader = SafetensorsReader(hf_dir)
    present = set(reader.names())
    for name in reader.names():
        if (layout.tied and name == "lm_head.weight") or is_ignored_hf_name(name):
            continue  # a tied copy some writers keep, or a non-weight buffer
        try:
            check_hf_shape(name, reader.shape(name), layout)
        except ValueError as e:
            raise ConvertError(str(e)) from None
    missing = [n for n in layout.hf_shapes() if n not in present]
    if missing:
        raise ConvertError(f"{missing[0]} is missing from the HF checkpoint in {hf_dir}")


class SafetensorsWriter:
    """Streams ``(name, tensor)`` pairs into ``model-0000k-of-0000n.safetensors`` shards of
    at most ``max_shard_bytes`` (plus the index when there is more than one)."""

    def __init__(self, out_dir: pathlib.Path, max_shard_bytes: int):
        self.out_dir, self.max_bytes = out_dir, max_shard_bytes
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes, self.files, self.weight_map, self.total = 0, [], {}, 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_bytes:
            self._flush()
        self.pending[name] = tensor.detach().contiguous().clone()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        fname = f"part-{len(self.files):05d}.safetensors"
        save_file(self.pending, str(self.out_dir / fname), metadata={"format": "pt"})
        self.files.append((fname, list(self.pending)))
        _log(f"wrote {len(self.pending)} tensors ({self.pending_bytes / 2**20:.1f} MiB)")
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending:
            self._flush()
        n = len(self.files)
        for i, (fname, names) in enumerate(self.files):
            final = "model.safetensors" if n == 1 else f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(self.out_dir / fname, self.out_dir / final)
            self.weight_map.update(dict.fromkeys(names, final))
        if n > 1:
            index = {"metadata": {"total_size": self.total}, "weight_map": self.weight_map}
            (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


# ---------------------------------------------------------------- ranks and output handling
def _check_output(out: pathlib.Path, force: bool) -> None:
    if out.exists() and not force:
        raise ConvertError(f"{out} already exists; pass --force to overwrite it")


def _publish(tmp: pathlib.Path, out: pathlib.Path) -> None:
    publish(tmp, out)
    _log(f"done: {out}")


def _run(fn: Callable, world: int, *args) -> None:
    """``fn(*args)`` on ``world`` ranks (``run_ranks``); a failure is a ``ConvertError``."""
    if "WORLD_SIZE" in os.environ and int(os.environ["WORLD_SIZE"]) != world:
        raise ConvertError(f"launched with WORLD_SIZE={os.environ['WORLD_SIZE']}, but this "
                           f"conversion needs {world} ranks (tp * pp)")
    try:
        run_ranks(fn, world, *args, expected=(ConvertError,))
    except RankFailure as e:
        raise ConvertError(str(e)) from None


# ---------------------------------------------------------------- HF -> megatron
def _import_rank(hf_dir: str, out: str, tp: int, pp: int, pad_vocab_multiple: int,
                 params_dtype: str) -> None:
    from megatron.core import dist_checkpointing
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    platform.setup()
    platform.init_model_parallel(tp, pp, seed=0, expert_tensor_parallel_size=1)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    # Sequence parallelism leaves every parameter's layout as it is; megatron's MoE layer
    # refuses TP without it. Experts are saved whole per rank (etp=1, ep=1), each sharded
    # tensor under its global expert index.
    parallel = ParallelConfig(tp=tp, pp=pp, pad_vocab_multiple=pad_vocab_multiple,
                              params_dtype=params_dtype, etp=1,
                              sequence_parallel=tp > 1 and is_moe(hf_config))
    chunks = build_model_chunks(hf_config, parallel)
    _log(f"reading {hf_dir} into {tp * pp} ranks (tp={tp}, pp={pp})")
    load_hf_weights(chunks, SafetensorsReader(hf_dir).get, hf_config,
                    ps.get_tensor_model_parallel_rank(), tp)
    target = pathlib.Path(out)
    tmp = staging_dir(target) if dist.get_rank() == 0 else staging_path(target)
    dist.barrier()
    _log(f"saving the torch_dist checkpoint to {tmp}")
    dist_checkpointing.save({"model": chunks[0].sharded_state_dict()}, str(tmp))
    dist.barrier()
    if dist.get_rank() == 0:
        write_model_meta(tmp, parallel, hf_config.vocab_size, str(pathlib.Path(hf_dir).resolve()))
        copy_side_files(pathlib.Path(hf_dir), tmp / HF_SUBDIR)
        _publish(tmp, target)
    dist.barrier()


def hf_to_megatron(hf_dir: str, out: str, *, tp: int = 1, pp: int = 1, force: bool = False,
                   pad_vocab_multiple: int = 128, params_dtype: str = "float32") -> None:
    """Convert an HF directory (safetensors + config.json) to a torch_dist checkpoint laid
    out for ``tp`` x ``pp`` ranks. Shapes are checked against the config first."""
    from transformers import AutoConfig

    out_path = pathlib.Path(out)
    _check_output(out_path, force)
    hf_config = AutoConfig.from_pretrained(hf_dir)
    layout = HFLayout.from_config(hf_config)
    if layout.heads % tp or layout.groups % tp or layout.layers % pp:
        raise ConvertError(f"tp={tp} must divide the heads ({layout.heads}) and key/value heads "
                           f"({layout.groups}), pp={pp} the layers ({layout.layers})")
    check_hf_dir(hf_dir, hf_config)
    _log(f"{hf_dir}: {hf_config.model_type}, {layout.layers} layers, shapes match the config")
    _run(_import_rank, tp * pp, str(hf_dir), str(out_path), tp, pp, pad_vocab_multiple,
              params_dtype)


# ---------------------------------------------------------------- megatron -> HF
def read_meta(ckpt: str | os.PathLike) -> dict:
    path = pathlib.Path(ckpt) / META_FILE
    if not path.exists():
        raise ConvertError(f"{ckpt}: no {META_FILE}; not a checkpoint written by hf-to-megatron")
    meta = json.loads(path.read_text())
    if meta.get("format") != MODEL_FORMAT:
        raise ConvertError(f"{path}: format {meta.get('format')!r}, expected {MODEL_FORMAT!r}")
    return meta


def _export_rank(ckpt: str, out: str, tokenizer_dir: str | None, max_shard_bytes: int) -> None:
    from megatron.core import dist_checkpointing
    from transformers import AutoConfig

    platform.setup()
    platform.init_model_parallel(1, 1, seed=0)
    meta = read_meta(ckpt)
    hf_dir = pathlib.Path(ckpt) / HF_SUBDIR
    hf_config = AutoConfig.from_pretrained(hf_dir)
    # pad_vocab_multiple = the saved padded size rebuilds exactly the saved vocab rows at TP=1
    parallel = ParallelConfig(pad_vocab_multiple=meta["padded_vocab_size"],
                              params_dtype=meta["params_dtype"])
    chunks = build_model_chunks(hf_config, parallel)
    _log(f"loading {ckpt} (saved at tp={meta['tp']}, pp={meta['pp']}) into one process")
    try:
        state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, ckpt)
    except Exception as e:  # noqa: BLE001 - megatron's message names the tensor
        raise ConvertError(f"{ckpt} does not match its hf/config.json: {e}") from e
    chunks[0].load_state_dict(state["model"])
    target = pathlib.Path(out)
    tmp = staging_dir(target)
    writer = SafetensorsWriter(tmp, max_shard_bytes)
    for name, tensor in iter_hf_weights(chunks, hf_config):
        writer.add(name, tensor)
    writer.close()
    config = json.loads((hf_dir / "config.json").read_text())
    config["dtype" if "torch_dtype" not in config else "torch_dtype"] = meta["params_dtype"]
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    copy_side_files(hf_dir, tmp, skip=("config.json",))
    if tokenizer_dir:
        copy_side_files(pathlib.Path(tokenizer_dir), tmp, skip=("config.json",))
    _publish(tmp, target)


def megatron_to_hf(ckpt: str, out: str, *, tokenizer_dir: str | None = None,
                   force: bool = False, max_shard_bytes: int = 5 * 2**30) -> None:
    """Convert a checkpoint written by ``hf_to_megatron`` (any TP/PP) to an HF directory
    loadable by ``AutoModelForCausalLM.from_pretrained``."""
    out_path = pathlib.Path(out)
    _check_output(out_path, force)
    read_meta(ckpt)
    if tokenizer_dir and not pathlib.Path(tokenizer_dir).is_dir():
        raise ConvertError(f"--tokenizer-dir {tokenizer_dir} is not a directory")
    _run(_export_rank, 1, str(ckpt), str(out_path), tokenizer_dir, max_shard_bytes)
