"""HF <-> Megatron conversion: logits equal transformers' at TP/PP, round trips are exact.

Tiny random HF models are built in every rank from a seed (no downloads). One spawn of two
ranks covers TP=1 (two data-parallel replicas), TP=2 and PP=2 for Qwen2, tied and untied
Llama and Qwen3 (q/k norms, head_dim apart from hidden/heads): HF weights are loaded with
``load_hf_weights``, logits compared with transformers' (eager attention, fp32), and
``iter_hf_weights`` must give back every HF tensor bit-exactly.
The CLI is exercised through a TP=2 checkpoint exported to an HF directory.
"""

from __future__ import annotations

import functools
import json
import pathlib
import re

import pytest
import torch
import torch.distributed as dist

from tests.distributed.harness import run_distributed

TOL = 1e-5
TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())
for _k in ("architectures", "torch_dtype", "model_type", "tie_word_embeddings"):
    TINY.pop(_k)
BATCH, SEQ = 2, 16


def make_hf_model(kind: str, seed: int = 0):
    """A random tiny HF model; every tensor perturbed so norms and biases are not constant."""
    from transformers import (
        LlamaConfig,
        LlamaForCausalLM,
        Qwen2Config,
        Qwen2ForCausalLM,
        Qwen3Config,
        Qwen3ForCausalLM,
    )

    torch.manual_seed(seed)
    if kind == "qwen3_moe":
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        model = Qwen3MoeForCausalLM(Qwen3MoeConfig(
            **TINY, head_dim=48, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
            mlp_only_layers=[1], norm_topk_prob=False, attn_implementation="eager"))
    elif kind == "qwen3":
        model = Qwen3ForCausalLM(Qwen3Config(**TINY, head_dim=48, tie_word_embeddings=True,
                                             attn_implementation="eager"))
    elif kind == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**TINY, tie_word_embeddings=False,
                                             attn_implementation="eager"))
    else:
        model = LlamaForCausalLM(LlamaConfig(**TINY, tie_word_embeddings=kind == "llama_tied",
                                             attn_implementation="eager"))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def checkpoint_state(model) -> dict[str, torch.Tensor]:
    """The HF tensors as a saved checkpoint names them: transformers 5 fuses a MoE layer's
    experts in memory (``experts.gate_up_proj``) and writes them per expert, as the hub's
    checkpoints and vLLM have them; ``save_pretrained`` is the reference for that mapping."""
    import tempfile

    from safetensors.torch import load_file

    if not hasattr(model.config, "num_experts"):
        return model.state_dict()
    state = [None]
    if not dist.is_initialized() or dist.get_rank() == 0:  # transformers saves on rank 0 only
        with tempfile.TemporaryDirectory() as d:
            model.save_pretrained(d)
            state[0] = load_file(f"{d}/model.safetensors")
    if dist.is_initialized():
        dist.broadcast_object_list(state, src=0)
    return state[0]


def make_tokens(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def _rel_err(got: torch.Tensor, expected: torch.Tensor) -> float:
    got, expected = got.double(), expected.double()
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _megatron_logits(chunks, tokens: torch.Tensor, vocab: int) -> torch.Tensor | None:
    """Full-vocabulary logits ``[b, s, V]`` on the last pipeline stage (None elsewhere)."""
    from megatron.core import parallel_state as ps
    from megatron.core.pipeline_parallel import get_forward_backward_func

    tp_group = ps.get_tensor_model_parallel_group()
    positions = torch.arange(SEQ).expand(BATCH, SEQ)

    def gather(logits):  # [b, s, V/tp] -> [b, s, V]
        parts = [torch.empty_like(logits) for _ in range(dist.get_world_size(tp_group))]
        dist.all_gather(parts, logits.contiguous(), group=tp_group)
        return torch.cat(parts, dim=-1)[..., :vocab]

    def forward_step(data_iterator, chunk):
        next(data_iterator)
        out = chunk(tokens, positions, None)
        return out, lambda o: (o.float().sum() * 0, {"logits": gather(o.detach().float())})

    outputs = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter([0]), model=chunks[0],
        num_microbatches=1, seq_length=SEQ, micro_batch_size=BATCH, forward_only=True)
    return outputs[0]["logits"] if ps.is_pipeline_last_stage() else None


