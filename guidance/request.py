"""The parameters of one generation: one pydantic schema shared by the Python API, the CLI and the service."""

from __future__ import annotations

import base64
import dataclasses
import io
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import pydantic
from PIL import Image

from diffsteer.guidance.errors import InvalidInput, from_pydantic
from diffsteer.guidance.models import DEFAULTS_FILE, ModelDefaults
from diffsteer.guidance.policies.base import PolicyParams
from diffsteer.guidance.registry import parse_policy, policy_names
from diffsteer.guidance.schedulers import check_scheduler_name, scheduler_names

MAX_SEED = 2**63 - 1


@dataclass(frozen=True)
class Limits:
    """Configurable maxima; requests above them are refused with the field named."""

    max_width: int = 2048
    max_height: int = 2048
    max_steps: int = 200
    max_num_images: int = 16
    max_prompt_chars: int = 4000
    # UNet evaluations at the model's native size (diffsteer.guidance.cost); None: no limit
    max_cost: float | None = None
    max_area_factor: float | None = None  # image area / the model's native area; None: no limit

    def for_model(self, defaults: ModelDefaults) -> Limits:
        """These limits, tightened by a model's ``max_size`` (:class:`diffsteer.guidance.models.ModelDefaults`)."""
        size = defaults.max_size
        if size is None:
            return self
        return dataclasses.replace(self, max_width=min(self.max_width, size), max_height=min(self.max_height, size))


def check_multiple_of_8(size: int | None) -> int | None:
    """Image sizes are multiples of 8 (the VAE's downsampling), as in diffusers."""
    if size is not None and size % 8:
        raise ValueError(f"must be a multiple of 8, got {size}")
    return size


def _policy(value: Any) -> PolicyParams:
    return parse_policy(value)


def check_text(value: str, field: str) -> str:
    """``value`` if it is valid Unicode text; a lone surrogate (JSON's ``"\\ud800"``), which no tokenizer or
    UTF-8 encoder accepts, is refused naming ``field``."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InvalidInput(
            field, f"contains a lone surrogate ({value[e.start]!r} at position {e.start}); text must be valid Unicode"
        ) from None
    return value


def _prompt(value: Any) -> str | list[str]:
    if isinstance(value, str):
        return check_text(value, "prompt")
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise InvalidInput(f"prompt.{i}", f"expected a string, got {type(item).__name__}")
            check_text(item, f"prompt.{i}")
        return value
    raise InvalidInput("prompt", f"expected a string or a list of strings, got {type(value).__name__}")


def _image_text(value: Any) -> Any:
    """An image field's value: base64 text (or a data URL) as given; a PIL image (the Python API) as PNG base64."""
    if isinstance(value, Image.Image):
        buffer = io.BytesIO()
        value.save(buffer, format="PNG")
        return base64.b64encode(buffer.getvalue()).decode("ascii")
    return value


ImageText = Annotated[str, pydantic.BeforeValidator(_image_text)]


def _negative_prompt(value: Any) -> Any:
    return check_text(value, "negative_prompt") if isinstance(value, str) else value


