"""Preference pairs in Pick-a-Pic v2's layout: reading and writing parquet or JSONL files.

Pick-a-Pic v2 (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation") stores one comparison per row::

    caption            the prompt (str)
    jpg_0, jpg_1       the two images: encoded image bytes (parquet) or, here also, a path (str) relative to
                       the file's folder (JSONL, or parquet written with paths)
    label_0, label_1   the preference: 1/0 (image 0 preferred), 0/1 (image 1 preferred), 0.5/0.5 (a tie)

and further columns this loader carries along when present: per-image reward scores (``score_0``/``score_1``
by default; SmPO's preprocessed Pick-a-Pic calls them ``ps_score_0``/``ps_score_1``, pass their names), the
seeds the images were sampled with (``seed_0``/``seed_1``) and the model names (``model_0``/``model_1``).
Any other column is ignored, so the real dataset's files load as they are.

Bad files raise :class:`~diffsteer.guidance.errors.InvalidInput` naming the file, the row and the field.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from diffsteer.guidance.errors import InvalidInput

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
DEFAULT_SCORE_FIELDS = ("score_0", "score_1")
LABELS = (0.0, 0.5, 1.0)
FORMATS = (".parquet", ".jsonl")


@dataclass(frozen=True)
class PreferencePair:
    """One row: a caption, two images (bytes or an absolute path), image 0's label, optional scores and seeds."""

    row: int
    caption: str
    image_0: bytes | Path
    image_1: bytes | Path
    label_0: float  # 1: image 0 preferred, 0: image 1, 0.5: a tie (label_1 = 1 - label_0)
    score_0: float | None = None
    score_1: float | None = None
    seed_0: int | None = None
    seed_1: int | None = None

    def images(self):
        """The two images as RGB PIL images."""
        return read_image(self.image_0), read_image(self.image_1)


@dataclass(frozen=True)
class PreferenceDataset:
    path: Path
    pairs: list[PreferencePair]
    score_fields: tuple[str, str]

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def has_scores(self) -> bool:
        return bool(self.pairs) and all(p.score_0 is not None for p in self.pairs)

    def score_range(self) -> tuple[float, float]:
        """The smallest and largest score of any image (SmPO's normalisation bounds when none are configured)."""
        if not self.has_scores:
            raise InvalidInput(self.score_fields[0], f"{self.path}: the rows carry no reward scores")
        values = [s for p in self.pairs for s in (p.score_0, p.score_1)]
        return min(values), max(values)


def read_image(source: bytes | Path):
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return image.convert("RGB")


def _rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines()):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InvalidInput(f"{path} line {i + 1}", f"not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InvalidInput(f"{path} line {i + 1}", "expected a JSON object per line")
            rows.append(row)
        return rows
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged file
        raise InvalidInput(str(path), f"not a readable parquet file ({e})") from None
    return table.to_pylist()


def _image(value: Any, base: Path, where: str) -> bytes | Path:
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise InvalidInput(where, "empty image bytes")
        return bytes(value)
    if isinstance(value, dict) and isinstance(value.get("bytes"), (bytes, bytearray)):  # datasets' Image feature
        return bytes(value["bytes"])
    if isinstance(value, str) and value:
        file = Path(value) if Path(value).is_absolute() else base / value
        if not file.is_file():
            raise InvalidInput(where, f"image file {str(file)!r} does not exist")
        return file
    raise InvalidInput(where, f"expected image bytes or a path to an image file, got {type(value).__name__}")


def _number(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidInput(where, f"expected a finite number, got {value!r}")
    return float(value)


def _seed(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(where, f"expected a non-negative integer seed, got {value!r}")
    return value


def parse_row(
    row: dict[str, Any], index: int, base: Path, source: str, score_fields: tuple[str, str] = DEFAULT_SCORE_FIELDS
) -> PreferencePair:
    """One validated :class:`PreferencePair` from a row mapping (``index`` and ``source`` name it in errors)."""

    def where(name: str) -> str:
        return f"{source} row {index}: {name}"

    missing = [k for k in REQUIRED if row.get(k) is None]
    if missing:
        raise InvalidInput(where(missing[0]), f"missing; every row needs {', '.join(REQUIRED)}")
    caption = row["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise InvalidInput(where("caption"), f"expected a non-empty string, got {caption!r}")
    label_0, label_1 = _number(row["label_0"], where("label_0")), _number(row["label_1"], where("label_1"))
    for name, value in (("label_0", label_0), ("label_1", label_1)):
        if value not in LABELS:
            raise InvalidInput(where(name), f"must be 0, 0.5 or 1, got {value:g}")
    if label_0 + label_1 != 1.0:
        raise InvalidInput(where("label_1"), f"label_0 + label_1 must be 1, got {label_0:g} + {label_1:g}")
    scores: list[float | None] = [row.get(f) for f in score_fields]
    if (scores[0] is None) != (scores[1] is None):
        absent = score_fields[0] if scores[0] is None else score_fields[1]
        raise InvalidInput(where(absent), "missing while the other image's score is present (give both or neither)")
    if scores[0] is not None:
        scores = [_number(s, where(f)) for s, f in zip(scores, score_fields)]
    return PreferencePair(
        row=index,
        caption=caption,
        image_0=_image(row["jpg_0"], base, where("jpg_0")),
        image_1=_image(row["jpg_1"], base, where("jpg_1")),
        label_0=label_0,
        score_0=scores[0],
        score_1=scores[1],
        seed_0=_seed(row.get("seed_0"), where("seed_0")),
        seed_1=_seed(row.get("seed_1"), where("seed_1")),
    )


def load_preference_pairs(
    path: str | Path, score_fields: Sequence[str] = DEFAULT_SCORE_FIELDS, field: str = "data"
) -> PreferenceDataset:
    """Every row of a Pick-a-Pic-layout ``.parquet`` or ``.jsonl`` file (or a folder of them, in name order)."""
    root = Path(path).expanduser()
    if len(score_fields) != 2 or not all(isinstance(f, str) and f for f in score_fields):
        raise InvalidInput("score_fields", f"expected two column names, got {list(score_fields)!r}")
    if root.is_dir():
        files = sorted(p for p in root.iterdir() if p.suffix in FORMATS)
        if not files:
            raise InvalidInput(field, f"{str(root)!r} holds no {' or '.join(FORMATS)} file")
    elif root.is_file():
        if root.suffix not in FORMATS:
            raise InvalidInput(field, f"{str(root)!r}: expected a {' or '.join(FORMATS)} file")
        files = [root]
    else:
        raise InvalidInput(field, f"{str(root)!r} does not exist")
    pairs: list[PreferencePair] = []
    for file in files:
        for i, row in enumerate(_rows(file)):
            pairs.append(parse_row(row, i, file.parent, str(file), tuple(score_fields)))
    if not pairs:
        raise InvalidInput(field, f"{str(root)!r} holds no rows")
    return PreferenceDataset(root, pairs, tuple(score_fields))


def write_preference_pairs(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows in the layout above: ``.parquet`` (image bytes inline) or ``.jsonl`` (image bytes written to
    ``<stem>-images/`` beside it, the rows holding relative paths). Written to a temporary name, then renamed."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise InvalidInput("--output", f"must end in {' or '.join(FORMATS)}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), tmp)
    else:
        folder = path.with_name(f"{path.stem}-images")
        folder.mkdir(exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                row = dict(row)
                for key in ("jpg_0", "jpg_1"):
                    if isinstance(row[key], bytes):
                        name = f"{i:06d}_{key[-1]}.png"
                        (folder / name).write_bytes(row[key])
                        row[key] = f"{folder.name}/{name}"
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path
