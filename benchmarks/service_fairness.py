"""Fairness of the HTTP service under heavy requests, against a baseline server, in one run.

For each server (this checkout, and with ``--baseline-root`` another checkout of the code, e.g. ``main``
exported with ``git archive main | tar -x -C /tmp/diffsteer-main``), on the same model:

1. ``alone``: the latency of a light request (``--light-steps`` steps at the native size, one image) with
   nothing else running (median of ``--repeats``, measured before and after the heavy phases);
2. ``with_reno``: the same light request while a ReNO job runs (``POST /jobs``; ``--reno-iterations``
   iterations of ``--reno-steps`` steps), then the ReNO job is deleted, and the latency of a light request
   sent right after the DELETE (``after_cancel``: the worker must be free within about one UNet call);
3. ``with_large``: the same while a job at ``--large-factor``× the native width and height runs
   (``--large-steps`` steps), then deleted the same way;
4. ``throughput``: images/s with ``--clients`` clients sending 20-step requests back to back (as
   ``service_load.py``), bounded by ``--requests`` and ``--seconds``.

Light requests that wait longer than ``--light-timeout`` are recorded as that bound (a lower bound of their
latency). Prints JSON, and a BENCHMARKS.md table with the ratios to ``alone`` and candidate/baseline.

    python benchmarks/service_fairness.py --baseline-root /tmp/diffsteer-main
    python benchmarks/service_fairness.py --model builtin:tiny --repeats 2 --seconds 10     # a smoke run
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.service_load import Server, drive  # noqa: E402

PROMPT = "a red circle to the left of a blue square"


def light_latency(url: str, body: dict, timeout: float) -> float:
    t0 = time.perf_counter()
    try:
        r = httpx.post(f"{url}/generate", json=body, timeout=timeout)
        r.raise_for_status()
    except httpx.TimeoutException:
        return timeout
    return time.perf_counter() - t0


def median_latency(url: str, body: dict, repeats: int, timeout: float) -> float:
    return statistics.median(light_latency(url, {**body, "seed": k}, timeout) for k in range(repeats))


def wait_running(url: str, job_id: str, timeout: float = 600.0) -> dict:
    """Until the job has made progress (a step event), so it holds the device."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        status = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()
        if status["status"] in ("succeeded", "failed", "cancelled"):
            raise RuntimeError(f"heavy job ended before the measurement: {status}")
        if status["progress"]["step"] >= 1:
            return status
        time.sleep(0.2)
    raise RuntimeError("heavy job did not start")


def with_heavy_job(url: str, heavy: dict, light: dict, args) -> dict:
    r = httpx.post(f"{url}/jobs", json=heavy, timeout=60)
    if r.status_code != 202:
        return {"refused": r.status_code, "error": r.json().get("error")}
    job_id = r.json()["id"]
    wait_running(url, job_id)
    latency = median_latency(url, light, args.repeats, args.light_timeout)
    progress = httpx.get(f"{url}/jobs/{job_id}", timeout=30).json()["progress"]
    httpx.delete(f"{url}/jobs/{job_id}", timeout=30)
    after_cancel = light_latency(url, {**light, "seed": 999}, args.light_timeout)
    return {"light_latency_s": round(latency, 3), "after_cancel_s": round(after_cancel, 3), "heavy_progress": progress}


def run_server(args, root: Path, label: str) -> dict:
    server = Server(
        argparse.Namespace(**{**vars(args), "clients": [args.clients]}),
        batching=True,
        root=root,
        env_overrides={"DIFFSTEER_REQUEST_TIMEOUT_S": "900"},
    )
    light = {"prompt": PROMPT, "steps": args.light_steps, "policy": "cfg:scale=3", "scheduler": "euler"}
    reno = {
        "prompt": PROMPT,
        "steps": args.reno_steps,
        "scheduler": "euler",
        "policy": {"name": "reno", "reward": args.reno_reward, "iterations": args.reno_iterations},
    }
    size = None
    try:
        server.wait_ready(args.ready_timeout)
        models = httpx.get(f"{server.url}/models", timeout=30).json()
        size = next((m.get("native_size") for m in models["models"] if m.get("default")), None) or 64
        large = {
            "prompt": PROMPT,
            "steps": args.large_steps,
            "policy": "cfg:scale=3",
            "scheduler": "euler",
            "width": size * args.large_factor,
            "height": size * args.large_factor,
            "num_images": args.large_images,
        }
        phases = set(args.phases.split(","))
        for _ in range(2):  # warm-up
            httpx.post(f"{server.url}/generate", json=light, timeout=600).raise_for_status()
        result: dict = {"server": label, "root": str(root), "native_size": size}
        alone_before = median_latency(server.url, light, args.repeats, args.light_timeout)
        if "reno" in phases:
            result["with_reno"] = with_heavy_job(server.url, reno, light, args)
        if "large" in phases:
            result["with_large"] = with_heavy_job(server.url, large, light, args)
        alone_after = median_latency(server.url, light, args.repeats, args.light_timeout)
        alone = statistics.fmean([alone_before, alone_after])
        result["alone_s"] = {"before": round(alone_before, 3), "after": round(alone_after, 3)}
        for phase in ("with_reno", "with_large"):
            if "light_latency_s" in result.get(phase, {}):
                result[phase]["ratio_to_alone"] = round(result[phase]["light_latency_s"] / alone, 2)
        throughput_body = {"prompt": PROMPT, "steps": 20, "policy": "cfg:scale=3", "scheduler": "euler"}
        if "throughput" in phases:
            result["throughput"] = drive(server.url, throughput_body, args.clients, args.requests, args.seconds)
        print(json.dumps(result), file=sys.stderr)
        return result
    finally:
        server.stop()


