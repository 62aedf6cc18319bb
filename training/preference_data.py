"""Preference pairs in Pick-a-Pic v2's layout: streamed from parquet, JSONL or ``datasets`` Arrow folders.

Pick-a-Pic v2 (Kirstain et al. 2023, "Pick-a-Pic: An Open Dataset of User Preferences for Text-to-Image
Generation") stores one comparison per row::

    caption            the prompt (str)
    jpg_0, jpg_1       the two images: encoded image bytes (parquet, Arrow), ``datasets``' Image struct
                       {bytes, path}, or a path (str) relative to the file's folder (JSONL, or parquet written
                       with paths)
    label_0, label_1   the preference: 1/0 (image 0 preferred), 0/1 (image 1 preferred), 0.5/0.5 (a tie)

and further columns this loader carries along when present: per-image reward scores (``score_0``/``score_1``
by default; SmPO's preprocessed Pick-a-Pic calls them ``ps_score_0``/``ps_score_1``, pass their names; a score
may be a number or a one-element list, as SmPO's preprocessing writes ``ps_score_0: [0.21]``), the seeds the
images were sampled with (``seed_0``/``seed_1``) and the model names. Any other column is ignored, so the real
dataset's files load as they are.

**Streaming.** :func:`load_preference_pairs` never holds the table: it scans the small columns (caption, labels,
scores, seeds) batch by batch (parquet ``iter_batches``, Arrow record batches, JSONL lines), validates every row
and keeps only each row's label and scores as numpy arrays (24 bytes a row) and where each row lives. A pair's
images and caption are read when it is drawn (:meth:`PreferenceDataset.read_pairs`), by the
:class:`PairImages` dataset in ``torch.utils.data.DataLoader`` workers (:class:`PlannedBatches`), which also
decode and crop them. The sources:

- **parquet** (a file, or a folder of shards in name order): a drawn row's row group is read (the columns the
  pair needs) and the last few kept per worker; rows of one micro-batch in one row group are read together.
  Random access decodes a row group per pair at worst, so small row groups suit training
  (:func:`write_preference_pairs` writes 64 rows a group); for Pick-a-Pic's large groups an Arrow folder is the
  faster form.
- **an Arrow folder** written by ``datasets``' ``Dataset.save_to_disk`` (``state.json``, ``dataset_info.json``
  and ``data-XXXXX-of-XXXXX.arrow`` Arrow IPC *stream* files; what SmPO's preprocessing produces): read with
  pyarrow alone (``datasets`` is not needed), the files memory-mapped, so a drawn row costs its own bytes only.
  A ``DatasetDict`` folder (``dataset_dict.json``) is refused naming its splits: point ``data`` at one.
- **JSONL**: the byte offset of each line is kept, the line read again when drawn.

Bad files raise :class:`~diffsteer.guidance.errors.InvalidInput` naming the file, the row and the field: the
small columns when the dataset is opened, an image when its pair is read.
"""

from __future__ import annotations

import io
import json
import math
import os
import signal
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from diffsteer.guidance.errors import InvalidInput

REQUIRED = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")
IMAGE_COLUMNS = ("jpg_0", "jpg_1")
SEED_COLUMNS = ("seed_0", "seed_1")
DEFAULT_SCORE_FIELDS = ("score_0", "score_1")
LABELS = (0.0, 0.5, 1.0)
FORMATS = (".parquet", ".jsonl")
SCAN_ROWS = 1024  # rows per batch of the opening scan (small columns only)
WRITE_ROW_GROUP = 64  # rows per parquet row group written here: one random access decodes this many pairs
CACHED_CHUNKS = 4  # decoded parquet row groups kept per process


