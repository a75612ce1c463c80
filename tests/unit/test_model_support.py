"""The one supported-model check: what it refuses (and why), on HF config objects and on a
parsed config.json alike, and that every user of it agrees."""

from __future__ import annotations

import json

import pytest

from megatron_erc.models.support import (
    UnsupportedModelError,
    check_supported,
    rope_theta,
    rope_type,
    unsupported,
)
from megatron_erc.rollout import fast_decode
from tests.unit.rollout_fixtures import TINY_CONFIG

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
REFUSED = [
    ({"model_type": "mistral"}, "model_type 'mistral'"),
    ({"rope_scaling": LLAMA3_ROPE}, "RoPE type 'llama3'"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "RoPE type 'linear'"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"model_type": "llama", "attention_bias": True}, "attention_bias"),
    ({"model_type": "llama", "mlp_bias": True}, "mlp_bias"),
    ({"model_type": "qwen3", "attention_bias": True}, "qwen3 attention_bias"),
    ({"use_sliding_window": True}, "use_sliding_window"),
]


def _tiny(**change) -> dict:
    return {**json.loads(TINY_CONFIG.read_text()), **change}


def _hf(d: dict):
    from transformers import AutoConfig

    return AutoConfig.for_model(**d)


@pytest.mark.parametrize("change,reason", REFUSED, ids=[r for _, r in REFUSED])
def test_refused_configs_name_the_reason(change, reason):
    raw = _tiny(**change)
    assert reason in unsupported(raw)  # config.json as parsed (the checks at start)
    if change.get("model_type") != "mistral":  # transformers maps mistral to its own class
        assert reason in unsupported(_hf(raw))  # the config object (models, engines)
        assert not fast_decode.supports(_hf(raw))
    with pytest.raises(UnsupportedModelError, match=reason.replace("(", r"\(")):
        check_supported(raw)


@pytest.mark.parametrize("kind", ["qwen2", "llama", "qwen3"])
def test_plain_llama_and_qwen2_are_supported(kind):
    raw = _tiny(model_type=kind, rope_theta=500000.0)
    for config in (raw, _hf(raw)):
        assert unsupported(config) is None
        assert rope_type(config) == "default" and rope_theta(config) == 500000.0
    assert fast_decode.supports(_hf(raw)) == (kind != "qwen3")  # Qwen3: q/k norms


def test_layout_and_preflight_use_the_same_check(tmp_path):
    from types import SimpleNamespace

    from megatron_erc.errors import UserError
    from megatron_erc.models.hf_adapter import HFLayout
    from megatron_erc.trainer.preflight import check_model

    raw = _tiny(rope_scaling={"type": "linear", "factor": 2.0})
    with pytest.raises(UnsupportedModelError, match="RoPE type 'linear'"):
        HFLayout.from_config(_hf(raw))
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="RoPE type 'linear'"):
        check_model(SimpleNamespace(path=str(tmp_path), random_init=True))
