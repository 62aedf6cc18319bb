"""Proving-ground world: vocabulary, captions, layout and rendering."""

from __future__ import annotations

import time

import numpy as np
import pytest

from diffsteer.proving_ground.dataset import TrainingScenes
from diffsteer.proving_ground.render import GAP_PX, coverage, layout, render, render_prompt
from diffsteer.proving_ground.world import (
    BACKGROUND_RGB,
    CATEGORIES,
    COLOURS,
    SHAPES,
    SIZE_NAMES,
    SQUARE_HALF_SIDE,
    Group,
    ObjectSpec,
    PromptSpec,
    SceneSpec,
    all_prompt_specs,
    canonical_key,
    caption,
    parse_caption,
)


def _hue(rgb: tuple[int, int, int]) -> float:
    r, g, b = (c / 255.0 for c in rgb)
    return float(np.degrees(np.arctan2(np.sqrt(3.0) * (g - b), 2 * r - g - b)) % 360)


def test_colours_are_well_separated_on_a_neutral_background():
    hues = sorted(_hue(rgb) for rgb in COLOURS.values())
    gaps = np.diff(hues + [hues[0] + 360])
    assert len(COLOURS) >= 5
    assert gaps.min() >= 59.0, gaps
    chromas = {max(rgb) - min(rgb) for rgb in COLOURS.values()}
    assert min(chromas) >= 150
    assert max(BACKGROUND_RGB) - min(BACKGROUND_RGB) == 0
    assert max(BACKGROUND_RGB) < 64


@pytest.mark.parametrize(
    "text, groups, relation, category",
    [
        ("a red circle", [(1, "red", "circle")], None, "single"),
        ("two blue squares", [(2, "blue", "square")], None, "counting"),
        ("four cyan triangles", [(4, "cyan", "triangle")], None, "counting"),
        (
            "a yellow triangle to the left of a green circle",
            [(1, "yellow", "triangle"), (1, "green", "circle")],
            "left of",
            "position",
        ),
        ("a red square below a red circle", [(1, "red", "square"), (1, "red", "circle")], "below", "position"),
        ("a red circle and a blue square", [(1, "red", "circle"), (1, "blue", "square")], None, "colour_binding"),
        (
            "a green circle and a green triangle",
            [(1, "green", "circle"), (1, "green", "triangle")],
            None,
            "two_objects",
        ),
        ("A photo of three Magenta circles.", [(3, "magenta", "circle")], None, "counting"),
        ("  an yellow   square ", [(1, "yellow", "square")], None, "single"),
    ],
)
def test_parse_caption_examples(text, groups, relation, category):
    spec = parse_caption(text)
    assert spec == PromptSpec(tuple(Group(*g) for g in groups), relation)
    assert spec.category == category


@pytest.mark.parametrize(
    "text",
    [
        "two red circle",  # plural disagrees with count
        "a red circles",
        "a purple circle",  # colour not in the vocabulary
        "a red hexagon",
        "five red circles",
        "a red circle and a blue circle",  # two-object prompts name two shapes
        "a red circle to the left of a red circle",  # relation between indistinguishable objects
        "two red circles to the left of a blue square",  # relations are between single objects
        "a red circle and a blue square and a green triangle",
        "a red circle above a blue square above a green triangle",
        "",
    ],
)
def test_parse_caption_rejects_text_outside_the_grammar(text):
    with pytest.raises(ValueError):
        parse_caption(text)


def test_every_spec_round_trips_through_its_caption_and_dict():
    sizes = {}
    for category in CATEGORIES:
        specs = list(all_prompt_specs(category))
        sizes[category] = len(specs)
        captions = [caption(s) for s in specs]
        assert len(set(captions)) == len(captions), f"duplicate captions in {category}"
        for spec, text in zip(specs, captions):
            assert spec.category == category
            assert parse_caption(text) == spec
            assert caption(parse_caption(text)) == text
            assert PromptSpec.from_dict(spec.to_dict()) == spec
    assert sizes == {"single": 18, "counting": 54, "two_objects": 36, "colour_binding": 180, "position": 1224}


def test_canonical_key_merges_paraphrases_only():
    k = canonical_key
    assert k(parse_caption("a red circle and a blue square")) == k(parse_caption("a blue square and a red circle"))
    assert k(parse_caption("a red circle to the left of a blue square")) == k(
        parse_caption("a blue square to the right of a red circle")
    )
    assert k(parse_caption("a red circle above a blue square")) == k(parse_caption("a blue square below a red circle"))
    assert k(parse_caption("a red circle to the left of a blue square")) != k(
        parse_caption("a red circle to the right of a blue square")
    )
    assert k(parse_caption("a red circle above a blue square")) != k(
        parse_caption("a red circle to the left of a blue square")
    )
    assert k(parse_caption("a red circle and a blue square")) != k(parse_caption("a blue circle and a red square"))


def test_invalid_specs_raise():
    with pytest.raises(ValueError):
        Group(0, "red", "circle")
    with pytest.raises(ValueError):
        Group(5, "red", "circle")
    with pytest.raises(ValueError):
        PromptSpec((Group(1, "red", "circle"),), "left of")
    with pytest.raises(ValueError):
        PromptSpec((Group(1, "red", "circle"), Group(1, "blue", "square")), "behind")
    with pytest.raises(ValueError):
        ObjectSpec("circle", "red", "medium", 0.5, 0.5)


