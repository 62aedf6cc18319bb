"""A/B building blocks without a model: the per-prompt statistics path (hand-computed, with ties), image
metrics, metric lists, arm strings, prompt sources and the config's validation."""

import json
import math

import numpy as np
import pytest

from diffsteer.evaluation.ab import ABConfig, parse_arm
from diffsteer.evaluation.metrics import clipped_fraction, columns_for, hsv_saturation_mean, parse_metric_list
from diffsteer.evaluation.prompts import detect_format, load_prompts
from diffsteer.evaluation.results import arm_summaries, paired_statistics
from diffsteer.guidance.errors import InvalidInput

# Five prompts with two seeds each. Per-image differences d = B - A:
#   P1 [1, 1] -> mean 1      P2 [2, -2] -> mean 0 (a tie per prompt, a win and a loss per image)
#   P3 [3, 1] -> mean 2      P4 [-0.5, -0.5] -> mean -0.5      P5 [1, 3] -> mean 2
PIDS = ["P1", "P1", "P2", "P2", "P3", "P3", "P4", "P4", "P5", "P5"]
D = np.array([1, 1, 2, -2, 3, 1, -0.5, -0.5, 1, 3], dtype=float)
A = np.arange(10, dtype=float) / 10
B = A + D


def _stats(unit, direction="higher", a=A, b=B, pids=PIDS, **kw):
    values = {"A": {"q": a}, "B": {"q": b}}
    return paired_statistics(values, pids, {"q": direction}, unit=unit, n_resamples=2000, **kw)


def test_per_prompt_aggregation_hand_computed():
    [pair] = _stats("prompt")
    assert (pair["arm_a"], pair["arm_b"]) == ("A", "B")
    m = pair["metrics"]["q"]
    assert m["unit"] == "prompt" and m["n_prompts"] == 5 and m["n_images"] == 10
    assert m["mean_a"] == pytest.approx(A.mean()) and m["mean_b"] == pytest.approx(A.mean() + 0.9)
    assert m["mean_diff"] == pytest.approx(0.9)  # sum(d) / 10, over images
    # Prompt means [1, 0, 2, -0.5, 2]: 3 wins, 1 tie (P2), 1 loss.
    assert (m["wins"], m["ties"], m["losses"]) == (3, 1, 1)
    assert m["sign_test_p"] == pytest.approx(2 * (1 + 4) / 2**4)  # n = 4 after dropping the tie, k = 1
    # Wilcoxon on [1, 2, -0.5, 2], the zero dropped: |d| ranks 0.5->1, 1->2, 2,2->3.5,3.5; T+ = 2 + 3.5 + 3.5.
    assert m["wilcoxon_statistic"] == 9.0
    assert m["wilcoxon_method"] == "approx"  # ties among |d| (and a zero) -> normal approximation
    var = (1 + 2**2 + 3.5**2 + 3.5**2) / 4
    expected = math.erfc((abs(9.0 - 10 / 2) - 0.5) / math.sqrt(var) / math.sqrt(2))
    assert m["wilcoxon_p"] == pytest.approx(expected, rel=1e-12)


def test_per_image_unit_counts_images():
    m = _stats("image")[0]["metrics"]["q"]
    assert m["unit"] == "image"
    assert (m["wins"], m["ties"], m["losses"]) == (7, 0, 3)
    assert m["sign_test_p"] == pytest.approx(2 * (1 + 10 + 45 + 120) / 2**10)
    # The CI is over prompts whatever the unit: the same for both.
    p = _stats("prompt")[0]["metrics"]["q"]
    assert (m["ci_low"], m["ci_high"]) == (p["ci_low"], p["ci_high"])


def test_lower_is_better_swaps_wins_and_losses():
    m = _stats("prompt", direction="lower")[0]["metrics"]["q"]
    assert (m["wins"], m["ties"], m["losses"]) == (1, 1, 3)
    assert m["mean_diff"] == pytest.approx(0.9)  # differences keep their sign: B - A


