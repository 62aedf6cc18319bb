"""Load checkpoints of every supported family into one bundle the sampler understands.

``load_model(spec)`` accepts:

- ``None`` / ``"default"``: the built-in default, ``builtin:proving-ground``: the project's own small model of
  its synthetic shapes world (64×64, shipped in the package; see ``proving_ground/build_model.py``);
- ``"builtin:proving-ground-1step"``: its one-step student, distilled by f-distill (``training/fdistill.py``;
  one DDIM step, no guidance, by its ``diffsteer.json``);
- ``"builtin:proving-ground-flow"``: a flow-matching model of the same world, an SD3-style MMDiT trained by
  rectified flow (a ``StableDiffusion3Pipeline`` folder; see ``proving_ground/build_flow_model.py``);
- tiny random-weight models built from config (:data:`TINY_MODELS`): ``builtin:tiny`` / ``builtin:tiny-v`` /
  ``builtin:tiny-sdxl`` (UNets), ``builtin:tiny-sd3``, ``builtin:tiny-flux`` (guidance-distilled, as FLUX.1-dev),
  ``builtin:tiny-flux-schnell``, ``builtin:tiny-qwenimage``, ``builtin:tiny-zimage``;
- a local diffusers folder (``model_index.json``) of a supported family (:mod:`diffsteer.guidance.families`):
  SD 1.x, SD 2.x (ε or v-prediction), SDXL, their Turbo variants and 9-channel inpainting UNets, SD3/3.5,
  FLUX.1 dev/schnell, Qwen-Image, Z-Image;
  another family is refused naming it and the supported ones;
- a single ``.safetensors`` / ``.ckpt`` file: SD 1.x/2.x, SDXL and SD3/3.5 whole (they need the matching diffusers
  config, from ``config=`` or the hub); a FLUX.1 transformer file with ``config=`` naming the pipeline folder
  that supplies the other components;
- a hub id (``org/name``) where the network allows; offline, a clear error.

fp32 on CPU; fp16 (or bf16) on CUDA with PyTorch SDPA attention. UNets take xformers attention when it is
installed and works on the device, falling back quietly when it does not; transformers keep their own SDPA
processors.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic
import torch
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import HFValidationError
from safetensors import safe_open

from diffsteer.guidance import tiny, tiny_transformers
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.families import FAMILIES, ModelFamily, family_of_components, family_of_pipeline
from diffsteer.guidance.fast_paths import FastPaths, apply_fast_paths
from diffsteer.proving_ground import shipped

log = logging.getLogger(__name__)

BUILTIN_FOLDERS = {
    "builtin:proving-ground": shipped.MODEL,
    "builtin:proving-ground-1step": shipped.ONE_STEP_MODEL,
    "builtin:proving-ground-flow": shipped.FLOW_MODEL,
}


@dataclass(frozen=True)
class TinyModel:
    """A random-weight model built from config: its builder, family and (for flow models) the native size that
    keeps it tiny (the real families' 1024 would be slow even at toy width)."""

    build: Callable[[], dict[str, Any]]
    family: str
    guidance_embeds: bool = False
    native_size: int | None = None


TINY_MODELS = {
    "builtin:tiny": TinyModel(tiny.tiny_sd_components, "sd"),
    "builtin:tiny-v": TinyModel(lambda: tiny.tiny_sd_components(prediction_type="v_prediction"), "sd"),
    "builtin:tiny-sdxl": TinyModel(tiny.tiny_sdxl_components, "sdxl"),
    "builtin:tiny-sd3": TinyModel(tiny_transformers.tiny_sd3_components, "sd3", native_size=32),
    "builtin:tiny-flux": TinyModel(tiny_transformers.tiny_flux_components, "flux", True, native_size=32),
    "builtin:tiny-flux-schnell": TinyModel(
        lambda: tiny_transformers.tiny_flux_components(guidance_embeds=False), "flux", native_size=32
    ),
    "builtin:tiny-qwenimage": TinyModel(tiny_transformers.tiny_qwenimage_components, "qwenimage", native_size=32),
    "builtin:tiny-zimage": TinyModel(tiny_transformers.tiny_zimage_components, "zimage", native_size=32),
}
BUILTIN_MODELS = (*BUILTIN_FOLDERS, *TINY_MODELS)
DEFAULT_MODEL = "builtin:proving-ground"


DEFAULTS_FILE = "diffsteer.json"


class ModelDefaults(pydantic.BaseModel):
    """A model's recommendations, read from ``diffsteer.json`` in its diffusers folder (all keys optional)::

        {"policy": "cfg:scale=1.5", "steps": 30, "native_size": 64, "max_size": 256}

    Used when a request names no policy or steps (CLI, service, OpenAI and A1111 routes), and as the model's
    size limit. Keys the file leaves out come from the model's family (SD3: CFG 7 and 28 steps, as diffusers'
    pipeline; FLUX.1-dev: no true CFG, 28 steps; schnell: 4 steps; Qwen-Image: true CFG 4 with renorm, 50
    steps; UNet models: none). ``native_size`` defaults to the family's (a UNet's sample size × the VAE factor,
    1024 for the flow transformers); ``max_size`` (largest width or height) to no limit beyond the server's own.
    """

    model_config = pydantic.ConfigDict(extra="forbid", frozen=True, strict=True)

    policy: str | None = pydantic.Field(None, description="Policy spec string used when a request names none.")
    steps: int | None = pydantic.Field(None, ge=1, le=1000, description="Steps used when a request names none.")
    native_size: int | None = pydantic.Field(None, ge=8, description="The size the model was trained at (pixels).")
    max_size: int | None = pydantic.Field(None, ge=8, description="Largest width/height recommended for the model.")


def read_model_defaults(folder: str | Path) -> ModelDefaults:
    """The ``diffsteer.json`` of a diffusers folder; no file: no recommendations. A bad file raises
    InvalidInput naming it."""
    path = Path(folder) / DEFAULTS_FILE
    if not path.is_file():
        return ModelDefaults()
    try:
        return ModelDefaults.model_validate(json.loads(path.read_text(encoding="utf-8")))
    except (ValueError, pydantic.ValidationError) as e:
        raise InvalidInput("model", f"{path}: invalid model defaults: {e}") from None


def with_family_defaults(
    own: ModelDefaults, family: ModelFamily, backbone_config: dict[str, Any], native_size: int | None = None
) -> ModelDefaults:
    """A model's own recommendations over its family's."""
    base = {**family.recommended(backbone_config), "native_size": native_size}
    return ModelDefaults(**{**base, **own.model_dump(exclude_none=True)})


def model_family(spec: str | None) -> tuple[ModelFamily, dict[str, Any]] | None:
    """The family of the model ``spec`` names and its backbone config, from its files without loading weights
    (built-in models and diffusers folders); None where only loading tells (hub ids, single files, folders the
    loader will refuse)."""
    spec = canonical_spec(spec)
    if spec in TINY_MODELS:
        return FAMILIES[TINY_MODELS[spec].family], {"guidance_embeds": TINY_MODELS[spec].guidance_embeds}
    folder = BUILTIN_FOLDERS.get(spec) or (Path(spec) if not spec.startswith("builtin:") else None)
    index_path = Path(folder) / "model_index.json" if folder is not None else None
    if index_path is None or not index_path.is_file():
        return None
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        family = family_of_pipeline(index.get("_class_name", ""), spec)
        config_path = Path(folder) / family.backbone_key / "config.json"
        config = json.loads(config_path.read_text(encoding="utf-8")) if config_path.is_file() else {}
    except (OSError, ValueError, InvalidInput):
        return None
    return family, config


def model_defaults(spec: str | None) -> ModelDefaults:
    """The recommendations of the model ``spec`` names, without loading its weights: its ``diffsteer.json`` (folders
    and the built-in default carry one) over its family's (:func:`model_family`). Single files and hub ids get
    theirs when loaded."""
    spec = canonical_spec(spec)
    folder = BUILTIN_FOLDERS.get(spec) or (Path(spec) if not spec.startswith("builtin:") else None)
    own = read_model_defaults(folder) if folder is not None and Path(folder).is_dir() else ModelDefaults()
    found = model_family(spec)
    if found is None:
        return own
    native = TINY_MODELS[spec].native_size if spec in TINY_MODELS else None
    return with_family_defaults(own, *found, native)


def loaded_defaults(spec: str, model: DiffusionModel) -> ModelDefaults:
    """The recommendations of a loaded model: its folder's ``diffsteer.json`` over its family's."""
    folder = BUILTIN_FOLDERS.get(spec) or (spec if not spec.startswith("builtin:") and Path(spec).is_dir() else None)
    own = read_model_defaults(folder) if folder else ModelDefaults()
    native = TINY_MODELS[spec].native_size if spec in TINY_MODELS else None
    return with_family_defaults(own, model.family, dict(model.backbone.config), native)


@dataclass
class DiffusionModel:
    """The components of one checkpoint and the adapter of its family. Read-only during sampling: safe to share
    between requests. ``text_encoders``/``tokenizers`` are in the family's pipeline order (SD3: CLIP-L, CLIP-G,
    T5; FLUX: CLIP-L, T5)."""

    name: str
    family: ModelFamily
    backbone: torch.nn.Module  # the UNet or the transformer
    vae: torch.nn.Module
    text_encoders: list[torch.nn.Module]
    tokenizers: list[Any]
    scheduler_config: dict[str, Any]
    force_zeros_for_empty_prompt: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    defaults: ModelDefaults = field(default_factory=ModelDefaults)

    @property
    def unet(self) -> torch.nn.Module:
        """The backbone of a UNet model (the trainers and UNet-only tools use this name)."""
        if self.family.backbone_key != "unet":
            raise InvalidInput("model", f"{self.name!r} is a {self.family.title} model: its backbone is a transformer")
        return self.backbone

    @property
    def device(self) -> torch.device:
        return next(self.backbone.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.backbone.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    @property
    def default_size(self) -> int:
        """The size a request without width/height gets: the model's native size."""
        return self.native_size

    @property
    def native_size(self) -> int:
        """The size the model was trained at: its ``diffsteer.json``'s, else its family's for its config."""
        return self.defaults.native_size or self.family.native_size(self)

    @property
    def prediction_type(self) -> str:
        return self.family.prediction_type(self)

    @property
    def latent_channels(self) -> int:
        return self.family.latent_channels(self)

    def latent_shape(self, height: int, width: int) -> tuple[int, int, int]:
        """The shape of one image's latents [C, h, w] at a pixel size, in the sampler's (the VAE's) layout."""
        factor = self.vae_scale_factor
        return (self.latent_channels, height // factor, width // factor)

    def fresh_scheduler(self) -> Any:
        """A new instance of the checkpoint's own scheduler."""
        import diffusers

        return getattr(diffusers, self.scheduler_config["_class_name"]).from_config(self.scheduler_config)

    def to_pipeline(self):
        """The family's diffusers pipeline over the same modules (shares weights; for references and LoRA tooling)."""
        return self.family.pipeline(self)


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """Pixels per latent side: 2^(downsampling blocks) of a KL VAE, 2^(temporal-downsample flags) of a causal video
    VAE (Qwen-Image's, whose one spatial halving per flag is what matters for still images)."""
    temporal = getattr(vae, "temperal_downsample", None)
    if temporal is not None:
        return 2 ** len(temporal)
    return 2 ** (len(vae.config.block_out_channels) - 1)


TEXT_ENCODER_KEYS = ("text_encoder", "text_encoder_2", "text_encoder_3")
TOKENIZER_KEYS = ("tokenizer", "tokenizer_2", "tokenizer_3")


def from_components(name: str, components: dict[str, Any], force_zeros_for_empty_prompt: bool = True) -> DiffusionModel:
    """Bundle diffusers pipeline components (a dict like ``pipe.components``) of any supported family."""
    family = family_of_components(components)
    pairs = [
        (components.get(e), components.get(t))
        for e, t in zip(TEXT_ENCODER_KEYS, TOKENIZER_KEYS)
        if components.get(e) is not None
    ]
    return DiffusionModel(
        name=name,
        family=family,
        backbone=components[family.backbone_key],
        vae=components["vae"],
        text_encoders=[e for e, _ in pairs],
        tokenizers=[t for _, t in pairs],
        scheduler_config={**components["scheduler"].config, "_class_name": type(components["scheduler"]).__name__},
        force_zeros_for_empty_prompt=force_zeros_for_empty_prompt if family.name == "sdxl" else False,
    )


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def resolve_device(device: str | torch.device | None) -> torch.device:
    """A usable torch device, or InvalidInput naming ``device``."""
    if device is None:
        return default_device()
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise InvalidInput("device", f"unknown device {device!r}; accepted: cpu, cuda, cuda:N, mps") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInput("device", f"{device!r} requested but CUDA is not available here; use cpu")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise InvalidInput("device", f"{device!r} requested but MPS is not available here; use cpu")
    if resolved.type not in ("cpu", "cuda", "mps"):
        raise InvalidInput("device", f"unsupported device {device!r}; accepted: cpu, cuda, cuda:N, mps")
    return resolved


def canonical_spec(spec: str | None) -> str:
    """The key a model spec is cached under: ``default`` resolved, existing paths made absolute."""
    spec = spec or "default"
    if spec == "default":
        return DEFAULT_MODEL
    if not spec.startswith("builtin:") and Path(spec).expanduser().exists():
        return str(Path(spec).expanduser().resolve())
    return spec


def resolve_dtype(
    dtype: str | torch.dtype | None, device: torch.device, family: ModelFamily | None = None
) -> torch.dtype:
    """``auto``: fp32 on CPU; on CUDA fp16 for UNets and bf16 for the flow transformers (their activations
    overflow fp16, which is why their pipelines are run in bf16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if family is not None and family.schedule == "flow" else torch.float16
    table = {
        "fp32": torch.float32,
        "float32": torch.float32,
        "fp16": torch.float16,
        "float16": torch.float16,
        "bf16": torch.bfloat16,
        "bfloat16": torch.bfloat16,
    }
    if dtype not in table:
        raise InvalidInput("dtype", f"unknown value {dtype!r}; accepted values: auto, fp32, fp16, bf16")
    if device.type == "cpu" and table[dtype] == torch.float16:
        raise InvalidInput("dtype", "fp16 is not supported on CPU; use fp32 or bf16")
    return table[dtype]


def load_model(
    spec: str | None = None,
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    config: str | None = None,
    attention: str = "auto",
    fast_paths: Any = None,
    latent_evaluators: str | None = None,
) -> DiffusionModel:
    """Load a model (see the module docstring for ``spec``); ``config`` is the diffusers config folder or hub id
    for single-file checkpoints; ``attention`` is ``auto`` (xformers if usable, else SDPA), ``sdpa`` or ``xformers``;
    ``fast_paths``: a :class:`diffsteer.guidance.fast_paths.FastPaths` or its spec string (default: none);
    ``latent_evaluators``: a folder of latent evaluators for dynamic CFG's ``evaluator=latent`` (and ``auto``), or
    ``shipped`` for the proving ground's (``builtin:proving-ground`` only); default: the model folder's own
    ``latent_evaluators/`` if it has one."""
    paths = FastPaths.parse(fast_paths)
    device = resolve_device(device)
    resolve_dtype(dtype, device)  # a bad value is refused before anything loads
    name = DEFAULT_MODEL if spec in (None, "", "default") else spec
    spec = canonical_spec(spec)
    if spec.startswith("builtin:"):
        model = _load_builtin(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_dir():
            if not (path / "model_index.json").is_file():
                raise InvalidInput(
                    "model", f"folder {spec!r} has no model_index.json; accepted: a diffusers pipeline folder"
                )
            model = _load_diffusers_folder(str(path), spec)
        elif path.is_file():
            model = _load_single_file(path, config)
        elif _looks_like_path(spec):
            raise InvalidInput("model", f"path {spec!r} does not exist")
        else:
            model = _load_diffusers_folder(spec, spec)
    model.name = name
    model.defaults = loaded_defaults(spec, model)
    if latent_evaluators is not None:
        model.extra["latent_evaluators"] = str(latent_evaluator_folder(latent_evaluators, spec))
    _place(model, device, resolve_dtype(dtype, device, model.family))
    if model.family.backbone_key == "unet":
        configure_attention(model.backbone, device, attention)
    elif attention == "xformers":
        raise InvalidInput("attention", f"xformers is for UNet models; {model.family.title} transformers use SDPA")
    if paths.any:
        if model.family.backbone_key == "unet":
            model.extra["fast_paths"] = apply_fast_paths(model.backbone, paths)
        else:  # a server-wide setting must not keep the transformer models from loading
            log.warning(
                "fast paths %s are for UNet models; %s (%s) loads without them", paths, name, model.family.title
            )
    return model


def latent_evaluator_folder(value: str, spec: str) -> Path:
    """The latent evaluators ``value`` names for the model ``spec``: ``shipped`` (the proving ground's, trained for
    ``builtin:proving-ground``) or a folder holding ``latent_evaluators.json``; InvalidInput naming the field."""
    if value == "shipped":
        if spec != DEFAULT_MODEL:
            raise InvalidInput(
                "latent_evaluators", f"the shipped latent evaluators are {DEFAULT_MODEL}'s, not {spec!r}'s"
            )
        return shipped.LATENT_EVALUATORS
    folder = Path(value).expanduser()
    if not (folder / "latent_evaluators.json").is_file():
        raise InvalidInput(
            "latent_evaluators", f"{value!r} is not a folder of latent evaluators (latent_evaluators.json); or: shipped"
        )
    return folder.resolve()


HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _looks_like_path(spec: str) -> bool:
    """Anything that is not of the hub-id form ``org/name``, or that has a checkpoint suffix."""
    return not HUB_ID.match(spec) or spec.endswith((".safetensors", ".ckpt", ".pt", ".bin"))


def _load_builtin(spec: str) -> DiffusionModel:
    if spec in BUILTIN_FOLDERS:
        folder = BUILTIN_FOLDERS[spec]
        if not (folder / "model_index.json").is_file():
            raise InvalidInput("model", f"the built-in model {spec} is missing from {folder}")
        return _load_diffusers_folder(str(folder), spec)
    if spec in TINY_MODELS:
        return from_components(spec, TINY_MODELS[spec].build())
    raise InvalidInput(
        "model", f"unknown built-in model {spec!r}; accepted values: default, {', '.join(BUILTIN_MODELS)}"
    )


def _hub_error(spec: str, error: Exception) -> InvalidInput:
    offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false", "False")
    hint = (
        "HF_HUB_OFFLINE is set, so hub ids only resolve from the local cache"
        if offline
        else "it is not a local path and could not be fetched from the hub"
    )
    return InvalidInput("model", f"cannot load {spec!r}: {hint} ({type(error).__name__}: {error})")


def _load_diffusers_folder(location: str, name: str) -> DiffusionModel:
    """Load each component of a diffusers layout (local folder or hub id) with its own class; a pipeline of a
    family not supported is refused naming it and the supported ones."""
    import diffusers
    import transformers

    try:
        index = _read_model_index(location)
    except (OSError, ValueError, HFValidationError) as e:
        raise _hub_error(name, e) from None
    class_name = index.get("_class_name", "")
    if "unet" not in index or "vae" not in index:  # other UNet pipelines (LCM, ...) load by their components
        family_of_pipeline(class_name, name)

    def component(key: str):
        entry = index.get(key)
        if not entry or entry[0] is None or entry[1] is None:
            return None
        library, cls_name = entry
        cls = getattr(diffusers if library == "diffusers" else transformers, cls_name)
        if key.startswith("tokenizer"):
            return cls.from_pretrained(location, subfolder=key)
        if key == "scheduler":
            return cls.from_config(cls.load_config(location, subfolder=key))
        try:
            return cls.from_pretrained(location, subfolder=key)
        except OSError:
            return cls.from_pretrained(location, subfolder=key, variant="fp16")

    try:
        keys = ("unet", "transformer", "vae", *TEXT_ENCODER_KEYS, *TOKENIZER_KEYS, "scheduler")
        parts = {k: component(k) for k in keys}
    except OSError as e:
        raise _hub_error(name, e) from None
    return from_components(
        name, parts, force_zeros_for_empty_prompt=bool(index.get("force_zeros_for_empty_prompt", True))
    )


def _read_model_index(location: str) -> dict[str, Any]:
    path = Path(location) / "model_index.json"
    if path.is_file():
        return json.loads(path.read_text())

    return json.loads(Path(hf_hub_download(location, "model_index.json")).read_text())


def _load_single_file(path: Path, config: str | None) -> DiffusionModel:
    """A single-file checkpoint: SD 1.x/2.x, SDXL and SD3/3.5 as whole pipelines (diffusers' ``from_single_file``);
    a FLUX.1 file holds the transformer only, whose other components come from ``config``."""
    import diffusers

    if path.suffix not in (".safetensors", ".ckpt", ".pt", ".bin"):
        raise InvalidInput("model", f"file {str(path)!r} is not a checkpoint; accepted: .safetensors, .ckpt")
    try:
        family = single_file_family(path)
    except Exception as e:  # safetensors/pickle errors for corrupt or foreign files
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise InvalidInput("model", f"cannot read checkpoint {str(path)!r}: {type(e).__name__}: {first_line}") from None
    kwargs: dict[str, Any] = {}
    if config is not None:
        kwargs["config"] = config
    try:
        if family == "flux":
            if config is None:
                raise ValueError("a FLUX.1 single file holds only the transformer; `config` must name its pipeline")
            model = _load_diffusers_folder(config, str(path))
            model.backbone = diffusers.FluxTransformer2DModel.from_single_file(
                str(path), config=config, subfolder="transformer"
            )
            return model
        cls = {"sd": "StableDiffusionPipeline", "sdxl": "StableDiffusionXLPipeline", "sd3": "StableDiffusion3Pipeline"}
        if family == "sd":
            kwargs.update(safety_checker=None, requires_safety_checker=False)
        pipe = getattr(diffusers, cls[family]).from_single_file(str(path), **kwargs)
    except InvalidInput:
        raise
    except Exception as e:  # diffusers raises many types here (missing config, bad keys)
        raise InvalidInput(
            "model",
            f"cannot load single-file checkpoint {str(path)!r}: {type(e).__name__}: {e}. Single files need the "
            "model's diffusers config: pass `config` (a diffusers folder of the same architecture) or allow hub access",
        ) from None
    return from_components(str(path), pipe.components)


def single_file_family(path: Path) -> str:
    """The family of a single-file checkpoint, from its tensor names (original Stability/BFL layouts)."""
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            keys = list(f.keys())
    else:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
        keys = list(state.get("state_dict", state).keys())
    if any(k.startswith("conditioner.embedders.1") for k in keys):
        return "sdxl"
    if any(".joint_blocks." in f".{k}" for k in keys):
        return "sd3"
    if any(".double_blocks." in f".{k}" for k in keys):
        return "flux"
    return "sd"


def _place(model: DiffusionModel, device: torch.device, dtype: torch.dtype) -> None:
    vae_dtype = torch.float32 if dtype == torch.float16 and getattr(model.vae.config, "force_upcast", False) else dtype
    for module in [model.backbone, model.vae, *model.text_encoders]:
        target = vae_dtype if module is model.vae else dtype
        module.to(device=device)
        if next(module.parameters()).dtype != target:
            module.to(dtype=target)
        module.eval()
        module.requires_grad_(False)


def configure_attention(unet: torch.nn.Module, device: torch.device, attention: str = "auto") -> str:
    """Choose the attention kernel; returns the one in use (``sdpa`` or ``xformers``)."""
    if attention not in ("auto", "sdpa", "xformers"):
        raise InvalidInput("attention", f"unknown value {attention!r}; accepted values: auto, sdpa, xformers")
    if attention != "sdpa" and device.type == "cuda":
        try:
            import xformers  # noqa: F401

            unet.enable_xformers_memory_efficient_attention()
            return "xformers"
        except Exception as e:  # not installed, or built for another torch/CUDA
            if attention == "xformers":
                raise InvalidInput("attention", f"xformers is not usable here: {e}") from None
            log.debug("xformers unavailable, using SDPA: %s", e)
    elif attention == "xformers":
        raise InvalidInput("attention", "xformers needs a CUDA device")
    from diffusers.models.attention_processor import AttnProcessor2_0

    unet.set_attn_processor(AttnProcessor2_0())
    return "sdpa"


class ModelCache:
    """Loaded models by spec; loading is serialised, lookups are not. ``latent_evaluators`` maps a model spec to
    its :func:`load_model` ``latent_evaluators``."""

    def __init__(self, latent_evaluators: dict[str, str] | None = None, **load_kwargs: Any):
        self._models: dict[str, DiffusionModel] = {}
        self._lock = threading.Lock()
        self._load_kwargs = load_kwargs
        self._evaluators = {canonical_spec(k): v for k, v in (latent_evaluators or {}).items()}

    def get(self, spec: str | None = None) -> DiffusionModel:
        key = canonical_spec(spec)
        model = self._models.get(key)
        if model is None:
            with self._lock:
                model = self._models.get(key)
                if model is None:
                    extra = {"latent_evaluators": self._evaluators[key]} if key in self._evaluators else {}
                    model = load_model(key, **self._load_kwargs, **extra)
                    self._models[key] = model
        return model

    def loaded(self) -> list[str]:
        return list(self._models)