def adapter_cases(rank: int, world: int, cases: list[tuple]) -> dict:
    """For each ``(model kind, tp, pp[, ep])``: logits error vs transformers and whether
    ``iter_hf_weights`` gives back the HF state bit-exactly (gathered over PP with objects).
    MoE models run with sequence parallelism at tp > 1 (megatron's MoE layer needs it)."""
    from megatron.core import parallel_state as ps

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig, build_model_chunks
    from megatron_erc.models.hf_adapter import iter_hf_weights, load_hf_weights

    platform.setup()
    results = {}
    for kind, tp, pp, *ep in cases:
        ep = ep[0] if ep else 1
        hf = make_hf_model(kind)
        hf_sd = checkpoint_state(hf)
        tokens = make_tokens(hf.config.vocab_size)
        with torch.no_grad():
            expected = hf(tokens).logits
        etp = 1 if ep > 1 else tp  # EP=2 with TP=2 in two ranks: experts whole per rank
        platform.init_model_parallel(tp, pp, seed=1234, expert_model_parallel_size=ep,
                                     expert_tensor_parallel_size=etp)
        try:
            sp = tp > 1 and kind == "qwen3_moe"
            chunks = build_model_chunks(hf.config, ParallelConfig(
                tp=tp, pp=pp, ep=ep, etp=etp, sequence_parallel=sp))
            tp_rank = ps.get_tensor_model_parallel_rank()
            load_hf_weights(chunks, hf_sd.__getitem__, hf.config, tp_rank, tp)
            with torch.no_grad():
                logits = _megatron_logits(chunks, tokens, hf.config.vocab_size)
            stage = {n: t.clone() for n, t in iter_hf_weights(
                chunks, hf.config, ps.get_tensor_model_parallel_group())}
            stages = [None] * pp
            dist.all_gather_object(stages, stage, group=ps.get_pipeline_model_parallel_group())
        finally:
            ps.destroy_model_parallel()
        exported = {}
        for s in stages:
            assert not exported.keys() & s.keys(), "a tensor was yielded by two stages"
            exported.update(s)
        want = {k: v for k, v in hf_sd.items()
                if not (hf.config.tie_word_embeddings and k == "lm_head.weight")}
        mismatched = sorted(k for k in want if k not in exported
                            or not torch.equal(exported[k], want[k]))
        results[case_id(kind, tp, pp, ep)] = {
            "logits_err": None if logits is None else _rel_err(logits, expected),
            "round_trip_mismatches": mismatched + sorted(exported.keys() - want.keys()),
        }
    return results


def case_id(kind: str, tp: int, pp: int, ep: int = 1) -> str:
    return f"{kind}-tp{tp}-pp{pp}" + (f"-ep{ep}" if ep > 1 else "")


CASES = [(kind, tp, pp) for kind in ("qwen2", "llama_tied", "llama_untied", "qwen3",
                                     "qwen3_moe") for tp, pp in ((1, 1), (2, 1), (1, 2))]
CASES += [("qwen3_moe", 1, 1, 2), ("qwen3_moe", 2, 1, 2)]  # experts over 2 EP ranks


@functools.cache
def adapter_results() -> dict:
    merged: dict = {}
    for per_rank in run_distributed(adapter_cases, 2, CASES):
        for case, r in per_rank.items():
            m = merged.setdefault(case, {"logits_err": [], "round_trip_mismatches": set()})
            if r["logits_err"] is not None:
                m["logits_err"].append(r["logits_err"])
            m["round_trip_mismatches"].update(r["round_trip_mismatches"])
    return merged


@pytest.mark.parametrize("case", [case_id(*c) for c in CASES])
def test_megatron_logits_match_transformers(case):
    errs = adapter_results()[case]["logits_err"]
    assert errs, f"{case}: no rank reported logits"
    print(f"{case}: max relative logits error {max(errs):.2e}")
    assert max(errs) < TOL, f"{case}: relative logits error {max(errs):.2e}"


@pytest.mark.parametrize("case", [case_id(*c) for c in CASES])
def test_hf_megatron_hf_is_bit_exact(case):
    assert not adapter_results()[case]["round_trip_mismatches"]


# ---------------------------------------------------------------- the CLI
def _cli(*argv: str) -> int:
    from megatron_erc.cli.convert import main

    return main(list(argv))


@pytest.fixture(scope="module", params=[("qwen2", "--tp", "2"), ("llama_tied", "--pp", "2"),
                                        ("qwen3_moe", "--tp", "2")],
                ids=["qwen2-tp2", "llama_tied-pp2", "qwen3_moe-tp2"])
