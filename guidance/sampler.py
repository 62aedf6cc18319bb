"""The denoising loop: diffusers components, a pluggable guidance policy, no shared mutable state.

``generate`` is the inference entry point (prompt in, PIL images and metadata out). Its parts are public for
the methods that need more control: ``initial_noise`` (per-image seeds), ``denoise`` (the loop; with autograd
on, gradient checkpointing of each UNet call and a per-step choice of where gradients flow, for ReNO and
AlignProp), ``check_request`` and ``prepare``. Decoding and encoding latents are in :mod:`.latents`, the step
events a callback receives in :mod:`.events`.

Everything a generation mutates — scheduler, generators, policy state, the denoiser's counters — is created
per call, so concurrent generations on one shared model are independent.
"""

from __future__ import annotations

import inspect
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from diffsteer.guidance.conditioning import encode_conditions
from diffsteer.guidance.cost import GenerationCost, check_cost, generation_cost
from diffsteer.guidance.denoiser import Denoiser, StepInfo
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.events import GenerationInterrupted, StepCallback, StepEvent
from diffsteer.guidance.executor import DIRECT, Executor
from diffsteer.guidance.families.flow_shift import static_shift
from diffsteer.guidance.image_conditioning import (
    ImageConditioning,
    RequestImages,
    decode_request_images,
    default_size,
    first_step,
    keep_unmasked,
    prepare_image_conditioning,
    start_latents,
    with_inpainting_inputs,
)
from diffsteer.guidance.latents import decode_pixels, to_pil
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.parameterisation import NoiseLevel, to_x0
from diffsteer.guidance.policies.base import GuidancePolicy, OuterLoopPolicy, PolicyState, SamplingContext
from diffsteer.guidance.registry import build_policy
from diffsteer.guidance.request import GenerationParams, Limits
from diffsteer.guidance.reward_models import DEFAULT_REWARDS, RewardModels
from diffsteer.guidance.schedulers import a1111_sampler, build_scheduler, check_scheduler_name


@dataclass
class GenerationResult:
    images: list[Image.Image]
    pixels: torch.Tensor  # [B, 3, H, W] float in [0, 1], on CPU
    seeds: list[int]
    nfe: list[int]  # UNet evaluations per image
    unet_calls: int
    step_times: list[float]
    total_time: float
    trace: dict[str, Any]
    params: GenerationParams
    model: str
    sampler: tuple[str, str | None] = ("", None)  # A1111's sampler name and schedule type (infotexts)
    phases: dict[str, float] = field(default_factory=dict)  # wall time of encode, optimise, denoise, decode
    distilled_guidance: float | None = None  # the distilled guidance input it ran with (FLUX.1-dev), else None

    def metadata(self, index: int) -> dict[str, Any]:
        """Generation parameters of image ``index`` (for PNG text chunks and API responses)."""
        p = self.params
        return {
            "prompt": p.prompts[index],
            "negative_prompt": p.negative_prompt or "",
            "seed": self.seeds[index],
            "policy": p.policy.spec(),
            "cfg_scale": getattr(p.policy, "scale", None),
            "distilled_guidance": self.distilled_guidance,
            "denoising_strength": p.strength if p.init_image is not None else None,
            "mask_blur": p.mask_blur if p.mask is not None else None,
            "masked_content": p.inpainting_fill if p.mask is not None else None,
            "steps": p.steps,
            "scheduler": p.scheduler,
            "sampler": self.sampler[0] or a1111_sampler(p.scheduler)[0],
            "schedule_type": self.sampler[1] if self.sampler[0] else a1111_sampler(p.scheduler)[1],
            "width": self.images[index].width,
            "height": self.images[index].height,
            "eta": p.eta,
            "model": self.model,
            "nfe": self.nfe[index],
        }


def resolve_seeds(seed: int | None, num_images: int) -> list[int]:
    """Image k uses seed + k (A1111's convention); a missing seed is drawn at random (32 bits)."""
    base = secrets.randbelow(2**32) if seed is None else seed
    return [(base + k) % 2**63 for k in range(num_images)]


