"""``megatron-erc train``: wire config, process groups, actor, engine, grader and data
together, then hand over to ``rl.train``. Single-rank runs need no launcher; ``torchrun``
launches multi-rank ones. The inputs are checked first (``preflight``), before any
collective or model building.

megatron-core and transformers are imported inside the functions that build models: they
take seconds to import, and a mistake in the inputs is reported before they load.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import random
import signal
import time
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_erc import platform
from megatron_erc.checkpoint import train as ckpt
from megatron_erc.checkpoint.async_save import CheckpointSaver
from megatron_erc.checkpoint.hf import SafetensorsReader
from megatron_erc.checkpoint.steps import find_latest
from megatron_erc.config import to_dict
from megatron_erc.errors import UserError, current_rank
from megatron_erc.models.hf_adapter import load_hf_weights
from megatron_erc.platform.distributed import init_process_group
from megatron_erc.rewards import RewardGrader
from megatron_erc.rollout import EmbeddedEngine, SamplingConfig, VLLMEngine, vllm_available
from megatron_erc.rollout.memory import check_engine_memory
from megatron_erc.trainer.actor import Actor
from megatron_erc.trainer.colocate import Colocation
from megatron_erc.trainer.config import TrainConfig
from megatron_erc.trainer.layout import engine_slot
from megatron_erc.trainer.loggers import check_loggers
from megatron_erc.trainer.metrics import MetricsWriter, Progress
from megatron_erc.trainer.moe_step import moe_steps
from megatron_erc.trainer.offload import TrainerOffload
from megatron_erc.trainer.preflight import check_eval, check_model, check_train
from megatron_erc.trainer.rl import RunContext, train
from megatron_erc.trainer.rollouts import Generator, validation_accuracy
from megatron_erc.trainer.steps import sync_engine
from megatron_erc.trainer.stop_budget import STOP_FILE_ENV, StopBudget
from megatron_erc.trainer.summary import summarize, summary_lines, write_summary

log = logging.getLogger(__name__)


def setup_parallel(cfg: TrainConfig):
    """Process group and megatron's parallel state, every collective under
    ``parallel.distributed_timeout_min``."""
    from megatron.core import parallel_state as ps

    plat = init_process_group(platform.setup(), timeout=_timeout(cfg))
    if ps.model_parallel_is_initialized():  # e.g. sft then train in one process
        return plat
    world, p = dist.get_world_size(), cfg.parallel
    mp = p.tp * p.pp
    if world % mp:
        raise UserError(f"world size {world} is not a multiple of parallel.tp * parallel.pp "
                        f"= {mp}; launch a multiple of {mp} ranks", kind="layout")
    etp = p.etp or p.tp
    if (world // mp) % p.ep or world % (p.ep * etp * p.pp):
        raise UserError(
            f"parallel.ep={p.ep} (expert tensor-parallel {etp}) does not fit {world} ranks at "
            f"tp={p.tp}, pp={p.pp}: ep must divide the data-parallel size {world // mp} and "
            f"ep * etp * pp = {p.ep * etp * p.pp} the world size", kind="layout")
    platform.init_model_parallel(p.tp, p.pp, p.vpp, seed=cfg.run.seed,
                                 distributed_timeout_minutes=p.distributed_timeout_min,
                                 expert_model_parallel_size=p.ep,
                                 expert_tensor_parallel_size=etp)
    return plat


def object_group(cfg: TrainConfig):
    """Group for gathering Python objects (generated tokens, rewards, metrics): a gloo side
    group when the default one is NCCL (which moves device tensors only), else None (the
    default group)."""
    if dist.get_backend() != "nccl":
        return None
    return dist.new_group(backend="gloo", timeout=_timeout(cfg))


def _timeout(cfg: TrainConfig):
    return datetime.timedelta(minutes=cfg.parallel.distributed_timeout_min)


def build_actor(cfg: TrainConfig):
    from megatron.core import parallel_state as ps
    from transformers import AutoConfig

    check_model(cfg.model)  # a directory with config.json, and weights unless random_init
    hf_config = AutoConfig.from_pretrained(cfg.model.path)
    actor = Actor(hf_config, cfg.parallel, cfg.optim)
    path = Path(cfg.model.path)
    if not cfg.model.random_init:
        reader = SafetensorsReader(path)
        load_hf_weights([m.module for m in actor.model], reader.get, hf_config,
                        ps.get_tensor_model_parallel_rank(), cfg.parallel.tp)
        for m in actor.model:  # DDP keeps fp32 main grads; optimizer copies are re-synced
            m.broadcast_params()
        actor.optimizer.reload_model_params()
    else:
        log.info("model.random_init: starting from random initialisation (%s)", path)
    return actor


def rank_slot(cfg: TrainConfig):
    """This rank's rollout engine slot (``layout.engine_slot`` from torchrun's variables)."""
    world = dist.get_world_size()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    local_rank = int(os.environ.get("LOCAL_RANK", dist.get_rank() % local_world))
    return engine_slot(dist.get_rank(), local_rank, world, local_world, cfg.rollout.tp)


def build_engine(cfg: TrainConfig, actor, slot):
    """This rank's rollout engine: every rank runs an embedded engine; with vLLM, each engine
    leader starts one spanning its ``rollout.tp`` ranks' devices (None on the other ranks)."""
    from transformers import AutoModelForCausalLM

    kind = cfg.rollout.engine
    if kind == "auto":
        kind = "vllm" if vllm_available() else "embedded"
    if kind == "embedded" and cfg.rollout.tp > 1:
        raise UserError(f"rollout.tp={cfg.rollout.tp} needs vLLM (not installed here: "
                        "scripts/install_vllm.sh); the embedded engine runs one per rank",
                        kind="config")
    engine = None
    if kind == "embedded":
        engine = EmbeddedEngine(AutoModelForCausalLM.from_config(
            actor.hf_config, dtype=getattr(torch, cfg.parallel.params_dtype)),
            device=actor.device)
    elif slot.is_leader:

        # The engine's workers are processes of their own, on exactly this engine's devices
        # (vLLM's multiprocessing executor): in this process, vLLM would set up
        # torch.distributed inside the trainer's world and wait for ranks that never join,
        # and its TP workers need their own process group anyway.
        r, on_gpu = cfg.rollout, actor.device.type == "cuda"
        # colocated: the engine measures free memory at start, so the trainer's gradient
        # buffers (and parameters, with offload_params) leave the GPU while it starts
        off = TrainerOffload(actor, params=r.offload_params) if r.colocate and on_gpu else None
        if off is not None:
            off.offload()
        if on_gpu:  # a clear message instead of vLLM's traceback when the share is not free
            check_engine_memory(r.gpu_memory_utilization, device_index=actor.device.index)
        multi = dist.get_world_size() > 1 or r.tp > 1
        engine = VLLMEngine(cfg.model.path, max_model_len=cfg.run.seq_len + 8,
                            kv_cache_memory_bytes=r.vllm_kv_cache_mb << 20,
                            gpu_memory_utilization=r.gpu_memory_utilization,
                            enforce_eager=r.enforce_eager or not on_gpu,
                            enable_sleep_mode=r.colocate and on_gpu,
                            dtype=cfg.parallel.params_dtype, seed=cfg.run.seed,
                            tensor_parallel_size=r.tp, devices=slot.devices,
                            multiprocessing=True if multi else None,
                            log_file=engine_log(cfg), log_level=r.engine_log_level)
        if off is not None:  # back before the initial sync; the engine sleeps after it
            off.reload()
            off.close()
    sync_engine(cfg, actor, engine)  # the engine starts from the actor's exact weights
    return engine, kind


