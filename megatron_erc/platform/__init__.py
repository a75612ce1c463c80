"""Device/backend selection and the CPU adaptation layer for megatron-core.

Call :func:`setup` once at start-up (before building models or process groups). On a CUDA
machine it only reports CUDA + NCCL; on a CPU-only machine it also applies the small set of
adaptations megatron-core 0.16 needs to run over gloo (see ``cpu_megatron``).
:func:`adapt_transformer_kwargs` holds the platform's choices in megatron's
``TransformerConfig`` (fusions off on CPU), :func:`require_supported_megatron` the release
check every user of private megatron-core APIs calls.
"""

from megatron_erc.platform.device import Platform, detect, setup
from megatron_erc.platform.distributed import adapt_parallel_config, init_model_parallel
from megatron_erc.platform.transformer_config import adapt_transformer_kwargs
from megatron_erc.platform.version import UnsupportedMegatronError, require_supported_megatron

__all__ = ["Platform", "detect", "setup", "init_model_parallel", "adapt_parallel_config",
           "adapt_transformer_kwargs", "require_supported_megatron", "UnsupportedMegatronError"]
