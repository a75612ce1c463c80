"""Parallel kernels over sharded tensors. Every function takes its process group."""

from megatron_erc.ops.fused_linear import fused_available, fused_logprobs_and_entropy
from megatron_erc.ops.vocab_parallel import logprobs_and_entropy

__all__ = ["fused_available", "fused_logprobs_and_entropy", "logprobs_and_entropy"]