class GenerationParams(pydantic.BaseModel):
    """What to generate. ``width``/``height`` default to the model's native size; ``seed`` to a random one."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    prompt: Annotated[str | list[str], pydantic.BeforeValidator(_prompt)] = pydantic.Field(
        description="The text prompt, or one prompt per image (then num_images is the list's length)."
    )
    negative_prompt: Annotated[str | None, pydantic.AfterValidator(_negative_prompt)] = pydantic.Field(
        None, description="What to steer away from (CFG's unconditional branch)."
    )
    policy: Annotated[pydantic.SerializeAsAny[PolicyParams], pydantic.BeforeValidator(_policy)] = pydantic.Field(
        default_factory=lambda: parse_policy(None),
        description=f"Guidance policy: a spec string like 'apg:scale=10' or an object with 'name' "
        f"({', '.join(policy_names())}) and its parameters.",
        json_schema_extra={"anyOf": [{"type": "string"}, {"type": "object"}]},
    )
    steps: int = pydantic.Field(30, ge=1, description="Number of denoising steps.")
    scheduler: str = pydantic.Field(
        "default", description=f"Sampler: {', '.join(scheduler_names())} ('default' is the checkpoint's own)."
    )
    seed: int | None = pydantic.Field(
        None, ge=0, le=MAX_SEED, description="Seed of the first image; image k uses seed + k. Random when absent."
    )
    seeds: list[pydantic.conint(ge=0, le=MAX_SEED)] | None = pydantic.Field(  # type: ignore[valid-type]
        None, description="Explicit per-image seeds (instead of `seed`); one per image."
    )
    num_images: int = pydantic.Field(1, ge=1, description="Images generated with the same prompt.")
    width: int | None = pydantic.Field(None, ge=8, description="Width in pixels, a multiple of 8.")
    height: int | None = pydantic.Field(None, ge=8, description="Height in pixels, a multiple of 8.")
    eta: float = pydantic.Field(0.0, ge=0.0, le=1.0, description="DDIM η (stochasticity); other schedulers ignore it.")
    init_image: ImageText | None = pydantic.Field(
        None,
        description="img2img: the image to start from (base64 or a data:image URL; a PIL image from Python), noised "
        "by `strength`. Without width/height the generation has its size, rounded down to the model's multiple.",
    )
    strength: float = pydantic.Field(
        0.8,
        ge=0.0,
        le=1.0,
        description="How much of init_image is noised away (diffusers' strength, A1111's denoising_strength): the "
        "last strength × steps steps run; 1 starts from pure noise where a mask is given.",
    )
    mask: ImageText | None = pydantic.Field(
        None, description="Inpainting: white repaints, black keeps init_image (base64 or a data URL); needs init_image."
    )
    mask_blur: int = pydantic.Field(
        0, ge=0, le=64, description="Gaussian blur of the mask in pixels before it is binarised (A1111's mask_blur)."
    )
    inpainting_fill: Literal["original", "fill", "latent_noise", "latent_nothing"] = pydantic.Field(
        "original",
        description="What the area to repaint starts from (A1111's masked content): the init image (original), "
        "the colours around the mask blurred into it (fill), pure noise (latent_noise) or zero latents "
        "(latent_nothing).",
    )
    distilled_guidance: float | None = pydantic.Field(
        None,
        ge=0.0,
        le=100.0,
        description="The guidance scale a guidance-distilled model (FLUX.1-dev) takes as an input; default 3.5, "
        "as diffusers' FluxPipeline. The policy's guidance is true CFG on top of it. Refused by other models.",
    )

    @pydantic.field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler_name(v)

    @pydantic.field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        return check_multiple_of_8(v)

    @pydantic.model_validator(mode="after")
    def _batch(self) -> GenerationParams:
        if isinstance(self.prompt, list):
            if not self.prompt:
                raise InvalidInput("prompt", "an empty list; give a prompt or a list of prompts")
            if self.num_images not in (1, len(self.prompt)):
                raise InvalidInput("num_images", f"is {self.num_images} but prompt lists {len(self.prompt)} prompts")
            self.num_images = len(self.prompt)
        if self.seeds is not None:
            if self.num_images == 1 and not isinstance(self.prompt, list):
                self.num_images = len(self.seeds)
            if self.seed is not None:
                raise InvalidInput("seeds", "give either seed or seeds, not both")
            if len(self.seeds) != self.num_images:
                raise InvalidInput("seeds", f"has {len(self.seeds)} values for {self.num_images} images")
        return self

    @pydantic.model_validator(mode="after")
    def _mask_needs_image(self) -> GenerationParams:
        if self.mask is not None and self.init_image is None:
            raise InvalidInput("mask", "an inpainting mask needs init_image, the image it masks")
        return self

    @property
    def prompts(self) -> list[str]:
        """One prompt per image."""
        return list(self.prompt) if isinstance(self.prompt, list) else [self.prompt] * self.num_images

    @classmethod
    def parse(cls, data: dict[str, Any] | GenerationParams, limits: Limits | None = None) -> GenerationParams:
        """Validate ``data`` (raising InvalidInput naming the field) and check it against ``limits``."""
        if isinstance(data, GenerationParams):
            params = data
        else:
            try:
                params = cls.model_validate(data)
            except pydantic.ValidationError as e:
                raise from_pydantic(e) from None
        params.check_limits(limits or Limits())
        return params

    def with_model_defaults(
        self, defaults: ModelDefaults, given: set[str], limits: Limits | None = None
    ) -> GenerationParams:
        """Fill what the request did not name (``given``: its fields set) from a model's recommendations
        (:class:`diffsteer.guidance.models.ModelDefaults`): ``policy`` and ``steps``; a default ``steps`` is never above
        ``limits.max_steps`` (a default must not make a request invalid). The recommended policy is checked
        here, where it is used: an invalid one raises InvalidInput naming ``model`` (the model's file is wrong,
        not the request)."""
        update: dict[str, Any] = {}
        if "policy" not in given and defaults.policy is not None:
            try:
                update["policy"] = parse_policy(defaults.policy)
            except InvalidInput as e:
                raise InvalidInput(
                    "model", f"the model's recommended policy {defaults.policy!r} ({DEFAULTS_FILE}) is invalid: {e}"
                ) from None
        if "steps" not in given:
            steps = defaults.steps or self.steps
            update["steps"] = min(steps, limits.max_steps) if limits is not None else steps
        return self.model_copy(update=update) if update else self

    def check_limits(self, limits: Limits) -> None:
        checks = [
            ("steps", self.steps, limits.max_steps),
            ("num_images", self.num_images, limits.max_num_images),
            ("width", self.width, limits.max_width),
            ("height", self.height, limits.max_height),
            (
                "prompt",
                max(len(p) for p in self.prompt) if isinstance(self.prompt, list) else len(self.prompt),
                limits.max_prompt_chars,
            ),
            ("negative_prompt", len(self.negative_prompt or ""), limits.max_prompt_chars),
        ]
        for name, value, maximum in checks:
            if value is not None and value > maximum:
                unit = " characters" if "prompt" in name else ""
                raise InvalidInput(name, f"{value}{unit} is above the maximum of {maximum}{unit}")
