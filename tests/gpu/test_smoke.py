"""One-GPU smoke tests (``tests/gpu/smoke.py``): skipped without CUDA, except the tiny
variant of the training step, which runs on CPU in CI so the step code stays exercised."""

from __future__ import annotations

import math

import pytest
import torch

requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs an NVIDIA GPU (torch.cuda.is_available() is False); scripts/gpu_smoke.sh")


def check_step(r: dict, tokens: int) -> None:
    assert r["ok"], r.get("error")
    assert r["tokens"] == tokens and r["applied"] is True
    for key in ("loss", "entropy", "grad_norm", "tokens_per_s", "peak_memory_gib"):
        assert math.isfinite(r[key]) and r[key] > 0, (key, r[key])
    assert r["logprob_chunk_rows"] < tokens  # the chunked path, not one chunk
    if r["recompute"] == "full":
        assert r["megatron_recompute"]["granularity"] == "full"


def test_train_step_tiny(run_smoke):
    """Same code as the 1.5B step (bf16, recompute, chunked log-probs) at 2 layers x 512
    tokens, on whatever device there is; a few seconds on CPU."""
    result = run_smoke("--part", "step", "--tiny", "--tokens", "512", timeout=180)
    step = result["parts"]["step"]
    check_step(step, 512)
    # random init over a 4096-id vocabulary: the loss is about ln(4096) = 8.3
    assert abs(step["loss"] - math.log(4096)) < 1.0


@requires_cuda
def test_rl_steps_on_cuda(run_smoke):
    """3 RL steps of the tiny demo through the CLI, embedded engine, on the GPU."""
    rl = run_smoke("--part", "rl", "--rl-timeout", "240", timeout=300)["parts"]["rl"]
    assert rl["ok"], rl.get("error")
    assert rl["steps"] == 3 and all(math.isfinite(x) for x in rl["loss"])


@requires_cuda
def test_train_step_r1_distill_1p5b_shapes_on_cuda(run_smoke):
    """One step of a random-init model with DeepSeek-R1-Distill-Qwen-1.5B's shapes at 8192
    tokens, chunked log-probs and full recompute; prints tokens/s, peak memory and MFU."""
    result = run_smoke("--part", "step", timeout=300)
    step = result["parts"]["step"]
    check_step(step, 8192)
    assert 1.7e9 < step["params"] < 1.8e9
    assert step["peak_memory_gib"] < torch.cuda.get_device_properties(0).total_memory / 2**30
