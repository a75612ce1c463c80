"""Rank function for the routing-replay test (spawned by the harness)."""

from __future__ import annotations

import torch


def replay_case(rank: int, world: int, hf_dict: dict, ep: int) -> dict:
    """Score a micro-batch (recording), then run training forwards of it: on-policy with
    replay, and after a tiny perturbation of near-tied router rows with and without replay.
    Returns the largest |log-prob - old log-prob| of each, and the replay's miss count."""
    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig, build_model_chunks
    from megatron_erc.models.routing_replay import RoutingReplay
    from tests.distributed.megatron_cases import _hf_config

    platform.setup()
    platform.init_model_parallel(1, 1, seed=1234, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=1)
    hf_config = _hf_config(hf_dict)
    chunks = build_model_chunks(hf_config, ParallelConfig(ep=ep, pad_vocab_multiple=1))
    model = chunks[0]
    routers = [m for n, m in model.named_modules() if n.endswith("mlp.router")]
    with torch.no_grad():  # experts 0 and 1 tie in every router: top-k picks by index
        for r in routers:
            r.weight[1] = r.weight[0]
    g = torch.Generator().manual_seed(7 + rank)  # each EP rank its own tokens
    tokens = torch.randint(0, hf_config.vocab_size, (2, 16), generator=g)
    positions = torch.arange(16).expand(2, 16)

    def logp() -> torch.Tensor:
        logits = model(tokens[:, :-1], positions[:, :-1], None).float()
        return logits.log_softmax(-1).gather(-1, tokens[:, 1:, None]).squeeze(-1)

    replay = RoutingReplay(chunks)
    with replay.recording(), torch.no_grad():
        old = logp()
    with replay.replaying():
        on_policy = logp()
        on_policy.sum().backward()  # the training forward's graph, gradients through it
    with torch.no_grad():  # the near ties break the other way for some tokens
        g = torch.Generator().manual_seed(3)  # the same on every rank: routers replicate
        for r in routers:
            r.weight[1] += 1e-5 * torch.randn(r.weight[1].shape, generator=g)
    with replay.replaying(), torch.no_grad():
        replayed = logp()
    with torch.no_grad():
        free = logp()
    out = {"on_policy": (on_policy - old).abs().max().item(),
           "replayed": (replayed - old).abs().max().item(),
           "free": (free - old).abs().max().item(),
           "misses": replay.misses, "routers": replay.routers,
           "router_grad": float(routers[0].weight.grad.abs().sum())}
    replay.remove()
    return out
