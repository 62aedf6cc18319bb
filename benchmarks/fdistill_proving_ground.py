"""f-distill acceptance figures on the proving ground: one-step (or k-step) students against their teacher.

Every arm generates the same held-out items (``pg:`` prompts x seeds: held-out meanings, held-out instance
seeds, the same initial noise per item) and the exact verifier scores them; comparisons are paired differences
of the verifier's pass with 95% prompt-bootstrap CIs (``diffsteer.evaluation.stats.compare``, as ``diffsteer ab``).

1. **Student vs teacher.** The student (``--student``: an exported pipeline folder, sampled with its own
   scheduler at the steps its ``diffsteer.json`` recommends, 1 for the UNet student, no guidance: one backbone
   evaluation per step) against the teacher (``--teacher``, default ``builtin:proving-ground``) at 1, 4 and 30
   steps (DDIM on a UNet teacher, the model's own flow-matching Euler scheduler on a flow teacher) under
   ``--teacher-policy`` (``cfg:scale=1.5``: 2 evaluations per step; BENCHMARKS.md, section Guidance policies on
   the proving ground). Bars: student > teacher@4 and student >= teacher@30 - 10 points, at >= 10x fewer NFE.
2. **Divergences at equal steps** (``--students js=DIR,reverse_kl=DIR,forward_kl=DIR``, students trained with
   the same config and number of steps but the divergence; differences against the first listed): pass rate,
   and a diversity figure from what the verifier reads: per prompt, the standard deviation over seeds of the
   detected objects' mean centroid (x and y, fractions of the image) and of their mean area (fraction of the
   image), averaged over prompts with at least two seeds that found an object. The paper's claim: JS and
   forward KL cover modes better (more spread) than reverse KL.
3. **ReNO** (``--reno-iterations N``, reward ``clip:1``, CFG off inside) on the student at 1 step against ReNO
   on the teacher at 4 steps: seconds per image and verifier pass, the two interleaved batch by batch.

    python benchmarks/fdistill_proving_ground.py --student runs/fdistill-proving-ground/pipeline \\
        --out bench-fdistill --threads 1
    # the flow form: distil the flow proving-ground model (or any SD3/FLUX-family --teacher) into a 4-step
    # student with the config's settings, then the figures above against it
    python benchmarks/fdistill_proving_ground.py --teacher builtin:proving-ground-flow \\
        --train training/configs/fdistill-proving-ground-flow.yaml --out bench-fdistill-flow --threads 2
    # a smoke test
    python benchmarks/fdistill_proving_ground.py --student runs/fdistill-proving-ground/pipeline --out /tmp/fd \\
        --categories single --prompts-per-category 2 --seeds 2 --teacher-steps 1,4 --reno-iterations 2 --bootstrap 200
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ci_text  # noqa: E402

TEACHER = "builtin:proving-ground"


def train_student(config_file: str, teacher: str, out: Path, overrides: list[str]) -> tuple[str, dict[str, Any]]:
    """Distil ``teacher`` with the f-distill config ``config_file`` (``model`` set to the teacher, the run in
    ``out/student``); returns the exported pipeline folder and the run's summary (training seconds added)."""
    from diffsteer.training.config_io import load_config
    from diffsteer.training.fdistill import FDistillConfig, FDistillTrainer

    sets = [f"model={teacher}", f"output_dir={out / 'student'}", "export=pipeline", *overrides]
    config = load_config(FDistillConfig, Path(config_file), sets)
    t0 = time.perf_counter()
    trainer = FDistillTrainer(config)
    try:
        summary = trainer.train(resume=(out / "student" / "checkpoints").is_dir())
    finally:
        trainer.close()
    summary["train_s"] = time.perf_counter() - t0
    return summary["pipeline"], summary


def parse_students(text: str) -> dict[str, str]:
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, eq, path = part.partition("=")
        if not eq:
            raise SystemExit(f"--students: expected NAME=DIR, got {part!r}")
        out[name.strip()] = path.strip()
    return out


