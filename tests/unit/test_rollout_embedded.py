"""The embedded (HF transformers) engine against hand-written references on a tiny Qwen2."""

from __future__ import annotations

import pytest
import torch

from megatron_erc.rollout import (
    EmbeddedEngine,
    SamplingConfig,
    stream_in_buckets,
    sync_weights,
)
from tests.unit.rollout_fixtures import (
    PROMPTS,
    build_tiny_model,
    manual_greedy,
    perturbed_state_dict,
    reference_logprobs,
)

pytest_plugins = ["tests.unit.rollout_fixtures"]  # fixtures tiny_model, tiny_model_dir


@pytest.fixture(scope="module")
def engine(tiny_model_dir):
    eng = EmbeddedEngine(tiny_model_dir)
    yield eng
    eng.close()


def test_greedy_matches_manual_argmax_loop(engine, tiny_model):
    out = engine.generate(PROMPTS, SamplingConfig(temperature=0, max_tokens=12))
    for prompt, (sample,) in zip(PROMPTS, out, strict=True):
        assert sample.token_ids == manual_greedy(tiny_model, prompt, 12)
        assert sample.finish_reason == "length" and len(sample.logprobs) == 12


@pytest.mark.parametrize("temperature,top_p", [(0.0, 1.0), (1.0, 1.0), (0.7, 1.0)])
def test_logprobs_equal_hf_log_softmax(engine, tiny_model, temperature, top_p):
    cfg = SamplingConfig(temperature=temperature, top_p=top_p, max_tokens=10, n=2, seed=3)
    out = engine.generate(PROMPTS, cfg)
    worst = 0.0
    for prompt, samples in zip(PROMPTS, out, strict=True):
        for s in samples:
            ref = reference_logprobs(tiny_model, prompt, s.token_ids, temperature or 1.0)
            got = torch.tensor(s.logprobs, dtype=torch.float32)
            worst = max(worst, ((got - ref).abs() / (1 + ref.abs())).max().item())
    # fp32: padded, cached decoding vs one unpadded forward differ only by rounding (~1e-6
    # relative; logits of this peaked model reach ~|30|).
    assert worst < 1e-5, worst


def test_top_p_logprobs_are_of_the_renormalised_nucleus(engine, tiny_model):
    from megatron_erc.rollout.embedded import top_p_filter

    cfg = SamplingConfig(temperature=0.9, top_p=0.8, max_tokens=6, seed=0)
    (sample,), = engine.generate(PROMPTS[:1], cfg)
    ids = torch.tensor([PROMPTS[0] + sample.token_ids])
    with torch.no_grad():
        logits = tiny_model(input_ids=ids).logits[0, len(PROMPTS[0]) - 1 : -1] / 0.9
    ref = top_p_filter(logits, 0.8).log_softmax(-1)
    ref = ref.gather(-1, torch.tensor(sample.token_ids)[:, None]).squeeze(-1)
    assert torch.allclose(torch.tensor(sample.logprobs), ref, atol=1e-5)
    assert all(lp <= 0 for lp in sample.logprobs)


def test_seeded_sampling_is_reproducible(engine):
    cfg = SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=1234)
    a = engine.generate(PROMPTS, cfg)
    b = engine.generate(PROMPTS, cfg)
    c = engine.generate(PROMPTS, SamplingConfig(n=4, temperature=1.0, max_tokens=8, seed=99))
    toks = lambda out: [[s.token_ids for s in group] for group in out]
    assert toks(a) == toks(b)
    assert toks(a) != toks(c)
    assert all(len(group) == 4 for group in a)
    assert len({tuple(s.token_ids) for s in a[0]}) > 1, "n samples of one prompt should differ"


def test_stop_token_ends_response_with_stop(engine):
    greedy = SamplingConfig(temperature=0, max_tokens=12)
    (full,), = engine.generate(PROMPTS[:1], greedy)
    stop = full.token_ids[3]
    cut = full.token_ids.index(stop) + 1
    cfg = SamplingConfig(temperature=0, max_tokens=12, stop_token_ids=(stop,))
    (short,), = engine.generate(PROMPTS[:1], cfg)
    assert short.finish_reason == "stop"
    assert short.token_ids == full.token_ids[:cut] and short.token_ids[-1] == stop
    assert short.logprobs == pytest.approx(full.logprobs[:cut], abs=1e-6)


def test_sampling_config_validation():
    with pytest.raises(ValueError, match="n must be >= 1"):
        SamplingConfig(n=0)
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingConfig(temperature=-1)
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingConfig(max_tokens=0)
    with pytest.raises(TypeError):
        SamplingConfig(1)  # kw_only


