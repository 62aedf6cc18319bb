"""Prompt sources of an A/B run: the proving-ground suite, text files, GenEval metadata, PartiPrompts.

A source is one string (the CLI's ``--prompts``):

* ``pg:CATEGORIES``: the proving ground's held-out suite, ``pg:all`` or a comma-separated list of categories
  (``pg:single``, ``pg:position,counting``; see :data:`diffsteer.proving_ground.CATEGORIES`). Each prompt comes with
  its :class:`~diffsteer.proving_ground.PromptSpec`, so the exact verifier applies. Seeds are the suite's own held-out
  instance seeds (:func:`diffsteer.proving_ground.heldout_suite`, suite seed = the run's ``seed``): with ``K`` seeds per
  prompt, the suite of ``K x n_specs`` instances of a category holds every held-out spec exactly ``K`` times.
* a list of prompts (a JSON list in ``ABConfig``, e.g. what the HTTP service accepts), one prompt per item;
  blank items are skipped, like blank lines of a text file.
* a file, its format detected from its content (or forced with a ``text:``, ``geneval:`` or ``parti:``
  prefix):

  - **GenEval** ``evaluation_metadata.jsonl``: one JSON object per line with at least ``prompt`` (a string),
    ``tag`` (a string: the category) and ``include`` (a list); other keys are kept as they are.
  - **PartiPrompts** TSV: a header line ``Prompt<TAB>Category<TAB>Challenge<TAB>Note`` (``Prompt`` required,
    the others optional), then one prompt per line.
  - **plain text**: one prompt per line; blank lines are skipped.

  Seeds are ``seed, seed + 1, ..., seed + K - 1`` for every prompt (the same noise across prompts).

Repeated prompts in a file are kept once (their count is reported), since identical (prompt, seed) pairs
would be counted twice in the statistics. ``max_prompts`` keeps the first N prompts (per category for
``pg:``). Errors raise :class:`~diffsteer.guidance.errors.InvalidInput` with field ``prompts`` and, for files, the
offending line number.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffsteer.evaluation.runner import Item
from diffsteer.guidance.errors import InvalidInput
from diffsteer.proving_ground import CATEGORIES, heldout_suite, parse_caption
from diffsteer.proving_ground.prompts import heldout_prompt_specs

FIELD = "prompts"
FORMATS: tuple[str, ...] = ("text", "geneval", "parti")
ACCEPTED = "pg:all, pg:CATEGORY[,CATEGORY...], or a file: text (one prompt per line), GenEval evaluation_metadata.jsonl, PartiPrompts TSV"


@dataclass(frozen=True)
class PromptEntry:
    """One distinct prompt of a source; ``index`` is its position (it names the prompt's cluster and files)."""

    index: int
    text: str
    category: str | None = None
    spec: Any = None  # diffsteer.proving_ground.PromptSpec for pg: sources
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)

    @property
    def prompt_id(self) -> str:
        return f"p{self.index:04d}"

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_id": self.prompt_id,
            "index": self.index,
            "prompt": self.text,
            "category": self.category,
        }
        if self.spec is not None:
            out["spec"] = self.spec.to_dict()
        if self.extra:
            out["extra"] = self.extra
        return out


@dataclass
class PromptSet:
    """The prompts of a run and its items (prompt-major: every seed of prompt 0, then of prompt 1, ...)."""

    kind: str  # "pg", "text", "geneval" or "parti"
    source: str
    prompts: list[PromptEntry]
    items: list[Item]
    duplicates_dropped: int = 0

    @property
    def seeds_per_prompt(self) -> int:
        return len(self.items) // max(1, len(self.prompts))

    def describe(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "kind": self.kind,
            "n_prompts": len(self.prompts),
            "n_items": len(self.items),
            "seeds_per_prompt": self.seeds_per_prompt,
            "duplicates_dropped": self.duplicates_dropped,
        }