def test_cluster_ci_and_verdict_hand_computed():
    # Q1 has two images (d = 0, 2), Q2 one (d = 4). Resampling two prompts: {Q1,Q1} -> mean 1 (p 1/4),
    # {Q1,Q2} -> (0+2+4)/3 = 2 (p 1/2), {Q2,Q2} -> 4 (p 1/4); the 2.5% and 97.5% quantiles are 1 and 4.
    a = np.array([5.0, 5.0, 1.0])
    b = a + np.array([0.0, 2.0, 4.0])
    pids = ["Q1", "Q1", "Q2"]
    m = _stats("prompt", a=a, b=b, pids=pids)[0]["metrics"]["q"]
    assert m["mean_diff"] == pytest.approx(2.0)
    assert (m["ci_low"], m["ci_high"]) == (1.0, 4.0)
    assert (m["wins"], m["ties"], m["losses"]) == (2, 0, 0)  # prompt means 1 and 4
    assert m["wilcoxon_method"] == "exact" and m["wilcoxon_p"] == 0.5  # T+ = 3 of ranks {1, 2}: 2 * 1/4
    assert m["sign_test_p"] == 0.5
    assert m["verdict"] == "too few to tell (n = 2 < 5)"  # the CI excludes 0, but from two prompts
    s = arm_summaries({"A": {"q": b - a}}, pids, n_resamples=2000)["A"]["q"]
    assert s == {"mean": pytest.approx(2.0), "n": 3, "ci_low": 1.0, "ci_high": 4.0}


def test_ties_everywhere_give_no_verdict():
    m = _stats("prompt", b=A.copy())[0]["metrics"]["q"]
    assert (m["wins"], m["ties"], m["losses"]) == (0, 5, 0)
    assert m["sign_test_p"] == 1.0 and m["wilcoxon_p"] == 1.0
    assert (m["ci_low"], m["ci_high"]) == (0.0, 0.0)
    assert m["verdict"] == "no interval (every paired difference is the same)"


def test_verdict_needs_enough_units_and_a_real_interval():
    d = np.array([1, 2, 1, 3, 1, 2, 2, 1, 1, 2], dtype=float)  # every prompt's mean difference > 0
    assert _stats("prompt", b=A + d)[0]["metrics"]["q"]["verdict"] == "B"
    assert _stats("prompt", direction="lower", b=A + d)[0]["metrics"]["q"]["verdict"] == "A"
    # a constant shift (what a per-batch figure gives every image of a batch): a zero-width CI, no verdict
    m = _stats("prompt", b=A + 1.0)[0]["metrics"]["q"]
    assert m["ci_low"] == m["ci_high"] == pytest.approx(1.0) and m["verdict"].startswith("no interval")
    # three prompts: too few, whatever the interval
    m = _stats("prompt", a=A[:6], b=A[:6] + d[:6], pids=PIDS[:6])[0]["metrics"]["q"]
    assert m["n_prompts"] == 3 and m["verdict"] == "too few to tell (n = 3 < 5)"


def test_per_batch_columns_get_no_paired_test():
    values = {"A": {"q": A, "latency": np.full(10, 0.5)}, "B": {"q": A + 1, "latency": np.full(10, 0.7)}}
    [pair] = paired_statistics(
        values, PIDS, {"q": "higher", "latency": "lower"}, n_resamples=500, per_batch=("latency",)
    )
    assert set(pair["metrics"]) == {"q"}


def test_undefined_values_are_left_out_per_metric():
    pos_a = np.array([1, 0, np.nan, np.nan, 1, 1, np.nan, np.nan, 0, 0], dtype=float)
    pos_b = np.array([1, 1, np.nan, np.nan, 0, 1, np.nan, np.nan, 1, 1], dtype=float)
    values = {
        "A": {"q": A, "pos": pos_a, "none": np.full(10, np.nan)},
        "B": {"q": B, "pos": pos_b, "none": np.full(10, np.nan)},
    }
    [pair] = paired_statistics(values, PIDS, {"q": "higher", "pos": "higher", "none": "higher"}, n_resamples=500)
    assert set(pair["metrics"]) == {"q", "pos"}  # an undefined-everywhere column is omitted
    m = pair["metrics"]["pos"]
    assert (m["n_images"], m["n_prompts"]) == (6, 3)
    # Prompt means of d: P1 (0 + 1)/2 = 0.5, P3 (-1 + 0)/2 = -0.5, P5 (1 + 1)/2 = 1.
    assert (m["wins"], m["ties"], m["losses"]) == (2, 0, 1)
    assert m["mean_a"] == pytest.approx(0.5) and m["mean_b"] == pytest.approx(5 / 6)


def test_pairs_all_or_against_baseline():
    values = {k: {"q": A + i} for i, k in enumerate("xyz")}
    assert [(p["arm_a"], p["arm_b"]) for p in paired_statistics(values, PIDS, {"q": "higher"}, n_resamples=100)] == [
        ("x", "y"),
        ("x", "z"),
        ("y", "z"),
    ]
    pairs = paired_statistics(values, PIDS, {"q": "higher"}, baseline="y", n_resamples=100)
    assert [(p["arm_a"], p["arm_b"]) for p in pairs] == [("y", "x"), ("y", "z")]
    assert pairs[0]["metrics"]["q"]["mean_diff"] == pytest.approx(-1.0)


