"""The one HF <-> Megatron weight adapter for Llama / Qwen2 / Qwen3 checkpoints.

Names and layouts, per layer ``i`` (HF ``model.layers.{i}.`` -> megatron ``decoder.layers.{i}.``):

====================================================  =========================================
HF                                                    megatron full layout
====================================================  =========================================
``model.embed_tokens.weight`` ``[V, H]``              ``embedding.word_embeddings.weight``
``input_layernorm.weight``                            ``input_layernorm.weight``
``self_attn.{q,k,v}_proj.weight`` (+ ``.bias``)       ``self_attention.linear_qkv.weight`` (+ bias)
``self_attn.o_proj.weight``                           ``self_attention.linear_proj.weight``
``self_attn.{q,k}_norm.weight`` ``[d]`` (Qwen3)        ``self_attention.{q,k}_layernorm.weight``
``post_attention_layernorm.weight``                   ``pre_mlp_layernorm.weight``
``mlp.{gate,up}_proj.weight``                         ``mlp.linear_fc1.weight`` = ``[gate; up]``
``mlp.down_proj.weight``                              ``mlp.linear_fc2.weight``
``mlp.gate.weight`` ``[E, H]`` (MoE layers)           ``mlp.router.weight``
``mlp.experts.{e}.{gate,up}_proj.weight``             ``mlp.experts.local_experts.{e}.linear_fc1``
``mlp.experts.{e}.down_proj.weight``                  ``mlp.experts.local_experts.{e}.linear_fc2``
``model.norm.weight``                                 ``decoder.final_layernorm.weight``
``lm_head.weight`` (absent when tied)                 ``output_layer.weight`` (absent when tied)
====================================================  =========================================

The fused QKV follows ``SelfAttention.get_query_key_value_tensors``: rows are grouped per
key/value head, ``[q heads of group 0, k0, v0 | q heads of group 1, k1, v1 | ...]``, each
head ``head_dim`` rows; so a plain TP chunk of the rows is a whole number of groups.
Transformer Engine's fused-norm names (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``) are accepted as aliases of the two layer norms.

MoE experts use the per-expert names of saved checkpoints (what ``save_pretrained`` writes
and vLLM loads), not transformers 5's in-memory fused ``experts.gate_up_proj``; an EP rank
holds the experts of its ``local_expert_indices``. The *full layout* (see ``sharding``)
holds the true vocabulary and every expert; padded rows are trimmed on export.

Every tensor is checked against the shape the HF config implies, and a mismatch raises
``ValueError`` naming the tensor.
"""

from __future__ import annotations

import dataclasses
import functools
import re
from collections.abc import Callable, Iterator, Mapping

import torch
import torch.distributed as dist

from megatron_erc.models.moe import is_moe, num_experts, sparse_layers
from megatron_erc.models.sharding import (
    expert_groups,
    global_names,
    group_coords,
    shard_coords,
    tp_slice,
)
from megatron_erc.models.support import (
    check_supported,
    has_qk_norm,
    has_qkv_bias,
    head_dim,
    hf_field,
)

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_HF_LAYER = "model.layers.{}."
# megatron per-layer suffix -> HF per-layer suffixes (in the fused order)
_LAYER_MAP = {
    "input_layernorm.weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight",),
    "self_attention.linear_qkv.weight": tuple(f"self_attn.{p}_proj.weight" for p in "qkv"),
    "self_attention.linear_qkv.bias": tuple(f"self_attn.{p}_proj.bias" for p in "qkv"),
    "self_attention.linear_proj.weight": ("self_attn.o_proj.weight",),
    "self_attention.q_layernorm.weight": ("self_attn.q_norm.weight",),
    "self_attention.k_layernorm.weight": ("self_attn.k_norm.weight",),
    "pre_mlp_layernorm.weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.layer_norm_weight": ("post_attention_layernorm.weight",),
    "mlp.linear_fc1.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight"),
    "mlp.linear_fc2.weight": ("mlp.down_proj.weight",),
    "mlp.router.weight": ("mlp.gate.weight",),
}
_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.linear_fc([12])\.weight$")
_TE_ALIASES = ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight")
_GLOBAL_MAP = {
    "embedding.word_embeddings.weight": ("model.embed_tokens.weight",),
    "decoder.final_layernorm.weight": ("model.norm.weight",),
    "output_layer.weight": ("lm_head.weight",),
}
_VOCAB = ("embedding.word_embeddings.weight", "output_layer.weight")
# Non-weight entries some HF state dicts carry.
_IGNORED_HF = re.compile(r"(rotary_emb\.inv_freq|\.masked_bias|\.attn\.bias)$")


