"""open_clip-based rewards (``clip``, ``hps``) loaded from tiny random checkpoints in the real formats."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download

import json

import pytest
import torch

from diffsteer.rewards import ClipReward, ClipRewardConfig, HpsReward, HpsRewardConfig, build_reward
from tests.test_rewards_support import (
    TINY_OPEN_CLIP_CFG,
    TINY_OPEN_CLIP_NAME,
    make_open_clip_model,
    write_open_clip_config,
)

open_clip = pytest.importorskip("open_clip")
from safetensors.torch import save_file  # noqa: E402

PROMPTS = ["a red cat", "a photo of a dog"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("openclip")
    cfg_path = write_open_clip_config(d)
    model = make_open_clip_model(seed=1)
    state = model.state_dict()
    torch.save(state, d / "raw.pt")
    save_file({k: v.contiguous() for k, v in state.items()}, str(d / "weights.safetensors"))
    # HPSv2's release format: {'state_dict': ...} (with DataParallel's 'module.' prefix, which loaders strip).
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, d / "HPS_v2.1_compressed.pt")
    local = d / "local"
    local.mkdir()
    (local / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG, "preprocess_cfg": {}}))
    save_file({k: v.contiguous() for k, v in state.items()}, str(local / "open_clip_model.safetensors"))
    return {"dir": d, "cfg": str(cfg_path), "model": model}


def reference_cosine(model, images, prompts, resize_mode="shortest"):
    """open_clip's own pipeline: its eval transform (on tensors), encode_*, normalise, cosine."""
    tf = open_clip.image_transform(model.visual.image_size, is_train=False, resize_mode=resize_mode)
    pixels = torch.stack([tf(img) for img in images])
    tok = open_clip.get_tokenizer(TINY_OPEN_CLIP_NAME)
    with torch.no_grad():
        img = model.encode_image(pixels, normalize=True)
        txt = model.encode_text(tok(prompts), normalize=True)
    return (img * txt).sum(-1)