def build_generator(cfg: TrainConfig, actor, tokenizer, group):
    """Engine, grader and slot of this rank (``rollouts.Generator``) and the memory phases
    around its generations (``colocate.Colocation``; the engine starts asleep)."""
    slot = rank_slot(cfg)
    engine, kind = build_engine(cfg, actor, slot)
    grader = RewardGrader(cfg.rollout.reward_fn, timeout_s=cfg.rollout.reward_timeout_s,
                          num_workers=1) if slot.is_leader else None
    colocation = Colocation(actor, engine, enabled=cfg.rollout.colocate,
                            offload_params=cfg.rollout.offload_params,
                            trim_host=cfg.rollout.cpu_trim_memory)
    colocation.sleep()
    return Generator(slot=slot, engine=engine, grader=grader, decode=tokenizer.decode,
                     group=group), colocation, kind


def engine_log(cfg: TrainConfig) -> Path:
    """Where this rank's vLLM engine logs (``rollout.engine_log_level``)."""
    rank = dist.get_rank() if dist.is_initialized() else current_rank()[0]
    return Path(cfg.run.dir) / "logs" / ("engine.log" if rank == 0 else f"engine-rank{rank}.log")


def run_train(cfg: TrainConfig, validate_first: bool = False,
              dashboard: bool = False) -> list[dict]:
    """The RL run of ``cfg``; rank 0 ends it with a summary (``trainer/summary.py``) and, with
    ``dashboard``, draws RUN_DIR/dashboard.png first (a few seconds of matplotlib; otherwise
    the summary says how: ``megatron-erc plot RUN_DIR``)."""
    t_start = time.perf_counter()
    inputs = check_train(cfg)  # every rank, before any collective
    check_loggers(cfg.run.loggers)
    run_dir = Path(cfg.run.dir)
    # The loggers start first (rank 0): a W&B or MLflow that cannot start stops the run now.
    writer = MetricsWriter(run_dir, enabled=current_rank()[0] == 0, loggers=cfg.run.loggers,
                           config=json.loads(json.dumps(to_dict(cfg), default=str)))
    try:
        history = _run_train(cfg, inputs, writer, validate_first)
        paths = writer.paths()
    finally:
        writer.close()
    if current_rank()[0] == 0 and history:
        _print_summary(cfg, history, time.perf_counter() - t_start, paths, dashboard)
    return history


