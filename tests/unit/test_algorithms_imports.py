"""megatron_erc.algorithms is pure tensor math: importing it must not pull in
torch.distributed machinery or Megatron."""

from __future__ import annotations

import json
import subprocess
import sys

import megatron_erc.algorithms as algorithms

PROBE = """
import json, sys
import torch
before = sorted(k for k in sys.modules if k.startswith("torch.distributed"))
import megatron_erc.algorithms
after = sorted(k for k in sys.modules if k.startswith("torch.distributed"))
megatron = sorted(k for k in sys.modules if k == "megatron" or k.startswith("megatron."))
print(json.dumps({"new": sorted(set(after) - set(before)), "megatron": megatron}))
"""


def test_import_pulls_no_distributed_or_megatron():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True,
                         check=True, timeout=120)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"new": [], "megatron": []}


def test_public_api_exported():
    for name in algorithms.__all__:
        assert hasattr(algorithms, name), name
