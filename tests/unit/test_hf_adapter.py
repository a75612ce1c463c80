"""The HF <-> Megatron weight adapter on its own: layouts, round trips, error messages.

(That the megatron layout computes the same logits as transformers, at TP/PP, is checked in
tests/distributed/test_convert.py.)
"""

from __future__ import annotations

import pytest
import torch

from megatron_erc.models.hf_adapter import HFLayout, to_hf, to_megatron
from megatron_erc.models.support import head_dim

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
             rms_norm_eps=1e-6)


def hf_model(kind: str):
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(0)
    if kind == "qwen3":  # head_dim 16, not hidden/heads = 8: kv_channels is explicit
        return Qwen3ForCausalLM(Qwen3Config(**SMALL, head_dim=16, tie_word_embeddings=True))
    if kind == "qwen2":
        return Qwen2ForCausalLM(Qwen2Config(**SMALL, tie_word_embeddings=False))
    return LlamaForCausalLM(LlamaConfig(**SMALL, tie_word_embeddings=kind == "llama_tied"))


@pytest.fixture(scope="module", params=["qwen2", "llama_tied", "llama_untied", "qwen3"])
def model(request):
    m = hf_model(request.param)
    with torch.no_grad():  # norms and biases are constant at init: make every tensor distinct
        for p in m.parameters():
            p.add_(torch.randn_like(p))
    return m


def test_round_trip_is_bit_exact(model):
    sd = model.state_dict()
    full = to_megatron(sd, model.config)
    back = dict(to_hf(full, model.config))
    expected = {k: v for k, v in sd.items()
                if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert back.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(back[k], v), k
    assert ("output_layer.weight" in full) == (not model.config.tie_word_embeddings)
    assert ("decoder.layers.0.self_attention.linear_qkv.bias" in full) == (
        model.config.model_type == "qwen2")
    assert ("decoder.layers.1.self_attention.q_layernorm.weight" in full) == (
        model.config.model_type == "qwen3")


def test_fused_layouts_follow_megatron(model):
    """QKV rows per query group are [q heads of the group, k, v] (megatron's
    SelfAttention.get_query_key_value_tensors); fc1 is [gate; up]."""
    sd, cfg = model.state_dict(), model.config
    full = to_megatron(sd, cfg)
    d = head_dim(cfg)
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    for suffix in ["weight", "bias"] if cfg.model_type == "qwen2" else ["weight"]:
        q, k, v = (sd[f"model.layers.1.self_attn.{p}_proj.{suffix}"] for p in "qkv")
        rows = []
        for g in range(cfg.num_key_value_heads):
            for h in range(g * per_group, (g + 1) * per_group):
                rows.append(q[h * d:(h + 1) * d])
            rows += [k[g * d:(g + 1) * d], v[g * d:(g + 1) * d]]
        assert torch.equal(full[f"decoder.layers.1.self_attention.linear_qkv.{suffix}"],
                           torch.cat(rows))
    assert torch.equal(full["decoder.layers.1.mlp.linear_fc1.weight"],
                       torch.cat([sd["model.layers.1.mlp.gate_proj.weight"],
                                  sd["model.layers.1.mlp.up_proj.weight"]]))


def test_padded_vocab_is_trimmed_and_te_names_are_accepted(model):
    cfg = model.config
    full = to_megatron(model.state_dict(), cfg)
    emb = full["embedding.word_embeddings.weight"]
    full["embedding.word_embeddings.weight"] = torch.cat([emb, torch.zeros(3, emb.shape[1])])
    for i in range(cfg.num_hidden_layers):  # Transformer Engine's fused-norm names
        p = f"decoder.layers.{i}."
        qkv_norm, fc1_norm = "self_attention.linear_qkv.", "mlp.linear_fc1."
        full[p + qkv_norm + "layer_norm_weight"] = full.pop(p + "input_layernorm.weight")
        full[p + fc1_norm + "layer_norm_weight"] = full.pop(p + "pre_mlp_layernorm.weight")
    back = dict(to_hf(full, cfg))
    assert torch.equal(back["model.embed_tokens.weight"], emb)
    assert torch.equal(back["model.layers.1.input_layernorm.weight"],
                       model.state_dict()["model.layers.1.input_layernorm.weight"])


def test_errors_name_the_tensor():
    model = hf_model("qwen2")
    sd = dict(model.state_dict())
    bad = dict(sd, **{"model.layers.1.self_attn.k_proj.weight": torch.zeros(8, 32)})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight: shape "
                                         r"\(8, 32\).*\(16, 32\)"):
        to_megatron(bad, model.config)
    missing = {k: v for k, v in sd.items() if k != "model.layers.0.mlp.up_proj.weight"}
    with pytest.raises(KeyError, match=r"model\.layers\.0\.mlp\.up_proj\.weight"):
        to_megatron(missing, model.config)
    with pytest.raises(ValueError, match=r"model\.layers\.7\.mlp\.up_proj\.weight: unexpected"):
        to_megatron(dict(sd, **{"model.layers.7.mlp.up_proj.weight": torch.zeros(1)}),
                    model.config)
    full = to_megatron(sd, model.config)
    full["decoder.layers.0.mlp.linear_fc2.weight"] = torch.zeros(32, 40)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.down_proj\.weight"):
        list(to_hf(full, model.config))


@pytest.mark.parametrize("kind", ["llama_untied", "qwen3"])
def test_layout_lists_every_hf_tensor(kind):
    model = hf_model(kind)
    layout = HFLayout.from_config(model.config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
    assert layout.hf_shapes() == shapes


def _qwen3_moe_checkpoint(tmp_path):
    """A tiny Qwen3-MoE (layer 1 dense) and its tensors as ``save_pretrained`` writes them:
    per expert, not transformers 5's in-memory fused ``experts.gate_up_proj``."""
    from safetensors.torch import load_file
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**SMALL, head_dim=16, num_experts=4,
                                               num_experts_per_tok=2, moe_intermediate_size=24,
                                               mlp_only_layers=[1]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model, load_file(tmp_path / "model.safetensors")


def test_qwen3_moe_layout_round_trip_and_fused_experts(tmp_path):
    model, sd = _qwen3_moe_checkpoint(tmp_path)
    cfg = model.config
    layout = HFLayout.from_config(cfg)
    assert layout.sparse == (True, False)
    assert layout.hf_shapes() == {k: tuple(v.shape) for k, v in sd.items()}
    full = to_megatron(sd, cfg)
    back = dict(to_hf(full, cfg))
    assert back.keys() == sd.keys()
    assert all(torch.equal(back[k], v) for k, v in sd.items())
    p = "decoder.layers.0.mlp."
    assert torch.equal(full[p + "router.weight"], sd["model.layers.0.mlp.gate.weight"])
    assert torch.equal(full[p + "experts.local_experts.3.linear_fc1.weight"],
                       torch.cat([sd["model.layers.0.mlp.experts.3.gate_proj.weight"],
                                  sd["model.layers.0.mlp.experts.3.up_proj.weight"]]))
    assert torch.equal(full[p + "experts.local_experts.3.linear_fc2.weight"],
                       sd["model.layers.0.mlp.experts.3.down_proj.weight"])
    assert "decoder.layers.1.mlp.linear_fc1.weight" in full  # the dense layer
    bad = dict(sd, **{"model.layers.0.mlp.experts.2.up_proj.weight": torch.zeros(24, 31)})
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.experts\.2\.up_proj\.weight"):
        to_megatron(bad, cfg)
