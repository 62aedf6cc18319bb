"""Atomic training checkpoints: a run killed at any instant resumes from its last complete checkpoint.

A checkpoint is one file ``<dir>/step-00000123.pt`` (``torch.save`` of plain tensors and numbers, read back
with ``weights_only=True``). It is written to a temporary file in the same folder, flushed and fsynced, then
renamed over its final name (``os.replace`` is atomic on POSIX), and the folder is fsynced; a reader
therefore sees either no file or a whole one. Leftover temporary files of a killed writer are removed at the
next save. Older checkpoints beyond ``keep`` are deleted after the new one is in place.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch

PATTERN = re.compile(r"^step-(\d{8})\.pt$")
TMP_PREFIX = ".tmp-step-"


def checkpoint_path(directory: Path, step: int) -> Path:
    return directory / f"step-{step:08d}.pt"


def list_checkpoints(directory: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of the complete checkpoints in ``directory``, oldest first."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.iterdir() if (m := PATTERN.match(p.name)) and p.is_file()]
    return sorted(found)


def latest_checkpoint(directory: str | Path) -> Path | None:
    found = list_checkpoints(directory)
    return found[-1][1] if found else None


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> Path:
    """``torch.save`` into a temporary file beside ``path``, fsynced, then renamed over it: a reader sees the old
    file or the whole new one, never part of it."""
    fd, tmp_name = tempfile.mkstemp(prefix=TMP_PREFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)
    return path


def save_checkpoint(directory: str | Path, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write ``state`` as the checkpoint of ``step`` atomically; keep the newest ``keep`` (0: keep all)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob(f"{TMP_PREFIX}*"):
        stale.unlink(missing_ok=True)
    final = checkpoint_path(directory, step)
    atomic_torch_save(state, final)
    if keep > 0:
        for _, old in list_checkpoints(directory)[:-keep]:
            old.unlink(missing_ok=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    return torch.load(Path(path), map_location="cpu", weights_only=True)
