"""Pick-a-Pic v2-layout preference files (training/preference_data.py) and `diffsteer data pairs` (training/pairs.py)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from diffsteer.guidance.errors import InvalidInput
from diffsteer.training.preference_data import load_preference_pairs


def jpeg(colour) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (16, 16), colour).save(buf, format="JPEG")
    return buf.getvalue()


def pickapic_rows():
    """Rows as Pick-a-Pic v2 has them (its columns, JPEG bytes, extra columns the loader ignores)."""
    return [
        {
            "are_different": True,
            "best_image_uid": "b",
            "caption": "a red circle",
            "created_at": "2023-04-01",
            "has_label": True,
            "image_0_uid": "a",
            "image_0_url": "http://x/a.jpg",
            "image_1_uid": "b",
            "image_1_url": "http://x/b.jpg",
            "jpg_0": jpeg((255, 0, 0)),
            "jpg_1": jpeg((0, 0, 255)),
            "label_0": 0.0,
            "label_1": 1.0,
            "model_0": "sd-1.5",
            "model_1": "sdxl",
            "ranking_id": 7,
            "user_id": 3,
            "num_example_per_prompt": 1,
        },
        {
            "are_different": True,
            "best_image_uid": "",
            "caption": "two green squares",
            "created_at": "2023-04-01",
            "has_label": True,
            "image_0_uid": "c",
            "image_0_url": "http://x/c.jpg",
            "image_1_uid": "d",
            "image_1_url": "http://x/d.jpg",
            "jpg_0": jpeg((0, 255, 0)),
            "jpg_1": jpeg((0, 128, 0)),
            "label_0": 0.5,
            "label_1": 0.5,
            "model_0": "sd-1.5",
            "model_1": "sd-1.5",
            "ranking_id": 8,
            "user_id": 4,
            "num_example_per_prompt": 1,
        },
    ]


def test_parquet_in_the_pickapic_v2_schema_loads(tmp_path):
    path = tmp_path / "train-00000-of-00001.parquet"
    pq.write_table(pa.Table.from_pylist(pickapic_rows()), path)
    data = load_preference_pairs(path)
    assert len(data) == 2 and not data.has_scores
    first, second = data.read_pairs([0, 1])
    assert (first.caption, first.label_0, second.label_0) == ("a red circle", 0.0, 0.5)
    a, b = first.images()
    assert a.size == (16, 16) and a.getpixel((8, 8))[0] > 200 and b.getpixel((8, 8))[2] > 200
    # a folder of shards loads every file
    pq.write_table(pa.Table.from_pylist(pickapic_rows()[:1]), tmp_path / "train-00001-of-00001.parquet")
    assert len(load_preference_pairs(tmp_path)) == 3


def test_jsonl_with_paths_and_scores_loads(tmp_path):
    (tmp_path / "img").mkdir()
    for name, colour in (("0.png", (255, 0, 0)), ("1.png", (0, 0, 255))):
        Image.new("RGB", (8, 8), colour).save(tmp_path / "img" / name)
    row = {
        "caption": "a red circle",
        "jpg_0": "img/0.png",
        "jpg_1": str(tmp_path / "img" / "1.png"),
        "label_0": 1,
        "label_1": 0,
        "ps_score_0": 0.21,
        "ps_score_1": 0.19,
        "seed_0": 5,
        "seed_1": 6,
    }
    (tmp_path / "pairs.jsonl").write_text(json.dumps(row) + "\n\n")
    data = load_preference_pairs(tmp_path / "pairs.jsonl", score_fields=("ps_score_0", "ps_score_1"))
    (pair,) = data.read_pairs([0])
    assert (pair.label_0, pair.score_0, pair.score_1, pair.seed_0, pair.seed_1) == (1.0, 0.21, 0.19, 5, 6)
    assert data.score_range() == (0.19, 0.21)
    assert pair.images()[0].getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"caption": None}, "row 1: caption"),
        ({"jpg_1": None}, "row 1: jpg_1"),
        ({"label_0": 0.3, "label_1": 0.7}, "row 1: label_0"),
        ({"label_0": 1.0, "label_1": 1.0}, "row 1: label_1"),
        ({"label_0": "yes"}, "row 1: label_0"),
        ({"jpg_0": "missing.png"}, "row 1: jpg_0"),
        ({"jpg_0": 17}, "row 1: jpg_0"),
        ({"score_0": 0.2}, "row 1: score_1"),
        ({"score_0": float("nan"), "score_1": 0.1}, "row 1: score_0"),
        ({"seed_0": -1}, "row 1: seed_0"),
    ],
)
def test_malformed_rows_name_the_row_and_the_field(tmp_path, change, field):
    good = {"caption": "a", "jpg_0": "a.png", "jpg_1": "a.png", "label_0": 1, "label_1": 0}
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    bad = {**good, **change}
    lines = [json.dumps(good), json.dumps(bad).replace("NaN", "NaN")]
    (tmp_path / "p.jsonl").write_text("\n".join(lines) + "\n")
    with pytest.raises(InvalidInput) as e:
        load_preference_pairs(tmp_path / "p.jsonl")
    assert field in str(e.value) and "p.jsonl" in str(e.value)


def test_unreadable_files_are_named(tmp_path):
    (tmp_path / "p.jsonl").write_text('{"caption": "a"}\nnot json\n')
    with pytest.raises(InvalidInput, match="line 2"):
        load_preference_pairs(tmp_path / "p.jsonl")
    (tmp_path / "p.parquet").write_bytes(b"not parquet")
    with pytest.raises(InvalidInput, match="parquet"):
        load_preference_pairs(tmp_path / "p.parquet")
    with pytest.raises(InvalidInput, match="does not exist"):
        load_preference_pairs(tmp_path / "nothing.parquet")
    (tmp_path / "p.csv").write_text("")
    with pytest.raises(InvalidInput, match="parquet or .jsonl"):
        load_preference_pairs(tmp_path / "p.csv")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(InvalidInput, match="no rows"):
        load_preference_pairs(tmp_path / "empty.jsonl")


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def pg_model():
    from diffsteer.guidance.models import load_model

    return load_model("builtin:proving-ground", device="cpu")


def test_data_pairs_samples_scores_and_writes_pairs_that_repeat(tmp_path, pg_model, one_thread):
    from diffsteer.training.pairs import PairsConfig, build_pairs, image_seeds
    from diffsteer.training.preference_data import write_preference_pairs

    config = PairsConfig(
        output="", prompts="pg-train:single", max_prompts=2, images_per_prompt=3, steps=2, batch_size=6
    )
    rows = build_pairs(config, model=pg_model, progress=False)
    assert len(rows) == 2 * 3  # 3 pairs per prompt
    for row in rows:
        assert row["label_0"] == (
            1.0 if row["score_0"] > row["score_1"] else 0.0 if row["score_0"] < row["score_1"] else 0.5
        )
        assert row["label_0"] + row["label_1"] == 1.0 and row["seed_0"] != row["seed_1"]
    # the recorded seed reproduces the image, and the score is the clip reward's on it
    import torch

    from diffsteer.guidance.reward_models import get_reward
    from diffsteer.guidance.sampler import generate

    row = rows[0]
    result = generate(
        pg_model,
        {"prompt": row["caption"], "seeds": [row["seed_0"]], "steps": 2, "scheduler": "ddim", "policy": config.policy},
    )
    pixels = (result.pixels.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)[0]
    assert np.array_equal(pixels, np.asarray(Image.open(io.BytesIO(row["jpg_0"])).convert("RGB")))
    with torch.no_grad():
        score = (
            get_reward("clip", "cpu")
            .evaluate(torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255, [row["caption"]])
            .total_score
        )
    assert float(score) == pytest.approx(row["score_0"], rel=1e-5)
    # same seed, same rows; written files load back with both scores
    again = build_pairs(config, model=pg_model, progress=False)
    assert [(r["seed_0"], r["score_0"]) for r in again] == [(r["seed_0"], r["score_0"]) for r in rows]
    for suffix in (".parquet", ".jsonl"):
        data = load_preference_pairs(write_preference_pairs(tmp_path / f"pairs{suffix}", rows))
        assert data.has_scores and [p.score_1 for p in data.iter_pairs()] == [r["score_1"] for r in rows]
        assert data.scores[:, 1].tolist() == [r["score_1"] for r in rows]
        assert np.array_equal(np.asarray(data.read_pairs([0])[0].images()[0]), pixels)
    best = build_pairs(PairsConfig(**{**config.__dict__, "pairing": "best-worst"}), model=pg_model, progress=False)
    assert len(best) == 2 and all(r["label_0"] == 1.0 for r in best)
    rest = build_pairs(PairsConfig(**{**config.__dict__, "pairing": "best-rest"}), model=pg_model, progress=False)
    n = config.images_per_prompt
    assert len(rest) == len(best) * (n - 1)
    for index, best_row in enumerate(best):  # the best image against each of the others of its prompt, in image order
        prompt_rows = rest[index * (n - 1) : (index + 1) * (n - 1)]
        assert {r["seed_0"] for r in prompt_rows} == {best_row["seed_0"]}
        others = [s for s in image_seeds(config.seed, index, n) if s != best_row["seed_0"]]
        assert [r["seed_1"] for r in prompt_rows] == others
        assert all(r["score_0"] >= r["score_1"] and r["label_0"] == 1.0 for r in prompt_rows)


def test_pair_indices_hand_worked():
    from diffsteer.training.pairs import pair_indices

    scores = [0.2, 0.9, 0.5, 0.1]  # ranked: image 1, 2, 0, 3
    assert pair_indices(scores, "best-worst") == [(1, 3)]
    assert pair_indices(scores, "best-rest") == [(1, 0), (1, 2), (1, 3)]
    assert pair_indices(scores, "best-rest", 2) == [(1, 0), (1, 2), (1, 3), (2, 0), (2, 3)]
    assert pair_indices(scores, "best-rest", 3) == [(1, 0), (1, 2), (1, 3), (2, 0), (2, 3), (0, 3)]
    assert sorted(map(sorted, pair_indices(scores, "best-rest", 3))) == sorted(map(sorted, pair_indices(scores, "all")))


def test_data_pairs_cli_rejects_bad_options(capsys):
    from diffsteer.service.cli import main

    assert main(["data", "pairs", "-o", "x.parquet", "--images-per-prompt", "1"]) == 2
    assert "--images-per-prompt" in capsys.readouterr().err
    assert main(["data", "pairs", "-o", "x.csv"]) == 2
    assert "--output" in capsys.readouterr().err
    assert main(["data", "pairs", "-o", "x.parquet", "--pairing", "some"]) == 2
    assert "--pairing" in capsys.readouterr().err
    assert main(["data", "pairs", "-o", "x.parquet", "--pairing", "best-rest", "--best-k", "2"]) == 2
    assert "--best-k: must be in [1, 1]" in capsys.readouterr().err


def test_pooling_training_seeds_averages_runs_and_refuses_different_items(tmp_path, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.pool_preference_runs import main

    def write_run(name, dpo, base=(1, 0, 0, 1)):
        folder = tmp_path / name / "eval" / "single"
        folder.mkdir(parents=True)
        items = [("p0", 1), ("p0", 2), ("p1", 1), ("p1", 2)]
        with open(folder / "records.jsonl", "w") as f:
            for arm, values in (("base", base), ("dpo", dpo)):
                for (pid, seed), v in zip(items, values):
                    f.write(
                        json.dumps({"arm": arm, "prompt_id": pid, "seed": seed, "metrics": {"verifier.passed": v}})
                        + "\n"
                    )
        return str(tmp_path / name)

    a, b = write_run("a", (1, 1, 0, 1)), write_run("b", (1, 1, 1, 1))
    assert main([a, b, "--bootstrap", "200"]) == 0
    out = capsys.readouterr().out
    # per run: dpo - base = +0.25 and +0.5; their mean +0.375, the pooled difference the same
    assert "| dpo - base | +0.250, +0.500 | +0.375 [" in out and "| +0.375 [" in out.split("+0.375 [", 1)[1]
    assert main([a, write_run("c", (1, 1, 1, 1), base=(0, 0, 0, 1))]) == 2
    assert "do not share their evaluation items" in capsys.readouterr().err


def test_learned_guidance_reads_a_change_against_the_guidance_direction(capsys):
    """benchmarks/learned_guidance.py: a hand-made change δ_c = 0.3 g + h (h ⟂ g), δ_u = 0.1 g gives
    k = 0.2, cos = 0.3‖g‖/‖δ_c‖; the base model read against itself changes nothing."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.learned_guidance import guidance_alignment, main

    g = torch.tensor([[3.0, 0.0, 4.0, 0.0]])
    h = torch.tensor([[0.0, 2.0, 0.0, 0.0]])
    r = guidance_alignment(0.3 * g + h, 0.1 * g, g)
    assert r["k"] == pytest.approx(0.2)
    assert r["cos"] == pytest.approx(1.5 / (1.5**2 + 2**2) ** 0.5)
    assert r["relative_size"] == pytest.approx((1.5**2 + 2**2) ** 0.5 / 5)
    assert main(["builtin:proving-ground", "--items", "2", "--steps", "3", "--record", "1,2"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| builtin:proving-ground |")]
    assert len(rows) == 2 and all("| +0.000 | 0.000 |" in row for row in rows), rows


def test_preference_calibration_hand_worked(tmp_path, capsys):
    """benchmarks/preference_calibration.py on three hand-made pairs of rendered (verifier: pass) and blank
    (fail) scenes: a confident right pair (v = +1), an unsure wrong one (v = −1), one with two passing images
    (v = 0). With scores 0..10 and τ = 1: p = σ(n^0 − n^1), so |2p − 1| = tanh(Δn / 2)."""
    import math
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from benchmarks.preference_calibration import main
    from diffsteer.proving_ground.prompts import training_prompt_specs
    from diffsteer.proving_ground.render import render_prompt
    from diffsteer.proving_ground.verifier import verify
    from diffsteer.proving_ground.world import caption
    from diffsteer.training.preference_data import write_preference_pairs

    spec = training_prompt_specs("single")[0]

    def png(array) -> bytes:
        buf = io.BytesIO()
        Image.fromarray(array).save(buf, format="PNG")
        return buf.getvalue()

    scene_a, scene_b = render_prompt(spec, 1)[0], render_prompt(spec, 2)[0]
    blank = np.full_like(scene_a, scene_a[0, 0])
    assert verify(scene_a, spec).passed and verify(scene_b, spec).passed and not verify(blank, spec).passed
    text = caption(spec)
    row = {"caption": text, "label_0": 1.0, "label_1": 0.0}
    write_preference_pairs(
        tmp_path / "pairs.parquet",
        [
            {
                **row,
                "jpg_0": png(scene_a),
                "jpg_1": png(blank),
                "score_0": 10.0,
                "score_1": 0.0,
                "seed_0": 1,
                "seed_1": 3,
            },
            {
                **row,
                "jpg_0": png(blank),
                "jpg_1": png(scene_b),
                "score_0": 6.0,
                "score_1": 5.0,
                "seed_0": 3,
                "seed_1": 2,
            },
            {
                **row,
                "jpg_0": png(scene_a),
                "jpg_1": png(scene_b),
                "score_0": 8.0,
                "score_1": 4.0,
                "seed_0": 1,
                "seed_1": 2,
            },
        ],
    )
    assert main([str(tmp_path / "pairs.parquet"), "--temperature", "1", "--bins", "3"]) == 0
    out = capsys.readouterr()
    report = json.loads(out.err.strip().splitlines()[-1])
    c_right, c_wrong, c_both = math.tanh(0.5), math.tanh(0.05), math.tanh(0.2)
    assert [r["mean_signal"] for r in report["by_confidence"]] == [-1.0, 0.0, 1.0]
    assert [r["confidence"][0] for r in report["by_confidence"]] == pytest.approx([c_wrong, c_both, c_right])
    assert report["signal_per_unit_push"]["dpo"] == pytest.approx(0.0)
    assert report["signal_per_unit_push"]["smpo"] == pytest.approx((c_right - c_wrong) / (c_right + c_wrong + c_both))
    assert main([str(tmp_path / "missing.parquet")]) == 2
    assert "missing.parquet" in capsys.readouterr().err


# ------------------------------------------------------------------ streaming sources (training/preference_data.py)


def png(colour, size=8) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buf, format="PNG")
    return buf.getvalue()


def numbered_rows(n, score_as_list=False):
    """n decided pairs whose image 0 has red level = the row number (so a read row can be told by its pixels)."""
    rows = []
    for i in range(n):
        s0, s1 = 0.1 + i / 1000, 0.2 - i / 1000
        rows.append(
            {
                "caption": f"pair {i}",
                "jpg_0": png((i, 0, 0)),
                "jpg_1": png((0, 0, i)),
                "label_0": 1.0 if i % 2 else 0.0,
                "label_1": 0.0 if i % 2 else 1.0,
                "ps_score_0": [s0] if score_as_list else s0,
                "ps_score_1": [s1] if score_as_list else s1,
            }
        )
    return rows


def write_datasets_folder(folder, rows, shards=2, batch_rows=3, image_struct=True):
    """A folder laid out as `datasets`' Dataset.save_to_disk writes it: Arrow IPC stream files named
    data-XXXXX-of-XXXXX.arrow, state.json listing them, dataset_info.json (`datasets` itself is not installed
    here, so the folder is written with pyarrow)."""
    folder.mkdir(parents=True)
    rows = [dict(r) for r in rows]
    if image_struct:  # datasets' Image feature: a struct of bytes and path
        for r in rows:
            for key in ("jpg_0", "jpg_1"):
                r[key] = {"bytes": r[key], "path": None}
    table = pa.Table.from_pylist(rows)
    names, per_shard = [], -(-len(rows) // shards)
    for k in range(shards):
        name = f"data-{k:05d}-of-{shards:05d}.arrow"
        part = table.slice(k * per_shard, per_shard)
        with pa.OSFile(str(folder / name), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
            for batch in part.to_batches(max_chunksize=batch_rows):
                writer.write_batch(batch)
        names.append(name)
    (folder / "state.json").write_text(
        json.dumps({"_data_files": [{"filename": n} for n in names], "_fingerprint": "x", "_split": "train"})
    )
    (folder / "dataset_info.json").write_text(json.dumps({"features": {}}))
    return folder


def test_parquet_is_read_by_row_groups_never_as_a_whole_table(tmp_path, monkeypatch):
    from diffsteer.training import preference_data as pd

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(numbered_rows(23)), path, row_group_size=4)

    def whole_table(*args, **kwargs):
        raise AssertionError("the loader read the whole table")

    monkeypatch.setattr(pq, "read_table", whole_table)
    monkeypatch.setattr(pq.ParquetFile, "read", whole_table)
    scans, groups = [], []
    iter_batches, read_row_group = pq.ParquetFile.iter_batches, pq.ParquetFile.read_row_group

    def scan_spy(self, *args, **kwargs):
        scans.append(kwargs.get("columns"))
        return iter_batches(self, *args, **kwargs)

    def group_spy(self, g, *args, **kwargs):
        groups.append(g)
        return read_row_group(self, g, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", scan_spy)
    monkeypatch.setattr(pq.ParquetFile, "read_row_group", group_spy)
    data = load_preference_pairs(path, score_fields=("ps_score_0", "ps_score_1"))
    assert len(data) == 23 and data.label_0.tolist() == [float(i % 2) for i in range(23)]
    assert all("jpg_0" not in c and "jpg_1" not in c for c in scans)  # the opening scan skips the images
    assert data.scores[5].tolist() == [0.1 + 5 / 1000, 0.2 - 5 / 1000]
    assert groups == []
    order = [22, 0, 9, 13, 3, 21]
    pairs = data.read_pairs(order)
    assert [p.caption for p in pairs] == [f"pair {i}" for i in order] and [p.index for p in pairs] == order
    assert [read_red(p) for p in pairs] == order
    assert groups == [5, 0, 2, 3]  # row 3 is in group 0 (kept) and row 21 in group 5 (kept): each group read once
    assert len(data.sources[0]._groups) <= pd.CACHED_CHUNKS
    assert [p.caption for p in data.iter_pairs(batch=5)] == [f"pair {i}" for i in range(23)]


def read_red(pair) -> int:
    return pair.images()[0].getpixel((0, 0))[0]


def test_datasets_arrow_folder_with_one_element_list_scores_loads(tmp_path):
    folder = write_datasets_folder(tmp_path / "pickapic_ps", numbered_rows(10, score_as_list=True))
    data = load_preference_pairs(folder, score_fields=("ps_score_0", "ps_score_1"))
    assert len(data) == 10 and len(data.sources) == 2 and data.has_scores
    assert data.scores[7].tolist() == pytest.approx([0.107, 0.193])
    assert data.score_range() == pytest.approx((0.1, 0.2))
    pairs = data.read_pairs([9, 4, 5, 0])
    assert [read_red(p) for p in pairs] == [9, 4, 5, 0] and pairs[0].images()[1].getpixel((0, 0)) == (0, 0, 9)
    assert (pairs[1].score_0, pairs[1].label_0) == (pytest.approx(0.104), 0.0)
    # a DatasetDict folder names its splits; a split's folder loads
    (tmp_path / "dict").mkdir()
    (tmp_path / "dict" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "validation_unique"]}))
    with pytest.raises(InvalidInput, match="train, validation_unique"):
        load_preference_pairs(tmp_path / "dict")
    # plain binary image columns load too, and a bad row is named with its file and row
    rows = numbered_rows(4)
    rows[2]["label_0"] = 0.3
    bad = write_datasets_folder(tmp_path / "bad", rows, shards=1, image_struct=False)
    with pytest.raises(InvalidInput, match=r"data-00000-of-00001.arrow row 2: label_0"):
        load_preference_pairs(bad, score_fields=("ps_score_0", "ps_score_1"))


