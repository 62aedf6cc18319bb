"""Small latent-space evaluators: score (latent, noise level, prompt) without the VAE.

Papalampidi et al. 2025, "Dynamic Classifier-Free Diffusion Guidance via Online Feedback" (arXiv:2509.16131)
make per-step greedy guidance affordable with evaluators that read latents directly instead of decoding every
candidate: an alignment evaluator (CLIP-style text-image agreement) and a fidelity discriminator, among others.
No code was published; this is our family, trained by ``diffsteer train latent-evaluator``
(:mod:`diffsteer.training.latent_evaluator`):

* **alignment** ``A(ẑ0, λ, c)``: distilled to agree with a pixel-space reward of :mod:`rewards` (any composite a
  user configures, e.g. ``clip:1``) on the decoded clean-latent prediction, ``A(ẑ0, λ, c) ≈ R(D(ẑ0), prompt)``,
  in the reward's units. Two forms (``embedding_dim`` of its spec):

  - *score* (0): the network reads the prompt as the diffusion model's text-encoder states and outputs the
    score (times the target's standard deviation plus its mean, both fixed at training time);
  - *embedding* (D > 0), for a reward ``s·cos(f_img(image), f_txt(prompt))`` (CLIP score, HPS, PickScore): the
    network is a latent image tower, ``g(ẑ0, λ) ≈ f_img(D(ẑ0))``, and the score is ``s·cos(g(ẑ0, λ), f_txt(prompt))``
    with the reward's own text tower, run once per prompt. This is the paper's "CLIP-style" evaluator; it learns
    D numbers per candidate instead of one, and ranks the candidates of a group better than the score form (see
    BENCHMARKS.md, section Dynamic CFG with latent evaluators);
* **fidelity** ``F(ẑ0, λ)``: a discriminator's logit, log p(real)/p(model), between the model's own clean-latent
  predictions at log-SNR λ (under guidance) and its predictions from real-data latents noised to the same λ.

Inputs: ``ẑ0`` a clean-latent prediction ``[N, C, h, w]`` (any h, w), the noise level as ᾱ of the step (the
network reads λ = log(ᾱ/(1−ᾱ)), clamped to the range it was trained on, so a clean latent, ᾱ = 1, is read as the
least noisy trained level), and the prompt as :class:`PromptInputs`: the diffusion model's own text-encoder states
``[N, L, D]`` (the ``cond`` condition the sampler already encoded) and, for an embedding evaluator, the reward's text
embedding ``[N, E]`` (:meth:`LatentEvaluators.prompt_inputs`). One network call scores all candidates of all images.

On disk: a folder (by default ``latent_evaluators/`` inside the model's folder; ``model.extra
["latent_evaluators"]`` may point elsewhere) holding ``latent_evaluators.json`` (architecture, normalisation,
default weights, what they were distilled from) and one ``<kind>.safetensors`` per evaluator.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from diffsteer.guidance.conditioning import encode_conditions
from diffsteer.guidance.denoiser import Denoiser
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.files import atomic_directory
from diffsteer.guidance.latents import encode
from diffsteer.guidance.models import BUILTIN_FOLDERS, DiffusionModel, canonical_spec
from diffsteer.guidance.reward_models import DEFAULT_REWARDS, RewardModels
from diffsteer.rewards import EmbeddingSimilarityReward

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
    tokens to the projected text states; an MLP head gives one score per input (``out_dim`` 1, shape [N]) or an
    embedding (``out_dim`` D, shape [N, D])."""

    def __init__(
        self,
        latent_channels: int,
        text_dim: int,
        width: int = 32,
        stages: int = 2,
        use_text: bool = True,
        patch: int = 2,
        out_dim: int = 1,
    ):
        super().__init__()
        self.out_dim = out_dim
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
        self.head = nn.Sequential(
            nn.LayerNorm(features), nn.Linear(features, width), nn.SiLU(), nn.Linear(width, out_dim)
        )

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
        out = self.head(pooled)
        return out.squeeze(-1) if self.out_dim == 1 else out


