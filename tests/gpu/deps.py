"""Install what megatron-erc needs and this Python lacks from a local wheel folder, offline.

For GPU machines that bring their own torch and Triton (and no network): walks the
requirements in ``pyproject.toml`` and, for each distribution that is absent or at a version
outside the requirement, runs ``pip install --no-index --no-deps --find-links WHEELS
--target SITE``; then walks the requirements of what it installed, until nothing is missing.
``--no-deps`` and the skip list keep pip from ever resolving torch, Triton, CUDA libraries,
Transformer Engine or vLLM. Put ``SITE`` on ``PYTHONPATH`` (ahead of site-packages) to use it.

    python -m tests.gpu.deps --wheels .whl --target /tmp/site
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata as md
import pathlib
import re
import subprocess
import sys

try:
    from packaging.requirements import Requirement
except ImportError:  # pip always vendors it
    from pip._vendor.packaging.requirements import Requirement

REPO = pathlib.Path(__file__).resolve().parents[2]
# Provided by the machine (or deliberately absent): never installed from the folder.
SKIP = re.compile(r"^(torch|triton|nvidia-.*|transformer-engine.*|vllm.*|pytorch-triton.*)$")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def project_requirements(pyproject: pathlib.Path = REPO / "pyproject.toml") -> list[str]:
    """``[project].dependencies`` (tomllib where available, a plain parse otherwise)."""
    text = pyproject.read_text()
    try:
        import tomllib

        return list(tomllib.loads(text)["project"]["dependencies"])
    except ImportError:
        block = re.search(r"^dependencies\s*=\s*\[(.*?)^\]", text, re.S | re.M).group(1)
        lines = (line.split("#")[0] for line in block.splitlines())
        return [m for line in lines for m in re.findall(r'"([^"]+)"', line)]


def _unmet(req: Requirement) -> bool:
    """True when ``req`` applies here and no installed distribution satisfies it."""
    if SKIP.match(_norm(req.name)):
        return False
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        return False
    try:
        version = md.version(req.name)
    except md.PackageNotFoundError:
        return True
    return bool(req.specifier) and not req.specifier.contains(version, prereleases=True)


def _in_target(name: str, target: pathlib.Path) -> bool:
    try:
        files = md.distribution(name).files or []
    except md.PackageNotFoundError:
        return False
    return bool(files) and target.resolve() in pathlib.Path(files[0].locate()).resolve().parents


def install_missing(wheels: pathlib.Path, target: pathlib.Path, *, dry_run: bool = False
                    ) -> tuple[list[str], list[str]]:
    """Returns ``(installed, not_found)`` requirement strings.

    The requirements of everything under ``target`` (installed now or by an earlier run) are
    walked too; those of the machine's own packages are trusted.
    """
    sys.path.insert(0, str(target))  # what an earlier run installed counts as present
    installed, not_found, seen = [], [], set()
    todo = [Requirement(r) for r in project_requirements()]
    while todo:
        req = todo.pop(0)
        if _norm(req.name) in seen:
            continue
        seen.add(_norm(req.name))
        if _unmet(req):
            spec = f"{req.name}{req.specifier}"
            if dry_run:
                installed.append(spec)
                continue
            proc = subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--no-index", "--no-deps",
                 "--find-links", str(wheels), "--target", str(target), spec],
                capture_output=True, text=True)
            if proc.returncode:
                not_found.append(spec)
                continue
            installed.append(spec)
            importlib.invalidate_caches()
        if _in_target(req.name, target):
            todo += [Requirement(r) for r in md.requires(req.name) or []]
    return installed, not_found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--wheels", type=pathlib.Path, default=REPO / ".whl")
    parser.add_argument("--target", type=pathlib.Path, default=pathlib.Path("/tmp/site"))
    parser.add_argument("--dry-run", action="store_true", help="list what would be installed")
    args = parser.parse_args()
    installed, not_found = install_missing(args.wheels, args.target, dry_run=args.dry_run)
    verb = "would install" if args.dry_run else "installed into " + str(args.target)
    print(f"[deps] {verb}: {', '.join(installed) or 'nothing'}")
    if not_found:
        print(f"[deps] no wheel in {args.wheels} for: {', '.join(not_found)}\n"
              f"[deps] on a machine with the index: pip download --no-deps --only-binary=:all: "
              f"--python-version {sys.version_info.major}.{sys.version_info.minor} "
              f"-d {args.wheels} '" + "' '".join(not_found) + "'\n"
              "[deps] then run this again: what they require is checked once they install",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
