"""The YAML/CLI config surface: examples parse, overrides apply, bad input names the field."""

from __future__ import annotations

import pathlib

import pytest

from megatron_erc.config import ConfigError, load_config
from megatron_erc.trainer.config import TrainConfig
from megatron_erc.trainer.sft import SFTConfig

EXAMPLES = pathlib.Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.parametrize("path", sorted(p for p in EXAMPLES.rglob("*.yaml") if "sft" not in p.name),
                         ids=lambda p: p.name)
def test_example_train_configs_load(path):
    cfg = load_config(TrainConfig, path)
    assert cfg.data is not None
    if "erc" in path.stem:  # the recipes named for ERC use it (the ablation base varies it)
        assert cfg.algo.erc is not None


def test_sft_example_loads():
    assert load_config(SFTConfig, EXAMPLES / "tiny" / "sft.yaml").batch_size == 32


def test_overrides_apply_with_types():
    cfg = load_config(TrainConfig, EXAMPLES / "tiny" / "dapo_erc.yaml",
                      ["algo.erc.low=0.9", "run.steps=7", "validation.path=null",
                       "algo.surrogate=gppo", "optim.lr=1e-5", "overlong.max_len=40",
                       "overlong.cache_len=8"])
    assert cfg.algo.erc.low == 0.9 and cfg.run.steps == 7 and cfg.validation.path is None
    assert cfg.algo.surrogate == "gppo" and cfg.optim.lr == 1e-5
    assert cfg.overlong.max_len == 40


@pytest.mark.parametrize("override,needle", [
    ("algo.erc.low=1.5", "algo.erc"),
    ("algo.ercc=1", "algo.ercc"),
    ("run.steps=abc", "run.steps"),
    ("rollout.n=1", "rollout.n"),
    ("parallel.tp=0", "parallel.tp"),
    ("algo.eps_low=1.2", "eps_low"),
    ("nosuchsection.x=1", "nosuchsection"),
    ("run.steps", "section.field=value"),
])
def test_invalid_values_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TrainConfig, None, ["data.path=x.jsonl", override])


def test_bad_yaml_is_reported(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, f)
