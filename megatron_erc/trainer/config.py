"""The configs of the commands: ``TrainConfig`` (``train``, ``eval``) and ``SFTConfig``
(``sft``), nested dataclasses with one YAML/CLI surface on top (``megatron_erc.config``,
which also re-exports every section class).

Sections: ``run``, ``model``, ``parallel``, ``optim``, ``rollout``, ``algo`` (the policy loss:
surrogate, clipping, ERC, TIS, positive NLL), ``overlong``, ``data``, ``validation``,
``checkpoint``. Override any field from the command line: ``algo.erc.low=0.9``. Each section
checks its own values; the checks across sections are in ``TrainConfig.__post_init__`` and
``SFTConfig.__post_init__``.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from megatron_erc.algorithms import OverlongConfig, PolicyLossConfig
from megatron_erc.checkpoint.optimizer_state import OPTIMIZER_FORMATS
from megatron_erc.data.prompts import PromptDataConfig
from megatron_erc.models import ParallelConfig
from megatron_erc.trainer.actor import OptimConfig

field = dataclasses.field


@dataclasses.dataclass(kw_only=True)
class RunConfig:
    """Where the run lives and how long it is."""

    dir: str = "runs/default"
    """Run directory: metrics.jsonl, TensorBoard events, checkpoints, config.json."""
    seed: int = 0
    """Seed of prompt order, sampling and initialisation."""
    steps: int = 20
    """RL steps (rollout -> update -> sync rounds)."""
    updates_per_rollout: int = 4
    """Mini-batch updates per rollout; all but the first are off-policy (where ERC acts).
    Mini-batches are runs of ``ceil(rollout.prompts_per_step / updates_per_rollout)``
    consecutive groups, so a full step must split into exactly this many (checked at start);
    a step that kept fewer groups (dynamic sampling ran out of rounds) makes fewer."""
    micro_batch_size: int = 32
    """Sequences per forward/backward micro-batch (without ``max_tokens_per_micro_batch``)."""
    max_tokens_per_micro_batch: int | None = None
    """Token budget of one micro-batch (real prompt + response tokens, per data-parallel
    rank): each rank's sequences are partitioned into the fewest micro-batches within the
    budget, balanced by tokens, the same count on every rank; ``micro_batch_size`` is then
    unused. A sequence longer than the budget gets a micro-batch of its own. The loss is the
    global token mean, so results do not depend on the budget. None: ``micro_batch_size``
    sequences per micro-batch."""
    pack_sequences: bool = False
    """Concatenate the sequences of a micro-batch into one row without padding (THD layout,
    megatron's ``PackedSeqParams``): attention stays within each sequence and RoPE positions
    restart at each. Off: each sequence is a row padded to the micro-batch's longest."""
    loggers: list[str] = field(default_factory=lambda: ["jsonl", "tensorboard"])
    """Where step metrics go (rank 0, after the reduction over ranks): any of ``jsonl``
    (RUN_DIR/metrics.jsonl, read by ``plot`` and the end-of-run summary), ``tensorboard``,
    ``wandb`` (offline, RUN_DIR/wandb; extra ``.[wandb]``), ``mlflow`` (file store
    RUN_DIR/mlruns; extra ``.[mlflow]``). Each starts with the run: a missing package or a
    failed start stops it there. ``sft`` always writes jsonl and TensorBoard."""
    seq_len: int = 128
    """Longest prompt + response of a training sequence; must hold
    ``data.max_prompt_tokens + rollout.max_response_tokens`` (checked at start)."""

    def __post_init__(self):
        for name in ("steps", "updates_per_rollout", "micro_batch_size", "seq_len"):
            if getattr(self, name) < 1:
                raise ValueError(f"run.{name} must be >= 1, got {getattr(self, name)}")
        known = ("jsonl", "tensorboard", "wandb", "mlflow")  # trainer/loggers.py: LOGGERS
        if isinstance(self.loggers, str):  # run.loggers=wandb on the command line
            self.loggers = [self.loggers]
        if not isinstance(self.loggers, (list, tuple)):
            raise ValueError(f"run.loggers must be a list such as [jsonl, tensorboard, wandb], "
                             f"got {self.loggers!r}")
        self.loggers = list(self.loggers)
        unknown = [x for x in self.loggers if x not in known]
        if unknown or len(set(self.loggers)) != len(self.loggers):
            raise ValueError(f"run.loggers={self.loggers}: each of {known} at most once")
        if self.max_tokens_per_micro_batch is not None and self.max_tokens_per_micro_batch < 1:
            raise ValueError(f"run.max_tokens_per_micro_batch must be >= 1 or null, got "
                             f"{self.max_tokens_per_micro_batch}")


@dataclasses.dataclass(kw_only=True)
class ModelConfig:
    """The policy model and its tokenizer."""

    path: str = "examples/tiny"
    """Hugging Face directory: config.json and *.safetensors weights (the default holds only
    the tiny model's config.json)."""
    tokenizer: str | None = None
    """HF tokenizer directory or SentencePiece .model file; None: the model directory."""
    random_init: bool = False
    """Start from random initialisation (only config.json is read; weights are ignored).
    Without it, a model directory without weights is an error at start."""


@dataclasses.dataclass(kw_only=True)
class RolloutConfig:
    """Generation of the training responses."""

    engine: Literal["auto", "vllm", "embedded"] = "auto"
    """``auto``: vLLM when importable, else the embedded transformers engine."""
    prompts_per_step: int = 16
    """Prompt groups trained on per step by the whole job (after dynamic sampling), whatever
    the data-parallel size: each round draws this many prompts, shared over all engines."""
    prompts_per_round: int | None = None
    """Prompts drawn per generation round for the whole job (DAPO's generation batch; drawing
    more than ``prompts_per_step`` needs fewer rounds to fill the step). None: equal to
    ``prompts_per_step``."""
    tp: int = 1
    """Tensor-parallel size of each rollout engine, independent of the trainer's TP/PP: the
    job runs world_size / tp engines, each spanning tp consecutive ranks (GPUs of one node).
    > 1 needs the vLLM engine; the embedded engine runs one per rank."""
    n: int = 8
    """Responses per prompt (GRPO group size)."""
    max_gen_batches: int = 3
    """Generation rounds per step to fill ``prompts_per_step`` groups with non-equal rewards;
    when they run out the step trains on what it has and logs a warning."""
    temperature: float = 1.0
    """Sampling temperature of training rollouts."""
    max_response_tokens: int = 64
    """Response length limit."""
    colocate: bool = True
    """Trainer and engines share the GPUs: around every generation the trainer's gradient
    buffers and optimizer state go to pinned host memory and the engines wake; afterwards
    the engines sleep (vLLM sleep mode) and the trainer reloads (see trainer/colocate.py)."""
    offload_params: bool = False
    """With ``colocate``: also move the trainer's parameters off the GPU during generation
    (after the weight sync, which reads them)."""
    cpu_trim_memory: bool = False
    """CPU only, with ``colocate``: after the trainer's offload, return freed heap pages to the
    OS (``malloc_trim``) so the process's resident memory drops by the offloaded bytes. Every
    free page of the process goes, and is faulted back on reuse: 1.4x slower demo steps here."""
    gpu_memory_utilization: float = 0.5
    """vLLM on GPU: fraction of each device the engine may take (weights + KV cache). vLLM
    refuses to start when less is free; the trainer checks first and says so."""
    enforce_eager: bool = False
    """vLLM on GPU: no CUDA graphs (slower decode, faster start). CPU engines are eager."""
    weight_sync_bucket_mb: int = 64
    """Bucket size when streaming weights into the engine (bounds the extra memory)."""
    vllm_kv_cache_mb: int = 256
    """KV cache the vLLM engine may use (CPU: always set it)."""
    reward_fn: str = "math"
    """``math`` (math-verify on the last boxed answer) or a dotted path ``pkg.mod:fn``."""
    reward_timeout_s: float = 5.0
    """Per-response grading timeout; a timeout scores 0 and is counted."""
    engine_log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    """vLLM's own log lines (and whatever it prints while starting, its worker processes
    included) go to RUN_DIR/logs/engine.log at this level, not to the console (other engine
    leaders than rank 0: engine-rankN.log)."""

    def __post_init__(self):
        if self.n < 2:
            raise ValueError(f"rollout.n must be >= 2: GRPO compares responses to the same "
                             f"prompt; got {self.n}")
        if self.prompts_per_round is not None and self.prompts_per_round < self.prompts_per_step:
            raise ValueError(f"rollout.prompts_per_round ({self.prompts_per_round}) must be >= "
                             f"rollout.prompts_per_step ({self.prompts_per_step}), or null")
        if self.tp > 1 and self.engine == "embedded":
            raise ValueError(f"rollout.tp={self.tp} needs rollout.engine=vllm: the embedded "
                             "engine is not tensor-parallel (it runs one per rank)")
        for name in ("prompts_per_step", "tp", "max_gen_batches", "max_response_tokens",
                     "weight_sync_bucket_mb", "vllm_kv_cache_mb"):
            if getattr(self, name) < 1:
                raise ValueError(f"rollout.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"rollout.gpu_memory_utilization must be in (0, 1], got "
                             f"{self.gpu_memory_utilization}")
        if self.offload_params and not self.colocate:
            raise ValueError("rollout.offload_params needs rollout.colocate=true (engines on "
                             "their own GPUs leave the trainer's memory alone)")
        if not self.temperature > 0:
            raise ValueError(f"rollout.temperature must be > 0 for RL exploration, "
                             f"got {self.temperature}")


@dataclasses.dataclass(kw_only=True)
class ValidationConfig:
    """Periodic validation: mean accuracy over k samples per prompt."""

    path: str | None = None
    """Prompt file (same fields as ``data``); None: no validation."""
    every: int = 5
    """Validate every this many steps (and at the end)."""
    samples_per_prompt: int = 1
    """k samples per prompt; accuracy is averaged over all of them."""
    temperature: float = 0.6
    """Validation sampling temperature (0 = greedy)."""
    top_p: float = 0.95
    """Validation nucleus sampling."""
    max_prompts: int | None = None
    """Use only the first this many prompts."""

    def __post_init__(self):
        if self.every < 1 or self.samples_per_prompt < 1:
            raise ValueError("validation.every and validation.samples_per_prompt must be >= 1")
        if self.samples_per_prompt > 1 and self.temperature == 0:
            raise ValueError(
                f"validation.samples_per_prompt={self.samples_per_prompt} with "
                "validation.temperature=0 (greedy) scores the same response "
                f"{self.samples_per_prompt} times; set samples_per_prompt=1 or a temperature > 0")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"validation.temperature must be >= 0 and validation.top_p in "
                             f"(0, 1], got {self.temperature} and {self.top_p}")