@dataclass(frozen=True)
class EvaluatorSpec:
    """What one saved evaluator is: its architecture, the affine map of its output and what it learned."""

    kind: str
    width: int
    stages: int
    use_text: bool
    patch: int = 2
    output_mean: float = 0.0  # score = output_mean + output_std · net(...) (embedding: · cos(net(...), text embedding))
    output_std: float = 1.0
    target: str = ""  # alignment: the reward spec it was distilled from; fidelity: the real images
    embedding_dim: int = 0  # 0: the network outputs the score; D: the reward's image embedding (module docstring)

    def build(self, latent_channels: int, text_dim: int) -> LatentEvaluatorNet:
        return LatentEvaluatorNet(
            latent_channels,
            text_dim,
            self.width,
            self.stages,
            self.use_text,
            self.patch,
            out_dim=self.embedding_dim or 1,
        )


@dataclass
class PromptInputs:
    """What the evaluators read of the prompts, one row per scored latent: the diffusion model's text states
    (score-form evaluators) and the alignment reward's unit-norm text embedding (embedding-form ones)."""

    states: torch.Tensor | None = None  # [N, L, D]
    embedding: torch.Tensor | None = None  # [N, E]

    def repeat(self, times: int) -> PromptInputs:
        """Every row ``times`` times, block after block (candidate-major, as :func:`candidate_x0` lays rows out)."""
        return PromptInputs(
            *(None if t is None else t.repeat(times, *([1] * (t.ndim - 1))) for t in (self.states, self.embedding))
        )

    def repeat_interleave(self, times: int) -> PromptInputs:
        """Each row ``times`` times in a row (group-major)."""
        return PromptInputs(
            *(None if t is None else t.repeat_interleave(times, dim=0) for t in (self.states, self.embedding))
        )

    def rows(self, index: slice | torch.Tensor) -> PromptInputs:
        return PromptInputs(*(None if t is None else t[index] for t in (self.states, self.embedding)))

    def to(self, device: torch.device | str) -> PromptInputs:
        return PromptInputs(*(None if t is None else t.to(device) for t in (self.states, self.embedding)))


PROBE_PROMPT = "a photo of a red cube and a blue sphere"
PROBE_AGREEMENT = 0.999  # cosine between the saved and the configured tower's probe embeddings


def text_probe(tower: EmbeddingSimilarityReward) -> dict[str, Any]:
    """A reward text tower's fingerprint: its unit-norm embedding of :data:`PROBE_PROMPT` (saved with an
    embedding-form evaluator, compared when the tower is configured at sampling time)."""
    with torch.no_grad():
        embedding = tower.text_embeddings([PROBE_PROMPT]).float().cpu()[0]
    return {"prompt": PROBE_PROMPT, "embedding": [round(float(v), 6) for v in embedding]}


@dataclass
class LatentScores:
    total: torch.Tensor  # [N] Σ_j λ_j·E_j
    parts: dict[str, torch.Tensor]  # kind -> [N]