def run(model, items, policy, steps, scheduler, batch_size) -> tuple[list[Any], float]:
    from diffsteer.evaluation.runner import run_arm

    t0 = time.perf_counter()
    records = run_arm(model, items, policy, steps=steps, scheduler=scheduler, batch_size=batch_size)
    return records, time.perf_counter() - t0


def verifier_rows(records) -> list[dict[str, Any]]:
    from diffsteer.evaluation.metrics import MetricScorer

    return MetricScorer(["verifier"]).score(
        [r.image for r in records], [r.item.prompt for r in records], [r.item.meta.spec for r in records]
    )


def diversity(records) -> dict[str, float]:
    """Mean over prompts of the per-prompt std over seeds of the detected objects' centroid and area."""
    from diffsteer.proving_ground.verifier import detect_objects

    by_prompt: dict[str, list[tuple[float, float, float]]] = {}
    for r in records:
        objects = detect_objects(r.image)
        if not objects:
            continue
        h, w = r.image.shape[:2]
        cx = float(np.mean([o.centroid01[0] for o in objects]))
        cy = float(np.mean([o.centroid01[1] for o in objects]))
        area = float(np.mean([o.area for o in objects])) / (h * w)
        by_prompt.setdefault(r.item.prompt_id, []).append((cx, cy, area))
    spreads = np.array([np.std(np.array(v), axis=0) for v in by_prompt.values() if len(v) >= 2])
    if not len(spreads):
        return {"x_std": float("nan"), "y_std": float("nan"), "area_std": float("nan"), "prompts": 0}
    return {
        "x_std": float(spreads[:, 0].mean()),
        "y_std": float(spreads[:, 1].mean()),
        "area_std": float(spreads[:, 2].mean()),
        "prompts": int(len(spreads)),
    }


