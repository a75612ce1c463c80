"""The embedded engine's lean decode loop against the HF-forward loop and a full HF forward."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from megatron_erc.rollout import EmbeddedEngine, SamplingConfig, fast_decode
from tests.unit.rollout_fixtures import PROMPTS, TINY_CONFIG, reference_logprobs


def _model(kind: str):
    from transformers import AutoConfig, AutoModelForCausalLM

    d = json.loads(TINY_CONFIG.read_text())
    d.update(num_attention_heads=4, num_key_value_heads=2, initializer_range=0.2)
    if kind == "llama_tied":  # no qkv bias, tied embeddings, another RoPE base
        d.update(model_type="llama", tie_word_embeddings=True, rope_theta=500000.0)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**d),
                                            dtype=torch.float32).eval()


@pytest.mark.parametrize("kind", ["qwen2", "llama_tied"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_fast_loop_equals_hf_loop_and_full_forward(kind, temperature):
    model = _model(kind)
    assert fast_decode.supports(model.config)
    cfg = SamplingConfig(n=3, temperature=temperature, max_tokens=10, seed=7)
    fast = EmbeddedEngine(model, fast=True).generate(PROMPTS, cfg)
    slow = EmbeddedEngine(model, fast=False).generate(PROMPTS, cfg)
    worst = 0.0
    for prompt, fg, sg in zip(PROMPTS, fast, slow, strict=True):
        for f, s in zip(fg, sg, strict=True):
            assert f.token_ids == s.token_ids  # same draws from the same distributions
            assert f.finish_reason == s.finish_reason
            ref = reference_logprobs(model, prompt, f.token_ids, temperature or 1.0)
            got = torch.tensor(f.logprobs)
            worst = max(worst, ((got - ref).abs() / (1 + ref.abs())).max().item())
    assert worst < 1e-5, worst
    if temperature:
        assert len({tuple(s.token_ids) for s in fast[0]}) > 1, "samples of a group must differ"


def test_stop_tokens_and_whole_group_batching():
    model = _model("qwen2")
    greedy = SamplingConfig(n=2, temperature=0, max_tokens=12)
    (full, _), *_ = EmbeddedEngine(model).generate(PROMPTS, greedy)
    stop = full.token_ids[4]
    cfg = SamplingConfig(n=2, temperature=0, max_tokens=12, stop_token_ids=(stop,))
    # max_batch_size 4 with n=2: two prompts per decode call
    small = EmbeddedEngine(model, max_batch_size=4).generate(PROMPTS, cfg)
    big = EmbeddedEngine(model, fast=False).generate(PROMPTS, cfg)
    assert [[s.token_ids for s in g] for g in small] == [[s.token_ids for s in g] for g in big]
    first = small[0][0]
    assert first.finish_reason == "stop" and first.token_ids[-1] == stop
    assert first.token_ids == full.token_ids[: full.token_ids.index(stop) + 1]


def test_bf16_fast_loop_is_as_close_to_fp32_as_the_hf_loop():
    """bf16 rounds logits of this peaked model (~|30|) by ~0.1; the lean loop must not add
    error of its own: against the fp32 model, it is as close as HF's bf16 decode loop."""
    ref_model, model = _model("qwen2"), _model("qwen2").to(torch.bfloat16)
    cfg = SamplingConfig(n=2, temperature=1.0, max_tokens=8, seed=3)
    err = {}
    for fast in (True, False):
        out = EmbeddedEngine(model, fast=fast).generate(PROMPTS, cfg)
        err[fast] = statistics.mean(
            float((torch.tensor(s.logprobs) - reference_logprobs(ref_model, p, s.token_ids))
                  .abs().mean()) for p, g in zip(PROMPTS, out, strict=True) for s in g)
    assert 0 < err[True] < 1.5 * err[False] + 1e-3, err


@pytest.mark.parametrize("change,expected", [
    ({}, True),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                       "high_freq_factor": 4.0, "original_max_position_embeddings": 64}}, False),
    ({"hidden_act": "gelu"}, False),
    ({"model_type": "mistral"}, False),
    ({"model_type": "llama", "attention_bias": True}, False),
    ({"model_type": "qwen3"}, False),  # per-head q/k norms: decoded by the HF model
])
def test_supports_only_plain_llama_and_qwen2(change, expected):
    from transformers import AutoConfig

    d = {**json.loads(TINY_CONFIG.read_text()), **change}
    assert fast_decode.supports(AutoConfig.for_model(**d)) is expected
