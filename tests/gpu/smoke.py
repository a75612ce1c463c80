"""One-GPU smoke run: the RL loop and a realistic training step on CUDA.

  rl    3 RL steps of the tiny demo through the CLI (``megatron_erc.cli train``) with the
        embedded engine; metrics.jsonl must hold 3 rows with finite values.
  step  one training step (``Actor.forward_backward`` + ``Actor.step``) of a randomly
        initialised model with DeepSeek-R1-Distill-Qwen-1.5B's shapes, bf16 parameters, one
        micro-batch of 8192 tokens, log-probs chunked by the 64 MiB budget and full
        activation recompute; prints tokens/s, peak memory and MFU.

Results: human-readable ``[smoke]`` lines, one JSON line, and ``$OUT/gpu_smoke.json`` when
``$OUT`` is set (or ``--out``). ``--tiny`` runs the same step code on a 2-layer model with
512 tokens and a 1 MiB log-prob chunk budget (32 tokens a chunk), on CPU too (the CI test),
so this path is exercised without a GPU.

    python -m tests.gpu.smoke [--part all|rl|step] [--tiny] [--out FILE]

MFU counts model FLOPs only: ``6 * N * tokens`` (N = matmul parameters: all but the input
embedding) plus causal attention ``6 * layers * heads * head_dim * seq * tokens`` (forward +
backward, half the square); recompute is not counted. Peak dense bf16 FLOP/s by device name
(H100/H200 989e12, A100 312e12) or ``GPU_PEAK_TFLOPS`` (TFLOP/s, overrides the table).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

import torch

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "examples" / "tiny" / "dapo_erc.yaml"

R1_DISTILL_QWEN_1_5B = dict(
    model_type="qwen2", vocab_size=151936, hidden_size=1536, intermediate_size=8960,
    num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
    max_position_embeddings=131072, rms_norm_eps=1e-6, rope_theta=10000.0,
    tie_word_embeddings=False, hidden_act="silu", initializer_range=0.02)
TINY = {**R1_DISTILL_QWEN_1_5B, "hidden_size": 256, "intermediate_size": 688,
        "num_hidden_layers": 2, "num_attention_heads": 4, "vocab_size": 4096,
        "max_position_embeddings": 4096}
PEAK_BF16_FLOPS = (("H100", 989e12), ("H200", 989e12), ("A100", 312e12))
METRIC_KEYS = ("loss", "grad_norm", "reward/mean", "entropy/mean")


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 FLOP/s of the device: ``GPU_PEAK_TFLOPS`` if set, else the table."""
    if os.environ.get("GPU_PEAK_TFLOPS"):
        return float(os.environ["GPU_PEAK_TFLOPS"]) * 1e12
    return next((f for key, f in PEAK_BF16_FLOPS if key in device_name.upper()), None)


