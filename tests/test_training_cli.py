"""``diffsteer train``: shipped configs by name, and ``--help`` listing a method's config fields."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from diffsteer.service.cli import main
from diffsteer.training.config_io import shipped_configs


def test_a_shipped_config_is_addressable_by_name(capsys, tmp_path):
    assert "smpo-proving-ground" in shipped_configs()
    assert main(["train", "smpo", "--config", "smpo-proving-ground", "--print-config"]) == 0
    by_name = capsys.readouterr().out
    assert main(["train", "smpo", "--config", "smpo-proving-ground.yaml", "--print-config"]) == 0
    assert capsys.readouterr().out == by_name
    assert "beta" in by_name  # SmPO's fields, with the shipped file's values
    local = tmp_path / "mine.yaml"
    local.write_text("max_steps: 3\n")
    assert main(["train", "smpo", "--config", str(local), "--print-config"]) == 0
    assert "max_steps: 3" in capsys.readouterr().out


def test_an_unknown_config_names_the_option_and_the_shipped_ones(capsys):
    assert main(["train", "smpo", "--config", "nope", "--print-config"]) == 2
    err = capsys.readouterr().err
    assert "--config" in err and "smpo-proving-ground" in err


@pytest.mark.parametrize("method", ["alignprop", "smpo", "fdistill"])
def test_method_help_lists_its_fields(capsys, method):
    assert main(["train", method, "--help"]) == 0
    out = capsys.readouterr().out
    assert "--config" in out and f"{method}'s config fields" in out and "max_steps:" in out


def test_train_help_without_a_method(capsys):
    assert main(["train", "--help"]) == 0
    assert "training method" in capsys.readouterr().out
