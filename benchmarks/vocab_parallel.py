"""Time and peak extra memory of ``megatron_erc.ops.logprobs_and_entropy`` against verl's
Megatron path, all measured in the same run, TP=2 over gloo (one thread per rank).

  verl       verl's Megatron actor (``logits_processor``): clone the logits, entropy with
             ``vocab_parallel_entropy`` (here without grad: ERC needs none), then
             ``vocab_parallel_log_probs_from_logits`` on the clone. Reimplemented from verl's
             published formulas (verl/utils/megatron/tensor_parallel.py); the log-probs are
             megatron-core's ``vocab_parallel_cross_entropy`` (what verl calls), which works
             in place, hence the clone. verl fuses the entropy's ``(softmax * logits).sum(-1)``
             with torch.compile; ``torch.einsum`` (a batched dot, no ``[T, V]`` temporary
             either) stands in for it. verl's in-place division by the temperature is left
             out (temperature 1).
  verl-lean  the same functions with the entropy run before the clone exists: the cheapest
             arrangement of verl's path (its temporaries never meet the clone).
  ours       ``logprobs_and_entropy`` with ``chunk_size = chunk_rows(64, V/tp)``, as the
             trainer calls it (``algo.logprob_chunk_mb = 64``).

Modes: ``train`` (logp gradient, entropy without gradient; the logits gradient counts in the
peak) and ``score`` (no grad: old log-probs and entropy). Peak extra memory = VmHWM (reset
through /proc/self/clear_refs just before the op) minus VmRSS once the inputs exist, rank 0.
Time: median over repetitions that alternate the methods.

    python benchmarks/vocab_parallel.py             # 4096 tokens x 16384 local vocab, fp32
    python benchmarks/vocab_parallel.py --quick     # 1024 x 8192: well under a minute
"""

from __future__ import annotations

import argparse
import ctypes
import multiprocessing as mp
import os
import statistics
import tempfile
import time
import traceback
import warnings

import torch
import torch.distributed as dist

TARGETS = {"train": (0.7, 1.0), "score": (0.5, 0.3)}  # ours / verl: (time, memory)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


# ---------------------------------------------------------------------------- the methods


def verl_entropy(logits, group):
    """verl's ``_VocabParallelEntropy.forward``: ``log Z - sum softmax * logits``."""
    logits_max = logits.max(dim=-1, keepdim=True).values
    dist.all_reduce(logits_max, op=dist.ReduceOp.MAX, group=group)
    normalized = logits - logits_max
    exp_logits = normalized.exp_()
    sum_exp = exp_logits.sum(dim=-1, keepdim=True)
    dist.all_reduce(sum_exp, group=group)
    softmax = exp_logits.div_(sum_exp)
    sum_softmax_times_logits = torch.einsum("tv,tv->t", softmax, logits).unsqueeze(-1)
    dist.all_reduce(sum_softmax_times_logits, group=group)
    return (logits_max + sum_exp.log() - sum_softmax_times_logits).squeeze(-1)


def verl(x, labels, group):
    from megatron.core import tensor_parallel

    logits_bak = x.clone()
    with torch.no_grad():
        ent = verl_entropy(x, group)
    logp = -tensor_parallel.vocab_parallel_cross_entropy(logits_bak, labels)
    return logp, ent


def verl_lean(x, labels, group):
    from megatron.core import tensor_parallel

    with torch.no_grad():
        ent = verl_entropy(x, group)
    logp = -tensor_parallel.vocab_parallel_cross_entropy(x.clone(), labels)
    return logp, ent


def make_ours(chunk):
    from megatron_erc.ops import logprobs_and_entropy

    def ours(x, labels, group):
        return logprobs_and_entropy(x, labels, tp_group=group, chunk_size=chunk)

    return ours


# ---------------------------------------------------------------------------- measurement

_libc = ctypes.CDLL("libc.so.6")


