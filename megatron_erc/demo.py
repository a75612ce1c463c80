"""Moved to :mod:`megatron_erc.cli.demo`; this alias remains for ``tests/slurm/conftest.py``
until it imports ``megatron_erc.cli.demo`` (then delete this file)."""

from megatron_erc.cli.demo import prepare, run_demo

__all__ = ["prepare", "run_demo"]
