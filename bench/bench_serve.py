"""Does watching a run through the job service slow it? Training tokens/s with no clients against the same job
with N clients polling status and metrics and one following the event stream, and the API's latency.

    python bench/bench_serve.py [--clients 20] [--interval 1.0] [--rounds 2] [--steps 150] [--dashboard]

One `python -m exp.serve` on a free 127.0.0.1 port; each round starts the same job through it twice, once
unwatched and once watched (order alternating), and reads the steady-state tokens/s from its summary.json.
Each polling client asks for /status and /metrics, then waits `--interval` seconds (a dashboard's refresh).
With --dashboard each client asks what one open dashboard page asks while it shows the job: its own event
stream, the jobs list every 2 s, the job's status, checkpoints, log and evaluations every 3 s, the sweeps every 5 s.
"""

from __future__ import annotations

import argparse
import json
import os
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
JOB = [
    "model=gpt_tiny",
    "hardware=cpu",
    "tracking=none",
    "checkpoint.every_n_steps=0",
    "stage.log_every_n_steps=10",
    "stage.eval_every_n_steps=50",
    "sample.max_new_tokens=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_service(runs_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "exp.serve", "--port", str(port), "--runs-dir", str(runs_dir)], cwd=ROOT, env=env
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            if httpx.get(url + "/api/health").status_code == 200:
                return proc, url
        except httpx.HTTPError:
            time.sleep(0.1)
    raise SystemExit("the service did not start")


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# what an open dashboard page asks, and how often (exp/serve/static/app.js: setInterval and the job's refresh)
PAGE = (
    (2.0, ("/api/training/jobs",)),
    (3.0, ("/{job}/status", "/{job}/checkpoints", "/{job}/logs?tail_bytes=6000", "/{job}/evaluations")),
    (5.0, ("/api/training/sweeps",)),
)


def follow(url: str, job: str, done: threading.Event) -> None:
    """Read the job's event stream until its end (or `done`)."""
    with httpx.Client(base_url=url, timeout=None) as client:
        with client.stream("GET", f"/api/training/jobs/{job}/metrics/stream") as r:
            for line in r.iter_lines():
                if line.startswith("event: end") or done.is_set():
                    return


def page(url: str, job: str, done: threading.Event, latencies: dict[str, list[float]]) -> None:
    """One dashboard page showing `job`: its event stream in a thread, its polls in this one."""
    follower = threading.Thread(target=follow, args=(url, job, done))
    follower.start()
    due = [0.0] * len(PAGE)
    with httpx.Client(base_url=url, timeout=60) as client:
        while not done.is_set():
            now = time.monotonic()
            for i, (every, routes) in enumerate(PAGE):
                if now < due[i]:
                    continue
                due[i] = now + every
                for route in routes:
                    path = route.replace("/{job}", f"/api/training/jobs/{job}")
                    t = time.perf_counter()
                    client.get(path).raise_for_status()
                    latencies.setdefault(route.split("?")[0], []).append(time.perf_counter() - t)
            done.wait(0.2)
    follower.join()


def run_job(
    url: str, steps: int, clients: int, interval: float, latencies: dict[str, list[float]], dashboard: bool = False
) -> dict:
    """Start the job, watch it with `clients` pollers and one stream follower (0: unwatched), wait for its end;
    return its steady-state tokens/s and how long it took."""
    with httpx.Client(base_url=url, timeout=120) as c:
        r = c.post("/api/training/jobs/start", json={"overrides": [*JOB, f"stage.num_steps={steps}"]})
        r.raise_for_status()
        job = r.json()["job_id"]
        done = threading.Event()

        def poll():
            with httpx.Client(base_url=url, timeout=60) as client:
                while not done.is_set():
                    for route in ("status", "metrics"):
                        t = time.perf_counter()
                        client.get(f"/api/training/jobs/{job}/{route}").raise_for_status()
                        latencies.setdefault(f"/{{job}}/{route}", []).append(time.perf_counter() - t)
                    done.wait(interval)

        if dashboard:
            threads = [threading.Thread(target=page, args=(url, job, done, latencies)) for _ in range(clients)]
        else:
            threads = [threading.Thread(target=poll) for _ in range(clients)]
            threads += [threading.Thread(target=follow, args=(url, job, done))] if clients else []
        for t in threads:
            t.start()
        summary = Path(r.json()["run_dir"]) / "summary.json"
        while not summary.exists():
            time.sleep(0.5)
        done.set()
        for t in threads:
            t.join()
        result = json.loads(summary.read_text())
        if result["status"] != "FINISHED":
            raise SystemExit(f"job {job} ended {result['status']}: {result.get('error')}")
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--interval", type=float, default=1.0, help="seconds each client waits between polls")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--dashboard", action="store_true", help="each client asks what an open dashboard page asks")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        proc, url = start_service(Path(tmp) / "runs")
        latencies: dict[str, list[float]] = {}
        alone, watched, service_cpu = [], [], []
        try:
            run_job(url, 20, 0, args.interval, {})  # warm caches (corpus, imports)
            for i in range(args.rounds):
                order = [(0, alone), (args.clients, watched)]
                for clients, into in order if i % 2 == 0 else order[::-1]:
                    cpu, wall = cpu_seconds(proc.pid), time.monotonic()
                    result = run_job(url, args.steps, clients, args.interval, latencies, args.dashboard)
                    cpu, wall = cpu_seconds(proc.pid) - cpu, time.monotonic() - wall
                    into.append(result["tokens_per_s"])
                    if clients:
                        service_cpu.append(cpu / wall)
                    print(
                        f"round {i + 1}: {clients:>2} clients: {result['tokens_per_s']:,.0f} tok/s "
                        f"| service CPU {100 * cpu / wall:.1f}% of a core over {wall:.0f} s",
                        flush=True,
                    )
        finally:
            proc.terminate()
            proc.wait()
    ratio = statistics.median(watched) / statistics.median(alone)
    watchers = (
        f"{args.clients} dashboard pages (each its own event stream)"
        if args.dashboard
        else f"{args.clients} polling clients (every {args.interval:g} s) + 1 event-stream follower"
    )
    print(
        f"\ntokens/s, median of {args.rounds}: 0 clients {statistics.median(alone):,.0f} | "
        f"{watchers} {statistics.median(watched):,.0f} | ratio {ratio:.3f} (target >= 0.97)"
    )
    print(f"service CPU while watched: {100 * statistics.median(service_cpu):.1f}% of one core (median)")
    for route, values in latencies.items():
        if not values:
            continue
        print(
            f"GET {route}: {len(values)} requests, p50 {1000 * percentile(values, 0.5):.1f} ms, "
            f"p99 {1000 * percentile(values, 0.99):.1f} ms"
        )


if __name__ == "__main__":
    main()