def test_bad_updates_are_rejected_and_leave_weights_alone(tiny_model):
    eng = EmbeddedEngine(build_tiny_model())
    before = {k: v.clone() for k, v in eng.model.state_dict().items()}
    new = perturbed_state_dict(tiny_model)
    partial = list(new.items())[:-1]
    with pytest.raises(ValueError, match="partial update rejected"):
        eng.update_weights(partial)
    name = next(iter(new))
    with pytest.raises(ValueError, match="shape"):
        eng.update_weights([(name, torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="unknown parameter"):
        eng.update_weights([("model.nope.weight", torch.zeros(1))])
    with pytest.raises(ValueError, match="sent twice"):
        eng.update_weights([(name, new[name]), (name, new[name])])
    for k, v in eng.model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_bucketed_sync_changes_outputs_like_a_fresh_model(tiny_model):
    eng = EmbeddedEngine(build_tiny_model())
    new = perturbed_state_dict(tiny_model)
    cfg = SamplingConfig(temperature=0, max_tokens=8)
    old_out = eng.generate(PROMPTS, cfg)
    # a generator with its manifest declared up front: each tensor loads as it arrives
    stats = sync_weights(eng, iter(new.items()), bucket_bytes=64 << 10,
                         manifest={n: tuple(t.shape) for n, t in new.items()})
    assert stats.bytes == sum(t.numel() * 4 for t in new.values())
    fresh = build_tiny_model()
    fresh.load_state_dict(new, strict=False)
    ref = EmbeddedEngine(fresh).generate(PROMPTS, cfg)
    got = eng.generate(PROMPTS, cfg)
    assert [g[0].token_ids for g in got] == [r[0].token_ids for r in ref]
    assert [g[0].token_ids for g in got] != [o[0].token_ids for o in old_out]


def test_a_refused_manifest_leaves_weights_and_a_broken_stream_blocks_generation(tiny_model):
    eng = EmbeddedEngine(build_tiny_model())
    cfg = SamplingConfig(temperature=0, max_tokens=6)
    before = eng.generate(PROMPTS, cfg)
    new = perturbed_state_dict(tiny_model)
    full = {n: tuple(t.shape) for n, t in new.items()}
    dropped = dict(list(full.items())[:-1])  # the sender would skip a bucket: refused up front
    with pytest.raises(ValueError, match="partial update rejected"):
        sync_weights(eng, iter(new.items()), manifest=dropped)
    assert [g[0].token_ids for g in eng.generate(PROMPTS, cfg)] == \
        [g[0].token_ids for g in before]
    # the stream breaks after loading began (a tensor announced but never sent)
    with pytest.raises(ValueError, match="stream ended without 1"):
        sync_weights(eng, iter(list(new.items())[:-1]), manifest=full)
    with pytest.raises(RuntimeError, match="partial weight set"):
        eng.generate(PROMPTS, cfg)
    sync_weights(eng, iter(new.items()), manifest=full)  # a complete update heals it
    assert eng.generate(PROMPTS, cfg)


def test_stream_in_buckets_bounds_bucket_size():
    tensors = [(f"w{i}", torch.zeros(n)) for i, n in enumerate([10, 10, 30, 5, 100, 1])]
    buckets = list(stream_in_buckets(iter(tensors), bucket_bytes=80))
    assert [[n for n, _ in b] for b in buckets] == [["w0", "w1"], ["w2"], ["w3"], ["w4"], ["w5"]]
    assert [x for b in buckets for x in b] == tensors
    with pytest.raises(ValueError):
        next(stream_in_buckets([], 0))


def test_sampler_draws_from_the_filtered_distribution():
    from megatron_erc.rollout.embedded import sample_next, top_p_filter

    g = torch.Generator().manual_seed(0)
    row = torch.tensor([2.0, 0.0, -1.0, 1.0, -30.0, 0.5])
    logits = row.expand(40000, -1)
    for temperature, top_p in ((1.0, 1.0), (0.7, 0.9)):
        cfg = SamplingConfig(temperature=temperature, top_p=top_p, seed=0)
        tokens, logp = sample_next(logits, cfg, g)
        want = top_p_filter((row / temperature)[None], top_p).softmax(-1)[0]
        freq = torch.bincount(tokens, minlength=row.numel()).float() / tokens.numel()
        assert (freq - want).abs().max() < 0.01, (freq, want)
        assert torch.all(freq[want == 0] == 0), "a token outside the nucleus was drawn"
        assert torch.allclose(logp, want.log()[tokens])


@pytest.mark.parametrize("fast", [True, False])
def test_per_prompt_seeds_make_samples_independent_of_the_batch(tiny_model, fast):
    """With ``seeds``, a prompt's samples are the same alone, in another batch, or split
    across calls (what lets every rank generate a share of the global batch)."""
    from megatron_erc.rollout import EmbeddedEngine, SamplingConfig

    engine = EmbeddedEngine(tiny_model, max_batch_size=8, fast=fast)
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    sampling = SamplingConfig(n=3, temperature=1.0, max_tokens=6)
    together = engine.generate(prompts, sampling, seeds=[11, 12, 13, 14])
    alone = [engine.generate([p], sampling, seeds=[s])[0]
             for p, s in zip(prompts, [11, 12, 13, 14], strict=True)]
    other_order = engine.generate(prompts[::-1], sampling, seeds=[14, 13, 12, 11])[::-1]
    for a, b, c in zip(together, alone, other_order, strict=True):
        assert [s.token_ids for s in a] == [s.token_ids for s in b] == [s.token_ids for s in c]
        for x, y in zip(a, b, strict=True):
            assert max(abs(p - q) for p, q in zip(x.logprobs, y.logprobs, strict=True)) < 1e-4
    # and the seed matters: another seed draws other samples
    moved = engine.generate(prompts, sampling, seeds=[21, 22, 23, 24])
    assert [s.token_ids for g in moved for s in g] != [s.token_ids for g in together for s in g]
