"""Megatron's full (TP=1, PP=1) parameter layout <-> one rank's shards.

The *full layout* is what a single-process ``GPTModel`` holds: megatron parameter names with
global layer indices and the true (unpadded) vocabulary. A rank's chunk holds, for each
parameter, a TP slice of a subset of layers. This module maps between the two, so weights
can be loaded into any TP/PP/VPP split and gradients compared against a single process.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping

import torch

_LAYER = re.compile(r"^(.*?decoder\.layers\.)(\d+)(\..*)$")
_VOCAB_PARAMS = ("embedding.word_embeddings.weight", "output_layer.weight")


def global_names(chunk: torch.nn.Module) -> dict[str, str]:
    """``{local parameter name: full-layout name}`` for one model chunk (layer offsets come
    from each layer's global ``layer_number``)."""
    module = chunk.module if hasattr(chunk, "module") else chunk
    layers = module.decoder.layers
    names = {}
    for name, _ in module.named_parameters():
        m = _LAYER.match(name)
        if m:
            global_idx = layers[int(m.group(2))].layer_number - 1
            names[name] = f"{m.group(1)}{global_idx}{m.group(3)}"
        else:
            names[name] = name
    return names


def _is_gated_fc1(name: str, config) -> bool:
    return config.gated_linear_unit and name.endswith("mlp.linear_fc1.weight")


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
            yield param, tp_slice(gname, full, param, module.config, tp_rank, tp_size), gname


def full_state_dict(model: torch.nn.Module, vocab_size: int) -> dict[str, torch.Tensor]:
    """Full-layout state dict of a single-process model (padding rows trimmed)."""
    sd = {}
    for name, param in model.named_parameters():
        t = param.detach().clone()
        if any(name.endswith(v) for v in _VOCAB_PARAMS):
            t = t[:vocab_size]
        sd[name] = t
    return sd
