"""Scheduler names -> diffusers scheduler classes, and a fresh scheduler per generation.

diffusers schedulers are stateful (step index, multistep history), so a pipeline's shared scheduler breaks
under concurrent requests (diffusers issues 3672 and 5749). Every generation here builds its own instance
from the checkpoint's scheduler config; ``default`` keeps the checkpoint's own class.
"""

from __future__ import annotations

from typing import Any

from diffsteer.guidance.errors import unknown_choice

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
DEFAULT_SCHEDULER = "default"


def scheduler_names() -> list[str]:
    return [DEFAULT_SCHEDULER, *SCHEDULERS]


def check_scheduler_name(name: str, field: str = "scheduler") -> str:
    if name != DEFAULT_SCHEDULER and name not in SCHEDULERS:
        raise unknown_choice(field, name, scheduler_names())
    return name


def build_scheduler(name: str, base_config: dict[str, Any]) -> Any:
    """A new scheduler instance for one generation, from the checkpoint's scheduler config."""
    import diffusers

    check_scheduler_name(name)
    if name == DEFAULT_SCHEDULER:
        cls = getattr(diffusers, base_config["_class_name"])
        return cls.from_config(base_config)
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


def resolve_scheduler_name(name: str, base_config: dict[str, Any] | None) -> str:
    """``default`` -> the name of the checkpoint's own scheduler class (``ddim``...); others unchanged. A class
    without a name here stays ``default``."""
    if name != DEFAULT_SCHEDULER or not base_config:
        return name
    class_name = base_config.get("_class_name")
    if class_name == "DPMSolverMultistepScheduler":
        return "dpmpp_2m_karras" if base_config.get("use_karras_sigmas") else "dpmpp_2m"
    for candidate, (cls, _) in SCHEDULERS.items():
        if cls == class_name:
            return candidate
    return name


def a1111_sampler(name: str, base_config: dict[str, Any] | None = None) -> tuple[str, str | None]:
    """A1111's (sampler name, schedule type) for our scheduler ``name`` (``default`` resolved through the
    checkpoint's ``base_config``); an unknown one keeps its own name."""
    return A1111_SAMPLERS.get(resolve_scheduler_name(name, base_config), (name, None))
