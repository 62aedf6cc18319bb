"""benchmarks/online_rl_proving_ground.py --smoke: AlignProp, SmPO, Flow-GRPO and DiffusionNFT trained at equal wall
time on the tiny SD3 transformer, their curves, exported pipelines and the held-out A/B table."""

from __future__ import annotations

import json

from benchmarks.online_rl_proving_ground import main


def test_the_smoke_run_trains_every_method_and_writes_the_table_and_the_curve(tmp_path, capsys):
    assert main(["-o", str(tmp_path), "--smoke"]) == 0
    summary = json.loads((tmp_path / "summary.json").read_text())
    training = summary["training"]
    assert set(training["steps"]) == {"alignprop", "smpo", "grpo", "nft"} and all(
        s >= 1 for s in training["steps"].values()
    )
    assert all(len(points) == 2 for points in training["curve"].values())  # at 0 and at the end of the budget
    assert training["setup_s"]["smpo"] > 0 and training["curve"]["smpo"][0]["train_s"] > 0  # its pairs count
    assert all(point["train_s"] >= 1.0 for points in training["curve"].values() for point in points[1:])
    single = summary["evaluation"]["single"]
    assert set(single["pass"]) == {"base", "base_cfg1", "alignprop", "smpo", "grpo", "nft"} and single["n"] == 1
    assert (tmp_path / "curve.png").stat().st_size > 0
    table = capsys.readouterr().out
    assert "| single (trained) | 1 |" in table and "grpo" in table
