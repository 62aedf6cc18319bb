"""The record store of an A/B run: ``records.jsonl``, the images' paths, atomic writes, what a rerun reuses.

:func:`diffsteer.evaluation.ab.run_ab` appends one JSON object per finished image to ``records.jsonl`` after
each chunk of images, with the keys ``arm``, ``prompt_id``, ``seed``, ``prompt``, ``path``, ``signature``,
``policy``, ``model`` and ``metrics`` (column -> value). ``path`` is the image's PNG relative to the run's
folder (:func:`image_relpath`), ``signature`` a hash of the arm's settings (policy, model, steps, scheduler,
size). Reading the file, the last line of an (arm, prompt id, seed) wins and a line cut short by an interruption
is skipped. A rerun keeps a record (:func:`reusable`) when its signature and prompt text still match, it holds
the metrics measured while generating (``nfe``, ``latency``) and its PNG exists; metrics added since are
computed from that PNG.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from diffsteer.evaluation.metrics import RECORDED
from diffsteer.evaluation.runner import Item


def image_relpath(arm: str, item: Item) -> str:
    """Path of an image relative to the run's folder: ``images/ARM/NNNN-prompt-slug-sSEED.png``."""
    entry = item.meta
    slug = re.sub(r"[^a-z0-9]+", "-", item.prompt.lower()).strip("-")[:40] or "prompt"
    return f"images/{arm}/{entry.index:04d}-{slug}-s{item.seed}.png"


class RecordStore:
    """``records.jsonl``: one JSON line per finished image, appended; the last line for a key wins."""

    def __init__(self, path: Path):
        self.path = path
        self.records: dict[tuple[str, str, int], dict[str, Any]] = {}
        if path.is_file():
            with path.open(encoding="utf-8") as f:
                for line in f:
                    try:
                        rec = json.loads(line)
                        key = (rec["arm"], rec["prompt_id"], int(rec["seed"]))
                    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
                        continue  # e.g. a line cut short by an interruption
                    self.records[key] = rec

    def get(self, arm: str, item: Item) -> dict[str, Any] | None:
        return self.records.get((arm, item.prompt_id, item.seed))

    def add(self, records: Sequence[dict[str, Any]]) -> None:
        if not records:
            return
        with self.path.open("a", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, separators=(",", ":")) + "\n")
                self.records[(rec["arm"], rec["prompt_id"], int(rec["seed"]))] = rec
            f.flush()
            os.fsync(f.fileno())


def write_atomic(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def reusable(rec: dict[str, Any] | None, signature: str, item: Item, out: Path) -> bool:
    """Whether a rerun may keep ``rec`` (of an arm whose settings hash to ``signature``) for ``item``: same
    settings and prompt text, the metrics recorded while generating present, and the PNG still under ``out``."""
    return (
        rec is not None
        and rec.get("signature") == signature
        and rec.get("prompt") == item.prompt
        and all(k in rec.get("metrics", {}) for k in RECORDED)
        and (out / rec.get("path", "")).is_file()
    )


__all__ = ["RecordStore", "image_relpath", "reusable", "write_atomic"]
