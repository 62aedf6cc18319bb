"""The statistics of an A/B run and its results file: per-arm summaries, paired comparisons, ``results.json``.

Statistics
----------
For every pair (A, B) of arms (or ``(baseline, other)`` with ``baseline``) and every metric column: means,
the mean paired difference ``B - A`` with a percentile bootstrap CI resampling prompts, win/tie/loss, the sign
test and the Wilcoxon signed-rank test, all from :func:`diffsteer.evaluation.stats.compare`, and a verdict
(:func:`verdict`). ``unit="prompt"`` (the default) runs the counts and the tests on each prompt's mean
difference over its seeds, the independent unit; ``unit="image"`` on single images. Items where a metric is
undefined (``verifier.position_correct`` for prompts without a relation) are left out of that metric only.
Per arm, every column's mean gets a prompt-bootstrap CI (:func:`arm_summaries`).

``results.json`` (:func:`build_results`, :func:`write_results`, :func:`load_results`) holds the run's
configuration, arms, prompts and items, every image's metrics and path, the summaries and the statistics.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from diffsteer.evaluation.metrics import Column
from diffsteer.evaluation.prompts import PromptSet
from diffsteer.evaluation.records import write_atomic
from diffsteer.evaluation.stats import cluster_bootstrap_ci, compare

RESULTS_VERSION = 1
RESULTS_FILE = "results.json"


def column_values(
    done: Mapping[tuple[str, int], Mapping[str, Any]], arms: Sequence[str], n_items: int, columns: Sequence[str]
) -> dict[str, dict[str, np.ndarray]]:
    """``values[arm][column]``: one float per item in item order, NaN where the metric is undefined."""
    out: dict[str, dict[str, np.ndarray]] = {}
    for arm in arms:
        out[arm] = {}
        for col in columns:
            vals = [done[(arm, i)]["metrics"].get(col) for i in range(n_items)]
            out[arm][col] = np.array([np.nan if v is None else float(v) for v in vals], dtype=np.float64)
    return out


def paired_statistics(
    values: Mapping[str, Mapping[str, np.ndarray]],
    prompt_ids: Sequence[str],
    directions: Mapping[str, str],
    *,
    baseline: str | None = None,
    unit: str = "prompt",
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
    per_batch: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Compare every pair of arms on every column with :func:`diffsteer.evaluation.stats.compare`.

    ``values[arm][column]`` holds one value per item (NaN: undefined); for each pair and column only the
    items defined in both arms enter. Pairs are ``(baseline, other)`` or every ``(earlier, later)``; the
    difference is ``B - A``. ``verdict`` says which arm is better when the CI excludes 0, and only with a real
    interval: at least :data:`MIN_VERDICT_N` units (prompts, or images with ``unit="image"``) and a CI of
    non-zero width; otherwise it says why there is none. Columns in ``per_batch`` (``latency`` measured per
    batch of several images: every image of a batch gets the same value) get no paired test at all.
    """
    arms = list(values)
    pairs = (
        [(baseline, a) for a in arms if a != baseline]
        if baseline
        else [(a, b) for k, a in enumerate(arms) for b in arms[k + 1 :]]
    )
    pids = np.asarray(prompt_ids, dtype=object)
    out = []
    for a, b in pairs:
        metrics: dict[str, Any] = {}
        for col, direction in directions.items():
            if col in per_batch:
                continue
            va, vb = values[a][col], values[b][col]
            mask = np.isfinite(va) & np.isfinite(vb)
            if not mask.any():
                continue
            cmp = compare(
                {a: {col: va[mask]}, b: {col: vb[mask]}},
                list(pids[mask]),
                directions={col: direction},
                aggregate_per_prompt=unit == "prompt",
                n_resamples=n_resamples,
                confidence=confidence,
                seed=seed,
            )[0].metrics[col]
            row = asdict(cmp)
            improvement_low, improvement_high = (
                (cmp.ci_low, cmp.ci_high) if direction == "higher" else (-cmp.ci_high, -cmp.ci_low)
            )
            row["verdict"] = verdict(
                a, b, improvement_low, improvement_high, cmp.n_prompts if unit == "prompt" else cmp.n_images
            )
            metrics[col] = row
        out.append({"arm_a": a, "arm_b": b, "metrics": metrics})
    return out


MIN_VERDICT_N = 5  # below this many units a bootstrap interval is too coarse to call a winner


