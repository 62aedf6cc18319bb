"""Train a small contrastive image-text model (CLIP) of the proving-ground world, on CPU, in open_clip format.

The model is a plain open_clip ``CLIP`` built from a model config -- by default CLIP's own ``ModifiedResNet``
image tower (Radford et al. 2021, Sec. 2.4: a ResNet with a 3-convolution stem, anti-aliased strided
convolutions and attention pooling) at 64x64,
a causal text transformer and open_clip's default BPE tokenizer -- trained from scratch on
:class:`diffsteer.proving_ground.TrainingScenes` (never the held-out split) with

* the symmetric InfoNCE loss of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From Natural
  Language Supervision", Sec. 2.3 and Fig. 3), with the learnable temperature clamped at 100;
  because the world has only ~1.1k training captions, a batch often holds several images of one meaning, so
  the targets are *all* pairs with the same meaning (canonical key), uniformly weighted, as in UniCL
  (Yang et al. 2022, "Unified Contrastive Learning in Image-Text-Label Space") -- treating them as
  negatives would teach the model to separate identical captions;
* compositional hard negatives (Yuksekgonul et al. 2023, "When and why vision-language models behave like
  bags-of-words, and what to do about it?", NegCLIP): for every image, ``negatives_per_image``
  captions that differ from its own in exactly one attribute -- a colour, a shape, a count, the relation --
  or that swap the colours / shapes of its two objects (the binding swap of ARO's VG-Attribution). They
  join the image-to-text softmax as extra columns; a second cross-entropy over {own caption, own negatives}
  only (weight ``hard_negative_weight``) stresses exactly the choice the zero-shot evaluation asks for
  (a ranking loss over a caption's own hard negatives, as in CE-CLIP, Zhang et al. 2023, "Contrasting
  Intra-Modal and Ranking Cross-Modal Hard Negatives to Enhance Visio-Linguistic Compositional
  Understanding"). Negatives whose meaning is held out are dropped, so training never reads a held-out
  caption, not even as a negative.

Why a ResNet: on the same stream a ViT (``vision_type="vit"``: 64x64, patch 8, width 128, 4 layers) learnt
colour at once but shape barely above chance, while the ResNet (width 16, one block per stage) learnt both
from fewer images, at half the compute per image. Vision transformers need more data than convolutions to
learn local structure (Dosovitskiy et al. 2021, "An Image is Worth 16x16 Words"; Xiao et al. 2021, "Early
Convolutions Help Transformers See Better"). The ViT remains an option. The shipped model's zero-shot probe:
BENCHMARKS.md, section Proving-ground CLIP model.

Only ~30 of the tokenizer's 49,408 tokens occur in the world's captions; training uses a compact embedding
table for them (the other rows get no gradient anyway) and the saved checkpoint scatters it back into
open_clip's full ``token_embedding`` with zeros for every other token, so a standard
``open_clip.create_model(name, pretrained=path)`` loads it. Weights are saved in fp16 (``save_dtype``): the
49,408-row text embedding dominates the file, which is why the text tower is 64 wide.

Outputs in ``output``: ``<model_name>.json`` (open_clip model config; register with
``open_clip.add_model_config``, the architecture name is the file stem), ``open_clip_model.safetensors``,
``open_clip_config.json`` (so the folder also loads as ``local-dir:<folder>``) and ``training_log.json``.

    python -m diffsteer.proving_ground.build_clip --output proving_ground/assets/clip
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from torch import Tensor, nn

from diffsteer.proving_ground import TrainingScenes, shipped
from diffsteer.proving_ground.prompts import is_heldout_spec
from diffsteer.proving_ground.world import (
    CATEGORIES,
    COLOUR_NAMES,
    MAX_COUNT,
    RELATIONS,
    SHAPES,
    Group,
    PromptSpec,
    all_prompt_specs,
    canonical_key,
)
from diffsteer.rewards.preprocess import ClipPreprocessConfig, clip_preprocess
from diffsteer.training.config_io import add_config_arguments, config_from_arguments

DEFAULT_MODEL_NAME = "diffsteer-pg-clip"
CAPTION_PREFIXES = ("a photo of ", "an image of ", "a picture of ")
NEGATIVE_KINDS = ("colour", "shape", "count", "relation", "swap")
OPPOSITE_RELATION = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}


@dataclass
class ProvingGroundClipConfig:
    output: str = field(default=str(shipped.CLIP), metadata={"help": "Output folder."})
    model_name: str = field(
        default=DEFAULT_MODEL_NAME,
        metadata={"help": "open_clip architecture name: the model-config file is '<model_name>.json'."},
    )
    seed: int = field(default=0, metadata={"help": "Seed of the data stream, the negatives and the initialisation."})
    threads: int = field(default=2, metadata={"help": "torch CPU threads."})
    category_weights: dict[str, float] = field(
        default_factory=lambda: {
            "single": 0.15,
            "counting": 0.25,
            "two_objects": 0.1,
            "colour_binding": 0.2,
            "position": 0.3,
        },
        metadata={"help": "Mix of prompt categories in the training stream."},
    )
    # architecture (open_clip model config)
    embed_dim: int = field(default=128, metadata={"help": "Joint embedding dimension."})
    image_size: int = field(default=64, metadata={"help": "Image side (the world renders 64x64)."})
    patch_size: int = field(default=8, metadata={"help": "ViT patch side (64/8 -> 8x8 patches + class token)."})
    vision_type: str = field(
        default="resnet",
        metadata={"help": "'vit' (open_clip VisionTransformer) or 'resnet' (open_clip ModifiedResNet)."},
    )
    resnet_blocks: tuple[int, ...] = field(default=(1, 1, 1, 1), metadata={"help": "ModifiedResNet blocks per stage."})
    resnet_width: int = field(default=16, metadata={"help": "ModifiedResNet stem width (final features: 32x this)."})
    vision_width: int = field(default=128, metadata={"help": "ViT width."})
    vision_layers: int = field(default=4, metadata={"help": "ViT transformer blocks."})
    vision_head_width: int = field(
        default=32,
        metadata={
            "help": "Image-tower attention head width: ViT blocks, or the ResNet's attention pool (32 x resnet_width wide)."
        },
    )
    text_width: int = field(
        default=64,
        metadata={"help": "Text transformer width; the 49,408 x width token table dominates the file size."},
    )
    text_layers: int = field(default=4, metadata={"help": "Text transformer blocks."})
    text_heads: int = field(default=4, metadata={"help": "Text attention heads."})
    context_length: int = field(
        default=20, metadata={"help": "Text context in tokens (the longest prefixed caption is 17)."}
    )
    # optimisation
    steps: int = field(default=2500, metadata={"help": "Optimisation steps."})
    batch_size: int = field(default=64, metadata={"help": "Images per step (each with its caption)."})
    lr: float = field(default=1e-3, metadata={"help": "Peak AdamW learning rate (linear warm-up, cosine decay)."})
    warmup_steps: int = field(default=100, metadata={"help": "Linear warm-up steps."})
    min_lr_ratio: float = field(default=0.02, metadata={"help": "Final learning rate as a fraction of the peak."})
    weight_decay: float = field(
        default=0.1, metadata={"help": "AdamW decoupled weight decay on matrices (not gains, biases, embeddings)."}
    )
    betas: tuple[float, ...] = field(default=(0.9, 0.98), metadata={"help": "AdamW betas (CLIP's)."})
    grad_clip: float = field(default=1.0, metadata={"help": "Gradient-norm clip; 0 disables."})
    init_temperature: float = field(default=0.07, metadata={"help": "Initial softmax temperature (CLIP: 0.07)."})
    # hard negatives
    negatives_per_image: int = field(
        default=5, metadata={"help": "One-attribute hard-negative captions per image (0 = plain CLIP)."}
    )
    negative_kinds: tuple[str, ...] = field(
        default=NEGATIVE_KINDS,
        metadata={"help": "Edits drawn (round-robin over those applicable): colour shape count relation swap."},
    )
    relation_opposite_first: bool = field(
        default=True,
        metadata={
            "help": "A position scene's first relation negative is the opposite relation (left<->right, "
            "above<->below), which needs object-position binding; later ones are drawn at random."
        },
    )
    hard_negative_weight: float = field(
        default=0.5, metadata={"help": "Weight of the cross-entropy over {own caption, own negatives} only."}
    )
    prefix_probability: float = field(
        default=0.1, metadata={"help": "Probability of a 'a photo of ' style prefix (same on the negatives)."}
    )
    # bookkeeping
    log_every: int = field(default=25, metadata={"help": "Steps between log records."})
    probe_every: int = field(
        default=250, metadata={"help": "Steps between validation probes (one-attribute ranking accuracy); 0 = never."}
    )
    probe_scenes: int = field(
        default=150,
        metadata={"help": "Validation scenes: TrainingScenes(seed + 1), i.e. training specs, unseen images."},
    )
    save_dtype: str = field(default="fp16", metadata={"help": "Saved weight dtype: fp16 or fp32."})

    def __post_init__(self) -> None:
        unknown = set(self.negative_kinds) - set(NEGATIVE_KINDS)
        if unknown:
            raise ValueError(f"negative_kinds: unknown {sorted(unknown)}; accepted: {', '.join(NEGATIVE_KINDS)}")
        if self.vision_type not in ("vit", "resnet"):
            raise ValueError(f"vision_type: {self.vision_type!r}; accepted: vit, resnet")
        if self.save_dtype not in ("fp16", "fp32"):
            raise ValueError(f"save_dtype: {self.save_dtype!r}; accepted: fp16, fp32")
        if self.image_size % self.patch_size:
            raise ValueError("image_size must be a multiple of patch_size")
        pool_width = 32 * self.resnet_width if self.vision_type == "resnet" else self.vision_width
        if pool_width % self.vision_head_width or self.text_width % self.text_heads:
            raise ValueError("widths must be multiples of the head widths / head counts")
        if self.steps < 1 or self.batch_size < 2:
            raise ValueError("steps >= 1 and batch_size >= 2 are required")

    def model_config(self) -> dict:
        """The open_clip model config (what ``<model_name>.json`` holds)."""
        if self.vision_type == "resnet":
            vision = {
                "image_size": self.image_size,
                "layers": list(self.resnet_blocks),
                "width": self.resnet_width,
                "head_width": self.vision_head_width,
            }
        else:
            vision = {
                "image_size": self.image_size,
                "patch_size": self.patch_size,
                "width": self.vision_width,
                "layers": self.vision_layers,
                "head_width": self.vision_head_width,
                "mlp_ratio": 4.0,
            }
        return {
            "embed_dim": self.embed_dim,
            "vision_cfg": vision,
            "text_cfg": {
                "context_length": self.context_length,
                "vocab_size": 49408,
                "width": self.text_width,
                "heads": self.text_heads,
                "layers": self.text_layers,
            },
        }


# ----------------------------------------------------------------------------- model pieces


class CompactTokenEmbedding(nn.Module):
    """Stands in for open_clip's ``token_embedding`` during training: trainable rows for the token ids
    that occur in the world's captions only; every other id maps to a fixed zero vector.

    :meth:`full_weight` is the equivalent ``[vocab_size, width]`` table of an ``nn.Embedding``.
    """

    def __init__(self, used_ids: Sequence[int], vocab_size: int, width: int, generator: torch.Generator | None = None):
        super().__init__()
        ids = torch.as_tensor(sorted(set(int(i) for i in used_ids)), dtype=torch.long)
        if ids.numel() == 0 or ids.min() < 0 or ids.max() >= vocab_size:
            raise ValueError("used_ids must be non-empty token ids below vocab_size")
        slot = torch.full((vocab_size,), ids.numel(), dtype=torch.long)
        slot[ids] = torch.arange(ids.numel())
        self.register_buffer("used_ids", ids, persistent=False)
        self.register_buffer("slot", slot, persistent=False)
        self.register_buffer("unknown", torch.zeros(1, width), persistent=False)
        # open_clip initialises token embeddings with N(0, 0.02^2).
        self.weight = nn.Parameter(torch.randn(ids.numel(), width, generator=generator) * 0.02)
        self.vocab_size = vocab_size

    def forward(self, ids: Tensor) -> Tensor:
        return F.embedding(self.slot[ids], torch.cat([self.weight, self.unknown.to(self.weight.dtype)]))

    def full_weight(self) -> Tensor:
        full = torch.zeros(self.vocab_size, self.weight.shape[1], dtype=self.weight.dtype)
        full[self.used_ids] = self.weight.detach()
        return full


def world_token_ids(tokenizer) -> list[int]:
    """Every token id that occurs in a caption of the world (all specs of all categories, with and without
    the :data:`CAPTION_PREFIXES`), plus the start, end and padding ids."""
    captions = [s.caption for c in CATEGORIES for s in all_prompt_specs(c)]
    captions += [p + "a red circle" for p in CAPTION_PREFIXES]
    tokens = tokenizer(captions)
    return sorted(set(tokens.unique().tolist()) | {tokenizer.sot_token_id, tokenizer.eot_token_id, 0})


def build_model(cfg: ProvingGroundClipConfig):
    """A fresh open_clip ``CLIP`` for ``cfg.model_config()`` with a :class:`CompactTokenEmbedding`, and its
    tokenizer (open_clip's default ``SimpleTokenizer``, whose BPE ships inside the open_clip package)."""
    import open_clip
    from open_clip.tokenizer import SimpleTokenizer

    torch.manual_seed(cfg.seed)
    model_cfg = cfg.model_config()
    model = open_clip.CLIP(**model_cfg)
    with torch.no_grad():
        model.logit_scale.fill_(math.log(1.0 / cfg.init_temperature))
    tokenizer = SimpleTokenizer(context_length=cfg.context_length)
    g = torch.Generator().manual_seed(cfg.seed + 1)
    model.token_embedding = CompactTokenEmbedding(
        world_token_ids(tokenizer), model_cfg["text_cfg"]["vocab_size"], cfg.text_width, g
    )
    return model, tokenizer


def open_clip_state_dict(model: nn.Module, dtype: torch.dtype) -> dict[str, Tensor]:
    """The model's state dict in open_clip's layout (compact token table scattered into the full one)."""
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("token_embedding.")}
    emb = model.token_embedding
    state["token_embedding.weight"] = emb.full_weight() if isinstance(emb, CompactTokenEmbedding) else emb.weight
    return {k: v.detach().to(dtype).contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------- data


def pixels_from_uint8(images: np.ndarray, preprocess) -> Tensor:
    """uint8 ``[B, H, W, 3]`` -> the model's normalised input, through the same preprocessing the ``clip``
    reward applies (:func:`diffsteer.rewards.preprocess.clip_preprocess`)."""
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0
    return clip_preprocess(x, preprocess)


class TokenCache:
    """Tokenised captions by string (the world has only a few thousand)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[str, Tensor] = {}

    def __call__(self, texts: Sequence[str]) -> Tensor:
        missing = [t for t in dict.fromkeys(texts) if t not in self._cache]
        if missing:
            for t, row in zip(missing, self.tokenizer(missing)):
                self._cache[t] = row
        return torch.stack([self._cache[t] for t in texts])


@dataclass
class Batch:
    pixels: Tensor  # [B, 3, H, W] normalised
    texts: list[str]  # unique caption strings, the columns of the logits
    positive: Tensor  # [B, T] bool: text j means what image i shows
    own: Tensor  # [B, T] bool: image i's own caption and its own hard negatives
    own_positive: Tensor  # [B, T] bool: image i's own caption column(s)


def make_batch(stream, start: int, cfg: ProvingGroundClipConfig, rng: np.random.Generator, preprocess) -> Batch:
    """Examples ``start .. start + batch_size - 1`` of the stream, their captions and hard negatives."""
    examples = [stream[i] for i in range(start, start + cfg.batch_size)]
    texts: dict[str, int] = {}
    text_keys: list[str] = []
    rows: list[list[int]] = []
    for ex in examples:
        prefix = (
            CAPTION_PREFIXES[int(rng.integers(len(CAPTION_PREFIXES)))] if rng.random() < cfg.prefix_probability else ""
        )
        negatives = sample_negatives(
            ex.spec, rng, cfg.negatives_per_image, cfg.negative_kinds, cfg.relation_opposite_first
        )
        specs = [ex.spec] + negatives
        row = []
        for spec in specs:
            text = prefix + spec.caption
            if text not in texts:
                texts[text] = len(texts)
                text_keys.append(canonical_key(spec))
            row.append(texts[text])
        rows.append(row)
    image_keys = np.array([canonical_key(ex.spec) for ex in examples])
    positive = torch.from_numpy(image_keys[:, None] == np.array(text_keys)[None, :])
    own = torch.zeros_like(positive)
    own_positive = torch.zeros_like(positive)
    for i, row in enumerate(rows):
        own[i, row] = True
        own_positive[i, row[0]] = True
    pixels = pixels_from_uint8(np.stack([ex.image for ex in examples]), preprocess)
    return Batch(pixels, list(texts), positive, own, own_positive)


# ----------------------------------------------------------------------------- training


def _lr_factor(step: int, cfg: ProvingGroundClipConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def _param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim < 2 or "embedding" in name or "logit_scale" in name or name.endswith(".bias")
        (no_decay if exempt else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def train(cfg: ProvingGroundClipConfig) -> Path:
    torch.set_num_threads(cfg.threads)
    t0, c0 = time.perf_counter(), time.process_time()
    model, tokenizer = build_model(cfg)
    model.train()
    preprocess = ClipPreprocessConfig(size=cfg.image_size)  # open_clip's defaults for a config-built model
    tokens = TokenCache(tokenizer)
    stream = TrainingScenes(seed=cfg.seed, category_weights=cfg.category_weights, resolution=cfg.image_size)
    rng = np.random.default_rng(np.random.SeedSequence([cfg.seed, 0x636C6970]))
    opt = torch.optim.AdamW(_param_groups(model, cfg.weight_decay), lr=cfg.lr, betas=tuple(cfg.betas), eps=1e-6)
    params = [p for group in opt.param_groups for p in group["params"]]

    log: dict = {"config": asdict(cfg), "model_config": cfg.model_config(), "records": [], "probes": []}
    window: dict[str, list[float]] = {}
    probe_set = make_probe(cfg, preprocess) if cfg.probe_every > 0 and cfg.probe_scenes > 0 else None
    for step in range(cfg.steps):
        for group in opt.param_groups:
            group["lr"] = cfg.lr * _lr_factor(step, cfg)
        batch = make_batch(stream, step * cfg.batch_size, cfg, rng, preprocess)
        image = model.encode_image(batch.pixels, normalize=True)
        text = model.encode_text(tokens(batch.texts), normalize=True)
        losses = contrastive_losses(image, text, model.logit_scale.exp(), batch, cfg.hard_negative_weight)
        opt.zero_grad(set_to_none=True)
        losses["loss"].backward()
        if cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))  # CLIP's clamp of the temperature at 1/100
        for k, v in losses.items():
            window.setdefault(k, []).append(float(v.detach()))
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            record = {"step": step + 1, **{k: round(float(np.mean(v)), 4) for k, v in window.items()}}
            record.update(
                logit_scale=round(float(model.logit_scale.detach().exp()), 2),
                lr=float(opt.param_groups[0]["lr"]),
                wall_s=round(time.perf_counter() - t0, 1),
                cpu_s=round(time.process_time() - c0, 1),
            )
            log["records"].append(record)
            window.clear()
            print(json.dumps(record), flush=True)
        if probe_set is not None and ((step + 1) % cfg.probe_every == 0 or step + 1 == cfg.steps):
            result = {"step": step + 1, **probe_accuracy(model, tokens, probe_set)}
            log["probes"].append(result)
            print(json.dumps({"probe": result}), flush=True)
    log["train_wall_s"] = round(time.perf_counter() - t0, 1)
    log["train_cpu_s"] = round(time.process_time() - c0, 1)
    log["images_seen"] = cfg.steps * cfg.batch_size
    return save(model.eval(), cfg, log)


def make_probe(cfg: ProvingGroundClipConfig, preprocess) -> tuple[Tensor, list[tuple[int, str, list[str]]]]:
    """Validation scenes (training specs, images from another stream seed) and, per scene and edit kind,
    the candidate captions (true one first) among which the model must pick the true one."""
    stream = TrainingScenes(seed=cfg.seed + 1, category_weights=cfg.category_weights, resolution=cfg.image_size)
    examples = [stream[i] for i in range(cfg.probe_scenes)]
    tests = []
    for i, ex in enumerate(examples):
        for kind in ("colour", "shape", "count", "relation"):
            edits = attribute_edits(ex.spec, kind)
            if edits:
                tests.append((i, kind, [ex.spec.caption] + [e.caption for e in edits]))
    return pixels_from_uint8(np.stack([ex.image for ex in examples]), preprocess), tests


@torch.no_grad()
def probe_accuracy(model: nn.Module, tokens: TokenCache, probe) -> dict[str, float]:
    """Fraction of probe tests where the true caption beats every one-attribute edit of the same kind."""
    pixels, tests = probe
    was_training = model.training
    model.eval()
    image = model.encode_image(pixels, normalize=True)
    texts = sorted({t for _, _, cands in tests for t in cands})
    index = {t: j for j, t in enumerate(texts)}
    text = torch.cat([model.encode_text(tokens(texts[j : j + 512]), normalize=True) for j in range(0, len(texts), 512)])
    model.train(was_training)
    sims = image @ text.t()
    hits: dict[str, list[float]] = {}
    for i, kind, cands in tests:
        s = sims[i, [index[c] for c in cands]]
        hits.setdefault(kind, []).append(float((s[1:] < s[0]).all()))
    return {k: round(float(np.mean(v)), 4) for k, v in hits.items()}


def save(model: nn.Module, cfg: ProvingGroundClipConfig, log: dict) -> Path:
    """Write the open_clip files atomically (each to a temporary name, then renamed) and check that
    ``open_clip.create_model(name, pretrained=...)`` rebuilds the same text and image embeddings."""
    import open_clip

    out = Path(cfg.output)
    out.mkdir(parents=True, exist_ok=True)
    dtype = torch.float16 if cfg.save_dtype == "fp16" else torch.float32
    state = open_clip_state_dict(model, dtype)
    model_cfg = cfg.model_config()
    log["parameters"] = {
        "total": sum(v.numel() for v in state.values()),
        "visual": sum(v.numel() for k, v in state.items() if k.startswith("visual.")),
        "token_embedding": state["token_embedding.weight"].numel(),
        "token_embedding_trained_rows": int(model.token_embedding.weight.shape[0])
        if isinstance(model.token_embedding, CompactTokenEmbedding)
        else None,
    }

    def write(path: Path, writer) -> None:
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        writer(tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)

    weights = out / "open_clip_model.safetensors"
    config_path = out / f"{cfg.model_name}.json"
    write(weights, lambda p: save_file(state, str(p), metadata={"format": "pt", "architecture": cfg.model_name}))
    write(config_path, lambda p: p.write_text(json.dumps(model_cfg, indent=2) + "\n"))
    local_dir_cfg = {"model_cfg": model_cfg, "preprocess_cfg": {"size": cfg.image_size, "resize_mode": "shortest"}}
    write(out / "open_clip_config.json", lambda p: p.write_text(json.dumps(local_dir_cfg, indent=2) + "\n"))

    # Reload through open_clip's own factory and compare with the trained model in the saved precision.
    arch = register(config_path)
    loaded = open_clip.create_model(arch, pretrained=str(weights), require_pretrained=True).eval()
    probe_text = open_clip.get_tokenizer(arch)(["a red circle", "two blue squares", "a photo of a dog"])
    probe_image = torch.rand(2, 3, cfg.image_size, cfg.image_size)
    with torch.no_grad():
        reference = model.float()
        err_t = (loaded.encode_text(probe_text) - reference.encode_text(probe_text)).abs().max().item()
        err_i = (loaded.encode_image(probe_image) - reference.encode_image(probe_image)).abs().max().item()
    log["reload_max_abs_diff"] = {"text": err_t, "image": err_i}
    if dtype == torch.float32 and max(err_t, err_i) > 1e-4:
        raise RuntimeError(f"reloaded model differs from the trained one: {log['reload_max_abs_diff']}")
    log["checkpoint_bytes"] = weights.stat().st_size + config_path.stat().st_size
    write(out / "training_log.json", lambda p: p.write_text(json.dumps(log, indent=2) + "\n"))
    return out


def register(config_path: str | Path) -> str:
    """``open_clip.add_model_config`` for one config file; returns the architecture name (the file stem)."""
    import open_clip

    path = Path(config_path)
    open_clip.add_model_config(path)
    return path.stem


def load(folder: str | Path = shipped.CLIP, model_name: str = DEFAULT_MODEL_NAME, device: str = "cpu"):
    """``(model, tokenizer)`` of a saved folder through open_clip's factory (what users of the files do)."""
    import open_clip

    arch = register(Path(folder) / f"{model_name}.json")
    model = open_clip.create_model(arch, pretrained=str(Path(folder) / "open_clip_model.safetensors"), device=device)
    return model.eval(), open_clip.get_tokenizer(arch)


# ----------------------------------------------------------------------------- losses (pure functions)


def _soft_cross_entropy(logits: Tensor, targets: Tensor, valid: Tensor | None = None) -> Tensor:
    """Mean over rows of -sum_j q_ij log softmax(logits)_ij with q uniform over each row's True targets;
    ``valid`` masks out columns (they take no part in the softmax)."""
    if valid is not None:
        logits = logits.masked_fill(~valid, float("-inf"))
    logp = torch.log_softmax(logits, dim=-1)
    q = targets.float() / targets.sum(dim=-1, keepdim=True).clamp_min(1)
    return -(q * logp.masked_fill(~targets, 0.0)).sum(dim=-1).mean()


def contrastive_losses(
    image: Tensor, text: Tensor, scale: Tensor, batch: Batch, hard_negative_weight: float
) -> dict[str, Tensor]:
    """Symmetric multi-positive InfoNCE with in-softmax hard negatives, plus the own-candidates term.

    * image -> text (Radford et al. 2021, Fig. 3; NegCLIP's extra negative columns): every image against
      every caption in the batch, negatives included; targets: the columns that mean what it shows.
    * text -> image: every caption that some image of the batch shows, against the batch's images; targets:
      the images showing it. Hard-negative captions shown by no image have no target and are skipped.
    * own: every image against its own caption and its own hard negatives only (CE-CLIP's ranking term).

    Returns the weighted total (``loss``) and its parts, plus two accuracies for logging.
    """
    logits = scale * image @ text.t()  # [B, T]
    i2t = _soft_cross_entropy(logits, batch.positive)
    shown = batch.positive.any(dim=0)
    t2i = _soft_cross_entropy(logits.t()[shown], batch.positive.t()[shown])
    own = _soft_cross_entropy(logits, batch.own_positive, valid=batch.own)
    loss = 0.5 * (i2t + t2i) + hard_negative_weight * own
    with torch.no_grad():
        own_logits = logits.masked_fill(~batch.own, float("-inf"))
        own_acc = batch.own_positive.gather(1, own_logits.argmax(dim=1, keepdim=True)).float().mean()
        i2t_acc = batch.positive.gather(1, logits.argmax(dim=1, keepdim=True)).float().mean()
    return {"loss": loss, "i2t": i2t, "t2i": t2i, "own": own, "own_acc": own_acc, "i2t_acc": i2t_acc}


# ----------------------------------------------------------------------------- one-attribute edits (pure)


def edit_spec(spec: PromptSpec, attribute: str, value, group: int = 0) -> PromptSpec | None:
    """``spec`` with one attribute replaced, or ``None`` if the result is not a valid prompt of the world.

    ``attribute``: ``"colour"`` / ``"shape"`` (of ``groups[group]``), ``"count"`` (one-group specs),
    ``"relation"`` (position specs), ``"swap"`` (``value`` = ``"colour"`` or ``"shape"``: exchange that
    attribute between the two groups, the binding swap).
    """
    if attribute not in NEGATIVE_KINDS:
        raise ValueError(f"unknown attribute {attribute!r}; accepted: {', '.join(NEGATIVE_KINDS)}")
    groups = list(spec.groups)
    relation = spec.relation
    try:
        if attribute in ("colour", "shape", "count"):
            if attribute == "count" and len(groups) != 1:
                return None
            g = groups[group]
            values = {"count": g.count, "colour": g.colour, "shape": g.shape, attribute: value}
            groups[group] = Group(int(values["count"]), values["colour"], values["shape"])
        elif attribute == "relation":
            if relation is None or value not in RELATIONS:
                return None
            relation = value
        else:  # swap
            if len(groups) != 2 or value not in ("colour", "shape"):
                return None
            a, b = groups
            if value == "colour":
                groups = [Group(a.count, b.colour, a.shape), Group(b.count, a.colour, b.shape)]
            else:
                groups = [Group(a.count, a.colour, b.shape), Group(b.count, b.colour, a.shape)]
        edited = PromptSpec(tuple(groups), relation)
    except ValueError:  # outside the world's grammar (e.g. two groups of one kind in a relation)
        return None
    return None if canonical_key(edited) == canonical_key(spec) else edited


def attribute_edits(spec: PromptSpec, kind: str) -> list[PromptSpec]:
    """Every valid spec that differs from ``spec`` by one edit of ``kind`` (see :data:`NEGATIVE_KINDS`)."""
    n = len(spec.groups)
    if kind == "colour":
        candidates = [edit_spec(spec, "colour", c, g) for g in range(n) for c in COLOUR_NAMES]
    elif kind == "shape":
        candidates = [edit_spec(spec, "shape", s, g) for g in range(n) for s in SHAPES]
    elif kind == "count":
        candidates = [edit_spec(spec, "count", k) for k in range(1, MAX_COUNT + 1)]
    elif kind == "relation":
        candidates = [edit_spec(spec, "relation", r) for r in RELATIONS]
    elif kind == "swap":
        candidates = [edit_spec(spec, "swap", a) for a in ("colour", "shape")]
    else:
        raise ValueError(f"unknown edit kind {kind!r}; accepted: {', '.join(NEGATIVE_KINDS)}")
    out, seen = [], set()
    for c in candidates:
        if c is not None and canonical_key(c) not in seen:
            seen.add(canonical_key(c))
            out.append(c)
    return out


def sample_negatives(
    spec: PromptSpec,
    rng: np.random.Generator,
    k: int,
    kinds: Sequence[str] = NEGATIVE_KINDS,
    relation_opposite_first: bool = False,
) -> list[PromptSpec]:
    """Up to ``k`` hard negatives of distinct meanings, none held out: the applicable edit kinds in a random
    order, round-robin, one random edit of each kind per round (with ``relation_opposite_first``, the first
    relation edit is the opposite relation when that caption is not held out)."""
    if k <= 0:
        return []
    pools = {kind: [s for s in attribute_edits(spec, kind) if not is_heldout_spec(s)] for kind in kinds}
    first = {}
    if relation_opposite_first and spec.relation is not None and pools.get("relation"):
        opposite = OPPOSITE_RELATION[spec.relation]
        first["relation"] = next((i for i, s in enumerate(pools["relation"]) if s.relation == opposite), None)
    order = [kind for kind in kinds if pools[kind]]
    rng.shuffle(order)
    chosen: list[PromptSpec] = []
    seen = {canonical_key(spec)}  # different kinds can reach one meaning (a relation flip = a swap of twins)
    while len(chosen) < k and any(pools[kind] for kind in order):
        for kind in order:
            pool = pools[kind]
            while pool and len(chosen) < k:
                index = first.pop(kind, None)
                candidate = pool.pop(int(rng.integers(len(pool))) if index is None else index)
                if canonical_key(candidate) not in seen:
                    seen.add(canonical_key(candidate))
                    chosen.append(candidate)
                    break
    return chosen


# ----------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_arguments(parser, ProvingGroundClipConfig)
    print(train(config_from_arguments(ProvingGroundClipConfig, parser.parse_args(argv))))


if __name__ == "__main__":
    main()
