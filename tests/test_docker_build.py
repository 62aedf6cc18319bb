"""The Docker image built and run (docker/Dockerfile): the `train` and `serve` targets on a Debian base made on
this machine (debootstrap -> docker import, with uv from its PyPI wheel), a 2-step AlignProp job on the default
model with the config and output mounted as the README shows, as the image's non-root user, resumed; then the
`serve` target answering a generation.

Needs a Docker daemon, a BuildKit-capable client (buildx, or Docker 20.10-22's built-in BuildKit), debootstrap,
root (debootstrap) and network access to Debian's and PyPI's mirrors; it skips, saying which is missing,
elsewhere (CI has no Docker). The first run downloads torch with its CUDA wheels (~4 GB) and takes 10-20
minutes; the base images are kept (tags diffsteer-test/*) and reused; DIFFSTEER_DOCKER_REBUILD_BASE=1 redoes them.
"""

from __future__ import annotations

import io
import os
import shutil
import ssl
import subprocess
import sys
import tarfile
import time
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEBIAN_SUITE = "bookworm"  # python3 is 3.11 there, the image's PYTHON_VERSION
DEBIAN_MIRROR = "http://deb.debian.org/debian"
TINI_DEBIAN = "0.19.0-1+b3"  # bookworm's tini
UV_VERSION = "0.13.9"  # the Dockerfile's default UV_IMAGE tag
BASE_TAG = f"diffsteer-test/debian-base:{DEBIAN_SUITE}"
UV_TAG = f"diffsteer-test/uv:{UV_VERSION}"
APP_UID = 10001
BUILD_TIMEOUT_S = 3600


def _run(argv: list[str], timeout: float = 120, env: dict | None = None, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=env, **kw)


def _docker_client() -> tuple[list[str], dict[str, str]] | str:
    """(build command prefix, environment) for a client that builds with BuildKit, or why there is none."""
    candidates = list(
        dict.fromkeys(
            p for p in (shutil.which("docker"), "/usr/bin/docker", "/usr/local/bin/docker") if p and os.path.exists(p)
        )
    )
    if not candidates:
        return "no docker executable"
    info = _run([candidates[0], "info", "--format", "{{.ServerVersion}}"], timeout=30)
    if info.returncode != 0:
        return f"the Docker daemon does not answer: {(info.stderr or info.stdout).strip()[:200]}"
    for docker in candidates:
        if _run([docker, "buildx", "version"], timeout=30).returncode == 0:
            return [docker, "buildx", "build", "--load"], dict(os.environ)
        version = _run([docker, "version", "--format", "{{.Client.Version}}"], timeout=30).stdout.strip()
        if version and int(version.split(".")[0]) < 23:  # BuildKit built into the classic client
            return [docker, "build"], {**os.environ, "DOCKER_BUILDKIT": "1"}
    return f"no BuildKit-capable docker client among {candidates} (no buildx plugin, and clients >= 23 need it)"


def _skip_reason() -> str | None:
    if sys.platform != "linux":
        return "Linux only"
    client = _docker_client()
    if isinstance(client, str):
        return client
    if shutil.which("debootstrap") is None:
        return "no debootstrap (apt-get install debootstrap)"
    if os.geteuid() != 0:
        return "debootstrap needs root"
    return None


def _image_exists(docker: str, tag: str) -> bool:
    return _run([docker, "image", "inspect", tag], timeout=60).returncode == 0


def _import(docker: str, tag: str, tar_bytes: bytes | None = None, folder: Path | None = None) -> None:
    if folder is not None:
        tar = subprocess.Popen(["tar", "-C", str(folder), "-c", "."], stdout=subprocess.PIPE)
        result = subprocess.run([docker, "import", "-", tag], stdin=tar.stdout, capture_output=True, timeout=600)
        tar.wait()
    else:
        result = subprocess.run([docker, "import", "-", tag], input=tar_bytes, capture_output=True, timeout=600)
    assert result.returncode == 0, result.stderr


def _debian_base(docker: str, workdir: Path) -> None:
    """A minimal Debian with python3 (3.11) and this machine's certificate store (which holds the CA of a
    TLS-inspecting proxy, if there is one, so that pip/uv inside the build can reach PyPI)."""
    rootfs = workdir / "rootfs"
    step = _run(
        [
            "debootstrap",
            "--variant=minbase",
            "--include=ca-certificates,python3",
            DEBIAN_SUITE,
            str(rootfs),
            DEBIAN_MIRROR,
        ],
        timeout=1800,
    )
    assert step.returncode == 0, step.stdout[-2000:] + step.stderr[-2000:]
    _run(["chroot", str(rootfs), "apt-get", "clean"], timeout=120)
    bundle = Path(ssl.get_default_verify_paths().cafile or "/etc/ssl/certs/ca-certificates.crt")
    if bundle.exists():
        shutil.copyfile(bundle, rootfs / "etc/ssl/certs/ca-certificates.crt")
    _import(docker, BASE_TAG, folder=rootfs)
    shutil.rmtree(rootfs, ignore_errors=True)


