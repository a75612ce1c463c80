"""A real one-node Slurm cluster for the tests of ``slurm/`` (see ``cluster.py``), and the tiny
task its jobs train on. Skipped, not failed, only where Slurm cannot be installed or run."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory):
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as e:
        cluster.stop()
        pytest.skip(f"no Slurm test cluster: {e}")
    except BaseException:
        cluster.stop()
        raise
    yield cluster
    cluster.stop()


@pytest.fixture(scope="session")
def tiny_task(tmp_path_factory):
    """``demo.prepare``'s prompt files, tokenizer and random-init model."""
    from megatron_erc.demo import prepare

    root = tmp_path_factory.mktemp("task")
    prepare(root, seed=0)
    return root
