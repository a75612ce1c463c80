"""Checks at start, before any collective or expensive work: the model directory, the
parallel layout against the model and the world, the tokenizer, the reward function, the
prompt files and the checkpoint to resume.

Every rank runs the same checks on the same inputs, then (multi-rank) the ranks agree:
one all-gather of the outcomes, so a problem only one rank sees (a file missing on one
node, a package missing on one host) stops every rank at the same point, reported once by
rank 0 as ``[rank N] ...``, instead of leaving the others waiting in a collective. Each
check raises :class:`~megatron_erc.errors.UserError` with the field or ``file:line`` and
what to do. The files read here are returned (``Inputs``) so nothing is read twice.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.util
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch.distributed as dist

from megatron_erc import platform
from megatron_erc.checkpoint.steps import check_resumable
from megatron_erc.data.prompts import PromptDataConfig, PromptDataset, PromptFileError
from megatron_erc.data.tokenizers import load_tokenizer
from megatron_erc.errors import UserError, current_rank
from megatron_erc.models.support import unsupported
from megatron_erc.platform.distributed import init_process_group
from megatron_erc.rewards.registry import load_reward_fn

T = TypeVar("T")


@dataclasses.dataclass
class Inputs:
    """What the checks loaded: the tokenizer and the prompt datasets."""

    tokenizer: object
    data: PromptDataset | None = None
    validation: PromptDataset | None = None


# ---------------------------------------------------------------- commands
def check_train(cfg) -> Inputs:
    """``megatron-erc train``: every check, agreed over the ranks."""
    if cfg.data is None:
        raise UserError("train needs data.path: the JSONL or Parquet file of prompts and "
                        "answers to train on (e.g. data.path=data/train.jsonl)", kind="config")

    def check() -> Inputs:
        tokenizer = _model_and_layout(cfg, rollout=cfg.rollout)
        check_reward(cfg.rollout.reward_fn)
        inputs = Inputs(tokenizer, data=load_prompts(cfg.data, tokenizer, "data.path"))
        if cfg.validation.path is not None:
            inputs.validation = load_prompts(validation_data(cfg), tokenizer, "validation.path")
        resume = cfg.checkpoint.resume
        if resume and resume != "auto":

            check_resumable(resume)
        return inputs

    return agree(check, cfg.parallel.distributed_timeout_min)


def check_eval(cfg) -> Inputs:
    """``megatron-erc eval``: the model, layout, reward function and validation file."""
    if cfg.validation.path is None:
        raise UserError("eval needs validation.path: the JSONL or Parquet file of prompts "
                        "and answers to score (e.g. validation.path=data/val.jsonl)",
                        kind="config")

    def check() -> Inputs:
        tokenizer = _model_and_layout(cfg, rollout=cfg.rollout)
        check_reward(cfg.rollout.reward_fn)
        return Inputs(tokenizer, validation=load_prompts(validation_data(cfg), tokenizer,
                                                         "validation.path"))

    return agree(check, cfg.parallel.distributed_timeout_min)


def check_sft(cfg) -> tuple[Inputs, list[tuple[str, str]]]:
    """``megatron-erc sft``: the model, layout and data file; returns the (prompt text,
    target) pairs, each checked to fit ``run.seq_len``."""
    if cfg.data is None:
        raise UserError("sft needs data.path: a JSONL or Parquet file whose records hold a "
                        f"prompt, an answer and the target completion ({cfg.target_field!r})",
                        kind="config")

    def check():
        tokenizer = _model_and_layout(cfg)
        inputs = Inputs(tokenizer, data=load_prompts(cfg.data, tokenizer, "data.path"))
        return inputs, sft_examples(cfg, inputs)

    return agree(check, cfg.parallel.distributed_timeout_min)


def _model_and_layout(cfg, rollout=None):
    hf = check_model(cfg.model)
    check_layout(cfg.parallel, hf, f"{cfg.model.path}/config.json", rollout=rollout)
    vllm = rollout is not None and (rollout.engine == "vllm" or rollout.engine == "auto"
                                    and importlib.util.find_spec("vllm") is not None)
    if cfg.model.random_init and vllm:
        try:
            _check_weights(Path(cfg.model.path), "model.path")
        except UserError:
            raise UserError("model.random_init=true with the vLLM engine, but vLLM starts from "
                            f"the weights in model.path={cfg.model.path}, which has none; set "
                            "rollout.engine=embedded", kind="config") from None
    return load_checked_tokenizer(cfg.model, hf)


# ---------------------------------------------------------------- agreement
def agree(check: Callable[[], T], timeout_min: float) -> T:
    """``check()`` on every rank; with several ranks, the default process group is created
    if it does not exist yet (as ``run.setup_parallel`` would) and every rank learns every
    rank's outcome, so all raise together. The combined message names the failing ranks
    unless all failed alike."""
    error, result = None, None
    try:
        result = check()
    except UserError as e:
        error = e
    if current_rank()[1] > 1:

        init_process_group(platform.setup(), timeout=datetime.timedelta(minutes=timeout_min))
        outcomes = [None] * dist.get_world_size()
        dist.all_gather_object(outcomes, None if error is None else (error.kind, str(error)))
        failed = {rank: o for rank, o in enumerate(outcomes) if o is not None}
        if failed:
            error = UserError(combine({r: m for r, (_, m) in failed.items()}, len(outcomes)),
                              kind=next(iter(failed.values()))[0])
    if error is not None:
        raise error
    return result


def combine(messages: dict[int, str], world: int) -> str:
    """One message for the job: as is when every rank failed alike, else each distinct
    message prefixed with the ranks that hit it."""
    distinct = list(dict.fromkeys(messages.values()))
    if len(messages) == world and len(distinct) == 1:
        return distinct[0]
    lines = []
    for text in distinct:
        ranks = [r for r, m in messages.items() if m == text]
        label = f"rank {ranks[0]}" if len(ranks) == 1 else f"ranks {', '.join(map(str, ranks))}"
        lines.append(f"[{label}] {text}")
    return "\n".join(lines)


# ---------------------------------------------------------------- model and layout
def check_model(model, name: str = "model.path") -> dict:
    """``model.path`` (given as ``name``) is a directory with a supported config.json and
    weights (unless ``model.random_init``); returns the parsed config.json."""
    path = Path(model.path)
    hf_dir = "a Hugging Face model directory (config.json + *.safetensors)"
    if not path.exists():
        raise UserError(f"{name}={model.path}: no such directory; set {name} to {hf_dir}",
                        kind="model")
    if not path.is_dir():
        raise UserError(f"{name}={model.path} is a file; set {name} to {hf_dir}",
                        kind="model")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UserError(f"{name}={model.path} has no config.json, so it is not a Hugging "
                        f"Face model directory; set {name} to {hf_dir}", kind="model")
    try:
        hf = json.loads(config_file.read_text())
    except ValueError as e:
        raise UserError(f"{config_file}: not valid JSON ({e})", kind="model") from None
    reason = unsupported(hf if isinstance(hf, dict) else {})
    if reason is not None:  # model type, RoPE, MLP, attention bias, sliding window
        raise UserError(f"{config_file}: {reason}", kind="model")
    for key in ("num_attention_heads", "num_hidden_layers", "vocab_size"):
        if not isinstance(hf.get(key), int):
            raise UserError(f"{config_file}: {key} is missing or not an integer", kind="model")
    if not getattr(model, "random_init", False):
        _check_weights(path, name)
    return hf


def _check_weights(path: Path, name: str) -> None:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (ValueError, KeyError, AttributeError) as e:
            raise UserError(f"{index}: not a safetensors index ({e!r})", kind="model") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise UserError(f"{index} names {len(missing)} shard(s) that are missing, first "
                            f"{path / missing[0]}; copy the complete model", kind="model")
        return
    if (path / "model.safetensors").is_file():
        return
    other = sorted(f.name for f in path.iterdir()
                   if f.suffix in (".safetensors", ".bin", ".pt", ".pth"))
    found = (f" (it holds {other[0]}: only model.safetensors or shards named by "
             "model.safetensors.index.json are read; re-save the model with save_pretrained)"
             ) if other else ""
    random_init = (", or set model.random_init=true to start from random initialisation on "
                   "purpose") if name == "model.path" else ""
    raise UserError(f"{name}={path} has config.json but no safetensors weights{found}; "
                    f"point {name} at a directory with weights{random_init}", kind="model")


def check_layout(parallel, hf: dict, where: str, rollout=None) -> None:
    """TP/PP/VPP fit the model (``hf``: its config.json) and the world size of this launch
    (the process group's, else ``WORLD_SIZE``; ``LOCAL_WORLD_SIZE``); rollout engines fit
    the world and a node."""
    world = current_rank()[1]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    tp, pp = parallel.tp, parallel.pp
    heads = hf["num_attention_heads"]
    groups = hf.get("num_key_value_heads") or heads
    if heads % tp or groups % tp:
        fits = [d for d in range(1, heads + 1) if heads % d == 0 and groups % d == 0]
        raise UserError(f"parallel.tp={tp} must divide the model's attention heads ({heads}) "
                        f"and key/value heads ({groups}) ({where}); use parallel.tp in {fits}",
                        kind="layout")
    layers, stages = hf["num_hidden_layers"], pp * (parallel.vpp or 1)
    if layers % stages:
        raise UserError(f"the model's {layers} layers ({where}) cannot be split into "
                        f"parallel.pp * parallel.vpp = {stages} equal pipeline stages; choose "
                        f"a pp (x vpp) that divides {layers}", kind="layout")
    if parallel.recompute_layers is not None and parallel.recompute_layers > layers // stages:
        raise UserError(f"parallel.recompute_layers={parallel.recompute_layers} exceeds the "
                        f"{layers // stages} layers of each pipeline stage; set it to at most "
                        f"{layers // stages} (or null for all)", kind="layout")
    if world % (tp * pp):
        raise UserError(f"world size {world} is not a multiple of parallel.tp * parallel.pp = "
                        f"{tp} * {pp} = {tp * pp}; launch a multiple of {tp * pp} ranks "
                        "(torchrun --nproc-per-node) or change parallel.tp / parallel.pp",
                        kind="layout")
    if rollout is None:
        return
    if world % rollout.tp or per_node % rollout.tp:
        raise UserError(f"rollout.tp={rollout.tp} must divide the number of ranks ({world}) "
                        f"and the ranks per node ({per_node}): each engine spans rollout.tp "
                        "ranks of one node", kind="layout")
    has_vllm = importlib.util.find_spec("vllm") is not None
    if rollout.engine == "vllm" and not has_vllm:
        raise UserError("rollout.engine=vllm but vLLM is not installed; install it "
                        "(scripts/install_vllm.sh) or set rollout.engine=embedded",
                        kind="config")
    if rollout.tp > 1 and not has_vllm:
        raise UserError(f"rollout.tp={rollout.tp} needs vLLM (not installed here: "
                        "scripts/install_vllm.sh); the embedded engine runs one per rank, "
                        "set rollout.tp=1", kind="config")


def load_checked_tokenizer(model, hf: dict):
    """The tokenizer of ``model.tokenizer`` (else ``model.path``), whose ids must fit the
    model's embedding (``vocab_size`` in config.json)."""

    path = model.tokenizer or model.path
    name = "model.tokenizer" if model.tokenizer else "model.path (model.tokenizer unset)"
    if not Path(path).exists():
        raise UserError(f"{name}={path}: no such file or directory; set model.tokenizer to a "
                        "SentencePiece .model file or a Hugging Face tokenizer directory",
                        kind="model")
    try:
        tokenizer = load_tokenizer(path)
    except (OSError, ValueError) as e:
        raise UserError(f"{name}={path}: cannot load a tokenizer: {e}", kind="model") from None
    if tokenizer.vocab_size > hf["vocab_size"]:
        raise UserError(f"the tokenizer {path} has {tokenizer.vocab_size} tokens but the "
                        f"model's vocab_size is {hf['vocab_size']} ({model.path}/config.json): "
                        "ids past it have no embedding; use the tokenizer the model was "
                        "trained with (model.tokenizer)", kind="model")
    if getattr(model, "random_init", False) and tokenizer.vocab_size < hf["vocab_size"]:
        raise UserError(f"model.random_init=true with vocab_size {hf['vocab_size']} "
                        f"({model.path}/config.json) but a tokenizer of "
                        f"{tokenizer.vocab_size} tokens: a random model samples ids the "
                        f"tokenizer cannot decode; set vocab_size to {tokenizer.vocab_size} "
                        "in config.json", kind="model")
    return tokenizer


# ---------------------------------------------------------------- plugins and data
def check_reward(spec: str) -> None:
    """``rollout.reward_fn`` imports and takes ``(response, answer, **meta)``."""

    try:
        load_reward_fn(spec)
    except (ImportError, AttributeError, ValueError) as e:
        raise UserError(f"rollout.reward_fn={spec}: {e}", kind="plugin") from None


def load_prompts(data_cfg: PromptDataConfig, tokenizer, field: str) -> PromptDataset:
    """The parsed, tokenised prompt file; its errors name the config field too."""
    try:
        return PromptDataset(data_cfg, tokenizer)
    except PromptFileError as e:
        raise PromptFileError(f"{field}: {e}") from None


def validation_data(cfg) -> PromptDataConfig:
    """``validation.path`` read with the fields and template of ``data`` (the defaults when
    ``data`` is unset, as in ``eval``)."""
    data = cfg.data or PromptDataConfig(path=cfg.validation.path)
    return PromptDataConfig(path=cfg.validation.path, prompt_field=data.prompt_field,
                            answer_field=data.answer_field, template=data.template,
                            system_prompt=data.system_prompt,
                            max_prompt_tokens=data.max_prompt_tokens)


def sft_examples(cfg, inputs: Inputs) -> list[tuple[str, str]]:
    """(rendered prompt, target) pairs of an SFT file; every record needs ``target_field``
    and must fit ``run.seq_len`` with its target and eos."""
    tokenizer, field, examples = inputs.tokenizer, cfg.target_field, []
    for s in inputs.data.samples:
        if field not in s.record.meta:
            raise PromptFileError(
                f"data.path: {s.record.source}: no target field {field!r} (fields: "
                f"{sorted([cfg.data.prompt_field, cfg.data.answer_field, *s.record.meta])}); "
                "set target_field to the field holding the completion to learn")
        target = s.record.meta[field]
        if not isinstance(target, str):
            raise PromptFileError(f"data.path: {s.record.source}: target field {field!r} "
                                  f"must be a string, got {type(target).__name__}")
        # as pack_sft_batch counts: the rendered prompt and the target, each encoded
        length = len(tokenizer.encode(s.text)) + len(tokenizer.encode(target)) + 1
        if length > cfg.run.seq_len + 1:
            raise PromptFileError(
                f"data.path: {s.record.source}: prompt + target + eos is {length} tokens, "
                f"more than run.seq_len + 1 = {cfg.run.seq_len + 1}; raise run.seq_len or "
                "lower data.max_prompt_tokens")
        examples.append((s.text, target))
    return examples
