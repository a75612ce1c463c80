"""Rollout throughput of the vLLM engine against the embedded (HF transformers) engine, and
weight-sync bandwidth of both, measured in the same run on the same tiny random-init Qwen2.

Both engines get the same prompts and produce exactly ``--tokens`` tokens per response (no stop
tokens) with per-token log-probs, sampled at temperature 1. Throughput counts response tokens;
repetitions of the two engines are interleaved after one warm-up each (vLLM's first log-prob
generate compiles a helper), and median and best are printed: on a shared 2-core machine a
single run swings by 10x with other processes' load, and the best is closest to the engine's
own speed. In-process vLLM reduces the torch threads to 1 and binds its OMP threads (while
``torch.get_num_threads()`` still reports the old number), so the engines share them.

    python benchmarks/rollout.py [--prompts 32] [--tokens 64] [--reps 5] [--multiprocessing]

``--sync``: instead, weight-sync bandwidth into the embedded engine, in-process vLLM and vLLM
with a worker process (shared-memory slots), each as a ratio of a same-run memcpy of the same
bytes, on a wider model (hidden 1024, 8 layers, vocabulary 32000: 0.5 GiB fp32).

``--layout``: instead, "2 ranks, trainer TP=2": generation tokens/s (grading included) of
the job's whole rollout when every rank runs an embedded engine on its share of the prompts
(``trainer/rollouts.generate_sharded``) against the earlier layout, one engine on TP rank 0
while the other rank waits, in the same run over two gloo ranks, one thread each.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from megatron_erc.rollout import EmbeddedEngine, SamplingConfig, sync_weights, vllm_available

TINY_CONFIG = Path(__file__).resolve().parents[1] / "examples" / "tiny" / "config.json"


def tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(TINY_CONFIG.read_text()))
    config.num_attention_heads, config.num_key_value_heads = 4, 2  # head_dim 32 for vLLM CPU
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


def generate_rate(engine, prompts, cfg: SamplingConfig, seed: int) -> float:
    start = time.perf_counter()
    out = engine.generate(prompts, SamplingConfig(**{**vars(cfg), "seed": seed}))
    seconds = time.perf_counter() - start
    n_tokens = sum(len(s.token_ids) for group in out for s in group)
    assert n_tokens == len(prompts) * cfg.n * cfg.max_tokens, "responses ended early"
    assert all(len(s.logprobs) == len(s.token_ids) for group in out for s in group)
    return n_tokens / seconds


def sync_rate(engine, weights: dict[str, torch.Tensor]) -> float:
    manifest = {k: tuple(w.shape) for k, w in weights.items()}
    return sync_weights(engine, iter(weights.items()), 1 << 20, manifest).bytes_per_second


def summary(rates: list[float]) -> str:
    return f"median {statistics.median(rates):9.0f}  best {max(rates):9.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--prompt-len", type=int, default=16)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--multiprocessing", action="store_true",
                        help="run vLLM's engine core in its own process (default: in-process)")
    args = parser.parse_args()

    model = tiny_model()
    gen = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompts = torch.randint(1, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()
    cfg = SamplingConfig(temperature=1.0, max_tokens=args.tokens)
    weights = {k: p.detach().clone() for k, p in model.named_parameters()}
    print(f"tiny Qwen2 ({sum(w.numel() for w in weights.values()) / 1e6:.2f} M params), "
          f"{args.prompts} prompts x {args.prompt_len} tokens -> {args.tokens} tokens, "
          f"log-probs on, torch threads {torch.get_num_threads()}")

    engines = {"embedded": EmbeddedEngine(model)}
    model_dir = tempfile.TemporaryDirectory()
    if vllm_available():
        from megatron_erc.rollout import VLLMEngine

        model.save_pretrained(model_dir.name)
        start = time.perf_counter()
        engines["vllm"] = VLLMEngine(
            model_dir.name, max_model_len=args.prompt_len + args.tokens + 8,
            kv_cache_memory_bytes=128 << 20, multiprocessing=args.multiprocessing)
        print(f"vllm engine start {time.perf_counter() - start:.1f} s")
    else:
        print("vllm not installed (scripts/install_vllm.sh): embedded engine only")
    print(f"torch.get_num_threads() = {torch.get_num_threads()} (in-process vLLM logs that it "
          "reduces torch threads to 1 and binds its OMP threads; both engines share them)")

    tps = {name: [] for name in engines}
    bw = {name: [] for name in engines}
    for engine in engines.values():  # warm-up (vLLM compiles its log-prob helper)
        engine.generate(prompts[:2], SamplingConfig(max_tokens=4, seed=0))
    # Interleaved repetitions, so a burst of load from other processes hits both engines.
    for rep in range(args.reps):
        for name, engine in engines.items():
            tps[name].append(generate_rate(engine, prompts, cfg, seed=rep))
            bw[name].append(sync_rate(engine, weights))
    for engine in engines.values():
        engine.close()
    model_dir.cleanup()

    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    for name in engines:
        print(f"{name:9s} tok/s {summary(tps[name])}   weight sync MiB/s "
              f"{summary([b / 2**20 for b in bw[name]])}  ({nbytes / 2**20:.1f} MiB)")
    if "vllm" in engines:
        ratio = lambda d, f: f(d["vllm"]) / f(d["embedded"])
        print(f"ratio vllm/embedded: throughput median {ratio(tps, statistics.median):.2f}x "
              f"best {ratio(tps, max):.2f}x; "
              f"weight sync median {ratio(bw, statistics.median):.3f}x")


def _layout_rank(rank: int, store: str, args, queue) -> None:
    import torch.distributed as dist

    from megatron_erc import platform
    from megatron_erc.rewards import RewardGrader
    from megatron_erc.trainer.layout import engine_slot
    from megatron_erc.trainer.rollouts import Generator, generate_sharded

    torch.set_num_threads(1)
    platform.setup()
    dist.init_process_group("gloo", store=dist.FileStore(store, 2), rank=rank, world_size=2)
    platform.init_model_parallel(2, 1, seed=0)  # the trainer's TP=2 groups exist as in a run
    model = tiny_model()
    vocab = model.config.vocab_size
    gen = torch.Generator().manual_seed(0)
    prompts = [(p, "0") for p in torch.randint(
        1, vocab, (args.prompts, args.prompt_len), generator=gen).tolist()]
    sampling = SamplingConfig(n=4, temperature=1.0, max_tokens=args.tokens)
    engine = EmbeddedEngine(model)
    rates = {"every rank generates": [], "TP rank 0 generates": []}
    with RewardGrader("math", timeout_s=5.0, num_workers=1) as grader:
        slots = {"every rank generates": engine_slot(rank, rank, 2, 2, 1),
                 "TP rank 0 generates": engine_slot(rank, rank, 2, 2, 2)}
        gens = {k: Generator(slot=s, engine=engine if s.is_leader else None,
                             grader=grader if s.is_leader else None,
                             decode=lambda ids: " ".join(map(str, ids))) for k, s in slots.items()}
        for rep in range(args.reps + 1):  # the first round warms up
            for name, g in gens.items():
                dist.barrier()
                start = time.perf_counter()
                groups, _ = generate_sharded(g, prompts, sampling, seeds=list(range(len(prompts))))
                seconds = time.perf_counter() - start
                tokens = sum(len(s.token_ids) for grp in groups for s in grp.samples)
                if rep:
                    rates[name].append(tokens / seconds)
    if rank == 0:
        queue.put(rates)
    dist.destroy_process_group()


def layout_main(args) -> None:
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=_layout_rank, args=(r, f"{tmp}/store", args, queue))
                 for r in range(2)]
        for p in procs:
            p.start()
        rates = queue.get(timeout=1800)
        for p in procs:
            p.join()
    print(f"2 ranks, trainer TP=2, embedded engine, {args.prompts} prompts x 4 samples x "
          f"{args.tokens} tokens, grading included")
    for name, r in rates.items():
        print(f"  {name:22s} tok/s {summary(r)}")
    new, old = rates["every rank generates"], rates["TP rank 0 generates"]
    median = statistics.median(new) / statistics.median(old)
    print(f"ratio every-rank / TP-rank-0: median {median:.2f}x  best {max(new) / max(old):.2f}x")


def sync_main(args) -> None:
    """Weight-sync bandwidth into each engine path as a ratio of a same-run memcpy of the same
    bytes (one destination tensor per weight, copied in the same order, same threads)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        "qwen2", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 3,
        num_hidden_layers=args.layers, num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 128, max_position_embeddings=256,
        tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    weights = {k: p.detach().clone().add_(1e-3) for k, p in model.named_parameters()}
    manifest = {k: tuple(w.shape) for k, w in weights.items()}
    nbytes = sum(w.numel() * w.element_size() for w in weights.values())
    dest = {k: torch.empty_like(w) for k, w in weights.items()}
    bucket = args.bucket_mb << 20
    engines = {"embedded (in process)": lambda: EmbeddedEngine(model)}
    model_dir = tempfile.TemporaryDirectory()
    if vllm_available():
        from megatron_erc.rollout import VLLMEngine

        model.save_pretrained(model_dir.name)
        for name, mp_on in (("vllm in process", False), ("vllm worker process", True)):
            engines[name] = lambda mp_on=mp_on: VLLMEngine(
                model_dir.name, max_model_len=64, kv_cache_memory_bytes=32 << 20,
                multiprocessing=mp_on)
    print(f"model {nbytes / 2**20:.0f} MiB fp32 ({len(weights)} tensors), bucket "
          f"{args.bucket_mb} MiB, torch threads {torch.get_num_threads()}")
    for name, build in engines.items():
        engine = build()
        sync_weights(engine, iter(weights.items()), bucket, manifest)  # warm-up
        ratios, rates = [], []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            for k, w in weights.items():
                dest[k].copy_(w)
            memcpy = nbytes / (time.perf_counter() - t0)
            rate = sync_weights(engine, iter(weights.items()), bucket, manifest).bytes_per_second
            rates.append(rate)
            ratios.append(rate / memcpy)
        engine.close()
        print(f"  {name:22s} sync {statistics.median(rates) / 2**30:6.2f} GiB/s   "
              f"ratio to memcpy: median {statistics.median(ratios):.2f}  best {max(ratios):.2f}")
    model_dir.cleanup()


if __name__ == "__main__":
    import sys

    if "--sync" in sys.argv:
        parser = argparse.ArgumentParser(description="weight-sync bandwidth benchmark")
        parser.add_argument("--sync", action="store_true")
        parser.add_argument("--hidden", type=int, default=1024)
        parser.add_argument("--layers", type=int, default=8)
        parser.add_argument("--vocab", type=int, default=32000)
        parser.add_argument("--bucket-mb", type=int, default=64)
        parser.add_argument("--reps", type=int, default=5)
        sync_main(parser.parse_args())
    elif "--layout" in sys.argv:
        parser = argparse.ArgumentParser(description="rollout layout benchmark")
        parser.add_argument("--layout", action="store_true")
        # 128 prompts x 4 samples = 512 responses per round (the R1 recipe draws 256 x 8);
        # at 32 prompts the tiny model's per-token overhead, not its batch, sets the pace
        parser.add_argument("--prompts", type=int, default=128)
        parser.add_argument("--prompt-len", type=int, default=16)
        parser.add_argument("--tokens", type=int, default=48)
        parser.add_argument("--reps", type=int, default=5)
        layout_main(parser.parse_args())
    else:
        main()
