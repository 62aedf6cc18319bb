"""A/B evaluations as jobs (``POST /ab``): :func:`diffsteer.evaluation.ab.run_ab` with the server's models and device.

A request is validated in full before it is queued (:func:`plan_run`): ABConfig's own checks, prompt sources
(``pg:`` suites or a list of prompts; never a server file), the models the server offers, every arm's policy
against its model, the metrics' reward models, and the server's limits (steps, sizes, prompt length,
``batch_size`` <= ``max_num_images``, at most ``ab_max_images`` images). Bad input is a 422 naming the field.

Where it runs: on its own queue (:meth:`Engine.submit_ab` onto ``Engine.ab_queue``: ``ab_concurrent`` threads,
``ab_queue_size`` waiting), so a run never takes one of the ``max_concurrent`` generation slots. Each image
batch of each arm is one :meth:`Engine.check` and one :meth:`Engine.sample` call, the same path a ``/generate``
request takes: prompt encoding, every UNet call and the decode go through the device worker, which serves its
work oldest first. So the device interleaves A/B batches with generation requests call by call (and batches
their UNet calls together where they fit); a request waits at most one UNet call or task of the run, never the
whole run. Metrics (rewards, verifier) are computed on the run's own thread, outside the device worker: they use
none of the diffusion model's modules. ``latency`` per image is wall time, so it includes the time the device
spent on other requests.

Files: ``ab_dir/<job id>/`` holds what ``run_ab`` writes (results.json, records.jsonl, images/, plots/,
report.html) and ``job.json`` (the owner's key fingerprint), which lets the report and images be served
after the job itself is purged from memory (``job_ttl_s``); ``DELETE /ab/{id}`` of a finished job removes
the folder. Only ``report.html``, ``results.json`` and the PNGs under ``images/`` and ``plots/`` are served.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffsteer.evaluation.ab import ABConfig, ABPlan, ABProgress, prepare_ab, run_ab
from diffsteer.guidance.errors import InvalidInput
from diffsteer.guidance.events import StepCallback
from diffsteer.guidance.models import DiffusionModel
from diffsteer.guidance.request import GenerationParams, Limits
from diffsteer.guidance.sampler import GenerationResult
from diffsteer.service.engine import Engine, ModelUnavailable
from diffsteer.service.errors import ServiceError
from diffsteer.service.queue import Ticket
from diffsteer.service.schemas import ABRequest

JOB_ID = re.compile(r"^([a-z0-9]{1,32}\.)?[A-Za-z0-9_-]{1,64}$")  # optional "REPLICA." prefix (Ray Serve)
OWNER_FILE = "job.json"
SERVED = re.compile(r"^(report\.html|results\.json|(images|plots)/[A-Za-z0-9_./-]+\.png)$")
# GenerationParams' limit fields as an A/B request names them
LIMIT_FIELDS = {"num_images": "batch_size", "prompt": "prompts"}
STEP_EVENT_INTERVAL_S = 0.25  # denoising-step progress events of a run, at most this often


def not_found(what: str, field: str = "job_id") -> ServiceError:
    return ServiceError(404, f"no {what}", field=field, code="not_found")


# ----------------------------------------------------------------------------- validation


def plan_run(engine: Engine, request: ABRequest, folder: Path) -> ABPlan:
    """The request validated in full, writing to ``folder``; InvalidInput names the field.
    Loads the models it names (through the engine's cache) and builds its reward models."""
    data = request.model_dump()
    if "batch_size" not in request.model_fields_set:  # a default must not make the request invalid
        data["batch_size"] = min(data["batch_size"], engine.limits.max_num_images)
    if "steps" not in request.model_fields_set:
        data["steps"] = min(data["steps"], engine.limits.max_steps)
    prompts = data["prompts"]
    if isinstance(prompts, str) and not prompts.strip().startswith("pg:"):
        raise InvalidInput(
            "prompts", "send pg:all, pg:CATEGORY[,...] or a list of prompts; the server reads no files for a request"
        )
    data["model"] = engine.resolve_model(data["model"])
    check_image_count(engine, len(data["arms"]), data["seeds"], "seeds")  # before reading prompts: at least one
    config = ABConfig.parse({**data, "output_dir": str(folder)})
    try:
        plan = prepare_ab(
            config, model_loader=lambda spec: engine.get_model(engine.resolve_model(spec)), rewards=engine.rewards
        )
        check_limits(engine, plan)
    except InvalidInput as e:  # a generation's field names, as an A/B request names them
        raise InvalidInput(LIMIT_FIELDS.get(e.field, e.field), e.reason) from None
    except ModelUnavailable as e:
        raise ServiceError(503, str(e), field="model", code="model_unavailable") from None
    return plan


def check_image_count(engine: Engine, arms: int, per_arm: int, what: str) -> None:
    cap = engine.settings.ab_max_images
    if arms * per_arm > cap:
        raise InvalidInput(
            "seeds",
            f"{arms} arms x {per_arm} {what} = {arms * per_arm} images is more than this "
            f"server's {cap} per run (ab_max_images)",
        )


def check_limits(engine: Engine, plan: ABPlan) -> None:
    """Every batch of the run within what a /generate request to its arm's model may ask: the server's limits
    tightened by the model's maximum size, and its cost (``Engine.check``, as /generate), before anything runs."""
    config, items = plan.config, plan.items
    check_image_count(engine, len(plan.arms), len(items), "(prompt, seed) items")
    longest = max((item.prompt for item in items), key=len)
    for arm in plan.arms:
        batch = GenerationParams(
            prompt=longest,
            steps=config.steps,
            num_images=config.batch_size,
            width=arm.width,
            height=arm.height,
            scheduler=config.scheduler,
            policy=arm.config.policy,
        )
        batch.check_limits(engine.limits)
        largest = batch.model_copy(update={"num_images": min(config.batch_size, len(items))})  # what runs at once
        engine.check(arm.model, largest)


# ----------------------------------------------------------------------------- the run


@dataclass
class ABOutcome:
    """A finished run, as its job reports it."""

    job_id: str
    results: dict[str, Any]

    def response(self) -> dict[str, Any]:
        return public_results(self.results, self.job_id)

    def summary(self) -> dict[str, Any]:
        files = self.response()["files"]
        return {"report": files["report"], "results": files["results"], **self.results["run"]}

    def final_progress(self) -> dict[str, Any]:
        return {}


def public_results(results: dict[str, Any], job_id: str) -> dict[str, Any]:
    """results.json as a client sees it: the job's URLs instead of the server's folder."""
    base = f"/ab/{job_id}/"
    config = {**results["config"], "output_dir": base}
    files = {
        "report": base + "report.html" if config.get("report") else None,
        "results": base + "results.json",
        "base": base,
    }
    return {**results, "config": config, "files": files}


def initial_progress(plan: ABPlan) -> dict[str, Any]:
    return dataclasses.asdict(ABProgress("queued", 0, len(plan.arms) * len(plan.items)))


def run_job(engine: Engine, plan: ABPlan, job_id: str, ticket: Ticket) -> ABOutcome:
    """The run, on an A/B queue thread (queued by :meth:`Engine.submit_ab`); every batch checked by
    :meth:`Engine.check` and run by :meth:`Engine.sample` (module docstring)."""
    last_step_event = 0.0

    def progress(event: ABProgress) -> None:
        nonlocal last_step_event
        if event.step is not None:  # per-step events are many: keep a few per second
            now = time.monotonic()
            if now - last_step_event < STEP_EVENT_INTERVAL_S:
                return
            last_step_event = now
        ticket.emit("progress", dataclasses.asdict(event))

    def generate_batch(
        model: DiffusionModel,
        params: GenerationParams | dict[str, Any],
        *,
        callback: StepCallback | None = None,
        limits: Limits | None = None,
    ) -> GenerationResult:
        # the server's limits apply (Engine.check; plan_run checked the run against them up front), not the runner's
        return engine.sample(
            model, engine.check(model, params), callback=callback, stopped=lambda: ticket.stop_reason is not None
        )

    try:
        results = run_ab(
            plan, progress=progress, cancel=lambda: ticket.stop_reason is not None, generate_fn=generate_batch
        )
    finally:
        if not (plan.output_dir / OWNER_FILE).exists():  # deleted while the run wrote its last files
            shutil.rmtree(plan.output_dir, ignore_errors=True)
    return ABOutcome(job_id, results)


# ----------------------------------------------------------------------------- files


def write_owner(folder: Path, owner: str | None) -> None:
    folder.mkdir(parents=True)
    (folder / OWNER_FILE).write_text(json.dumps({"owner": owner, "created_at": time.time()}), encoding="utf-8")


def owned_folder(root: Path, job_id: str, owner: str | None) -> Path:
    """The run's folder if ``owner`` created it; else 404 (another key's run is not found, like a job)."""
    if not JOB_ID.match(job_id):
        raise not_found(f"A/B run {job_id!r}")
    folder = root / job_id
    try:
        record = json.loads((folder / OWNER_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        raise not_found(f"A/B run {job_id!r}") from None
    if not isinstance(record, dict) or record.get("owner") != owner:
        raise not_found(f"A/B run {job_id!r}")
    return folder


def served_file(folder: Path, path: str) -> Path:
    """A file of the run that may be served; 404 for anything else (other files, ``..``, links out of it)."""
    parts = path.split("/")
    if not SERVED.match(path) or any(part in ("", ".", "..") for part in parts):
        raise not_found(f"file {path!r} in this A/B run", field="path")
    resolved = (folder / path).resolve()
    if not resolved.is_relative_to(folder.resolve()) or not resolved.is_file():
        raise not_found(f"file {path!r} in this A/B run", field="path")
    return resolved


def delete_folder(folder: Path) -> None:
    shutil.rmtree(folder, ignore_errors=True)