@dataclasses.dataclass(kw_only=True)
class CheckpointConfig:
    """Resumable training state."""

    every: int = 0
    """Save every this many steps (0: only at exit)."""
    keep_last: int = 2
    """Complete checkpoints kept."""
    resume: str | None = None
    """``auto`` (newest complete checkpoint in the run directory, if any), a path, or None."""
    parallel_save: bool = True
    """Data-parallel replicas write disjoint shares of the tensors they all hold (megatron's
    fully parallel save); false: the first replica writes them all. Same files either way."""
    optimizer_format: str = "dp_reshardable"
    """The distributed optimizer's state on disk (``optim.use_distributed_optimizer``; a plain
    optimizer is always reshardable). ``dp_reshardable``: each DP rank writes the shard it
    owns, no gather; resumes at any DP size, same TP/PP/VPP. ``fully_reshardable``: every
    rank first gathers its model-parallel shard's whole optimizer state to host memory;
    resumes at any layout: set it for the last save before a TP/PP change."""
    async_save: bool = False
    """Write checkpoints in a forked process while training goes on (a copy-on-write snapshot;
    on GPU the tensors are first copied to host memory); each is published at a later step
    boundary once every rank's writer is done, the last one before the run returns."""

    def __post_init__(self):
        if self.every < 0 or self.keep_last < 1:
            raise ValueError("checkpoint.every must be >= 0 and checkpoint.keep_last >= 1")
        if self.optimizer_format not in OPTIMIZER_FORMATS:
            raise ValueError(f"checkpoint.optimizer_format must be one of {OPTIMIZER_FORMATS} "
                             f"(dp_reshardable: fast, same TP/PP on resume; fully_reshardable: "
                             f"any layout), got {self.optimizer_format!r}")


