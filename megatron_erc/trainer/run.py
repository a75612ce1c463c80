"""``megatron-erc train``: wire config, process groups, actor, engine, grader and data
together, then hand over to ``rl.train``. Single-rank runs need no launcher; ``torchrun``
launches multi-rank ones."""

from __future__ import annotations

import json
import logging
import random
import signal
from pathlib import Path

import torch

from megatron_erc.config_io import to_dict
from megatron_erc.trainer.config import TrainConfig
from megatron_erc.trainer.metrics import MetricsWriter, Progress

log = logging.getLogger(__name__)


def setup_parallel(cfg: TrainConfig):
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_erc import platform
    from megatron_erc.platform.distributed import init_process_group

    plat = init_process_group(platform.setup())
    if ps.model_parallel_is_initialized():  # e.g. sft then train in one process
        return plat
    world = dist.get_world_size()
    mp = cfg.parallel.tp * cfg.parallel.pp
    if world % mp:
        raise ValueError(f"world size {world} is not a multiple of parallel.tp * parallel.pp "
                         f"= {mp}; launch a multiple of {mp} ranks")
    platform.init_model_parallel(cfg.parallel.tp, cfg.parallel.pp, cfg.parallel.vpp,
                                 seed=cfg.run.seed)
    return plat


def build_actor(cfg: TrainConfig):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    from megatron_erc.models.hf_adapter import load_hf_weights
    from megatron_erc.models.hf_checkpoint import SafetensorsReader
    from megatron_erc.trainer.actor import Actor

    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    actor = Actor(hf_config, cfg.parallel, cfg.optim)
    path = Path(cfg.model.path)
    if any(path.glob("*.safetensors")):
        reader = SafetensorsReader(path)
        load_hf_weights([m.module for m in actor.model], reader.get, hf_config,
                        ps.get_tensor_model_parallel_rank(), cfg.parallel.tp)
        for m in actor.model:  # DDP keeps fp32 main grads; optimizer copies are re-synced
            m.broadcast_params()
        actor.optimizer.reload_model_params()
    else:
        log.warning("%s has no safetensors weights: starting from random initialisation", path)
    return actor


