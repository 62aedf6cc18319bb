"""Shared pieces of the preference-training tests (tests/test_preference_training.py, tests/test_preference_flow.py):
a one-thread fixture, six decided pairs of drawn circles in the Pick-a-Pic layout, a trainer config."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw

from diffsteer.training.preference_data import write_preference_pairs

COLOURS = {"red": (220, 30, 30), "blue": (30, 60, 220), "green": (30, 180, 60)}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def shape_png(colour: str, size: int = 64) -> bytes:
    """A circle of ``colour`` left of the centre (so a left-right flip changes the image) on light grey."""
    image = Image.new("RGB", (size, size), (235, 235, 235))
    ImageDraw.Draw(image).ellipse((size // 8, size // 4, 5 * size // 8, 3 * size // 4), fill=COLOURS[colour])
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def write_pairs(folder: Path, size: int = 64) -> Path:
    """Six decided pairs (the right colour scores higher: 20 + i against 12 + i/2), written as parquet."""
    rows = []
    for i, (good, bad) in enumerate([("red", "blue"), ("blue", "green"), ("green", "red")] * 2):
        s_good, s_bad = 20.0 + i, 12.0 + 0.5 * i
        first_good = i % 2 == 0
        a, b = (good, bad) if first_good else (bad, good)
        rows.append(
            {
                "caption": f"a {good} circle",
                "jpg_0": shape_png(a, size),
                "jpg_1": shape_png(b, size),
                "label_0": 1.0 if first_good else 0.0,
                "label_1": 0.0 if first_good else 1.0,
                "score_0": s_good if first_good else s_bad,
                "score_1": s_bad if first_good else s_good,
            }
        )
    return write_preference_pairs(folder / "pairs.parquet", rows)


def trainer_config(cls, tmp_path: Path, pairs_file: Path, name: str, **overrides):
    """A short run of ``cls`` (DPOConfig or SmPOConfig): 2 steps of 2 pairs, one thread, no evaluation."""
    values = dict(
        data=str(pairs_file),
        output_dir=str(tmp_path / name),
        eval_prompts="",
        batch_size=2,
        max_steps=2,
        threads=1,
        progress=False,
        tensorboard=False,
        learning_rate=0.01,
        beta=500.0,
        checkpoint_every=1,
    )
    return cls(**{**values, **overrides})
