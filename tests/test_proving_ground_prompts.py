"""Proving-ground prompt suite: the held-out split, the training sampler and the JSONL format."""

from __future__ import annotations

import json

import numpy as np
import pytest

from diffsteer.proving_ground.dataset import TrainingScenes
from diffsteer.proving_ground.prompts import (
    COMBINATORIAL,
    HELDOUT_FRACTION,
    HELDOUT_SEED_BASE,
    HELDOUT_SUITE_N,
    SuiteItem,
    full_heldout_suite,
    heldout_keys,
    heldout_prompt_specs,
    heldout_suite,
    is_heldout_seed,
    is_heldout_spec,
    load_default_suite,
    read_suite_jsonl,
    sample_training_spec,
    training_prompt_specs,
    training_seed,
    write_suite_jsonl,
)
from diffsteer.proving_ground.shipped import HELDOUT_SUITE
from diffsteer.proving_ground.world import CATEGORIES, all_prompt_specs, canonical_key, parse_caption


@pytest.mark.parametrize("category", COMBINATORIAL)
def test_heldout_meanings_are_a_fixed_fraction_and_disjoint_from_training(category):
    keys = {canonical_key(s) for s in all_prompt_specs(category)}
    held = heldout_keys(category)
    assert held < keys
    assert len(held) == round(HELDOUT_FRACTION * len(keys))
    training = training_prompt_specs(category)
    assert training and not any(canonical_key(s) in held for s in training)
    heldout = heldout_prompt_specs(category)
    assert {canonical_key(s) for s in heldout} == held
    # Training and held-out specs together are the whole category.
    assert len(training) + len(heldout) == len(list(all_prompt_specs(category)))


def test_single_objects_are_held_out_by_seed_only():
    assert heldout_keys("single") == frozenset()
    assert set(heldout_prompt_specs("single")) == set(all_prompt_specs("single"))
    assert set(training_prompt_specs("single")) == set(all_prompt_specs("single"))
    for item in heldout_suite("single", 50):
        assert is_heldout_seed(item.seed)


@pytest.mark.parametrize("category", COMBINATORIAL)
def test_training_sees_every_word_of_the_heldout_captions(category):
    """Held-out captions test composition, not unseen words: each colour, shape, count and
    relation of a held-out spec also occurs in training specs of the same category."""

    def words(specs):
        out = set()
        for s in specs:
            out |= {("colour", g.colour) for g in s.groups} | {("shape", g.shape) for g in s.groups}
            out |= {("count", g.count) for g in s.groups} | {("relation", s.relation)}
        return out

    assert words(heldout_prompt_specs(category)) <= words(training_prompt_specs(category))


def test_paraphrases_fall_on_the_same_side():
    for category in COMBINATORIAL:
        for spec in all_prompt_specs(category):
            twin = spec
            if spec.relation is None and len(spec.groups) == 2:
                twin = parse_caption(f"{spec.caption.split(' and ')[1]} and {spec.caption.split(' and ')[0]}")
            elif spec.relation is not None:
                flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
                twin = type(spec)((spec.groups[1], spec.groups[0]), flip[spec.relation])
            assert is_heldout_spec(twin) == is_heldout_spec(spec)


def test_training_sampler_never_yields_heldout_instances():
    rng = np.random.default_rng(0)
    drawn = [sample_training_spec(rng) for _ in range(20_000)]
    assert not any(is_heldout_spec(s) for s in drawn)
    # It does cover the training specs (not a degenerate sampler).
    assert len(set(drawn)) > 0.9 * len(training_prompt_specs())
    weighted = [sample_training_spec(rng, {"counting": 1.0}) for _ in range(200)]
    assert {s.category for s in weighted} == {"counting"}
    with pytest.raises(ValueError):
        sample_training_spec(rng, {"colours": 1.0})

    seeds = [training_seed(s, i) for s in range(3) for i in range(5_000)]
    assert max(seeds) < HELDOUT_SEED_BASE and not any(is_heldout_seed(s) for s in seeds)
    assert len(set(seeds)) == len(seeds)

    stream = TrainingScenes(seed=0)
    for i in range(2_000):
        example = stream[i]
        assert not is_heldout_spec(example.spec) and not is_heldout_seed(example.seed)
        assert example.caption == example.spec.caption


def test_heldout_suite_items_are_heldout_distinct_and_deterministic():
    for category in CATEGORIES:
        items = heldout_suite(category, 120, seed=0)
        assert len(items) == 120
        assert items == heldout_suite(category, 120, seed=0)
        assert items != heldout_suite(category, 120, seed=1)
        assert heldout_suite(category, 30, seed=0) == items[:30]
        assert len({i.seed for i in items}) == 120
        for item in items:
            prompt, spec, seed = item
            assert is_heldout_seed(seed)
            assert parse_caption(prompt) == spec and item.category == category
            assert category == "single" or is_heldout_spec(spec)
        # Balanced: every held-out spec is used before any is repeated.
        n_specs = len(heldout_prompt_specs(category))
        assert len({i.spec for i in items[:n_specs]}) == min(n_specs, 120)


def test_jsonl_round_trip_and_validation(tmp_path):
    items = full_heldout_suite(n_per_category=7, seed=3)
    path = tmp_path / "suite.jsonl"
    write_suite_jsonl(items, path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [set(r) for r in rows] == [{"prompt", "category", "spec", "seed"}] * len(items)
    assert read_suite_jsonl(path) == items

    rows[0]["prompt"] = "a red circle" if rows[0]["prompt"] != "a red circle" else "a blue circle"
    bad = tmp_path / "bad.jsonl"
    bad.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError):
        read_suite_jsonl(bad)


def test_shipped_suite_matches_the_generator():
    assert HELDOUT_SUITE.is_file()
    shipped = load_default_suite()
    assert shipped == full_heldout_suite(HELDOUT_SUITE_N, 0)
    assert [i.category for i in load_default_suite(["position"])] == ["position"] * HELDOUT_SUITE_N
    assert all(isinstance(i, SuiteItem) for i in shipped)
