"""Weight-free rewards: saturation, brightness, contrast (differentiable) and JPEG compressibility (not)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from diffsteer.rewards import NonDifferentiableRewardError, build_reward


def solid(rgb, n=1, size=8):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(n, 3, size, size).clone()


def test_saturation_values_and_gradient():
    r = build_reward("saturation")
    imgs = torch.cat([solid((1, 0, 0)), solid((0.5, 0.5, 0.5)), solid((0.8, 0.4, 0.2)), solid((0, 0, 0))])
    s = r.score(imgs)
    assert torch.allclose(s, torch.tensor([1.0, 0.0, 0.75, 0.0]), atol=1e-5)
    # Matches PIL's HSV conversion on a random image (PIL works in 8 bits).
    rng = np.random.default_rng(0)
    arr = rng.integers(1, 256, (16, 16, 3), dtype=np.uint8)
    pil_s = np.asarray(Image.fromarray(arr).convert("HSV"))[..., 1].astype(np.float64).mean() / 255
    ours = r.score(torch.from_numpy(arr).permute(2, 0, 1)[None].float() / 255).item()
    assert abs(ours - pil_s) < 2 / 255
    x = torch.rand(2, 3, 8, 8, requires_grad=True)
    r.score(x).sum().backward()
    assert x.grad.abs().sum() > 0
    assert r.default_offset == 1.0


def test_brightness_and_contrast_targets():
    b = build_reward({"name": "brightness", "target": 0.25})
    gray = solid((0.5, 0.5, 0.5), n=2)
    assert torch.allclose(b.score(gray), torch.tensor([-0.25, -0.25]))
    luma = 0.299 * 0.2 + 0.587 * 0.6 + 0.114 * 0.9
    assert torch.allclose(b.score(solid((0.2, 0.6, 0.9))), torch.tensor([-abs(luma - 0.25)]), atol=1e-6)
    b2 = build_reward({"name": "brightness", "target": 0.25, "distance": "squared"})
    assert torch.allclose(b2.score(gray), torch.tensor([-0.0625, -0.0625]))

    c = build_reward({"name": "contrast", "target": 0.5})
    checker = torch.zeros(1, 3, 4, 4)
    checker[..., ::2, ::2] = 1
    checker[..., 1::2, 1::2] = 1  # half black, half white: luma std = 0.5
    assert torch.allclose(c.score(checker), torch.tensor([0.0]), atol=1e-6)
    assert torch.allclose(c.score(gray[:1]), torch.tensor([-0.5]), atol=1e-6)

    # Gradient ascent on brightness moves the mean luma towards the target.
    x = torch.full((1, 3, 4, 4), 0.8, requires_grad=True)
    b.score(x).sum().backward()
    assert (x.grad < 0).all()


def test_jpeg_compressibility_is_a_non_differentiable_metric():
    r = build_reward({"name": "jpeg_compressibility", "quality": 90})
    assert r.differentiable is False
    rng = np.random.default_rng(0)
    noise = torch.from_numpy(rng.uniform(0, 1, (1, 3, 64, 64))).float()
    flat = solid((0.3, 0.6, 0.2), size=64)
    scores = r.score(torch.cat([noise, flat]))
    assert scores[1] > scores[0]  # the flat image compresses far better
    assert not scores.requires_grad
    # Equal to -kB of PIL's own encoding of the quantised image.
    arr = (noise[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=90)
    assert scores[0].item() == pytest.approx(-buf.tell() / 1000)

    x = torch.rand(1, 3, 16, 16, requires_grad=True)
    with pytest.raises(NonDifferentiableRewardError, match="non-differentiable"):
        r.score(x)
    with torch.no_grad():
        assert r.score(x).shape == (1,)
    assert r.score(x.detach()).shape == (1,)


def test_input_validation():
    r = build_reward("saturation")
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        r.score(torch.rand(3, 8, 8))
    with pytest.raises(ValueError, match="floating point"):
        r.score(torch.zeros(1, 3, 8, 8, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"brightness\.target"):
        build_reward({"name": "brightness", "target": 2.0})
    with pytest.raises(ValueError, match=r"jpeg_compressibility\.quality"):
        build_reward({"name": "jpeg_compressibility", "quality": 100})
