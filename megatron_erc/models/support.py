"""Which Hugging Face models megatron-erc maps, decided in one place.

Llama and Qwen2 as their HF modules compute them: the default RoPE, a SiLU gated MLP without
bias, no Llama attention bias (HF then biases ``o_proj`` too, which megatron's
``add_qkv_bias`` does not cover) and no sliding window. The Megatron model builder, the
HF <-> Megatron weight adapter, the embedded engine's lean decode loop and the checks at
start all ask :func:`unsupported`, which reads an HF config object or a parsed config.json.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")


class UnsupportedModelError(ValueError):
    """The model's config asks for something the mapping does not cover."""


def hf_field(config, name: str, default: Any = None) -> Any:
    """``config.name`` (or ``config[name]`` for a parsed config.json), ``default`` when it is
    absent or None."""
    value = config.get(name) if isinstance(config, Mapping) else getattr(config, name, None)
    return default if value is None else value


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
    if model_type == "llama" and hf_field(config, "attention_bias", False):
        return "Llama attention_bias=True (biased o_proj) is not supported"
    if hf_field(config, "use_sliding_window", False):
        return "use_sliding_window=True is not supported (attention is over the whole sequence)"
    return None


def check_supported(config) -> None:
    """Raise :class:`UnsupportedModelError` with the reason when ``config`` is not mapped."""
    reason = unsupported(config)
    if reason is not None:
        raise UnsupportedModelError(reason)
