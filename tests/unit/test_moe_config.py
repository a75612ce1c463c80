"""Qwen3-MoE configs to megatron's MoE settings, and the layouts that are refused.

(That the mapped model computes transformers' logits and the single-process gradients at
EP/TP/PP is checked in tests/distributed/test_convert.py and test_megatron_parallel.py.)
"""

from __future__ import annotations

import pytest

from megatron_erc.models import ParallelConfig, transformer_config_from_hf
from megatron_erc.models.moe import sparse_layers
from megatron_erc.models.support import unsupported

SMALL = dict(vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=4,
             num_attention_heads=4, num_key_value_heads=2, head_dim=16,
             moe_intermediate_size=24, num_experts=4, num_experts_per_tok=2)


def moe_config(**change):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(**{**SMALL, **change})


def test_sparse_layers_follow_mlp_only_layers_and_sparse_step():
    assert sparse_layers(moe_config()) == [True] * 4
    assert sparse_layers(moe_config(mlp_only_layers=[0, 3])) == [False, True, True, False]
    assert sparse_layers(moe_config(decoder_sparse_step=2)) == [False, True, False, True]


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_router_and_losses_map_to_megatron(norm_topk_prob):
    cfg = moe_config(norm_topk_prob=norm_topk_prob, mlp_only_layers=[1],
                     router_aux_loss_coef=0.02)
    tc = transformer_config_from_hf(cfg, ParallelConfig(moe_z_loss_coeff=1e-3))
    assert (tc.num_moe_experts, tc.moe_router_topk, tc.moe_ffn_hidden_size) == (4, 2, 24)
    assert tc.moe_layer_freq == [1, 0, 1, 1]
    # softmax over all experts then top-k is HF's norm_topk_prob=False; top-k then softmax
    # over the k equals HF's renormalised top-k.
    assert tc.moe_router_pre_softmax is (not norm_topk_prob)
    assert tc.moe_router_load_balancing_type == "aux_loss"
    assert tc.moe_aux_loss_coeff == 0.02 and tc.moe_z_loss_coeff == 1e-3
    assert tc.moe_token_dispatcher_type == "alltoall" and not tc.moe_grouped_gemm
    assert tc.moe_shared_expert_intermediate_size is None
    off = transformer_config_from_hf(cfg, ParallelConfig(moe_aux_loss_coeff=0.0))
    assert off.moe_router_load_balancing_type == "none" and off.moe_z_loss_coeff is None


def test_impossible_layouts_say_what_to_change():
    from transformers import Qwen3Config

    with pytest.raises(ValueError, match="ep=3 must divide the 4 experts"):
        transformer_config_from_hf(moe_config(), ParallelConfig(ep=3))
    with pytest.raises(ValueError, match="needs a MoE model"):
        transformer_config_from_hf(Qwen3Config(**{k: v for k, v in SMALL.items()
                                                  if "expert" not in k and "moe" not in k}),
                                   ParallelConfig(ep=2))
    with pytest.raises(ValueError, match="sequence_parallel=true"):
        transformer_config_from_hf(moe_config(), ParallelConfig(tp=2))
    with pytest.raises(ValueError, match="moe_load_balancing"):
        ParallelConfig(moe_load_balancing="sinkhorn")
    with pytest.raises(ValueError, match="moe_z_loss_coeff"):
        ParallelConfig(moe_z_loss_coeff=-1.0)


def test_supported_and_refused_moe_configs():
    assert unsupported(moe_config()) is None
    assert "num_experts_per_tok=5" in unsupported(moe_config(num_experts_per_tok=5))
    assert "qwen2_moe" in unsupported({"model_type": "qwen2_moe"})  # shared experts


def test_embedded_engine_takes_moe_weights_under_checkpoint_names(tmp_path):
    """transformers 5 fuses a MoE layer's experts in memory; a weight sync sends them per
    expert (checkpoint names, as Megatron's export yields them). The embedded engine loads
    them into views of the fused tensors: afterwards it equals a model loaded from them."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, Qwen3MoeForCausalLM

    from megatron_erc.models.moe import checkpoint_views
    from megatron_erc.rollout import EmbeddedEngine, SamplingConfig

    cfg = moe_config(mlp_only_layers=[1], initializer_range=0.2)
    torch.manual_seed(0)
    engine = EmbeddedEngine(Qwen3MoeForCausalLM(cfg))
    torch.manual_seed(1)
    Qwen3MoeForCausalLM(cfg).save_pretrained(tmp_path)
    new = load_file(tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in new
    engine.update_weights(new.items())
    views = checkpoint_views(engine.model)
    assert views.keys() == new.keys()
    assert all(torch.equal(views[k], v) for k, v in new.items())
    greedy = SamplingConfig(temperature=0, max_tokens=6)
    loaded = EmbeddedEngine(AutoModelForCausalLM.from_pretrained(tmp_path))
    prompts = [[1, 2, 3], [7, 8]]
    assert ([g[0].token_ids for g in engine.generate(prompts, greedy)]
            == [g[0].token_ids for g in loaded.generate(prompts, greedy)])
