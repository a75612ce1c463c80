#!/usr/bin/env bash
# One-GPU smoke run (tests/gpu/smoke.py), offline, with the machine's own torch and Triton:
#   1. 3 RL steps of the tiny demo on CUDA through the CLI, embedded engine (no vLLM);
#   2. one training step of a random-init model with DeepSeek-R1-Distill-Qwen-1.5B's shapes
#      at 8192 tokens (bf16, chunked log-probs, full recompute): tokens/s, peak memory, MFU.
# What megatron-erc needs and the machine lacks (megatron-core 0.16.1, transformers, ...) is
# installed from a local wheel folder into $SITE with --no-index --no-deps; torch, Triton,
# Transformer Engine and vLLM are never installed. Results: [smoke] lines, one JSON line, and
# $OUT/gpu_smoke.json when $OUT is set. Extra arguments go to the module (e.g. --part step).
#
#   WHEELS=.whl SITE=/tmp/site PYTHON=python3 bash scripts/gpu_smoke.sh
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS:-.whl}
SITE=${SITE:-/tmp/site}
SMOKE_TIMEOUT=${SMOKE_TIMEOUT:-450}   # seconds for both parts; the issue allows 8 minutes
export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1   # no network on the GPU machine
start=$SECONDS

if ! "$PYTHON" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "[gpu_smoke] needs an NVIDIA GPU and a CUDA build of torch ($PYTHON: torch" \
         "$("$PYTHON" -c 'import torch; print(torch.__version__)' 2>/dev/null || echo missing))" >&2
    echo "[gpu_smoke] on CPU: $PYTHON -m tests.gpu.smoke --part step --tiny" >&2
    exit 2
fi
"$PYTHON" -c "import torch; print('[gpu_smoke] torch', torch.__version__, 'CUDA', \
torch.version.cuda, torch.cuda.get_device_name(0))"

echo "[gpu_smoke] dependencies: wheels from $WHEELS into $SITE (offline, --no-deps)"
"$PYTHON" -m tests.gpu.deps --wheels "$WHEELS" --target "$SITE"
"$PYTHON" -W ignore -c "import megatron.core, transformers, megatron_erc.cli" || {
    echo "[gpu_smoke] megatron-erc does not import with $PYTHON and $SITE" >&2; exit 2; }

status=0
timeout "$SMOKE_TIMEOUT" "$PYTHON" -m tests.gpu.smoke "$@" || status=$?
elapsed=$((SECONDS - start))
case $status in
    0) echo "[gpu_smoke] PASSED in ${elapsed} s" ;;
    124) echo "[gpu_smoke] TIMED OUT after ${SMOKE_TIMEOUT} s (total ${elapsed} s)" ;;
    *) echo "[gpu_smoke] FAILED (exit $status) in ${elapsed} s: see the [smoke] lines above" ;;
esac
exit "$status"