def _status_kb(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def _run(fn, x, labels, grad_out, group, mode):
    if mode == "train":
        logp, ent = fn(x, labels, group)
        logp.backward(grad_out)
        return logp.detach(), ent, x.grad
    with torch.no_grad():
        return (*fn(x, labels, group), None)


def _peak_extra_mib(fn, x, labels, grad_out, group, mode):
    x.grad = None
    _libc.malloc_trim(0)
    dist.barrier(group=group)
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = _run(fn, x, labels, grad_out, group, mode)
    extra = (_status_kb("VmHWM") - base) / 1024
    x.grad = None
    return extra, out


def _rank_main(rank, tp, store_path, tokens, v_local, chunk, reps, dtypes, queue):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, tp), rank=rank,
                            world_size=tp)
    try:
        from megatron.core import parallel_state

        # verl's path reads megatron's global TP state (ours is handed the group).
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        group = parallel_state.get_tensor_model_parallel_group()
        methods = {"verl": verl, "verl-lean": verl_lean, "ours": make_ours(chunk)}
        rows = []
        for dname in dtypes:
            gen = torch.Generator().manual_seed(1234 + rank)
            x = (torch.randn(tokens, v_local, generator=gen) * 2).to(DTYPES[dname])
            labels = torch.randint(0, v_local * tp, (tokens,),
                                   generator=torch.Generator().manual_seed(99))
            grad_out = torch.randn(tokens, generator=torch.Generator().manual_seed(7))
            for mode in ("train", "score"):
                x.requires_grad_(mode == "train")
                for fn in methods.values():  # warm-up (lazy init, allocator)
                    _run(fn, x, labels, grad_out, group, mode)
                    x.grad = None
                peaks, outs = {}, {}
                for name, fn in methods.items():
                    peaks[name], outs[name] = _peak_extra_mib(fn, x, labels, grad_out, group,
                                                              mode)
                for i in range(3 if mode == "train" else 2):  # same numbers from all
                    a, b = outs["verl"][i], outs["ours"][i]
                    tol = 2e-2 if dname == "bf16" else 1e-3
                    assert torch.allclose(a.float(), b.float(), atol=tol, rtol=tol), (mode, i)
                del outs
                times = {name: [] for name in methods}
                for _ in range(reps):
                    for name, fn in methods.items():
                        dist.barrier(group=group)
                        t0 = time.perf_counter()
                        _run(fn, x, labels, grad_out, group, mode)
                        times[name].append(time.perf_counter() - t0)
                        x.grad = None
                for name in methods:
                    rows.append((dname, mode, name, statistics.median(times[name]),
                                 peaks[name]))
            del x
        queue.put((rank, rows))
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_tp(tp, tokens, v_local, chunk, reps, dtypes):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="erc-bench-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main, args=(r, tp, store, tokens, v_local, chunk,
                                                      reps, dtypes, queue))
                 for r in range(tp)]
        for p in procs:
            p.start()
        results = {}
        for _ in range(tp):
            rank, payload = queue.get(timeout=1800)
            if isinstance(payload, str):
                for p in procs:
                    p.kill()
                raise RuntimeError(f"rank {rank} failed:\n{payload}")
            results[rank] = payload
        for p in procs:
            p.join()
    return results[0]


def report(tp, rows):
    by = {(d, m, n): (s, mib) for d, m, n, s, mib in rows}
    misses = []
    print(f"\n== TP={tp} (rank 0); ratios = ours / baseline ==")
    print(f"{'dtype':6}{'mode':7}{'baseline':11}{'base ms':>9}{'ours ms':>9}{'base MiB':>10}"
          f"{'ours MiB':>10}{'time':>8}{'memory':>9}  targets")
    for dtype, mode in dict.fromkeys((d, m) for d, m, _, _, _ in rows):
        ot, om = by[(dtype, mode, "ours")]
        t_target, m_target = TARGETS[mode]
        for base in ("verl", "verl-lean"):
            bt, bm = by[(dtype, mode, base)]
            rt, rm = ot / bt, om / bm
            flags = [f"time<={t_target}x:{'ok' if rt <= t_target else 'MISS'}",
                     f"mem<={m_target}x:{'ok' if rm <= m_target else 'MISS'}"]
            if "MISS" in "".join(flags):
                misses.append(f"TP={tp} {dtype} {mode} vs {base}")
            print(f"{dtype:6}{mode:7}{base:11}{bt * 1e3:9.1f}{ot * 1e3:9.1f}{bm:10.1f}"
                  f"{om:10.1f}{rt:7.2f}x{rm:8.3f}x  {' '.join(flags)}")
    return misses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="1024 tokens x 8192 (smoke run)")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vocab-local", type=int, default=None)
    parser.add_argument("--chunk-mb", type=int, default=64,
                        help="ours: chunk_size = chunk_rows(chunk_mb, V/tp) (trainer default)")
    parser.add_argument("--reps", type=int, default=None)
    parser.add_argument("--tp", type=int, default=2)
    parser.add_argument("--dtypes", default="fp32", help="comma list of fp32,bf16")
    args = parser.parse_args()
    from megatron_erc.ops.vocab_parallel import chunk_rows

    tokens = args.tokens or (1024 if args.quick else 4096)
    v_local = args.vocab_local or (8192 if args.quick else 16384)
    reps = args.reps or (3 if args.quick else 5)
    dtypes = args.dtypes.split(",")
    chunk = chunk_rows(args.chunk_mb, v_local)
    print(f"tokens={tokens} vocab/TP={v_local} ({tokens * v_local * 4 / 2**20:.0f} MiB fp32 "
          f"per rank) ours chunk_size={chunk} reps={reps} threads/rank=1 TP={args.tp}")
    t0 = time.perf_counter()
    misses = report(args.tp, run_tp(args.tp, tokens, v_local, chunk, reps, dtypes))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; "
          + ("all targets met" if not misses else "targets missed: " + "; ".join(misses)))


if __name__ == "__main__":
    main()