def is_ignored_hf_name(name: str) -> bool:
    """Buffers some HF checkpoints carry that are not weights (e.g. ``rotary_emb.inv_freq``)."""
    return bool(_IGNORED_HF.search(name))


@dataclasses.dataclass(frozen=True)
class HFLayout:
    """The dimensions of an HF Llama/Qwen2/Qwen3 model that fix every tensor's shape."""

    vocab: int
    hidden: int
    ffn: int
    layers: int
    heads: int
    groups: int
    head_dim: int
    qkv_bias: bool
    tied: bool
    qk_norm: bool = False
    experts: int = 0
    moe_ffn: int = 0
    sparse: tuple[bool, ...] = ()
    """Per layer: a routed-experts MoE block (True) or a dense MLP."""

    @classmethod
    def from_config(cls, hf_config) -> HFLayout:
        check_supported(hf_config)
        heads = hf_config.num_attention_heads
        return cls(vocab=hf_config.vocab_size, hidden=hf_config.hidden_size,
                   ffn=hf_config.intermediate_size, layers=hf_config.num_hidden_layers,
                   heads=heads, groups=hf_field(hf_config, "num_key_value_heads", heads),
                   head_dim=head_dim(hf_config), qkv_bias=has_qkv_bias(hf_config),
                   tied=bool(hf_field(hf_config, "tie_word_embeddings", False)),
                   qk_norm=has_qk_norm(hf_config),
                   **(dict(experts=num_experts(hf_config),
                           moe_ffn=int(hf_config.moe_intermediate_size),
                           sparse=tuple(sparse_layers(hf_config)))
                      if is_moe(hf_config) else {}))

    def is_sparse(self, layer: int) -> bool:
        return bool(self.sparse) and self.sparse[layer]

    def hf_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every HF tensor the model has, with its shape, in HF's order."""
        h, q, kv = self.hidden, self.heads * self.head_dim, self.groups * self.head_dim
        shapes = {"model.embed_tokens.weight": (self.vocab, h)}
        for i in range(self.layers):
            p = _HF_LAYER.format(i)
            shapes[p + "self_attn.q_proj.weight"] = (q, h)
            shapes[p + "self_attn.k_proj.weight"] = (kv, h)
            shapes[p + "self_attn.v_proj.weight"] = (kv, h)
            if self.qkv_bias:
                shapes[p + "self_attn.q_proj.bias"] = (q,)
                shapes[p + "self_attn.k_proj.bias"] = (kv,)
                shapes[p + "self_attn.v_proj.bias"] = (kv,)
            shapes[p + "self_attn.o_proj.weight"] = (h, q)
            if self.qk_norm:
                shapes[p + "self_attn.q_norm.weight"] = (self.head_dim,)
                shapes[p + "self_attn.k_norm.weight"] = (self.head_dim,)
            if self.is_sparse(i):
                shapes[p + "mlp.gate.weight"] = (self.experts, h)
                for e in range(self.experts):
                    shapes[p + f"mlp.experts.{e}.gate_proj.weight"] = (self.moe_ffn, h)
                    shapes[p + f"mlp.experts.{e}.up_proj.weight"] = (self.moe_ffn, h)
                    shapes[p + f"mlp.experts.{e}.down_proj.weight"] = (h, self.moe_ffn)
            else:
                shapes[p + "mlp.gate_proj.weight"] = (self.ffn, h)
                shapes[p + "mlp.up_proj.weight"] = (self.ffn, h)
                shapes[p + "mlp.down_proj.weight"] = (h, self.ffn)
            shapes[p + "input_layernorm.weight"] = (h,)
            shapes[p + "post_attention_layernorm.weight"] = (h,)
        shapes["model.norm.weight"] = (h,)
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, h)
        return shapes

    def megatron_names(self) -> list[str]:
        """Full-layout megatron names (local layer spec) in model order."""
        per_layer = ["input_layernorm.weight", "self_attention.linear_proj.weight",
                     "self_attention.linear_qkv.weight"]
        per_layer += ["self_attention.linear_qkv.bias"] if self.qkv_bias else []
        per_layer += (["self_attention.q_layernorm.weight", "self_attention.k_layernorm.weight"]
                      if self.qk_norm else [])
        per_layer += ["pre_mlp_layernorm.weight"]
        dense = ["mlp.linear_fc1.weight", "mlp.linear_fc2.weight"]
        sparse = ["mlp.router.weight"] + [f"mlp.experts.local_experts.{e}.linear_fc{k}.weight"
                                          for e in range(self.experts) for k in (1, 2)]
        names = ["embedding.word_embeddings.weight"]
        names += [f"decoder.layers.{i}.{s}" for i in range(self.layers)
                  for s in per_layer + (sparse if self.is_sparse(i) else dense)]
        names += ["decoder.final_layernorm.weight"]
        return names + ([] if self.tied else ["output_layer.weight"])


