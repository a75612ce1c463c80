#!/usr/bin/env bash
# Install what the tests need into .venv/ and run the whole suite. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh dev
# tests/slurm runs a real slurmctld/slurmd; it skips (with the reason) where these Debian
# packages cannot be installed.
if [ "$(id -u)" = 0 ] && ! command -v slurmctld >/dev/null 2>&1 && command -v apt-get >/dev/null; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
        slurmctld slurmd slurm-client munge >/dev/null \
        || echo "[test] slurm packages unavailable: tests/slurm will skip"
fi
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
# Every test runs here, the slow ones (marked `slow`: learning demo, ablation, Slurm) too; they
# are collected first so they start beside the rest (tests/conftest.py). Locally,
# `bash scripts/test.sh -m "not slow"` skips them.
.venv/bin/ruff check megatron_erc tests benchmarks tools
exec .venv/bin/python -m pytest -n "${PYTEST_WORKERS:-2}" --dist loadgroup --durations=15 "$@" tests