def _print_summary(cfg: TrainConfig, history: list[dict], wall_s: float, paths: dict,
                   dashboard: bool) -> None:
    run_dir = Path(cfg.run.dir)
    out = {}
    if dashboard and "jsonl" in cfg.run.loggers:
        from megatron_erc.cli.plot import plot_run

        out["dashboard"] = plot_run(run_dir)
    out.update({k: v for k, v in paths.items() if k != "jsonl"})
    latest = find_latest(run_dir / "checkpoints")
    out["checkpoint"] = latest
    if (run_dir / "logs" / "engine.log").exists():
        out["engine log"] = run_dir / "logs" / "engine.log"
    s = summarize(history, wall_s=wall_s, paths=out, run_dir=run_dir)
    write_summary(run_dir, s)
    print("\n".join(summary_lines(s)), flush=True)


def _run_train(cfg: TrainConfig, inputs, writer: MetricsWriter,
               validate_first: bool) -> list[dict]:
    setup_parallel(cfg)
    group = object_group(cfg)
    rank0 = dist.get_rank() == 0
    run_dir = Path(cfg.run.dir)
    if rank0:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.json").write_text(json.dumps(to_dict(cfg), indent=2, default=str))
    tokenizer = inputs.tokenizer
    prompts = [(s.prompt_ids, s.record.answer) for s in inputs.data.samples]
    actor = build_actor(cfg)
    try:  # the same answer on every rank: no rank waits for another
        actor.moe = moe_steps(actor, cfg.algo.routing_replay)
    except ValueError as e:
        raise UserError(str(e), kind="config") from None
    # One sampler for the whole job: every rank draws the same prompts and seeds.
    rng = random.Random(cfg.run.seed * 1000)
    with contextlib.ExitStack() as cleanup:  # engines and graders close on any way out
        # The engine is built first: its construction draws random numbers, and a resumed
        # run must continue from exactly the RNG state the checkpoint saved.
        generator, colocation, kind = build_generator(cfg, actor, tokenizer, group)
        cleanup.callback(_close, generator, colocation)
        start_step = 0
        resumed = ckpt.load_checkpoint(cfg.checkpoint.resume, run_dir / "checkpoints", actor) \
            if cfg.checkpoint.resume else None
        if resumed is not None:
            start_step, extra = resumed
            rng.setstate(_tuple_state(extra["rng"]))
            colocation.stale = True  # the first rollout phase syncs the restored weights
            if rank0:
                print(f"[train] resumed from step {start_step}", flush=True)
        validate = _validator(cfg, inputs.validation, tokenizer, generator, colocation, actor)
        progress = Progress(cfg.run.steps, start_step, enabled=rank0,
                            groups_per_step=cfg.rollout.prompts_per_step)
        cleanup.callback(progress.close)
        stop = {"flag": False}
        for sig in (signal.SIGTERM, signal.SIGUSR1):  # Slurm: USR1 before the limit, TERM at it
            signal.signal(sig, lambda *_: stop.update(flag=True))

        budget = StopBudget(run_dir, enabled=rank0)  # step + save vs the stop's lead time

        c = cfg.checkpoint
        saver = CheckpointSaver(run_dir / "checkpoints", actor, keep_last=c.keep_last,
                                parallel=c.parallel_save, optimizer_format=c.optimizer_format,
                                async_save=c.async_save)
        cleanup.callback(saver.abort)  # unwinding an error: no save in flight is published

        def save(step: int) -> None:  # async_save: published at a later step boundary
            budget.save(saver.save(step, {"rng": rng.getstate()}))

        def log_metrics(m: dict) -> None:
            saver.poll()  # every rank, once per step: publish a save whose writers are done
            writer.log(m)
            progress(m)
            budget.step(m.get("time/step", 0.0))

        stop_file = os.environ.get(STOP_FILE_ENV)

        def should_stop() -> bool:
            # a signal to this rank, or the batch script's stop file (it signals no process:
            # engine processes would die on a TERM before the trainer has saved)
            asked = stop["flag"] or bool(stop_file and os.path.exists(stop_file))
            flag = torch.tensor(float(asked), device=actor.device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)  # every rank stops at the same point
            return bool(flag.item())

        ctx = RunContext(actor=actor, generator=generator, colocation=colocation,
                         prompts=prompts, pad_id=tokenizer.pad_token_id,
                         eos_id=tokenizer.eos_token_id, rng=rng, validate=validate,
                         log=log_metrics, should_stop=should_stop, save=save,
                         start_step=start_step)
        if rank0:
            print(f"[train] {len(prompts)} prompts, engine={kind}, "
                  f"world={dist.get_world_size()}, tp={cfg.parallel.tp}, "
                  f"{generator.slot.num_engines} rollout engines (rollout.tp={cfg.rollout.tp}), "
                  f"run dir {run_dir.resolve()}", flush=True)
        history = []
        if validate_first and validate is not None and start_step == 0:
            history.append({"step": 0, "val/accuracy": validate()})
            log_metrics(history[0])
        history += train(cfg, ctx)
        if history and not (cfg.checkpoint.every and history[-1]["step"] % cfg.checkpoint.every
                            == 0) and not stop["flag"]:
            save(history[-1]["step"])  # at exit
        saver.finish()  # the last save is on disk and published before the run returns
    return history