def verdict(a: str, b: str, improvement_low: float, improvement_high: float, n: int) -> str:
    """Which arm is better (the CI of the improvement of B over A excludes 0), or why no verdict is given."""
    if n < MIN_VERDICT_N:
        return f"too few to tell (n = {n} < {MIN_VERDICT_N})"
    if not improvement_high > improvement_low:
        return "no interval (every paired difference is the same)"
    return b if improvement_low > 0 else a if improvement_high < 0 else "no clear difference"


def arm_summaries(
    values: Mapping[str, Mapping[str, np.ndarray]],
    prompt_ids: Sequence[str],
    *,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, dict[str, float | int | None]]]:
    """Per arm and column: mean over defined items, their number, and a prompt-cluster bootstrap CI of the mean."""
    pids = np.asarray(prompt_ids, dtype=object)
    out: dict[str, dict[str, dict[str, float | int | None]]] = {}
    for arm, cols in values.items():
        out[arm] = {}
        for col, v in cols.items():
            mask = np.isfinite(v)
            if not mask.any():
                out[arm][col] = {"mean": None, "n": 0, "ci_low": None, "ci_high": None}
                continue
            low, high = cluster_bootstrap_ci(
                v[mask], list(pids[mask]), n_resamples=n_resamples, confidence=confidence, seed=seed
            )
            out[arm][col] = {"mean": float(v[mask].mean()), "n": int(mask.sum()), "ci_low": low, "ci_high": high}
    return out


def build_results(
    config: Mapping[str, Any],
    arms: Sequence[Mapping[str, Any]],
    prompts: PromptSet,
    columns: Sequence[Column],
    done: Mapping[tuple[str, int], Mapping[str, Any]],
    *,
    generated: int,
    skipped: int,
    seconds: float,
) -> dict[str, Any]:
    """The content of ``results.json``.

    ``config`` is the run's configuration as JSON (``ABConfig.model_dump(mode="json")``); its ``n_resamples``,
    ``confidence``, ``baseline``, ``unit`` and ``batch_size`` set the statistics. ``arms`` describes each arm,
    ``name`` first (``ArmPlan.describe``); ``done[(arm, i)]`` is the record of item ``i`` of ``prompts.items``.
    """
    items = prompts.items
    arm_names = [a["name"] for a in arms]
    col_names = [c.name for c in columns]
    values = column_values(done, arm_names, len(items), col_names)
    prompt_ids = [it.prompt_id for it in items]
    directions = {c.name: c.direction for c in columns}
    images = []
    for i, item in enumerate(items):
        for arm in arm_names:
            rec = done[(arm, i)]
            images.append(
                {
                    "arm": arm,
                    "item": i,
                    "prompt_id": item.prompt_id,
                    "prompt": item.prompt,
                    "seed": item.seed,
                    "path": rec["path"],
                    "metrics": {c: rec["metrics"].get(c) for c in col_names},
                }
            )
    return {
        "version": RESULTS_VERSION,
        "config": dict(config),
        "arms": [dict(a) for a in arms],
        "prompts": {**prompts.describe(), "list": [p.to_dict() for p in prompts.prompts]},
        "items": [{"item": i, "prompt_id": it.prompt_id, "seed": it.seed} for i, it in enumerate(items)],
        "metrics": [
            {"name": c.name, "metric": c.metric, "direction": c.direction, "description": c.description}
            for c in columns
        ],
        "images": images,
        "summary": arm_summaries(
            values, prompt_ids, n_resamples=config["n_resamples"], confidence=config["confidence"]
        ),
        "statistics": paired_statistics(
            values,
            prompt_ids,
            directions,
            baseline=config["baseline"],
            unit=config["unit"],
            n_resamples=config["n_resamples"],
            confidence=config["confidence"],
            per_batch=() if config["batch_size"] == 1 else ("latency",),
        ),
        "run": {"generated": generated, "skipped": skipped, "total": len(images), "seconds": round(seconds, 3)},
    }


def write_results(output_dir: str | Path, results: Mapping[str, Any]) -> None:
    """Write ``results.json`` into ``output_dir`` (atomically; NaN and infinities are refused)."""
    write_atomic(Path(output_dir) / RESULTS_FILE, json.dumps(results, indent=1, allow_nan=False).encode())


def load_results(output_dir: str | Path) -> dict[str, Any]:
    """Read ``results.json`` of the run in ``output_dir``."""
    return json.loads((Path(output_dir) / RESULTS_FILE).read_text(encoding="utf-8"))


__all__ = [
    "MIN_VERDICT_N",
    "RESULTS_VERSION",
    "arm_summaries",
    "build_results",
    "column_values",
    "load_results",
    "paired_statistics",
    "verdict",
    "write_results",
]
