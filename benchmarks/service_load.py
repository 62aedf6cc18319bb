"""Load on the HTTP service: throughput and latency at 1, 4 and 8 concurrent clients, batching on and off.

For each mode a real server is started (``python -m diffsteer.service.cli serve`` in a subprocess, loopback port) with
its default scheduling for that mode (batching on: up to 8 sampler loops sharing UNet calls; off: one
generation at a time), warmed up, then driven by N client threads that each send requests back to back,
until ``--requests`` answers per client count or ``--seconds`` per client count, whichever comes first.
Reports throughput (images/s), p50/p99 latency, the server's RSS before and after, rows per UNet call (from
/metrics), and the ratio batched/unbatched throughput at the highest client count, all from one run; JSON.

    python benchmarks/service_load.py                                  # the default (proving-ground) model, CPU
    python benchmarks/service_load.py --model builtin:tiny --requests 8 --seconds 20   # a short smoke run
    python benchmarks/service_load.py --model sd15-random --device cuda --dtype fp16 --steps 20 --requests 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.common import proc_memory_bytes  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_bytes(pid: int) -> int | None:
    rss = proc_memory_bytes(pid).get("VmRSS")
    if rss is not None:
        return rss
    try:
        import psutil
    except ImportError:
        return None
    try:
        return psutil.Process(pid).memory_info().rss
    except psutil.Error:
        return None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def metric_sum(text: str, name: str) -> float:
    total = 0.0
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):
            total += float(line.rsplit(" ", 1)[1])
    return total


PACKAGES = ("guidance", "rewards", "training", "service", "proving_ground", "evaluation")


def namespace_root(root: Path) -> Path:
    """A folder from which ``import diffsteer.<package>`` finds the code at ``root``: the checkout's top-level folders
    linked under ``diffsteer/`` (they install under that namespace), ahead of any installed copy on the path."""
    shim = Path(tempfile.mkdtemp(prefix="diffsteer-root-"))
    (shim / "diffsteer").mkdir()
    for package in PACKAGES:
        if (root / package).is_dir():
            (shim / "diffsteer" / package).symlink_to((root / package).resolve())
    return shim


class Server:
    """``diffsteer serve`` in a subprocess from the code at ``root`` (default: this checkout)."""

    def __init__(self, args, batching: bool, root: Path = ROOT, env_overrides: dict[str, str] | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {
            **os.environ,
            "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
            "DIFFSTEER_BATCHING": "true" if batching else "false",
            "DIFFSTEER_QUEUE_SIZE": str(max(args.clients) * 2),
            "DIFFSTEER_MAX_BATCH_REQUESTS": str(max(args.clients)),
            "DIFFSTEER_MAX_BATCH_ROWS": str(max(16, 2 * max(args.clients))),  # room for every client's cfg pair
            "DIFFSTEER_REQUEST_TIMEOUT_S": "600",
            "DIFFSTEER_LOG_LEVEL": "warning",
            "DIFFSTEER_MAX_WIDTH": "4096",
            "DIFFSTEER_MAX_HEIGHT": "4096",
        }
        if args.device:
            env["DIFFSTEER_DEVICE"] = args.device
        if args.dtype:
            env["DIFFSTEER_DTYPE"] = args.dtype
        if args.threads:
            env["DIFFSTEER_TORCH_THREADS"] = str(args.threads)
        env.update(env_overrides or {})
        env["PYTHONPATH"] = str(namespace_root(root))
        cmd = [sys.executable, "-m", "diffsteer.service.cli", "serve", "--port", str(self.port), "--model", args.model]
        self.proc = subprocess.Popen(
            cmd, cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
        )

    def wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited: {self.proc.stderr.read()[-2000:]}")
            try:
                if httpx.get(f"{self.url}/readyz", timeout=5).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        raise RuntimeError("server not ready in time")

    def stop(self) -> None:
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def drive(url: str, body: dict, clients: int, max_requests: int, max_seconds: float) -> dict:
    """``clients`` threads sending requests back to back; stops at ``max_requests`` answers or ``max_seconds``."""
    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()
    issued = [0]
    deadline = time.monotonic() + max_seconds

    def worker(index: int) -> None:
        with httpx.Client(timeout=600) as client:
            while True:
                with lock:
                    if issued[0] >= max_requests or time.monotonic() > deadline:
                        return
                    issued[0] += 1
                    seed = issued[0]
                t0 = time.perf_counter()
                r = client.post(f"{url}/generate", json={**body, "seed": seed})
                elapsed = time.perf_counter() - t0
                with lock:
                    statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                    if r.status_code == 200:
                        latencies.append(elapsed)

    start = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    images = len(latencies) * body.get("num_images", 1)
    return {
        "clients": clients,
        "completed": len(latencies),
        "statuses": statuses,
        "wall_s": round(wall, 3),
        "throughput_images_per_s": round(images / wall, 4) if wall > 0 else None,
        "latency_p50_s": round(percentile(latencies, 0.5), 4) if latencies else None,
        "latency_p99_s": round(percentile(latencies, 0.99), 4) if latencies else None,
        "latency_mean_s": round(statistics.fmean(latencies), 4) if latencies else None,
    }


def run_mode(args, batching: bool, body: dict) -> dict:
    server = Server(args, batching)
    try:
        server.wait_ready(args.ready_timeout)
        return measure_server(server, args, batching, body)
    finally:
        server.stop()


def measure_server(server: Server, args, batching: bool, body: dict) -> dict:
    """Warm a ready server up, then drive it at each of ``args.clients``."""
    for _ in range(2):  # warm-up: first-call costs (kernels, allocator) stay out of the numbers
        httpx.post(f"{server.url}/generate", json=body, timeout=600).raise_for_status()
    rss_before = rss_bytes(server.proc.pid)
    rows = []
    for clients in args.clients:
        metrics_before = httpx.get(f"{server.url}/metrics", timeout=30).text
        row = drive(server.url, body, clients, args.requests, args.seconds)
        metrics_after = httpx.get(f"{server.url}/metrics", timeout=30).text
        calls = metric_sum(metrics_after, "diffsteer_unet_batch_rows_count") - metric_sum(
            metrics_before, "diffsteer_unet_batch_rows_count"
        )
        rows_total = metric_sum(metrics_after, "diffsteer_unet_batch_rows_sum") - metric_sum(
            metrics_before, "diffsteer_unet_batch_rows_sum"
        )
        row["unet_calls"] = int(calls)
        row["rows_per_unet_call"] = round(rows_total / calls, 3) if calls else None
        rows.append(row)
        print(json.dumps({"batching": batching, **row}), file=sys.stderr)
    rss_after = rss_bytes(server.proc.pid)
    return {"batching": batching, "rss_before_bytes": rss_before, "rss_after_bytes": rss_after, "runs": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        default="default",
        help="model spec (default: the shipped proving-ground model); sd15-random: the SD-1.5 "
        "architecture with random weights, written to a temporary folder first",
    )
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default=None)
    ap.add_argument("--threads", type=int, default=None, help="torch threads in the server")
    ap.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8])
    ap.add_argument("--requests", type=int, default=24, help="answers per client count (bound)")
    ap.add_argument("--seconds", type=float, default=60.0, help="time per client count (bound)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--size", type=int, default=None, help="width = height (default: the model's native size)")
    ap.add_argument("--policy", default="cfg:scale=3")
    ap.add_argument("--scheduler", default="euler")
    ap.add_argument("--modes", default="on,off", help="batching modes to run: on, off or on,off")
    ap.add_argument("--ready-timeout", type=float, default=900.0)
    args = ap.parse_args()

    random_model_dir = None
    if args.model == "sd15-random":
        from benchmarks.common import save_sd15_random

        random_model_dir = args.model = save_sd15_random(tempfile.mkdtemp(prefix="sd15-random-"))
    try:
        report = run_benchmark(args)
    finally:
        if random_model_dir:
            shutil.rmtree(random_model_dir, ignore_errors=True)
    print(json.dumps(report, indent=2))
    print(markdown_table(report["results"]), file=sys.stderr)


def run_benchmark(args) -> dict:
    body = {
        "prompt": "a red circle to the left of a blue square",
        "steps": args.steps,
        "policy": args.policy,
        "scheduler": args.scheduler,
    }
    if args.size:
        body.update(width=args.size, height=args.size)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = run_mode(args, mode.strip() == "on", body)
    report: dict = {
        "benchmark": "service_load",
        "model": args.model,
        "device": args.device or "auto",
        "request": body,
        "bounds": {"requests_per_client_count": args.requests, "seconds_per_client_count": args.seconds},
        "python": platform.python_version(),
        "cpus": os.cpu_count(),
        "results": results,
    }
    if "on" in results and "off" in results:
        top = max(args.clients)
        on = next(r for r in results["on"]["runs"] if r["clients"] == top)
        off = next(r for r in results["off"]["runs"] if r["clients"] == top)
        if on["throughput_images_per_s"] and off["throughput_images_per_s"]:
            report[f"ratio_batched_over_unbatched_throughput_at_{top}_clients"] = round(
                on["throughput_images_per_s"] / off["throughput_images_per_s"], 3
            )
    return report


def markdown_table(results: dict) -> str:
    """The runs as a BENCHMARKS.md table: one row per (batching mode, clients), ratios against batching off."""
    off = {r["clients"]: r for r in results.get("off", {}).get("runs", [])}
    lines = [
        "| batching | clients | images/s | × off | p50 s | p99 s | rows/UNet call | RSS before → after MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for mode, result in results.items():
        mb = [round(b / 2**20) if b else "?" for b in (result["rss_before_bytes"], result["rss_after_bytes"])]
        for r in result["runs"]:
            base = off.get(r["clients"], {}).get("throughput_images_per_s")
            ratio = f"{r['throughput_images_per_s'] / base:.2f}" if base and r["throughput_images_per_s"] else "—"
            lines.append(
                f"| {mode} | {r['clients']} | {r['throughput_images_per_s']} | {ratio} | {r['latency_p50_s']} | "
                f"{r['latency_p99_s']} | {r['rows_per_unet_call']} | {mb[0]} → {mb[1]} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
