"""The platform's choices in megatron's ``TransformerConfig`` (before it is built).

On CUDA, megatron-core's defaults stand; the one exception is a request megatron cannot
serve without an extension (see ``adapt_transformer_kwargs``). On CPU, every fusion is off,
whatever was asked: each is an apex/Transformer Engine/CUDA kernel or a compiled fusion.

- ``gradient_accumulation_fusion``: apex's CUDA extension ``fused_weight_gradient_mlp_cuda``
  (GPTModel's output layer is megatron's own linear layer, which needs it even with
  Transformer Engine's spec);
- ``apply_rope_fusion``: Transformer Engine's fused RoPE kernel;
- ``masked_softmax_fusion``: megatron's fused CUDA softmax kernels;
- ``persist_layer_norm``: apex's persistent layer-norm kernel;
- ``bias_activation_fusion``, ``bias_dropout_fusion``: megatron's ``jit_fuser``
  (``torch.compile``): on CPU a C++ toolchain and a long first step, for element-wise ops.

On CPU, weights are also initialised in full, then split (``use_cpu_initialization``), so a
TP run starts from the same weights as TP=1 for the same seed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from megatron_erc.platform.device import Platform, detect

CPU_FUSIONS_OFF = ("gradient_accumulation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                   "persist_layer_norm", "bias_activation_fusion", "bias_dropout_fusion")
"""``TransformerConfig`` fusion switches the CPU platform turns off."""


def megatron_default(field: str) -> Any:
    """The default of one ``TransformerConfig`` field in the installed megatron-core."""

    from megatron.core.transformer import TransformerConfig

    return {f.name: f.default for f in dataclasses.fields(TransformerConfig)}[field]


def _module_available(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def adapt_transformer_kwargs(kwargs: dict[str, Any],
                             platform: Platform | None = None) -> dict[str, Any]:
    """``TransformerConfig`` keyword arguments adjusted for ``platform`` (a new dict).

    CPU: the fusions above are off and ``use_cpu_initialization`` defaults to on. CUDA: the
    keys are left as given (megatron's defaults where absent), except that gradient-
    accumulation fusion is switched off when it would be on but apex's extension is not
    importable (megatron's linear layers raise at construction otherwise).
    """
    platform = platform or detect()
    out = dict(kwargs)
    if platform.is_cpu:
        out.update(dict.fromkeys(CPU_FUSIONS_OFF, False))
        out.setdefault("use_cpu_initialization", True)
        return out
    wants_fusion = out.get("gradient_accumulation_fusion",
                           megatron_default("gradient_accumulation_fusion"))
    if wants_fusion and not _module_available("fused_weight_gradient_mlp_cuda"):
        # apex is not on the package index, so a plain install lacks the fused wgrad GEMM;
        # off, megatron computes the weight gradient with an ordinary matmul.
        out["gradient_accumulation_fusion"] = False
    return out
