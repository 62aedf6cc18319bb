"""Differentiable CLIP image preprocessing in pure torch.

Reward models are trained on images that went through a PIL/torchvision pipeline: resize (bicubic,
antialiased) so that the image covers the model's input size, centre crop, convert to [0, 1], normalise
with the CLIP mean/std. Reward-driven inference (ReNO, Eyring et al. 2024) and reward fine-tuning need the
same pipeline on a batch of float tensors in [0, 1] *with gradients*, so this module re-implements it
with ``torch.nn.functional.interpolate(mode="bicubic", antialias=True)``, slicing and padding only.

Why ``antialias=True`` bicubic: torch's antialiased kernels were ported from Pillow's resampling code
(same cubic coefficient a = -0.5, same support widening when downscaling), so on a float image they agree
with Pillow's ``Image.resize(..., BICUBIC)`` up to Pillow's 8-bit rounding; plain (non-antialiased)
bicubic uses a = -0.75 and no low-pass filter and differs by a lot when downscaling 512 -> 224.
torchvision's ``Resize`` on tensors calls exactly this function, so on float tensors we match open_clip's
eval transform to float32 round-off. Measured differences are recorded in
``tests/test_rewards_preprocess.py``.

Two libraries, two crop conventions (both reproduced, chosen by ``crop_rounding``):

* open_clip / torchvision ``CenterCrop``: ``top = int(round((H - h) / 2))`` (Python's round, half to even);
* transformers ``CLIPImageProcessor``: ``top = (H - h) // 2`` (floor).

They differ by one pixel when ``H - h`` is 3 mod 4.

Resize modes (open_clip's names):

* ``"shortest"``: scale so that the image covers the target, then centre crop (CLIP's default).
  For a square target this is torchvision ``Resize(int)``: short side -> size,
  long side -> ``int(size * long / short)`` (truncation, not rounding).
* ``"longest"``: scale so that the image fits inside the target, then pad with ``fill`` (HPSv2's
  official ``ResizeMaxSize`` eval transform; open_clip ``resize_mode="longest"``).
* ``"squash"``: resize straight to the target size, ignoring the aspect ratio.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

OPENAI_CLIP_MEAN: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)

ResizeMode = Literal["shortest", "longest", "squash"]
CropRounding = Literal["round", "floor"]
Interpolation = Literal["bicubic", "bilinear"]

_RESIZE_MODES = ("shortest", "longest", "squash")
_CROP_ROUNDINGS = ("round", "floor")
_INTERPOLATIONS = ("bicubic", "bilinear")

# PIL resample codes as stored in transformers' preprocessor_config.json ("resample": 3).
_PIL_RESAMPLE_TO_NAME = {2: "bilinear", 3: "bicubic"}


def _pair(size: int | Sequence[int], what: str) -> tuple[int, int]:
    if isinstance(size, int):
        pair = (size, size)
    else:
        values = tuple(int(s) for s in size)
        if len(values) == 1:
            pair = (values[0], values[0])
        elif len(values) == 2:
            pair = (values[0], values[1])
        else:
            raise ValueError(f"{what}: expected an int or (height, width), got {size!r}")
    if pair[0] <= 0 or pair[1] <= 0:
        raise ValueError(f"{what}: sizes must be positive, got {size!r}")
    return pair


@dataclass(frozen=True)
class ClipPreprocessConfig:
    """What a CLIP-style reward model expects its pixels to look like."""

    size: tuple[int, int] = field(
        default=(224, 224), metadata={"help": "Model input (height, width) after resize and crop/pad."}
    )
    mean: tuple[float, float, float] = field(
        default=OPENAI_CLIP_MEAN, metadata={"help": "Per-channel mean subtracted after scaling to [0, 1]."}
    )
    std: tuple[float, float, float] = field(
        default=OPENAI_CLIP_STD, metadata={"help": "Per-channel std divided out after the mean."}
    )
    resize_mode: ResizeMode = field(
        default="shortest",
        metadata={"help": "'shortest' (cover + centre crop), 'longest' (fit + pad, HPSv2) or 'squash'."},
    )
    shortest_edge: int | None = field(
        default=None,
        metadata={
            "help": "transformers-style resize target for the short side when it differs from the crop "
            "size; None derives it from `size` as open_clip does."
        },
    )
    interpolation: Interpolation = field(default="bicubic", metadata={"help": "'bicubic' or 'bilinear'."})
    antialias: bool = field(default=True, metadata={"help": "Low-pass when downscaling, as PIL and torchvision do."})
    crop_rounding: CropRounding = field(
        default="round",
        metadata={"help": "'round' = open_clip/torchvision CenterCrop, 'floor' = transformers center_crop."},
    )
    fill: float = field(default=0.0, metadata={"help": "Pad value in [0, 1] pixel units (before normalisation)."})

    def __post_init__(self) -> None:
        object.__setattr__(self, "size", _pair(self.size, "size"))
        for name in ("mean", "std"):
            values = getattr(self, name)
            if isinstance(values, (int, float)):
                values = (float(values),) * 3
            values = tuple(float(v) for v in values)
            if len(values) != 3:
                raise ValueError(f"{name}: expected 3 values (RGB), got {values!r}")
            object.__setattr__(self, name, values)
        if any(s <= 0 for s in self.std):
            raise ValueError(f"std: values must be positive, got {self.std!r}")
        if self.resize_mode not in _RESIZE_MODES:
            raise ValueError(f"resize_mode: {self.resize_mode!r} is not one of {_RESIZE_MODES}")
        if self.crop_rounding not in _CROP_ROUNDINGS:
            raise ValueError(f"crop_rounding: {self.crop_rounding!r} is not one of {_CROP_ROUNDINGS}")
        if self.interpolation not in _INTERPOLATIONS:
            raise ValueError(f"interpolation: {self.interpolation!r} is not one of {_INTERPOLATIONS}")
        if self.shortest_edge is not None and int(self.shortest_edge) <= 0:
            raise ValueError(f"shortest_edge: must be positive, got {self.shortest_edge!r}")

    def replace(self, **changes: Any) -> ClipPreprocessConfig:
        values = asdict(self)
        values.update(changes)
        return ClipPreprocessConfig(**values)

    @classmethod
    def from_open_clip(cls, model_or_cfg: Any) -> ClipPreprocessConfig:
        """Read open_clip's preprocessing settings.

        Accepts an open_clip model (its ``visual.preprocess_cfg``, set by ``open_clip.create_model``) or the
        dict / ``PreprocessCfg`` itself. Crops use torchvision's rounding, as open_clip's eval transform does.
        """
        cfg = model_or_cfg
        visual = getattr(model_or_cfg, "visual", None)
        if visual is not None:
            cfg = getattr(visual, "preprocess_cfg", None)
            if cfg is None:
                cfg = {
                    "size": getattr(visual, "image_size", 224),
                    "mean": getattr(visual, "image_mean", None) or OPENAI_CLIP_MEAN,
                    "std": getattr(visual, "image_std", None) or OPENAI_CLIP_STD,
                }
        if not isinstance(cfg, Mapping):
            cfg = asdict(cfg)
        interpolation = cfg.get("interpolation") or "bicubic"
        if interpolation == "random":  # open_clip: 'random' is a training-only option, eval uses bicubic
            interpolation = "bicubic"
        fill_color = cfg.get("fill_color", 0) or 0
        return cls(
            size=_pair(cfg.get("size", 224), "size"),
            mean=tuple(cfg.get("mean") or OPENAI_CLIP_MEAN),
            std=tuple(cfg.get("std") or OPENAI_CLIP_STD),
            resize_mode=cfg.get("resize_mode") or "shortest",
            interpolation=interpolation,
            crop_rounding="round",
            fill=float(fill_color) / 255.0,
        )

    @classmethod
    def from_hf_image_processor(cls, config: Mapping[str, Any] | str | os.PathLike[str]) -> ClipPreprocessConfig:
        """Read a transformers ``CLIPImageProcessor`` configuration.

        ``config`` is the processor's ``to_dict()``, a ``preprocessor_config.json`` path, or the folder
        holding it. Handles both the old (``size: 224``, ``crop_size: 224``) and the new
        (``{"shortest_edge": 224}``, ``{"height": 224, "width": 224}``) layouts.
        """
        if not isinstance(config, Mapping):
            path = os.fspath(config)
            if os.path.isdir(path):
                path = os.path.join(path, "preprocessor_config.json")
            with open(path, encoding="utf-8") as f:
                config = json.load(f)
        size = config.get("size", 224)
        crop_size = config.get("crop_size", None)
        do_crop = bool(config.get("do_center_crop", True))
        shortest_edge: int | None = None
        mode: ResizeMode = "shortest"
        if isinstance(size, Mapping):
            if size.get("shortest_edge") is not None:
                shortest_edge = int(size["shortest_edge"])
                resize_target: tuple[int, int] | None = None
            elif size.get("height") is not None and size.get("width") is not None:
                resize_target = (int(size["height"]), int(size["width"]))
                mode = "squash"
            else:
                raise ValueError(f"size: unsupported image-processor size {size!r}")
        else:
            shortest_edge = int(size)
            resize_target = None
        if do_crop and crop_size is not None:
            if isinstance(crop_size, Mapping):
                final = (int(crop_size["height"]), int(crop_size["width"]))
            else:
                final = _pair(crop_size, "crop_size")
        elif resize_target is not None:
            final = resize_target
        else:
            raise ValueError(
                "crop_size: a processor without centre crop yields variable sizes; CLIP needs a fixed size"
            )
        if mode == "squash" and resize_target != final:
            raise ValueError(f"crop_size: squash resize to {resize_target} followed by a crop is not supported")
        resample = config.get("resample", 3)
        interpolation = _PIL_RESAMPLE_TO_NAME.get(int(resample)) if resample is not None else "bicubic"
        if interpolation is None:
            raise ValueError(f"resample: PIL code {resample!r} unsupported; accepted: 2 (bilinear), 3 (bicubic)")
        return cls(
            size=final,
            mean=tuple(config.get("image_mean") or OPENAI_CLIP_MEAN),
            std=tuple(config.get("image_std") or OPENAI_CLIP_STD),
            resize_mode=mode,
            shortest_edge=shortest_edge if mode == "shortest" else None,
            interpolation=interpolation,
            crop_rounding="floor",
        )


def resized_hw(height: int, width: int, cfg: ClipPreprocessConfig) -> tuple[int, int]:
    """Size after the resize step, reproducing the reference libraries' integer arithmetic."""
    target_h, target_w = cfg.size
    if cfg.resize_mode == "squash":
        return target_h, target_w
    if cfg.resize_mode == "shortest" and (cfg.shortest_edge is not None or target_h == target_w):
        # torchvision Resize(int) / transformers get_resize_output_image_size(default_to_square=False)
        edge = cfg.shortest_edge if cfg.shortest_edge is not None else target_h
        if width <= height:
            return int(edge * height / width), edge
        return edge, int(edge * width / height)
    # open_clip ResizeKeepRatio: ratio of the covering (shortest) or fitting (longest) side
    ratio_h, ratio_w = height / target_h, width / target_w
    ratio = min(ratio_h, ratio_w) if cfg.resize_mode == "shortest" else max(ratio_h, ratio_w)
    return max(1, round(height / ratio)), max(1, round(width / ratio))