def _uv_image(docker: str, workdir: Path) -> None:
    """An image holding only /uv and /uvx, from uv's manylinux wheel on PyPI (what ghcr.io/astral-sh/uv holds)."""
    wheels = workdir / "uv-wheel"
    step = _run(
        [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            "manylinux_2_17_x86_64",
            f"uv=={UV_VERSION}",
            "-d",
            str(wheels),
        ],
        timeout=600,
    )
    assert step.returncode == 0, step.stderr
    wheel = zipfile.ZipFile(next(wheels.glob("uv-*.whl")))
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name in wheel.namelist():
            if name.endswith(("/scripts/uv", "/scripts/uvx")):
                data = wheel.read(name)
                info = tarfile.TarInfo(Path(name).name)
                info.size, info.mode = len(data), 0o755
                tar.addfile(info, io.BytesIO(data))
    _import(docker, UV_TAG, tar_bytes=buffer.getvalue())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(f"Docker cannot run here: {reason}")
    build, env = _docker_client()
    docker = build[0]
    workdir = tmp_path_factory.mktemp("docker")
    rebuild = os.environ.get("DIFFSTEER_DOCKER_REBUILD_BASE") == "1"
    if rebuild or not _image_exists(docker, BASE_TAG):
        _debian_base(docker, workdir)
    if rebuild or not _image_exists(docker, UV_TAG):
        _uv_image(docker, workdir)
    tags = {}
    for target in ("train", "serve"):
        tag = f"diffsteer-test:{target}"
        step = _run(
            [
                *build,
                "-f",
                "docker/Dockerfile",
                "--target",
                target,
                "-t",
                tag,
                "--build-arg",
                f"CUDA_IMAGE={BASE_TAG}",
                "--build-arg",
                f"UV_IMAGE={UV_TAG}",
                "--build-arg",
                "UV_PYTHON_PREFERENCE=only-system",
                "--build-arg",
                "UV_NATIVE_TLS=true",
                "--build-arg",
                f"TINI_VERSION={TINI_DEBIAN}",
                "--progress=plain",
                ".",
            ],
            timeout=BUILD_TIMEOUT_S,
            env=env,
            cwd=ROOT,
        )
        assert step.returncode == 0, step.stdout[-4000:] + step.stderr[-4000:]
        tags[target] = tag
    return docker, tags


CONFIG = """\
model: builtin:proving-ground
output_dir: /output/run1
prompts: pg-train:single
eval_prompts: ''
reward: saturation:1
policy: cfg:scale=3
steps: 4
batch_size: 2
max_steps: 2
checkpoint_every: 1
threads: 1
tensorboard: false
progress: false
"""


def test_train_target_runs_alignprop_as_the_app_user_and_resumes(images, tmp_path):
    docker, tags = images
    configs, out = tmp_path / "configs", tmp_path / "out"
    configs.mkdir()
    out.mkdir()
    (configs / "alignprop.yaml").write_text(CONFIG)
    os.chown(out, APP_UID, APP_UID)  # the README's "$PWD/out", owned by the image's user
    # the README's command: config mounted read-only, output mounted, `alignprop CONFIG ... --resume`
    run = [
        docker,
        "run",
        "--rm",
        "-e",
        "HF_HUB_OFFLINE=1",
        "-v",
        f"{configs}:/config:ro",
        "-v",
        f"{out}:/output",
        tags["train"],
        "alignprop",
        "alignprop.yaml",
    ]
    first = _run([*run, "--set", "max_steps=1"], timeout=1200)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    run_dir = out / "run1"
    assert (run_dir / "checkpoints").is_dir()
    resumed = _run([*run, "--resume"], timeout=1200)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    rows = [r for r in (run_dir / "metrics.csv").read_text().splitlines() if ",train,reward," in r]
    assert [int(r.split(",")[0]) for r in rows] == [1, 2], rows  # each step once: step 2 continued from step 1
    assert (run_dir / "checkpoints" / "step-00000002.pt").is_file()
    assert list((run_dir / "adapters").rglob("*.safetensors"))
    owners = {p.stat().st_uid for p in run_dir.rglob("*")}
    assert owners == {APP_UID}, owners  # written by the non-root user, not by root


def test_serve_target_answers_a_generation(images):
    import httpx

    docker, tags = images
    started = _run([docker, "run", "-d", "--rm", "-e", "HF_HUB_OFFLINE=1", "-p", "127.0.0.1::8000", tags["serve"]])
    assert started.returncode == 0, started.stderr
    container = started.stdout.strip()
    try:
        user = _run([docker, "exec", container, "id", "-u"]).stdout.strip()
        assert user == str(APP_UID)
        port = _run([docker, "port", container, "8000/tcp"]).stdout.split()[0].rsplit(":", 1)[1]
        url = f"http://127.0.0.1:{port}"
        end = time.monotonic() + 600
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < end, _run([docker, "logs", container]).stderr[-3000:]
            time.sleep(1)
        r = httpx.post(
            f"{url}/generate",
            json={"prompt": "a red circle", "steps": 4, "seed": 3},
            headers={"Accept": "image/png"},
            timeout=300,
        )
        assert r.status_code == 200 and r.content[:8] == b"\x89PNG\r\n\x1a\n", r.text[:500]
        assert r.headers["x-diffsteer-seed"] == "3"
    finally:
        _run([docker, "rm", "-f", container], timeout=120)