@dataclasses.dataclass(kw_only=True)
class TrainConfig:
    """Everything a ``megatron-erc train`` run needs."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, length, batch shapes."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Policy model and tokenizer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP / VPP / SP split (DP is the rest of the world)."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer."""
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    """Generation and grading."""
    algo: PolicyLossConfig = field(default_factory=PolicyLossConfig)
    """Policy loss: surrogate, clipping, ERC, TIS, positive-example NLL."""
    overlong: OverlongConfig | None = None
    """DAPO overlong reward shaping; None: off."""
    data: PromptDataConfig | None = None
    """Training prompts (required for ``train``)."""
    validation: ValidationConfig = field(default_factory=ValidationConfig)
    """Periodic validation."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing and resume."""

    def __post_init__(self):
        if self.data is not None:
            if self.data.max_prompt_tokens is None:
                raise ValueError(
                    "data.max_prompt_tokens is null (no limit), so a prompt plus its response "
                    f"could exceed run.seq_len ({self.run.seq_len}); set data.max_prompt_tokens")
            need = self.data.max_prompt_tokens + self.rollout.max_response_tokens
            if self.run.seq_len < need:
                raise ValueError(
                    f"run.seq_len ({self.run.seq_len}) is shorter than data.max_prompt_tokens "
                    f"({self.data.max_prompt_tokens}) + rollout.max_response_tokens "
                    f"({self.rollout.max_response_tokens}) = {need}: a long prompt with a long "
                    f"response would not fit. Set run.seq_len={need} or lower one of the two.")
        if self.overlong is not None and self.overlong.max_len > self.rollout.max_response_tokens:
            raise ValueError(
                f"overlong.max_len ({self.overlong.max_len}) exceeds "
                f"rollout.max_response_tokens ({self.rollout.max_response_tokens}); "
                "shaping would never apply. Set them equal (DAPO does).")
        check_updates(self.run.updates_per_rollout, self.rollout.prompts_per_step)


