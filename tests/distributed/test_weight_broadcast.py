"""The broadcast weight path (engines on other ranks or nodes): a sender rank broadcasts the
weights bucket by bucket over a gloo group into an engine on another rank, which then generates
exactly what a fresh engine loaded from the exported HF checkpoint generates; a sender that
fails mid-stream makes the receiver raise instead of waiting in a collective."""

from __future__ import annotations

import pytest

from tests.distributed.harness import run_distributed


def broadcast_case(rank: int, world: int, export_dir: str) -> dict:
    import torch
    import torch.distributed as dist

    from megatron_erc.rollout import (
        EmbeddedEngine,
        SamplingConfig,
        broadcast_weights,
        receive_broadcast,
    )
    from tests.unit.rollout_fixtures import PROMPTS, build_tiny_model, perturbed_state_dict

    greedy = SamplingConfig(temperature=0, max_tokens=8)
    new = perturbed_state_dict(build_tiny_model(), seed=5)
    manifest = {n: tuple(t.shape) for n, t in new.items()}
    common = dict(dtype=torch.float32, device="cpu", bucket_bytes=256 << 10)
    out = {}
    if rank == 0:
        out["bytes"] = broadcast_weights(iter(new.items()), manifest, None, 0, **common)
        fresh = build_tiny_model()
        fresh.load_state_dict(new, strict=False)
        fresh.save_pretrained(export_dir)
        with pytest.raises(ValueError, match="expected"):  # a weight missing from the stream
            broadcast_weights(iter(list(new.items())[1:]), manifest, None, 0, **common)
    else:
        engine = EmbeddedEngine(build_tiny_model())
        out["before"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        engine.load_weights(receive_broadcast(manifest, None, 0, **common), manifest)
        out["after"] = [g[0].token_ids for g in engine.generate(PROMPTS, greedy)]
        with pytest.raises(RuntimeError, match="sender aborted"):
            engine.load_weights(receive_broadcast(manifest, None, 0, **common), manifest)
    dist.barrier()
    if rank == 1:
        ref = EmbeddedEngine(export_dir).generate(PROMPTS, greedy)
        out["fresh"] = [g[0].token_ids for g in ref]
    return out


def test_broadcast_sync_equals_a_fresh_engine_and_an_abort_reaches_the_receiver(tmp_path):
    sender, receiver = run_distributed(broadcast_case, 2, str(tmp_path / "hf"))
    assert sender["bytes"] > 0
    assert receiver["after"] == receiver["fresh"]
    assert receiver["after"] != receiver["before"], "the sync must change the outputs"