@functools.lru_cache(maxsize=8)
def _shapes(layout: HFLayout) -> dict[str, tuple[int, ...]]:
    return layout.hf_shapes()


def check_hf_shape(name: str, shape, layout: HFLayout) -> None:
    """Raise ``ValueError`` naming ``name`` if it is unknown or its shape is not the config's."""
    expected = _shapes(layout).get(name)
    if expected is None:
        raise ValueError(f"{name}: unexpected tensor for this config (layers={layout.layers}, "
                         f"qkv_bias={layout.qkv_bias}, tied={layout.tied})")
    if tuple(shape) != expected:
        raise ValueError(f"{name}: shape {tuple(shape)} does not match the config, which "
                         f"implies {expected}")


def hf_sources(name: str, layout: HFLayout) -> tuple[str, ...]:
    """The HF tensors that make up full-layout megatron tensor ``name`` (fused order).
    A tied model's ``output_layer.weight`` (last pipeline stage) comes from the embedding."""
    m = _LAYER.match(name)
    if m:
        suffixes = _LAYER_MAP.get(m.group(2))
        if (e := _EXPERT.match(m.group(2))) is not None:
            p = f"mlp.experts.{e.group(1)}."
            suffixes = ((p + "gate_proj.weight", p + "up_proj.weight") if e.group(2) == "1"
                        else (p + "down_proj.weight",))
        if suffixes is None:
            raise KeyError(f"{name}: no HF counterpart is known")
        return tuple(_HF_LAYER.format(m.group(1)) + s for s in suffixes)
    if name == "output_layer.weight" and layout.tied:
        return ("model.embed_tokens.weight",)
    if name not in _GLOBAL_MAP:
        raise KeyError(f"{name}: no HF counterpart is known")
    return _GLOBAL_MAP[name]


def hf_to_megatron_tensor(name: str, tensors: list[torch.Tensor],
                          layout: HFLayout) -> torch.Tensor:
    """Fuse the HF tensors of ``hf_sources(name)`` into megatron's full-layout ``name``."""
    for src, t in zip(hf_sources(name, layout), tensors, strict=True):
        check_hf_shape(src, t.shape, layout)
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        q, k, v = tensors
        ng, d = layout.groups, layout.head_dim
        rest = q.shape[1:]
        return torch.cat([q.reshape(ng, -1, *rest), k.reshape(ng, d, *rest),
                          v.reshape(ng, d, *rest)], dim=1).reshape(-1, *rest)
    if name.endswith("linear_fc1.weight"):  # dense or expert: [gate; up]
        return torch.cat(tensors, dim=0)
    (t,) = tensors
    return t


