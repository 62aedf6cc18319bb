"""Small latent-space evaluators: score (latent, noise level, prompt) without the VAE.

Papalampidi et al. 2025, "Dynamic Classifier-Free Diffusion Guidance via Online Feedback" (arXiv:2509.16131)
make per-step greedy guidance affordable with evaluators that read latents directly instead of decoding every
candidate: an alignment evaluator (CLIP-style text-image agreement) and a fidelity discriminator, among others.
No code was published; this is our family, trained by ``diffsteer train latent-evaluator``
(:mod:`training.latent_evaluator`):

* **alignment** ``A(ẑ0, λ, c)``: distilled to agree with a pixel-space reward of :mod:`rewards` (any composite a
  user configures, e.g. ``clip:1``) on the decoded clean-latent prediction, ``A(ẑ0, λ, c) ≈ R(D(ẑ0), prompt)``,
  in the reward's units (the network's output times the target's standard deviation plus its mean, both fixed
  at training time);
* **fidelity** ``F(ẑ0, λ)``: a discriminator's logit, log p(real)/p(model), between the model's own clean-latent
  predictions at log-SNR λ (under guidance) and its predictions from real-data latents noised to the same λ.

Inputs: ``ẑ0`` a clean-latent prediction ``[N, C, h, w]`` (any h, w), the noise level as ᾱ of the step (the
network reads λ = log(ᾱ/(1−ᾱ)), clamped to the range it was trained on, so a clean latent, ᾱ = 1, is read as the
least noisy trained level), and the prompt as the diffusion model's own text-encoder states ``[N, L, D]`` (the
``cond`` condition the sampler already encoded, so scoring needs no text encoder). One network call scores all
candidates of all images.

On disk: a folder (by default ``latent_evaluators/`` inside the model's folder; ``model.extra
["latent_evaluators"]`` may point elsewhere) holding ``latent_evaluators.json`` (architecture, normalisation,
default weights, what they were distilled from) and one ``<kind>.safetensors`` per evaluator.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from guidance.errors import InvalidInput

KINDS = ("alignment", "fidelity")
FOLDER = "latent_evaluators"
CONFIG_FILE = "latent_evaluators.json"
NOISE_FEATURES = 16  # sinusoidal features of λ


def log_snr(alpha_bar: torch.Tensor, bounds: tuple[float, float]) -> torch.Tensor:
    """λ = log(ᾱ/(1−ᾱ)), clamped to ``bounds`` (ᾱ = 1 gives the upper bound)."""
    a = alpha_bar.double().clamp(1e-12, 1.0)
    lam = torch.log(a) - torch.log1p(-a.clamp(max=1 - 1e-12))
    return lam.clamp(*bounds).float()


def noise_features(lam: torch.Tensor) -> torch.Tensor:
    """[N, NOISE_FEATURES]: sin/cos of λ at geometric frequencies 1/16 … 1 (λ spans about ±15)."""
    freqs = torch.logspace(-math.log10(16), 0, NOISE_FEATURES // 2, device=lam.device, dtype=torch.float32)
    angles = lam.float()[:, None] * freqs[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class _NoiseResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice with a FiLM shift/scale from the noise embedding, residual."""

    def __init__(self, width: int):
        super().__init__()
        self.norm1, self.conv1 = nn.GroupNorm(8, width), nn.Conv2d(width, width, 3, padding=1)
        self.norm2, self.conv2 = nn.GroupNorm(8, width), nn.Conv2d(width, width, 3, padding=1)
        self.film = nn.Linear(width, 2 * width)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[:, :, None, None].chunk(2, dim=1)
        r = self.conv1(F.silu(self.norm1(h)))
        r = self.norm2(r) * (1 + scale) + shift
        return h + self.conv2(F.silu(r))