@dataclass(frozen=True)
class PreferencePair:
    """One row: a caption, two images (bytes or an absolute path), image 0's label, optional scores and seeds.
    ``row`` is the row's position in its file, ``index`` its position in the dataset."""

    row: int
    caption: str
    image_0: bytes | Path
    image_1: bytes | Path
    label_0: float  # 1: image 0 preferred, 0: image 1, 0.5: a tie (label_1 = 1 - label_0)
    score_0: float | None = None
    score_1: float | None = None
    seed_0: int | None = None
    seed_1: int | None = None
    index: int | None = None

    def images(self):
        """The two images as RGB PIL images."""
        return read_image(self.image_0), read_image(self.image_1)


def read_image(source: bytes | Path):
    image = Image.open(io.BytesIO(source) if isinstance(source, bytes) else source)
    return image.convert("RGB")


# ---------------------------------------------------------------------------------------------- row checks


def _image(value: Any, base: Path, where: str) -> bytes | Path:
    if isinstance(value, (bytes, bytearray)):
        if not value:
            raise InvalidInput(where, "empty image bytes")
        return bytes(value)
    if isinstance(value, dict):  # datasets' Image feature: {"bytes": ..., "path": ...}
        if isinstance(value.get("bytes"), (bytes, bytearray)) and value["bytes"]:
            return bytes(value["bytes"])
        value = value.get("path")
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


def _score(value: Any, where: str) -> float:
    """A score: a number, or a one-element list of one (SmPO's preprocessing writes ``[0.21]``)."""
    if isinstance(value, (list, tuple, np.ndarray)):
        if len(value) != 1:
            raise InvalidInput(where, f"expected a number or a one-element list, got a list of {len(value)}")
        value = value[0]
    return _number(value, where)


def _seed(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(where, f"expected a non-negative integer seed, got {value!r}")
    return value


def _where(source: str, index: int, name: str) -> str:
    return f"{source} row {index}: {name}"


def check_fields(
    row: dict[str, Any], index: int, source: str, score_fields: tuple[str, str]
) -> tuple[float, float | None, float | None]:
    """Every field of a row but its images, checked; returns (label_0, score_0, score_1). Images need only be
    present (not None) in ``row``."""
    missing = [k for k in REQUIRED if row.get(k) is None]
    if missing:
        raise InvalidInput(_where(source, index, missing[0]), f"missing; every row needs {', '.join(REQUIRED)}")
    caption = row["caption"]
    if not isinstance(caption, str) or not caption.strip():
        raise InvalidInput(_where(source, index, "caption"), f"expected a non-empty string, got {caption!r}")
    label_0 = _number(row["label_0"], _where(source, index, "label_0"))
    label_1 = _number(row["label_1"], _where(source, index, "label_1"))
    for name, value in (("label_0", label_0), ("label_1", label_1)):
        if value not in LABELS:
            raise InvalidInput(_where(source, index, name), f"must be 0, 0.5 or 1, got {value:g}")
    if label_0 + label_1 != 1.0:
        raise InvalidInput(
            _where(source, index, "label_1"), f"label_0 + label_1 must be 1, got {label_0:g} + {label_1:g}"
        )
    scores: list[Any] = [row.get(f) for f in score_fields]
    if (scores[0] is None) != (scores[1] is None):
        absent = score_fields[0] if scores[0] is None else score_fields[1]
        raise InvalidInput(
            _where(source, index, absent), "missing while the other image's score is present (give both or neither)"
        )
    if scores[0] is not None:
        scores = [_score(s, _where(source, index, f)) for s, f in zip(scores, score_fields)]
    for name in SEED_COLUMNS:
        _seed(row.get(name), _where(source, index, name))
    return label_0, scores[0], scores[1]


def parse_row(
    row: dict[str, Any], index: int, base: Path, source: str, score_fields: tuple[str, str] = DEFAULT_SCORE_FIELDS
) -> PreferencePair:
    """One validated :class:`PreferencePair` from a row mapping (``index`` and ``source`` name it in errors)."""
    label_0, score_0, score_1 = check_fields(row, index, source, score_fields)
    return PreferencePair(
        row=index,
        caption=row["caption"],
        image_0=_image(row["jpg_0"], base, _where(source, index, "jpg_0")),
        image_1=_image(row["jpg_1"], base, _where(source, index, "jpg_1")),
        label_0=label_0,
        score_0=score_0,
        score_1=score_1,
        seed_0=row.get("seed_0"),
        seed_1=row.get("seed_1"),
    )


# ---------------------------------------------------------------------------------------------- sources


class _Source:
    """One file of rows: ``num_rows``, a scan of some columns in batches, and random reads of whole rows. Open
    handles are dropped when pickled (DataLoader workers reopen them)."""

    path: Path
    num_rows: int
    columns: tuple[str, ...]

    def scan(self, columns: Sequence[str]) -> Iterator[dict[str, list]]:
        raise NotImplementedError

    def read(self, rows: Sequence[int]) -> list[dict[str, Any]]:
        raise NotImplementedError

    def image_nulls(self) -> dict[str, int]:
        """column -> the first row whose image is null, where the format tells without reading the images."""
        return {}

    def __getstate__(self) -> dict[str, Any]:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}


