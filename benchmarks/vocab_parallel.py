"""Time and peak extra memory of ``megatron_erc.ops.logprobs_and_entropy`` against two
baselines measured in the same run, at TP=1 and TP=2 over gloo, fp32 and bf16:

  naive  gather the vocabulary, log_softmax, entropy from the softmax.
  peers  megatron-core ``tensor_parallel.vocab_parallel_cross_entropy`` on a clone of the
         logits (it works in place) plus a separate no-grad vocab-parallel entropy pass.

Modes: ``train`` (logp gradient, entropy without gradient) and ``score`` (no grad at all;
ours chunked). Peak extra memory = VmHWM (reset through /proc/self/clear_refs just before
the op) minus VmRSS once the inputs exist; in train mode it includes the logits gradient.
Time is the median of a few repetitions on rank 0 (one torch thread per rank).

    python benchmarks/vocab_parallel.py [--quick]
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

TARGETS = {"train": (0.6, 1.0), "score": (0.6, 0.3)}  # vs peers: (time, memory)


# ---------------------------------------------------------------------------- the methods


class _GatherVocab(torch.autograd.Function):
    """Megatron's ``gather_from_tensor_model_parallel_region`` (all-gather forward, keep
    own slice backward). Megatron's own allocates on ``torch.cuda.current_device()``, which
    fails on a CPU-only torch, hence this copy."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        if dist.get_world_size(group) == 1:
            return x
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts, dim=-1)

    @staticmethod
    def backward(ctx, grad):
        world, rank = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        return grad.chunk(world, dim=-1)[rank].contiguous(), None


def naive(x, labels, group):
    full = _GatherVocab.apply(x, group)  # [T, V]
    logp_all = torch.log_softmax(full.float(), dim=-1)
    logp = logp_all.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    with torch.no_grad():
        ent = -(torch.softmax(full.float(), dim=-1) * logp_all).sum(-1)
    return logp, ent


def _peer_entropy(x, group):
    """A typical separate vocab-parallel entropy pass (as in verl), no grad."""
    with torch.no_grad():
        z = x.float()
        m = z.max(dim=-1).values
        dist.all_reduce(m, op=dist.ReduceOp.MAX, group=group)
        shifted = z - m.unsqueeze(-1)
        e = shifted.exp()
        s = e.sum(-1)
        dist.all_reduce(s, group=group)
        p = e / s.unsqueeze(-1)
        pz = (p * shifted).sum(-1)
        dist.all_reduce(pz, group=group)
        return s.log() - pz


def peers(x, labels, group):
    from megatron.core import tensor_parallel

    ent = _peer_entropy(x, group)
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
        return x.grad
    with torch.no_grad():
        return fn(x, labels, group)


def _measure(fn, x, labels, grad_out, group, mode, reps):
    """(median seconds, peak extra MiB) of one op on this rank."""
    x.grad = None
    _libc.malloc_trim(0)
    dist.barrier(group=group)
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    out = _run(fn, x, labels, grad_out, group, mode)
    extra_mib = (_status_kb("VmHWM") - base) / 1024
    del out
    x.grad = None
    times = []
    for _ in range(reps):
        dist.barrier(group=group)
        t0 = time.perf_counter()
        out = _run(fn, x, labels, grad_out, group, mode)
        times.append(time.perf_counter() - t0)
        del out
        x.grad = None
    return statistics.median(times), extra_mib


def _rank_main(rank, tp, store_path, tokens, v_local, chunk, reps, queue):
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    dist.init_process_group("gloo", store=dist.FileStore(store_path, tp), rank=rank,
                            world_size=tp)
    try:
        from megatron.core import parallel_state

        # On a CPU-only torch, initialize_model_parallel and vocab_parallel_cross_entropy
        # need no torch.cuda call (megatron-core 0.16.1, gloo); only the naive baseline's
        # gather does, see _GatherVocab.
        parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
        group = parallel_state.get_tensor_model_parallel_group()
        methods = {"naive": naive, "peers": peers, "ours": make_ours(chunk)}
        rows = []
        for dtype in (torch.float32, torch.bfloat16):
            gen = torch.Generator().manual_seed(1234 + rank)
            x = (torch.randn(tokens, v_local, generator=gen) * 2).to(dtype)
            labels = torch.randint(0, v_local * tp, (tokens,),
                                   generator=torch.Generator().manual_seed(99))
            grad_out = torch.randn(tokens, generator=torch.Generator().manual_seed(7))
            for mode in ("train", "score"):
                x.requires_grad_(mode == "train")
                _run(methods["ours"], x, labels, grad_out, group, mode)  # warm-up
                x.grad = None
                for name, fn in methods.items():
                    sec, mib = _measure(fn, x, labels, grad_out, group, mode, reps)
                    rows.append((str(dtype).split(".")[1], mode, name, sec, mib))
            del x
        queue.put((rank, rows))
    except BaseException:
        queue.put((rank, traceback.format_exc()))
        raise
    finally:
        parallel_state.destroy_model_parallel()
        dist.destroy_process_group()


def run_tp(tp, tokens, v_local, chunk, reps):
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory(prefix="erc-bench-") as tmp:
        store = os.path.join(tmp, "store")
        procs = [ctx.Process(target=_rank_main,
                             args=(r, tp, store, tokens, v_local, chunk, reps, queue))
                 for r in range(tp)]
        for p in procs:
            p.start()
        results = {}
        for _ in range(tp):
            rank, payload = queue.get(timeout=600)
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
    print(f"\n== TP={tp} ==")
    print(f"{'dtype':9}{'mode':6}{'method':7}{'time ms':>9}{'extra MiB':>11}"
          f"{'t/naive':>9}{'t/peers':>9}{'m/naive':>9}{'m/peers':>9}")
    for dtype, mode in dict.fromkeys((d, m) for d, m, _, _, _ in rows):
        nt, nm = by[(dtype, mode, "naive")]
        pt, pm = by[(dtype, mode, "peers")]
        for name in ("naive", "peers", "ours"):
            s, mib = by[(dtype, mode, name)]
            flag = ""
            if name == "ours":
                t_target, m_target = TARGETS[mode]
                ok_t, ok_m = s / pt <= t_target, mib / pm <= m_target
                flag = f"  time<={t_target}x:{'ok' if ok_t else 'MISS'}" \
                       f" mem<={m_target}x:{'ok' if ok_m else 'MISS'}"
                if not (ok_t and ok_m):
                    misses.append(f"TP={tp} {dtype} {mode}")
            print(f"{dtype:9}{mode:6}{name:7}{s * 1e3:9.1f}{mib:11.1f}"
                  f"{s / nt:9.2f}{s / pt:9.2f}{mib / nm:9.2f}{mib / pm:9.2f}{flag}")
    return misses


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--tokens", type=int, default=None)
    parser.add_argument("--vocab-local", type=int, default=None)
    parser.add_argument("--chunk", type=int, default=64, help="ours: chunk_size (tokens)")
    parser.add_argument("--reps", type=int, default=None)
    args = parser.parse_args()
    tokens = args.tokens or (512 if args.quick else 4096)
    v_local = args.vocab_local or (4096 if args.quick else 16384)
    reps = args.reps or (2 if args.quick else 3)
    print(f"tokens={tokens} vocab/TP={v_local} chunk_size={args.chunk} reps={reps} "
          f"threads/rank=1")
    t0 = time.perf_counter()
    misses = []
    for tp in (1, 2):
        misses += report(tp, run_tp(tp, tokens, v_local, args.chunk, reps))
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; "
          + ("all targets met" if not misses else "targets missed: " + "; ".join(misses)))


if __name__ == "__main__":
    main()
