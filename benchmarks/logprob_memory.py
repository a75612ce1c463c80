"""Peak memory of one forward+backward of ``megatron_erc.ops.logprobs_and_entropy`` with and
without chunking, both measured in the same run.

Inputs: ``[tokens, vocab]`` fp32 logits requiring grad (default 8192 x 32768: 1 GiB) and
random labels. One call computes ``(logp, entropy)``; backward runs on ``logp.sum()`` only
(entropy is a mask in ERC: no gradient), so the logits gradient is part of what is measured.

  unchunked  ``chunk_size=None``: the whole ``[tokens, vocab]`` at once.
  chunked    ``chunk_size=chunk_rows(64, vocab)``: the default budget of
             ``algo.logprob_chunk_mb=64``.

Each variant runs in a fresh subprocess so the two cannot share allocator caches or page
high-water marks. Peak extra memory is the peak during the op minus what was held once the
inputs existed: on CUDA ``torch.cuda.max_memory_allocated`` minus ``memory_allocated``; on
CPU ``VmHWM`` (reset through ``/proc/self/clear_refs`` once the inputs exist) minus
``VmRSS`` at that moment. The process's total peak is printed too (inputs included).

    python benchmarks/logprob_memory.py [--tokens 8192] [--vocab 32768] [--chunk-mb 64]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import subprocess
import sys
import time

import torch

MIB = 1 << 20


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


class _Meter:
    """Peak bytes held during a block, relative to the start and in total."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
        else:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            self.base = _status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # reset VmHWM to the current RSS

    def peak(self) -> tuple[int, int]:
        """``(peak bytes above the start, peak bytes in total)``."""
        if self.cuda:
            torch.cuda.synchronize()
            total = torch.cuda.max_memory_allocated()
        else:
            total = _status_kb("VmHWM") * 1024
        return total - self.base, total


def measure(tokens: int, vocab: int, chunk: int | None, device: torch.device) -> dict:
    """One forward+backward in this process; returns peaks (bytes) and seconds."""
    from megatron_erc.ops.vocab_parallel import logprobs_and_entropy

    torch.set_num_threads(1)
    # Warm-up on a small slice so one-off lazy allocations (kernels, caches) are not counted.
    w = torch.randn(4, vocab, device=device, requires_grad=True)
    logprobs_and_entropy(w, torch.zeros(4, dtype=torch.long, device=device),
                         chunk_size=chunk)[0].sum().backward()
    del w
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(tokens, vocab, generator=gen, device=device).mul_(2)
    logits.requires_grad_(True)
    labels = torch.randint(0, vocab, (tokens,), generator=gen, device=device)
    meter = _Meter(device)
    meter.start()
    t0 = time.perf_counter()
    logp, entropy = logprobs_and_entropy(logits, labels, chunk_size=chunk)
    logp.sum().backward()
    extra, total = meter.peak()
    seconds = time.perf_counter() - t0
    assert logits.grad is not None and torch.isfinite(entropy).all()
    return {"chunk_size": chunk, "peak_extra_bytes": extra, "peak_total_bytes": total,
            "inputs_bytes": logits.numel() * logits.element_size(), "seconds": seconds}


def run_variant(args: argparse.Namespace, chunk: int | None) -> dict:
    """``measure`` in a fresh interpreter (this script with ``--child``)."""
    cmd = [sys.executable, __file__, "--child", "--tokens", str(args.tokens), "--vocab",
           str(args.vocab), "--device", args.device, "--chunk", str(chunk or 0)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if proc.returncode:
        raise RuntimeError(f"variant chunk_size={chunk} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=8192)
    parser.add_argument("--vocab", type=int, default=32768, help="(local) vocabulary size")
    parser.add_argument("--chunk-mb", type=int, default=64,
                        help="byte budget of the chunked variant (algo.logprob_chunk_mb)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        out = measure(args.tokens, args.vocab, args.chunk or None, torch.device(args.device))
        print(json.dumps(out))
        return

    from megatron_erc.ops.vocab_parallel import chunk_rows

    chunk = chunk_rows(args.chunk_mb, args.vocab)
    how = ("torch.cuda.max_memory_allocated" if args.device.startswith("cuda")
           else "VmHWM - VmRSS, fresh process per variant")
    print(f"tokens={args.tokens} vocab={args.vocab} fp32 logits "
          f"({args.tokens * args.vocab * 4 / MIB:.0f} MiB), backward of logp.sum(); "
          f"device={args.device}; peak by {how}")
    t0 = time.perf_counter()
    rows = {"unchunked": run_variant(args, None), "chunked": run_variant(args, chunk)}
    print(f"{'variant':10}{'chunk_size':>11}{'peak extra MiB':>16}{'peak total MiB':>16}"
          f"{'seconds':>9}")
    for name, r in rows.items():
        print(f"{name:10}{str(r['chunk_size']):>11}{r['peak_extra_bytes'] / MIB:16.0f}"
              f"{r['peak_total_bytes'] / MIB:16.0f}{r['seconds']:9.2f}")
    u, c = rows["unchunked"], rows["chunked"]
    ratio_extra = c["peak_extra_bytes"] / u["peak_extra_bytes"]
    ratio_total = c["peak_total_bytes"] / u["peak_total_bytes"]
    print(f"chunked / unchunked: peak extra {ratio_extra:.2f}x, peak total {ratio_total:.2f}x "
          f"(the logits gradient, {u['inputs_bytes'] / MIB:.0f} MiB, is in both); "
          f"total {time.perf_counter() - t0:.0f} s")
    print(json.dumps({"tokens": args.tokens, "vocab": args.vocab, "device": args.device,
                      "chunk_mb": args.chunk_mb, **rows, "ratio_peak_extra": ratio_extra,
                      "ratio_peak_total": ratio_total}))


if __name__ == "__main__":
    main()
