"""Prompt datasets, chat templates, tokenizers and the generated arithmetic task."""

from megatron_erc.data.arithmetic import (
    ArithmeticProblem,
    generate_problems,
    write_arithmetic_jsonl,
)
from megatron_erc.data.prompts import (
    PLAIN_TEMPLATE,
    PromptDataConfig,
    PromptDataset,
    PromptFileError,
    PromptRecord,
    PromptSample,
    read_prompt_records,
    render_prompt,
)
from megatron_erc.data.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    Tokenizer,
    load_tokenizer,
    train_sentencepiece,
)

__all__ = [
    "PLAIN_TEMPLATE",
    "ArithmeticProblem",
    "HFTokenizer",
    "PromptDataConfig",
    "PromptDataset",
    "PromptFileError",
    "PromptRecord",
    "PromptSample",
    "SentencePieceTokenizer",
    "Tokenizer",
    "generate_problems",
    "load_tokenizer",
    "read_prompt_records",
    "render_prompt",
    "train_sentencepiece",
    "write_arithmetic_jsonl",
]