def megatron_to_hf_tensors(name: str, tensor: torch.Tensor,
                           layout: HFLayout) -> list[tuple[str, torch.Tensor]]:
    """Split full-layout megatron ``name`` into its HF tensors, trimming padded vocab rows.
    A tied model's ``output_layer.weight`` gives nothing (HF has no ``lm_head``)."""
    if name == "output_layer.weight" and layout.tied:
        return []
    hf_names = hf_sources(name, layout)
    if name in _VOCAB:
        if tensor.shape[0] < layout.vocab:
            raise ValueError(f"{name}: {tensor.shape[0]} rows, fewer than the config's "
                             f"vocab_size {layout.vocab}")
        tensor = tensor[: layout.vocab]
    if name.endswith("linear_qkv.weight") or name.endswith("linear_qkv.bias"):
        ng, d = layout.groups, layout.head_dim
        rest = tensor.shape[1:]
        per_group = tensor.reshape(ng, -1, *rest)
        q_rows = per_group.shape[1] - 2 * d
        if q_rows <= 0:
            raise ValueError(f"{name}: shape {tuple(tensor.shape)} does not hold {ng} groups "
                             f"of q + k + v heads of size {d}")
        q, k, v = per_group.split([q_rows, d, d], dim=1)
        parts = [q.reshape(-1, *rest), k.reshape(-1, *rest), v.reshape(-1, *rest)]
    elif name.endswith("linear_fc1.weight"):
        parts = list(tensor.chunk(2, dim=0))
    else:
        parts = [tensor]
    out = list(zip(hf_names, parts, strict=True))
    for hf_name, t in out:
        check_hf_shape(hf_name, t.shape, layout)
    return out


def to_megatron(hf_state: Mapping[str, torch.Tensor], hf_config) -> dict[str, torch.Tensor]:
    """HF state dict -> megatron full layout (local-spec names, true vocabulary).

    Strict: a missing HF tensor raises ``KeyError``, an unexpected one or a wrong shape
    ``ValueError``, each naming the tensor. A tied model's ``lm_head.weight`` (which
    ``state_dict()`` of a tied HF model still lists) is ignored.
    """
    layout = HFLayout.from_config(hf_config)
    expected = _shapes(layout)
    for name in hf_state:
        if name not in expected and not is_ignored_hf_name(name) and not (
                layout.tied and name == "lm_head.weight"):
            raise ValueError(f"{name}: unexpected tensor for this config")
    out = {}
    for name in layout.megatron_names():
        srcs = hf_sources(name, layout)
        missing = [s for s in srcs if s not in hf_state]
        if missing:
            raise KeyError(f"{missing[0]} is missing from the HF state dict")
        out[name] = hf_to_megatron_tensor(name, [hf_state[s] for s in srcs], layout)
    return out


def to_hf(megatron_full: Mapping[str, torch.Tensor],
          hf_config) -> Iterator[tuple[str, torch.Tensor]]:
    """Megatron full layout (local or TE norm names, padded or true vocab) -> HF tensors.
    Yields ``(hf_name, tensor)`` per megatron tensor, in model order."""
    layout = HFLayout.from_config(hf_config)
    aliases = {f"decoder.layers.{m.group(1)}.{s}": k for k in megatron_full
               if (m := _LAYER.match(k)) and (s := _te_to_local(m.group(2)))}
    for name in layout.megatron_names():
        key = name if name in megatron_full else aliases.get(name)
        if key is None:
            raise KeyError(f"{name} is missing from the megatron state dict")
        yield from megatron_to_hf_tensors(name, megatron_full[key], layout)


def _te_to_local(suffix: str) -> str | None:
    if suffix == _TE_ALIASES[0]:
        return "input_layernorm.weight"
    if suffix == _TE_ALIASES[1]:
        return "pre_mlp_layernorm.weight"
    return None


def _unwrap(chunk: torch.nn.Module) -> torch.nn.Module:
    while hasattr(chunk, "module"):  # DDP, Float16Module
        chunk = chunk.module
    return chunk


def _gather_tp(name: str, param: torch.Tensor, config, tp_group) -> torch.Tensor:
    """The full tensor of a TP-sharded parameter (all_gather over ``tp_group``)."""
    world = dist.get_world_size(tp_group) if tp_group is not None else 1
    if world == 1 or not getattr(param, "tensor_model_parallel", False):
        return param.detach()
    shards = [torch.empty_like(param) for _ in range(world)]
    dist.all_gather(shards, param.detach().contiguous(), group=tp_group)
    if config.gated_linear_unit and name.endswith("linear_fc1.weight"):
        # rank r holds [gate_r; up_r]; the full layout is [gate; up]
        gates, ups = zip(*(s.chunk(2, dim=0) for s in shards), strict=True)
        return torch.cat(gates + ups, dim=0)
    return torch.cat(shards, dim=param.partition_dim)