def _close(generator, colocation=None) -> None:
    if colocation is not None:
        colocation.close()
    if generator.grader is not None:
        generator.grader.close()
    if generator.engine is not None:
        generator.engine.close()


def _tuple_state(state):
    """random.Random state after a JSON/pickle round trip (lists back to tuples)."""
    return tuple(tuple(s) if isinstance(s, list) else s for s in state)


def _validator(cfg: TrainConfig, dataset, tokenizer, generator, colocation, actor):
    """Validation accuracy on ``dataset`` (None: no validation), sharded over every engine
    of the job (collective), inside a generation phase (engines awake with the current
    weights)."""
    v = cfg.validation
    if dataset is None:
        return None
    samples = dataset.samples[: v.max_prompts] if v.max_prompts else dataset.samples
    prompts = [(s.prompt_ids, s.record.answer) for s in samples]
    sampling = SamplingConfig(n=v.samples_per_prompt, temperature=v.temperature,
                              top_p=v.top_p if v.temperature > 0 else 1.0,
                              max_tokens=cfg.rollout.max_response_tokens, seed=cfg.run.seed,
                              stop_token_ids=(tokenizer.eos_token_id,))

    def validate() -> float:
        with colocation.rollout(lambda: sync_engine(cfg, actor, generator.engine)):
            return validation_accuracy(generator, prompts, sampling)

    return validate


def run_eval(cfg: TrainConfig) -> float:
    """Validation accuracy of ``model.path`` on ``validation.path`` (no training); every rank
    generates its share. ``data`` only lends its field names and template (optional)."""
    inputs = check_eval(cfg)  # every rank, before any collective
    setup_parallel(cfg)
    actor = build_actor(cfg)
    generator, colocation, _ = build_generator(cfg, actor, inputs.tokenizer, object_group(cfg))
    try:
        return _validator(cfg, inputs.validation, inputs.tokenizer, generator, colocation,
                          actor)()
    finally:
        _close(generator, colocation)