# ----------------------------------------------------------------------------- image metrics


def test_saturation_and_clipping_hand_computed():
    img = np.array([[[255, 0, 0], [100, 50, 50]], [[0, 0, 0], [254, 1, 1]]], dtype=np.uint8)
    # S = (max - min) / max: 1, 0.5, 0 (black), 253/254.
    assert hsv_saturation_mean(img) == pytest.approx((1 + 0.5 + 0 + 253 / 254) / 4)
    # A channel at 0 or 255: pixels 1 and 3; 254 and 1 are not clipped.
    assert clipped_fraction(img) == 0.5
    with pytest.raises(ValueError):
        clipped_fraction(img.astype(np.float32))


def test_metric_list_splitting_and_directions():
    assert parse_metric_list("verifier, nfe,reward:clip") == ["verifier", "nfe", "reward:clip"]
    assert parse_metric_list("reward:hps:5,pickscore:0.05,nfe") == ["reward:hps:5,pickscore:0.05", "nfe"]
    assert parse_metric_list(["saturation", "latency"]) == ["saturation", "latency"]
    cols = {c.name: c.direction for c in columns_for(["verifier", "saturation", "nfe", "reward:clip"])}
    assert cols["verifier.passed"] == "higher" and cols["verifier.position_correct"] == "higher"
    assert cols["saturation"] == "lower" and cols["nfe"] == "lower" and cols["reward:clip"] == "higher"
    over = {
        c.name: c.direction
        for c in columns_for(["verifier", "saturation"], {"saturation": "higher", "verifier.passed": "lower"})
    }
    assert (
        over["saturation"] == "higher"
        and over["verifier.passed"] == "lower"
        and over["verifier.colour_correct"] == "higher"
    )
    with pytest.raises(InvalidInput) as e:
        columns_for(["nfe"], {"saturation": "higher"})
    assert e.value.field == "directions"


# ----------------------------------------------------------------------------- arms and config


def test_arm_strings():
    assert parse_arm("b=cfg:scale=3") == {"name": "b", "policy": "cfg:scale=3", "model": None}
    assert parse_arm("b=apg:scale=10,eta=0@builtin:tiny") == {
        "name": "b",
        "policy": "apg:scale=10,eta=0",
        "model": "builtin:tiny",
    }
    assert parse_arm('{"name": "j", "policy": {"name": "cfg", "scale": 2}}') == {
        "name": "j",
        "policy": {"name": "cfg", "scale": 2},
    }
    for bad in ("cfg:scale=3", "=cfg", "b=", "b=cfg@", '{"name": '):
        with pytest.raises(InvalidInput) as e:
            parse_arm(bad)
        assert e.value.field == "arms"


def _config(**kw):
    base = {"arms": ["a=cfg:scale=1", "b=cfg"], "prompts": "pg:single", "output_dir": "/tmp/x"}
    return ABConfig.parse({**base, **kw})


def test_config_defaults_and_validation():
    cfg = _config()
    assert cfg.metrics == ["verifier", "saturation", "oversaturation", "nfe", "latency"]
    assert _config(prompts="prompts.txt").metrics == ["saturation", "oversaturation", "nfe", "latency"]
    assert cfg.arms[1].policy_spec == "cfg" and cfg.arms[0].policy_spec == "cfg:scale=1.0"
    json.dumps(ABConfig.model_json_schema())  # what the service can publish
    cases = [
        ({"arms": ["a=cfg"]}, "arms", "at least two"),
        ({"arms": ["a=cfg", "a=apg"]}, "arms", "unique"),
        ({"arms": ["a=cfg", "b=nope"]}, "arms", "nope"),
        ({"arms": ["a=cfg", "b=cfg:bogus=1"]}, "arms", "bogus"),
        ({"arms": ["a=cfg", "b/c=cfg"]}, "arms", "b/c"),
        ({"metrics": "nfe,sharpness"}, "metrics", "sharpness"),
        ({"metrics": "nfe,nfe"}, "metrics", "twice"),
        ({"baseline": "zz"}, "baseline", "zz"),
        ({"scheduler": "warp"}, "scheduler", "warp"),
        ({"seeds": 0}, "seeds", ""),
        ({"unit": "pixel"}, "unit", ""),
        ({"width": 33}, "width", "multiple of 8"),
    ]
    for override, field, text in cases:
        with pytest.raises(InvalidInput) as e:
            _config(**override)
        assert e.value.field.split(".")[0] == field, (override, e.value.field)
        assert text in str(e.value)


