"""Megatron's full (TP=1, PP=1) parameter layout <-> one rank's shards.

The *full layout* is what a single-process ``GPTModel`` holds: megatron parameter names with
global layer indices, global expert indices and the true (unpadded) vocabulary. A rank's
chunk holds, for each parameter, a TP slice of a subset of layers and, in MoE layers, of its
expert-parallel share of the experts (an expert's MLP sliced over the *expert* TP group).
This module maps between the two, so weights can be loaded into any TP/PP/VPP/EP split and
gradients compared against a single process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch
import torch.distributed as dist

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")
_LOCAL_EXPERT = re.compile(r"^(.*?mlp\.experts)\.local_experts\.(\d+)(\..*)$")


def group_coords(group) -> tuple[int, int]:
    if group is None or not dist.is_initialized():
        return 0, 1
    return dist.get_rank(group), dist.get_world_size(group)


def expert_groups(module: torch.nn.Module, local_name: str):
    """``(experts module, expert TP group, EP group)`` of an expert parameter's layer, or
    None for any other parameter (``local_name`` as in ``module.named_parameters()``)."""
    m = _LOCAL_EXPERT.match(local_name)
    if not m:
        return None
    experts = module.get_submodule(m.group(1))
    return experts, experts.tp_group, experts.ep_group


def shard_coords(module: torch.nn.Module, local_name: str, tp_rank: int,
                 tp_size: int) -> tuple[int, int]:
    """``(rank, size)`` of the TP group that slices this parameter: the expert TP group for
    expert weights, the given TP coordinates otherwise."""
    groups = expert_groups(module, local_name)
    return (tp_rank, tp_size) if groups is None else group_coords(groups[1])


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """``{local parameter name: full-layout name}`` for one model chunk (layer offsets come
    from each layer's global ``layer_number``, expert offsets from each MoE layer's
    ``local_expert_indices``)."""
    module = chunk.module if hasattr(chunk, "module") else chunk
    layers = module.decoder.layers
    names = {}
    for name, _ in module.named_parameters():
        m = _LAYER.match(name)
        if not m:
            names[name] = name
            continue
        layer = layers[int(m.group(2))]
        rest = m.group(3)
        e = _LOCAL_EXPERT.match(rest.removeprefix("."))
        if e:
            global_expert = layer.mlp.local_expert_indices[int(e.group(2))]
            rest = f".{e.group(1)}.local_experts.{global_expert}{e.group(3)}"
        names[name] = f"{m.group(1)}{layer.layer_number - 1}{rest}"
    return names


def _is_gated_fc1(name: str, config) -> bool:
    return config.gated_linear_unit and name.endswith("linear_fc1.weight")


def tp_slice(name: str, full: torch.Tensor, param: torch.Tensor, config, tp_rank: int,
             tp_size: int) -> torch.Tensor:
    """This TP rank's slice of a full-layout tensor, shaped like ``param``.

    Vocabulary-parallel tensors are zero-padded to the padded vocabulary first. The gated
    MLP's fc1 is ``[gate; up]`` in the full layout and ``[gate_r; up_r]`` on rank r.
    """
    if any(name.endswith(v) for v in _VOCAB_PARAMS) and full.shape[0] < param.shape[0] * tp_size:
        pad = param.shape[0] * tp_size - full.shape[0]
        full = torch.cat([full, full.new_zeros(pad, *full.shape[1:])])
    if not getattr(param, "tensor_model_parallel", False) or tp_size == 1:
        out = full
    elif _is_gated_fc1(name, config):
        gate, up = full.chunk(2, dim=0)
        out = torch.cat([gate.chunk(tp_size, 0)[tp_rank], up.chunk(tp_size, 0)[tp_rank]])
    else:
        out = full.chunk(tp_size, dim=param.partition_dim)[tp_rank]
    if out.shape != param.shape:
        raise ValueError(f"{name}: full tensor {tuple(full.shape)} gives a TP slice of shape "
                         f"{tuple(out.shape)}, but the parameter is {tuple(param.shape)}")
    return out


def _full_tensor(full_sd: Mapping[str, torch.Tensor], gname: str, config) -> torch.Tensor:
    if gname in full_sd:
        return full_sd[gname]
    if gname == "output_layer.weight" and "embedding.word_embeddings.weight" in full_sd:
        return full_sd["embedding.word_embeddings.weight"]  # tied embeddings on the last stage
    raise KeyError(f"{gname} is missing from the full state dict")


def iter_local_slices(chunks, full_sd: Mapping[str, torch.Tensor], tp_rank: int,
                      tp_size: int) -> Iterator[tuple[torch.nn.Parameter, torch.Tensor, str]]:
    """``(local parameter, its slice of full_sd, full-layout name)`` for every parameter."""
    for chunk in chunks:
        module = chunk.module if hasattr(chunk, "module") else chunk
        names = global_names(module)
        for name, param in module.named_parameters():
            gname = names[name]
            full = _full_tensor(full_sd, gname, module.config)
            rank, size = shard_coords(module, name, tp_rank, tp_size)
            yield param, tp_slice(gname, full, param, module.config, rank, size), gname


def full_state_dict(model: torch.nn.Module, vocab_size: int) -> dict[str, torch.Tensor]:
    """Full-layout state dict of a single-process model (padding rows trimmed)."""
    sd = {}
    for name, param in model.named_parameters():
        t = param.detach().clone()
        if any(name.endswith(v) for v in _VOCAB_PARAMS):
            t = t[:vocab_size]
        sd[name] = t
    return sd