@pytest.mark.parametrize("ckpt", ["raw.pt", "weights.safetensors"])
def test_clip_scores_match_open_clip_and_have_gradients(tiny, ckpt):
    reward = build_reward({"name": "clip", "model_config_path": tiny["cfg"], "checkpoint": str(tiny["dir"] / ckpt)})
    assert isinstance(reward, ClipReward) and reward.differentiable
    # Real weights were loaded (not a fresh random init).
    assert torch.equal(reward.model.visual.conv1.weight, tiny["model"].visual.conv1.weight)
    assert not any(p.requires_grad for p in reward.parameters())
    assert not reward.model.training and reward.model.visual.transformer.grad_checkpointing

    torch.manual_seed(0)
    images = torch.rand(2, 3, 48, 40, requires_grad=True)  # non-square, needs resize + crop
    scores = reward.score(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    ref = reference_cosine(tiny["model"], images.detach(), PROMPTS)
    scale = tiny["model"].logit_scale.exp()
    assert torch.allclose(scores.detach(), ref * scale, atol=1e-4)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()
    assert reward.default_offset == 100.0


def test_clip_unscaled_and_single_prompt_broadcast(tiny):
    reward = build_reward(
        ClipRewardConfig(
            model_config_path=tiny["cfg"], checkpoint=str(tiny["dir"] / "raw.pt"), scale_by_logit_scale=False
        )
    )
    images = torch.rand(3, 3, 32, 32)
    s = reward.score(images, "a red cat")
    ref = reference_cosine(tiny["model"], images, ["a red cat"] * 3)
    assert torch.allclose(s, ref, atol=1e-5) and s.abs().max() <= 1.0
    assert reward.default_offset == 1.0
    with pytest.raises(ValueError, match="prompts"):
        reward.score(images, None)
    with pytest.raises(ValueError, match="2 prompts for 3 images"):
        reward.score(images, PROMPTS)


def test_local_dir_model(tiny):
    reward = build_reward({"name": "clip", "model": f"local-dir:{tiny['dir'] / 'local'}"})
    assert torch.equal(reward.model.visual.conv1.weight, tiny["model"].visual.conv1.weight)
    with pytest.raises(ValueError, match="clip.checkpoint: must be unset"):
        build_reward({"name": "clip", "model": f"local-dir:{tiny['dir'] / 'local'}", "checkpoint": "x.pt"})


def test_text_embeddings_are_cached(tiny, monkeypatch):
    reward = build_reward({"name": "clip", "model_config_path": tiny["cfg"], "checkpoint": str(tiny["dir"] / "raw.pt")})
    calls = []
    original = reward.model.encode_text
    monkeypatch.setattr(reward.model, "encode_text", lambda *a, **k: calls.append(1) or original(*a, **k))
    images = torch.rand(2, 3, 32, 32)
    first = reward.score(images, PROMPTS)
    second = reward.score(images, PROMPTS[::-1])
    assert len(calls) == 1 and len(reward.text_cache) == 2
    assert torch.allclose(first, reward.score(images, PROMPTS)) and not torch.allclose(first, second)


def test_hps_loads_state_dict_checkpoint_and_scores_cosine(tiny):
    cfg = HpsRewardConfig(model_config_path=tiny["cfg"], checkpoint=str(tiny["dir"] / "HPS_v2.1_compressed.pt"))
    reward = build_reward(cfg)
    assert isinstance(reward, HpsReward) and reward.default_offset == 1.0
    assert reward.preprocess_cfg.resize_mode == "longest"  # HPSv2's official eval transform
    assert torch.equal(reward.model.token_embedding.weight, tiny["model"].token_embedding.weight)
    images = torch.rand(2, 3, 64, 64, requires_grad=True)  # square: longest == shortest
    scores = reward.score(images, PROMPTS)
    ref = reference_cosine(tiny["model"], images.detach(), PROMPTS)
    assert torch.allclose(scores.detach(), ref, atol=1e-5)
    (-scores).sum().backward()
    assert images.grad.abs().sum() > 0
    # Non-square images are fitted and padded with black, as HPSv2's ResizeMaxSize does.
    wide = torch.rand(1, 3, 30, 60)
    s_long = reward.score(wide, PROMPTS[:1])
    s_ref = reference_cosine(
        tiny["model"],
        torch.nn.functional.pad(
            torch.nn.functional.interpolate(wide, size=(16, 32), mode="bicubic", antialias=True), (0, 0, 8, 8)
        ),
        PROMPTS[:1],
    )
    assert torch.allclose(s_long, s_ref, atol=1e-5)


def test_hps_bf16_runs_close_to_fp32(tiny):
    ckpt = str(tiny["dir"] / "HPS_v2.1_compressed.pt")
    r32 = build_reward(HpsRewardConfig(model_config_path=tiny["cfg"], checkpoint=ckpt))
    r16 = build_reward(HpsRewardConfig(model_config_path=tiny["cfg"], checkpoint=ckpt), "cpu", torch.bfloat16)
    assert r16.model.visual.conv1.weight.dtype == torch.bfloat16
    images = torch.rand(2, 3, 32, 32, requires_grad=True)
    s16 = r16.score(images, PROMPTS)
    assert s16.dtype == torch.float32
    assert torch.allclose(s16.detach(), r32.score(images.detach(), PROMPTS), atol=0.03)
    s16.sum().backward()
    assert images.grad.abs().sum() > 0


def test_loader_errors_name_the_field(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"hps\.checkpoint: required"):
        build_reward({"name": "hps", "model_config_path": tiny["cfg"]})
    with pytest.raises(ValueError, match=r"hps\.checkpoint: file not found"):
        build_reward({"name": "hps", "model_config_path": tiny["cfg"], "checkpoint": str(tmp_path / "missing.pt")})
    with pytest.raises(ValueError, match=r"clip\.model_config_path: file not found"):
        build_reward({"name": "clip", "model_config_path": str(tmp_path / "nope.json"), "checkpoint": "x"})
    with pytest.raises(ValueError, match=r"clip\.model: 'ViT-B-32' conflicts"):
        build_reward({"name": "clip", "model": "ViT-B-32", "model_config_path": tiny["cfg"], "checkpoint": "x"})
    with pytest.raises(ValueError, match=r"clip\.model: 'not-a-model' is not an open_clip architecture"):
        build_reward({"name": "clip", "model": "not-a-model", "checkpoint": "x"})
    with pytest.raises(ValueError, match=r"clip\.model: required"):
        build_reward({"name": "clip", "checkpoint": "x"})
    with pytest.raises(ValueError, match="allow_download"):
        build_reward({"name": "clip", "model": "hf-hub:laion/CLIP-ViT-H-14-laion2B-s32B-b79K"})
    # A config file must not silently replace a different built-in architecture.
    shadow = write_open_clip_config(tmp_path, name="ViT-B-32")
    with pytest.raises(ValueError, match="shadow"):
        build_reward({"name": "clip", "model_config_path": str(shadow), "checkpoint": "x"})
    wrapped = tmp_path / "wrapped.json"
    wrapped.write_text(json.dumps({"model_cfg": TINY_OPEN_CLIP_CFG}))
    with pytest.raises(ValueError, match=r"lacks the open_clip keys .* belongs in a 'local-dir:' folder"):
        build_reward({"name": "clip", "model_config_path": str(wrapped), "checkpoint": "x"})
    with pytest.raises(ValueError, match=r"hps\.resize_mode"):
        build_reward({"name": "hps", "resize_mode": "crop"})