def resize(images: Tensor, size: tuple[int, int], interpolation: str = "bicubic", antialias: bool = True) -> Tensor:
    """Differentiable resize of [B, C, H, W]; returns the input unchanged when the size already matches
    (as PIL and torchvision do)."""
    if tuple(images.shape[-2:]) == tuple(size):
        return images
    return F.interpolate(images, size=tuple(size), mode=interpolation, align_corners=False, antialias=antialias)


def center_crop_or_pad(
    images: Tensor, size: tuple[int, int], rounding: CropRounding = "round", fill: float = 0.0
) -> Tensor:
    """Centre crop to ``size``, padding with ``fill`` first where the image is smaller (torchvision's
    layout: the extra pixel of an odd padding goes right/bottom)."""
    crop_h, crop_w = size
    height, width = images.shape[-2:]
    if crop_h > height or crop_w > width:
        pad_w = max(crop_w - width, 0)
        pad_h = max(crop_h - height, 0)
        images = F.pad(images, (pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2), value=fill)
        height, width = images.shape[-2:]
    if (height, width) == (crop_h, crop_w):
        return images
    if rounding == "round":
        top = int(round((height - crop_h) / 2.0))
        left = int(round((width - crop_w) / 2.0))
    else:
        top = (height - crop_h) // 2
        left = (width - crop_w) // 2
    return images[..., top : top + crop_h, left : left + crop_w]


def clip_preprocess(images: Tensor, cfg: ClipPreprocessConfig) -> Tensor:
    """[B, 3, H, W] float images in [0, 1] -> normalised [B, 3, h, w] model input, differentiable.

    Computed in float32 whatever the input dtype (cast the result to the model's dtype afterwards); values
    are not clamped, so gradients flow everywhere.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected shape [B, 3, H, W], got {tuple(images.shape)}")
    x = images.float()
    height, width = x.shape[-2:]
    x = resize(x, resized_hw(height, width, cfg), cfg.interpolation, cfg.antialias)
    x = center_crop_or_pad(x, cfg.size, cfg.crop_rounding, cfg.fill)
    mean = torch.tensor(cfg.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std = torch.tensor(cfg.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean) / std


class ClipPreprocess(nn.Module):
    """Module wrapper of :func:`clip_preprocess` (no parameters)."""

    def __init__(self, cfg: ClipPreprocessConfig) -> None:
        super().__init__()
        self.cfg = cfg

    def forward(self, images: Tensor) -> Tensor:
        return clip_preprocess(images, self.cfg)

    def extra_repr(self) -> str:
        return repr(self.cfg)
