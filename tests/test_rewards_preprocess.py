"""Differentiable preprocessing vs open_clip's eval transform and transformers' CLIPImageProcessor.

Measured on this machine (torch 2.15, torchvision 0.29, open_clip 3.3, transformers 5.23, Pillow 13).
"Normalised" = after mean/std normalisation (a [0, 1] difference times ~3.7-3.8):

* float tensor inputs (open_clip's transform on a tensor = torchvision F.resize; transformers'
  torchvision-backend CLIPImageProcessor with do_rescale=False): max |diff| = 0.0 (bit-identical).
* PIL / uint8 pipelines (open_clip on a PIL image, CLIPImageProcessorPil, CLIPImageProcessor on a PIL
  image): Pillow resamples in 8 bits, rounding (and clipping) after each of its two passes. On photo-like
  content (shapes 61x97 ... 1024x1024, 768x1344) the difference is that rounding: max 0.013-0.016
  normalised (~1.06/255 in [0, 1]), mean 0.004-0.0045 normalised (~0.3/255); 0 when no resize is needed.
  The three references agree with each other to the same precision.
* Worst case, full-range i.i.d. noise: Pillow clips the bicubic overshoot that the float path keeps.
  Downscaling: mean ~0.32/255, < 0.7 % of values off by more than 1/255, max ~18/255. Upscaling noise
  (61x97 -> 224): max ~51/255 on 2.5 % of values. Clamping would close that gap but kill gradients, so
  the float path is not clamped (exactly what torchvision does on tensors).
Non-antialiased bicubic (a = -0.75, no low-pass) is far off when downscaling; measured below too.
"""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing in these tests may download

import numpy as np
import pytest
import torch
from PIL import Image

from diffsteer.rewards.preprocess import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ClipPreprocessConfig,
    center_crop_or_pad,
    clip_preprocess,
    resized_hw,
)
from tests.test_rewards_support import (
    hf_clip_image_processor_classes,
    make_open_clip_model,
    noisy_test_image,
    smooth_test_image,
    to_tensor01,
)

open_clip = pytest.importorskip("open_clip")

MIN_STD = min(OPENAI_CLIP_STD)
# Shapes: square, odd non-square landscape/portrait, upsampling, already at size, odd short side, and
# crop-only cases where the libraries' crop offsets differ (227 - 224 = 3: round -> 2, floor -> 1).
SHAPES = [(512, 512), (300, 457), (457, 301), (61, 97), (224, 224), (225, 333), (227, 224), (224, 227)]


def _normalised(diff_01: float) -> float:
    return diff_01 / MIN_STD


@pytest.mark.parametrize("hw", SHAPES)
@pytest.mark.parametrize("size", [224, 225])
def test_matches_open_clip_transform_on_tensors_exactly(hw, size):
    t = to_tensor01(smooth_test_image(*hw, seed=hw[0]))
    ref = open_clip.image_transform(size, is_train=False)(t[0])
    ours = clip_preprocess(t, ClipPreprocessConfig(size=size))[0]
    assert ours.shape == ref.shape == (3, size, size)
    assert (ours - ref).abs().max().item() <= 1e-6


@pytest.mark.parametrize("hw", SHAPES)
def test_matches_open_clip_transform_on_pil_within_8bit_rounding(hw):
    arr = smooth_test_image(*hw, seed=hw[1])
    ref = open_clip.image_transform(224, is_train=False)(Image.fromarray(arr))
    ours = clip_preprocess(to_tensor01(arr), ClipPreprocessConfig(size=224))[0]
    d = (ours - ref).abs()
    assert d.max().item() <= _normalised(1.25 / 255)
    assert d.mean().item() <= _normalised(0.4 / 255)


@pytest.mark.parametrize("hw", [(512, 512), (300, 457), (457, 301)])
def test_pil_difference_on_noise_is_bounded_and_rare(hw):
    arr = noisy_test_image(*hw)
    ref = open_clip.image_transform(224, is_train=False)(Image.fromarray(arr))
    ours = clip_preprocess(to_tensor01(arr), ClipPreprocessConfig(size=224))[0]
    d01 = (ours - ref).abs() * torch.tensor(OPENAI_CLIP_STD).view(3, 1, 1)  # back to [0, 1] units
    assert d01.mean().item() <= 0.4 / 255
    assert (d01 > 1.01 / 255).float().mean().item() <= 0.01
    assert d01.max().item() <= 24 / 255