def minibatch_count(groups: int, updates: int) -> int:
    """Mini-batches ``batch.plan_minibatches`` cuts ``groups`` kept groups into: runs of
    ``ceil(groups / updates)`` consecutive groups."""
    per = -(-groups // updates)
    return -(-groups // per)


def check_updates(updates: int, prompts_per_step: int) -> None:
    """A full step (``prompts_per_step`` kept groups) splits into exactly ``updates``
    mini-batches; otherwise the run would silently make fewer updates than asked."""
    made = minibatch_count(prompts_per_step, updates)
    if made == updates:
        return
    fits = [u for u in range(1, prompts_per_step + 1)
            if minibatch_count(prompts_per_step, u) == u]
    below = max(u for u in fits if u < updates)
    above = [u for u in fits if u > updates]
    nearest = f"{below} or {above[0]}" if above else str(below)
    raise ValueError(
        f"run.updates_per_rollout={updates} cannot be met with rollout.prompts_per_step="
        f"{prompts_per_step}: mini-batches are runs of ceil({prompts_per_step}/{updates}) = "
        f"{-(-prompts_per_step // updates)} consecutive prompt groups, so a step makes only "
        f"{made} updates. Set run.updates_per_rollout to {nearest} (or change "
        "rollout.prompts_per_step)")


@dataclasses.dataclass(kw_only=True)
class SFTConfig:
    """``megatron-erc sft``: supervised warm start, exported as a Hugging Face directory."""

    run: RunConfig = field(default_factory=RunConfig)
    """Run directory, seed, steps, micro-batch size and sequence length (the RL-only fields
    ``updates_per_rollout``, ``max_tokens_per_micro_batch`` and ``pack_sequences`` are not
    used)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Starting model (HF directory) and tokenizer."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """TP / PP split."""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=1e-5))
    """Optimizer."""
    data: PromptDataConfig | None = None
    """Prompt file whose records also hold the target completion."""
    target_field: str = "target"
    """Record field with the completion to learn."""
    batch_size: int = 32
    """Sequences per optimizer step (across data-parallel ranks)."""
    output_dir: str | None = None
    """Where the fine-tuned HF directory is written; default RUN_DIR/hf."""
    logprob_chunk_mb: int = 64
    """Memory budget (MiB) of the log-prob op's work buffers (as ``algo.logprob_chunk_mb``)."""

    def __post_init__(self):
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.logprob_chunk_mb < 1:
            raise ValueError(f"logprob_chunk_mb must be >= 1 (MiB), got {self.logprob_chunk_mb}")
        if self.run.pack_sequences or self.run.max_tokens_per_micro_batch is not None:
            raise ValueError(
                "run.pack_sequences and run.max_tokens_per_micro_batch apply to RL training "
                "only: sft splits batch_size sequences into micro-batches of "
                "run.micro_batch_size; unset them")
