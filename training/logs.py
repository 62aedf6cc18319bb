"""Training logs: a CSV of every metric, TensorBoard scalars, and a plot of the reward curve.

``metrics.csv`` is in long form, one row per (step, phase, metric) with ``phase`` ``train`` or ``eval``, so
runs with different reward terms or metrics share one format, and resuming from step S keeps exactly the rows
of steps ≤ S (the rows a killed run wrote after its last checkpoint are dropped, then written again).
TensorBoard events go to ``tensorboard/`` with ``purge_step`` so a resumed run replaces them as well.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
from torch.utils.tensorboard import SummaryWriter

FIELDS = ("step", "phase", "metric", "value")


class TrainingLog:
    def __init__(self, output_dir: str | Path, resume_step: int | None = None, tensorboard: bool = True):
        self.dir = Path(output_dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.csv_path = self.dir / "metrics.csv"
        kept = [r for r in self.read() if int(r["step"]) <= resume_step] if resume_step is not None else []
        with self.csv_path.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(kept)
        self._file = self.csv_path.open("a", newline="")
        self._writer = csv.DictWriter(self._file, FIELDS)
        self._tb = None
        if tensorboard:
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(log_dir=str(self.dir / "tensorboard"), purge_step=purge)

    def read(self) -> list[dict[str, str]]:
        if not self.csv_path.is_file():
            return []
        with self.csv_path.open(newline="") as f:
            return list(csv.DictReader(f))

    def log(self, step: int, phase: str, metrics: dict[str, float]) -> None:
        for name, value in metrics.items():
            if value is None or not math.isfinite(float(value)):
                continue
            self._writer.writerow({"step": step, "phase": phase, "metric": name, "value": f"{float(value):.8g}"})
            if self._tb is not None:
                self._tb.add_scalar(f"{phase}/{name}", float(value), step)
        self._file.flush()

    def series(self, phase: str, metric: str) -> tuple[np.ndarray, np.ndarray]:
        rows = [
            (int(r["step"]), float(r["value"])) for r in self.read() if r["phase"] == phase and r["metric"] == metric
        ]
        steps, values = zip(*rows) if rows else ((), ())
        return np.asarray(steps), np.asarray(values)

    def plot(self, path: str | Path, reward_metric: str = "reward", eval_metrics: tuple[str, ...] = ()) -> Path:
        """The training reward (raw and smoothed) and the evaluation metrics against the step."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        wanted = [("train", reward_metric)] + [("eval", m) for m in eval_metrics]
        panels = [(phase, metric, *self.series(phase, metric)) for phase, metric in wanted]
        panels = [p for p in panels if len(p[2])]
        fig, axes = plt.subplots(len(panels) or 1, 1, figsize=(7, 2.6 * max(1, len(panels))), squeeze=False)
        for ax, (phase, metric, steps, values) in zip(axes[:, 0], panels):
            if phase == "train":
                ax.plot(steps, values, alpha=0.3, lw=0.8, label="per step")
                window = max(1, len(values) // 20)
                smooth = np.convolve(values, np.ones(window) / window, mode="valid")
                ax.plot(steps[window - 1 :], smooth, lw=1.6, label=f"mean of {window}")
                ax.legend(loc="best", fontsize=8)
            else:
                ax.plot(steps, values, marker="o", lw=1.4)
            ax.set_title(f"{phase}: {metric}", fontsize=9)
            ax.grid(alpha=0.3)
        axes[-1, 0].set_xlabel("optimizer step")
        fig.tight_layout()
        path = Path(path)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        return path

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()
