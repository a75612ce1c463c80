"""Checkpoint save time and peak extra host memory at DP=2 x TP=2 (4 gloo ranks) with the
distributed optimizer, new mode against old, same model, same run, alternating repetitions
(medians):

* old: the fully reshardable optimizer format (every rank gathers its model-parallel
  shard's whole optimizer state to host memory) written by the first replica alone;
* new: ``checkpoint.optimizer_format=dp_reshardable`` (each rank writes the optimizer
  shard it owns) and ``checkpoint.parallel_save`` (replicas share the replicated tensors);
* new + ``checkpoint.async_save``: the time training is held (the forked writer goes on),
  and the time until the checkpoint is published.

Peak extra memory: per rank, ``VmHWM`` (reset through ``/proc/self/clear_refs`` just before
the save) minus ``VmRSS`` at that moment; the largest over ranks (the async writer is a
forked copy-on-write process: its pages are not in the trainer's count).

    python benchmarks/checkpoint_save.py [--hidden 512] [--layers 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _rank(rank: int, world: int, store: str, args, out) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank,
                            world_size=world)
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.checkpoint.async_save import CheckpointSaver
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig

    platform.setup()
    platform.init_model_parallel(2, 1, seed=0)
    hf = AutoConfig.for_model("qwen2", vocab_size=8192, hidden_size=args.hidden,
                              intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                              num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=512, tie_word_embeddings=False)
    actor = Actor(hf, ParallelConfig(tp=2, pad_vocab_multiple=1),
                  OptimConfig(use_distributed_optimizer=True))
    for m in actor.model:  # optimizer state exists after a first step
        for p in m.parameters():
            p.main_grad.normal_()
    actor.step()
    root = os.path.join(args.dir, "ckpt")
    modes = {"old": dict(optimizer_format="fully_reshardable", parallel=False, async_save=False),
             "new": dict(optimizer_format="dp_reshardable", parallel=True, async_save=False),
             "new+async": dict(optimizer_format="dp_reshardable", parallel=True,
                               async_save=True)}
    results = {name: [] for name in modes}
    step = 0
    for _ in range(args.reps):
        for name, mode in modes.items():
            step += 1
            saver = CheckpointSaver(root, actor, keep_last=1, **mode)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _kb("VmRSS")
            dist.barrier()
            t0 = time.perf_counter()
            held = saver.save(step, {})
            peak = (_kb("VmHWM") - base) * 1024
            saver.finish()
            total = time.perf_counter() - t0
            both = [None] * world
            dist.all_gather_object(both, (held, total, peak))
            results[name].append(tuple(max(x[i] for x in both) for i in range(3)))
    if rank == 0:
        out.put(results)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    args.dir = tempfile.mkdtemp(prefix="erc-save-bench-")
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, 4, os.path.join(args.dir, "store"), args, out))
             for r in range(4)]
    for p in procs:
        p.start()
    results = out.get(timeout=3600)
    for p in procs:
        p.join()
    shutil.rmtree(args.dir, ignore_errors=True)
    print(f"DP=2 x TP=2, distributed optimizer, hidden {args.hidden} x {args.layers} layers, "
          f"fp32 + Adam, {args.reps} alternating repetitions, slowest rank / largest peak")
    med = {k: tuple(statistics.median(x[i] for x in v) for i in range(3))
           for k, v in results.items()}
    for k, (held, total, peak) in med.items():
        print(f"  {k:10s} training held {held:6.2f} s   published after {total:6.2f} s   "
              f"peak extra host memory {peak / 2**20:7.1f} MiB")
    old, new, asyn = med["old"], med["new"], med["new+async"]
    print(f"new / old: time {new[0] / old[0]:.2f}x, memory {new[2] / max(old[2], 1):.2f}x; "
          f"new+async / old: training held {asyn[0] / old[0]:.2f}x, memory "
          f"{asyn[2] / max(old[2], 1):.2f}x (targets <= 0.6x time, <= 0.5x memory)")


if __name__ == "__main__":
    main()
