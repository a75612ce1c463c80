"""Every config section of a run, and YAML files with ``a.b.c=value`` overrides onto them.

One surface for every command: ``load_config(TrainConfig, "run.yaml", ["algo.erc.low=0.9"])``.
Unknown keys and invalid values are rejected at start with the dotted field name and what
the field accepts; each dataclass's own ``__post_init__`` does the value checks, and
``TrainConfig`` / ``SFTConfig`` the checks across sections.

The section classes live next to the code that reads them and are all importable from here:

========================  ===================================================
``run``                   :class:`RunConfig`
``model``                 :class:`ModelConfig`
``parallel``              :class:`ParallelConfig` (``models/gpt.py``)
``optim``                 :class:`OptimConfig` (``trainer/actor.py``)
``rollout``               :class:`RolloutConfig`
``algo``                  :class:`PolicyLossConfig`, ``algo.erc``: :class:`ErcConfig`
``overlong``              :class:`OverlongConfig`
``data``                  :class:`PromptDataConfig` (``data/prompts.py``)
``validation``            :class:`ValidationConfig`
``checkpoint``            :class:`CheckpointConfig`
========================  ===================================================

``TrainConfig`` (``megatron-erc train`` / ``eval``) and ``SFTConfig`` (``sft``) are in
``trainer/config.py`` with ``run``, ``model``, ``rollout``, ``validation`` and ``checkpoint``.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from pathlib import Path
from typing import Any

import yaml

from megatron_erc.algorithms.config import ErcConfig, OverlongConfig, PolicyLossConfig
from megatron_erc.data.prompts import PromptDataConfig
from megatron_erc.errors import ConfigError
from megatron_erc.models.gpt import ParallelConfig
from megatron_erc.trainer.actor import OptimConfig
from megatron_erc.trainer.config import (
    CheckpointConfig,
    ModelConfig,
    RolloutConfig,
    RunConfig,
    SFTConfig,
    TrainConfig,
    ValidationConfig,
)

__all__ = ["CheckpointConfig", "ConfigError", "ErcConfig", "ModelConfig", "OptimConfig",
           "OverlongConfig", "ParallelConfig", "PolicyLossConfig", "PromptDataConfig",
           "RolloutConfig", "RunConfig", "SFTConfig", "TrainConfig", "ValidationConfig",
           "from_dict", "load_config", "to_dict"]

# Fields that were removed or never had an effect: setting one is an error that says where
# the setting lives (an unknown-field message alone would not).
MOVED_FIELDS = {
    "run.warmup_steps": "optim.warmup_steps (run.warmup_steps was never read: the learning-"
                        "rate warmup is the optimizer's)",
}


def load_config(cls, path: str | Path | None = None, overrides: list[str] = ()):
    """Build ``cls`` from a YAML file (optional) with ``key.path=value`` overrides on top."""
    data: dict = {}
    if path is not None:
        if not Path(path).is_file():
            raise ConfigError(f"--config {path}: no such file; pass a YAML config such as "
                              "examples/tiny/dapo_erc.yaml")
        text = Path(path).read_text()
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} must look like section.field=value")
        _set_dotted(data, key.strip(), yaml.safe_load(raw) if raw.strip() else None)
    return from_dict(cls, data)


def _set_dotted(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for p in parts[:-1]:
        if not isinstance(node.get(p), dict):
            node[p] = {}
        node = node[p]
    node[parts[-1]] = value


def from_dict(cls, data: Any, prefix: str = ""):
    """Instantiate dataclass ``cls`` from a mapping, recursively, naming fields on error."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    where = f"{prefix}." if prefix else ""
    for u in unknown:
        if where + u in MOVED_FIELDS:
            raise ConfigError(f"{where}{u} is not a config field; set {MOVED_FIELDS[where + u]}")
    if unknown:
        raise ConfigError(f"unknown config field(s) {', '.join(where + u for u in unknown)}; "
                          f"valid fields here: {', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in data.items():
        kwargs[name] = _convert(hints[name], value, f"{prefix}.{name}" if prefix else name)
    try:
        return cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or 'config'}: {e}") from None


def _convert(tp, value: Any, name: str):
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            if len(args) < len(typing.get_args(tp)):
                return None
            raise ConfigError(f"{name} may not be null")
        for a in args:
            if dataclasses.is_dataclass(a) or len(args) == 1:
                return _convert(a, value, name)
        return _convert(args[0], value, name) if _fits(args[0], value) else value
    if dataclasses.is_dataclass(tp):
        if dataclasses.is_dataclass(value):
            return value
        return from_dict(tp, value, name)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads "1e-5" (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if tp in (int, float, str, bool) and not _fits(tp, value):
        raise ConfigError(f"{name} must be of type {tp.__name__}, got {value!r}")
    if origin is typing.Literal and value not in typing.get_args(tp):
        raise ConfigError(f"{name} must be one of {list(typing.get_args(tp))}, got {value!r}")
    if origin is tuple and isinstance(value, list):
        return tuple(value)
    return value


def _fits(tp, value) -> bool:
    if tp is bool:
        return isinstance(value, bool)
    if tp in (int, float):
        return isinstance(value, (int, float)) and not isinstance(value, bool) and (
            tp is float or isinstance(value, int))
    if tp is str:
        return isinstance(value, str)
    return True


def to_dict(cfg) -> dict:
    """Plain dict of a config (for saving next to a run)."""
    return dataclasses.asdict(cfg)
