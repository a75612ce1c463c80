"""The wheel holds every package and the files the demo starts from (a non-editable install
runs ``megatron-erc demo``)."""

from __future__ import annotations

import pathlib

import pytest
from setuptools import find_packages

from megatron_erc.cli.assets import example_path

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
REPO = pathlib.Path(__file__).resolve().parents[2]
DEMO_FILES = ["tiny/config.json", "tiny/sft.yaml", "tiny/dapo_erc.yaml",
              "ablation/offpolicy.yaml"]


def _setuptools() -> dict:
    return tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_package_list_matches_the_tree():
    listed = set(_setuptools()["packages"]) - {"megatron_erc.examples"}
    assert listed == set(find_packages(str(REPO), include=["megatron_erc*"]))


def test_demo_files_are_package_data():
    st = _setuptools()
    assert st["package-dir"]["megatron_erc.examples"] == "examples"
    globs = st["package-data"]["megatron_erc.examples"]
    for rel in DEMO_FILES:
        assert any(pathlib.PurePath(rel).match(g) for g in globs), rel
        assert example_path(rel) == REPO / "examples" / rel  # the checkout, in a checkout