def test_antialias_is_the_close_match():
    arr = smooth_test_image(512, 512)
    ref = open_clip.image_transform(224, is_train=False)(Image.fromarray(arr))
    aa = clip_preprocess(to_tensor01(arr), ClipPreprocessConfig(size=224))[0]
    no_aa = clip_preprocess(to_tensor01(arr), ClipPreprocessConfig(size=224, antialias=False))[0]
    err_aa = (aa - ref).abs().mean().item()
    err_no_aa = (no_aa - ref).abs().mean().item()
    assert err_aa * 3 < err_no_aa  # measured: ~0.0035 vs ~0.013 normalised on this content


@pytest.mark.parametrize("hw", SHAPES)
def test_matches_transformers_clip_image_processor(hw):
    tv_cls, pil_cls = hf_clip_image_processor_classes()
    arr = smooth_test_image(*hw, seed=7)
    t = to_tensor01(arr)
    tv_proc = tv_cls()  # torchvision backend: the default CLIPImageProcessor in transformers 5
    cfg = ClipPreprocessConfig.from_hf_image_processor(tv_proc.to_dict())
    assert cfg.crop_rounding == "floor" and cfg.size == (224, 224) and cfg.shortest_edge == 224
    ours = clip_preprocess(t, cfg)[0]

    exact = tv_proc(t[0], do_rescale=False, return_tensors="pt")["pixel_values"][0]
    assert (ours - exact).abs().max().item() <= 1e-5

    for proc in (tv_proc, pil_cls()):
        ref = proc(Image.fromarray(arr), return_tensors="pt")["pixel_values"][0]
        d = (ours - torch.as_tensor(ref)).abs()
        assert d.max().item() <= _normalised(1.25 / 255)
        assert d.mean().item() <= _normalised(0.4 / 255)


def test_crop_conventions_differ_where_the_libraries_do():
    # 227 - 224 = 3 -> torchvision round(1.5) = 2, transformers 3 // 2 = 1; on both axes.
    x = torch.arange(227.0).view(1, 1, 1, 227).expand(1, 3, 224, 227)
    assert center_crop_or_pad(x, (224, 224), "round")[0, 0, 0, 0].item() == 2
    assert center_crop_or_pad(x, (224, 224), "floor")[0, 0, 0, 0].item() == 1
    y = x.transpose(-1, -2)
    assert center_crop_or_pad(y, (224, 224), "round")[0, 0, 0, 0].item() == 2
    assert center_crop_or_pad(y, (224, 224), "floor")[0, 0, 0, 0].item() == 1
    # 226 - 224 = 2: both 1; 229 - 224 = 5: round(2.5) = 2 (half to even), floor 2.
    for width, expected in [(226, 1), (229, 2)]:
        x = torch.arange(float(width)).view(1, 1, 1, width).expand(1, 3, 224, width)
        assert center_crop_or_pad(x, (224, 224), "round")[0, 0, 0, 0].item() == expected
        assert center_crop_or_pad(x, (224, 224), "floor")[0, 0, 0, 0].item() == expected


@pytest.mark.parametrize("hw", [(300, 457), (457, 301), (97, 61)])
def test_longest_mode_matches_open_clip_and_hpsv2_resize_max_size(hw):
    arr = smooth_test_image(*hw, seed=3)
    ref = open_clip.image_transform(224, is_train=False, resize_mode="longest")(Image.fromarray(arr))
    cfg = ClipPreprocessConfig(size=224, resize_mode="longest")
    ours = clip_preprocess(to_tensor01(arr), cfg)[0]
    assert ours.shape == ref.shape
    d = (ours - ref).abs()
    assert d.max().item() <= _normalised(1.25 / 255)
    # HPSv2 ResizeMaxSize: scale = 224 / max(h, w), new = round(dim * scale), pad left/top = pad // 2, fill 0.
    h, w = hw
    scale = 224 / max(h, w)
    nh, nw = round(h * scale), round(w * scale)
    assert resized_hw(h, w, cfg) == (nh, nw)
    pad_top, pad_left = (224 - nh) // 2, (224 - nw) // 2
    black = (torch.zeros(3) - torch.tensor(OPENAI_CLIP_MEAN)) / torch.tensor(OPENAI_CLIP_STD)
    if pad_top:
        assert torch.allclose(ours[:, :pad_top, :], black.view(3, 1, 1).expand(3, pad_top, 224))
    if pad_left:
        assert torch.allclose(ours[:, :, :pad_left], black.view(3, 1, 1).expand(3, 224, pad_left))


