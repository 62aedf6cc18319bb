"""``diffsteer serve`` end to end: a subprocess configured by a YAML file and the environment, stopped by SIGTERM."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from test_service_support import READY_TIMEOUT_S, free_port

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_serve_subcommand_runs_the_service(tmp_path):
    key = "cli-test-key-7f3a"
    config = tmp_path / "serve.yaml"
    config.write_text("max_steps: 10\nbatching: false\ntorch_threads: 1\nqueue_size: 2\n")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFSTEER_")}
    env.update(DIFFSTEER_API_KEYS=key, DIFFSTEER_MAX_STEPS="3", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "diffsteer.service.cli",
            "serve",
            "--port",
            str(port),
            "--model",
            "builtin:tiny",
            "--config",
            str(config),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    headers = {"X-API-Key": key}
    try:
        end = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < end:
            assert proc.poll() is None, proc.stdout.read()
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        else:
            raise AssertionError("diffsteer serve did not become ready")
        assert httpx.get(f"{url}/models", timeout=10).status_code == 401
        assert httpx.get(f"{url}/models", headers=headers, timeout=10).json()["default"] == "builtin:tiny"
        ok = httpx.post(f"{url}/generate", json={"prompt": "a cat", "steps": 2, "seed": 1}, headers=headers, timeout=60)
        assert ok.status_code == 200 and ok.json()["seeds"] == [1]
        too_many = httpx.post(f"{url}/generate", json={"prompt": "a cat", "steps": 4}, headers=headers, timeout=60)
        assert too_many.status_code == 422 and "maximum of 3" in too_many.json()["error"]["message"]  # env beats file
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            output, _ = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            output, _ = proc.communicate()
    # uvicorn shuts down gracefully, then re-raises the signal it caught, so the exit status may be SIGTERM's
    assert proc.returncode in (0, -signal.SIGTERM), output
    assert "Application startup complete" in output and "Application shutdown complete" in output
    assert key not in output