def build_engine(cfg: TrainConfig, actor):
    """The rollout engine of this rank's data-parallel replica (None on its other ranks)."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps
    from transformers import AutoModelForCausalLM

    from megatron_erc.rollout import EmbeddedEngine, vllm_available
    from megatron_erc.trainer.steps import sync_engine

    # The first pipeline stage's TP rank 0 generates for its data-parallel replica
    # (collect_rollouts broadcasts from the model-parallel group's rank 0: this rank).
    is_engine_rank = (ps.get_tensor_model_parallel_rank() == 0
                      and ps.get_pipeline_model_parallel_rank() == 0)
    kind = cfg.rollout.engine
    multi_rank = dist.get_world_size() > 1
    if kind == "auto":
        kind = "vllm" if vllm_available() else "embedded"
    engine = None
    if is_engine_rank:
        if kind == "vllm":
            from megatron_erc.rollout import VLLMEngine

            engine = VLLMEngine(cfg.model.path, max_model_len=cfg.run.seq_len + 8,
                                kv_cache_memory_bytes=cfg.rollout.vllm_kv_cache_mb << 20,
                                dtype=cfg.parallel.params_dtype, seed=cfg.run.seed,
                                # in this process, vLLM would set up torch.distributed itself
                                # inside the trainer's world and wait for the other ranks:
                                # multi-rank runs keep its engine core in a process of its own
                                multiprocessing=True if multi_rank else None)
        else:
            engine = EmbeddedEngine(AutoModelForCausalLM.from_config(
                actor.hf_config, dtype=getattr(torch, cfg.parallel.params_dtype)))
    sync_engine(cfg, actor, engine)  # the engine starts from the actor's exact weights
    return engine, kind


def run_train(cfg: TrainConfig, validate_first: bool = False) -> list[dict]:
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_erc.data.prompts import PromptDataset
    from megatron_erc.data.tokenizers import load_tokenizer
    from megatron_erc.rewards import RewardGrader
    from megatron_erc.trainer import checkpoint as ckpt
    from megatron_erc.trainer.rl import RunContext, train
    from megatron_erc.trainer.steps import sync_engine

    if cfg.data is None:
        raise ValueError("data.path is required: a JSONL or Parquet prompt file")
    setup_parallel(cfg)
    rank0 = dist.get_rank() == 0
    run_dir = Path(cfg.run.dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    data = PromptDataset(cfg.data, tokenizer)
    prompts = [(s.prompt_ids, s.record.answer) for s in data.samples]
    actor = build_actor(cfg)
    rng = random.Random(cfg.run.seed * 1000 + ps.get_data_parallel_rank())
    # The engine is built first: its construction draws random numbers, and a resumed run
    # must continue from exactly the RNG state the checkpoint saved.
    engine, kind = build_engine(cfg, actor)
    start_step = 0
    resumed = ckpt.load_checkpoint(cfg.checkpoint.resume, run_dir / "checkpoints", actor) \
        if cfg.checkpoint.resume else None
    if resumed is not None:
        start_step, extra = resumed
        rng.setstate(_tuple_state(extra["rng"]))
        sync_engine(cfg, actor, engine)
        if rank0:
            print(f"[train] resumed from step {start_step}", flush=True)
    grader = RewardGrader(cfg.rollout.reward_fn, timeout_s=cfg.rollout.reward_timeout_s,
                          num_workers=1) if engine is not None else None
    validate = _validator(cfg, tokenizer, engine, grader) if rank0 and engine else None
    writer = MetricsWriter(run_dir, enabled=rank0)
    progress = Progress(cfg.run.steps, start_step, enabled=rank0)
    stop = {"flag": False}
    signal.signal(signal.SIGTERM, lambda *_: stop.update(flag=True))

    def save(step: int) -> None:
        ckpt.save_checkpoint(run_dir / "checkpoints", step, actor,
                             {"rng": rng.getstate()}, keep_last=cfg.checkpoint.keep_last)

    def log_metrics(m: dict) -> None:
        writer.log(m)
        progress(m)

    def should_stop() -> bool:
        flag = torch.tensor(float(stop["flag"]))
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        return bool(flag.item())

    ctx = RunContext(actor=actor, engine=engine, grader=grader, tokenizer=tokenizer,
                     prompts=prompts, validate=validate, log=log_metrics, should_stop=should_stop,
                     save=save, rng=rng, start_step=start_step)
    if rank0:
        print(f"[train] {len(prompts)} prompts, engine={kind}, world={dist.get_world_size()}, "
              f"tp={cfg.parallel.tp}, run dir {run_dir.resolve()}", flush=True)
    try:
        history = []
        if validate_first and validate is not None and start_step == 0:
            history.append({"step": 0, "val/accuracy": validate()})
            log_metrics(history[0])
        history += train(cfg, ctx)
        if history and not (cfg.checkpoint.every and history[-1]["step"] % cfg.checkpoint.every
                            == 0) and not stop["flag"]:
            save(history[-1]["step"])  # at exit
    finally:
        progress.close()
        writer.close()
        if grader is not None:
            grader.close()
        if engine is not None:
            engine.close()
    return history


def _tuple_state(state):
    """random.Random state after a JSON/pickle round trip (lists back to tuples)."""
    return tuple(tuple(s) if isinstance(s, list) else s for s in state)


def _validator(cfg: TrainConfig, tokenizer, engine, grader):
    from megatron_erc.data.prompts import PromptDataConfig, PromptDataset
    from megatron_erc.rollout import SamplingConfig

    v = cfg.validation
    if v.path is None:
        return None
    data = PromptDataset(PromptDataConfig(
        path=v.path, prompt_field=cfg.data.prompt_field, answer_field=cfg.data.answer_field,
        template=cfg.data.template, system_prompt=cfg.data.system_prompt,
        max_prompt_tokens=cfg.data.max_prompt_tokens), tokenizer)
    samples = data.samples[: v.max_prompts] if v.max_prompts else data.samples
    sampling = SamplingConfig(n=v.samples_per_prompt, temperature=v.temperature,
                              top_p=v.top_p if v.temperature > 0 else 1.0,
                              max_tokens=cfg.rollout.max_response_tokens, seed=cfg.run.seed,
                              stop_token_ids=(tokenizer.eos_token_id,))

    def validate() -> float:
        groups = engine.generate([s.prompt_ids for s in samples], sampling)
        flat = [x for g in groups for x in g]
        res = grader.grade([tokenizer.decode(x.token_ids) for x in flat],
                           [s.record.answer for s in samples for _ in range(v.samples_per_prompt)])
        return sum(res.rewards) / len(flat)

    return validate


def run_eval(cfg: TrainConfig) -> float:
    """Validation accuracy of ``model.path`` on ``validation.path`` (no training)."""
    from megatron_erc.data.tokenizers import load_tokenizer
    from megatron_erc.rewards import RewardGrader

    if cfg.validation.path is None or cfg.data is None:
        raise ValueError("eval needs validation.path (prompts to score) and data (its fields)")
    setup_parallel(cfg)
    actor = build_actor(cfg)
    engine, _ = build_engine(cfg, actor)
    tokenizer = load_tokenizer(cfg.model.tokenizer or cfg.model.path)
    with RewardGrader(cfg.rollout.reward_fn, timeout_s=cfg.rollout.reward_timeout_s,
                      num_workers=1) as grader:
        try:
            return _validator(cfg, tokenizer, engine, grader)()
        finally:
            engine.close()
