"""Prompt datasets: JSONL / Parquet files -> rendered, tokenised prompts with answers.

Each record needs a string prompt and an answer (string, or a number converted with
``str``); every other field travels along as ``meta`` and reaches the reward function as
``**meta``. Prompts are rendered with the tokenizer's chat template when it has one, else
with :data:`PLAIN_TEMPLATE`, then tokenised; prompts over ``max_prompt_tokens`` are
dropped (and counted) or cut from the left.
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from megatron_erc.data.tokenizers import Tokenizer
from megatron_erc.errors import UserError

logger = logging.getLogger(__name__)

#: Fallback when the tokenizer has no chat template: a system block (only if a system
#: prompt is configured) and one user turn, ending where the assistant starts writing.
PLAIN_TEMPLATE = "{system_block}User: {prompt}\nAssistant:"
PLAIN_SYSTEM_BLOCK = "{system}\n\n"


class PromptFileError(UserError, ValueError):
    """A prompt file is missing, empty or has a malformed record; the message names the
    file and line (JSONL, 1-based) or row (Parquet, 0-based)."""

    kind = "data"


@dataclass(kw_only=True)
class PromptDataConfig:
    path: str
    """JSONL (one JSON object per line) or Parquet file of prompts."""
    prompt_field: str = "prompt"
    """Record field holding the prompt text (a string)."""
    answer_field: str = "answer"
    """Record field holding the reference answer given to the reward function."""
    file_format: Literal["auto", "jsonl", "parquet"] = "auto"
    """``auto`` picks by extension: ``.parquet`` -> Parquet, anything else -> JSONL."""
    max_prompt_tokens: int | None = 1024
    """Longest rendered prompt, in tokens; ``None`` for no limit."""
    overlong: Literal["drop", "truncate_left"] = "drop"
    """What to do with longer prompts: drop them (counted in ``data/dropped_overlong``) or
    keep their last ``max_prompt_tokens`` tokens (counted in ``data/truncated``)."""
    template: Literal["auto", "plain", "raw"] = "auto"
    """``auto``: the tokenizer's chat template if it has one, else :data:`PLAIN_TEMPLATE`;
    ``plain``: always :data:`PLAIN_TEMPLATE`; ``raw``: the prompt text as is."""
    system_prompt: str | None = None
    """Optional system message put before every prompt (not used with ``raw``)."""

    def __post_init__(self):
        if not self.path:
            raise ValueError("PromptDataConfig.path is empty; set it to a .jsonl or .parquet file")
        if not self.prompt_field or not self.answer_field:
            raise ValueError("prompt_field and answer_field must be non-empty field names")
        if self.prompt_field == self.answer_field:
            raise ValueError(
                f"prompt_field and answer_field are both {self.prompt_field!r}; "
                f"they must name different fields"
            )
        if self.file_format not in ("auto", "jsonl", "parquet"):
            raise ValueError(
                f"file_format must be 'auto', 'jsonl' or 'parquet', got {self.file_format!r}"
            )
        if self.max_prompt_tokens is not None and self.max_prompt_tokens < 1:
            raise ValueError(
                f"max_prompt_tokens must be a positive token count or None (no limit), "
                f"got {self.max_prompt_tokens}"
            )
        if self.overlong not in ("drop", "truncate_left"):
            raise ValueError(f"overlong must be 'drop' or 'truncate_left', got {self.overlong!r}")
        if self.template not in ("auto", "plain", "raw"):
            raise ValueError(f"template must be 'auto', 'plain' or 'raw', got {self.template!r}")
        if self.template == "raw" and self.system_prompt is not None:
            raise ValueError("system_prompt is ignored with template='raw'; remove one of them")


@dataclass
class PromptRecord:
    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)
    """The record's other fields."""
    source: str = ""
    """``file:line`` (JSONL) or ``file:row`` (Parquet), for error messages."""


@dataclass
class PromptSample:
    record: PromptRecord
    text: str
    """The rendered prompt (template applied; after left truncation if that happened)."""
    prompt_ids: list[int]
    """``text`` tokenised, at most ``max_prompt_tokens`` long."""

    @property
    def answer(self) -> str:
        return self.record.answer


def _check_record(obj, prompt_field: str, answer_field: str, where: str) -> PromptRecord:
    if not isinstance(obj, dict):
        raise PromptFileError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for name in (prompt_field, answer_field):
        if name not in obj:
            raise PromptFileError(
                f"{where}: missing field {name!r} (fields present: {sorted(obj)}); "
                "set data.prompt_field / data.answer_field to match the file"
            )
    prompt, answer = obj[prompt_field], obj[answer_field]
    if not isinstance(prompt, str):
        raise PromptFileError(
            f"{where}: field {prompt_field!r} must be a string, got {type(prompt).__name__}"
        )
    is_number = isinstance(answer, (int, float)) and not isinstance(answer, bool)
    if is_number and math.isfinite(answer):
        answer = str(answer)
    if not isinstance(answer, str):
        raise PromptFileError(
            f"{where}: field {answer_field!r} must be a string or number, "
            f"got {type(answer).__name__} {answer!r:.50}"
        )
    meta = {k: v for k, v in obj.items() if k not in (prompt_field, answer_field)}
    return PromptRecord(prompt=prompt, answer=answer, meta=meta, source=where)


