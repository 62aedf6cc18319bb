"""diffusers' own images, for the tests that hold our sampler equal to its pipelines."""

from __future__ import annotations

import numpy as np
import torch


def pipeline_images(pipe, prompt: str, steps: int, seeds: list[int], **kwargs) -> np.ndarray:
    """The pipeline's images for ``seeds`` (one CPU generator per image, as our sampler draws each image's noise),
    as grey levels [N, H, W, 3] of int."""
    pipe.set_progress_bar_config(disable=True)
    generator = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    images = pipe(prompt, num_inference_steps=steps, generator=generator, output_type="np", **kwargs).images
    return (np.asarray(images) * 255).round().astype(int)


def assert_same_image(a: np.ndarray, b: np.ndarray) -> None:
    """Equal within one grey level."""
    assert a.shape == b.shape
    assert np.abs(a - b).max() <= 1, f"max difference {np.abs(a - b).max()} grey levels"