def interleaved_throughput(args) -> dict:
    """Both servers up at once (an idle one costs no CPU), throughput runs alternating between them."""
    roots = [(ROOT, "this checkout"), (args.baseline_root.resolve(), "baseline")]
    body = {"prompt": PROMPT, "steps": 20, "policy": "cfg:scale=3", "scheduler": "euler"}
    servers = {
        label: Server(argparse.Namespace(**{**vars(args), "clients": [args.clients]}), batching=True, root=root)
        for root, label in roots
    }
    runs: dict[str, list[float]] = {label: [] for _, label in roots}
    try:
        for server in servers.values():
            server.wait_ready(args.ready_timeout)
            for _ in range(2):
                httpx.post(f"{server.url}/generate", json=body, timeout=600).raise_for_status()
        for k in range(args.throughput_rounds):
            for label, server in servers.items() if k % 2 == 0 else reversed(servers.items()):
                row = drive(server.url, body, args.clients, args.requests, args.seconds)
                runs[label].append(row["throughput_images_per_s"])
                print(json.dumps({"round": k, "server": label, **row}), file=sys.stderr)
    finally:
        for server in servers.values():
            server.stop()
    mine, base = (statistics.median(runs[label]) for _, label in roots)
    return {
        "benchmark": "service_fairness throughput",
        "clients": args.clients,
        "images_per_s": runs,
        "median_ratio_candidate_over_baseline": round(mine / base, 3),
    }


def markdown_table(results: list[dict]) -> str:
    lines = [
        "| server | light alone s | with ReNO s (× alone) | after ReNO cancel s | with large s (× alone) | "
        "after large cancel s | images/s at N clients |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in results:

        def cell(phase: str, key: str, r: dict = r) -> str:
            p = r.get(phase)
            if p is None:
                return "—"
            if "refused" in p:
                return f"refused {p['refused']}"
            return f"{p[key]}" + (f" ({p['ratio_to_alone']}×)" if key == "light_latency_s" else "")

        alone = r["alone_s"]
        lines.append(
            f"| {r['server']} | {alone['before']} / {alone['after']} | {cell('with_reno', 'light_latency_s')} | "
            f"{cell('with_reno', 'after_cancel_s')} | {cell('with_large', 'light_latency_s')} | "
            f"{cell('with_large', 'after_cancel_s')} | {r.get('throughput', {}).get('throughput_images_per_s', '—')} |"
        )
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--baseline-root", type=Path, default=None, help="another checkout to compare with")
    ap.add_argument("--baseline-first", action="store_true", help="run the baseline server first (to alternate runs)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--light-steps", type=int, default=10)
    ap.add_argument("--light-timeout", type=float, default=60.0)
    ap.add_argument("--reno-steps", type=int, default=4)
    ap.add_argument("--reno-iterations", type=int, default=500)
    ap.add_argument("--reno-reward", default="clip:1")
    ap.add_argument("--large-factor", type=int, default=4, help="width and height = this × the native size")
    ap.add_argument("--large-steps", type=int, default=100)
    ap.add_argument("--large-images", type=int, default=1, help="images in the large job (batched: one unit before)")
    ap.add_argument(
        "--phases", default="reno,large,throughput", help="which of reno, large, throughput to run (comma-separated)"
    )
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    ap.add_argument(
        "--throughput-rounds",
        type=int,
        default=0,
        help="instead of the phases: start both servers and alternate throughput runs this many rounds",
    )
    args = ap.parse_args()
    if args.throughput_rounds:
        report = interleaved_throughput(args)
        print(json.dumps(report, indent=2))
        return

    roots = [(ROOT, "this checkout")] + ([(args.baseline_root.resolve(), "baseline")] if args.baseline_root else [])
    order = roots[::-1] if args.baseline_first else roots
    by_label = {label: run_server(args, root, label) for root, label in order}
    results = [by_label[label] for _, label in roots]
    report: dict = {
        "benchmark": "service_fairness",
        "model": args.model,
        "args": {k: str(v) for k, v in vars(args).items()},
        "results": results,
    }
    if len(results) == 2 and all("throughput" in r for r in results):
        a, b = (r["throughput"]["throughput_images_per_s"] for r in results)
        report["throughput_ratio_candidate_over_baseline"] = round(a / b, 3) if a and b else None
    print(json.dumps(report, indent=2))
    print(markdown_table(results), file=sys.stderr)


if __name__ == "__main__":
    main()