class _ParquetSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        meta = self._file().metadata
        self.num_rows = meta.num_rows
        self.columns = tuple(self._file().schema_arrow.names)
        sizes = [meta.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.group_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _file(self):
        if getattr(self, "_handle", None) is None:
            import pyarrow.parquet as pq

            try:
                self._handle = pq.ParquetFile(self.path)
            except Exception as e:  # pyarrow raises several types for a damaged file
                raise InvalidInput(str(self.path), f"not a readable parquet file ({e})") from None
            self._groups: OrderedDict[int, Any] = OrderedDict()
        return self._handle

    def scan(self, columns):
        wanted = [c for c in columns if c in self.columns]
        for batch in self._file().iter_batches(batch_size=SCAN_ROWS, columns=wanted):
            yield batch.to_pydict()

    def _group(self, g: int):
        handle = self._file()
        if g not in self._groups:
            self._groups[g] = handle.read_row_group(g)
            while len(self._groups) > CACHED_CHUNKS:
                self._groups.popitem(last=False)
        self._groups.move_to_end(g)
        return self._groups[g]

    def read(self, rows):
        groups = np.searchsorted(self.group_starts, rows, side="right") - 1
        return [
            self._group(int(g)).slice(int(r - self.group_starts[g]), 1).to_pylist()[0] for r, g in zip(rows, groups)
        ]

    def image_nulls(self):
        meta, out = self._file().metadata, {}
        for name in IMAGE_COLUMNS:
            if name not in self.columns:
                continue
            j = self.columns.index(name)
            for g in range(meta.num_row_groups):
                column = meta.row_group(g).column(j)
                stats = column.statistics if column.is_stats_set else None
                if stats is not None and stats.has_null_count and stats.null_count:
                    out[name] = int(self.group_starts[g])  # the group's first row; the read names the exact one
                    break
        return out


class _ArrowStreamSource(_Source):
    """One Arrow IPC stream file of a ``datasets`` folder, memory-mapped: its record batches are views of the
    file, so holding them costs no memory and reading a row touches only that row's bytes."""

    def __init__(self, path: Path):
        self.path = path
        batches = self._batches()
        self.columns = tuple(batches[0].schema.names) if batches else ()
        sizes = [b.num_rows for b in batches]
        self.num_rows = int(sum(sizes))
        self.batch_starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

    def _batches(self) -> list[Any]:
        if getattr(self, "_views", None) is None:
            import pyarrow as pa

            try:
                source = pa.memory_map(str(self.path))
                try:
                    reader = pa.ipc.open_stream(source)
                except pa.ArrowInvalid:  # an IPC file (with a footer) rather than a stream
                    reader = pa.ipc.open_file(source)
                    self._views = [reader.get_batch(i) for i in range(reader.num_record_batches)]
                else:
                    self._views = list(reader)
            except (OSError, pa.ArrowException) as e:
                raise InvalidInput(str(self.path), f"not a readable Arrow file ({e})") from None
        return self._views

    def scan(self, columns):
        for batch in self._batches():
            yield {c: batch.column(c).to_pylist() for c in columns if c in self.columns}

    def read(self, rows):
        batches = self._batches()
        index = np.searchsorted(self.batch_starts, rows, side="right") - 1
        return [batches[b].slice(int(r - self.batch_starts[b]), 1).to_pylist()[0] for r, b in zip(rows, index)]

    def image_nulls(self):
        out = {}
        for name in IMAGE_COLUMNS:
            if name not in self.columns:
                continue
            for b, batch in enumerate(self._batches()):
                column = batch.column(name)
                if column.null_count:  # the validity bitmap only
                    out[name] = int(self.batch_starts[b]) + int(np.argmax(~column.is_valid().to_numpy(False)))
                    break
        return out


class _JsonlSource(_Source):
    def __init__(self, path: Path):
        self.path = path
        offsets, rows = [], []
        position = 0
        with path.open("rb") as f:
            for number, line in enumerate(f, start=1):
                if line.strip():
                    offsets.append(position)
                    rows.append(number)
                position += len(line)
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.line_numbers = np.asarray(rows, dtype=np.int64)
        self.num_rows = len(offsets)
        self.columns = ()  # per row

    def _line(self, f, i: int) -> dict[str, Any]:
        f.seek(int(self.offsets[i]))
        where = f"{self.path} line {int(self.line_numbers[i])}"
        try:
            row = json.loads(f.readline())
        except json.JSONDecodeError as e:
            raise InvalidInput(where, f"not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise InvalidInput(where, "expected a JSON object per line")
        return row

    def scan(self, columns):
        with self.path.open("rb") as f:
            for start in range(0, self.num_rows, SCAN_ROWS):
                rows = [self._line(f, i) for i in range(start, min(start + SCAN_ROWS, self.num_rows))]
                yield {c: [r.get(c) for r in rows] for c in columns}

    def read(self, rows):
        with self.path.open("rb") as f:
            return [self._line(f, int(i)) for i in rows]


def _sources(root: Path, field: str) -> list[_Source]:
    if root.is_dir():
        if (root / "dataset_dict.json").is_file():
            try:
                splits = json.loads((root / "dataset_dict.json").read_text()).get("splits", [])
            except (json.JSONDecodeError, AttributeError):
                splits = []
            raise InvalidInput(
                field,
                f"{str(root)!r} is a datasets DatasetDict (splits: {', '.join(map(str, splits)) or 'none listed'}); "
                f"point {field} at one split's folder, e.g. {str(root / (splits[0] if splits else 'train'))!r}",
            )
        arrow = _arrow_files(root)
        if arrow:
            return [_ArrowStreamSource(p) for p in arrow]
        files = sorted(p for p in root.iterdir() if p.suffix in FORMATS)
        if not files:
            raise InvalidInput(
                field, f"{str(root)!r} holds no {' or '.join(FORMATS)} file and is no datasets Arrow folder"
            )
    elif root.is_file():
        if root.suffix not in FORMATS:
            raise InvalidInput(field, f"{str(root)!r}: expected a {' or '.join(FORMATS)} file or a datasets folder")
        files = [root]
    else:
        raise InvalidInput(field, f"{str(root)!r} does not exist")
    return [_ParquetSource(f) if f.suffix == ".parquet" else _JsonlSource(f) for f in files]


def _arrow_files(root: Path) -> list[Path]:
    """The data files of a ``datasets`` save_to_disk folder, in ``state.json``'s order (else name order)."""
    state = root / "state.json"
    if state.is_file():
        try:
            names = [d["filename"] for d in json.loads(state.read_text())["_data_files"]]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise InvalidInput(str(state), f"not a datasets state file ({e})") from None
        missing = [n for n in names if not (root / n).is_file()]
        if missing:
            raise InvalidInput(str(state), f"lists {missing[0]!r}, which is not in the folder")
        return [root / n for n in names]
    return sorted(root.glob("data-*.arrow"))


# ---------------------------------------------------------------------------------------------- the dataset


@dataclass
class PreferenceDataset:
    """The rows of one or more files: per-row labels and scores in memory, everything else read on demand."""

    path: Path
    score_fields: tuple[str, str]
    sources: list[_Source]
    starts: np.ndarray  # [files + 1]: the first dataset index of each file
    label_0: np.ndarray  # [N] float64
    scores: np.ndarray | None  # [N, 2] float64, or None where the rows carry none

    def __len__(self) -> int:
        return int(self.starts[-1])

    @property
    def has_scores(self) -> bool:
        return self.scores is not None

    def score_range(self) -> tuple[float, float]:
        """The smallest and largest score of any image (SmPO's normalisation bounds when none are configured)."""
        if self.scores is None:
            raise InvalidInput(self.score_fields[0], f"{self.path}: the rows carry no reward scores")
        return float(self.scores.min()), float(self.scores.max())

    def read_pairs(self, indices: Sequence[int]) -> list[PreferencePair]:
        """The pairs at dataset ``indices`` (images as bytes or paths, not decoded), rows of one file read together."""
        indices = np.asarray(indices, dtype=np.int64)
        if len(indices) and (indices.min() < 0 or indices.max() >= len(self)):
            raise IndexError(f"pair index out of range 0..{len(self) - 1}")
        files = np.searchsorted(self.starts, indices, side="right") - 1
        out: list[PreferencePair | None] = [None] * len(indices)
        for f in np.unique(files):
            at = np.flatnonzero(files == f)
            source = self.sources[int(f)]
            rows = indices[at] - self.starts[f]
            for k, row, raw in zip(at, rows, source.read(rows)):
                pair = parse_row(raw, int(row), source.path.parent, str(source.path), self.score_fields)
                out[k] = _with_index(pair, int(indices[k]))
        return out  # type: ignore[return-value]

    def iter_pairs(self, batch: int = 256) -> Iterator[PreferencePair]:
        """Every pair in order, read ``batch`` rows at a time."""
        for start in range(0, len(self), batch):
            yield from self.read_pairs(range(start, min(start + batch, len(self))))


def _with_index(pair: PreferencePair, index: int) -> PreferencePair:
    return PreferencePair(**{**pair.__dict__, "index": index})


def load_preference_pairs(
    path: str | Path, score_fields: Sequence[str] = DEFAULT_SCORE_FIELDS, field: str = "data"
) -> PreferenceDataset:
    """Open a Pick-a-Pic-layout ``.parquet`` or ``.jsonl`` file, a folder of them (in name order), or a ``datasets``
    Arrow folder: every row's small fields are checked and its label and scores kept (see the module docstring)."""
    root = Path(path).expanduser()
    if len(score_fields) != 2 or not all(isinstance(f, str) and f for f in score_fields):
        raise InvalidInput("score_fields", f"expected two column names, got {list(score_fields)!r}")
    score_fields = (score_fields[0], score_fields[1])
    sources = _sources(root, field)
    columns = ("caption", "label_0", "label_1", *score_fields, *SEED_COLUMNS)
    labels: list[np.ndarray] = []
    scores: list[np.ndarray | None] = []
    for source in sources:
        if source.columns:  # a columnar file: a missing column is missing from row 0 on
            for name in REQUIRED:
                if name not in source.columns and source.num_rows:
                    raise InvalidInput(
                        _where(str(source.path), 0, name), f"missing; every row needs {', '.join(REQUIRED)}"
                    )
            for name, row in source.image_nulls().items():
                raise InvalidInput(
                    _where(str(source.path), row, name), f"missing; every row needs {', '.join(REQUIRED)}"
                )
        file_labels = np.empty(source.num_rows)
        file_scores = np.empty((source.num_rows, 2))
        scored = np.zeros(source.num_rows, dtype=bool)
        row = 0
        for batch in source.scan(columns if source.columns else (*columns, *IMAGE_COLUMNS)):
            n = len(next(iter(batch.values()))) if batch else 0
            for i in range(n):
                values = {c: v[i] for c, v in batch.items()}
                if source.columns:
                    values.update({c: True for c in IMAGE_COLUMNS})  # present (nulls checked above)
                else:
                    parse_row(values, row, source.path.parent, str(source.path), score_fields)  # JSONL: images too
                label, s0, s1 = check_fields(values, row, str(source.path), score_fields)
                file_labels[row] = label
                if s0 is not None:
                    file_scores[row] = (s0, s1)
                    scored[row] = True
                row += 1
        labels.append(file_labels)
        scores.append(file_scores if scored.all() else None)
    starts = np.concatenate([[0], np.cumsum([s.num_rows for s in sources])]).astype(np.int64)
    if starts[-1] == 0:
        raise InvalidInput(field, f"{str(root)!r} holds no rows")
    all_scored = all(s is not None for s in scores)
    return PreferenceDataset(
        root,
        score_fields,
        sources,
        starts,
        np.concatenate(labels),
        np.concatenate(scores) if all_scored else None,  # type: ignore[arg-type]
    )


def write_preference_pairs(path: str | Path, rows: Sequence[dict[str, Any]]) -> Path:
    """Write rows in the layout above: ``.parquet`` (image bytes inline, :data:`WRITE_ROW_GROUP` rows a row group)
    or ``.jsonl`` (image bytes written to ``<stem>-images/`` beside it, the rows holding relative paths). Written to
    a temporary name, then renamed."""
    path = Path(path)
    if path.suffix not in FORMATS:
        raise InvalidInput("--output", f"must end in {' or '.join(FORMATS)}, got {str(path)!r}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    if path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(list(rows)), tmp, row_group_size=WRITE_ROW_GROUP)
    else:
        folder = path.with_name(f"{path.stem}-images")
        folder.mkdir(exist_ok=True)
        with tmp.open("w", encoding="utf-8") as f:
            for i, row in enumerate(rows):
                row = dict(row)
                for key in IMAGE_COLUMNS:
                    if isinstance(row[key], bytes):
                        name = f"{i:06d}_{key[-1]}.png"
                        (folder / name).write_bytes(row[key])
                        row[key] = f"{folder.name}/{name}"
                f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------------------------- decoding in workers


def image_tensor(image, size: tuple[int, int], flip: bool = False) -> torch.Tensor:
    """PIL image -> [3, H, W] in [0, 1]: the shorter side resized to fit, centre-cropped to ``size`` (h, w), and
    mirrored left to right where ``flip``."""
    h, w = size
    scale = max(h / image.height, w / image.width)
    if (image.height, image.width) != (h, w):
        image = image.resize((max(w, round(image.width * scale)), max(h, round(image.height * scale))), Image.BICUBIC)
        top, left = (image.height - h) // 2, (image.width - w) // 2
        image = image.crop((left, top, left + w, top + h))
    array = np.asarray(image, dtype=np.float32) / 255.0
    if flip:
        array = array[:, ::-1]
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


@dataclass(frozen=True)
class DecodedPair:
    index: int
    caption: str
    pixels_0: torch.Tensor  # [3, H, W] in [0, 1]
    pixels_1: torch.Tensor
    flipped: bool


class PairImages(torch.utils.data.Dataset):
    """A map-style dataset over (dataset index, flip) items: the pair read, both images decoded, cropped to
    ``size`` and, where flip is set, both mirrored (the same flip for the two images of a pair)."""

    def __init__(self, dataset: PreferenceDataset, size: tuple[int, int]):
        self.dataset = dataset
        self.size = size

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, bool]) -> DecodedPair:
        return self.__getitems__([item])[0]

    def __getitems__(self, items: Sequence[tuple[int, bool]]) -> list[DecodedPair]:
        pairs = self.dataset.read_pairs([i for i, _ in items])
        out = []
        for pair, (index, flip) in zip(pairs, items):
            a, b = pair.images()
            out.append(
                DecodedPair(
                    int(index), pair.caption, image_tensor(a, self.size, flip), image_tensor(b, self.size, flip), flip
                )
            )
        return out


def _keep_list(batch: list[DecodedPair]) -> list[DecodedPair]:
    return batch


def _ignore_interrupts(worker_id: int) -> None:
    """A worker leaves Ctrl-C to the training process, which stops after the step with a checkpoint and then shuts
    the workers down (a worker ending on the terminal's SIGINT would leave a micro-batch of that step unread)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class PlannedBatches:
    """Micro-batches decoded ahead in DataLoader workers, in the order a plan gives them.

    ``plan(step, micro)`` is the list of (dataset index, flip) items of that micro-batch (a pure function of the
    step, e.g. from :meth:`diffsteer.training.trainer.Trainer.epoch_indices`). :meth:`get` returns micro-batch
    (``step``, ``micro``); asked for another one than the next of the plan (the first call, a resume, a test
    drawing a batch twice) it starts over from there. ``workers`` 0 decodes in the calling process. Which
    worker decodes a batch does not change it: every random choice is in the plan."""

    def __init__(
        self,
        images: PairImages,
        plan: Callable[[int, int], list[tuple[int, bool]]],
        accumulation: int,
        last_step: int,
        workers: int = 0,
    ):
        self.images, self.plan, self.accumulation, self.last_step, self.workers = (
            images,
            plan,
            accumulation,
            last_step,
            workers,
        )
        self._iterator: Iterator[list[DecodedPair]] | None = None
        self._next: tuple[int, int] | None = None

    def _keys(self, step: int, micro: int) -> Iterator[tuple[int, int]]:
        """(step, micro) from the given one to the end of the run (at least that one)."""
        end = max(self.last_step, step + 1)
        while step < end:
            yield step, micro
            micro += 1
            if micro == self.accumulation:
                step, micro = step + 1, 0

    def _restart(self, step: int, micro: int) -> None:
        self.close()
        if self.workers == 0:
            self._iterator = (self.images.__getitems__(self.plan(s, m)) for s, m in self._keys(step, micro))
            return
        loader = torch.utils.data.DataLoader(
            self.images,
            batch_sampler=_PlanSampler(self.plan, list(self._keys(step, micro))),
            num_workers=self.workers,
            collate_fn=_keep_list,
            worker_init_fn=_ignore_interrupts,
        )
        self._iterator = iter(loader)

    def get(self, step: int, micro: int) -> list[DecodedPair]:
        if self._iterator is None or self._next != (step, micro):
            self._restart(step, micro)
        batch = next(self._iterator)
        self._next = (step, micro + 1) if micro + 1 < self.accumulation else (step + 1, 0)
        return batch

    def close(self) -> None:
        """Stop the workers (a later :meth:`get` starts them again)."""
        iterator, self._iterator, self._next = self._iterator, None, None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class _PlanSampler(torch.utils.data.Sampler):
    """The plan's micro-batches as a batch sampler (iterated in the main process; the items go to the workers)."""

    def __init__(self, plan: Callable[[int, int], list[tuple[int, bool]]], keys: list[tuple[int, int]]):
        self.plan, self.keys = plan, keys

    def __iter__(self):
        for step, micro in self.keys:
            yield self.plan(step, micro)

    def __len__(self) -> int:
        return len(self.keys)
