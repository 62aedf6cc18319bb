"""Tests of docker/entrypoint.sh, run against a fake `diffsteer` that records how it was called."""

import os
import stat
import subprocess
import tempfile
from pathlib import Path

import pytest

ENTRYPOINT = Path(__file__).resolve().parent.parent / "docker" / "entrypoint.sh"

# Records its PID and argv (NUL-separated, so spaces and newlines survive) into $FAKE_RECORD.
FAKE_DIFFSTEER = """#!/bin/sh
printf '%s' "$$" > "$FAKE_RECORD.pid"
: > "$FAKE_RECORD.argv"
for arg in "$@"; do printf '%s\\0' "$arg" >> "$FAKE_RECORD.argv"; done
exit "${FAKE_EXIT:-0}"
"""


class Sandbox:
    """A temp tree with bin/diffsteer (the fake), config/ and output/; runs the entrypoint inside it."""

    def __init__(self, root: Path):
        self.root = root
        self.bin = root / "bin"
        self.config = root / "config"
        self.output = root / "output"
        for d in (self.bin, self.config, self.output):
            d.mkdir()
        fake = self.bin / "diffsteer"
        fake.write_text(FAKE_DIFFSTEER)
        fake.chmod(0o755)
        self.record = root / "record"

    def env(self, **extra: str) -> dict:
        env = {
            "PATH": f"{self.bin}:/usr/bin:/bin",
            "HOME": str(self.root),
            "FAKE_RECORD": str(self.record),
            "DIFFSTEER_CONFIG_DIR": str(self.config),
            "DIFFSTEER_OUTPUT_DIR": str(self.output),
        }
        env.update(extra)
        return env

    def run(self, *args: str, env: dict | None = None, **popen_kwargs):
        """Run the entrypoint; returns (process pid, returncode, stderr)."""
        proc = subprocess.Popen(
            [str(ENTRYPOINT), *args],
            env=self.env() if env is None else env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **popen_kwargs,
        )
        _, stderr = proc.communicate(timeout=30)
        return proc.pid, proc.returncode, stderr

    def argv(self) -> list[str]:
        data = (self.root / "record.argv").read_text()
        return data.split("\0")[:-1]

    def fake_pid(self) -> int:
        return int((self.root / "record.pid").read_text())

    def fake_ran(self) -> bool:
        return (self.root / "record.pid").exists()


@pytest.fixture
def box(tmp_path):
    return Sandbox(tmp_path)


def test_entrypoint_is_executable_posix_sh():
    assert ENTRYPOINT.stat().st_mode & stat.S_IXUSR
    assert ENTRYPOINT.read_text().startswith("#!/bin/sh\n")
    subprocess.run(["sh", "-n", str(ENTRYPOINT)], check=True)


def test_train_positional_method_config_and_extra_args(box):
    (box.config / "alignprop.yaml").write_text("lr: 1e-4\n")
    pid, rc, err = box.run("train", "alignprop", "alignprop.yaml", "--resume", "--note", "two words")
    assert (rc, err) == (0, "")
    assert box.argv() == [
        "train",
        "alignprop",
        "--config",
        f"{box.config}/alignprop.yaml",
        "--resume",
        "--note",
        "two words",
    ]
    assert box.fake_pid() == pid  # exec: diffsteer replaced the shell, so it receives the signals


def test_train_defaults_from_environment(box):
    (box.config / "smpo.yaml").write_text("{}\n")
    env = box.env(DIFFSTEER_METHOD="smpo", DIFFSTEER_CONFIG="smpo.yaml")
    _, rc, _ = box.run(env=env)  # no arguments at all means `train`
    assert rc == 0
    assert box.argv() == ["train", "smpo", "--config", f"{box.config}/smpo.yaml"]
    _, rc, _ = box.run("train", "--resume", "--max-steps", "10", env=env)
    assert rc == 0
    assert box.argv() == ["train", "smpo", "--config", f"{box.config}/smpo.yaml", "--resume", "--max-steps", "10"]


def test_train_arguments_override_environment_and_absolute_config(box):
    cfg = box.root / "elsewhere.yaml"
    cfg.write_text("{}\n")
    env = box.env(DIFFSTEER_METHOD="smpo", DIFFSTEER_CONFIG="missing.yaml")
    _, rc, err = box.run("train", "fdistill", str(cfg), env=env)
    assert (rc, err) == (0, "")
    assert box.argv() == ["train", "fdistill", "--config", str(cfg)]
    _, rc, _ = box.run("train", "alignprop", "--resume", env=box.env(DIFFSTEER_CONFIG=str(cfg)))
    assert rc == 0
    assert box.argv() == ["train", "alignprop", "--config", str(cfg), "--resume"]


def test_train_default_config_dir_is_slash_config(box):
    env = box.env(DIFFSTEER_METHOD="alignprop", DIFFSTEER_CONFIG="no-such-file.yaml")
    del env["DIFFSTEER_CONFIG_DIR"]
    _, rc, err = box.run(env=env)
    assert rc == 66
    assert "/config/no-such-file.yaml" in err


def test_missing_config_file_fails_clearly(box):
    _, rc, err = box.run("train", "alignprop", "nope.yaml")
    assert rc == 66
    assert f"config file not found: {box.config}/nope.yaml" in err
    assert err.startswith("diffsteer-entrypoint: error:")
    assert not box.fake_ran()


