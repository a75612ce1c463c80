"""What the ERC ablation compares and where its files are: shared by the runner
(``ablation.py``) and the report (``ablation_report.py``), which import this module and
not each other (the report only reads finished runs)."""

from __future__ import annotations

import pathlib

from megatron_erc.cli.assets import checkout_root, example_path

REPO = checkout_root() or pathlib.Path.cwd()  # git commit, docs/ and the runs' working dir
CONFIG = example_path("ablation/offpolicy.yaml")
SFT_CONFIG = example_path("tiny/sft.yaml")
MODULE = "megatron_erc.studies.ablation"
"""The runner, as ``python -m`` runs it (also for each RL run's own process)."""

_CLIP = ["algo.surrogate=clip", "algo.eps_low=0.2", "algo.eps_high=0.28", "algo.dual_clip=10"]
_GPPO = ["algo.surrogate=gppo", "algo.eps_low=0.2", "algo.eps_high=0.2", "algo.dual_clip=10"]
_ERC = ["algo.erc={low: 0.95, high: 1.05}"]
VARIANTS = {  # name -> algo overrides; ERC is the only difference within a pair
    "dapo": _CLIP + ["algo.erc=null"],
    "dapo_erc": _CLIP + _ERC,
    "gppo": _GPPO + ["algo.erc=null"],
    "gppo_erc": _GPPO + _ERC,
}
LABELS = {"dapo": "DAPO", "dapo_erc": "DAPO+ERC", "gppo": "GPPO", "gppo_erc": "GPPO+ERC"}


def rel(path: pathlib.Path) -> str:
    """``path`` relative to the checkout (or working directory) when it is inside it."""
    path = path.resolve()
    return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)
