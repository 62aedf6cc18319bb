"""Proving-ground verifier: agreement with ground truth, robustness, and must-fail scenes."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from scipy import ndimage

from diffsteer.proving_ground.prompts import heldout_suite
from diffsteer.proving_ground.render import render, render_prompt
from diffsteer.proving_ground.verifier import (
    ATTRIBUTES,
    DetectedObject,
    detect_objects,
    ground_truth_report,
    judge,
    summarise,
    verify,
    verify_batch,
)
from diffsteer.proving_ground.world import (
    CATEGORIES,
    COLOUR_NAMES,
    SHAPES,
    SIZE_NAMES,
    Group,
    ObjectSpec,
    PromptSpec,
    SceneSpec,
    parse_caption,
)

N_PER_CATEGORY = 100  # 5 categories -> 500 scenes


def _mutated_prompt(spec: PromptSpec, rng: np.random.Generator) -> PromptSpec:
    """A different, valid prompt that shares most of ``spec``: one colour, shape, count or
    relation changed, or a group added / removed."""
    for _ in range(100):
        groups = list(spec.groups)
        relation = spec.relation
        kind = rng.choice(["colour", "shape", "count", "relation", "groups"])
        i = int(rng.integers(len(groups)))
        g = groups[i]
        if kind == "colour":
            groups[i] = Group(g.count, str(rng.choice([c for c in COLOUR_NAMES if c != g.colour])), g.shape)
        elif kind == "shape":
            groups[i] = Group(g.count, g.colour, str(rng.choice([s for s in SHAPES if s != g.shape])))
        elif kind == "count" and relation is None and len(groups) == 1:
            groups[i] = Group(int(rng.choice([n for n in range(1, 5) if n != g.count])), g.colour, g.shape)
        elif kind == "relation" and relation is not None:
            relation = str(rng.choice([r for r in ("left of", "right of", "above", "below") if r != relation]))
        elif kind == "groups":
            if len(groups) == 2:
                groups = [groups[int(rng.integers(2))]]
                relation = None
            elif g.count == 1:
                groups.append(Group(1, str(rng.choice(COLOUR_NAMES)), str(rng.choice(SHAPES))))
        try:
            candidate = PromptSpec(tuple(groups), relation)
        except ValueError:
            continue
        if candidate != spec:
            return candidate
    raise AssertionError(f"no mutation found for {spec.caption}")


def _blur_and_noise(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    x = image.astype(np.float64) / 255.0
    x = ndimage.gaussian_filter(x, sigma=(rng.uniform(0.5, 1.0), rng.uniform(0.5, 1.0), 0))
    x = x + rng.normal(0.0, 0.03, x.shape)
    return np.clip(x, 0.0, 1.0)


def _agreement(perturb) -> tuple[dict[str, float], int, float]:
    """Render the held-out scenes, score each against its own prompt and a mutated one, and
    compare verifier and ground truth attribute by attribute."""
    rng = np.random.default_rng(2024)
    agree = {name: [] for name in ATTRIBUTES}
    negatives = 0
    n_scenes = 0
    for category in CATEGORIES:
        for item in heldout_suite(category, N_PER_CATEGORY, seed=0):
            image, scene = render_prompt(item.spec, item.seed)
            n_scenes += 1
            objects = detect_objects(perturb(image, rng))
            for spec in (item.spec, _mutated_prompt(item.spec, rng)):
                truth = ground_truth_report(scene, spec)
                got = judge(objects, spec)
                negatives += not truth.passed
                for name in ATTRIBUTES:
                    if getattr(truth, name) is not None:
                        agree[name].append(getattr(truth, name) == getattr(got, name))
    rates = {name: float(np.mean(v)) for name, v in agree.items()}
    return rates, n_scenes, negatives / (2 * n_scenes)


def _print_rates(title: str, rates: dict[str, float], n: int, negatives: float) -> None:
    cells = ", ".join(f"{k} {v:.4f}" for k, v in rates.items())
    print(f"\n{title}: {n} scenes x 2 prompts ({negatives:.0%} ground-truth failures): {cells}")


def test_verifier_agrees_with_ground_truth_on_clean_heldout_scenes():
    rates, n, negatives = _agreement(lambda image, rng: image)
    _print_rates("clean agreement", rates, n, negatives)
    assert n >= 500
    assert 0.35 <= negatives <= 0.65  # the mutated prompts really are negatives
    for name, rate in rates.items():
        assert rate >= 0.99, (name, rate)


@pytest.mark.slow
def test_verifier_agreement_survives_blur_and_noise():
    rates, n, negatives = _agreement(_blur_and_noise)
    _print_rates("blur (sigma 0.5-1 px) + noise (sigma 0.03) agreement", rates, n, negatives)
    for name, rate in rates.items():
        assert rate >= 0.95, (name, rate)


def test_verify_equals_judge_of_detections_and_rendered_scenes_pass():
    for item in heldout_suite("colour_binding", 20, seed=5):
        image, scene = render_prompt(item.spec, item.seed)
        report = verify(image, item.spec)
        assert report.passed, report.to_dict()
        assert report == judge(detect_objects(image), item.spec)
        assert ground_truth_report(scene, item.spec).passed


# ----------------------------------------------------------------------------- must-fail scenes


def _scene(*objects: tuple[str, str, str, float, float]) -> np.ndarray:
    return render(SceneSpec(tuple(ObjectSpec(*o) for o in objects)))


def _attrs(image: np.ndarray, prompt: str) -> dict:
    return verify(image, parse_caption(prompt)).attributes()


def test_wrong_colour_fails():
    a = _attrs(_scene(("circle", "blue", "large", 0.5, 0.5)), "a red circle")
    assert a == {**a, "object_present": True, "colour_correct": False, "shape_correct": True, "passed": False}
    assert a["count_correct"] is False


def test_wrong_shape_fails():
    a = _attrs(_scene(("square", "red", "small", 0.3, 0.6)), "a red circle")
    assert a["object_present"] and a["colour_correct"]
    assert not a["shape_correct"] and not a["count_correct"] and not a["passed"]
    a = _attrs(_scene(("circle", "green", "large", 0.6, 0.4)), "a green triangle")
    assert not a["shape_correct"] and not a["passed"]


def test_wrong_count_fails():
    two = _scene(("triangle", "green", "small", 0.2, 0.2), ("triangle", "green", "large", 0.7, 0.7))
    a = _attrs(two, "three green triangles")
    assert a["object_present"] and a["colour_correct"] and a["shape_correct"]
    assert not a["count_correct"] and not a["passed"]
    assert _attrs(two, "two green triangles")["passed"]
    assert not _attrs(two, "a green triangle")["passed"]  # "a" means exactly one
    four = _scene(*[("circle", "yellow", "small", x, y) for x in (0.25, 0.75) for y in (0.25, 0.75)])
    assert not _attrs(four, "three yellow circles")["count_correct"]
    assert _attrs(four, "four yellow circles")["passed"]


def test_swapped_relation_fails():
    left = ("triangle", "yellow", "large", 0.25, 0.5)
    right = ("circle", "green", "small", 0.75, 0.55)
    good = _scene(left, right)
    swapped = _scene(("triangle", "yellow", "large", 0.75, 0.5), ("circle", "green", "small", 0.25, 0.55))
    prompt = "a yellow triangle to the left of a green circle"
    assert _attrs(good, prompt)["passed"]
    assert _attrs(good, "a green circle to the right of a yellow triangle")["passed"]
    a = _attrs(swapped, prompt)
    assert a["object_present"] and a["colour_correct"] and a["shape_correct"] and a["count_correct"]
    assert a["position_correct"] is False and not a["passed"]
    assert not _attrs(good, "a yellow triangle above a green circle")["passed"]
    assert _attrs(good, "a yellow triangle and a green circle")["position_correct"] is None


def test_missing_object_fails():
    image = _scene(("circle", "red", "large", 0.3, 0.3))
    a = _attrs(image, "a red circle and a blue square")
    assert not a["object_present"] and not a["passed"]
    blank = _scene()
    a = _attrs(blank, "a red circle")
    assert a == {
        "object_present": False,
        "colour_correct": False,
        "shape_correct": False,
        "count_correct": False,
        "position_correct": None,
        "passed": False,
    }
    assert verify(blank, parse_caption("a red circle to the left of a blue square")).position_correct is False


def test_swapped_colour_binding_fails():
    image = _scene(("circle", "blue", "large", 0.3, 0.3), ("square", "red", "large", 0.7, 0.7))
    a = _attrs(image, "a red circle and a blue square")
    assert a["object_present"] and not a["passed"]
    assert not (a["colour_correct"] and a["shape_correct"])
    assert _attrs(image, "a blue circle and a red square")["passed"]


def _corrupt(objects: list[ObjectSpec], kind: str, rng: np.random.Generator) -> list[ObjectSpec]:
    """Break a scene: recolour or reshape one object, drop one, or swap the places of two."""
    i = int(rng.integers(len(objects)))
    o = objects[i]
    if kind == "colour":
        changed = [replace(o, colour=str(rng.choice([c for c in COLOUR_NAMES if c != o.colour])))]
    elif kind == "shape":
        changed = [replace(o, shape=str(rng.choice([s for s in SHAPES if s != o.shape])))]
    elif kind == "missing":
        changed = []
    else:
        a, b = objects
        return [replace(a, x=b.x, y=b.y), replace(b, x=a.x, y=a.y)]
    return objects[:i] + changed + objects[i + 1 :]


@pytest.mark.slow
def test_corrupted_heldout_scenes_fail():
    """Render each held-out prompt, then break the scene in one way; the verifier must fail it."""
    rng = np.random.default_rng(7)
    caught: dict[str, list[bool]] = {}
    for category in CATEGORIES:
        for item in heldout_suite(category, 40, seed=9):
            _, scene = render_prompt(item.spec, item.seed)
            kinds = ["colour", "shape", "missing"] + (["swapped"] if item.spec.relation else [])
            for kind in kinds:
                image = render(SceneSpec(tuple(_corrupt(list(scene.objects), kind, rng))))
                caught.setdefault(kind, []).append(not verify(image, item.spec).passed)
    rates = {k: float(np.mean(v)) for k, v in caught.items()}
    print("\nmust-fail detection rates:", {k: f"{v:.4f} of {len(caught[k])}" for k, v in rates.items()})
    for name, rate in rates.items():
        assert rate == 1.0, (name, rate)


# ----------------------------------------------------------------------------- detection details


@pytest.mark.parametrize("size", SIZE_NAMES)
def test_every_colour_shape_is_detected_with_its_centroid(size):
    rng = np.random.default_rng(3)
    for colour in COLOUR_NAMES:
        for shape in SHAPES:
            obj = ObjectSpec(shape, colour, size, rng.uniform(0.2, 0.8), rng.uniform(0.2, 0.8))
            found = detect_objects(render(SceneSpec((obj,))))
            assert [(d.colour, d.shape) for d in found] == [(colour, shape)]
            cx, cy = found[0].centroid01
            assert abs(cx - obj.centroid[0]) * 64 < 0.25 and abs(cy - obj.centroid[1]) * 64 < 0.25


def test_shapes_are_recognised_in_any_orientation():
    rng = np.random.default_rng(4)
    for i in range(60):
        obj = ObjectSpec(SHAPES[i % 3], COLOUR_NAMES[i % 6], SIZE_NAMES[i % 2], 0.5, 0.5)
        image = render(SceneSpec((obj,))).astype(np.float64) / 255.0
        rotated = ndimage.rotate(image, rng.uniform(0, 360), reshape=False, order=1, cval=image[0, 0, 0])
        found = detect_objects(np.clip(rotated, 0, 1))
        assert [(d.colour, d.shape) for d in found] == [(obj.colour, obj.shape)]


@pytest.mark.parametrize("change", ["hue+20", "hue-20", "dim", "desaturate", "gradient"])
def test_colour_shifts_of_model_outputs_are_tolerated(change):
    def hue_rotate(x, degrees):
        k = np.ones(3) / np.sqrt(3.0)
        kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        t = np.radians(degrees)
        return x @ (np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx).T

    items = [i for c in CATEGORIES for i in heldout_suite(c, 12, seed=3)]
    for item in items:
        image, _ = render_prompt(item.spec, item.seed)
        x = image.astype(np.float64) / 255.0
        if change.startswith("hue"):
            x = hue_rotate(x, float(change[3:]))
        elif change == "dim":
            x = 0.65 * x
        elif change == "desaturate":
            x = x.mean(axis=-1, keepdims=True) + 0.55 * (x - x.mean(axis=-1, keepdims=True))
        else:
            x = x * np.linspace(0.7, 1.2, 64)[None, :, None]
        assert verify(np.clip(x, 0, 1), item.spec).passed, (change, item.prompt)


def test_other_resolutions_and_layouts_of_input():
    spec = parse_caption("a cyan triangle below a magenta square")
    for res in (32, 128):
        image, _ = render_prompt(spec, 17, resolution=res)
        assert verify(image, spec).passed, res
    image, _ = render_prompt(spec, 17)
    chw = image.transpose(2, 0, 1).astype(np.float32) / 255.0
    assert verify(chw, spec).passed
    with pytest.raises(ValueError):
        verify(image.astype(np.float32), spec)  # floats must be in [0, 1]
    with pytest.raises(ValueError):
        verify(image[..., 0], spec)


def test_verify_batch_and_summary():
    items = [i for c in CATEGORIES for i in heldout_suite(c, 4, seed=1)]
    images = np.stack([render_prompt(i.spec, i.seed)[0] for i in items])
    images[0] = 30  # blank out the first image
    reports = verify_batch(images, [i.spec for i in items])
    assert [r.passed for r in reports] == [False] + [True] * (len(items) - 1)
    assert reports[3] == verify(images[3], items[3].spec)
    same = verify_batch(list(images[:2]), items[0].spec)
    assert len(same) == 2 and same[0].spec == items[0].spec
    with pytest.raises(ValueError):
        verify_batch(images, [items[0].spec])
    table = summarise(reports)
    assert table["all"]["n"] == len(items)
    assert table["all"]["passed"] == pytest.approx((len(items) - 1) / len(items))
    assert table["position"]["position_correct"] == 1.0 and "position_correct" not in table["single"]
    assert table[items[0].category]["passed"] == pytest.approx(3 / 4)
    assert reports[1].to_dict()["objects"][0]["colour"] in COLOUR_NAMES


# ----------------------------------------------------------------------------- judging semantics


def _obj(colour: str, shape: str, x: float = 0.5, y: float = 0.5) -> DetectedObject:
    return DetectedObject(colour, shape, (0, 0, 1, 1), (x * 64, y * 64), 50, 0.0, 0.0, 1.0, (64, 64))


def test_judge_prefers_exact_matches_then_colour_then_shape():
    spec = parse_caption("a red circle and a red square")
    # The red circle must fill its own slot rather than partially fill the square's.
    report = judge([_obj("red", "circle"), _obj("blue", "circle")], spec)
    assert report.groups[0].colour_correct and report.groups[0].shape_correct
    assert not report.groups[1].object_present
    # Colour-only is preferred to shape-only: a blue circle for "a red circle" and a red square for
    # "a blue square" are assigned by colour.
    report = judge([_obj("blue", "circle"), _obj("red", "square")], parse_caption("a red circle and a blue square"))
    assert report.colour_correct and not report.shape_correct and report.object_present


def test_judge_counts_extra_objects_without_failing():
    spec = parse_caption("two blue squares")
    objs = [_obj("blue", "square", 0.2), _obj("blue", "square", 0.8), _obj("red", "circle")]
    report = judge(objs, spec)
    assert report.passed and report.n_extra == 1 and report.groups[0].n_matching == 2
    assert not judge(objs + [_obj("blue", "square", 0.5, 0.1)], spec).count_correct


def test_judge_position_needs_some_exact_pair_in_order():
    spec = parse_caption("a red circle to the left of a blue square")
    assert judge([_obj("red", "circle", 0.2), _obj("blue", "square", 0.8)], spec).position_correct
    assert not judge([_obj("red", "circle", 0.8), _obj("blue", "square", 0.2)], spec).position_correct
    # Within the margin (1/32 of the side) is not "left of".
    assert not judge([_obj("red", "circle", 0.50), _obj("blue", "square", 0.52, 0.9)], spec).position_correct
    # A wrong-shaped object in the right place does not count.
    assert not judge([_obj("red", "square", 0.2), _obj("blue", "square", 0.8)], spec).position_correct
