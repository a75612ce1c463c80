"""Which Hugging Face models megatron-erc maps, decided in one place.

Llama, Qwen2 and Qwen3 (dense) as their HF modules compute them: the default RoPE, a SiLU
gated MLP without bias, no Llama/Qwen3 attention bias (HF then biases ``o_proj`` too,
which megatron's ``add_qkv_bias`` does not cover) and no sliding window. Qwen3 adds a
per-head RMSNorm of queries and keys before RoPE (megatron's ``qk_layernorm``) and an
explicit ``head_dim`` that need not be ``hidden_size / heads`` (``kv_channels``).
Qwen3-MoE is Qwen3 with routed experts (``models/moe.py``).

The Megatron model builder, the HF <-> Megatron weight adapter, the embedded engine's lean
decode loop (Llama/Qwen2 only) and the checks at start all ask :func:`unsupported`, which
reads an HF config object or a parsed config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2", "qwen3", "qwen3_moe")
_QK_NORM_TYPES = ("qwen3", "qwen3_moe")


class UnsupportedModelError(ValueError):
    """The model's config asks for something the mapping does not cover."""


def hf_field(config, name: str, default: Any = None) -> Any:
    """``config.name`` (or ``config[name]`` for a parsed config.json), ``default`` when it is
    absent or None."""
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    return default if value is None else value


def has_qkv_bias(config) -> bool:
    """Whether q/k/v projections carry a bias (Qwen2 always; the others never, as mapped)."""
    return hf_field(config, "model_type") == "qwen2"


def has_qk_norm(config) -> bool:
    """Whether queries and keys are RMS-normalised per head before RoPE (Qwen3)."""
    return hf_field(config, "model_type") in _QK_NORM_TYPES


def head_dim(config) -> int:
    """The attention head size: the config's ``head_dim`` (Qwen3 sets it apart from the
    hidden size), else ``hidden_size / num_attention_heads``."""
    return int(hf_field(config, "head_dim",
                        hf_field(config, "hidden_size") // hf_field(config, "num_attention_heads")))


def rope_type(config) -> str:
    """The RoPE variant of the transformers-5 ``rope_parameters`` or the older
    ``rope_scaling`` (``rope_type``, or the legacy ``type``); ``"default"`` when neither
    names one."""
    for key in ("rope_parameters", "rope_scaling"):
        params = hf_field(config, key)
        if isinstance(params, Mapping):
            kind = params.get("rope_type", params.get("type")) or "default"
            if kind != "default":
                return kind
    return "default"


def rope_theta(config) -> float:
    """The RoPE base, from ``rope_parameters`` or the older top-level ``rope_theta``."""
    params = hf_field(config, "rope_parameters")
    if isinstance(params, Mapping) and params.get("rope_theta") is not None:
        return float(params["rope_theta"])
    return float(hf_field(config, "rope_theta", 10000.0))


def unsupported(config) -> str | None:
    """Why ``config`` is not a model this package maps, or None when it is."""
    model_type = hf_field(config, "model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        return (f"model_type {model_type!r} is not supported; supported: "
                f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    kind = rope_type(config)
    if kind != "default":
        return (f"RoPE type {kind!r} is not supported yet; only the default RoPE (Qwen2, "
                "Qwen2.5, DeepSeek-R1-Distill-Qwen, Llama 2) is mapped")
    act = hf_field(config, "hidden_act", "silu")
    if act != "silu":
        return f"hidden_act {act!r} is not supported; the mapped MLP is SwiGLU (silu)"
    if hf_field(config, "mlp_bias", False):
        return "mlp_bias=True is not supported (the mapped MLP has no bias)"
    if model_type != "qwen2" and hf_field(config, "attention_bias", False):
        return f"{model_type} attention_bias=True (biased o_proj) is not supported"
    if hf_field(config, "use_sliding_window", False):
        return "use_sliding_window=True is not supported (attention is over the whole sequence)"
    from megatron_erc.models.moe import is_moe, moe_unsupported  # moe.py reads hf_field

    return moe_unsupported(config) if is_moe(config) else None


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModelError` with the reason when ``config`` is not mapped."""
    reason = unsupported(config)
    if reason is not None:
        raise UnsupportedModelError(reason)
