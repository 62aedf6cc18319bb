"""Helpers shared by the training tests: the environment of a training subprocess, starting one, killing it by
SIGKILL once a given checkpoint is on disk (the exact-resume tests), and reading an exported LoRA."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def training_env() -> dict[str, str]:
    """A training subprocess's environment: offline, this checkout first on the path, one OpenMP thread."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def start_training(module: str, *args: str) -> subprocess.Popen:
    """``python -m module args...`` in the repository, its stdout and stderr captured as text."""
    return subprocess.Popen(
        [sys.executable, "-m", module, *args],
        cwd=REPO,
        env=training_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def kill_after_checkpoint(proc: subprocess.Popen, output_dir: Path, step: int, timeout: float = 300) -> None:
    """Wait until ``output_dir`` holds the checkpoint of ``step``, then SIGKILL ``proc`` and check that it died
    there (killed, nothing exported yet)."""
    marker = output_dir / "checkpoints" / f"step-{step:08d}.pt"
    deadline = time.monotonic() + timeout
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert marker.exists(), proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not any((output_dir / name).exists() for name in ("adapters", "pipeline"))  # it really died mid-run


def wait_for_success(*procs: subprocess.Popen, timeout: float = 300) -> None:
    for proc in procs:
        _, err = proc.communicate(timeout=timeout)
        assert proc.returncode == 0, err[-2000:]


def read_adapter(folder: Path, name: str = "alignprop") -> dict[str, torch.Tensor]:
    """The LoRA a run exported under ``folder/adapters/name``."""
    return load_file(folder / "adapters" / name / "pytorch_lora_weights.safetensors")
