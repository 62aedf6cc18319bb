"""Where the proving ground's shipped artefacts live inside the installed package.

The model registry (``builtin:proving-ground``, ``builtin:proving-ground-flow``,
``builtin:proving-ground-1step``), the default reward library
(the proving ground's CLIP) and the held-out suite read these paths; the builders in this package write them.
"""

from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().with_name("assets")
MODEL = ASSETS / "model"  # the UNet model of the shapes world (diffusers folder), builtin:proving-ground
FLOW_MODEL = ASSETS / "model-flow"  # the flow-matching SD3-style model, builtin:proving-ground-flow
ONE_STEP_MODEL = ASSETS / "model-1step"  # its f-distill one-step student, builtin:proving-ground-1step
CLIP = ASSETS / "clip"  # the open_clip model trained on the world (the default `clip` reward)
LATENT_EVALUATORS = ASSETS / "latent_evaluators"  # latent evaluators for MODEL (opt-in: model.extra)
HELDOUT_SUITE = ASSETS / "heldout_suite.jsonl"  # the held-out prompt suite (seed 0)
