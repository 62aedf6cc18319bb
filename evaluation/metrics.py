"""Per-image metrics of an A/B run, each with a direction (is higher or lower better).

Metric names (the CLI's ``--metrics``, comma-separated):

============== ========================================================================== =========
name           value per image (columns in results.json)                                   better
============== ========================================================================== =========
verifier       the proving ground's exact verifier (:func:`diffsteer.proving_ground.verify`): 1/0 for  higher
               ``verifier.passed`` and for each attribute ``verifier.object_present``,
               ``.colour_correct``, ``.shape_correct``, ``.count_correct``,
               ``.position_correct`` (null where the prompt has no relation). Needs prompts
               with a proving-ground spec (``pg:`` sources, or files of such captions).
saturation     mean over pixels of the HSV saturation ``S = (max - min) / max`` of the       lower
               8-bit RGB values (``S = 0`` where ``max = 0``), in [0, 1]. Lower is better
               by default because the concern here is CFG's oversaturation at high scales
               (APG's motivation); override with ``directions``.
oversaturation fraction of pixels with at least one channel clipped, i.e. equal to 0 or 255  lower
               in the saved 8-bit image (the decoder's output is clamped to [0, 1] before
               quantisation, so these are the pixels that hit the clamp), in [0, 1].
nfe            UNet evaluations spent on the image (the denoiser's count).               lower
latency        seconds per image: the wall time of the batch's ``generate`` call (text     lower
               encoding, denoising, decoding) divided by its number of images.
reward:SPEC    a reward model's score, via :func:`diffsteer.guidance.reward_models.get_reward`        higher
               (``reward:clip``, ``reward:saturation``, ``reward:hps:5,pickscore:0.05``;
               weights and paths from the server-side reward configs).
latent         the model's latent evaluators (:mod:`diffsteer.guidance.latent_evaluators`) on the   higher
               VAE-encoded image as a clean latent: their combined score with the saved
               weights, or ``latent:alignment:1,fidelity:0.5``. Cheap (a VAE encode, two
               small networks and, for an embedding evaluator, the reward's text tower
               once per prompt; no image tower); needs a model with latent evaluators
               (the first arm's model is used).
============== ========================================================================== =========

In a comma-separated list a piece that is neither a metric name nor starts with ``reward:`` or ``latent:``
continues the reward (or latent) spec before it, so ``reward:hps:5,pickscore:0.05,nfe`` is the composite ``hps:5,pickscore:0.05``
and ``nfe``. The image metrics (everything but ``nfe`` and ``latency``) are computed from the 8-bit image,
which is exactly what is saved as PNG, so they can be recomputed from the files (resume does that for
metrics added later).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.latent_evaluators import latent_reward
from diffsteer.guidance.reward_models import DEFAULT_REWARDS
from diffsteer.proving_ground import verify

FIELD = "metrics"
VERIFIER_COLUMNS: tuple[str, ...] = (
    "verifier.passed",
    "verifier.object_present",
    "verifier.colour_correct",
    "verifier.shape_correct",
    "verifier.count_correct",
    "verifier.position_correct",
)
BUILTIN: dict[str, tuple[str, str]] = {
    "verifier": ("higher", "proving-ground verifier: 1 if the image passes / the attribute holds, else 0"),
    "saturation": ("lower", "mean HSV saturation (max-min)/max of the 8-bit RGB pixels, 0 where max = 0"),
    "oversaturation": ("lower", "fraction of pixels with a channel at 0 or 255 (clipped) in the 8-bit image"),
    "nfe": ("lower", "UNet evaluations per image"),
    "latency": ("lower", "seconds per image: the batch's generate() wall time / its number of images"),
}
SPEC_PREFIXES = ("reward:", "latent:")
RECORDED = ("nfe", "latency")  # measured while generating, not computable from the image
DEFAULT_METRICS = ("saturation", "oversaturation", "nfe", "latency")


@dataclass(frozen=True)
class Column:
    """One per-image value that enters the statistics."""

    name: str
    metric: str  # the requested metric it comes from
    direction: str
    description: str


def parse_metric_list(text: str | Sequence[str]) -> list[str]:
    """Split a comma-separated list (or the items of a list) into metric names (see the module docstring)."""
    if not isinstance(text, str | list | tuple):
        raise InvalidInput(FIELD, f"expected a comma-separated string or a list of names, got {type(text).__name__}")
    pieces = [text] if isinstance(text, str) else list(text)
    out: list[str] = []
    for piece in pieces:
        if not isinstance(piece, str):
            raise InvalidInput(FIELD, f"expected metric names (strings), got {type(piece).__name__}")
        for part in (p.strip() for p in piece.split(",")):
            if not part:
                continue
            if part in BUILTIN or part.startswith(SPEC_PREFIXES) or not out or not out[-1].startswith(SPEC_PREFIXES):
                out.append(part)
            else:
                out[-1] = f"{out[-1]},{part}"
    return out


def check_metric_names(names: Sequence[str]) -> list[str]:
    """Names validated syntactically (unknown names, empty reward specs, repeats)."""
    seen: set[str] = set()
    for name in names:
        if name.startswith("reward:"):
            if not name[len("reward:") :].strip():
                raise InvalidInput(FIELD, "reward: needs a reward spec, e.g. reward:clip or reward:saturation")
        elif name != "latent" and not name.startswith("latent:") and name not in BUILTIN:
            raise InvalidInput(
                FIELD,
                f"unknown metric {name!r}; accepted: {', '.join(BUILTIN)}, reward:SPEC (e.g. reward:clip), "
                "latent[:WEIGHTS]",
            )
        if name in seen:
            raise InvalidInput(FIELD, f"{name!r} is listed twice")
        seen.add(name)
    if not names:
        raise InvalidInput(FIELD, "no metric given")
    return list(names)


def columns_for(names: Sequence[str], directions: Mapping[str, str] | None = None) -> list[Column]:
    """The columns of the metrics, with directions overridden per metric or per column by ``directions``."""
    directions = dict(directions or {})
    cols: list[Column] = []
    for name in names:
        if name == "verifier":
            cols += [Column(c, name, "higher", BUILTIN[name][1]) for c in VERIFIER_COLUMNS]
        elif name.startswith("reward:"):
            cols.append(Column(name, name, "higher", f"reward model score {name[len('reward:') :]} (higher is better)"))
        elif name == "latent" or name.startswith("latent:"):
            cols.append(
                Column(name, name, "higher", "the model's latent evaluators on the encoded image (higher is better)")
            )
        else:
            cols.append(Column(name, name, *BUILTIN[name]))
    known = {c.name for c in cols} | {c.metric for c in cols}
    for key, value in directions.items():
        if key not in known:
            raise InvalidInput(
                "directions", f"{key!r} is not a metric of this run; metrics: {', '.join(sorted(known))}"
            )
        if value not in ("higher", "lower"):
            raise InvalidInput("directions", f"{key}: expected higher or lower, got {value!r}")
    return [
        Column(c.name, c.metric, directions.get(c.name, directions.get(c.metric, c.direction)), c.description)
        for c in cols
    ]


# ----------------------------------------------------------------------------- image measures


def hsv_saturation_mean(image: np.ndarray) -> float:
    """Mean HSV saturation of an 8-bit RGB image ``[H, W, 3]``: ``(max - min) / max`` per pixel, 0 where
    ``max = 0``."""
    rgb = np.asarray(image, dtype=np.float64)
    cmax = rgb.max(axis=-1)
    cmin = rgb.min(axis=-1)
    sat = np.divide(cmax - cmin, cmax, out=np.zeros_like(cmax), where=cmax > 0)
    return float(sat.mean())


def clipped_fraction(image: np.ndarray) -> float:
    """Fraction of pixels of an 8-bit RGB image ``[H, W, 3]`` with at least one channel equal to 0 or 255."""
    rgb = np.asarray(image)
    if rgb.dtype != np.uint8:
        raise ValueError(f"expected an 8-bit image, got {rgb.dtype}")
    clipped = ((rgb == 0) | (rgb == 255)).any(axis=-1)
    return float(clipped.mean())


def verifier_values(image: np.ndarray, spec: Any) -> dict[str, float | None]:
    report = verify(image, spec)
    return {f"verifier.{k}": (None if v is None else float(bool(v))) for k, v in report.attributes().items()}


class MetricScorer:
    """Computes the image metrics of a run (everything except ``nfe`` and ``latency``).

    Reward models are built once here, from ``rewards`` (a :class:`diffsteer.guidance.reward_models.RewardModels`, e.g.
    the service's; default: the configuration-free one), so a bad spec or missing weights fail before any
    image is generated.
    """

    def __init__(self, names: Sequence[str], device: Any = "cpu", rewards: Any = None, model: Any = None):
        rewards = rewards or DEFAULT_REWARDS

        self.names = [n for n in names if n not in RECORDED]
        self.device = torch.device(device)
        self.model = model
        self.rewards: dict[str, Any] = {}
        for name in self.names:
            if name == "latent" or name.startswith("latent:"):
                if model is None:
                    raise InvalidInput(FIELD, f"{name}: needs a model (the latent evaluators are the model's)")
                self.rewards[name] = latent_reward(model, name, field=FIELD, rewards=rewards)
            if name.startswith("reward:"):
                spec = name[len("reward:") :]
                try:
                    self.rewards[name] = rewards.get(spec, self.device, torch.float32, field=FIELD)
                except InvalidInput as e:
                    raise InvalidInput(FIELD, f"{name}: {e.reason}") from None
                except (OSError, RuntimeError, ImportError) as e:
                    raise InvalidInput(FIELD, f"{name}: could not be loaded ({type(e).__name__}: {e})") from None

    def columns_of(self, name: str) -> tuple[str, ...]:
        return VERIFIER_COLUMNS if name == "verifier" else (name,)

    def score(
        self,
        images: Sequence[np.ndarray],
        prompts: Sequence[str],
        specs: Sequence[Any],
        names: Sequence[str] | None = None,
    ) -> list[dict[str, float | None]]:
        """Values of the metrics ``names`` (default: all of this scorer's) for each 8-bit image."""
        names = self.names if names is None else [n for n in names if n not in RECORDED]
        out: list[dict[str, float | None]] = [{} for _ in images]
        if not images or not names:
            return out
        for name in names:
            if name == "saturation":
                for row, img in zip(out, images):
                    row[name] = hsv_saturation_mean(img)
            elif name == "oversaturation":
                for row, img in zip(out, images):
                    row[name] = clipped_fraction(img)
            elif name == "verifier":
                for row, img, spec in zip(out, images, specs):
                    if spec is None:
                        raise InvalidInput(
                            FIELD, "verifier needs proving-ground prompts (pg:... or captions of that world)"
                        )
                    row.update(verifier_values(img, spec))
            elif name == "latent" or name.startswith("latent:"):
                batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).to(self.model.device)
                scores = self.rewards[name].score_images(self.model, batch, list(prompts)).numpy()
                for row, s in zip(out, scores):
                    row[name] = float(s)
            elif name.startswith("reward:"):
                batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float().div(255.0).to(self.device)
                with torch.no_grad():
                    scores = self.rewards[name].score(batch, list(prompts)).float().cpu().numpy()
                for row, s in zip(out, scores):
                    row[name] = float(s)
            else:  # pragma: no cover - names are validated up front
                raise InvalidInput(FIELD, f"unknown metric {name!r}")
        return out
