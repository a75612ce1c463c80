"""Qwen3-MoE as megatron-core MoE layers: the HF config read once, in one place.

HF ``Qwen3MoeSparseMoeBlock`` routes each token with ``softmax(gate(x))``, keeps the top
``num_experts_per_tok`` experts and, with ``norm_topk_prob``, renormalises their weights to
sum to one; there is no shared expert. A layer ``i`` is sparse when ``i`` is not in
``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``; the other layers keep a dense
SwiGLU MLP of ``intermediate_size``.

In megatron-core the same router is ``TopKRouter`` with the softmax score function:
``moe_router_pre_softmax=True`` (softmax over all experts, then top-k) is
``norm_topk_prob=False``; ``False`` (top-k of the logits, softmax over those k) equals the
renormalised top-k of ``norm_topk_prob=True``. Experts are ``SequentialMLP`` (one megatron
MLP per local expert, no grouped GEMM: it needs Transformer Engine or the grouped_gemm CUDA
package, and the per-expert names keep one weight layout on every platform), tokens move
with megatron's all-to-all dispatcher (over gloo on CPU), dropless (no capacity factor).
"""

from __future__ import annotations

import torch

from megatron_erc.models.support import hf_field

MOE_MODEL_TYPES = ("qwen3_moe",)
LOAD_BALANCING_TYPES = ("aux_loss", "seq_aux_loss", "none")


def is_moe(config) -> bool:
    """Whether ``config`` (HF object or parsed config.json) is a mapped MoE model."""
    return hf_field(config, "model_type") in MOE_MODEL_TYPES


def num_experts(config) -> int:
    """Routed experts per sparse layer (``num_experts``; transformers 5 also names it
    ``num_local_experts``)."""
    return int(hf_field(config, "num_experts", hf_field(config, "num_local_experts", 0)))


def sparse_layers(config) -> list[bool]:
    """Per layer: True where HF builds a sparse MoE block, False for a dense MLP."""
    only_dense = set(hf_field(config, "mlp_only_layers", []) or [])
    step = int(hf_field(config, "decoder_sparse_step", 1))
    experts = num_experts(config)
    return [i not in only_dense and experts > 0 and (i + 1) % step == 0
            for i in range(int(hf_field(config, "num_hidden_layers")))]


def moe_unsupported(config) -> str | None:
    """Why a MoE config is not mapped, or None."""
    if num_experts(config) < 2:
        return f"num_experts={num_experts(config)}: a MoE model needs at least 2 experts"
    topk = int(hf_field(config, "num_experts_per_tok", 0))
    if not 1 <= topk <= num_experts(config):
        return (f"num_experts_per_tok={topk} must be between 1 and num_experts="
                f"{num_experts(config)}")
    if hf_field(config, "shared_expert_intermediate_size", 0):
        return "shared experts are not mapped (Qwen3-MoE has none)"
    return None