# ----------------------------------------------------------------------------- prompt sources


def test_text_file_dedupes_and_seeds(tmp_path):
    f = tmp_path / "p.txt"
    f.write_text("a red circle\n\n  a blue square  \na red circle\nthe cat\n", encoding="utf-8")
    ps = load_prompts(str(f), seeds=2, seed=10)
    assert ps.kind == "text" and [p.text for p in ps.prompts] == ["a red circle", "a blue square", "the cat"]
    assert ps.duplicates_dropped == 1
    assert [(it.prompt_id, it.seed) for it in ps.items[:4]] == [
        ("p0000", 10),
        ("p0000", 11),
        ("p0001", 10),
        ("p0001", 11),
    ]
    # Proving-ground captions in a file get their spec (so the verifier applies); others do not.
    assert ps.prompts[0].spec is not None and ps.prompts[2].spec is None
    assert len(load_prompts(str(f), max_prompts=2).prompts) == 2


def test_geneval_and_parti_files(tmp_path):
    g = tmp_path / "evaluation_metadata.jsonl"
    g.write_text(
        '{"tag": "single_object", "include": [{"class": "bench", "count": 1}], "prompt": "a photo of a bench"}\n\n'
        '{"tag": "counting", "include": [{"class": "cat", "count": 2}], "prompt": "a photo of two cats", "exclude": []}\n',
        encoding="utf-8",
    )
    ps = load_prompts(str(g))
    assert ps.kind == "geneval"
    assert [(p.text, p.category) for p in ps.prompts] == [
        ("a photo of a bench", "single_object"),
        ("a photo of two cats", "counting"),
    ]
    assert ps.prompts[1].extra["include"] == [{"class": "cat", "count": 2}]
    t = tmp_path / "PartiPrompts.tsv"
    t.write_text(
        "Prompt\tCategory\tChallenge\tNote\nA red bus\tVehicles\tBasic\t\n"
        'a "quoted" sign\tArts\tWriting & Symbols\tsome note\n',
        encoding="utf-8",
    )
    ps = load_prompts(str(t), seeds=3)
    assert ps.kind == "parti" and len(ps.items) == 6
    assert [(p.text, p.category, p.extra.get("challenge")) for p in ps.prompts] == [
        ("A red bus", "Vehicles", "Basic"),
        ('a "quoted" sign', "Arts", "Writing & Symbols"),
    ]
    assert detect_format(["", "hello"]) == "text"


@pytest.mark.parametrize(
    "content, text",
    [
        ('{"tag": "x", "include": [], "prompt": "ok"}\n{"tag": "x", "prompt": "no include"}\n', ":2: missing include"),
        ('{"tag": "x", "include": [], "prompt": "ok"}\nnot json\n', ":2: not a JSON object"),
        ('{"tag": "x", "include": [], "prompt": ""}\n', ":1: prompt must be a non-empty string"),
        ('{"tag": 3, "include": [], "prompt": "p"}\n', ":1: tag must be a string"),
        ("Prompt\tCategory\n\tArts\n", ":2: empty Prompt field"),
        ("\n\n", "no prompts"),
    ],
)
def test_malformed_files(tmp_path, content, text):
    f = tmp_path / "bad.jsonl"
    f.write_text(content, encoding="utf-8")
    with pytest.raises(InvalidInput) as e:
        load_prompts(str(f))
    assert e.value.field == "prompts" and text in str(e.value)


def test_proving_ground_source_uses_heldout_seeds():
    from diffsteer.proving_ground.prompts import HELDOUT_SEED_BASE, heldout_prompt_specs

    ps = load_prompts("pg:single,counting", seeds=2)
    n = len(heldout_prompt_specs("single")) + len(heldout_prompt_specs("counting"))
    assert len(ps.prompts) == n and len(ps.items) == 2 * n
    for p in ps.prompts:
        mine = [it for it in ps.items if it.prompt_id == p.prompt_id]
        assert len(mine) == 2 and all(it.meta.spec == p.spec and it.prompt == p.text for it in mine)
        assert len({it.seed for it in mine}) == 2 and all(it.seed >= HELDOUT_SEED_BASE for it in mine)
    assert len({it.seed for it in ps.items}) == len(ps.items)
    assert [p.category for p in load_prompts("pg:position", max_prompts=3, seed=1).prompts] == ["position"] * 3
    assert len(load_prompts("pg:all", max_prompts=1).prompts) == 5
    for bad in ("pg:", "pg:shapes", "/nonexistent/prompts.txt"):
        with pytest.raises(InvalidInput) as e:
            load_prompts(bad)
        assert e.value.field == "prompts"
