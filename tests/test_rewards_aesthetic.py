"""LAION aesthetic predictor: MLP .pth in the public file's layout on tiny open_clip image embeddings."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download

import pytest
import torch
from torch import nn

from diffsteer.rewards import AestheticReward, build_reward
from diffsteer.rewards.aesthetic import AestheticMLP
from tests.test_rewards_support import TINY_OPEN_CLIP_CFG, make_open_clip_model, write_open_clip_config

open_clip = pytest.importorskip("open_clip")

# Key layout of sac+logos+ava1-l14-linearMSE.pth (Linear layers at Sequential indices 0, 2, 4, 6, 7).
PUBLIC_KEYS = {f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")}


def public_layout_mlp(d_in: int) -> nn.Module:
    """The predictor as the LAION repository defines it (dropouts included), built independently."""

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.Sequential(
                nn.Linear(d_in, 1024),
                nn.Dropout(0.2),
                nn.Linear(1024, 128),
                nn.Dropout(0.2),
                nn.Linear(128, 64),
                nn.Dropout(0.1),
                nn.Linear(64, 16),
                nn.Linear(16, 1),
            )

        def forward(self, x):
            return self.layers(x)

    return MLP()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    d = tmp_path_factory.mktemp("aesthetic")
    cfg_path = write_open_clip_config(d)
    clip = make_open_clip_model(seed=2)
    torch.save(clip.state_dict(), d / "clip.bin")
    torch.manual_seed(3)
    mlp = public_layout_mlp(TINY_OPEN_CLIP_CFG["embed_dim"]).eval()
    torch.save(mlp.state_dict(), d / "sac+logos+ava1-l14-linearMSE.pth")
    return {"dir": d, "cfg": str(cfg_path), "clip": clip, "mlp": mlp}


def test_public_layout_and_default_widths():
    assert set(AestheticMLP().state_dict()) == PUBLIC_KEYS
    assert AestheticMLP().input_dim == 768
    widths = [m.out_features for m in AestheticMLP().layers if isinstance(m, nn.Linear)]
    assert widths == [1024, 128, 64, 16, 1]


def test_aesthetic_score_matches_reference_and_has_gradients(tiny):
    reward = build_reward(
        {
            "name": "aesthetic",
            "model_config_path": tiny["cfg"],
            "checkpoint": str(tiny["dir"] / "clip.bin"),
            "head_checkpoint": str(tiny["dir"] / "sac+logos+ava1-l14-linearMSE.pth"),
        }
    )
    assert isinstance(reward, AestheticReward) and reward.default_offset == 10.0 and not reward.uses_prompts
    assert not reward.head.training and not any(p.requires_grad for p in reward.parameters())

    images = torch.rand(3, 3, 50, 41, requires_grad=True)
    scores = reward.score(images)  # prompts are not needed
    assert scores.shape == (3,) and torch.isfinite(scores).all()

    tf = open_clip.image_transform(32, is_train=False)
    with torch.no_grad():
        emb = tiny["clip"].encode_image(torch.stack([tf(i) for i in images.detach()]))
        emb = emb / emb.norm(dim=-1, keepdim=True)  # the predictor's `normalized()`
        ref = tiny["mlp"](emb).squeeze(-1)
    assert torch.allclose(scores.detach(), ref, atol=1e-5)
    assert torch.allclose(reward.score(images.detach(), ["ignored"] * 3), scores.detach())

    scores.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0


def test_aesthetic_errors(tiny, tmp_path):
    base = {"name": "aesthetic", "model_config_path": tiny["cfg"], "checkpoint": str(tiny["dir"] / "clip.bin")}
    with pytest.raises(ValueError, match=r"aesthetic\.head_checkpoint: required"):
        build_reward(base)
    with pytest.raises(ValueError, match=r"aesthetic\.head_checkpoint: file not found"):
        build_reward({**base, "head_checkpoint": str(tmp_path / "x.pth")})
    wrong = public_layout_mlp(768)
    torch.save(wrong.state_dict(), tmp_path / "l14.pth")
    with pytest.raises(ValueError, match="768-d embeddings but the CLIP model"):
        build_reward({**base, "head_checkpoint": str(tmp_path / "l14.pth")})
    torch.save({"fc.weight": torch.zeros(1, 32)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="LAION MLP layout"):
        build_reward({**base, "head_checkpoint": str(tmp_path / "bad.pth")})
