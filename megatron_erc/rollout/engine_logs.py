"""vLLM's own output goes to a file (``RUN_DIR/logs/engine.log``), not the console.

Two channels carry it:

* vLLM's Python logging (logger ``vllm``): configured by vLLM itself from
  ``VLLM_LOGGING_CONFIG_PATH`` (a ``logging.dictConfig`` JSON) at import and again in every
  ``vllm.LLM(...)`` and in every worker process it spawns. ``engine_output_to`` writes such a
  file with one file handler at ``rollout.engine_log_level`` and points the variable at it.
* Everything else it prints while starting (tqdm bars while loading shards, C++ warnings of
  its CPU kernels, Python warnings at import, whatever its worker processes write): file
  descriptors 1 and 2 point at the log file while the engine starts. Worker processes are
  spawned then and keep writing there for their whole life.

``HarmlessEngineMessages`` drops two messages that look like failures but are not (each
explained below); everything else vLLM logs stays in the file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


class HarmlessEngineMessages(logging.Filter):
    """Drops vLLM log records that read as failures in a healthy run.

    * ``Chat template warmup failed`` (with a traceback ending in "Tokenizer not available
      when `skip_tokenizer_init=True`"): every ``vllm.LLM`` renders a chat message at start
      to compile its Jinja template, without checking ``skip_tokenizer_init``. We skip the
      tokenizer on purpose: prompts arrive as token ids (our tokenizer may be a SentencePiece
      file vLLM cannot load) and responses leave as token ids (``detokenize=False``), so no
      chat template is ever rendered. vLLM 0.32 ``renderers/base.py: warmup``.
    * ``RotaryEmbedding: Failed to load weights`` after each in-place weight reload: vLLM's
      layer-wise reload counts every buffer of a layer as loadable, including the rotary
      layer's non-persistent ``cos_sin_cache``, which is computed from the config and is in no
      checkpoint (vLLM's own Qwen2/Llama loaders skip ``rotary_emb`` names, so we cannot send
      it). Finding nothing loaded, vLLM puts the original cache back: exactly what it should
      hold. vLLM 0.32 ``model_loader/reload/layerwise.py: finalize_layerwise_processing``.
      The test that compares a synced engine with a fresh one proves the outputs are right
      (tests/distributed/test_vllm_rollout_tp.py).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.msg if isinstance(record.msg, str) else ""
        if msg.startswith("Chat template warmup failed") and _skipped_tokenizer(record):
            return False
        if msg == "%s: Failed to load weights" and record.args == ("RotaryEmbedding",):
            return False
        return True


def _skipped_tokenizer(record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return exc is not None and "skip_tokenizer_init" in str(exc)


def logging_config(log_file: str | os.PathLike, level: str) -> dict:
    """``logging.dictConfig`` for vLLM: its loggers write to ``log_file`` only."""
    return {
        "version": 1,
        "disable_existing_loggers": False,  # leave the loggers of everything else alone
        "filters": {"harmless": {"()": f"{__name__}.HarmlessEngineMessages"}},
        "formatters": {"engine": {
            "format": "%(asctime)s %(levelname)s [%(processName)s %(process)d] "
                      "%(name)s: %(message)s"}},
        "handlers": {"engine_file": {
            "class": "logging.FileHandler", "filename": os.fspath(log_file), "mode": "a",
            "formatter": "engine", "filters": ["harmless"], "level": level}},
        "loggers": {"vllm": {"handlers": ["engine_file"], "level": level,
                             "propagate": False}},
    }


@contextlib.contextmanager
def engine_output_to(log_file: str | os.PathLike | None, level: str = "INFO"):
    """While the engine starts: vLLM's logging (this process and the workers it spawns) goes
    to ``log_file`` at ``level``, and so does anything written to stdout/stderr. The logging
    setting stays for the engine's life (its processes exist by then; the environment is
    restored). None: nothing changes (vLLM logs to the console)."""
    if log_file is None:
        yield
        return
    if level not in LEVELS:
        raise ValueError(f"engine log level {level!r}: use one of {LEVELS}")
    log_file = Path(log_file)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    config = log_file.with_name(log_file.stem + ".logging.json")
    config.write_text(json.dumps(logging_config(log_file, level), indent=1))
    # Read by vLLM at import, in vllm.LLM() and in every process it spawns; restored
    # afterwards, so a later engine without a log file logs to the console again.
    env = {"VLLM_LOGGING_CONFIG_PATH": os.fspath(config.resolve()), "VLLM_LOGGING_LEVEL": level}
    before = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        if "vllm" in sys.modules:  # already imported: apply now (vllm.LLM() does it again)
            import logging.config

            logging.config.dictConfig(logging_config(log_file, level))
        with _descriptors_to(log_file):
            yield
    finally:
        for k, v in before.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def _descriptors_to(path: Path):
    """File descriptors 1 and 2 -> ``path`` (appending), restored afterwards."""
    sys.stdout.flush()
    sys.stderr.flush()
    saved = [os.dup(1), os.dup(2)]
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    try:
        os.dup2(fd, 1)
        os.dup2(fd, 2)
        yield
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for f in (fd, *saved):
            os.close(f)