def test_config_that_is_a_directory_is_rejected(box):
    (box.config / "adir").mkdir()
    _, rc, err = box.run("train", "alignprop", "adir")
    assert rc == 66 and "not found" in err and not box.fake_ran()


@pytest.mark.parametrize(
    "args, env_extra, needle",
    [
        ((), {}, "DIFFSTEER_METHOD"),
        (("train",), {"DIFFSTEER_CONFIG": "x.yaml"}, "no training method"),
        (("train", "alignprop"), {}, "DIFFSTEER_CONFIG"),
        (("train", "--resume"), {"DIFFSTEER_METHOD": "smpo"}, "no config file for method 'smpo'"),
    ],
)
def test_missing_method_or_config_is_a_usage_error(box, args, env_extra, needle):
    _, rc, err = box.run(*args, env=box.env(**env_extra))
    assert rc == 64
    assert needle in err
    assert not box.fake_ran()


def test_output_dir_created_when_missing(box):
    (box.config / "c.yaml").write_text("{}\n")
    out = box.root / "runs" / "exp1"
    _, rc, _ = box.run("train", "alignprop", "c.yaml", env=box.env(DIFFSTEER_OUTPUT_DIR=str(out)))
    assert rc == 0 and out.is_dir()
    assert list(out.iterdir()) == []  # the write probe is cleaned up


def test_output_path_that_is_a_file_is_rejected(box):
    (box.config / "c.yaml").write_text("{}\n")
    not_dir = box.root / "file"
    not_dir.write_text("")
    _, rc, err = box.run("train", "alignprop", "c.yaml", env=box.env(DIFFSTEER_OUTPUT_DIR=str(not_dir)))
    assert rc == 73 and "is not a directory" in err and not box.fake_ran()
    _, rc, err = box.run("train", "alignprop", "c.yaml", env=box.env(DIFFSTEER_OUTPUT_DIR=f"{not_dir}/sub"))
    assert rc == 73 and "cannot be created" in err and not box.fake_ran()


def test_unwritable_output_dir_fails_clearly():
    # Root ignores permission bits, so as root the entrypoint runs as `nobody` in a world-readable tree.
    as_root = os.geteuid() == 0
    with tempfile.TemporaryDirectory(prefix="diffsteer-entrypoint-") as tmp:
        root = Path(tmp)
        root.chmod(0o755)
        box = Sandbox(root)
        (box.config / "c.yaml").write_text("{}\n")
        box.config.chmod(0o755)
        box.output.chmod(0o555)
        record_dir = root / "rec"
        record_dir.mkdir(mode=0o777)
        record_dir.chmod(0o777)
        box.record = record_dir / "record"
        env = box.env(FAKE_RECORD=str(box.record))
        kwargs = {"user": 65534, "group": 65534, "extra_groups": []} if as_root else {}
        _, rc, err = box.run("train", "alignprop", "c.yaml", env=env, **kwargs)
        assert rc == 73, err
        assert f"output directory {box.output} is not writable" in err
        assert not (record_dir / "record.pid").exists()
        # Same tree with a writable output dir: the only difference is the permission.
        box.output.chmod(0o777)
        _, rc, err = box.run("train", "alignprop", "c.yaml", env=env, **kwargs)
        assert (rc, err) == (0, "")


def test_serve_defaults_to_all_interfaces_port_8000(box):
    pid, rc, _ = box.run("serve")
    assert rc == 0
    assert box.argv() == ["serve", "--host", "0.0.0.0", "--port", "8000"]
    assert box.fake_pid() == pid


def test_serve_forwards_given_arguments(box):
    _, rc, _ = box.run("serve", "--port", "9000", "--workers", "2")
    assert rc == 0
    assert box.argv() == ["serve", "--port", "9000", "--workers", "2"]


def test_other_subcommands_pass_through_verbatim(box):
    pid, rc, _ = box.run("ab", "--arms", "cfg:scale=7.5", "apg:eta=0", "--prompt", "a red cube * on $HOME")
    assert rc == 0
    assert box.argv() == ["ab", "--arms", "cfg:scale=7.5", "apg:eta=0", "--prompt", "a red cube * on $HOME"]
    assert box.fake_pid() == pid
    box.run("--help")
    assert box.argv() == ["--help"]


def test_exit_code_of_diffsteer_is_returned(box):
    _, rc, _ = box.run("generate", env=box.env(FAKE_EXIT="3"))
    assert rc == 3


def test_missing_diffsteer_executable(box):
    (box.bin / "diffsteer").unlink()
    _, rc, err = box.run("serve")
    assert rc == 127
    assert "no 'diffsteer' executable on PATH" in err


def test_a_method_without_train_is_a_training_job(box):
    """The README's `docker run ... diffsteer:train alignprop alignprop.yaml --resume`."""
    (box.config / "alignprop.yaml").write_text("lr: 1e-4\n")
    _, rc, _ = box.run("alignprop", "alignprop.yaml", "--resume")
    assert rc == 0
    assert box.argv() == ["train", "alignprop", "--config", f"{box.config}/alignprop.yaml", "--resume"]
