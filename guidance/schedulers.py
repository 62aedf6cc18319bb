"""Scheduler names -> diffusers scheduler classes, and a fresh scheduler per generation.

diffusers schedulers are stateful (step index, multistep history), so a pipeline's shared scheduler breaks
under concurrent requests (diffusers issues 3672 and 5749). Every generation here builds its own instance
from the checkpoint's scheduler config; ``default`` keeps the checkpoint's own class.

One name means the same sampler on every model: on a flow-matching model (SD3, FLUX, Qwen-Image) ``euler`` is
diffusers' FlowMatchEulerDiscreteScheduler (the families' own, with their shift and dynamic shifting exactly as
their pipelines set it), ``heun`` FlowMatchHeunDiscreteScheduler, and ``dpmpp_2m`` / ``unipc`` the multistep
solvers in flow mode (``use_flow_sigmas``, ``flow_prediction``). Those three take a static shift only, so
where the family shifts by resolution they get the shift exp(μ) that gives the same σ grid
(:mod:`diffsteer.guidance.families.flow_shift`); Qwen-Image's terminal stretch is the Euler scheduler's alone.
Names without a flow form (DDIM, PLMS, ...) are refused on flow models, naming the accepted ones.
"""

from __future__ import annotations

from typing import Any

from diffsteer.guidance.errors import InvalidInput, unknown_choice

# name -> (diffusers class name, config overrides)
SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),  # PLMS only, as SD 1.x ships it
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpmpp_2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_karras": (
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "dpmsolver++", "solver_order": 2, "use_karras_sigmas": True},
    ),
    "unipc": ("UniPCMultistepScheduler", {}),
    "lcm": ("LCMScheduler", {}),
}
# name -> (diffusers class name, config overrides) on flow-matching models; "shift" is set per generation
FLOW_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "dpmpp_2m": (
        "DPMSolverMultistepScheduler",
        {
            "algorithm_type": "dpmsolver++",
            "solver_order": 2,
            "use_flow_sigmas": True,
            "prediction_type": "flow_prediction",
            "use_dynamic_shifting": False,
        },
    ),
    "unipc": (
        "UniPCMultistepScheduler",
        {"use_flow_sigmas": True, "prediction_type": "flow_prediction", "use_dynamic_shifting": False},
    ),
}
DEFAULT_SCHEDULER = "default"


def scheduler_names(schedule: str | None = None) -> list[str]:
    """Every scheduler name (``schedule`` None), or those a model of that noise schedule takes."""
    if schedule == "flow":
        return [DEFAULT_SCHEDULER, *FLOW_SCHEDULERS]
    return [DEFAULT_SCHEDULER, *SCHEDULERS]


def check_scheduler_name(name: str, field: str = "scheduler", schedule: str | None = None) -> str:
    if name != DEFAULT_SCHEDULER and name not in SCHEDULERS and name not in FLOW_SCHEDULERS:
        raise unknown_choice(field, name, scheduler_names())
    if schedule == "flow" and name not in scheduler_names("flow"):
        raise InvalidInput(
            field,
            f"{name!r} has no flow-matching form; accepted values on this model: {', '.join(scheduler_names('flow'))}",
        )
    return name


def build_scheduler(name: str, base_config: dict[str, Any], schedule: str = "vp", shift: float | None = None) -> Any:
    """A new scheduler instance for one generation, from the checkpoint's scheduler config. On flow models
    (``schedule`` "flow") a scheduler without dynamic shifting gets the static ``shift`` (default: the config's)."""
    import diffusers

    check_scheduler_name(name, schedule=schedule)
    if name == DEFAULT_SCHEDULER:
        cls = getattr(diffusers, base_config["_class_name"])
        return cls.from_config(base_config)
    if schedule == "flow":
        class_name, overrides = FLOW_SCHEDULERS[name]
        if class_name == base_config["_class_name"]:  # the family's own: its shift rule unchanged
            return getattr(diffusers, class_name).from_config(base_config)
        shift = float(base_config.get("shift", 1.0)) if shift is None else shift
        shifted = {"flow_shift": shift} if "use_flow_sigmas" in overrides else {"shift": shift}
        return getattr(diffusers, class_name).from_config(base_config, **overrides, **shifted)
    class_name, overrides = SCHEDULERS[name]
    return getattr(diffusers, class_name).from_config(base_config, **overrides)


# Our scheduler -> (A1111's sampler name, its "Schedule type" when not the sampler's own), as A1111 writes
# them into infotexts (``Sampler: DPM++ 2M, Schedule type: Karras``).
A1111_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "ddim": ("DDIM", None),
    "ddpm": ("DDPM", None),
    "pndm": ("PLMS", None),
    "lms": ("LMS", None),
    "euler": ("Euler", None),
    "euler_a": ("Euler a", None),
    "heun": ("Heun", None),
    "dpmpp_2m": ("DPM++ 2M", None),
    "dpmpp_2m_karras": ("DPM++ 2M", "Karras"),
    "unipc": ("UniPC", None),
    "lcm": ("LCM", None),
}
# On flow models: A1111 Forge's names for FLUX/SD3 sampling (its "Simple" schedule is the shifted flow grid).
A1111_FLOW_SAMPLERS: dict[str, tuple[str, str | None]] = {
    "euler": ("Euler", "Simple"),
    "heun": ("Heun", "Simple"),
    "dpmpp_2m": ("DPM++ 2M", "Simple"),
    "unipc": ("UniPC", "Simple"),
}


def is_flow_config(base_config: dict[str, Any] | None) -> bool:
    """Whether a checkpoint's scheduler config is a flow-matching one (every flow family ships FlowMatch*)."""
    return bool(base_config) and str(base_config.get("_class_name", "")).startswith("FlowMatch")


def resolve_scheduler_name(name: str, base_config: dict[str, Any] | None) -> str:
    """``default`` -> the name of the checkpoint's own scheduler class (``ddim``...); others unchanged. A class
    without a name here stays ``default``."""
    if name != DEFAULT_SCHEDULER or not base_config:
        return name
    class_name = base_config.get("_class_name")
    if is_flow_config(base_config):
        return next((n for n, (cls, _) in FLOW_SCHEDULERS.items() if cls == class_name), name)
    if class_name == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if base_config.get("use_karras_sigmas") else "dpmpp_2m"
    for candidate, (cls, _) in SCHEDULERS.items():
        if cls == class_name:
            return candidate
    return name


def a1111_sampler(name: str, base_config: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """A1111's (sampler name, schedule type) for our scheduler ``name`` (``default`` resolved through the
    checkpoint's ``base_config``); an unknown one keeps its own name."""
    table = A1111_FLOW_SAMPLERS if is_flow_config(base_config) else A1111_SAMPLERS
    return table.get(resolve_scheduler_name(name, base_config), (name, None))