def _specs_sample(n_per_category: int, seed: int) -> list[PromptSpec]:
    rng = np.random.default_rng(seed)
    out = []
    for category in CATEGORIES:
        specs = list(all_prompt_specs(category))
        out += [specs[i] for i in rng.choice(len(specs), size=min(n_per_category, len(specs)), replace=False)]
    return out


def test_rendering_is_deterministic_in_the_seed():
    for spec in _specs_sample(4, seed=1):
        img_a, scene_a = render_prompt(spec, 123)
        img_b, scene_b = render_prompt(spec, 123)
        img_c, scene_c = render_prompt(spec, 124)
        assert scene_a == scene_b and np.array_equal(img_a, img_b)
        assert scene_a != scene_c and not np.array_equal(img_a, img_c)
    stream = TrainingScenes(seed=7)
    again = TrainingScenes(seed=7)
    other = TrainingScenes(seed=8)
    for i in (0, 1, 99):
        assert np.array_equal(stream[i].image, again[i].image) and stream[i].caption == again[i].caption
    assert any(stream[i].caption != other[i].caption for i in range(10))
    images, captions = stream.batch(5, 3)
    assert images.shape == (3, 64, 64, 3) and images.dtype == np.uint8
    assert captions == [stream[i].caption for i in (5, 6, 7)]


def _assert_scene_satisfies(scene: SceneSpec, spec: PromptSpec, image: np.ndarray) -> None:
    res = scene.resolution
    wanted = sorted((g.colour, g.shape) for g in spec.groups for _ in range(g.count))
    assert sorted((o.colour, o.shape) for o in scene.objects) == wanted
    for o in scene.objects:
        assert o.radius <= o.x <= 1 - o.radius and o.radius <= o.y <= 1 - o.radius
        # The pixel holding the shape's centroid is fully covered by the shape's colour.
        cx, cy = o.centroid
        assert tuple(image[int(cy * res), int(cx * res)]) == COLOURS[o.colour]
    gap = GAP_PX / 64
    for i, a in enumerate(scene.objects):
        for b in scene.objects[i + 1 :]:
            need = a.radius + b.radius + gap - 1e-9
            assert abs(a.x - b.x) >= need or abs(a.y - b.y) >= need
    if spec.relation is not None:
        a, b = scene.objects
        dx, dy = b.x - a.x, b.y - a.y
        main = {"left of": dx, "right of": -dx, "above": dy, "below": -dy}[spec.relation]
        other = dy if spec.relation in ("left of", "right of") else dx
        assert main >= abs(other) and main > 0
    # Nothing else is drawn: pixels away from every object are background.
    yy, xx = (np.mgrid[:res, :res] + 0.5) / res
    far = np.ones((res, res), dtype=bool)
    for o in scene.objects:
        far &= np.maximum(np.abs(xx - o.x), np.abs(yy - o.y)) > o.radius + 1.5 / res
    assert (image[far] == BACKGROUND_RGB).all()


def test_rendered_scenes_satisfy_their_spec():
    seeds = iter(range(10_000, 20_000))
    for spec in _specs_sample(30, seed=2):
        for _ in range(2):
            image, scene = render_prompt(spec, next(seeds))
            assert image.shape == (64, 64, 3) and image.dtype == np.uint8
            _assert_scene_satisfies(scene, spec, image)
    for example in TrainingScenes(seed=3, length=100):
        _assert_scene_satisfies(example.scene, example.spec, example.image)


def test_other_resolutions_render_the_same_layout():
    spec = parse_caption("a blue triangle above a yellow square")
    _, scene = render_prompt(spec, 5, resolution=64)
    large, scene_large = render_prompt(spec, 5, resolution=128)
    assert large.shape == (128, 128, 3)
    assert [(o.shape, o.colour, o.size) for o in scene.objects] == [
        (o.shape, o.colour, o.size) for o in scene_large.objects
    ]
    _assert_scene_satisfies(scene_large, spec, large)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("size", SIZE_NAMES)
def test_supersampled_coverage_matches_the_analytic_area(shape, size):
    res = 64
    obj = ObjectSpec(shape, "red", size, 0.5123, 0.4871)
    _, _, alpha = coverage(obj, res)
    r = obj.radius * res
    expected = {"circle": np.pi * r * r, "square": (2 * SQUARE_HALF_SIDE * r) ** 2, "triangle": 2 * r * r}[shape]
    assert alpha.sum() == pytest.approx(expected, rel=0.03)
    # Antialiased: the rim holds partially covered pixels.
    assert ((alpha > 0.05) & (alpha < 0.95)).sum() >= 8


def test_layout_rejects_nothing_valid_and_is_fast():
    # Four large objects are the hardest layout; every seed must succeed.
    spec = parse_caption("four green squares")
    for seed in range(200):
        scene = layout(spec, np.random.default_rng(seed))
        assert len(scene.objects) == 4
    stream = TrainingScenes(seed=11)
    start = time.perf_counter()
    n = 500
    for i in range(n):
        stream[i]
    rate = n / (time.perf_counter() - start)
    print(f"training stream: {rate:.0f} examples/s on one core")
    # Loose bound (shared CI machines): the design target is thousands per second.
    assert rate > 150


def test_render_of_an_empty_scene_is_background():
    image = render(SceneSpec((), 64))
    assert (image == BACKGROUND_RGB).all()