@torch.no_grad()
def _global_params(model_chunks) -> Iterator[tuple[torch.nn.Module, str, str, torch.Tensor]]:
    """``(GPTModel, local name, global local-spec name, parameter)`` of every parameter of
    the chunks: layer and expert indices made global across pipeline stages and expert-
    parallel ranks, TE suffixes mapped to local ones."""
    for chunk in model_chunks:
        module = _unwrap(chunk)
        names = global_names(module)
        for local, param in module.named_parameters():
            gname = names[local]
            m = _LAYER.match(gname)
            if m and (local_suffix := _te_to_local(m.group(2))):
                gname = f"decoder.layers.{m.group(1)}.{local_suffix}"
            yield module, local, gname, param


def _expert_shards(gname: str, full: torch.Tensor, ep_group,
                   n_local: int) -> list[tuple[str, torch.Tensor]]:
    """One expert weight of every EP rank: ``[(full-layout name, tensor)]`` for local expert
    ``j`` of ranks ``0..ep-1`` (all_gather over ``ep_group``)."""
    ep_rank, ep_size = group_coords(ep_group)
    if ep_size == 1:
        return [(gname, full)]
    shards = [torch.empty_like(full) for _ in range(ep_size)]
    dist.all_gather(shards, full.contiguous(), group=ep_group)
    m = _LAYER.match(gname)
    e = _EXPERT.match(m.group(2))
    local = int(e.group(1)) - ep_rank * n_local
    return [(f"decoder.layers.{m.group(1)}.mlp.experts.local_experts.{r * n_local + local}"
             f".linear_fc{e.group(2)}.weight", t) for r, t in enumerate(shards)]


def iter_hf_weights(model_chunks, hf_config,
                    tp_group=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream this pipeline stage's weights as full HF tensors, one parameter at a time.

    ``model_chunks``: this rank's chunks (one per virtual stage; DDP/Float16 wrappers are
    unwrapped). Each TP-sharded parameter is all-gathered over ``tp_group`` (None: no TP);
    each expert weight over its layer's expert-TP group, then over the expert-parallel
    group (every EP rank then yields every expert). So **every rank of the TP and EP groups
    must iterate in lockstep** (same order, to the end or to the same point); they then
    receive the same full tensors and the caller chooses who consumes them (e.g. TP-rank 0
    only). No pipeline communication happens: each PP stage yields its own layers (global
    indices), the first stage also the embedding, the last the final norm and ``lm_head``
    (a tied model's last-stage copy of the embedding is skipped, HF has none).
    Concatenating all stages' outputs gives every HF tensor exactly once.

    Tensors that need no gathering or fusing are views of the live parameters: copy them
    if they must outlive the next optimizer step. Peak extra memory: one full parameter
    (``ep`` of them for an expert weight).
    """
    layout = HFLayout.from_config(hf_config)
    for module, local, gname, param in _global_params(model_chunks):
        if gname == "output_layer.weight" and layout.tied:
            continue
        groups = expert_groups(module, local)
        if groups is None:
            full = _gather_tp(gname, param, module.config, tp_group)
            yield from megatron_to_hf_tensors(gname, full, layout)
            continue
        experts, etp_group, ep_group = groups
        full = _gather_tp(gname, param, module.config, etp_group)
        for name, tensor in _expert_shards(gname, full, ep_group, experts.num_local_experts):
            yield from megatron_to_hf_tensors(name, tensor, layout)


@torch.no_grad()
def load_hf_weights(model_chunks, get_hf_tensor: Callable[[str], torch.Tensor], hf_config,
                    tp_rank: int, tp_size: int) -> None:
    """Copy HF weights into this rank's chunks, reading only the tensors the rank needs.

    ``get_hf_tensor(hf_name)`` returns one full HF tensor (e.g. from ``safe_open``); each is
    fused to the full layout, then this rank's TP slice (vocab zero-padded) is copied in;
    an expert-parallel rank reads only its own experts, each sliced over its expert TP
    group. Peak extra memory: one full fused tensor. No communication.
    """
    layout = HFLayout.from_config(hf_config)
    for module, local, gname, param in _global_params(model_chunks):
        srcs = hf_sources(gname, layout)
        full = hf_to_megatron_tensor(gname, [get_hf_tensor(s) for s in srcs], layout)
        rank, size = shard_coords(module, local, tp_rank, tp_size)  # expert TP for experts
        param.copy_(tp_slice(gname, full, param, module.config, rank, size))
