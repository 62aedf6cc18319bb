"""``diffsteer ab`` end to end on the built-in tiny model (2 steps, 32x32): text, GenEval, PartiPrompts and
proving-ground prompts; results.json; resume; bad input; the Python entry point's progress and cancellation."""

import json
import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from diffsteer.evaluation.ab import ABCancelled, ABConfig, run_ab
from diffsteer.evaluation.metrics import clipped_fraction, hsv_saturation_mean
from diffsteer.guidance.events import GenerationCancelled
from diffsteer.guidance.images import read_png_metadata
from diffsteer.service.cli import main

TINY = ["--model", "builtin:tiny", "--device", "cpu", "--steps", "2", "--size", "32x32", "--bootstrap", "200", "-q"]
TEXT_PROMPTS = "a red circle\na blue square\na green triangle\n"
TEXT_METRICS = "saturation,oversaturation,nfe,latency,reward:contrast"
EXPECTED_KEYS = {"version", "config", "arms", "prompts", "items", "metrics", "images", "summary", "statistics", "run"}
STAT_KEYS = {
    "metric",
    "direction",
    "unit",
    "n_images",
    "n_prompts",
    "mean_a",
    "mean_b",
    "mean_diff",
    "ci_low",
    "ci_high",
    "confidence",
    "wins",
    "ties",
    "losses",
    "sign_test_p",
    "wilcoxon_statistic",
    "wilcoxon_p",
    "verdict",
}