def parse_weights(
    spec: str, available: tuple[str, ...] | list[str], field: str = "policy.latent_weights"
) -> dict[str, float]:
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

    def __init__(
        self,
        latent_channels: int,
        text_dim: int,
        specs: dict[str, EvaluatorSpec],
        log_snr_bounds: tuple[float, float],
        default_weights: dict[str, float],
        meta: dict[str, Any] | None = None,
    ):
        super().__init__()
        self.latent_channels, self.text_dim = latent_channels, text_dim
        self.specs = dict(specs)
        self.nets = nn.ModuleDict({k: s.build(latent_channels, text_dim) for k, s in specs.items()})
        self.log_snr_bounds = (float(log_snr_bounds[0]), float(log_snr_bounds[1]))
        self.default_weights = dict(default_weights)
        self.meta = dict(meta or {})
        self._checked_towers: set[int] = set()  # reward towers whose probe embedding matched

    @property
    def kinds(self) -> list[str]:
        return list(self.nets)

    @property
    def embedding_target(self) -> str | None:
        """The reward spec whose text tower an embedding-form evaluator needs, or None when none does."""
        targets = {s.target for s in self.specs.values() if s.embedding_dim}
        return next(iter(targets)) if targets else None

    def reads_text_embedding(self, weights: dict[str, float] | None = None) -> bool:
        """Whether an embedding-form evaluator of nonzero weight in ``weights`` (None: any) needs the reward's text
        embedding, and so its text tower."""
        return any(s.embedding_dim and (weights is None or weights.get(k)) for k, s in self.specs.items())

    def prompt_inputs(
        self,
        states: torch.Tensor | None,
        prompts: list[str],
        rewards: RewardModels | None = None,
        weights: dict[str, float] | None = None,
    ) -> PromptInputs:
        """What the evaluators read of ``prompts`` (one row each): the text ``states`` [N, L, D] and, where an
        evaluator of nonzero weight in ``weights`` (None: any) has the embedding form, its reward's text embeddings,
        from ``rewards`` (a :class:`diffsteer.guidance.reward_models.RewardModels`; None: the default library). The reward must
        be the one the evaluator was trained with: its text embedding of a probe prompt saved at training is checked
        once."""
        if not self.reads_text_embedding(weights):
            return PromptInputs(states=states)
        tower = self.text_tower(rewards)
        with torch.no_grad():
            embedding = tower.text_embeddings(list(prompts)).float()
        return PromptInputs(states=states, embedding=embedding.to(self._device))

    def text_tower(self, rewards: RewardModels | None = None) -> EmbeddingSimilarityReward:
        """The embedding-similarity reward of :attr:`embedding_target` from ``rewards``, checked against the probe."""
        target = self.embedding_target
        composite = (rewards or DEFAULT_REWARDS).get(target, self._device, field="latent_evaluators")
        term = composite.similarity_term()
        if term is None:
            raise InvalidInput(
                "latent_evaluators",
                f"the alignment evaluator learned the image tower of {target!r}, "
                "which is not one embedding-similarity reward (clip, hps, pickscore)",
            )
        tower = term[0]
        if id(tower) not in self._checked_towers:
            probe = self.meta.get("text_probe")
            if probe:
                found = torch.tensor(text_probe(tower)["embedding"])
                saved = torch.tensor(probe["embedding"], dtype=torch.float32)
                if found.shape != saved.shape or float(F.cosine_similarity(found, saved, dim=0)) < PROBE_AGREEMENT:
                    raise InvalidInput(
                        "latent_evaluators",
                        f"the configured reward {target!r} is not the one the "
                        "alignment evaluator was trained with (its text embedding of the probe prompt "
                        f"{probe['prompt']!r} differs); configure the same weights",
                    )
            self._checked_towers.add(id(tower))
        return tower

    def evaluate(
        self, kind: str, latents: torch.Tensor, alpha_bar: torch.Tensor | float, prompts: PromptInputs | None = None
    ) -> torch.Tensor:
        """One evaluator's score [N] in its units (``output_mean + output_std · net``, or ``· cos(net, text
        embedding)`` for the embedding form); differentiable."""
        net, spec = self.nets[kind], self.specs[kind]
        if spec.embedding_dim:
            if prompts is None or prompts.embedding is None:
                raise ValueError(f"the {kind} evaluator scores against the reward's text embedding: it is required")
            return self.embedding_score(kind, self.embed(kind, latents, alpha_bar), prompts.embedding)
        param = next(net.parameters())
        states = None
        if spec.use_text:
            if prompts is None or prompts.states is None:
                raise ValueError(f"the {kind} evaluator reads the prompt: text states are required")
            states = prompts.states.to(param.dtype)
        out = net(latents.to(param.dtype), self._log_snr(alpha_bar, latents).to(param.device), states).float()
        return spec.output_mean + spec.output_std * out

    def embed(self, kind: str, latents: torch.Tensor, alpha_bar: torch.Tensor | float) -> torch.Tensor:
        """An embedding-form evaluator's unit-norm image embedding [N, E] of ``latents`` (what it is trained on)."""
        net = self.nets[kind]
        param = next(net.parameters())
        out = net(latents.to(param.dtype), self._log_snr(alpha_bar, latents).to(param.device)).float()
        return F.normalize(out, dim=-1)

    def embedding_score(self, kind: str, image_embedding: torch.Tensor, text_embedding: torch.Tensor) -> torch.Tensor:
        """``output_mean + output_std · ⟨image, text⟩`` of unit-norm embeddings ``[..., E]`` (the reward's own form)."""
        spec = self.specs[kind]
        return spec.output_mean + spec.output_std * (image_embedding * text_embedding.to(image_embedding)).sum(dim=-1)

    def score(
        self,
        latents: torch.Tensor,
        alpha_bar: torch.Tensor | float,
        prompts: PromptInputs | None,
        weights: dict[str, float] | None = None,
    ) -> LatentScores:
        """Σ_j λ_j·E_j(latents, ᾱ, prompts) per row, and each E_j; ``weights`` default to the saved ones."""
        weights = self.default_weights if weights is None else weights
        parts = {k: self.evaluate(k, latents, alpha_bar, prompts) for k, w in weights.items() if w != 0}
        total = torch.zeros(latents.shape[0], dtype=torch.float32, device=latents.device)
        for k, value in parts.items():
            total = total + weights[k] * value
        return LatentScores(total, parts)

    @property
    def _device(self) -> torch.device:
        return next(self.parameters()).device

    def _log_snr(self, alpha_bar: torch.Tensor | float, latents: torch.Tensor) -> torch.Tensor:
        a = torch.as_tensor(alpha_bar, dtype=torch.float64)
        if a.ndim == 0:
            a = a.expand(latents.shape[0])
        return log_snr(a, self.log_snr_bounds).to(latents.device)

    # ------------------------------------------------------------------ files

    def save(self, directory: Path | str, extra_meta: dict[str, Any] | None = None) -> Path:
        """Write the folder atomically (written beside it, then renamed into place)."""
        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            config = {
                "format": 1,
                "latent_channels": self.latent_channels,
                "text_dim": self.text_dim,
                "log_snr_bounds": list(self.log_snr_bounds),
                "default_weights": self.default_weights,
                "evaluators": {
                    k: {f.name: getattr(s, f.name) for f in fields(s) if f.name != "kind"}
                    for k, s in self.specs.items()
                },
                "meta": {**self.meta, **(extra_meta or {})},
            }
            (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2))
            for kind, net in self.nets.items():
                save_file(
                    {k: v.detach().float().cpu().contiguous() for k, v in net.state_dict().items()},
                    str(tmp / f"{kind}.safetensors"),
                )
        return directory

    @classmethod
    def load(
        cls, directory: Path | str, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> LatentEvaluators:
        directory = Path(directory)
        try:
            config = json.loads((directory / CONFIG_FILE).read_text())
            specs = {k: EvaluatorSpec(kind=k, **v) for k, v in config["evaluators"].items()}
            evaluators = cls(
                int(config["latent_channels"]),
                int(config["text_dim"]),
                specs,
                tuple(config["log_snr_bounds"]),
                dict(config["default_weights"]),
                config.get("meta"),
            )
            for kind, net in evaluators.nets.items():
                net.load_state_dict(load_file(str(directory / f"{kind}.safetensors")))
        except (OSError, KeyError, TypeError, ValueError, RuntimeError) as e:
            raise InvalidInput(
                "latent_evaluators", f"cannot load latent evaluators from {str(directory)!r}: {type(e).__name__}: {e}"
            ) from None
        return evaluators.to(device=device, dtype=dtype).requires_grad_(False).eval()


def model_folder(model: DiffusionModel) -> Path | None:
    """The folder a model was loaded from (a built-in proving-ground model's, or a local diffusers folder)."""
    builtin = BUILTIN_FOLDERS.get(canonical_spec(model.name))
    if builtin is not None:
        return builtin
    path = Path(str(model.name)).expanduser()
    return path if path.is_dir() else None


def evaluator_folder(model: DiffusionModel) -> Path | None:
    """Where ``model``'s latent evaluators are: ``model.extra["latent_evaluators"]``, else ``latent_evaluators/``
    in its folder; None when there are none."""
    explicit = model.extra.get("latent_evaluators")
    if explicit:
        return Path(explicit)
    folder = model_folder(model)
    if folder is not None and (folder / FOLDER / CONFIG_FILE).is_file():
        return folder / FOLDER
    return None


_CACHE: dict[tuple[str, str, str], LatentEvaluators] = {}
_LOCK = threading.Lock()


def evaluators_for(model: DiffusionModel) -> LatentEvaluators | None:
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


def text_states(denoiser: Denoiser) -> torch.Tensor:
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
    Σ_j λ_j·E_j(z0, prompts), differentiable in the latents (ReNO, the A/B metric). ``rewards`` is the library
    whose reward gives an embedding-form evaluator its text embeddings (None: the default library)."""

    evaluators: LatentEvaluators
    weights: dict[str, float]
    rewards: RewardModels | None = None

    def prompt_inputs(self, states: torch.Tensor, prompts: list[str]) -> PromptInputs:
        return self.evaluators.prompt_inputs(states, prompts, self.rewards, self.weights)

    def score(self, latents: torch.Tensor, prompts: PromptInputs) -> torch.Tensor:
        return self.evaluators.score(latents.float(), 1.0, prompts, self.weights).total

    @torch.no_grad()
    def score_images(self, model: DiffusionModel, pixels: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """Scores of images in [0, 1] ``[B, 3, H, W]``: VAE-encoded (the encoder only), prompts encoded by the
        model's text encoder (the A/B metric ``latent``)."""
        h, w = pixels.shape[-2:]
        conditions, _ = encode_conditions(model, list(prompts), None, ["cond"], height=h, width=w)
        inputs = self.prompt_inputs(conditions["cond"].hidden_states, list(prompts))
        return self.score(encode(model.vae, pixels), inputs).float().cpu()

    def score_and_gradient(self, latents: torch.Tensor, prompts: PromptInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """(score per image on the CPU, gradient in ``latents`` of the loss −Σ score)."""
        leaf = latents.detach().float().requires_grad_(True)
        with torch.enable_grad():
            score = self.score(leaf, prompts)
            (grad,) = torch.autograd.grad(-score.sum(), leaf)
        return score.detach().cpu(), grad.to(latents.dtype)


def latent_reward(
    model: DiffusionModel, spec: str, field: str = "policy.reward", rewards: RewardModels | None = None
) -> LatentReward:
    """The :class:`LatentReward` of ``spec`` (``latent``: the saved weights; ``latent:alignment:1,fidelity:0.5``)
    for ``model``; InvalidInput naming ``field`` where the model has none or a kind is unknown. An embedding-form
    evaluator's reward (its text tower) is loaded from ``rewards`` and checked here, before any work."""
    evaluators = evaluators_for(model)
    if evaluators is None:
        raise InvalidInput(
            field, f"{spec!r}: the model has no latent evaluators (train them with `diffsteer train latent-evaluator`)"
        )
    rest = spec.strip()[len(LATENT_REWARD) + 1 :]
    weights = parse_weights(rest, evaluators.kinds, field) if rest else dict(evaluators.default_weights)
    if evaluators.reads_text_embedding(weights):
        evaluators.text_tower(rewards)
    return LatentReward(evaluators, weights, rewards)
