"""Shared fixtures of the rollout tests: a tiny random-init Qwen2 saved as a HF directory.

Import the fixtures into a test module (``from tests.unit.rollout_fixtures import ...``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

TINY_CONFIG = Path(__file__).resolve().parents[2] / "examples" / "tiny" / "config.json"
PROMPTS = [[1, 5, 9, 200], [7, 3], [11, 12, 13, 14, 15, 16, 17], [42]]


def build_tiny_model(seed: int = 0):
    """A fp32 Qwen2ForCausalLM shaped like examples/tiny/config.json (head_dim 32), random init."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(**json.loads(TINY_CONFIG.read_text()))
    torch.manual_seed(seed)
    # A larger init than 0.02 makes the logits peaked, so greedy argmax has clear winners and
    # sampling is not uniform noise.
    config.initializer_range = 0.2
    # vLLM's CPU attention supports head_dim 32, 64, 80, ...: examples/tiny has 128 / 8 = 16.
    config.num_attention_heads, config.num_key_value_heads = 4, 2
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    return model.eval()


def perturbed_state_dict(model, scale: float = 0.5, seed: int = 1) -> dict[str, torch.Tensor]:
    """New weights of the same names and shapes (the checkpoint layout: no tied lm_head)."""
    gen = torch.Generator().manual_seed(seed)
    return {
        name: (p.detach() + scale * p.detach().std() * torch.randn(p.shape, generator=gen))
        for name, p in model.named_parameters()
    }


@torch.no_grad()
def reference_logprobs(model, prompt: list[int], response: list[int], temperature: float = 1.0):
    """fp32 log_softmax(logits / T) of the HF model at each response position ``[T]``."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
    logp = (logits / temperature).log_softmax(dim=-1)
    return logp.gather(-1, torch.tensor(response)[:, None]).squeeze(-1)


@torch.no_grad()
def manual_greedy(model, prompt: list[int], max_tokens: int) -> list[int]:
    """Greedy decoding by full forward passes (no cache, no padding): the reference loop."""
    ids = list(prompt)
    for _ in range(max_tokens):
        logits = model(input_ids=torch.tensor([ids])).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt) :]


@pytest.fixture(scope="session")
def tiny_model():
    return build_tiny_model()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_model):
    path = tmp_path_factory.mktemp("tiny_qwen2")
    tiny_model.save_pretrained(path)
    return path