@contextmanager
def counting_generation():
    """Count the images the sampler is asked for (generate is looked up in diffsteer.evaluation.runner at call time)."""
    import diffsteer.evaluation.runner as runner

    counter = {"images": 0, "calls": 0}
    real = runner.generate

    def spy(model, params, **kwargs):
        counter["calls"] += 1
        counter["images"] += len(params["prompt"])
        return real(model, params, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(runner, "generate", spy)
        yield counter


def text_args(prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "ab",
        "--arm",
        "base=cfg:scale=1",
        "--arm",
        "apg=apg:scale=5",
        "--prompts",
        str(prompts),
        "--seeds",
        "2",
        "--metrics",
        TEXT_METRICS,
        *TINY,
        "-o",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def text_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("ab_text")
    prompts = root / "prompts.txt"
    prompts.write_text(TEXT_PROMPTS, encoding="utf-8")
    out = root / "run"
    with counting_generation() as counter:
        code = main(text_args(prompts, out))
    return {"code": code, "out": out, "prompts": prompts, "generated": counter["images"]}


def load(out: Path) -> dict:
    return json.loads((out / "results.json").read_text(encoding="utf-8"))


def test_text_file_end_to_end(text_run):
    assert text_run["code"] == 0
    out = text_run["out"]
    assert text_run["generated"] == 12  # 2 arms x 3 prompts x 2 seeds
    r = load(out)
    assert set(r) == EXPECTED_KEYS and r["version"] == 1
    assert [(a["name"], a["policy"], a["model"]) for a in r["arms"]] == [
        ("base", "cfg:scale=1.0", "builtin:tiny"),
        ("apg", "apg:scale=5.0", "builtin:tiny"),
    ]
    assert r["prompts"]["kind"] == "text" and r["prompts"]["n_prompts"] == 3 and r["prompts"]["n_items"] == 6
    columns = [m["name"] for m in r["metrics"]]
    assert columns == ["saturation", "oversaturation", "nfe", "latency", "reward:contrast"]
    assert {m["name"]: m["direction"] for m in r["metrics"]}["reward:contrast"] == "higher"
    assert r["run"] == {"generated": 12, "skipped": 0, "total": 12, "seconds": r["run"]["seconds"]}

    images = r["images"]
    assert len(images) == 12 and len({(i["arm"], i["prompt_id"], i["seed"]) for i in images}) == 12
    assert sorted(p.relative_to(out).as_posix() for p in (out / "images").rglob("*.png")) == sorted(
        i["path"] for i in images
    )
    for img in images:
        assert set(img["metrics"]) == set(columns) and all(isinstance(v, float | int) for v in img["metrics"].values())
        assert img["metrics"]["nfe"] == (2 if img["arm"] == "base" else 4)  # 2 steps; cfg at scale 1 skips uncond
        assert img["path"].startswith(f"images/{img['arm']}/") and img["seed"] in (0, 1)
    # Image metrics are those of the saved 8-bit PNG; the PNG carries the generation parameters.
    first = images[0]  # item 0, arm base
    pixels = np.asarray(Image.open(out / first["path"]).convert("RGB"))
    assert pixels.shape == (32, 32, 3)
    assert first["metrics"]["saturation"] == pytest.approx(hsv_saturation_mean(pixels), abs=1e-12)
    assert first["metrics"]["oversaturation"] == clipped_fraction(pixels)
    meta = read_png_metadata((out / first["path"]).read_bytes())
    assert (meta["seed"], meta["prompt"], meta["policy"], meta["steps"]) == (
        first["seed"],
        first["prompt"],
        "cfg:scale=1.0",
        2,
    )

    # Summaries are means over the images; statistics: one pair, every column.
    for arm in ("base", "apg"):
        mine = [i["metrics"]["saturation"] for i in images if i["arm"] == arm]
        assert r["summary"][arm]["saturation"]["mean"] == pytest.approx(np.mean(mine))
    [pair] = r["statistics"]
    # latency is a per-batch figure here (batch_size > 1): means only, no paired test
    assert (pair["arm_a"], pair["arm_b"]) == ("base", "apg")
    assert list(pair["metrics"]) == [c for c in columns if c != "latency"]
    for m in pair["metrics"].values():
        assert STAT_KEYS <= set(m) and m["unit"] == "prompt" and (m["n_prompts"], m["n_images"]) == (3, 6)
        assert m["ci_low"] - 1e-9 <= m["mean_diff"] <= m["ci_high"] + 1e-9 and m["wins"] + m["ties"] + m["losses"] == 3
    nfe = pair["metrics"]["nfe"]
    assert (nfe["mean_diff"], nfe["ci_low"], nfe["ci_high"]) == (2.0, 2.0, 2.0)
    # every prompt's difference is the same (a zero-width CI) and there are 3 prompts: no verdict either way
    assert (nfe["wins"], nfe["ties"], nfe["losses"]) == (0, 0, 3) and nfe["verdict"].startswith("too few")
    assert len((out / "records.jsonl").read_text().splitlines()) == 12
    assert (out / "report.html").is_file() and (out / "plots" / "distributions.png").is_file()


@pytest.mark.slow
def test_resume_skips_done_images(text_run, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(text_run["out"], out)
    before = load(out)
    prompts = text_run["prompts"]

    with counting_generation() as counter:  # everything done: nothing generated
        assert main(text_args(prompts, out, "--no-report")) == 0
    assert counter["images"] == 0
    again = load(out)
    assert again["run"]["generated"] == 0 and again["run"]["skipped"] == 12
    assert again["images"] == before["images"] and again["statistics"] == before["statistics"]

    gone = next(i for i in before["images"] if i["arm"] == "apg")
    (out / gone["path"]).unlink()  # a missing PNG is regenerated, and only it
    with counting_generation() as counter:
        assert main(text_args(prompts, out, "--no-report")) == 0
    assert counter["images"] == 1 and (out / gone["path"]).is_file()
    redone = next(i for i in load(out)["images"] if i["path"] == gone["path"])
    assert redone["metrics"]["saturation"] == pytest.approx(gone["metrics"]["saturation"], abs=1e-12)  # same seed

    # A metric added later is computed from the saved PNGs, without generating.
    args = text_args(prompts, out, "--no-report")
    args[args.index("--metrics") + 1] = TEXT_METRICS + ",reward:brightness"
    with counting_generation() as counter:
        assert main(args) == 0
    assert counter["images"] == 0
    assert all("reward:brightness" in i["metrics"] for i in load(out)["images"])

    # Changing one arm's policy regenerates that arm only.
    args[args.index("apg=apg:scale=5")] = "apg=apg:scale=7"
    with counting_generation() as counter:
        assert main(args) == 0
    assert counter["images"] == 6
    assert load(out)["arms"][1]["policy"] == "apg:scale=7.0"


@pytest.mark.slow
def test_geneval_file_three_arms_share_noise(tmp_path):
    meta = tmp_path / "evaluation_metadata.jsonl"
    meta.write_text(
        '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n'
        '{"tag": "colors", "include": [{"class": "car", "count": 1, "color": "red"}], "prompt": "a photo of a red car"}\n',
        encoding="utf-8",
    )
    out = tmp_path / "run"
    args = [
        "ab",
        "--arm",
        "base=cfg:scale=1",
        "--arm",
        "same=cfg:scale=1.0@builtin:tiny",
        "--arm",
        "hi=cfg:scale=6",
        "--prompts",
        str(meta),
        "--metrics",
        "saturation,oversaturation,nfe",
        *TINY,
        "--no-report",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    r = load(out)
    assert r["prompts"]["kind"] == "geneval"
    assert [(p["prompt"], p["category"]) for p in r["prompts"]["list"]] == [
        ("a photo of a bench", "single_object"),
        ("a photo of a red car", "colors"),
    ]
    assert [(p["arm_a"], p["arm_b"]) for p in r["statistics"]] == [("base", "same"), ("base", "hi"), ("same", "hi")]
    by = {(i["arm"], i["prompt_id"]): np.asarray(Image.open(out / i["path"])) for i in r["images"]}
    for pid in ("p0000", "p0001"):
        np.testing.assert_array_equal(by[("base", pid)], by[("same", pid)])  # same seed, same policy: same image
        assert not np.array_equal(by[("base", pid)], by[("hi", pid)])
    same = r["statistics"][0]["metrics"]
    for m in same.values():
        assert (m["mean_diff"], m["wins"], m["ties"], m["losses"]) == (0.0, 0, 2, 0)
        assert m["verdict"].startswith("too few")  # 2 prompts
    assert not (out / "report.html").exists()


@pytest.mark.slow
def test_parti_file(tmp_path, capsys):
    tsv = tmp_path / "PartiPrompts.tsv"
    tsv.write_text(
        "Prompt\tCategory\tChallenge\tNote\na red circle\tBasic\tSimple Detail\t\n"
        "a blue square on a table\tArtifacts\tPerspective\tfrom parti\n",
        encoding="utf-8",
    )
    out = tmp_path / "run"
    args = [
        "ab",
        "--arm",
        "a=cfg:scale=1",
        "--arm",
        "b=cfg:scale=4",
        "--prompts",
        str(tsv),
        "--metrics",
        "nfe,saturation",
        *[a for a in TINY if a != "-q"],
        "--baseline",
        "b",
        "--unit",
        "image",
        "--no-report",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    captured = capsys.readouterr()  # a tqdm bar on stderr, a summary on stdout
    assert "ab: 100%" in captured.err and "4/4" in captured.err
    assert "a vs b (differences a - b; tests per image):" in captured.out and "4 images generated" in captured.out
    r = load(out)
    assert r["prompts"]["kind"] == "parti"
    assert [(p["category"], p["extra"]["challenge"]) for p in r["prompts"]["list"]] == [
        ("Basic", "Simple Detail"),
        ("Artifacts", "Perspective"),
    ]
    [pair] = r["statistics"]
    assert (pair["arm_a"], pair["arm_b"]) == ("b", "a") and pair["metrics"]["nfe"]["unit"] == "image"
    assert pair["metrics"]["nfe"]["mean_diff"] == -2.0
    assert pair["metrics"]["nfe"]["verdict"] == "too few to tell (n = 2 < 5)"


@pytest.mark.slow
def test_proving_ground_prompts_with_verifier(tmp_path):
    out = tmp_path / "run"
    args = [
        "ab",
        "--arm",
        "off=cfg:scale=1",
        "--arm",
        "on=cfg:scale=3",
        "--prompts",
        "pg:single",
        "--max-prompts",
        "2",
        "--metrics",
        "verifier,nfe",
        *TINY,
        "--no-report",
        "-o",
        str(out),
    ]
    assert main(args) == 0
    r = load(out)
    assert r["prompts"]["kind"] == "pg" and all(p["category"] == "single" and "spec" in p for p in r["prompts"]["list"])
    assert all(i["seed"] >= 2**31 for i in r["images"])  # the suite's held-out seeds
    cols = [m["name"] for m in r["metrics"]]
    assert cols[0] == "verifier.passed" and "verifier.position_correct" in cols
    for img in r["images"]:
        assert img["metrics"]["verifier.passed"] in (0.0, 1.0) and img["metrics"]["verifier.position_correct"] is None
    # No relation in single-object prompts: position_correct is undefined and left out of the statistics.
    assert "verifier.position_correct" not in r["statistics"][0]["metrics"]
    assert "verifier.passed" in r["statistics"][0]["metrics"]


BAD_INPUT = [
    (["--arm", "a=cfg", "--arm", "b=nope"], "--arm", "nope"),
    (["--arm", "a=cfg"], "--arm", "at least two"),
    ([], "--arm", "at least two"),
    (["--arm", "a=cfg", "--arm", "b=cfg:scale=-3"], "--arm", "scale"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--metrics", "nfe,sharpness"], "--metrics", "sharpness"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--metrics", "nfe,reward:nope"], "--metrics", "nope"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--metrics", "verifier"], "--metrics", "proving-ground"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--direction", "nfe=up"], "--direction", "nfe"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--baseline", "c"], "--baseline", "'c'"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--size", "33x32"], "--size", "multiple of 8"),
    (["--arm", "a=cfg", "--arm", "b=apg", "--seeds", "0"], "--seeds", ""),
]


@pytest.mark.parametrize("extra, option, text", BAD_INPUT)
def test_bad_input_exits_2_naming_the_option(tmp_path, capsys, extra, option, text):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a photo of a cat\n", encoding="utf-8")  # not a proving-ground caption
    out = tmp_path / "run"
    argv = ["ab", "--prompts", str(prompts), *TINY, "-o", str(out), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"diffsteer: error: {option}:" in err and text in err, err
    assert not out.exists()  # validated before anything is written


@pytest.mark.parametrize(
    "content, text",
    [
        (None, "does not exist"),
        (
            '{"tag": "x", "include": [], "prompt": "ok"}\n{"tag": "x", "include": [], "prompt": 3}\n',
            ":2: prompt must be",
        ),
        ('{"tag": "x", "include": [], "prompt": "ok"}\n{"prompt": "p", "include": []\n', ":2: not a JSON object"),
    ],
)
def test_bad_prompt_files(tmp_path, capsys, content, text):
    path = tmp_path / "evaluation_metadata.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    argv = ["ab", "--arm", "a=cfg", "--arm", "b=apg", "--prompts", str(path), *TINY, "-o", str(tmp_path / "run")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "diffsteer: error: --prompts:" in err and text in err, err


def test_missing_required_option_is_an_argparse_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["ab", "--arm", "a=cfg", "--arm", "b=apg", "-o", "x"])
    assert e.value.code == 2 and "--prompts" in capsys.readouterr().err


@pytest.mark.slow
def test_run_ab_progress_cancel_and_resume(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a red circle\na blue square\n", encoding="utf-8")
    config = ABConfig.parse(
        {
            "arms": [{"name": "a", "policy": "cfg:scale=1"}, {"name": "b", "policy": {"name": "cfg", "scale": 3}}],
            "prompts": str(prompts),
            "seeds": 2,
            "output_dir": str(tmp_path / "run"),
            "model": "builtin:tiny",
            "device": "cpu",
            "steps": 2,
            "batch_size": 2,
            "metrics": ["nfe", "saturation"],
            "n_resamples": 200,
            "report": False,
        }
    )
    events = []
    assert issubclass(ABCancelled, GenerationCancelled)
    with pytest.raises(ABCancelled):
        run_ab(config, progress=events.append, cancel=lambda: any(e.done >= 2 for e in events))
    # The first chunk (arm a, 2 images) finished and was recorded before the stop.
    assert len((tmp_path / "run" / "records.jsonl").read_text().splitlines()) == 2
    assert not (tmp_path / "run" / "results.json").exists()

    events = []
    results = run_ab(config, progress=events.append)
    assert results["run"]["generated"] == 6 and results["run"]["skipped"] == 2
    assert [e.done for e in events] == sorted(e.done for e in events)
    assert events[-1].stage == "done" and events[-1].done == events[-1].total == 8
    steps = [e for e in events if e.step is not None]
    assert steps and all(e.steps == 2 and e.arm in ("a", "b") for e in steps)
    assert {e.stage for e in events} >= {"generate", "statistics", "done"}
    assert results == load(tmp_path / "run")