def initial_noise(
    seeds: list[int], shape: tuple[int, ...], device: torch.device
) -> tuple[torch.Tensor, list[torch.Generator]]:
    """Unit Gaussian latents, one CPU generator per image (device-independent, batch-independent noise).

    Returns the noise and the generators, which ancestral schedulers keep drawing from.
    """
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return draw_noise(generators, shape, device), generators


def draw_noise(generators: list[torch.Generator], shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """One unit Gaussian draw of ``shape`` per image, from its CPU generator, on ``device``."""
    noise = torch.cat([torch.randn((1, *shape), generator=g, dtype=torch.float32) for g in generators])
    return noise.to(device)


def step_levels(scheduler: Any, timesteps: torch.Tensor, schedule: str = "vp") -> list[NoiseLevel]:
    """The noise level at each of ``timesteps`` (the scheduler's, or their last ones). Flow models: σ from the scheduler's σ grid, or t / num_train_timesteps
    (every flow scheduler sets timesteps = σ·T). VP models: ᾱ from σ (ᾱ = 1/(1+σ²)) for σ-based schedulers,
    else from ``alphas_cumprod[t]``."""
    sigmas = getattr(scheduler, "sigmas", None)
    # the timesteps may be the schedule's last steps only (img2img): the σ of a suffix are the grid's last ones
    skipped = len(sigmas) - 1 - len(timesteps) if sigmas is not None else -1
    aligned = sigmas is not None and len(sigmas) == len(getattr(scheduler, "timesteps", [])) + 1 and skipped >= 0
    if schedule == "flow":
        if aligned:
            return [NoiseLevel.flow(float(s)) for s in sigmas[skipped:-1]]
        total = float(scheduler.config.num_train_timesteps)
        return [NoiseLevel.flow(float(t) / total) for t in timesteps]
    if aligned:
        return [NoiseLevel.vp(1.0 / (1.0 + float(s) ** 2)) for s in sigmas[skipped:-1]]
    acp = scheduler.alphas_cumprod
    return [NoiseLevel.vp(float(acp[int(round(float(t)))])) for t in timesteps]


def scale_model_input(scheduler: Any, latents: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The scheduler's model input (flow-matching schedulers have no input scaling)."""
    scale = getattr(scheduler, "scale_model_input", None)
    return latents if scale is None else scale(latents, t)


def scheduler_step_kwargs(scheduler: Any, eta: float, generators: list[torch.Generator]) -> dict[str, Any]:
    accepted = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "eta" in accepted:
        kwargs["eta"] = eta
    if "generator" in accepted:
        kwargs["generator"] = generators
    return kwargs


GradAtStep = Callable[[int], "bool | torch.Tensor"]


def step_recording(grad_at_step: GradAtStep | None, i: int) -> tuple[bool, torch.Tensor | None]:
    """Whether autograd records step ``i``, and the per-image mask of outputs to keep attached (None: all)."""
    if grad_at_step is None:
        return torch.is_grad_enabled(), None
    wanted = grad_at_step(i)
    if not isinstance(wanted, torch.Tensor):
        return bool(wanted), None
    wanted = wanted.to(torch.bool)
    if bool(wanted.all()) or not bool(wanted.any()):
        return bool(wanted.any()), None
    return True, wanted


def denoise(
    latents: torch.Tensor,
    scheduler: Any,
    timesteps: torch.Tensor,
    denoiser: Denoiser,
    policy: GuidancePolicy,
    state: PolicyState,
    *,
    step_kwargs: dict[str, Any] | None = None,
    callback: StepCallback | None = None,
    grad_at_step: GradAtStep | None = None,
    step_times: list[float] | None = None,
    schedule: str = "vp",
    patch: int = 1,
    after_step: Callable[[int, torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Run the reverse process from ``latents`` (already scaled by ``init_noise_sigma``) of a model with noise
    ``schedule`` ("vp" or "flow") and latent ``patch`` size. ``after_step(i, latents)``, when given, is applied after
    step ``i`` (inpainting's unmasked part, :mod:`.image_conditioning`).

    A callback that raises :class:`GenerationInterrupted` ends the loop after its step, returning that step's
    clean-image estimate x̂0 (from the guided output; the unmasked part kept as ``after_step`` keeps it).

    ``grad_at_step(i)`` decides, per step, whether autograd records it (default: the ambient grad mode), so a
    trainer can backpropagate through the last K steps only. A step's input is detached where the step before
    it did not record gradients, which makes the truncation explicit. It may also return a bool tensor [B]
    (one truncation per image): the step is recorded when any image asks for it, and the output of every image
    that did not ask is detached, so no gradient reaches an image's steps before its own window. (State a
    policy carries between steps, such as APG's momentum, is not cut for those images.)
    """
    levels = step_levels(scheduler, timesteps, schedule)
    prediction_type = denoiser.prediction_type
    start = time.perf_counter()
    for i, t in enumerate(timesteps):
        t0 = time.perf_counter()
        record, keep = step_recording(grad_at_step, i)
        with torch.set_grad_enabled(record):
            x_in = scale_model_input(scheduler, latents, t)
            info = StepInfo(i, len(timesteps), t, levels[i], prediction_type, patch)
            guided = policy.step(state, x_in, info, denoiser)
            latents = scheduler.step(guided, t, latents, **(step_kwargs or {}), return_dict=False)[0]
            if after_step is not None:
                latents = after_step(i, latents)
            if keep is not None:
                latents = torch.where(keep.to(latents.device).view(-1, 1, 1, 1), latents, latents.detach())
        if latents.device.type == "cuda":
            torch.cuda.synchronize(latents.device)
        if step_times is not None:
            step_times.append(time.perf_counter() - t0)
        if callback is not None:
            try:
                callback(
                    StepEvent(
                        i + 1, len(timesteps), int(denoiser.evaluations.sum()), time.perf_counter() - start, latents
                    )
                )
            except GenerationInterrupted:  # the images as they stand: this step's clean estimate
                if i + 1 < len(timesteps):
                    latents = to_x0(guided, x_in, levels[i], prediction_type)
                    if after_step is not None:
                        latents = after_step(len(timesteps) - 1, latents)  # the kept part as after the last step
                break
    return latents


def make_scheduler(model: DiffusionModel, params: GenerationParams) -> tuple[Any, torch.Tensor]:
    """A fresh scheduler for one run, with its timesteps set as the family's pipeline sets them for the request's
    size (custom σ grid, dynamic shift μ); a flow scheduler without dynamic shifting gets the equivalent static
    shift exp(μ) instead."""
    height, width = image_size(model, params)
    family, config = model.family, model.scheduler_config
    options = family.timestep_options(config, params.steps, family.tokens(model, height, width))
    shift = static_shift(config, options.get("mu"))
    scheduler = build_scheduler(params.scheduler, config, family.schedule, shift)
    if type(scheduler).__name__ != config["_class_name"]:
        options = {}  # another flow solver: its own grid with the static shift
    try:
        scheduler.set_timesteps(params.steps, device=model.device, **options)
    except ValueError as e:  # e.g. more steps than the scheduler's training timesteps
        raise InvalidInput("steps", f"{params.steps} is not supported by scheduler {params.scheduler!r}: {e}") from None
    start = 0
    if params.init_image is not None:  # img2img: the last strength × steps steps
        start = first_step(params.steps, params.strength, model.family.schedule) * scheduler.order
        if start >= len(scheduler.timesteps):
            raise InvalidInput(
                "strength", f"{params.strength} leaves no step to run of {params.steps}; raise strength or steps"
            )
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(start)
    return scheduler, scheduler.timesteps[start:]


def image_size(model: DiffusionModel, params: GenerationParams) -> tuple[int, int]:
    """(height, width) of a request's images: its own, else the model's native size."""
    return params.height or model.default_size, params.width or model.default_size


def sampling_context(
    model: DiffusionModel, params: GenerationParams, timesteps: torch.Tensor, rewards: RewardModels | None = None
) -> SamplingContext:
    return SamplingContext(
        num_steps=len(timesteps),
        batch_size=params.num_images,
        prediction_type=model.prediction_type,
        schedule=model.family.schedule,
        has_negative_prompt=bool(params.negative_prompt),
        requested_steps=params.steps,
        prompts=tuple(params.prompts),
        model=model,
        rewards=rewards or DEFAULT_REWARDS,
    )


@dataclass
class CheckedRequest:
    """A request validated against a model: parameters within the limits, its policy built, and the scheduler
    and policy state of its first run already made (``policy.start`` is where step-dependent parameters are
    validated), so that nothing is parsed, validated or built twice on the way to the UNet."""

    params: GenerationParams
    policy: GuidancePolicy
    scheduler: Any
    timesteps: torch.Tensor
    state: PolicyState
    rewards: RewardModels
    cost: GenerationCost
    images: RequestImages | None = None  # the decoded init image and mask of an image-conditioned request


def check_request(
    model: DiffusionModel,
    params: GenerationParams | dict[str, Any],
    *,
    limits: Limits | None = None,
    rewards: RewardModels | None = None,
) -> CheckedRequest:
    """Validate ``params`` against ``limits`` and ``model`` (InvalidInput names the field; the cost limits are
    relative to the model's native size, :mod:`diffsteer.guidance.cost`), running no module. The policy and steps a request
    does not name come from the model's recommendations (``model.defaults``, its ``diffsteer.json``), as in the
    service and the CLI: a one-step student given only a prompt samples in one step, unguided."""
    limits = limits or Limits()
    params = GenerationParams.parse(params, limits)
    params = params.with_model_defaults(model.defaults, params.model_fields_set, limits)
    images = decode_request_images(params.init_image, params.mask)
    if images is not None and (params.width is None or params.height is None):
        height, width = default_size(model, images.init)
        params = params.model_copy(update={"height": params.height or height, "width": params.width or width})
        params.check_limits(limits)
    check_scheduler_name(params.scheduler, schedule=model.family.schedule)
    model.family.check_size(model, *image_size(model, params))
    if params.distilled_guidance is not None and not model.family.takes_distilled_guidance(model.backbone.config):
        raise InvalidInput(
            "distilled_guidance",
            f"{model.name!r} ({model.family.title}) takes no distilled guidance input; only guidance-distilled "
            "models such as FLUX.1-dev do. Leave it out, or steer with the policy",
        )
    policy = build_policy(params.policy)
    height, width = image_size(model, params)
    size_factor = model.family.relative_cost(model, height, width, model.native_size)
    steps = params.steps
    if params.init_image is not None:
        steps -= first_step(params.steps, params.strength, model.family.schedule)
    cost = generation_cost(params, policy, model.native_size, size_factor, steps)
    check_cost(cost, model.native_size, limits.max_cost, limits.max_area_factor)
    scheduler, timesteps = make_scheduler(model, params)
    rewards = rewards or DEFAULT_REWARDS
    state = policy.start(sampling_context(model, params, timesteps, rewards))
    return CheckedRequest(params, policy, scheduler, timesteps, state, rewards, cost, images)


@dataclass
class Trajectory:
    """The outcome of one run of the reverse process."""

    latents: torch.Tensor
    denoiser: Denoiser
    state: PolicyState
    step_times: list[float]


@dataclass
class PreparedGeneration:
    """A validated request with its prompts encoded and its noise drawn, ready to run once or many times.

    Each :meth:`run` has its own scheduler, policy state and denoiser counters (the first run takes those the
    validation made), so runs (e.g. the iterations of ReNO, or a trainer's rollouts) never share mutable state.
    Every UNet call and every other unit of model work goes through ``executor``.
    """

    model: DiffusionModel
    params: GenerationParams
    policy: GuidancePolicy
    conditions: dict[str, Any]
    aliases: dict[str, str]
    seeds: list[int]
    noise: torch.Tensor  # the seeds' unit Gaussian noise; each run draws it (and its generators) afresh
    height: int
    width: int
    executor: Executor = DIRECT
    gradient_checkpointing: bool = False
    rewards: RewardModels = DEFAULT_REWARDS
    first_run: tuple[Any, torch.Tensor, PolicyState] | None = None  # (scheduler, timesteps, state) of the check
    image: ImageConditioning | None = None  # img2img / inpainting
    generator_states: list[torch.Tensor] | None = None  # each image's generator after its noise (ancestral steps)

    @property
    def prompts(self) -> list[str]:
        """One prompt per image."""
        return self.params.prompts

    def generators(self) -> list[torch.Generator]:
        """Each image's CPU generator as the preparation left it (after the noise and any VAE samples): fresh
        for every run, so that ancestral schedulers draw the same values in each."""
        if self.generator_states is None:
            return initial_noise(self.seeds, tuple(self.noise.shape[1:]), self.noise.device)[1]
        generators = []
        for state in self.generator_states:
            generator = torch.Generator("cpu")
            generator.set_state(state)
            generators.append(generator)
        return generators

    def scheduler_and_state(self) -> tuple[Any, torch.Tensor, PolicyState]:
        if self.first_run is not None:
            made, self.first_run = self.first_run, None
            return made
        scheduler, timesteps = make_scheduler(self.model, self.params)
        return (
            scheduler,
            timesteps,
            self.policy.start(sampling_context(self.model, self.params, timesteps, self.rewards)),
        )

    def run(
        self,
        noise: torch.Tensor | None = None,
        *,
        callback: StepCallback | None = None,
        grad_at_step: GradAtStep | None = None,
        gradient_checkpointing: bool | None = None,
    ) -> Trajectory:
        """Denoise from ``noise`` (unit Gaussian; default: the seeds' noise) to clean latents.
        ``gradient_checkpointing`` overrides the prepared setting for this run."""
        scheduler, timesteps, state = self.scheduler_and_state()
        checkpointing = self.gradient_checkpointing if gradient_checkpointing is None else gradient_checkpointing
        denoiser = Denoiser(
            self.model.backbone,
            self.conditions,
            self.model.prediction_type,
            aliases=self.aliases,
            gradient_checkpointing=checkpointing and not self.executor.differentiable_backbone,
            executor=self.executor,
            forward=self.model.family.forward,
        )
        generators = self.generators()
        noise = self.noise if noise is None else noise
        schedule = self.model.family.schedule
        after_step = None
        if self.image is None:
            start = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        else:
            levels = step_levels(scheduler, timesteps, schedule)
            start = start_latents(scheduler, self.image, noise, timesteps[0], levels[0])
            if self.image.blend:
                after_step = keep_unmasked(scheduler, self.image, noise, timesteps, levels)
        step_times: list[float] = []
        with self.executor.session(self.model.backbone, tuple(self.noise.shape[1:])):
            latents = denoise(
                start,
                scheduler,
                timesteps,
                denoiser,
                self.policy,
                state,
                step_kwargs=scheduler_step_kwargs(scheduler, self.params.eta, generators),
                callback=callback,
                grad_at_step=grad_at_step,
                step_times=step_times,
                schedule=schedule,
                patch=self.model.family.patch_size(self.model),
                after_step=after_step,
            )
        return Trajectory(latents, denoiser, state, step_times)


def prepare(
    model: DiffusionModel,
    params: GenerationParams | dict[str, Any] | CheckedRequest,
    *,
    limits: Limits | None = None,
    executor: Executor | None = None,
    rewards: RewardModels | None = None,
    gradient_checkpointing: bool = False,
) -> PreparedGeneration:
    """Validate ``params`` (InvalidInput names the field; a :class:`CheckedRequest` is already validated), encode
    the prompts (one unit on ``executor``) and draw the seeds' noise."""
    executor = executor or DIRECT
    checked = (
        params if isinstance(params, CheckedRequest) else check_request(model, params, limits=limits, rewards=rewards)
    )
    params, policy = checked.params, checked.policy
    height, width = image_size(model, params)
    conditions, aliases = executor.run(
        lambda: encode_conditions(
            model,
            params.prompts,
            params.negative_prompt,
            policy.conditions,
            height=height,
            width=width,
            distilled_guidance=params.distilled_guidance,
        )
    )
    seeds = list(params.seeds) if params.seeds is not None else resolve_seeds(params.seed, params.num_images)
    shape = model.latent_shape(height, width)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    image = None
    if checked.images is None:
        noise = draw_noise(generators, shape, model.device)
    else:
        image, noise, inputs = executor.run(
            lambda: prepare_image_conditioning(
                model,
                checked.images,
                params.strength,
                params.mask_blur,
                params.inpainting_fill,
                height,
                width,
                generators,
                lambda: draw_noise(generators, shape, model.device),
            )
        )
        conditions = with_inpainting_inputs(conditions, inputs)
    return PreparedGeneration(
        model,
        params,
        policy,
        conditions,
        aliases,
        seeds,
        noise,
        height,
        width,
        executor,
        gradient_checkpointing,
        checked.rewards,
        (checked.scheduler, checked.timesteps, checked.state),
        image,
        [g.get_state() for g in generators],
    )


def generate(
    model: DiffusionModel,
    params: GenerationParams | dict[str, Any] | CheckedRequest,
    *,
    callback: StepCallback | None = None,
    limits: Limits | None = None,
    executor: Executor | None = None,
    rewards: RewardModels | None = None,
) -> GenerationResult:
    """Text-to-image sampling with the request's guidance policy: encode, an outer loop for policies that have
    one (:class:`OuterLoopPolicy`, e.g. ReNO), the denoising loop, decode; all model work through ``executor``
    (default: this thread). Raises InvalidInput for bad parameters and lets a callback's GenerationCancelled
    propagate. The result's ``phases`` holds each phase's wall time."""
    executor = executor or DIRECT
    t_start = time.perf_counter()
    prepared = prepare(model, params, limits=limits, executor=executor, rewards=rewards)
    t_prepared = time.perf_counter()
    outer = None
    if isinstance(prepared.policy, OuterLoopPolicy):
        outer = prepared.policy.optimise_noise(prepared, callback)
    t_optimised = time.perf_counter()
    with torch.no_grad():
        run = prepared.run(None if outer is None else outer.noise.detach(), callback=callback)
    t_denoised = time.perf_counter()
    pixels = executor.run(lambda: decode_pixels(model, run.latents))
    t_decoded = time.perf_counter()
    phases = {
        "encode_s": t_prepared - t_start,
        "optimise_s": t_optimised - t_prepared,
        "denoise_s": t_denoised - t_optimised,
        "decode_s": t_decoded - t_denoised,
    }
    result = generation_result(
        prepared, run, pixels, t_decoded - t_start, outer.nfe if outer else 0, outer.trace if outer else None
    )
    result.phases = phases
    return result


def generation_result(
    prepared: PreparedGeneration,
    run: Trajectory,
    pixels: torch.Tensor,
    total_time: float,
    outer_nfe: int = 0,
    outer_trace: dict[str, Any] | None = None,
) -> GenerationResult:
    """The result of a final run and its decoded pixels; ``outer_nfe``/``outer_trace`` come from a noise
    optimisation before it (ReNO), whose evaluations count towards every image."""
    return GenerationResult(
        images=to_pil(pixels),
        pixels=pixels,
        seeds=prepared.seeds,
        nfe=[n + outer_nfe for n in run.denoiser.evaluations.tolist()],
        unet_calls=run.denoiser.unet_calls,
        step_times=run.step_times,
        total_time=total_time,
        trace={**prepared.policy.finish(run.state), **(outer_trace or {})},
        params=prepared.params,
        model=prepared.model.name,
        sampler=a1111_sampler(prepared.params.scheduler, prepared.model.scheduler_config),
        distilled_guidance=prepared.model.family.distilled_guidance_used(
            prepared.model, prepared.params.distilled_guidance
        ),
    )