def test_non_square_target_matches_open_clip_resize_keep_ratio():
    arr = smooth_test_image(300, 457, seed=5)
    ref = open_clip.image_transform((192, 256), is_train=False)(Image.fromarray(arr))
    ours = clip_preprocess(to_tensor01(arr), ClipPreprocessConfig(size=(192, 256)))[0]
    assert ours.shape == ref.shape == (3, 192, 256)
    assert (ours - ref).abs().max().item() <= _normalised(1.25 / 255)


def test_squash_and_batch_and_dtype():
    x = torch.rand(3, 3, 50, 70, dtype=torch.float64)
    out = clip_preprocess(x, ClipPreprocessConfig(size=32, resize_mode="squash"))
    assert out.shape == (3, 3, 32, 32) and out.dtype == torch.float32
    # Each image is processed independently of the batch.
    single = clip_preprocess(x[1:2], ClipPreprocessConfig(size=32, resize_mode="squash"))
    assert torch.allclose(out[1:2], single, atol=1e-6)


def test_gradients_are_exact():
    # The computation is float32 by design, hence the loose gradcheck tolerances.
    x = torch.rand(1, 3, 9, 7, dtype=torch.float64, requires_grad=True)
    for cfg in (ClipPreprocessConfig(size=5), ClipPreprocessConfig(size=(4, 6), resize_mode="longest")):
        assert torch.autograd.gradcheck(
            lambda y, cfg=cfg: clip_preprocess(y.float(), cfg).double(), (x,), eps=1e-3, atol=2e-3
        )
    big = torch.rand(1, 3, 64, 48, requires_grad=True)
    clip_preprocess(big, ClipPreprocessConfig(size=32)).square().sum().backward()
    assert big.grad is not None and big.grad.abs().sum() > 0


def test_config_validation_and_hf_layouts(tmp_path):
    with pytest.raises(ValueError, match="resize_mode"):
        ClipPreprocessConfig(resize_mode="crop")
    with pytest.raises(ValueError, match="std"):
        ClipPreprocessConfig(std=(0.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="shape"):
        clip_preprocess(torch.rand(3, 8, 8), ClipPreprocessConfig(size=4))
    old = {
        "size": 224,
        "crop_size": 224,
        "do_center_crop": True,
        "resample": 3,
        "image_mean": list(OPENAI_CLIP_MEAN),
        "image_std": list(OPENAI_CLIP_STD),
    }
    (tmp_path / "preprocessor_config.json").write_text(__import__("json").dumps(old))
    cfg = ClipPreprocessConfig.from_hf_image_processor(tmp_path)
    assert cfg.size == (224, 224) and cfg.shortest_edge == 224 and cfg.interpolation == "bicubic"
    with pytest.raises(ValueError, match="resample"):
        ClipPreprocessConfig.from_hf_image_processor({**old, "resample": 0})


def test_from_open_clip_model_reads_its_preprocess_cfg():
    from open_clip.model import set_model_preprocess_cfg
    from open_clip.transform import PreprocessCfg, merge_preprocess_dict

    model = make_open_clip_model()
    set_model_preprocess_cfg(model, merge_preprocess_dict(PreprocessCfg(size=224), {"resize_mode": "squash"}))
    cfg = ClipPreprocessConfig.from_open_clip(model)
    assert cfg.size == (224, 224) and cfg.resize_mode == "squash" and cfg.crop_rounding == "round"
    assert np.allclose(cfg.mean, OPENAI_CLIP_MEAN) and np.allclose(cfg.std, OPENAI_CLIP_STD)