@pytest.mark.parametrize(
    "score, message",
    [([0.21], None), ([0.21, 0.3], "row 0: score_0: expected a number or a one-element list"), ([], "list of 0")],
)
def test_scores_as_one_element_lists(tmp_path, score, message):
    Image.new("RGB", (4, 4)).save(tmp_path / "a.png")
    row = {"caption": "a", "jpg_0": "a.png", "jpg_1": "a.png", "label_0": 1, "label_1": 0}
    (tmp_path / "p.jsonl").write_text(json.dumps({**row, "score_0": score, "score_1": [0.5]}) + "\n")
    if message is None:
        data = load_preference_pairs(tmp_path / "p.jsonl")
        assert data.scores.tolist() == [[0.21, 0.5]] and data.read_pairs([0])[0].score_0 == 0.21
    else:
        with pytest.raises(InvalidInput, match=message):
            load_preference_pairs(tmp_path / "p.jsonl")


def test_workers_decode_the_plan_as_the_training_process_does(tmp_path):
    from diffsteer.training.preference_data import PairImages, PlannedBatches, image_tensor

    path = tmp_path / "p.parquet"
    pq.write_table(pa.Table.from_pylist(numbered_rows(12)), path, row_group_size=5)
    data = load_preference_pairs(path, score_fields=("ps_score_0", "ps_score_1"))

    def plan(step, micro):
        rng = np.random.default_rng([step, micro])
        return [(int(i), bool(f)) for i, f in zip(rng.permutation(12)[:3], rng.integers(0, 2, 3))]

    images = PairImages(data, (6, 8))
    here = PlannedBatches(images, plan, accumulation=2, last_step=3, workers=0)
    there = PlannedBatches(images, plan, accumulation=2, last_step=3, workers=2)
    try:
        for key in [(0, 0), (0, 1), (1, 0), (1, 1), (2, 0), (1, 0)]:  # a jump back restarts the workers
            a, b = here.get(*key), there.get(*key)
            assert [x.index for x in a] == [x.index for x in b] == [i for i, _ in plan(*key)]
            for x, y in zip(a, b):
                assert torch.equal(x.pixels_0, y.pixels_0) and torch.equal(x.pixels_1, y.pixels_1)
                assert x.caption == y.caption == f"pair {x.index}" and x.pixels_0.shape == (3, 6, 8)
                assert round(float(x.pixels_0[0, 0, 0]) * 255) == x.index
        # Ctrl-C reaches the workers too (the terminal signals the process group): they leave it to the trainer
        import os
        import signal

        for worker in there._iterator._workers:
            os.kill(worker.pid, signal.SIGINT)
        assert [x.index for x in there.get(1, 1)] == [i for i, _ in plan(1, 1)]
        assert [x.index for x in there.get(2, 0)] == [i for i, _ in plan(2, 0)]
    finally:
        there.close()
    # a flip mirrors left to right
    image = Image.fromarray(np.arange(4 * 6 * 3, dtype=np.uint8).reshape(4, 6, 3))
    assert torch.equal(image_tensor(image, (4, 6), flip=True), image_tensor(image, (4, 6)).flip(-1))
