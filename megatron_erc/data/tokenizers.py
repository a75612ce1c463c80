"""Tokenizers behind one small protocol: Hugging Face directories and SentencePiece models.

``encode`` never adds BOS/EOS or other special tokens: prompts are rendered to text first
(chat template included, which adds whatever markers the model expects) and then encoded
as they are, so nothing is added twice.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Protocol, runtime_checkable

#: Files of which a Hugging Face tokenizer directory holds at least one.
HF_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model")


@runtime_checkable
class Tokenizer(Protocol):
    """What the data pipeline and rollout need from a tokenizer.

    Implementations may also offer ``chat_template`` (``str | None``) and
    ``apply_chat_template(messages) -> str``; :func:`megatron_erc.data.prompts.render_prompt`
    uses them when present and falls back to a plain format otherwise.
    """

    @property
    def eos_token_id(self) -> int: ...

    @property
    def pad_token_id(self) -> int: ...

    @property
    def vocab_size(self) -> int:
        """Number of token ids, special and added tokens included (embedding rows needed)."""
        ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class HFTokenizer:
    """A Hugging Face tokenizer loaded from a local directory (no hub downloads)."""

    def __init__(self, path: str | os.PathLike):
        from transformers import AutoTokenizer

        if not Path(path).is_dir():
            raise FileNotFoundError(
                f"Hugging Face tokenizer directory {str(path)!r} does not exist; pass a local "
                f"directory containing tokenizer.json / tokenizer_config.json"
            )
        if not any((Path(path) / name).is_file() for name in HF_TOKENIZER_FILES):
            # AutoTokenizer would build an empty tokenizer from config.json alone
            raise FileNotFoundError(
                f"{str(path)!r} holds no tokenizer files ({', '.join(HF_TOKENIZER_FILES)}); "
                f"pass the tokenizer's directory or a SentencePiece '.model' file"
            )
        self.path = str(path)
        self.hf = AutoTokenizer.from_pretrained(self.path, local_files_only=True)
        if self.hf.eos_token_id is None:
            raise ValueError(f"tokenizer at {self.path!r} defines no eos_token; set one")

    @property
    def eos_token_id(self) -> int:
        return int(self.hf.eos_token_id)

    @property
    def pad_token_id(self) -> int:
        # Many causal-LM tokenizers have no pad token; padding is masked out anyway.
        pad = self.hf.pad_token_id
        return int(pad) if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return len(self.hf)  # hf.vocab_size leaves out added tokens

    @property
    def chat_template(self) -> str | None:
        return getattr(self.hf, "chat_template", None) or None

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: list[int]) -> str:
        return self.hf.decode(list(ids), skip_special_tokens=False)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> str:
        """Render ``messages`` with the tokenizer's template, ending with the prompt for
        the assistant's turn."""
        if self.chat_template is None:
            raise ValueError(f"tokenizer at {self.path!r} has no chat_template")
        return self.hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


class SentencePieceTokenizer:
    """A SentencePiece ``.model`` file. It has no chat template."""

    chat_template = None

    def __init__(self, model_file: str | os.PathLike):
        import sentencepiece as spm

        if not Path(model_file).is_file():
            raise FileNotFoundError(f"SentencePiece model file {str(model_file)!r} does not exist")
        self.path = str(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=self.path)
        if self.sp.eos_id() < 0:
            raise ValueError(
                f"SentencePiece model {self.path!r} was trained without an EOS piece "
                f"(eos_id=-1); retrain with eos_id >= 0"
            )

    @property
    def eos_token_id(self) -> int:
        return int(self.sp.eos_id())

    @property
    def pad_token_id(self) -> int:
        pad = self.sp.pad_id()
        return int(pad) if pad >= 0 else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        return int(self.sp.get_piece_size())

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def decode(self, ids: list[int]) -> str:
        return self.sp.decode([int(i) for i in ids])


def load_tokenizer(path: str | os.PathLike) -> HFTokenizer | SentencePieceTokenizer:
    """A directory loads as a Hugging Face tokenizer, a ``.model`` file as SentencePiece."""
    p = Path(path)
    if p.is_dir():
        return HFTokenizer(p)
    if p.suffix == ".model" and p.is_file():
        return SentencePieceTokenizer(p)
    raise ValueError(
        f"cannot load a tokenizer from {str(path)!r}: expected a local Hugging Face tokenizer "
        f"directory or a SentencePiece '.model' file"
    )


def train_sentencepiece(
    texts: Iterable[str],
    model_file: str | os.PathLike,
    *,
    vocab_size: int = 320,
    model_type: str = "bpe",
) -> SentencePieceTokenizer:
    """Train a small SentencePiece model in-process, write it to ``model_file`` and load it.

    ``byte_fallback=True`` makes every UTF-8 string encodable and round-trip exactly, which
    needs the 256 byte pieces plus the 4 special ones (ids: unk 0, bos 1, eos 2, pad 3), so
    ``vocab_size`` must exceed 260. The vocabulary may come out smaller than asked when the
    text is too small to support it (``hard_vocab_limit=False``).
    """
    import sentencepiece as spm

    if vocab_size <= 260:
        raise ValueError(
            f"vocab_size={vocab_size} is too small: byte_fallback needs 256 byte pieces plus "
            f"4 special tokens; use at least 300"
        )
    model_file = Path(model_file)
    if model_file.suffix != ".model":
        raise ValueError(f"model_file must end in '.model', got {str(model_file)!r}")
    model_file.parent.mkdir(parents=True, exist_ok=True)
    texts = [t for t in texts if t]
    if not texts:
        raise ValueError("train_sentencepiece needs at least one non-empty text")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts),
        model_prefix=str(model_file.with_suffix("")),
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=3,
        # Keep digits and whitespace exactly as written: arithmetic answers are digits.
        split_digits=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        num_threads=1,
        minloglevel=2,
    )
    return SentencePieceTokenizer(model_file)
