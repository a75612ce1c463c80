"""Megatron GPT models built from Hugging Face configs, and their weight layouts."""

from megatron_erc.models.gpt import (
    ParallelConfig,
    build_gpt_model,
    build_model_chunks,
    padded_vocab_size,
    transformer_config_from_hf,
)

__all__ = ["ParallelConfig", "build_gpt_model", "build_model_chunks", "padded_vocab_size",
           "transformer_config_from_hf"]