def cli_round_trip(request, tmp_path_factory):
    """HF dir -> megatron checkpoint (TP=2 or PP=2) -> HF dir, through the CLI."""
    kind, *layout = request.param
    root = tmp_path_factory.mktemp("convert")
    model = make_hf_model(kind)
    model.save_pretrained(root / "hf")
    (root / "hf" / "tokenizer_config.json").write_text('{"model_max_length": 512}')
    assert _cli("hf-to-megatron", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt"),
                *layout) == 0
    assert _cli("megatron-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "hf2")) == 0
    return root, model, layout


def test_cli_round_trip_via_parallel_checkpoint(cli_round_trip):
    from transformers import AutoModelForCausalLM

    root, model, layout = cli_round_trip
    meta = json.loads((root / "ckpt" / "megatron_erc.json").read_text())
    tp, pp = (2, 1) if layout[0] == "--tp" else (1, 2)
    assert (meta["tp"], meta["pp"], meta["padded_vocab_size"]) == (tp, pp, 512)
    assert (root / "hf2" / "tokenizer_config.json").exists()
    assert not list(root.glob(".*.partial"))
    loaded = AutoModelForCausalLM.from_pretrained(root / "hf2", attn_implementation="eager")
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys()
    assert [k for k in want if not torch.equal(want[k], got[k])] == []
    tokens = make_tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(loaded(tokens).logits, model(tokens).logits)


def test_cli_refuses_to_overwrite(cli_round_trip, capsys):
    root, _, _ = cli_round_trip
    assert _cli("hf-to-megatron", "--hf-dir", str(root / "hf"), "--out", str(root / "ckpt")) == 2
    assert "already exists; pass --force" in capsys.readouterr().err
    assert _cli("megatron-to-hf", "--ckpt", str(root / "ckpt"), "--out", str(root / "hf2")) == 2
    assert "already exists; pass --force" in capsys.readouterr().err


def test_cli_shape_mismatch_names_the_tensor(tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    make_hf_model("llama_tied").save_pretrained(tmp_path / "hf")
    path = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(path)
    tensors["model.layers.2.mlp.down_proj.weight"] = torch.zeros(128, 300)
    save_file(tensors, path, metadata={"format": "pt"})
    assert _cli("hf-to-megatron", "--hf-dir", str(tmp_path / "hf"), "--out",
                str(tmp_path / "ckpt"), "--tp", "2") == 2
    assert re.search(r"model\.layers\.2\.mlp\.down_proj\.weight: shape \(128, 300\)",
                     capsys.readouterr().err)
    assert not (tmp_path / "ckpt").exists()


def _load_at_ep(rank: int, world: int, ckpt: str, hf_dir: str, ep: int) -> list[str]:
    """Load a converted checkpoint into an EP=``ep`` model (experts split over the ranks,
    dist_checkpointing resharding them) and return the HF tensors that differ from the
    source checkpoint's (experts all-gathered over EP by ``iter_hf_weights``)."""
    from megatron.core import dist_checkpointing
    from safetensors.torch import load_file
    from transformers import AutoConfig

    from megatron_erc import platform
    from megatron_erc.models import ParallelConfig, build_model_chunks
    from megatron_erc.models.hf_adapter import iter_hf_weights

    platform.setup()
    platform.init_model_parallel(1, 1, seed=0, expert_model_parallel_size=ep,
                                 expert_tensor_parallel_size=1)
    cfg = AutoConfig.from_pretrained(hf_dir)
    meta = json.loads((pathlib.Path(ckpt) / "megatron_erc.json").read_text())
    chunks = build_model_chunks(cfg, ParallelConfig(
        ep=ep, pad_vocab_multiple=meta["padded_vocab_size"]))
    state = dist_checkpointing.load({"model": chunks[0].sharded_state_dict()}, ckpt)
    chunks[0].load_state_dict(state["model"])
    got = dict(iter_hf_weights(chunks, cfg))
    want = load_file(f"{hf_dir}/model.safetensors")
    return sorted(k for k in want.keys() | got.keys()
                  if k not in got or k not in want or not torch.equal(got[k], want[k]))


def test_moe_checkpoint_written_at_tp2_loads_at_ep2(cli_round_trip):
    """Conversion writes experts whole under their global index; a model with the experts
    split over two EP ranks loads them back bit-exactly."""
    root, model, _ = cli_round_trip
    if model.config.model_type != "qwen3_moe":
        pytest.skip("expert parallelism applies to the MoE checkpoint only")
    mismatched = run_distributed(_load_at_ep, 2, str(root / "ckpt"), str(root / "hf"), 2)
    assert mismatched == [[], []]
