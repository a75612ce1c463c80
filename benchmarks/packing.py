"""Update-phase time and padded-token fraction: packed token-budget micro-batches vs
pad-to-longest, on the same model, sequences and weights, in the same run.

256 sequences with long-tailed lengths (log-normal, clipped to 16..2048 tokens) on a tiny but
wider model (hidden 256, 4 layers, 8 heads / 4 key-value heads), one process, one optimizer
step per variant through the trainer's own code path (``steps.micro_batches_for_rank`` +
``steps.update``: forward, ERC/DAPO loss, backward, step):

  padded   every micro-batch ``[micro_batch_size, longest]`` (the trainer before packing:
           one width, the longest sequence's, for all micro-batches)
  packed   ``run.pack_sequences`` with ``run.max_tokens_per_micro_batch``: THD rows

The padded fraction counts model positions that are padding (``1 - real / computed``).
Variants alternate over ``--reps`` repetitions (medians); lr 1e-6 keeps the weights
almost unchanged between them.
Targets: packed padded fraction < 5%, packed update time <= 0.5x padded.

    python benchmarks/packing.py [--seqs 256] [--max-len 2048] [--budget 8192] [--quick]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time

import torch
import torch.distributed as dist


def sequences(n: int, lo: int, hi: int, vocab: int, seed: int = 0):
    from megatron_erc.trainer.batch import Sequence

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        total = min(hi, max(lo, int(rng.lognormvariate(5.3, 0.9))))
        prompt = min(64, total // 4)
        resp = total - prompt
        out.append(Sequence([rng.randrange(vocab) for _ in range(prompt)],
                            [rng.randrange(vocab) for _ in range(resp)],
                            [-rng.random() for _ in range(resp)], rng.uniform(-1, 1),
                            float(rng.random() < 0.5)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seqs", type=int, default=256)
    ap.add_argument("--max-len", type=int, default=2048)
    ap.add_argument("--budget", type=int, default=8192, help="packed tokens per micro-batch")
    ap.add_argument("--micro-batch-size", type=int, default=4, help="padded rows per micro-batch")
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="64 sequences up to 512 tokens")
    args = ap.parse_args()
    if args.quick:
        args.seqs, args.max_len, args.budget = 64, 512, 2048

    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.config import load_config
    from megatron_erc.models import ParallelConfig
    from megatron_erc.trainer.actor import Actor, OptimConfig
    from megatron_erc.trainer.config import TrainConfig
    from megatron_erc.trainer.steps import micro_batches_for_rank, update

    platform.setup()
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(), "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    platform.init_model_parallel(1, 1, seed=0)
    hf = AutoConfig.for_model("qwen2", vocab_size=509, hidden_size=256, intermediate_size=704,
                              num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=4,
                              max_position_embeddings=4096, tie_word_embeddings=False)
    actor = Actor(hf, ParallelConfig(pad_vocab_multiple=1), OptimConfig(lr=1e-6))
    cfg = load_config(TrainConfig, None, [])
    seqs = sequences(args.seqs, 16, args.max_len, hf.vocab_size)
    groups = [seqs[i:i + 8] for i in range(0, len(seqs), 8)]
    real = sum(len(s) - 1 for s in seqs)
    common = dict(updates=1, dp_size=1, dp_rank=0, seq_len=args.max_len, pad_id=0,
                  device=actor.device)
    variants = {
        "padded": dict(micro_batch_size=args.micro_batch_size, fixed_shape=True),
        "packed": dict(micro_batch_size=args.micro_batch_size, packed=True,
                       max_tokens=args.budget),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    shape: dict[str, tuple[int, int]] = {}
    for _ in range(args.reps):
        for name, kw in variants.items():
            minis = micro_batches_for_rank(groups, **common, **kw)
            computed = sum(mb.tokens.numel() for mini in minis for mb in mini)
            shape[name] = (sum(len(m) for m in minis), computed)
            t0 = time.perf_counter()
            for mini in minis:
                update(cfg, actor, mini)
            times[name].append(time.perf_counter() - t0)
    print(f"{args.seqs} sequences, {real} real tokens (lengths 16..{args.max_len}, log-normal); "
          f"threads={torch.get_num_threads()}, reps={args.reps}")
    for name in variants:
        n_mb, computed = shape[name]
        print(f"  {name:7s} micro-batches={n_mb:4d} computed positions={computed:8d} "
              f"padded fraction={1 - real / computed:6.1%} "
              f"update time={statistics.median(times[name]):8.2f} s")
    ratio = statistics.median(times["packed"]) / statistics.median(times["padded"])
    print(f"packed / padded update time: {ratio:.3f}x (target <= 0.5x); packed padded fraction "
          f"{1 - real / shape['packed'][1]:.1%} (target < 5%)")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
