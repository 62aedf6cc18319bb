"""The proving-ground CLIP (``diffsteer-pg-clip``): shipped files, loading through open_clip and the ``clip``
reward, zero-shot attribute ranking on held-out scenes, and the trainer end to end on a tiny config."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here may download

import json
from pathlib import Path

import numpy as np
import pytest
import torch

open_clip = pytest.importorskip("open_clip")
from safetensors.torch import load_file  # noqa: E402

from diffsteer.proving_ground.build_clip import (  # noqa: E402
    NEGATIVE_KINDS,
    Batch,
    CompactTokenEmbedding,
    ProvingGroundClipConfig,
    attribute_edits,
    contrastive_losses,
    edit_spec,
    sample_negatives,
    train,
)
from diffsteer.proving_ground.prompts import heldout_suite, is_heldout_spec  # noqa: E402
from diffsteer.proving_ground.render import render_prompt  # noqa: E402
from diffsteer.proving_ground.world import (  # noqa: E402
    CATEGORIES,
    COLOUR_NAMES,
    SHAPES,
    all_prompt_specs,
    canonical_key,
    parse_caption,
)
from diffsteer.rewards import build_reward  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "proving_ground" / "assets" / "clip"
NAME = "diffsteer-pg-clip"
CONFIG = ASSET / f"{NAME}.json"
WEIGHTS = ASSET / "open_clip_model.safetensors"
REWARD_CONFIG = {"name": "clip", "model_config_path": str(CONFIG), "checkpoint": str(WEIGHTS)}


@pytest.fixture(scope="module")
def reward():
    return build_reward(REWARD_CONFIG)


def _images(items) -> torch.Tensor:
    return (
        torch.from_numpy(np.stack([render_prompt(i.spec, i.seed)[0] for i in items])).permute(0, 3, 1, 2).float() / 255
    )


# ----------------------------------------------------------------------------- the shipped checkpoint


def test_shipped_files_are_open_clip_format_and_small():
    cfg = json.loads(CONFIG.read_text())
    assert set(cfg) >= {"embed_dim", "vision_cfg", "text_cfg"}
    assert cfg["vision_cfg"]["image_size"] == 64
    assert 16 <= cfg["text_cfg"]["context_length"] <= 24
    assert "hf_tokenizer_name" not in cfg["text_cfg"]  # open_clip's default tokenizer, shipped with open_clip
    assert WEIGHTS.stat().st_size + CONFIG.stat().st_size <= 10 * 2**20
    local = json.loads((ASSET / "open_clip_config.json").read_text())
    assert local["model_cfg"] == cfg
    log = json.loads((ASSET / "training_log.json").read_text())
    assert log["model_config"] == cfg and log["records"][-1]["step"] == log["config"]["steps"]


def test_loads_through_open_clip_factory():
    open_clip.add_model_config(CONFIG)
    assert NAME in open_clip.list_models()
    model = open_clip.create_model(NAME, pretrained=str(WEIGHTS)).eval()
    saved = load_file(str(WEIGHTS))
    state = model.state_dict()
    assert set(saved) == set(state)
    for k, v in saved.items():
        assert torch.equal(state[k], v.to(state[k].dtype)), k
    # the folder doubles as an open_clip 'local-dir:' model with the same weights
    local = open_clip.create_model(f"local-dir:{ASSET}").eval()
    assert torch.equal(local.visual.conv1.weight, model.visual.conv1.weight)
    tok = open_clip.get_tokenizer(NAME)
    assert tok("a red circle").shape == (1, json.loads(CONFIG.read_text())["text_cfg"]["context_length"])


def test_reward_ranks_true_caption_above_one_attribute_edits(reward):
    """Held-out seeds (and, for colour_binding, held-out meanings): the true caption must beat the caption
    with one colour or one shape changed."""
    items = heldout_suite("single", 12, seed=7) + heldout_suite("colour_binding", 12, seed=7)
    images = _images(items)
    pairs = []  # (image index, attribute, true caption, edited caption)
    for i, item in enumerate(items):
        spec = item.spec
        for g, group in enumerate(spec.groups):
            colour = COLOUR_NAMES[(COLOUR_NAMES.index(group.colour) + 1) % len(COLOUR_NAMES)]
            shape = SHAPES[(SHAPES.index(group.shape) + 1) % len(SHAPES)]
            for attribute, value in (("colour", colour), ("shape", shape)):
                edited = edit_spec(spec, attribute, value, g)
                if edited is not None:
                    pairs.append((i, attribute, spec.caption, edited.caption))
    index = torch.tensor([p[0] for p in pairs])
    true_scores = reward.score(images[index], [p[2] for p in pairs])
    edited_scores = reward.score(images[index], [p[3] for p in pairs])
    wins = {a: (true_scores > edited_scores)[[p[1] == a for p in pairs]] for a in ("colour", "shape")}
    assert len(wins["colour"]) >= 30 and len(wins["shape"]) >= 20
    assert wins["colour"].float().mean() >= 0.95, wins["colour"]
    assert wins["shape"].float().mean() >= 0.9, wins["shape"]


def test_reward_matches_open_clip_and_gradients_reach_the_image(reward):
    items = heldout_suite("position", 2, seed=3)
    base = _images(items)
    images = base.clone().requires_grad_(True)
    prompts = [i.prompt for i in items]
    scores = reward.score(images, prompts)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    open_clip.add_model_config(CONFIG)
    model = open_clip.create_model(NAME, pretrained=str(WEIGHTS)).eval()
    mean = torch.tensor(model.visual.preprocess_cfg["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(model.visual.preprocess_cfg["std"]).view(1, 3, 1, 1)
    with torch.no_grad():
        img = model.encode_image((base - mean) / std, normalize=True)
        txt = model.encode_text(open_clip.get_tokenizer(NAME)(prompts), normalize=True)
    expected = (img * txt).sum(-1) * model.logit_scale.exp()
    assert torch.allclose(scores.detach(), expected, atol=1e-3)
    reward.loss(images, prompts).sum().backward()
    assert images.grad is not None and torch.isfinite(images.grad).all() and images.grad.abs().sum() > 0
    # the gradient is informative: a small step along it raises the score
    with torch.no_grad():
        stepped = (base - 1e-3 * images.grad / images.grad.abs().amax()).clamp(0, 1)
        assert (reward.score(stepped, prompts) > scores.detach()).all()


# ----------------------------------------------------------------------------- pure pieces


def test_attribute_edits_change_exactly_one_thing_and_stay_in_the_world():
    rng = np.random.default_rng(0)
    specs = [s for c in CATEGORIES for s in all_prompt_specs(c)]
    for spec in (specs[i] for i in rng.choice(len(specs), 150, replace=False)):
        for kind in NEGATIVE_KINDS:
            for edited in attribute_edits(spec, kind):
                assert parse_caption(edited.caption) == edited  # a valid caption of the world
                assert canonical_key(edited) != canonical_key(spec)
                if kind in ("colour", "shape", "count"):
                    changed = [(a, b) for a, b in zip(spec.groups, edited.groups) if a != b]
                    assert len(changed) == 1 and edited.relation == spec.relation
                    a, b = changed[0]
                    assert sum(getattr(a, f) != getattr(b, f) for f in ("count", "colour", "shape")) == 1
                    assert getattr(a, kind) != getattr(b, kind)
                elif kind == "relation":
                    assert edited.groups == spec.groups and edited.relation != spec.relation
        negatives = sample_negatives(spec, rng, 4)
        assert not any(is_heldout_spec(n) for n in negatives)
        assert len({canonical_key(n) for n in negatives} | {canonical_key(spec)}) == len(negatives) + 1
    red_circle = parse_caption("a red circle")
    assert [s.caption for s in attribute_edits(red_circle, "count")] == [
        "two red circles",
        "three red circles",
        "four red circles",
    ]
    assert attribute_edits(red_circle, "relation") == [] and attribute_edits(red_circle, "swap") == []
    binding = parse_caption("a red circle and a blue square")
    assert [s.caption for s in attribute_edits(binding, "swap")] == ["a blue circle and a red square"]


def test_compact_token_embedding_equals_the_full_table():
    g = torch.Generator().manual_seed(0)
    emb = CompactTokenEmbedding([5, 2, 9, 5], vocab_size=12, width=3, generator=g)
    ids = torch.tensor([[2, 5, 9, 0, 11]])
    full = torch.nn.functional.embedding(ids, emb.full_weight())
    assert torch.equal(emb(ids), full)
    assert torch.equal(emb(torch.tensor([0, 11])), torch.zeros(2, 3))


def test_contrastive_losses_multi_positive_targets():
    """Two images of one meaning: each caption column of that meaning is a target for both, so perfectly
    aligned embeddings give a lower loss than swapped ones, and the i2t term is the soft cross-entropy."""
    torch.manual_seed(0)
    image = torch.nn.functional.normalize(torch.randn(3, 8), dim=-1)
    text = torch.cat([image[:1], image[2:3], image[2:3] + 0.3 * torch.randn(1, 8)])  # meanings A, B, B's negative
    text = torch.nn.functional.normalize(text, dim=-1)
    positive = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 0]], dtype=torch.bool)  # images 0 and 1 both show A
    own = torch.tensor([[1, 0, 0], [1, 0, 0], [0, 1, 1]], dtype=torch.bool)
    batch = Batch(torch.empty(0), ["A", "B", "B-neg"], positive, own, positive.clone())
    scale = torch.tensor(10.0)
    out = contrastive_losses(image, text, scale, batch, hard_negative_weight=0.5)
    logits = scale * image @ text.t()
    expected_i2t = -torch.log_softmax(logits, 1)[positive].mean()
    assert torch.allclose(out["i2t"], expected_i2t)
    t2i = -(0.5 * torch.log_softmax(logits.t()[0], 0)[:2].sum() + torch.log_softmax(logits.t()[1], 0)[2]) / 2
    assert torch.allclose(out["t2i"], t2i)
    own_logits = logits[2, 1:]
    assert torch.allclose(out["own"], (0 + 0 + -torch.log_softmax(own_logits, 0)[0]) / 3)
    swapped = contrastive_losses(image, text[[1, 0, 2]], scale, batch, 0.5)
    assert swapped["loss"] > out["loss"]


# ----------------------------------------------------------------------------- the trainer


@pytest.mark.parametrize("vision_type", ["resnet", "vit"])
def test_trainer_smoke_run_writes_a_loadable_checkpoint(tmp_path, vision_type):
    name = f"diffsteer-pg-clip-smoke-{vision_type}"
    cfg = ProvingGroundClipConfig(
        output=str(tmp_path / "clip"),
        model_name=name,
        threads=1,
        steps=3,
        batch_size=8,
        vision_type=vision_type,
        resnet_width=8,
        vision_width=32,
        vision_layers=1,
        vision_head_width=16,
        text_width=32,
        text_layers=1,
        text_heads=2,
        embed_dim=16,
        warmup_steps=1,
        log_every=1,
        probe_every=2,
        probe_scenes=12,
    )
    out = train(cfg)
    log = json.loads((out / "training_log.json").read_text())
    assert [r["step"] for r in log["records"]] == [1, 2, 3]
    assert all(np.isfinite(r["loss"]) for r in log["records"])
    assert max(log["reload_max_abs_diff"].values()) < 1e-2  # fp16 round trip
    assert [p["step"] for p in log["probes"]] == [2, 3] and set(log["probes"][-1]) >= {"colour", "shape", "count"}
    config = out / f"{name}.json"
    open_clip.add_model_config(config)
    model = open_clip.create_model(name, pretrained=str(out / "open_clip_model.safetensors"))
    assert type(model.visual).__name__ == {"resnet": "ModifiedResNet", "vit": "VisionTransformer"}[vision_type]
    assert model.token_embedding.weight.shape == (49408, 32)
    # only the world's tokens were trained: every other row of the saved table is zero
    rows = model.token_embedding.weight.abs().sum(-1) > 0
    assert 20 <= int(rows.sum()) <= 60 and not rows[open_clip.get_tokenizer(name).encode("dog")[0]]
    r = build_reward(
        {"name": "clip", "model_config_path": str(config), "checkpoint": str(out / "open_clip_model.safetensors")}
    )
    images = torch.rand(2, 3, 64, 64, requires_grad=True)
    s = r.score(images, ["a red circle", "two blue squares"])
    s.sum().backward()
    assert torch.isfinite(s).all() and images.grad.abs().sum() > 0
