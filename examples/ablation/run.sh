#!/usr/bin/env bash
# Ablation v2 (docs/ablation.md): DAPO; DAPO+ERC at bands 0.8-1.2, 0.9-1.1, 0.95-1.05; GPPO;
# GPPO+ERC; DAPO+Clip-Cov; DAPO+KL-Cov; CISPO; DPPO (megatron_erc/studies/ablation_spec.py), at
# 2 and 8 updates per rollout, 5 seeds, from one shared SFT warm start, then the report.
# Resumable: finished runs are skipped, so re-running after an interruption continues.
#   bash examples/ablation/run.sh            # 10 variants x 2 regimes x 5 seeds = 100 RL runs,
#                                            # 2 at a time: ~1-2 h on a 2-core CPU
#   bash examples/ablation/run.sh --quick    # DAPO and DAPO+ERC, one seed, 4 steps: a smoke run
# Extra arguments go to `python -m megatron_erc.studies.ablation run` (e.g. --seeds 0 1 2,
# --variants dapo cispo, --regimes u8, --set optim.lr=1e-3).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-runs/ablation}
"$PY" -m megatron_erc.studies.ablation run --out "$OUT" "$@"
"$PY" -m megatron_erc.studies.ablation report --out "$OUT" --docs "${DOCS:-docs}"
