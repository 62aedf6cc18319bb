"""What a generation costs, and the limits on it.

The unit is one backbone evaluation of one image at the model's native size. A request costs

    images × size factor × steps × policy.cost_per_step() × policy.cost_multiplier()

where the size factor is one evaluation at the request's size over one at the native size: the area ratio
width·height / native² for UNets, and for transformers, whose attention also grows with the square of the
sequence, the family's token-count model (:meth:`diffsteer.guidance.families.base.ModelFamily.relative_cost`).

(CFG evaluates 2 conditions per step; ReNO's iterations each sample and backpropagate; dynamic CFG also
decodes and scores its candidates). Limits in these units hold for every model alike: a size that is cheap
for SDXL is refused for a 64×64 model, and ReNO's iterations count. A refused request names the field that
contributes most beyond an ordinary request (native size, :data:`REFERENCE_STEPS` steps, one image, plain
CFG), so the client knows what to reduce.
"""

from __future__ import annotations

from dataclasses import dataclass

from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.policies.base import GuidancePolicy
from diffsteer.guidance.request import GenerationParams

REFERENCE_STEPS = 30
REFERENCE_PER_STEP = 2.0  # CFG


@dataclass(frozen=True)
class GenerationCost:
    """A request's estimated cost and the factors it is the product of."""

    images: int
    width_factor: float  # width / native size
    height_factor: float
    steps: int
    per_step: float  # the policy's backbone evaluations per image and step
    multiplier: float  # the policy's passes (an outer loop's)
    policy_field: str  # the policy parameter behind per_step × multiplier
    size_factor: float | None = None  # one evaluation at this size over one at the native size (None: area)

    @property
    def area_factor(self) -> float:
        return self.width_factor * self.height_factor

    @property
    def evaluation_factor(self) -> float:
        return self.area_factor if self.size_factor is None else self.size_factor

    @property
    def total(self) -> float:
        return self.images * self.evaluation_factor * self.steps * self.per_step * self.multiplier

    def main_field(self) -> str:
        """The field whose value is furthest above an ordinary request's."""
        size_field = "width" if self.width_factor >= self.height_factor else "height"
        excess = {
            size_field: self.evaluation_factor,
            "steps": self.steps / REFERENCE_STEPS,
            "num_images": float(self.images),
            self.policy_field: self.per_step * self.multiplier / REFERENCE_PER_STEP,
        }
        return max(excess, key=excess.__getitem__)

    def describe(self) -> str:
        return (
            f"{self.images} image(s) × {self.evaluation_factor:g}× an evaluation at native size × {self.steps} steps × "
            f"{self.per_step:g} evaluations per step × {self.multiplier:g} passes = {self.total:g}"
        )


def generation_cost(
    params: GenerationParams,
    policy: GuidancePolicy,
    native_size: int,
    size_factor: float | None = None,
    steps: int | None = None,
) -> GenerationCost:
    """The cost of a request; ``size_factor``: one evaluation at its size over one at native size (None: the
    area ratio); ``steps``: the steps that run (fewer than requested for img2img; None: the request's)."""
    width = params.width or native_size
    height = params.height or native_size
    return GenerationCost(
        images=params.num_images,
        width_factor=width / native_size,
        height_factor=height / native_size,
        steps=params.steps if steps is None else steps,
        per_step=policy.cost_per_step(),
        multiplier=policy.cost_multiplier(),
        policy_field=f"policy.{policy.cost_field}" if policy.cost_field else "policy",
        size_factor=size_factor,
    )


def check_cost(cost: GenerationCost, native_size: int, max_cost: float | None, max_area_factor: float | None) -> None:
    """InvalidInput naming the field when the image is too large for the model or the whole request costs too much."""
    if max_area_factor is not None and cost.area_factor > max_area_factor:
        field = "width" if cost.width_factor >= cost.height_factor else "height"
        raise InvalidInput(
            field,
            f"{cost.width_factor * native_size:g}x{cost.height_factor * native_size:g} is {cost.area_factor:g}× the "
            f"area of this model's native {native_size}x{native_size}; this server allows at most {max_area_factor:g}×",
        )
    if max_cost is not None and cost.total > max_cost:
        raise InvalidInput(
            cost.main_field(),
            f"the request costs {cost.total:g} backbone evaluations at the model's native size ({cost.describe()}), above "
            f"this server's max_cost of {max_cost:g}; reduce {cost.main_field()} (or steps, num_images, the size)",
        )
