"""GPU: time and peak extra memory of the fused output layer
(``ops.fused_logprobs_and_entropy``: hidden states + weight shard -> log-prob, entropy) against
the unfused path (``logits = hidden @ weight.T`` then ``ops.logprobs_and_entropy`` chunked by
the trainer's 64 MiB budget), same run, one GPU (TP=1), forward + backward of the log-prob
(entropy without gradient), and forward alone under no_grad (scoring).

Peak extra = ``torch.cuda.max_memory_allocated`` during the op minus what was allocated once
the inputs existed; it includes the gradients of hidden states and weight on both sides.
Both results are checked against each other first.

    python benchmarks/fused_linear.py                    # 8192 tokens, 152064 vocab, 1536 hidden
    TRITON_INTERPRET=1 python benchmarks/fused_linear.py --device cpu --tokens 32 \\
        --vocab 100 --hidden 32 --reps 1               # CPU smoke of the script itself
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from megatron_erc.ops import fused_logprobs_and_entropy, logprobs_and_entropy
from megatron_erc.ops.vocab_parallel import chunk_rows


def unfused(h, w, labels):
    logits = h @ w.T
    return logprobs_and_entropy(logits, labels, chunk_size=chunk_rows(64, w.shape[0]))


def fused(h, w, labels):
    return fused_logprobs_and_entropy(h, w, labels)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(fn, h, w, labels, train):
    if train:
        logp, ent = fn(h, w, labels)
        logp.sum().backward()
        return logp.detach(), ent
    with torch.no_grad():
        return fn(h, w, labels)


def measure(fn, h, w, labels, train, reps):
    """(median seconds, peak extra MiB or nan on CPU, outputs)."""
    device = h.device
    h.grad = w.grad = None
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    out = _run(fn, h, w, labels, train)
    _sync(device)
    peak = ((torch.cuda.max_memory_allocated(device) - base) / 2**20
            if device.type == "cuda" else float("nan"))
    times = []
    for _ in range(reps):
        h.grad = w.grad = None
        _sync(device)
        t0 = time.perf_counter()
        _run(fn, h, w, labels, train)
        _sync(device)
        times.append(time.perf_counter() - t0)
    h.grad = w.grad = None
    return statistics.median(times), peak, out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=152064)
    parser.add_argument("--hidden", type=int, default=1536)
    parser.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(args.tokens, args.hidden, device=device, generator=gen).to(dtype)
    w = (torch.randn(args.vocab, args.hidden, device=device, generator=gen)
         * args.hidden ** -0.5).to(dtype)
    labels = torch.randint(0, args.vocab, (args.tokens,), device=device, generator=gen)
    h.requires_grad_(True)
    w.requires_grad_(True)
    print(f"tokens={args.tokens} vocab={args.vocab} hidden={args.hidden} {args.dtype} "
          f"device={device} (logits would be {args.tokens * args.vocab * 4 / 2**20:.0f} MiB "
          f"in fp32)")
    for train in (True, False):
        for fn in (unfused, fused):  # warm-up: compilation, autotuning, allocator
            _run(fn, h, w, labels, train)
        rows = {fn.__name__: measure(fn, h, w, labels, train, args.reps)
                for fn in (unfused, fused)}
        (ut, um, uo), (ft, fm, fo) = rows["unfused"], rows["fused"]
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
        for a, b in zip(uo, fo, strict=True):
            torch.testing.assert_close(b.float(), a.float(), rtol=tol, atol=tol)
        mode = "train" if train else "score"
        print(f"{mode:6} unfused {ut * 1e3:9.1f} ms {um:9.0f} MiB | fused {ft * 1e3:9.1f} ms "
              f"{fm:9.0f} MiB | fused/unfused time {ft / ut:.2f}x memory {fm / um:.2f}x")


if __name__ == "__main__":
    main()
