"""PickScore on a tiny random transformers CLIPModel saved with save_pretrained, plus an offline tokenizer."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download

import pytest
import torch

from diffsteer.rewards import PickScoreReward, PickScoreRewardConfig, build_reward
from tests.test_rewards_support import make_tiny_hf_clip

transformers = pytest.importorskip("transformers")

PROMPTS = ["a red cat", "a photo of a dog on the grass"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickscore")
    model, tokenizer, processor = make_tiny_hf_clip(root / "model", root / "processor")
    return {
        "model_path": str(root / "model"),
        "processor_path": str(root / "processor"),
        "model": model,
        "tokenizer": tokenizer,
        "processor": processor,
    }


def reference_pickscore(tiny, images, prompts):
    """The paper's recipe with transformers' own processor: logit_scale.exp() * cos, as CLIPModel.forward."""
    pixel_values = tiny["processor"](list(images), do_rescale=False, return_tensors="pt")["pixel_values"]
    text = tiny["tokenizer"](prompts, padding=True, truncation=True, max_length=77, return_tensors="pt")
    with torch.no_grad():
        out = tiny["model"](
            input_ids=text["input_ids"], attention_mask=text["attention_mask"], pixel_values=pixel_values
        )
    return out.logits_per_image.diagonal()


def test_pickscore_matches_clipmodel_and_has_gradients(tiny):
    reward = build_reward(
        {"name": "pickscore", "model_path": tiny["model_path"], "processor_path": tiny["processor_path"]}
    )
    assert isinstance(reward, PickScoreReward) and reward.default_offset == 30.0
    assert not any(p.requires_grad for p in reward.parameters())
    assert torch.equal(reward.model.visual_projection.weight, tiny["model"].visual_projection.weight)
    assert reward.preprocess_cfg.crop_rounding == "floor" and reward.preprocess_cfg.size == (32, 32)

    torch.manual_seed(0)
    images = torch.rand(2, 3, 45, 37, requires_grad=True)  # odd, non-square
    scores = reward.score(images, PROMPTS)
    assert scores.shape == (2,) and torch.isfinite(scores).all()
    ref = reference_pickscore(tiny, images.detach(), PROMPTS)
    assert torch.allclose(scores.detach(), ref, atol=1e-4)
    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0 and torch.isfinite(images.grad).all()


def test_gradient_checkpointing_is_active_and_changes_nothing(tiny):
    paths = {"model_path": tiny["model_path"], "processor_path": tiny["processor_path"]}
    ckpt = build_reward(PickScoreRewardConfig(**paths))
    plain = build_reward(PickScoreRewardConfig(**paths, gradient_checkpointing=False))
    layers = [m for m in ckpt.model.vision_model.modules() if hasattr(m, "gradient_checkpointing")]
    assert layers and all(m.gradient_checkpointing and m.training for m in layers)
    assert not plain.model.vision_model.training
    # Parent .train()/.eval() calls do not undo the arrangement or unfreeze anything.
    ckpt.train()
    assert ckpt.model.vision_model.training and not ckpt.model.text_model.training
    ckpt.eval()
    assert ckpt.model.vision_model.training

    images = torch.rand(2, 3, 40, 40)
    grads = []
    for reward in (ckpt, plain):
        x = images.clone().requires_grad_(True)
        s = reward.score(x, PROMPTS)
        s.sum().backward()
        grads.append((s.detach(), x.grad))
    assert torch.allclose(grads[0][0], grads[1][0], atol=1e-6)
    assert torch.allclose(grads[0][1], grads[1][1], atol=1e-6)


def test_processor_path_defaults_to_model_path_and_errors(tiny, tmp_path):
    with pytest.raises(ValueError, match=r"pickscore\.model_path: required"):
        build_reward({"name": "pickscore"})
    with pytest.raises(ValueError, match=r"pickscore\.model_path: folder not found"):
        build_reward({"name": "pickscore", "model_path": str(tmp_path / "nope")})
    with pytest.raises(ValueError, match=r"pickscore\.model_path: .* has no config.json"):
        build_reward({"name": "pickscore", "model_path": str(tmp_path)})
    # PickScore_v1's folder has no tokenizer: the error points at processor_path.
    with pytest.raises(ValueError, match=r"pickscore\.processor_path"):
        build_reward({"name": "pickscore", "model_path": tiny["model_path"]})
    with pytest.raises(ValueError, match=r"pickscore\.max_length"):
        build_reward({"name": "pickscore", "model_path": tiny["model_path"], "max_length": 0})
