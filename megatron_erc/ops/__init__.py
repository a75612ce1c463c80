"""Parallel kernels over sharded tensors. Every function takes its process group."""

from megatron_erc.ops.vocab_parallel import logprobs_and_entropy

__all__ = ["logprobs_and_entropy"]
