"""Activation recompute (``parallel.recompute``) at TP=2: same loss and gradients as no
recompute, less activation memory (measured).

All settings run in one spawned world (one model build per setting, same weights), so the
memory numbers are measured side by side in the same processes.
"""

from __future__ import annotations

import json
import pathlib

import pytest

from megatron_erc.models import ParallelConfig
from tests.distributed.harness import run_distributed
from tests.distributed.recompute_cases import run_recompute

TOL = 1e-6
TINY = json.loads((pathlib.Path(__file__).parents[2] / "examples/tiny/config.json").read_text())
TINY.pop("architectures"), TINY.pop("torch_dtype")
SETTINGS = {
    "none": {},
    "selective": {"recompute": "selective"},
    "full": {"recompute": "full"},
    "full_2_of_4": {"recompute": "full", "recompute_layers": 2},
}


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_distributed(run_recompute, 2, TINY, SETTINGS)


def _rel_err(got, expected) -> float:
    got, expected = got.double(), expected.double()
    return (got - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)


@pytest.mark.parametrize("name", ["selective", "full", "full_2_of_4"])
def test_loss_and_every_gradient_equal_no_recompute(results, name):
    for rank in results:
        ref, got = rank["none"], rank[name]
        assert got["granularity"] == name.split("_")[0]
        assert ref["granularity"] is None
        assert abs(got["loss"] - ref["loss"]) <= TOL * abs(ref["loss"])
        assert got["grads"].keys() == ref["grads"].keys() and len(ref["grads"]) >= 10
        errors = {n: _rel_err(got["grads"][n], g) for n, g in ref["grads"].items()}
        worst = sorted(errors.items(), key=lambda kv: -kv[1])[:3]
        assert worst[0][1] <= TOL, f"rank {rank['tp_rank']} {name}: worst {worst}"
        assert all(g.abs().max() > 0 for g in ref["grads"].values()), "a zero gradient"


def test_recompute_lowers_activation_memory(results):
    for rank in results:
        saved = {k: rank[k]["saved_bytes"] for k in SETTINGS}
        peak = {k: rank[k]["peak_bytes"] for k in SETTINGS}
        print(f"rank {rank['tp_rank']}: saved for backward (MiB) "
              + ", ".join(f"{k}={v / 2**20:.2f}" for k, v in saved.items())
              + "; peak over forward+backward (MiB) "
              + ", ".join(f"{k}={v / 2**20:.2f}" for k, v in peak.items()))
        assert saved["full"] < saved["full_2_of_4"] < saved["none"], saved
        assert saved["selective"] < saved["none"], saved
        assert peak["full"] < peak["full_2_of_4"] < peak["none"], peak
        assert peak["selective"] < peak["none"], peak


@pytest.mark.parametrize("fields,match", [
    ({"recompute": "layers"}, "must be one of none, selective, full"),
    ({"recompute": "selective", "recompute_layers": 2}, "applies to recompute=full only"),
    ({"recompute_layers": 2}, "applies to recompute=full only"),
    ({"recompute": "full", "recompute_layers": 0}, "must be >= 1"),
])
def test_bad_recompute_settings_say_what_to_do(fields, match):
    with pytest.raises(ValueError, match=match):
        ParallelConfig(**fields)


def test_recompute_maps_onto_megatron_arguments():
    assert ParallelConfig().recompute_kwargs(4) == {}
    assert ParallelConfig(recompute="selective").recompute_kwargs(4) == {
        "recompute_granularity": "selective"}
    full = {"recompute_granularity": "full", "recompute_method": "block"}
    assert ParallelConfig(recompute="full").recompute_kwargs(4) == dict(
        full, recompute_num_layers=4)
    assert ParallelConfig(recompute="full", recompute_layers=1).recompute_kwargs(4) == dict(
        full, recompute_num_layers=1)
    with pytest.raises(ValueError, match="exceeds the 2 transformer layers.*at most 2"):
        ParallelConfig(pp=2, recompute="full", recompute_layers=3).recompute_kwargs(2)
