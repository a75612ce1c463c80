"""The fused output layer wired into megatron's GPTModel: the last stage's output layer hands
back its input (the final-norm hidden states) instead of logits, and log-probs and entropy come
from ``ops.fused_logprobs_and_entropy`` with the output weight, so the ``[T, V/tp]`` logits
are never formed (GPUs with Triton; CI runs it under ``TRITON_INTERPRET=1``).

The model's output then is ``[b, s, H]`` hidden states where it was ``[b, s, V/tp]`` logits;
``FusedOutput.logprobs`` takes its place for the loss. Under sequence parallelism the hidden
states are gathered over TP first (as ``ColumnParallelLinear`` does), and that gather's
backward reduces the hidden gradient, so the fused op must not reduce it again.
"""

from __future__ import annotations

import torch

from megatron_erc.ops.fused_linear import fused_logprobs_and_entropy


class FusedOutput:
    """Patches the output layers of ``chunks`` (those with ``post_process``)."""

    def __init__(self, chunks, sequence_parallel: bool):
        self.sequence_parallel = sequence_parallel
        self.weight: torch.Tensor | None = None
        for chunk in chunks:
            if getattr(chunk, "post_process", False):
                self._patch(chunk.output_layer)

    def _patch(self, layer) -> None:
        def forward(input_, weight=None, runtime_gather_output=None):
            # tied embeddings: GPTModel passes the shared weight; else the layer's own
            self.weight = weight if weight is not None else layer.weight
            if self.sequence_parallel:
                from megatron.core.tensor_parallel import gather_from_sequence_parallel_region

                input_ = gather_from_sequence_parallel_region(input_,
                                                              tensor_parallel_output_grad=True)
            return input_, None

        layer.forward = forward

    def logprobs(self, hidden: torch.Tensor, labels: torch.Tensor, *, tp_group, tp_rank: int,
                 vocab_size: int, chunk_mb: int, **kwargs):
        """``(logp, entropy)`` ``[b, s]`` from the model's ``[b, s, H]`` output."""
        if self.weight is None:
            raise RuntimeError("the fused output layer has not run a forward on this rank")
        weight = self.weight.to(hidden.dtype) if self.weight.dtype != hidden.dtype \
            else self.weight
        return fused_logprobs_and_entropy(
            hidden, weight, labels, tp_group=tp_group, vocab_start=tp_rank * weight.shape[0],
            vocab_size=vocab_size, reduce_hidden_grad=not self.sequence_parallel,
            chunk_mb=chunk_mb, **kwargs)
