"""The YAML/CLI config surface: examples parse, overrides apply, bad input names the field."""

from __future__ import annotations

import pathlib

import pytest

from megatron_erc.config import ConfigError, SFTConfig, TrainConfig, load_config

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
    ("algo.routing_replay=rollout", "routing_replay"),
    ("checkpoint.optimizer_format=zero", "checkpoint.optimizer_format"),
])
def test_invalid_values_name_the_field(override, needle):
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(TrainConfig, None, ["data.path=x.jsonl", override])


def test_bad_yaml_is_reported(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("run: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(TrainConfig, f)


# ---------------------------------------------------------------- checks across fields
@pytest.mark.parametrize("overrides,needles", [
    (["run.warmup_steps=10"], ["run.warmup_steps", "optim.warmup_steps"]),
    (["run.updates_per_rollout=5"], ["run.updates_per_rollout=5", "rollout.prompts_per_step=16",
                                     "only 4 updates", "4 or 6"]),
    (["run.updates_per_rollout=20"], ["run.updates_per_rollout=20", "only 16 updates"]),
    (["rollout.prompts_per_step=9", "run.updates_per_rollout=6"], ["only 5 updates", "5 or 9"]),
    (["validation.samples_per_prompt=4", "validation.temperature=0"],
     ["validation.samples_per_prompt=4", "validation.temperature=0"]),
    (["validation.top_p=0"], ["validation.top_p"]),
    (["optim.decay_steps=100"], ["optim.decay_steps", "optim.decay_style=constant"]),
    (["optim.min_lr=1e-7"], ["optim.min_lr", "optim.decay_style=constant"]),
])
def test_fields_that_would_silently_do_nothing_fail_at_start(overrides, needles):
    with pytest.raises(ConfigError) as e:
        load_config(TrainConfig, EXAMPLES / "tiny" / "dapo_erc.yaml", overrides)
    for needle in needles:
        assert needle in str(e.value), (needle, str(e.value))


@pytest.mark.parametrize("field", ["run.pack_sequences=true", "run.max_tokens_per_micro_batch=64"])
def test_sft_refuses_the_rl_only_batching_fields(field):
    with pytest.raises(ConfigError, match=field.split("=")[0].replace(".", r"\.")):
        load_config(SFTConfig, EXAMPLES / "tiny" / "sft.yaml", [field])


@pytest.mark.parametrize("groups", [1, 4, 9, 16, 128])
def test_update_count_check_matches_the_minibatch_plan(groups):
    from megatron_erc.trainer.batch import plan_minibatches
    from megatron_erc.trainer.config import check_updates, minibatch_count

    for updates in range(1, groups + 3):
        made = len(plan_minibatches([1] * groups, updates, dp_size=2))
        assert made == minibatch_count(groups, updates)
        if made == updates:
            check_updates(updates, groups)
        else:
            with pytest.raises(ValueError, match="run.updates_per_rollout"):
                check_updates(updates, groups)


def test_every_section_class_is_importable_from_megatron_erc_config():
    import dataclasses
    import typing

    import megatron_erc.config as config

    def sections(cls):
        for tp in typing.get_type_hints(cls).values():
            for t in (tp, *typing.get_args(tp)):
                if dataclasses.is_dataclass(t):
                    yield t
                    yield from sections(t)

    found = {*sections(TrainConfig), *sections(SFTConfig), config.ErcConfig}
    assert len(found) >= 10
    for cls in found:
        assert getattr(config, cls.__name__) is cls, cls
