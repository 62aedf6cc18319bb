"""Peak memory of the streaming preference loader (training/preference_data.py) on a file of 20,000 pairs against
one of 2,000: the ratio should be about 1 (flat in the number of pairs).

Synthetic Pick-a-Pic-layout data (distinct random-noise JPEGs, captions, labels, one-element-list scores as SmPO's
preprocessing writes them) is written once as a parquet file (``write_preference_pairs``: 64 rows a row group)
and as a ``datasets`` save_to_disk-style Arrow folder (IPC stream shards, 1,000 rows a record batch), at both
sizes. Each measurement runs in a fresh process: import everything, note the peak resident set (``VmHWM``), then
open the data (the scan of every row's small columns) and decode ``--batches`` random micro-batches of
``--batch`` pairs at 64x64 through :class:`~diffsteer.training.preference_data.PlannedBatches` (in-process, so the
decode counts too), and report the peak above the noted one. A control row reads the parquet file the way the
loader did before streaming (``pq.read_table(...).to_pylist()``), which grows with the file.

Memory-mapped Arrow pages a process has touched count in its resident set although they are file cache the
kernel can drop (and Linux maps the cached neighbours of each touched page too, so random reads of a freshly
written file map most of it); the rows therefore also report the anonymous memory (``RssAnon``, sampled after
opening and after every micro-batch): what the process itself allocates.

    python benchmarks/preference_data_memory.py                     # 2,000 and 20,000 pairs
    python benchmarks/preference_data_memory.py --small 1000 --large 10000 --batches 100
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name == key:
            return int(value.split()[0])
    raise KeyError(key)


def synthetic_rows(n: int, seed: int = 0) -> list[dict]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        images = []
        for _ in range(2):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
            images.append(buf.getvalue())
        label = float(rng.integers(2))
        rows.append(
            {
                "caption": f"a photo of thing number {i} on a table",
                "jpg_0": images[0],
                "jpg_1": images[1],
                "label_0": label,
                "label_1": 1.0 - label,
                "ps_score_0": [float(rng.random())],
                "ps_score_1": [float(rng.random())],
            }
        )
    return rows


def write_arrow_folder(folder: Path, rows: list[dict], rows_per_shard: int = 5000, batch_rows: int = 1000) -> Path:
    """A folder as ``datasets``' save_to_disk lays it out (written with pyarrow: ``datasets`` is not a dependency)."""
    import pyarrow as pa

    folder.mkdir(parents=True)
    shards = -(-len(rows) // rows_per_shard)
    names = []
    for k in range(shards):
        table = pa.Table.from_pylist(rows[k * rows_per_shard : (k + 1) * rows_per_shard])
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in table.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": n} for n in names]}))
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def child(args: argparse.Namespace) -> None:
    """One measurement in this process: prints a JSON line."""
    import pyarrow.parquet as pq
    import torch  # noqa: F401 (imported before the baseline, as the trainer has it)

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffsteer.training.preference_data import PairImages, PlannedBatches, load_preference_pairs

    base, anon_base = status_kib("VmHWM"), status_kib("RssAnon")
    anon_peak = anon_base
    t0 = time.perf_counter()
    if args.mode == "whole-table":
        rows = pq.read_table(args.path).to_pylist()
        pairs = len(rows)
        anon_peak = max(anon_peak, status_kib("RssAnon"))
    else:
        data = load_preference_pairs(args.path, score_fields=("ps_score_0", "ps_score_1"))
        pairs = len(data)
        anon_peak = max(anon_peak, status_kib("RssAnon"))
        rng = np.random.default_rng(0)

        def plan(step: int, micro: int) -> list[tuple[int, bool]]:
            picks = np.random.default_rng([step, micro]).integers(0, pairs, args.batch)
            return [(int(i), bool(f)) for i, f in zip(picks, rng.integers(0, 2, args.batch))]

        batches = PlannedBatches(PairImages(data, (64, 64)), plan, 1, args.batches, workers=0)
        for step in range(args.batches):
            batches.get(step, 0)
            anon_peak = max(anon_peak, status_kib("RssAnon"))
    seconds = time.perf_counter() - t0
    print(
        json.dumps(
            {
                "pairs": pairs,
                "peak_above_imports_mib": (status_kib("VmHWM") - base) / 1024,
                "anon_peak_above_imports_mib": (anon_peak - anon_base) / 1024,
                "seconds": seconds,
            }
        )
    )


def measure(mode: str, path: Path, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--child", mode, str(path), "--batches", str(args.batches)]
    cmd += ["--batch", str(args.batch)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--small", type=int, default=2000, help="pairs in the small file")
    ap.add_argument("--large", type=int, default=20000, help="pairs in the large file")
    ap.add_argument("--batches", type=int, default=200, help="random micro-batches decoded after opening")
    ap.add_argument("--batch", type=int, default=8, help="pairs per micro-batch")
    ap.add_argument("--dir", default=None, help="where the synthetic files go (default: a temporary folder)")
    ap.add_argument("--child", nargs=2, metavar=("MODE", "PATH"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        args.mode, args.path = args.child
        child(args)
        return 0
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from diffsteer.training.preference_data import write_preference_pairs

    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        results = {}
        for n in (args.small, args.large):
            rows = synthetic_rows(n)
            parquet = write_preference_pairs(Path(tmp) / f"pairs-{n}.parquet", rows)
            arrow = write_arrow_folder(Path(tmp) / f"arrow-{n}", rows)
            del rows
            size = parquet.stat().st_size / 2**20
            results[n] = {
                "parquet": measure("stream", parquet, args),
                "arrow folder": measure("stream", arrow, args),
                "whole table (control)": measure("whole-table", parquet, args),
                "file_mib": size,
            }
            print(f"{n} pairs: parquet {size:.1f} MiB, measured", file=sys.stderr, flush=True)
    small, large = results[args.small], results[args.large]
    print(
        f"| loader | peak RSS above imports, {args.small} / {args.large} pairs (MiB) | ratio | "
        f"peak anonymous RSS above imports, {args.small} / {args.large} (MiB) | ratio | "
        f"time {args.small} / {args.large} (s) |"
    )
    print("| --- | --- | --- | --- | --- | --- |")
    for key in ("parquet", "arrow folder", "whole table (control)"):
        a, b = small[key], large[key]
        cells = []
        for metric in ("peak_above_imports_mib", "anon_peak_above_imports_mib"):
            ratio = b[metric] / max(a[metric], 1e-9)
            cells.append(f"{a[metric]:.1f} / {b[metric]:.1f} | {ratio:.2f}")
        print(f"| {key} | {' | '.join(cells)} | {a['seconds']:.1f} / {b['seconds']:.1f} |")
    print(
        f"files: {small['file_mib']:.1f} MiB and {large['file_mib']:.1f} MiB of parquet; "
        f"{args.batches} micro-batches of {args.batch} pairs decoded at 64x64 after opening",
        file=sys.stderr,
    )
    print(json.dumps({str(k): v for k, v in results.items()}), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