def model_flops(matmul_params: int, hf: dict, seq: int, tokens: int) -> float:
    """Forward + backward model FLOPs of one step (no recompute), see the module doc."""
    attn_dim = hf["num_attention_heads"] * hf.get(
        "head_dim", hf["hidden_size"] // hf["num_attention_heads"])
    return 6 * matmul_params * tokens + 6 * hf["num_hidden_layers"] * attn_dim * seq * tokens


def _env() -> dict:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    return dict(os.environ, PYTHONPATH=path)


# ---------------------------------------------------------------------------- rl: CLI run


def rl_steps(work: pathlib.Path, steps: int = 3, timeout: float = 300) -> dict:
    """``megatron_erc.cli train`` on the prepared demo task; checks metrics.jsonl."""
    from megatron_erc.cli.demo import prepare

    task, run_dir = work / "task", work / "rl"
    prepare(task, seed=0)
    cmd = [sys.executable, "-m", "megatron_erc.cli", "train", "--config", str(CONFIG),
           f"run.dir={run_dir}", f"run.steps={steps}", f"model.path={task / 'init'}",
           f"model.tokenizer={task / 'tokenizer.model'}",
           f"data.path={task / 'data' / 'train.jsonl'}", "validation.path=null",
           "rollout.engine=embedded",
           # a random-init policy is never right: rewards that vary keep groups in the batch
           "rollout.reward_fn=tests.e2e.rewards:parity_reward"]
    t0 = time.perf_counter()
    with open(work / "rl.log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=_env(), stdout=log, stderr=subprocess.STDOUT,
                              timeout=timeout)
    seconds = time.perf_counter() - t0
    if proc.returncode:
        tail = (work / "rl.log").read_text()[-4000:]
        raise RuntimeError(f"train exited with {proc.returncode}:\n{tail}")
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    if [r.get("step") for r in rows] != list(range(1, steps + 1)):
        raise AssertionError(f"expected steps 1..{steps} in metrics.jsonl, got "
                             f"{[r.get('step') for r in rows]}")
    bad = [(r["step"], k, r.get(k)) for r in rows for k in METRIC_KEYS
           if not isinstance(r.get(k), (int, float)) or not math.isfinite(r[k])]
    if bad:
        raise AssertionError(f"missing or non-finite metrics (step, key, value): {bad}")
    return {"steps": len(rows), "seconds": round(seconds, 1),
            **{k: [r[k] for r in rows] for k in ("loss", "reward/mean", "grad_norm")},
            "tokens_per_s": rows[-1].get("tokens_per_s")}


# ---------------------------------------------------------------------------- step: 1.5B


def _peak_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    with open("/proc/self/status") as f:  # peak resident set of this process
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def train_step(*, tiny: bool = False, tokens: int | None = None, chunk_mb: int = 64,
               steps: int = 2, recompute: str = "full") -> dict:
    """``steps`` training steps on one micro-batch ``[1, tokens]``; speed and MFU from the
    last one (the first pays for kernel selection and the optimizer's lazy state)."""
    import torch.distributed as dist
    from megatron.core import parallel_state
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig
    from megatron_erc.ops.vocab_parallel import chunk_rows, logprobs_and_entropy
    from megatron_erc.platform.distributed import init_process_group
    from megatron_erc.trainer.actor import Actor, OptimConfig

    spec = TINY if tiny else R1_DISTILL_QWEN_1_5B
    seq = tokens or (512 if tiny else 8192)
    plat = init_process_group(platform.setup())
    platform.init_model_parallel(1, 1, seed=0)
    device = (torch.device("cuda", torch.cuda.current_device()) if plat.device_type == "cuda"
              else torch.device("cpu"))
    notes = []
    try:
        hf = AutoConfig.for_model(**spec)
        kwargs = {"params_dtype": "bfloat16"}
        if "recompute" in {f.name for f in dataclasses.fields(ParallelConfig)}:
            kwargs["recompute"] = recompute
        else:
            notes.append("ParallelConfig has no `recompute` field yet: no activation recompute")
            recompute = "unavailable"
        torch.manual_seed(0)
        actor = Actor(hf, ParallelConfig(**kwargs), OptimConfig(lr=1e-6, weight_decay=0.0))
        module = actor.model[0].module
        params = sum(p.numel() for p in module.parameters())
        matmul_params = params - sum(p.numel() for n, p in module.named_parameters()
                                     if "word_embeddings" in n)
        gen = torch.Generator().manual_seed(0)
        ids = torch.randint(0, hf.vocab_size, (1, seq + 1), generator=gen).to(device)
        mask = torch.ones(1, seq, device=device)
        batch = _micro_batch(tokens=ids[:, :-1], labels=ids[:, 1:], loss_mask=mask)
        chunks = []

        def loss_fn(logits, mb):  # mb is `batch` (labels and mask read from the closure)
            v_local = logits.shape[-1]
            chunks.append(chunk_rows(chunk_mb, v_local))
            logp, entropy = logprobs_and_entropy(
                logits, ids[:, 1:], tp_group=actor.tp_group, vocab_start=actor.tp_rank * v_local,
                vocab_size=actor.vocab_size, chunk_size=chunks[-1])
            loss = -(logp * mask).sum() / mask.sum()
            return loss, {"loss": loss.detach(), "entropy": (entropy * mask).sum() / mask.sum()}

        times, results = [], []
        for _ in range(steps):
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                torch.cuda.reset_peak_memory_stats(device)
            t0 = time.perf_counter()
            metrics = actor.forward_backward([batch], loss_fn)
            applied, grad_norm = actor.step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
            results.append((float(metrics[0]["loss"]), float(metrics[0]["entropy"]), applied,
                            grad_norm))
        loss, entropy, applied, grad_norm = results[-1]
        flops = model_flops(matmul_params, spec, seq, seq)
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
        peak = peak_flops(name) if device.type == "cuda" else None
        megatron_recompute = {k: getattr(actor.config, f"recompute_{k}")
                              for k in ("granularity", "method", "num_layers")}
        return {
            "model": "tiny" if tiny else "DeepSeek-R1-Distill-Qwen-1.5B shapes (random init)",
            "device": name, "params": params, "tokens": seq, "params_dtype": "bfloat16",
            "recompute": recompute, "megatron_recompute": megatron_recompute,
            "logprob_chunk_rows": chunks[-1], "steps": steps,
            "step_seconds": [round(t, 3) for t in times], "tokens_per_s": seq / times[-1],
            "model_tflops_per_s": flops / times[-1] / 1e12,
            "mfu": flops / times[-1] / peak if peak else None,
            "peak_memory_gib": _peak_bytes(device) / 2**30,
            "peak_memory_by": "torch.cuda.max_memory_allocated (last step)"
                              if device.type == "cuda" else "VmHWM (process, whole run)",
            "loss": loss, "entropy": entropy, "applied": applied, "grad_norm": grad_norm,
            "notes": notes}
    finally:
        parallel_state.destroy_model_parallel()
        if dist.is_initialized():
            dist.destroy_process_group()


def _micro_batch(**tensors):
    try:
        from megatron_erc.trainer.batch import MicroBatch
    except ImportError:  # the actor took dicts before MicroBatch existed
        return tensors
    return MicroBatch(**tensors)


# ---------------------------------------------------------------------------- driver


def environment() -> dict:
    import importlib.metadata
    import importlib.util

    def version(*dists):
        for dist in dists:
            try:
                return importlib.metadata.version(dist)
            except importlib.metadata.PackageNotFoundError:
                pass
        return None

    return {"torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "triton": version("triton", "pytorch-triton"),
            "megatron_core": version("megatron-core"),
            "transformer_engine": importlib.util.find_spec("transformer_engine") is not None,
            "vllm": importlib.util.find_spec("vllm") is not None}


def _report(result: dict) -> None:
    env = result["environment"]
    print(f"[smoke] torch {env['torch']} cuda {env['cuda']} triton {env['triton']} "
          f"megatron-core {env['megatron_core']} gpu {env['gpu']} "
          f"(TE {'present' if env['transformer_engine'] else 'absent'}, "
          f"vLLM {'present' if env['vllm'] else 'absent'})")
    for part, r in result["parts"].items():
        if not r.get("ok"):
            print(f"[smoke] {part}: FAILED: {r.get('error', '').strip().splitlines()[-1:]}")
        elif part == "rl":
            print(f"[smoke] rl: {r['steps']} RL steps in {r['seconds']} s, loss "
                  f"{[round(x, 4) for x in r['loss']]}, reward {r['reward/mean']}")
        else:
            mfu = f"{r['mfu']:.1%}" if r["mfu"] is not None else \
                "n/a (CPU)" if r["device"] == "cpu" else "n/a (set GPU_PEAK_TFLOPS)"
            print(f"[smoke] step: {r['model']}, {r['params'] / 1e6:.1f}M params, "
                  f"{r['tokens']} tokens, recompute={r['recompute']}, "
                  f"log-prob chunk {r['logprob_chunk_rows']} rows")
            print(f"[smoke] step: {r['tokens_per_s']:.0f} tokens/s (step {r['step_seconds']} s), "
                  f"peak memory {r['peak_memory_gib']:.1f} GiB, "
                  f"{r['model_tflops_per_s']:.1f} model TFLOP/s, MFU {mfu}; loss {r['loss']:.3f}"
                  f", grad norm {r['grad_norm']:.3g}, applied={r['applied']}")
            for note in r["notes"]:
                print(f"[smoke] note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=("all", "rl", "step"), default="all")
    parser.add_argument("--tiny", action="store_true",
                        help="2 layers, hidden 256, vocab 4096, 512 tokens (runs on CPU)")
    parser.add_argument("--tokens", type=int, default=None, help="step: tokens per micro-batch")
    parser.add_argument("--steps", type=int, default=2, help="step: training steps to time")
    parser.add_argument("--chunk-mb", type=int, default=None,
                        help="step: log-prob chunk budget in MiB (algo.logprob_chunk_mb); "
                             "default 64, 1 with --tiny so its small vocabulary is chunked too")
    parser.add_argument("--rl-timeout", type=float, default=300)
    parser.add_argument("--out", default=None, help="JSON file (default $OUT/gpu_smoke.json)")
    args = parser.parse_args(argv)
    # megatron-core announces at import that TE/apex are missing: expected here.
    warnings.filterwarnings("ignore", category=UserWarning, module=r"megatron\.core.*")
    if not torch.cuda.is_available() and not args.tiny:
        print("[smoke] needs an NVIDIA GPU (torch.cuda.is_available() is False); "
              "--tiny --part step runs the step code on CPU", file=sys.stderr)
        return 2
    result = {"environment": environment(), "parts": {}}
    if args.part in ("all", "rl"):
        with tempfile.TemporaryDirectory(prefix="gpu-smoke-") as work:
            result["parts"]["rl"] = _attempt(rl_steps, pathlib.Path(work),
                                             timeout=args.rl_timeout)
    if args.part in ("all", "step"):
        chunk_mb = args.chunk_mb or (1 if args.tiny else 64)
        result["parts"]["step"] = _attempt(train_step, tiny=args.tiny, tokens=args.tokens,
                                           chunk_mb=chunk_mb, steps=args.steps)
    _report(result)
    print(json.dumps(result))
    out = args.out or (os.path.join(os.environ["OUT"], "gpu_smoke.json")
                       if os.environ.get("OUT") else None)
    if out:
        pathlib.Path(out).write_text(json.dumps(result, indent=2) + "\n")
        print(f"[smoke] wrote {out}")
    return 0 if all(r["ok"] for r in result["parts"].values()) else 1


def _attempt(fn, *args, **kwargs) -> dict:
    """Run one part; a failure is recorded (with its traceback) and the other part still runs."""
    try:
        return {"ok": True, **fn(*args, **kwargs)}
    except Exception:  # noqa: BLE001 - a smoke run reports every part
        return {"ok": False, "error": traceback.format_exc()}


if __name__ == "__main__":
    sys.exit(main())
