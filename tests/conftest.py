"""Suite-wide collection order: the ``slow`` tests first.

They still run everywhere (``scripts/test.sh`` selects no markers; ``-m "not slow"`` skips
them locally). Under ``pytest -n 2`` the first tests collected start first, so the long ones
(the learning demo, the ablation, the Slurm jobs) run beside the rest from the start
instead of finishing the suite alone.
"""

from __future__ import annotations


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable sort
