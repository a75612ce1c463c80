"""Real Slurm clusters for the tests of ``slurm/`` (one node: ``cluster.py``; two:
``two_nodes.py``), and the tiny task their jobs train on. Skipped, not failed, only where
Slurm cannot be installed or run."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable


def running(cluster: SlurmCluster):
    """Start ``cluster`` for a fixture, yield it, stop it; skip (with why) where Slurm cannot
    run here."""
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        pytest.skip(f"no Slurm test cluster ({type(cluster).__name__}): {e}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    yield from running(SlurmCluster(tmp_path_factory.mktemp("slurm")))


@pytest.fixture(scope="module")
def two_nodes(tmp_path_factory):
    from tests.slurm.two_nodes import TwoNodeCluster

    yield from running(TwoNodeCluster(tmp_path_factory.mktemp("slurm2")))


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """``demo.prepare``'s prompt files, tokenizer and random-init model."""
    from megatron_erc.cli.demo import prepare

    root = tmp_path_factory.mktemp("task")
    prepare(root, seed=0)
    return root