class LatentEvaluatorNet(nn.Module):
    """One evaluator: a patchify stem (``patch``×``patch``, stride ``patch``), ``stages`` noise-conditioned residual blocks each followed
    by a stride-2 downsampling, mean-pooled spatial tokens and, with ``use_text``, cross-attention from the spatial
    tokens to the projected text states; an MLP head gives one score per input."""

    def __init__(self, latent_channels: int, text_dim: int, width: int = 32, stages: int = 2, use_text: bool = True,
                 patch: int = 2):
        super().__init__()
        self.use_text = use_text
        self.stem = nn.Conv2d(latent_channels, width, patch, stride=patch)
        self.noise_mlp = nn.Sequential(nn.Linear(NOISE_FEATURES, width), nn.SiLU(), nn.Linear(width, width))
        self.blocks = nn.ModuleList([_NoiseResBlock(width) for _ in range(stages)])
        self.downs = nn.ModuleList([nn.Conv2d(width, width, 3, stride=2, padding=1) for _ in range(stages)])
        features = width
        if use_text:
            self.text_proj = nn.Linear(text_dim, width)
            self.attention = nn.MultiheadAttention(width, 4, batch_first=True)
            features = 3 * width
        self.head = nn.Sequential(nn.LayerNorm(features), nn.Linear(features, width), nn.SiLU(), nn.Linear(width, 1))

    def forward(self, latents: torch.Tensor, lam: torch.Tensor, text: torch.Tensor | None = None) -> torch.Tensor:
        emb = self.noise_mlp(noise_features(lam))
        h = self.stem(latents)
        for block, down in zip(self.blocks, self.downs):
            h = down(block(h, emb))
        tokens = h.flatten(2).transpose(1, 2)  # [N, hw, W]
        pooled = tokens.mean(dim=1)
        if self.use_text:
            if text is None:
                raise ValueError("this evaluator reads the prompt: text states are required")
            t = self.text_proj(text.to(tokens.dtype))
            attended, _ = self.attention(tokens, t, t, need_weights=False)
            pooled = torch.cat([pooled, attended.mean(dim=1), pooled * t.mean(dim=1)], dim=1)
        return self.head(pooled).squeeze(-1)


@dataclass(frozen=True)
class EvaluatorSpec:
    """What one saved evaluator is: its architecture, the affine map of its output and what it learned."""

    kind: str
    width: int
    stages: int
    use_text: bool
    patch: int = 2
    output_mean: float = 0.0  # score = output_mean + output_std · net(...)
    output_std: float = 1.0
    target: str = ""  # alignment: the reward spec it was distilled from; fidelity: the real images

    def build(self, latent_channels: int, text_dim: int) -> LatentEvaluatorNet:
        return LatentEvaluatorNet(latent_channels, text_dim, self.width, self.stages, self.use_text, self.patch)


@dataclass
class LatentScores:
    total: torch.Tensor  # [N] Σ_j λ_j·E_j
    parts: dict[str, torch.Tensor]  # kind -> [N]


def parse_weights(spec: str, available: tuple[str, ...] | list[str], field: str = "policy.latent_weights") -> dict[str, float]:
    """``"alignment:1,fidelity:0.2"`` -> {kind: weight}; InvalidInput naming ``field`` for an unknown kind or a bad
    number."""
    weights: dict[str, float] = {}
    for part in (p.strip() for p in spec.split(",")):
        if not part:
            continue
        name, _, value = part.partition(":")
        name = name.strip()
        if name not in available:
            raise InvalidInput(field, f"unknown latent evaluator {name!r}; this model has: {', '.join(available)}")
        try:
            weight = float(value) if value.strip() else 1.0
        except ValueError:
            raise InvalidInput(field, f"{part!r}: the weight must be a number") from None
        if not math.isfinite(weight):
            raise InvalidInput(field, f"{part!r}: the weight must be finite")
        weights[name] = weight
    if not weights:
        raise InvalidInput(field, f"no evaluator named; this model has: {', '.join(available)}")
    return weights


