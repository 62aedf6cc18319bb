"""The GPU suite (benchmarks/gpu_suite.py) runs end to end with --smoke on CPU, so it is known to work before a
device is lent: every row yields its lines, the JSON and the Markdown table are written."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import gpu_suite  # noqa: E402

pytestmark = pytest.mark.slow  # every test here starts Ray or a subprocess per row


def test_smoke_run_measures_every_row(tmp_path):
    assert gpu_suite.main(["--smoke", "--out", str(tmp_path), "--budget-s", "1800"]) == 0
    report = json.loads((tmp_path / "gpu_suite.json").read_text())
    by_row = {r["row"]: r for r in report["rows"]}
    assert list(by_row) == list(gpu_suite.ROWS)
    for name, record in by_row.items():
        assert record["status"] == "ok", (name, record.get("error"), record.get("stderr_tail"))
        assert record["lines"], name
    measures = {ln["measure"]: ln for r in report["rows"] for ln in r["lines"]}
    serving = [ln for ln in measures.values() if ln["row"] == "serving" and ln["baseline"] == "batching off"]
    assert [ln["measure"].split(",")[1].strip() for ln in serving] == ["1 clients (2 steps", "2 clients (2 steps"]
    assert all(ln["value"] > 0 and ln["ratio"] > 0 for ln in serving)
    sampler = [ln for ln in measures.values() if ln["row"] == "sampler"]
    assert len(sampler) == 2 and all(ln["baseline_value"] > 0 for ln in sampler)
    kernels = {ln["measure"]: ln for ln in by_row["kernels"]["lines"]}
    assert kernels["xformers"]["value"] is None and "xformers" in kernels["xformers"]["error"]  # needs CUDA
    cl = kernels["channels_last, UNet call, 2 rows"]
    assert cl["max_abs_diff"] < 1e-4 and cl["value"] > 0
    assert by_row["compile"]["lines"][0]["max_abs_diff"] < 1e-4
    alignprop = [ln for ln in by_row["alignprop"]["lines"] if ln["unit"] == "s"]
    assert len(alignprop) == 4 and all(ln["value"] > 0 for ln in alignprop)
    reno = by_row["reno"]["lines"]
    assert reno[0]["iterations_run"] == 3 and reno[0]["value"] > reno[0]["baseline_value"]
    for row, text_tokens, passes in (("flow_sd35m", 333, 2), ("flow_flux", 512, 1)):
        lines = by_row[row]["lines"]
        calls = [ln for ln in lines if ln["unit"] == "s"]
        assert [ln["rows"] for ln in calls] == sorted({1, 2, 8, passes, 4 * passes}), row
        assert all(ln["text_tokens"] == text_tokens and ln["image_tokens"] == 64 for ln in calls), row  # real text
        assert all(ln["value"] > 0 and ln["flops_per_call"] == ln["rows"] * calls[0]["flops_per_call"] for ln in calls)
        (mfu,) = [ln for ln in lines if ln["unit"] == "TFLOPS"]
        assert mfu["value"] > 0 and mfu["goal"] == "MFU ≥ 40%" and mfu["met"] is None  # no peak known for a CPU
        (gain,) = [ln for ln in lines if ln["unit"] == "rows/s"]
        assert gain["ratio"] == pytest.approx(gain["value"] / gain["baseline_value"], rel=1e-3) and gain["ratio"] > 0
        (memory,) = [ln for ln in lines if ln["unit"] == "GB"]
        assert memory["value"] > 0 and memory["baseline_value"] > 0
        generated = [ln for ln in lines if ln["unit"] == "images/s"]
        assert [ln["batch"] for ln in generated] == [1, 4], row
        assert all(ln["value"] > 0 and 0 < ln["ratio"] and ln["nfe"] == 2 * passes for ln in generated), row
    methods = ["alignprop K = 1", "alignprop K = 2 (full)", "dpo", "smpo", "fdistill", "grpo", "nft"]
    for row in ("train_sd35m", "train_flux"):
        lines = by_row[row]["lines"]
        steps = {ln.get("method"): ln for ln in lines if ln["unit"] == "s"}
        assert list(steps) == methods, (row, [ln.get("error") for ln in lines])
        assert all(ln["value"] > 0 and ln["baseline_value"] > 0 for ln in steps.values()), row
        assert steps["alignprop K = 1"]["checkpointing"] and steps["dpo"]["checkpointing"], row
        memory = [ln for ln in lines if ln["unit"] == "GB"]
        assert [ln["method"] for ln in memory] == methods and all(ln["value"] > 0 for ln in memory), row
    fsdp = by_row["fsdp_sd35m"]["lines"]
    assert [(ln["sharding"], ln["unit"]) for ln in fsdp] == [
        ("none", "s"),
        ("none", "GB"),
        ("fsdp", "s"),
        ("fsdp", "GB"),
    ]
    assert all(ln["value"] > 0 for ln in fsdp) and fsdp[2]["baseline_value"] == fsdp[0]["value"]
    table = (tmp_path / "gpu_suite.md").read_text()
    assert "| row | measure | value | baseline" in table and "| reno |" in table


def test_a_row_in_its_own_process_reports_and_fails_alone(tmp_path):
    """The device path: each row is a child process; a failure is recorded, not raised."""
    import argparse

    args = argparse.Namespace(device="cpu", smoke=True, threads=1)
    paths = {"sd15": str(tmp_path / "missing"), "sdxl_unet": str(tmp_path / "missing"), "vit_h": ""}
    record = gpu_suite.run_row("mfu", args, paths, timeout=300)
    assert record["status"] == "failed" and "missing" in record["stderr_tail"]


def test_peak_table_matches_device_names():
    assert gpu_suite.bf16_peak_tflops("NVIDIA H200") == 989.4
    assert gpu_suite.bf16_peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_suite.bf16_peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_suite.bf16_peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert gpu_suite.bf16_peak_tflops("NVIDIA A10G") == 70.0
    assert gpu_suite.bf16_peak_tflops("Some Future GPU") is None
