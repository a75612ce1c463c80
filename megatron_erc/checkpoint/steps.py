"""Training checkpoints on disk: step directories, the ``COMPLETE`` marker with its file
manifest, finding the newest intact checkpoint, pruning (publishing is ``checkpoint.io``'s).

The marker is written last, before the directory gets its final name, and lists every file
of the checkpoint with its size. A checkpoint whose marker is missing was interrupted; one
whose files do not match the manifest (truncated, deleted, partly copied) is damaged.
Checking costs one ``stat`` per file, so it runs before anything is built. Markers written
before the manifest existed have no ``files``: only their presence is checked.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
import re
import shutil

from megatron_erc.errors import UserError

logger = logging.getLogger(__name__)

FORMAT = "megatron_erc.train/1"
COMPLETE_FILE = "COMPLETE"
TRAINER_STATE_FILE = "trainer_state.pt"
RANKS_SUBDIR = "ranks"
_STEP_DIR = re.compile(r"^step_(\d{8})$")
_TMP_DIR = re.compile(r"^\.step_\d{8}\.(tmp|old)-[0-9a-f]+$")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be written or resumed; the message says which and why."""

    kind = "checkpoint"


def step_dir(root: str | os.PathLike, step: int) -> pathlib.Path:
    return pathlib.Path(root) / f"step_{step:08d}"


def read_marker(path: pathlib.Path) -> dict | None:
    try:
        marker = json.loads((pathlib.Path(path) / COMPLETE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("format") == FORMAT else None


def manifest(path: pathlib.Path) -> dict[str, int]:
    """``{relative path: size}`` of every file under ``path`` (the marker's ``files``)."""
    return {str(f.relative_to(path)): f.stat().st_size
            for f in sorted(path.rglob("*")) if f.is_file() and f.name != COMPLETE_FILE}


def damage(path: pathlib.Path, marker: dict) -> str | None:
    """What is wrong with the files of a complete checkpoint, or None when they match."""
    for rel, size in marker.get("files", {}).items():
        f = pathlib.Path(path) / rel
        if not f.is_file():
            return f"{f} is missing"
        if f.stat().st_size != size:
            return f"{f} has {f.stat().st_size} bytes where {size} were written (truncated?)"
    return None


def list_complete(root: str | os.PathLike) -> list[tuple[int, pathlib.Path]]:
    """``(step, path)`` of the complete checkpoints under ``root``, oldest first. Temporary
    directories of interrupted writers and directories without the marker are skipped."""
    root = pathlib.Path(root)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        m = _STEP_DIR.match(entry.name)
        if m and entry.is_dir():
            marker = read_marker(entry)
            if marker is not None and marker.get("step") == int(m.group(1)):
                found.append((int(m.group(1)), entry))
    return sorted(found)


def find_latest(root: str | os.PathLike) -> pathlib.Path | None:
    """The newest complete and intact checkpoint under ``root``, or None when there is no
    complete one. Damaged newer ones are skipped with a warning; when every complete one is
    damaged, raises ``CheckpointError`` (starting afresh would silently drop the run)."""
    found = list_complete(root)
    problems = []
    for _, path in reversed(found):
        problem = damage(path, read_marker(path) or {})
        if problem is None:
            return path
        logger.warning("checkpoint %s is damaged (%s): skipping it for an earlier one", path,
                       problem)
        problems.append(problem)
    if found:
        raise CheckpointError(
            f"every complete checkpoint under {root} is damaged ({'; '.join(problems)}); "
            "restore them, or move them away to start this run afresh")
    return None


def check_resumable(path: str | os.PathLike, name: str = "checkpoint.resume") -> pathlib.Path:
    """``path`` (given as ``name``) if it is a complete, intact checkpoint; else
    ``CheckpointError`` saying what is wrong and which checkpoints next to it are intact."""
    path = pathlib.Path(path)
    intact = [str(p) for _, p in list_complete(path.parent)
              if p != path and damage(p, read_marker(p) or {}) is None]
    resume = name == "checkpoint.resume"
    if intact:
        instead = f"use an intact one ({', '.join(intact[-2:])})" + (
            " or checkpoint.resume=auto, which skips damaged ones" if resume else "")
    else:
        instead = ("resume from another checkpoint or start afresh (checkpoint.resume=null)"
                   if resume else "use another checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{name}={path}: no such directory; name a "
                              "RUN_DIR/checkpoints/step_* directory" +
                              (", or use checkpoint.resume=auto (the newest intact one of "
                               "run.dir)" if resume else "") +
                              (f"; intact here: {', '.join(intact[-2:])}" if intact else ""))
    if list_complete(path):
        raise CheckpointError(f"{name}={path} is a directory of checkpoints; name one of its "
                              "step_* directories" +
                              (" or use checkpoint.resume=auto" if resume else ""))
    marker = read_marker(path)
    if marker is None:
        raise CheckpointError(
            f"{name}={path} is not a complete training checkpoint (no valid {COMPLETE_FILE} "
            f"marker: its save was interrupted, or it is not a step_* directory); {instead}")
    problem = damage(path, marker)
    if problem is not None:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}; {instead}")
    return path


def prune(root: pathlib.Path, keep_last: int, just_written: pathlib.Path) -> None:
    """Delete all but the newest ``keep_last`` complete checkpoints (never ``just_written``)
    and the temporary directories of interrupted writers (one trainer writes to a root)."""
    for entry in root.iterdir():
        if _TMP_DIR.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
    if keep_last == 0:
        return
    complete = list_complete(root)
    for _, path in complete[:-keep_last]:
        if path != just_written:
            shutil.rmtree(path, ignore_errors=True)
