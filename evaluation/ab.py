"""A/B evaluation of guidance policies: the run's configuration, its plan, and the run itself.

``run_ab(config)`` (and ``diffsteer ab``) runs two or more *arms* on the same prompts x seeds. An arm is a
name, a guidance policy spec and optionally its own model; every arm generates every (prompt, seed) item with
the item's seed (:func:`diffsteer.evaluation.runner.run_arm`), so the arms' images of an item share their initial noise
and differ only by the arm: a paired design. Each image is scored (:mod:`diffsteer.evaluation.metrics`) and
recorded (:mod:`diffsteer.evaluation.records`), every pair of arms is compared on every metric with prompts as
clusters (:mod:`diffsteer.evaluation.results`), and the run is written to ``output_dir``::

    results.json          config, arms, prompts, every image's metrics and path, per-arm summaries, statistics
    records.jsonl         one line per finished image (what a rerun resumes from)
    images/ARM/*.png      the images (PNG text chunks carry the generation parameters)
    plots/*.png           metric distributions per arm, NFE against each quality metric
    report.html           grids (one column per arm), statistics tables, the plots; relative image paths

Arms
----
``NAME=POLICY`` or ``NAME=POLICY@MODEL`` (the model after the *last* ``@``), or a JSON object
``{"name": ..., "policy": <spec string or object>, "model": ...}`` (use it when a spec or path contains
``@``). ``NAME`` is 1-64 characters of ``A-Z a-z 0-9 _ . -`` (it names the image folder). Arms without a
model use the run's ``model``. Policies are validated up front with :func:`diffsteer.guidance.registry.parse_policy`,
and checked against the model, steps and scheduler before any image is generated.

Resume
------
Images are generated in chunks of ``batch_size`` items, the arms interleaved chunk by chunk (machine-load
drift then hits every arm alike, and a partial run is still paired). After each chunk its PNGs are written and
one record per image is appended to ``records.jsonl``. A rerun into the same directory skips an (arm, prompt,
seed) whose record matches the arm's current settings (policy, model, steps, scheduler, size, prompt text) and
whose PNG exists (:func:`diffsteer.evaluation.records.reusable`); metrics added since are computed from the PNG.
Changing an arm's settings regenerates that arm only. A cancelled or interrupted run resumes the same way.

Statistics
----------
Per arm and metric a mean with a prompt-bootstrap CI; per pair of arms (or ``(baseline, other)``) and metric
the paired difference, its CI, win/tie/loss, the sign and Wilcoxon tests and a verdict, counted per prompt
(``unit="prompt"``, the default) or per image: see :mod:`diffsteer.evaluation.results`.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
import pydantic
from PIL import Image

from diffsteer.evaluation.metrics import (
    DEFAULT_METRICS,
    RECORDED,
    Column,
    MetricScorer,
    check_metric_names,
    columns_for,
    parse_metric_list,
)
from diffsteer.evaluation.prompts import PromptSet, load_prompts
from diffsteer.evaluation.records import RecordStore, image_relpath, reusable, write_atomic
from diffsteer.evaluation.report import write_report
from diffsteer.evaluation.results import build_results, write_results
from diffsteer.evaluation.runner import GenerateFn, Item, run_arm
from diffsteer.guidance.errors import InvalidInput, from_pydantic
from diffsteer.guidance.events import GenerationCancelled, StepEvent
from diffsteer.guidance.image_conditioning import decode_request_images, default_size
from diffsteer.guidance.images import encode_image
from diffsteer.guidance.models import canonical_spec, load_model
from diffsteer.guidance.registry import parse_json_object, parse_policy
from diffsteer.guidance.request import ImageText, Limits, check_multiple_of_8, check_text
from diffsteer.guidance.sampler import check_request
from diffsteer.guidance.schedulers import check_scheduler_name

ARM_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


class ABCancelled(GenerationCancelled):
    """Raised by :func:`run_ab` when its ``cancel`` callback asks to stop; finished images stay on disk."""


# ----------------------------------------------------------------------------- configuration


def parse_arm(value: Any) -> Any:
    """``NAME=POLICY[@MODEL]`` or a JSON object string -> a mapping for :class:`ArmConfig`; others unchanged."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("{"):
        try:
            return parse_json_object(text, "arms")
        except InvalidInput as e:
            raise InvalidInput(
                "arms", f"{e.reason} in {text[:200]!r}; expected a JSON object with name, policy, model"
            ) from None
    name, eq, rest = text.partition("=")
    if not eq or not name.strip() or not rest.strip():
        raise InvalidInput("arms", f"expected NAME=POLICY or NAME=POLICY@MODEL (e.g. base=cfg:scale=1), got {text!r}")
    if not ARM_NAME.match(name.strip()):
        raise InvalidInput(
            "arms",
            f"{text!r}: {name.strip()!r} is not an arm name (1-64 of A-Z a-z 0-9 _ . -); "
            "expected NAME=POLICY or NAME=POLICY@MODEL, e.g. base=cfg:scale=1",
        )
    policy, model = rest, None
    if "@" in rest:
        policy, _, model = rest.rpartition("@")
        if not policy.strip() or not model.strip():
            raise InvalidInput("arms", f"expected NAME=POLICY@MODEL with both parts, got {text!r}")
    return {"name": name.strip(), "policy": policy.strip(), "model": model.strip() if model else None}


class ArmConfig(pydantic.BaseModel):
    """One arm: a name, a guidance policy and optionally its own model."""

    model_config = pydantic.ConfigDict(extra="forbid")

    name: str = pydantic.Field(description="Arm name (1-64 of A-Z a-z 0-9 _ . -); names the image folder.")
    policy: str | dict[str, Any] = pydantic.Field(description="Guidance policy: spec string or JSON object.")
    model: str | None = pydantic.Field(None, description="Model of this arm (default: the run's model).")

    @pydantic.field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not ARM_NAME.match(v):
            raise InvalidInput("arms", f"arm name {v!r}: use 1-64 characters of A-Z a-z 0-9 _ . - (it names a folder)")
        return v

    @pydantic.field_validator("policy")
    @classmethod
    def _policy(cls, v: Any, info: pydantic.ValidationInfo) -> Any:
        try:
            parse_policy(v)
        except InvalidInput as e:
            raise InvalidInput("arms", f"arm {info.data.get('name', '?')!r}: {e}") from None
        return v

    @property
    def policy_spec(self) -> str:
        """The canonical spec string (non-default parameters only)."""
        return parse_policy(self.policy).spec()


def _metrics(value: Any) -> Any:
    return None if value is None else parse_metric_list(value)


class ABConfig(pydantic.BaseModel):
    """Everything an A/B run needs; the CLI's options map one to one onto these fields."""

    model_config = pydantic.ConfigDict(extra="forbid", allow_inf_nan=False)

    arms: list[Annotated[ArmConfig, pydantic.BeforeValidator(parse_arm)]] = pydantic.Field(
        description="Two or more arms: 'NAME=POLICY[@MODEL]' strings or {name, policy, model} objects."
    )
    prompts: str | list[str] = pydantic.Field(
        description="Prompt source: pg:all, pg:CATEGORY[,...], a text / GenEval JSONL / PartiPrompts TSV file, "
        "or a list of prompts."
    )
    output_dir: str = pydantic.Field(description="Folder for results.json, images/, plots/ and report.html.")
    seeds: int = pydantic.Field(1, ge=1, le=10_000, description="Seeds (images) per prompt.")
    seed: int = pydantic.Field(
        0, ge=0, le=2**62, description="Files: first seed (seeds seed..seed+K-1). pg: the held-out suite's seed."
    )
    max_prompts: int | None = pydantic.Field(None, ge=1, description="Keep the first N prompts (per category for pg:).")
    metrics: Annotated[list[str] | None, pydantic.BeforeValidator(_metrics)] = pydantic.Field(
        None,
        description="Metrics: verifier, saturation, oversaturation, nfe, latency, reward:SPEC. Default: "
        "saturation, oversaturation, nfe, latency, plus verifier for pg: sources.",
    )
    directions: dict[str, Literal["higher", "lower"]] = pydantic.Field(
        default_factory=dict, description="Override a metric's (or column's) direction: higher or lower is better."
    )
    steps: int = pydantic.Field(30, ge=1, le=Limits.max_steps, description="Denoising steps.")
    scheduler: str = pydantic.Field("default", description="Sampler (see `diffsteer generate --help`).")
    model: str | None = pydantic.Field(
        None, description="Model of arms that name none (default: the built-in default)."
    )
    width: int | None = pydantic.Field(None, ge=8, description="Image width (default: the model's native size).")
    height: int | None = pydantic.Field(None, ge=8, description="Image height (default: the model's native size).")
    batch_size: int = pydantic.Field(8, ge=1, le=256, description="Images per generate() call.")
    device: str | None = pydantic.Field(None, description="cpu, cuda, cuda:N (default: cuda when available).")
    dtype: str | None = pydantic.Field(None, description="auto, fp32, fp16, bf16.")
    baseline: str | None = pydantic.Field(None, description="Compare every arm with this one (default: all pairs).")
    unit: Literal["prompt", "image"] = pydantic.Field(
        "prompt", description="Unit of win/tie/loss and the tests: per-prompt mean difference, or per image."
    )
    n_resamples: int = pydantic.Field(10_000, ge=100, le=1_000_000, description="Bootstrap resamples.")
    confidence: float = pydantic.Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the intervals.")
    report: bool = pydantic.Field(True, description="Write plots/ and report.html.")
    report_max_prompts: int = pydantic.Field(60, ge=0, description="Prompts shown as image grids in the report.")
    init_image: ImageText | None = pydantic.Field(
        None,
        description="img2img for every arm: the image each generation starts from (base64 or a data URL; the CLI "
        "reads a file). Without a size, the run takes the image's, rounded down to the model's multiple.",
    )
    strength: float = pydantic.Field(0.8, ge=0.0, le=1.0, description="How much of init_image is noised away.")
    mask: ImageText | None = pydantic.Field(
        None, description="Inpainting for every arm: white repaints, black keeps init_image; needs init_image."
    )

    @property
    def image_fields(self) -> dict[str, Any]:
        """The image-conditioning fields every generation of the run takes (none for text to image)."""
        if self.init_image is None:
            return {}
        return {"init_image": self.init_image, "mask": self.mask, "strength": self.strength}

    @pydantic.field_validator("scheduler")
    @classmethod
    def _scheduler(cls, v: str) -> str:
        return check_scheduler_name(v)

    @pydantic.field_validator("width", "height")
    @classmethod
    def _multiple_of_8(cls, v: int | None) -> int | None:
        return check_multiple_of_8(v)

    @pydantic.model_validator(mode="after")
    def _check(self) -> ABConfig:
        if len(self.arms) < 2:
            raise InvalidInput("arms", f"need at least two arms to compare, got {len(self.arms)}")
        if isinstance(self.prompts, str):
            check_text(self.prompts, "prompts")
        else:
            for i, text in enumerate(self.prompts):
                check_text(text, f"prompts.{i}")
        names = [a.name for a in self.arms]
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise InvalidInput("arms", f"arm names must be unique; repeated: {', '.join(repeated)}")
        if self.mask is not None and self.init_image is None:
            raise InvalidInput("mask", "an inpainting mask needs init_image, the image it masks")
        if self.baseline is not None and self.baseline not in names:
            raise InvalidInput("baseline", f"{self.baseline!r} is not an arm; arms: {', '.join(names)}")
        if self.metrics is None:
            pg = isinstance(self.prompts, str) and self.prompts.strip().startswith("pg:")
            self.metrics = (["verifier"] if pg else []) + list(DEFAULT_METRICS)
        check_metric_names(self.metrics)
        columns_for(self.metrics, self.directions)  # validates directions
        if not self.output_dir.strip():
            raise InvalidInput("output_dir", "empty")
        return self

    @classmethod
    def parse(cls, data: Mapping[str, Any] | ABConfig) -> ABConfig:
        """Validate ``data``; errors raise InvalidInput naming the field (``arms``, ``prompts``, ``metrics``...)."""
        if isinstance(data, ABConfig):
            return data
        try:
            return cls.model_validate(dict(data))
        except pydantic.ValidationError as e:
            raise from_pydantic(e) from None

    @property
    def columns(self) -> list[Column]:
        return columns_for(self.metrics or [], self.directions)


# ----------------------------------------------------------------------------- progress


@dataclass(frozen=True)
class ABProgress:
    """Progress of :func:`run_ab`: ``done`` of ``total`` images are finished (generated now or found on disk).

    ``stage`` is ``"prepare"``, ``"generate"`` (with ``step``/``steps`` of the current batch's denoising
    loop), ``"score"`` (metrics of images found on disk), ``"statistics"``, ``"report"`` or ``"done"``.
    """

    stage: str
    done: int
    total: int
    generated: int = 0
    skipped: int = 0
    arm: str | None = None
    step: int | None = None
    steps: int | None = None


ProgressCallback = Callable[[ABProgress], None]
CancelCallback = Callable[[], bool]
ModelLoader = Callable[[str | None], Any]


# ----------------------------------------------------------------------------- planning


@dataclass
class ArmPlan:
    config: ArmConfig
    model: Any
    model_spec: str
    width: int
    height: int
    signature: str

    @property
    def name(self) -> str:
        return self.config.name

    def describe(self) -> dict[str, Any]:
        """The arm as results.json lists it."""
        return {
            "name": self.name,
            "policy": self.config.policy_spec,
            "policy_params": parse_policy(self.config.policy).model_dump(mode="json"),
            "model": self.model_spec,
            "width": self.width,
            "height": self.height,
            "signature": self.signature,
        }


@dataclass
class ABPlan:
    """A validated run: prompts read, models loaded, reward models built, every arm preflighted."""

    config: ABConfig
    prompts: PromptSet
    arms: list[ArmPlan]
    columns: list[Column]
    scorer: MetricScorer
    output_dir: Path

    @property
    def items(self) -> list[Item]:
        return self.prompts.items


def default_model_loader(config: ABConfig) -> ModelLoader:
    cache: dict[str, Any] = {}

    def load(spec: str | None) -> Any:
        key = canonical_spec(spec)
        if key not in cache:
            cache[key] = load_model(spec, device=config.device, dtype=config.dtype)
        return cache[key]

    return load


def prepare_ab(
    config: ABConfig | Mapping[str, Any], model_loader: ModelLoader | None = None, rewards: Any = None
) -> ABPlan:
    """Validate everything that can be checked before generating; InvalidInput names the field."""
    config = ABConfig.parse(config)
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise InvalidInput("output_dir", f"{str(out)!r} exists and is not a folder")
    prompts = load_prompts(config.prompts, config.seeds, config.seed, config.max_prompts)
    metrics = config.metrics or []
    if "verifier" in metrics:
        missing = [p.text for p in prompts.prompts if p.spec is None]
        if missing:
            raise InvalidInput(
                "metrics",
                f"verifier needs proving-ground prompts (pg:... or captions of that world); "
                f"{len(missing)} of {len(prompts.prompts)} are not, e.g. {missing[0]!r}",
            )
    if config.report:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise InvalidInput("report", "the report's plots need matplotlib (pip install matplotlib)") from None
    load = model_loader or default_model_loader(config)
    arms: list[ArmPlan] = []
    images = decode_request_images(config.init_image, config.mask)  # once for every arm
    for arm in config.arms:
        spec = arm.model or config.model
        try:
            model = load(spec)
        except InvalidInput as e:
            raise InvalidInput("arms" if arm.model else "model", f"arm {arm.name!r}: {e.reason}") from None
        native_height, native_width = (
            default_size(model, images.init) if images else (model.default_size, model.default_size)
        )
        width = config.width or native_width
        height = config.height or native_height
        _preflight(arm, model, config, width, height, prompts.items[0].prompt, rewards)
        settings = {
            "policy": arm.policy_spec,
            "model": canonical_spec(spec),
            "steps": config.steps,
            "scheduler": config.scheduler,
            "width": width,
            "height": height,
        }
        if images is not None:  # a rerun with another image or strength does not reuse this run's images
            image_key = json.dumps(config.image_fields, sort_keys=True).encode()
            settings["image"] = hashlib.sha256(image_key).hexdigest()
        signature = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
        arms.append(ArmPlan(arm, model, canonical_spec(spec), width, height, signature))
    scorer = MetricScorer(metrics, device=arms[0].model.device, rewards=rewards, model=arms[0].model)
    return ABPlan(config, prompts, arms, config.columns, scorer, out)


def _preflight(
    arm: ArmConfig, model: Any, config: ABConfig, width: int, height: int, prompt: str, rewards: Any = None
) -> None:
    """What the sampler checks before work starts (policy vs. steps and scheduler), without running the model."""
    try:
        check_request(
            model,
            {
                "prompt": prompt,
                "policy": arm.policy,
                "steps": config.steps,
                "scheduler": config.scheduler,
                "width": width,
                "height": height,
                "seed": 0,
                **config.image_fields,
            },
            rewards=rewards,
        )
    except InvalidInput as e:
        field = "arms" if e.field.startswith("policy") else e.field
        raise InvalidInput(field, f"arm {arm.name!r}: {e}" if field == "arms" else e.reason) from None


# ----------------------------------------------------------------------------- the run


def run_ab(
    config: ABConfig | Mapping[str, Any] | ABPlan,
    progress: ProgressCallback | None = None,
    cancel: CancelCallback | None = None,
    *,
    model_loader: ModelLoader | None = None,
    generate_fn: GenerateFn | None = None,
) -> dict[str, Any]:
    """Run an A/B evaluation (module docstring) and return the results (also written to ``results.json``).

    ``progress(ABProgress)`` is called as images finish and at every denoising step; ``cancel()`` is polled at
    every step and between batches, and a true value stops the run with :class:`ABCancelled` (a callback may
    also raise ``GenerationCancelled`` itself). ``model_loader(spec)`` returns a loaded model (e.g. a service's
    model cache); by default models are loaded once per run. ``generate_fn`` replaces
    :func:`diffsteer.guidance.sampler.generate` for each batch (e.g. a server's generation through its device worker).
    ``config`` may be the plan of :func:`prepare_ab` (validated earlier, e.g. before queueing the run). Bad input
    raises InvalidInput before any image is generated.
    """
    t_start = time.perf_counter()
    plan = config if isinstance(config, ABPlan) else prepare_ab(config, model_loader)
    config, out, items = plan.config, plan.output_dir, plan.items
    out.mkdir(parents=True, exist_ok=True)
    store = RecordStore(out / "records.jsonl")
    metric_names = config.metrics or []
    total = len(plan.arms) * len(items)
    done: dict[tuple[str, int], dict[str, Any]] = {}
    for arm in plan.arms:
        for i, item in enumerate(items):
            rec = store.get(arm.name, item)
            if reusable(rec, arm.signature, item, out):
                done[(arm.name, i)] = rec
    skipped = len(done)
    generated = 0

    def report(stage: str, arm: str | None = None, step: int | None = None, steps: int | None = None) -> None:
        if progress is not None:
            progress(ABProgress(stage, len(done), total, generated, skipped, arm, step, steps))

    def check_cancel() -> None:
        if cancel is not None and cancel():
            raise ABCancelled("cancelled")

    report("generate")
    indices = list(range(len(items)))
    for start in range(0, len(items), config.batch_size):
        chunk = indices[start : start + config.batch_size]
        for arm in plan.arms:
            todo = [i for i in chunk if (arm.name, i) not in done]
            if not todo:
                continue
            check_cancel()

            def on_step(event: StepEvent, _arm: str = arm.name) -> None:
                check_cancel()
                report("generate", _arm, event.step, event.total)

            records = run_arm(
                arm.model,
                [items[i] for i in todo],
                arm.config.policy,
                steps=config.steps,
                scheduler=config.scheduler,
                batch_size=len(todo),
                extra={"width": arm.width, "height": arm.height, **config.image_fields},
                callback=on_step,
                generate_fn=generate_fn,
            )
            values = plan.scorer.score(
                [r.image for r in records], [r.item.prompt for r in records], [r.item.meta.spec for r in records]
            )
            new = []
            for i, r, vals in zip(todo, records, values):
                rel = image_relpath(arm.name, r.item)
                write_atomic(out / rel, encode_image(Image.fromarray(r.image), "png", r.metadata))
                rec = {
                    "arm": arm.name,
                    "prompt_id": r.item.prompt_id,
                    "seed": r.item.seed,
                    "prompt": r.item.prompt,
                    "path": rel,
                    "signature": arm.signature,
                    "policy": arm.config.policy_spec,
                    "model": arm.model_spec,
                    "metrics": {"nfe": r.nfe, "latency": r.seconds, **vals},
                }
                new.append(rec)
                done[(arm.name, i)] = rec
            store.add(new)
            generated += len(new)
            report("generate", arm.name)

    _backfill_metrics(plan, store, done, metric_names, check_cancel, lambda: report("score"))
    report("statistics")
    results = build_results(
        config.model_dump(mode="json"),
        [arm.describe() for arm in plan.arms],
        plan.prompts,
        plan.columns,
        done,
        generated=generated,
        skipped=skipped,
        seconds=time.perf_counter() - t_start,
    )
    write_results(out, results)
    if config.report:
        report("report")
        write_report(results, out)
    report("done")
    return results


def _backfill_metrics(
    plan: ABPlan,
    store: RecordStore,
    done: dict[tuple[str, int], dict[str, Any]],
    metric_names: Sequence[str],
    check_cancel: Callable[[], None],
    tick: Callable[[], None],
) -> None:
    """Compute metrics missing from records of earlier runs (metrics added since), from the saved PNGs."""
    items = plan.items
    for arm in plan.arms:
        pending: list[tuple[int, list[str]]] = []
        for i in range(len(items)):
            rec = done[(arm.name, i)]
            missing = [
                m
                for m in metric_names
                if m not in RECORDED and not all(c in rec["metrics"] for c in plan.scorer.columns_of(m))
            ]
            if missing:
                pending.append((i, missing))
        for start in range(0, len(pending), plan.config.batch_size):
            check_cancel()
            part = pending[start : start + plan.config.batch_size]
            names = sorted({m for _, ms in part for m in ms})
            images = [
                np.asarray(Image.open(plan.output_dir / done[(arm.name, i)]["path"]).convert("RGB")) for i, _ in part
            ]
            values = plan.scorer.score(
                images, [items[i].prompt for i, _ in part], [items[i].meta.spec for i, _ in part], names
            )
            updated = []
            for (i, _), vals in zip(part, values):
                rec = dict(done[(arm.name, i)])
                rec["metrics"] = {**rec["metrics"], **vals}
                done[(arm.name, i)] = rec
                updated.append(rec)
            store.add(updated)
            tick()


__all__ = [
    "ABCancelled",
    "ABConfig",
    "ABPlan",
    "ABProgress",
    "ArmConfig",
    "ArmPlan",
    "default_model_loader",
    "parse_arm",
    "prepare_ab",
    "run_ab",
]
