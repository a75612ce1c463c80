#!/usr/bin/env bash
# Install everything into .venv/ and run the embedded default job.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
exec .venv/bin/megatron-erc demo "$@"
