"""Build megatron-core ``GPTModel`` s from Hugging Face Llama / Qwen2 / Qwen3 configs.

The mapping covers what these families need: RMSNorm, SwiGLU, RoPE with the config's
theta, grouped-query attention, Qwen2's qkv bias, Qwen3's per-head q/k RMSNorm
(``qk_layernorm``) and explicit ``head_dim`` (``kv_channels``), tied or untied embeddings, and a
vocabulary padded to a multiple of ``pad_multiple * tp`` (megatron shards the embedding and
output layer evenly; the padding rows are masked out of every probability downstream).
Transformer Engine's layer spec is used when TE is importable, the local spec otherwise.

megatron-core is imported inside the functions that use it: it takes seconds to
import, and the commands check their inputs before it loads.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F

from megatron_erc.models.moe import LOAD_BALANCING_TYPES, is_moe, moe_transformer_kwargs
from megatron_erc.models.support import (
    check_supported,
    has_qk_norm,
    has_qkv_bias,
    head_dim,
    hf_field,
    rope_theta,
)
from megatron_erc.platform import adapt_parallel_config, adapt_transformer_kwargs, detect

RECOMPUTE_CHOICES = ("none", "selective", "full")


@dataclasses.dataclass(kw_only=True)
class ParallelConfig:
    """How a model is split across ranks."""

    tp: int = 1
    """Tensor-parallel size: attention heads, MLP and vocabulary are sharded over it."""
    pp: int = 1
    """Pipeline-parallel size: layers are split into ``pp`` stages."""
    vpp: int | None = None
    """Virtual pipeline stages per pipeline rank (interleaved schedule); None = off."""
    sequence_parallel: bool = False
    """Shard activations outside attention/MLP along the sequence over the TP group."""
    pad_vocab_multiple: int = 128
    """The vocabulary is padded to a multiple of ``pad_vocab_multiple * tp``."""
    params_dtype: str = "float32"
    """Parameter dtype: float32 or bfloat16."""
    distributed_timeout_min: float = 60.0
    """Timeout (minutes) of every collective, in ``init_process_group`` and megatron's
    groups. NCCL's default of 10 is shorter than a long rollout or a validation pass."""
    recompute: str = "none"
    """Activation recompute, trading backward-pass compute for activation memory:
    ``"none"`` keeps every activation for backward; ``"selective"`` recomputes core attention
    only (megatron's ``recompute_modules=["core_attn"]``: the ``[b, heads, s, s]`` scores and
    probabilities, the activations that grow with the square of the sequence, for a small
    fraction of the FLOPs); ``"full"`` keeps only the input of each recomputed transformer
    layer and reruns the layer's forward in backward (about one extra forward pass)."""
    fused_output_layer: bool | None = None
    """Compute log-probs and entropy straight from the output layer's input and weight
    (``ops.fused_logprobs_and_entropy``, Triton), never forming the ``[T, V/tp]`` logits.
    None: on where Triton and a GPU are available; True: required (an error elsewhere)."""
    recompute_layers: int | None = None
    """With ``recompute="full"``: how many transformer layers of each pipeline stage (of each
    virtual stage with ``vpp``) are recomputed, counted from the stage's first layer; the
    others keep their activations (megatron's ``recompute_method="block"``). None = all."""
    ep: int = 1
    """Expert-parallel size (MoE models): each sparse layer's experts are split over ``ep``
    ranks, tokens reach them through megatron's all-to-all dispatcher. Carved out of the
    data-parallel ranks: ``ep`` must divide ``world / (tp * pp)`` (and the experts)."""
    etp: int | None = None
    """Expert tensor-parallel size: each expert's MLP is sharded over ``etp`` ranks.
    None = ``tp`` (megatron's default); 1 keeps every expert whole on its rank."""
    moe_load_balancing: str = "aux_loss"
    """MoE load-balancing loss: ``aux_loss`` (Switch-style, per micro-batch), ``seq_aux_loss``
    (per sequence) or ``none``; logged as ``moe/aux_loss``."""
    moe_aux_loss_coeff: float | None = None
    """Coefficient of the load-balancing loss; None = the HF config's
    ``router_aux_loss_coef``. 0 turns the loss off."""
    moe_z_loss_coeff: float = 0.0
    """Coefficient of the router z-loss (``mean(logsumexp(router logits)^2)``); 0 = off."""

    def __post_init__(self):
        for name in ("tp", "pp", "pad_vocab_multiple"):
            if getattr(self, name) < 1:
                raise ValueError(f"parallel.{name} must be >= 1, got {getattr(self, name)}")
        if self.vpp is not None and (self.vpp < 2 or self.pp < 2):
            raise ValueError("parallel.vpp (virtual pipeline stages) needs pp >= 2 and vpp >= 2; "
                             f"got pp={self.pp}, vpp={self.vpp}. Set vpp to null to disable it.")
        if self.sequence_parallel and self.tp == 1:
            raise ValueError("parallel.sequence_parallel needs tp >= 2; set it to false at tp=1")
        if not self.distributed_timeout_min > 0:
            raise ValueError(f"parallel.distributed_timeout_min must be > 0 (minutes), got "
                             f"{self.distributed_timeout_min}")
        if self.params_dtype not in ("float32", "bfloat16"):
            raise ValueError(f"parallel.params_dtype must be float32 or bfloat16, "
                             f"got {self.params_dtype!r}")
        if self.recompute not in RECOMPUTE_CHOICES:
            raise ValueError(f"parallel.recompute must be one of {', '.join(RECOMPUTE_CHOICES)}, "
                             f"got {self.recompute!r}")
        if self.ep < 1 or (self.etp is not None and self.etp < 1):
            raise ValueError(f"parallel.ep and parallel.etp must be >= 1, got ep={self.ep}, "
                             f"etp={self.etp}")
        if self.moe_load_balancing not in LOAD_BALANCING_TYPES:
            raise ValueError(f"parallel.moe_load_balancing must be one of "
                             f"{', '.join(LOAD_BALANCING_TYPES)}, got {self.moe_load_balancing!r}")
        for name in ("moe_aux_loss_coeff", "moe_z_loss_coeff"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise ValueError(f"parallel.{name} must be >= 0, got {value}")
        if self.recompute_layers is not None:
            if self.recompute != "full":
                raise ValueError(
                    f"parallel.recompute_layers applies to recompute=full only (recompute is "
                    f"{self.recompute!r}); set recompute=full or recompute_layers to null")
            if self.recompute_layers < 1:
                raise ValueError(
                    f"parallel.recompute_layers must be >= 1 (null = every layer), got "
                    f"{self.recompute_layers}; use recompute=none to recompute nothing")

    def recompute_kwargs(self, layers_per_stage: int) -> dict:
        """megatron ``TransformerConfig`` recompute arguments for ``layers_per_stage``
        transformer layers per (virtual) pipeline stage."""
        if self.recompute == "none":
            return {}
        if self.recompute == "selective":
            # recompute_modules keeps megatron's default, ["core_attn"].
            return {"recompute_granularity": "selective"}
        layers = self.recompute_layers or layers_per_stage
        if layers > layers_per_stage:
            raise ValueError(
                f"parallel.recompute_layers={layers} exceeds the {layers_per_stage} transformer "
                f"layers of each pipeline stage; set it to at most {layers_per_stage} "
                "(or null for all)")
        # "block" recomputes the first `layers` layers of each stage, each layer its own
        # checkpoint (only its input is kept); with all layers it equals uniform/1.
        return {"recompute_granularity": "full", "recompute_method": "block",
                "recompute_num_layers": layers}


def padded_vocab_size(vocab_size: int, tp: int, multiple: int) -> int:
    """Smallest multiple of ``multiple * tp`` that holds ``vocab_size`` ids."""
    step = multiple * tp
    return int(math.ceil(vocab_size / step) * step)


def transformer_config_from_hf(hf_config, parallel: ParallelConfig, *, platform=None,
                               **overrides):
    """A megatron ``TransformerConfig`` equivalent to an HF Llama/Qwen2/Qwen3 config.

    ``overrides`` are further ``TransformerConfig`` arguments; the platform (the detected one
    by default) then has the last word on what it cannot run (see
    ``megatron_erc.platform.adapt_transformer_kwargs``)."""
    from megatron.core.transformer import TransformerConfig

    check_supported(hf_config)  # model type, RoPE, MLP and attention biases
    heads = hf_config.num_attention_heads
    groups = hf_field(hf_config, "num_key_value_heads", heads)
    if groups % parallel.tp or heads % parallel.tp:
        raise ValueError(f"tp={parallel.tp} must divide the attention heads ({heads}) and the "
                         f"key/value heads ({groups}); choose a tp that divides both")
    layers = hf_config.num_hidden_layers
    stages = parallel.pp * (parallel.vpp or 1)
    if layers % stages:
        raise ValueError(f"{layers} layers cannot be split evenly into pp*vpp={stages} stages")
    platform = platform or detect()
    dtype = getattr(torch, parallel.params_dtype)
    kwargs = dict(
        num_layers=layers,
        hidden_size=hf_config.hidden_size,
        ffn_hidden_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_query_groups=groups,
        kv_channels=head_dim(hf_config),
        normalization="RMSNorm",
        layernorm_epsilon=float(hf_config.rms_norm_eps),
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=has_qkv_bias(hf_config),
        qk_layernorm=has_qk_norm(hf_config),
        hidden_dropout=0.0,
        attention_dropout=0.0,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        sequence_parallel=parallel.sequence_parallel,
        init_method_std=float(hf_field(hf_config, "initializer_range", 0.02)),
        **parallel.recompute_kwargs(layers // stages),
    )
    if is_moe(hf_config):
        if parallel.tp > 1 and not parallel.sequence_parallel:
            raise ValueError(f"a MoE model at parallel.tp={parallel.tp} needs "
                             "parallel.sequence_parallel=true (megatron-core's MoE layer "
                             "refuses tensor parallelism without it in training)")
        kwargs.update(moe_transformer_kwargs(hf_config, parallel))
    elif parallel.ep > 1:
        raise ValueError(f"parallel.ep={parallel.ep} needs a MoE model; "
                         f"{hf_config.model_type} has no experts: set parallel.ep=1")
    kwargs = adapt_transformer_kwargs({**kwargs, **overrides}, platform)
    return adapt_parallel_config(TransformerConfig(**kwargs), platform)


def layer_spec(config, vp_stage: int | None = None):
    """Transformer Engine's layer spec when TE is importable, megatron's local spec otherwise
    (with ``CausalGroupedAttention`` as its core attention); q/k norms per
    ``config.qk_layernorm``. MoE models get megatron's block spec for this (virtual) pipeline
    stage: an MoE or a dense layer spec per layer, as ``config.moe_layer_freq`` says."""
    from megatron.core.models.gpt import gpt_layer_specs

    try:
        import transformer_engine  # noqa: F401
        use_te = True
    except ImportError:
        use_te = False
    if config.num_moe_experts:
        spec = gpt_layer_specs.get_gpt_decoder_block_spec(
            config, use_transformer_engine=use_te, normalization="RMSNorm", vp_stage=vp_stage)
        layers = spec.layer_specs
    elif use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            qk_layernorm=config.qk_layernorm)
    else:
        spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm",
                                                        qk_layernorm=config.qk_layernorm)
        layers = [spec]
    if not use_te:
        from megatron_erc.models.causal_attention import CausalGroupedAttention

        for layer in layers:  # the dense and the MoE spec objects, each patched once is enough
            layer.submodules.self_attention.submodules.core_attention = CausalGroupedAttention
    return spec