def paired(passes: dict[str, list[float]], prompt_ids: list[str], baseline: str, n_resamples: int) -> dict[str, Any]:
    from diffsteer.evaluation.stats import compare

    values = {arm: {"verifier.passed": np.asarray(v, dtype=float)} for arm, v in passes.items()}
    pairs = compare(values, prompt_ids, baseline=baseline, n_resamples=n_resamples)
    return {p.arm_b: dataclasses.asdict(p.metrics["verifier.passed"]) for p in pairs}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--student", default=None, help="the student's pipeline folder (or --train)")
    ap.add_argument("--teacher", "--model", default=TEACHER, help="the teacher model (builtin:..., a folder)")
    ap.add_argument(
        "--train",
        default=None,
        help="an f-distill config file: distil --teacher with it first (resuming a run left in OUT/student), "
        "and measure that student",
    )
    ap.add_argument("--set", action="append", default=[], help="KEY=VALUE overrides of the --train config")
    ap.add_argument("--students", default="", help="NAME=DIR,... students of other divergences (section 2)")
    ap.add_argument("--out", required=True)
    ap.add_argument("--categories", default="all")
    ap.add_argument("--prompts-per-category", type=int, default=6)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument(
        "--suite-seed",
        type=int,
        default=0,
        help="held-out suite draw: 0 (the items of BENCHMARKS.md, whose prompts the trainers' own "
        "evaluation also uses) or another (fresh instances no recipe choice saw)",
    )
    ap.add_argument("--teacher-policy", default="cfg:scale=1.5")
    ap.add_argument("--teacher-steps", default="1,4,30")
    ap.add_argument("--reno-iterations", type=int, default=0, help="0 skips section 3")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--bootstrap", type=int, default=10_000)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args(argv)
    if (args.student is None) == (args.train is None):
        ap.error("give one of --student DIR and --train CONFIG")
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffsteer.evaluation.prompts import load_prompts
    from diffsteer.guidance.models import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    items = load_prompts(
        f"pg:{args.categories}", seeds=args.seeds, seed=args.suite_seed, max_prompts=args.prompts_per_category
    ).items
    prompt_ids = [i.prompt_id for i in items]
    report: dict[str, Any] = {"teacher": args.teacher}
    if args.train:
        args.student, report["training"] = train_student(args.train, args.teacher, out, args.set)
    teacher = load_model(args.teacher, device="cpu")
    teacher_scheduler = "default" if teacher.family.schedule == "flow" else "ddim"
    students = {"student": args.student, **parse_students(args.students)}
    models = {name: load_model(path, device="cpu") for name, path in students.items()}
    student_steps = {name: model.defaults.steps or 1 for name, model in models.items()}
    report.update({"items": len(items), "prompts": len(set(prompt_ids)), "student_steps": student_steps})

    passes: dict[str, list[float]] = {}
    summary: dict[str, dict[str, Any]] = {}
    arms = [(name, model, "cfg:scale=1", student_steps[name], "default") for name, model in models.items()]
    arms += [
        (f"teacher@{k}", teacher, args.teacher_policy, int(k), teacher_scheduler) for k in args.teacher_steps.split(",")
    ]
    for name, model, policy, steps, scheduler in arms:
        records, seconds = run(model, items, policy, steps, scheduler, args.batch_size)
        rows = verifier_rows(records)
        passes[name] = [float(r["verifier.passed"]) for r in rows]
        summary[name] = {
            "pass": float(np.mean(passes[name])),
            "nfe_per_image": float(np.mean([r.nfe for r in records])),
            "s_per_image": seconds / len(records),
            "diversity": diversity(records),
        }
        print(
            f"{name}: pass {summary[name]['pass']:.3f}, NFE {summary[name]['nfe_per_image']:.0f}, "
            f"{summary[name]['s_per_image']:.3f} s/image, diversity {summary[name]['diversity']}",
            flush=True,
        )
    report["arms"] = summary
    report["student_vs"] = paired(
        {"student": passes["student"], **{k: v for k, v in passes.items() if k.startswith("teacher@")}},
        prompt_ids,
        "student",
        args.bootstrap,
    )
    for arm, m in report["student_vs"].items():
        print(f"{arm} - student: {ci_text(m)}")
    compared = list(students)[1:]  # the --students, in their order
    if len(compared) > 1:  # the divergences at equal steps, against the first one listed
        report["divergences"] = paired({k: passes[k] for k in compared}, prompt_ids, compared[0], args.bootstrap)
        for arm, m in report["divergences"].items():
            print(f"{arm} - {compared[0]}: {ci_text(m)}")

    if args.reno_iterations:
        reno = {"name": "reno", "scale": 1, "reward": "clip:1", "iterations": args.reno_iterations}
        student_arm = f"reno-student@{student_steps['student']}"
        reno_arms = {
            student_arm: (models["student"], student_steps["student"], "default"),
            "reno-teacher@4": (teacher, 4, teacher_scheduler),
        }
        reno_records: dict[str, list[Any]] = {k: [] for k in reno_arms}
        reno_seconds = dict.fromkeys(reno_arms, 0.0)
        for start in range(0, len(items), args.batch_size):  # interleaved batch by batch
            chunk = items[start : start + args.batch_size]
            for name, (model, steps, scheduler) in reno_arms.items():
                records, seconds = run(model, chunk, reno, steps, scheduler, args.batch_size)
                reno_records[name] += records
                reno_seconds[name] += seconds
        reno_passes = {k: [float(r["verifier.passed"]) for r in verifier_rows(v)] for k, v in reno_records.items()}
        report["reno"] = {
            k: {"pass": float(np.mean(v)), "s_per_image": reno_seconds[k] / len(items)} for k, v in reno_passes.items()
        }
        report["reno"]["ratio_s_per_image_teacher_over_student"] = (
            reno_seconds["reno-teacher@4"] / reno_seconds[student_arm]
        )
        report["reno_vs"] = paired(reno_passes, prompt_ids, student_arm, args.bootstrap)
        print(json.dumps(report["reno"], indent=1))
        for arm, m in report["reno_vs"].items():
            print(f"{arm} - {student_arm}: {ci_text(m)}")
    (out / "results.json").write_text(json.dumps(report, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