class LatentEvaluators(nn.Module):
    """The evaluators of one model: ``score`` runs every weighted one on all inputs in one call each."""

    def __init__(self, latent_channels: int, text_dim: int, specs: dict[str, EvaluatorSpec],
                 log_snr_bounds: tuple[float, float], default_weights: dict[str, float], meta: dict[str, Any] | None = None):
        super().__init__()
        self.latent_channels, self.text_dim = latent_channels, text_dim
        self.specs = dict(specs)
        self.nets = nn.ModuleDict({k: s.build(latent_channels, text_dim) for k, s in specs.items()})
        self.log_snr_bounds = (float(log_snr_bounds[0]), float(log_snr_bounds[1]))
        self.default_weights = dict(default_weights)
        self.meta = dict(meta or {})

    @property
    def kinds(self) -> list[str]:
        return list(self.nets)

    def evaluate(self, kind: str, latents: torch.Tensor, alpha_bar: torch.Tensor | float,
                 text: torch.Tensor | None = None) -> torch.Tensor:
        """One evaluator's score [N] in its units (``output_mean + output_std · net``); differentiable."""
        net, spec = self.nets[kind], self.specs[kind]
        lam = self._log_snr(alpha_bar, latents)
        param = next(net.parameters())
        out = net(latents.to(param.dtype), lam.to(param.device), text.to(param.dtype) if spec.use_text else None)
        return spec.output_mean + spec.output_std * out.float()

    def score(self, latents: torch.Tensor, alpha_bar: torch.Tensor | float, text: torch.Tensor | None,
              weights: dict[str, float] | None = None) -> LatentScores:
        """Σ_j λ_j·E_j(latents, ᾱ, text) per row, and each E_j; ``weights`` default to the saved ones."""
        weights = self.default_weights if weights is None else weights
        parts = {k: self.evaluate(k, latents, alpha_bar, text) for k, w in weights.items() if w != 0}
        total = torch.zeros(latents.shape[0], dtype=torch.float32, device=latents.device)
        for k, value in parts.items():
            total = total + weights[k] * value
        return LatentScores(total, parts)

    def _log_snr(self, alpha_bar: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        a = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if a.ndim == 0:
            a = a.expand(latents.shape[0])
        return log_snr(a, self.log_snr_bounds).to(latents.device)

    # ------------------------------------------------------------------ files

    def save(self, directory: Path | str, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the folder atomically (written beside it, then renamed into place)."""
        from safetensors.torch import save_file

        from guidance.files import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            config = {
                "format": 1,
                "latent_channels": self.latent_channels,
                "text_dim": self.text_dim,
                "log_snr_bounds": list(self.log_snr_bounds),
                "default_weights": self.default_weights,
                "evaluators": {k: {f: getattr(s, f) for f in ("width", "stages", "use_text", "patch", "output_mean", "output_std", "target")}
                               for k, s in self.specs.items()},
                "meta": {**self.meta, **(extra_meta or {})},
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            for kind, net in self.nets.items():
                save_file({k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()}, str(tmp / f"{kind}.safetensors"))
        return directory

    @classmethod
    def load(cls, directory: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> "LatentEvaluators":
        from safetensors.torch import load_file

        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            specs = {k: EvaluatorSpec(kind=k, **v) for k, v in config["evaluators"].items()}
            evaluators = cls(int(config["latent_channels"]), int(config["text_dim"]), specs,
                             tuple(config["log_snr_bounds"]), dict(config["default_weights"]), config.get("meta"))
            for kind, net in evaluators.nets.items():
                net.load_state_dict(load_file(str(directory / f"{kind}.safetensors")))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise InvalidInput("latent_evaluators", f"cannot load latent evaluators from {str(directory)!r}: "
                               f"{type(e).__name__}: {e}") from None
        return evaluators.to(device=device, dtype=dtype).requires_grad_(False).eval()


def encode_images(model: Any, pixels: torch.Tensor) -> torch.Tensor:
    """VAE latents (posterior mean, scaled as the sampler's) of images in [0, 1], the inverse of ``decode``."""
    from guidance.sampler import to_sampler_latents

    vae = model.vae
    z = vae.encode((pixels * 2 - 1).to(device=model.device, dtype=vae.dtype)).latent_dist.mean.float()
    return to_sampler_latents(vae, z)


def model_folder(model: Any) -> Path | None:
    """The folder a model was loaded from (a built-in proving-ground model's, or a local diffusers folder)."""
    from guidance.models import BUILTIN_FOLDERS, canonical_spec

    builtin = BUILTIN_FOLDERS.get(canonical_spec(model.name))
    if builtin is not None:
        return builtin
    path = Path(str(model.name)).expanduser()
    return path if path.is_dir() else None


def evaluator_folder(model: Any) -> Path | None:
    """Where ``model``'s latent evaluators are: ``model.extra["latent_evaluators"]``, else ``latent_evaluators/``
    in its folder; None when there are none."""
    explicit = getattr(model, "extra", {}).get("latent_evaluators")
    if explicit:
        return Path(explicit)
    folder = model_folder(model)
    if folder is not None and (folder / FOLDER / CONFIG_FILE).is_file():
        return folder / FOLDER
    return None


_CACHE: dict[tuple[str, str, str], LatentEvaluators] = {}
_LOCK = threading.Lock()


def evaluators_for(model: Any) -> LatentEvaluators | None:
    """The model's evaluators on its device (loaded once per folder and device, then shared: they are frozen
    and only read), or None."""
    folder = evaluator_folder(model)
    if folder is None:
        return None
    device, dtype = model.device, torch.float32
    key = (str(folder.resolve()), str(device), str(dtype))
    with _LOCK:
        found = _CACHE.get(key)
        if found is None:
            found = _CACHE[key] = LatentEvaluators.load(folder, device, dtype)
    return found


def text_states(denoiser: Any) -> torch.Tensor:
    """The prompt states [B, L, D] of a generation (its encoded ``cond`` condition)."""
    return denoiser.conditions[denoiser.resolve("cond")].hidden_states


# ---------------------------------------------------------------------------------------------- as a reward

LATENT_REWARD = "latent"


def is_latent_spec(spec: str) -> bool:
    """Whether a reward spec names the model's latent evaluators: ``latent`` or ``latent:alignment:1,...``."""
    return spec.strip() == LATENT_REWARD or spec.strip().startswith(LATENT_REWARD + ":")


@dataclass
class LatentReward:
    """The model's latent evaluators as a reward of clean latents (ᾱ = 1, read as the least noisy trained level):
    Σ_j λ_j·E_j(z0, prompt states), differentiable in the latents (ReNO, the A/B metric)."""

    evaluators: LatentEvaluators
    weights: dict[str, float]

    def score(self, latents: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        return self.evaluators.score(latents.float(), 1.0, text, self.weights).total

    @torch.no_grad()
    def score_images(self, model: Any, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of images in [0, 1] ``[B, 3, H, W]``: VAE-encoded (the encoder only), prompts encoded by the
        model's text encoder (the A/B metric ``latent``)."""
        from guidance.conditioning import encode_conditions

        h, w = pixels.shape[-2:]
        conditions, _ = encode_conditions(model, list(prompts), None, ["cond"], height=h, width=w)
        return self.score(encode_images(model, pixels), conditions["cond"].hidden_states).float().cpu()

    def score_and_gradient(self, latents: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(score per image on the CPU, gradient in ``latents`` of the loss −Σ score)."""
        leaf = latents.detach().float().requires_grad_(True)
        with torch.enable_grad():
            score = self.score(leaf, text)
            (grad,) = torch.autograd.grad(-score.sum(), leaf)
        return score.detach().cpu(), grad.to(latents.dtype)


def latent_reward(model: Any, spec: str, field: str = "policy.reward") -> LatentReward:
    """The :class:`LatentReward` of ``spec`` (``latent``: the saved weights; ``latent:alignment:1,fidelity:0.5``)
    for ``model``; InvalidInput naming ``field`` where the model has none or a kind is unknown."""
    evaluators = evaluators_for(model)
    if evaluators is None:
        raise InvalidInput(field, f"{spec!r}: the model has no latent evaluators (train them with `diffsteer train "
                                  "latent-evaluator`)")
    rest = spec.strip()[len(LATENT_REWARD) + 1:]
    weights = parse_weights(rest, evaluators.kinds, field) if rest else dict(evaluators.default_weights)
    return LatentReward(evaluators, weights)