def build_gpt_model(hf_config, parallel: ParallelConfig, *, pre_process: bool = True,
                    post_process: bool = True, vp_stage: int | None = None, config=None,
                    **overrides):
    """One megatron ``GPTModel`` (one pipeline chunk) for this rank."""
    from megatron.core.models.gpt import GPTModel

    config = config or transformer_config_from_hf(hf_config, parallel, **overrides)
    vocab = padded_vocab_size(hf_config.vocab_size, parallel.tp, parallel.pad_vocab_multiple)
    return GPTModel(
        config=config,
        transformer_layer_spec=layer_spec(config, vp_stage),
        vocab_size=vocab,
        max_sequence_length=int(hf_field(hf_config, "max_position_embeddings", 4096)),
        pre_process=pre_process,
        post_process=post_process,
        share_embeddings_and_output_weights=bool(hf_field(hf_config, "tie_word_embeddings",
                                                          False)),
        position_embedding_type="rope",
        rotary_base=rope_theta(hf_config),
        vp_stage=vp_stage,
    )


def build_model_chunks(hf_config, parallel: ParallelConfig, **overrides) -> list:
    """All model chunks of this pipeline rank (one per virtual stage), for the current
    megatron parallel state. Pipeline placement comes from ``parallel_state``."""
    from megatron.core import parallel_state as ps

    config = transformer_config_from_hf(hf_config, parallel, **overrides)
    if config.num_moe_experts:
        state = (ps.get_expert_model_parallel_world_size(),
                 ps.get_expert_tensor_parallel_world_size())
        if state != (config.expert_model_parallel_size, config.expert_tensor_parallel_size):
            raise ValueError(
                f"parallel.ep={parallel.ep}, etp={parallel.etp} but megatron's parallel state "
                f"has expert-parallel size {state[0]}, expert-TP size {state[1]}: initialise it "
                "with init_model_parallel(..., expert_model_parallel_size=ep, "
                "expert_tensor_parallel_size=etp or tp)")
    chunks = []
    for vp in range(parallel.vpp or 1):
        vp_stage = vp if parallel.vpp else None
        chunks.append(build_gpt_model(
            hf_config, parallel, config=config, vp_stage=vp_stage,
            pre_process=ps.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage),
            post_process=ps.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)))
    if config.params_dtype != torch.float32:
        # Layers honour params_dtype, but the local spec's torch norms are created in fp32;
        # megatron's training wraps models in Float16Module, which casts everything. Cast
        # the same way (without the wrapper, so parameter names stay those of GPTModel), or
        # the mixed-precision optimizer's state would not line up with the model's.
        chunks = [c.to(config.params_dtype) for c in chunks]
    return chunks
