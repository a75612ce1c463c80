"""Checkpoint save time and peak extra host memory at DP=2 x TP=2 (4 gloo ranks): megatron's
fully parallel save (each data-parallel replica writes a disjoint share of the tensors both
replicas hold; ``checkpoint.parallel_save``, the default) against the first replica writing
them all, same model, same run, alternating repetitions (medians).

Peak extra memory: per rank, ``VmHWM`` (reset through ``/proc/self/clear_refs`` just before
the save) minus ``VmRSS`` at that moment; the largest over ranks.

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
    from megatron_erc.checkpoint.train import save_checkpoint
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig

    platform.setup()
    platform.init_model_parallel(2, 1, seed=0)
    hf = AutoConfig.for_model("qwen2", vocab_size=8192, hidden_size=args.hidden,
                              intermediate_size=args.hidden * 3, num_hidden_layers=args.layers,
                              num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=512, tie_word_embeddings=False)
    actor = Actor(hf, ParallelConfig(tp=2, pad_vocab_multiple=1), OptimConfig())
    for m in actor.model:  # optimizer state exists after a first step
        for p in m.parameters():
            p.main_grad.normal_()
    actor.step()
    root = os.path.join(args.dir, "ckpt")
    results = {"parallel": [], "first replica": []}
    step = 0
    for _ in range(args.reps):
        for name, parallel in (("first replica", False), ("parallel", True)):
            step += 1
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            base = _kb("VmRSS")
            dist.barrier()
            t0 = time.perf_counter()
            save_checkpoint(root, step, actor, {}, keep_last=1, parallel=parallel)
            seconds = time.perf_counter() - t0
            peak = (_kb("VmHWM") - base) * 1024
            both = [None] * world
            dist.all_gather_object(both, (seconds, peak))
            results[name].append((max(s for s, _ in both), max(p for _, p in both)))
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
    print(f"DP=2 x TP=2, hidden {args.hidden} x {args.layers} layers, fp32 + Adam, "
          f"{args.reps} alternating repetitions, slowest rank / largest peak")
    med = {k: (statistics.median(s for s, _ in v), statistics.median(p for _, p in v))
           for k, v in results.items()}
    for k, (s, p) in med.items():
        print(f"  {k:14s} save {s:6.2f} s   peak extra host memory {p / 2**20:7.1f} MiB")
    (ps_, pp_), (fs, fp) = med["parallel"], med["first replica"]
    print(f"parallel / first replica: time {ps_ / fs:.2f}x (target <= 0.6x), "
          f"memory {pp_ / max(fp, 1):.2f}x (target <= 0.5x)")


if __name__ == "__main__":
    main()
