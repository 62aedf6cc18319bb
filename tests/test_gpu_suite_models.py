"""The full-size flow rows of the GPU suite (``flow_sd35m``, ``flow_flux``) build their models at the real sizes
and run the backbone call as the rows make it, on the meta device (no memory, no GPU, well under a second): the
parameter counts of SD3.5 Medium and FLUX.1-dev, 4096 image tokens at 1024², the real text lengths (SD3: 77 CLIP
+ 256 T5 positions; FLUX: 512 T5 tokens) and the FLOPs per row the MFU lines divide by."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import default_dtype, flux_dev_components, sd35_medium_components  # noqa: E402
from diffsteer.guidance.models import from_components  # noqa: E402


@pytest.mark.parametrize(
    "build,family,params_b,text_tokens,tflop_per_row",
    [(sd35_medium_components, "sd3", 2.243, 333, 11.25), (flux_dev_components, "flux", 11.901, 512, 74.38)],
)
def test_full_size_flow_models_on_the_meta_device(build, family, params_b, text_tokens, tflop_per_row):
    with torch.device("meta"), default_dtype(torch.bfloat16):
        model = from_components("meta", build())
    backbone = model.backbone
    assert model.family.name == family and backbone.dtype == torch.bfloat16 and backbone.device.type == "meta"
    assert sum(p.numel() for p in backbone.parameters()) / 1e9 == pytest.approx(params_b, abs=1e-3)
    assert model.latent_shape(1024, 1024) == (16, 128, 128) and model.family.tokens(model, 1024, 1024) == 4096
    condition = model.family.encode_prompts(model, ["a red cat"], height=1024, width=1024)[0]
    condition = model.family.with_request_inputs(model, condition, None)
    assert condition.hidden_states.shape == (1, text_tokens, 4096)
    x = torch.zeros(1, 16, 128, 128, device="meta", dtype=torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        out = model.family.forward(backbone, x, torch.tensor(500.0, device="meta"), condition)
    assert out.shape == x.shape
    assert counter.get_total_flops() / 1e12 == pytest.approx(tflop_per_row, rel=0.02)