def _read_jsonl(path: Path, prompt_field: str, answer_field: str) -> list[PromptRecord]:
    records = []
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, start=1):
            where = f"{path}:{lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{where}: not valid UTF-8 ({e})") from e
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: invalid JSON ({e.msg} at column {e.colno})") from e
            records.append(_check_record(obj, prompt_field, answer_field, where))
    return records


def _read_parquet(path: Path, prompt_field: str, answer_field: str) -> list[PromptRecord]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for corrupt files
        raise PromptFileError(f"{path}: cannot read as Parquet ({e})") from e
    for name in (prompt_field, answer_field):
        if name not in table.column_names:
            raise PromptFileError(
                f"{path}: missing column {name!r} (columns: {table.column_names}); "
                "set data.prompt_field / data.answer_field to match the file"
            )
    return [
        _check_record(row, prompt_field, answer_field, f"{path}:row {i}")
        for i, row in enumerate(table.to_pylist())
    ]


def read_prompt_records(
    path: str | Path,
    *,
    prompt_field: str = "prompt",
    answer_field: str = "answer",
    file_format: str = "auto",
) -> list[PromptRecord]:
    """Read and validate every record of a JSONL or Parquet prompt file."""
    path = Path(path)
    if not path.is_file():
        where = "" if path.is_absolute() else f" (looked for {path.resolve()})"
        raise PromptFileError(f"prompt file {str(path)!r} does not exist{where}; check the path")
    if file_format == "auto":
        file_format = "parquet" if path.suffix == ".parquet" else "jsonl"
    reader = _read_parquet if file_format == "parquet" else _read_jsonl
    records = reader(path, prompt_field, answer_field)
    if not records:
        raise PromptFileError(f"{path}: contains no prompts (the file is empty)")
    return records


def render_prompt(
    tokenizer: Tokenizer,
    prompt: str,
    *,
    template: str = "auto",
    system_prompt: str | None = None,
) -> str:
    """The text the policy sees: ``prompt`` put into the chat format (see
    :class:`PromptDataConfig.template`)."""
    if template == "raw":
        return prompt
    chat_template = getattr(tokenizer, "chat_template", None)
    if template == "auto" and chat_template:
        messages = [{"role": "user", "content": prompt}]
        if system_prompt is not None:
            messages.insert(0, {"role": "system", "content": system_prompt})
        return tokenizer.apply_chat_template(messages)
    system_block = PLAIN_SYSTEM_BLOCK.format(system=system_prompt) if system_prompt else ""
    return PLAIN_TEMPLATE.format(system_block=system_block, prompt=prompt)


class PromptDataset:
    """Rendered and tokenised prompts with their answers.

    ``stats`` holds ``data/num_records`` (read from the file), ``data/num_prompts`` (kept),
    ``data/dropped_overlong`` and ``data/truncated``.
    """

    def __init__(self, cfg: PromptDataConfig, tokenizer: Tokenizer):
        self.cfg = cfg
        records = read_prompt_records(
            cfg.path,
            prompt_field=cfg.prompt_field,
            answer_field=cfg.answer_field,
            file_format=cfg.file_format,
        )
        self.samples: list[PromptSample] = []
        dropped = truncated = 0
        limit = cfg.max_prompt_tokens
        for record in records:
            text = render_prompt(
                tokenizer, record.prompt, template=cfg.template, system_prompt=cfg.system_prompt
            )
            ids = tokenizer.encode(text)
            if limit is not None and len(ids) > limit:
                if cfg.overlong == "drop":
                    dropped += 1
                    continue
                # Keep the end: it holds the question and the assistant-turn marker.
                ids = ids[-limit:]
                text = tokenizer.decode(ids)
                truncated += 1
            self.samples.append(PromptSample(record=record, text=text, prompt_ids=ids))
        if not self.samples:
            raise PromptFileError(
                f"{cfg.path}: all {len(records)} prompts are longer than max_prompt_tokens="
                f"{limit}; raise data.max_prompt_tokens (and run.seq_len) or set "
                f"data.overlong=truncate_left"
            )
        if dropped:
            logger.warning(
                "%s: dropped %d of %d prompts longer than %d tokens",
                cfg.path,
                dropped,
                len(records),
                limit,
            )
        self.stats = {
            "data/num_records": len(records),
            "data/num_prompts": len(self.samples),
            "data/dropped_overlong": dropped,
            "data/truncated": truncated,
        }

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> PromptSample:
        return self.samples[i]

    def batches(
        self, batch_size: int, *, seed: int = 0, epoch: int = 0, shuffle: bool = True
    ) -> Iterator[list[PromptSample]]:
        """One epoch of full batches; the order depends only on ``(seed, epoch)``, so a
        resumed run replays the same prompts. The last partial batch is dropped."""
        if not 1 <= batch_size <= len(self):
            raise ValueError(
                f"batch_size must be between 1 and the number of prompts ({len(self)}), "
                f"got {batch_size}"
            )
        order = list(range(len(self)))
        if shuffle:
            random.Random(f"{seed}:{epoch}").shuffle(order)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            yield [self.samples[i] for i in order[start : start + batch_size]]
