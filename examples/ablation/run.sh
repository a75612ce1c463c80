#!/usr/bin/env bash
# The ERC ablation (docs/ablation.md): DAPO, DAPO+ERC, GPPO, GPPO+ERC x 3 seeds from one
# shared SFT warm start, then the report. Resumable: finished runs are skipped.
#   bash examples/ablation/run.sh                 # full setting (12 runs, ~15 min on a 2-core CPU)
#   bash examples/ablation/run.sh --quick         # one seed, 4 steps: a smoke run
# Extra arguments go to `python -m megatron_erc.studies.ablation run` (e.g. --set optim.lr=5e-4).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/ablation}
"$PY" -m megatron_erc.studies.ablation run --out "$OUT" "$@"
"$PY" -m megatron_erc.studies.ablation report --out "$OUT" --docs "${DOCS:-docs}"