def load_prompts(
    source: str | Sequence[str], seeds: int = 1, seed: int = 0, max_prompts: int | None = None
) -> PromptSet:
    """Read a prompt source (module docstring) into prompts and (prompt, seed) items."""
    if seeds < 1:
        raise InvalidInput("seeds", f"must be at least 1, got {seeds}")
    if max_prompts is not None and max_prompts < 1:
        raise InvalidInput("max_prompts", f"must be at least 1, got {max_prompts}")
    if isinstance(source, Sequence) and not isinstance(source, str):
        return _inline(source, seeds, seed, max_prompts)
    if not isinstance(source, str) or not source.strip():
        raise InvalidInput(FIELD, f"empty; accepted: {ACCEPTED}")
    source = source.strip()
    if source.startswith("pg:"):
        return _proving_ground(source, seeds, seed, max_prompts)
    fmt, _, rest = source.partition(":")
    if fmt in FORMATS and rest:
        path = Path(rest).expanduser()
    else:
        fmt, path = "", Path(source).expanduser()
    if not path.is_file():
        what = "is a folder" if path.is_dir() else "does not exist"
        raise InvalidInput(FIELD, f"file {str(path)!r} {what}; accepted: {ACCEPTED}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise InvalidInput(FIELD, f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    lines = text.splitlines()
    fmt = fmt or detect_format(lines)
    if fmt == "geneval":
        entries = _geneval(lines, path)
    elif fmt == "parti":
        entries = _parti(lines, path)
    else:
        entries = [(lineno, line.strip(), None, {}) for lineno, line in enumerate(lines, 1) if line.strip()]
    return _file_prompt_set(fmt, source, entries, str(path), seeds, seed, max_prompts)


def _inline(texts: Sequence[str], seeds: int, seed: int, max_prompts: int | None) -> PromptSet:
    """A list of prompts, read like a text file whose lines are the items (``line`` is the 1-based position)."""
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise InvalidInput(f"{FIELD}.{k}", f"expected a string, got {type(text).__name__}")
    entries = [(k, text.strip(), None, {}) for k, text in enumerate(texts, 1) if text.strip()]
    return _file_prompt_set("text", "inline list", entries, "the prompt list", seeds, seed, max_prompts)


def detect_format(lines: list[str]) -> str:
    """``geneval`` if the first non-blank line is a JSON object, ``parti`` if it is a TSV header starting with
    ``Prompt``, else ``text``."""
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("{"):
        return "geneval"
    if "\t" in first and first.split("\t")[0].strip().lower() == "prompt":
        return "parti"
    return "text"


def _geneval(lines: list[str], path: Path) -> list[tuple[int, str, str | None, dict[str, Any]]]:
    entries = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InvalidInput(
                FIELD, f"{where}: not a JSON object (GenEval metadata format): {e.msg} at column {e.colno}"
            ) from None
        if not isinstance(row, dict):
            raise InvalidInput(
                FIELD, f"{where}: expected a JSON object with prompt, tag and include, got {type(row).__name__}"
            )
        missing = [k for k in ("prompt", "tag", "include") if k not in row]
        if missing:
            raise InvalidInput(
                FIELD, f"{where}: missing {', '.join(missing)} (GenEval lines need prompt, tag, include)"
            )
        if not isinstance(row["prompt"], str) or not row["prompt"].strip():
            raise InvalidInput(FIELD, f"{where}: prompt must be a non-empty string")
        if not isinstance(row["tag"], str):
            raise InvalidInput(FIELD, f"{where}: tag must be a string")
        if not isinstance(row["include"], list):
            raise InvalidInput(FIELD, f"{where}: include must be a list")
        extra = {k: v for k, v in row.items() if k not in ("prompt", "tag")}
        entries.append((lineno, row["prompt"].strip(), row["tag"], extra))
    return entries


def _parti(lines: list[str], path: Path) -> list[tuple[int, str, str | None, dict[str, Any]]]:
    rows = list(csv.reader(lines, delimiter="\t", quoting=csv.QUOTE_NONE))
    start = next((i for i, r in enumerate(rows) if any(c.strip() for c in r)), None)
    if start is None:
        return []
    header = [c.strip() for c in rows[start]]
    if not header or header[0].lower() != "prompt":
        raise InvalidInput(
            FIELD, f"{path}:{start + 1}: expected the PartiPrompts header Prompt<TAB>Category<TAB>Challenge<TAB>Note"
        )
    columns = {name.lower(): i for i, name in enumerate(header)}

    def cell(row: list[str], name: str) -> str | None:
        j = columns.get(name)
        return row[j].strip() if j is not None and j < len(row) and row[j].strip() else None

    entries = []
    for i in range(start + 1, len(rows)):
        row = rows[i]
        if not any(c.strip() for c in row):
            continue
        if len(row) > len(header):
            raise InvalidInput(FIELD, f"{path}:{i + 1}: {len(row)} tab-separated fields, the header has {len(header)}")
        prompt = row[0].strip()
        if not prompt:
            raise InvalidInput(FIELD, f"{path}:{i + 1}: empty Prompt field")
        extra = {k: v for k in ("challenge", "note") if (v := cell(row, k)) is not None}
        entries.append((i + 1, prompt, cell(row, "category"), extra))
    return entries


def _file_prompt_set(
    fmt: str,
    source: str,
    entries: list[tuple[int, str, str | None, dict[str, Any]]],
    where: str,
    seeds: int,
    seed: int,
    max_prompts: int | None,
) -> PromptSet:
    if not entries:
        raise InvalidInput(FIELD, f"{where}: no prompts found (format: {fmt})")
    seen: set[str] = set()
    prompts: list[PromptEntry] = []
    dropped = 0
    for lineno, text, category, extra in entries:
        if text in seen:
            dropped += 1
            continue
        seen.add(text)
        if max_prompts is None or len(prompts) < max_prompts:
            prompts.append(
                PromptEntry(len(prompts), text, category, proving_ground_spec(text), {"line": lineno, **extra})
            )
    items = [Item(p.text, seed + k, p.prompt_id, p) for p in prompts for k in range(seeds)]
    return PromptSet(fmt, source, prompts, items, dropped)


def proving_ground_spec(text: str):
    """The proving-ground PromptSpec of a caption of that world, or None (so the verifier applies to files
    whose prompts are proving-ground captions)."""
    try:
        return parse_caption(text)
    except (ValueError, KeyError):
        return None


def _proving_ground(source: str, seeds: int, seed: int, max_prompts: int | None) -> PromptSet:
    body = source[len("pg:") :].strip()
    names = [c.strip() for c in re.split(r"[,+]", body) if c.strip()]
    if not names:
        raise InvalidInput(FIELD, f"{source!r} names no category; accepted: pg:all or pg:{','.join(CATEGORIES)}")
    if "all" in names:
        names = list(CATEGORIES)
    unknown = [c for c in names if c not in CATEGORIES]
    if unknown:
        raise InvalidInput(
            FIELD, f"unknown proving-ground categories {unknown}; accepted: all, {', '.join(CATEGORIES)}"
        )
    prompts: list[PromptEntry] = []
    items: list[Item] = []
    for category in dict.fromkeys(names):
        n_specs = len(heldout_prompt_specs(category))
        suite = heldout_suite(category, seeds * n_specs, seed)
        # Instance i of the suite has spec number i % n_specs, so spec j appears at j, j + n_specs, ...
        for j in range(min(n_specs, max_prompts or n_specs)):
            first = suite[j]
            entry = PromptEntry(len(prompts), first.prompt, category, first.spec)
            prompts.append(entry)
            for k in range(seeds):
                inst = suite[j + k * n_specs]
                assert inst.spec == first.spec
                items.append(Item(inst.prompt, inst.seed, entry.prompt_id, entry))
    return PromptSet("pg", source, prompts, items)