def _define_missing_te_gemm() -> None:
    """megatron-core 0.16.1's router gating linear tests ``te_general_gemm is not None``, but
    ``moe_utils`` only defines that name when Transformer Engine imports: without TE every
    MoE forward raises ``NameError``. Defined as None, the torch.mm path runs."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "HAVE_TE"):
        raise RuntimeError("megatron.core.transformer.moe.moe_utils changed (no HAVE_TE): "
                           "pin megatron-core==0.16.1")
    if not moe_utils.HAVE_TE and not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def moe_transformer_kwargs(hf_config, parallel) -> dict:
    """megatron ``TransformerConfig`` MoE arguments for ``hf_config`` and ``parallel``
    (``ep``, ``etp``, the load-balancing loss and z-loss coefficients)."""
    _define_missing_te_gemm()
    experts = num_experts(hf_config)
    if experts % parallel.ep:
        raise ValueError(f"parallel.ep={parallel.ep} must divide the {experts} experts; "
                         "choose an ep that divides num_experts")
    aux = parallel.moe_aux_loss_coeff
    if aux is None:  # the model's own coefficient (HF only applies it with labels)
        aux = float(hf_field(hf_config, "router_aux_loss_coef", 0.0))
    balancing = parallel.moe_load_balancing if aux > 0 else "none"
    return dict(
        num_moe_experts=experts,
        moe_router_topk=int(hf_config.num_experts_per_tok),
        moe_ffn_hidden_size=int(hf_config.moe_intermediate_size),
        moe_layer_freq=[int(s) for s in sparse_layers(hf_config)],
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(hf_field(hf_config, "norm_topk_prob", False)),
        moe_router_dtype="fp32",
        moe_router_load_balancing_type=balancing,
        moe_aux_loss_coeff=aux if balancing != "none" else 0.0,
        moe_z_loss_coeff=parallel.moe_z_loss_coeff or None,
        moe_token_dispatcher_type="alltoall",
        moe_grouped_gemm=False,
        moe_permute_fusion=False,
        moe_router_fusion=False,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp or parallel.tp,
    )


def moe_loss_metrics(num_microbatches: int, num_moe_layers: int) -> dict[str, float]:
    """``moe/aux_loss`` (the load-balancing loss) and ``moe/z_loss`` of the training forwards
    since the last call, without their coefficients: mean over the ``num_moe_layers`` MoE
    layers and this rank's ``num_microbatches``, averaged over data-parallel ranks, the same
    on every rank. Read from (then clears) megatron's aux-loss tracker, reduced as megatron
    does (summed over the pipeline and over a loss's TP share group); collective over the
    pipeline and data-parallel groups (``parallel_state``): every rank must call it.
    Empty when nothing was tracked (a dense model, or no training forward)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from megatron.core.transformer.moe import moe_utils

    tracker = moe_utils.get_moe_layer_wise_logging_tracker()
    names = {"load_balancing_loss": "moe/aux_loss", "seq_load_balancing_loss": "moe/aux_loss",
             "z_loss": "moe/z_loss"}
    present = sorted(n for n in tracker if n in names)
    if not present:
        return {}
    moe_utils.reduce_aux_losses_tracker_across_ranks(present)
    out = {}
    for name in present:
        values = tracker[name]["values"]  # [num_layers], each summed over micro-batches
        if tracker[name].get("reduce_group") is None:  # megatron averages over DP only then
            dist.all_reduce(values, group=ps.get_data_parallel_group(),
                            op=dist.ReduceOp.AVG)
        out[names[name]] = float(values.sum()) / max(num_moe_layers, 1) / max(
            num_microbatches, 1)
    moe_utils.clear_aux_losses_tracker()
    return out


class ExpertLoad:
    """Tokens routed to each expert of each MoE layer, counted by forward hooks on the
    routers of ``chunks`` (every forward, scoring and training alike)."""

    def __init__(self, chunks):
        from megatron.core.transformer.moe.router import TopKRouter

        self.counts: dict[int, torch.Tensor] = {}
        self._handles = [m.register_forward_hook(self._count) for c in chunks
                         for m in c.modules() if isinstance(m, TopKRouter)]

    def _count(self, router, inputs, output) -> None:
        _, routing_map = output  # [tokens, experts] bool
        counts = routing_map.sum(dim=0).double().detach()
        layer = router.layer_number
        self.counts[layer] = self.counts.get(layer, 0) + counts

    def metrics(self, num_layers: int, num_experts: int, group=None) -> dict[str, float]:
        """``moe/expert_load_max`` and ``moe/expert_load_min``: the busiest and idlest
        expert's tokens over the mean (1.0 = balanced), averaged over MoE layers, over every
        rank of ``group`` (None = the world: ranks route disjoint tokens or layers).
        Collective; resets the counts."""
        import torch.distributed as dist

        table = torch.zeros(num_layers, num_experts, dtype=torch.float64)
        for layer, counts in self.counts.items():
            table[layer - 1] += counts.cpu()
        if dist.is_initialized():
            dist.all_reduce(table, group=group)
        self.counts.clear()
        used = table[table.sum(dim=1) > 0]
        if not len(used):
            return {}
        ratio = used / used.mean(dim=1, keepdim=True)
        return {"moe/expert_load_max": float(ratio.max(dim=1).values.mean()),
                "moe/expert_load_min": float(ratio.min(dim=1).values.mean())}

    @property
    def routers(self) -> int:
        """How many routers of this rank are counted (0: a stage without MoE layers)."""
        return len(self._handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()


_FUSED_EXPERTS = ("mlp.experts.gate_up_proj", "mlp.experts.down_proj")


def checkpoint_views(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """An HF model's parameters under their checkpoint names: transformers 5 fuses a MoE
    layer's experts (``experts.gate_up_proj [E, 2I, H]`` = ``[gate; up]`` per expert,
    ``experts.down_proj [E, H, I]``); here each expert's ``gate_proj`` / ``up_proj`` /
    ``down_proj.weight`` is a view of them, as ``save_pretrained`` writes them and as weight
    syncs send them. Writing into a view writes the model. Other parameters as they are
    (``named_parameters``: a tied ``lm_head`` is left out, as in a checkpoint)."""
    out = {}
    for name, param in model.named_parameters():
        prefix, fused = next(((name[: -len(f)], f) for f in _FUSED_EXPERTS
                              if name.endswith(f)), (None, None))
        if fused is None:
            out[name] = param
            continue
        for e in range(param.shape[0]):
            base = f"{prefix}mlp.experts.{e}."
            if fused.endswith("gate_up_proj"):
                gate, up = param[e].chunk(2, dim=0)
                out[base + "gate_proj.weight"], out[base + "up_proj.weight"] = gate, up
            else:
                out[base + "down_proj.weight"] = param[e]
    return out
