"""Does watching a run through the job service slow it? Training tokens/s with no clients against the same job
with N clients polling status and metrics and one following the event stream, and the API's latency.

    python bench/bench_serve.py [--clients 20] [--interval 1.0] [--rounds 2] [--steps 150]

One `python -m exp.serve` on a free 127.0.0.1 port; each round starts the same job through it twice, once
unwatched and once watched (order alternating), and reads the steady-state tokens/s from its summary.json.
Each polling client asks for /status and /metrics, then waits `--interval` seconds (a dashboard's refresh).
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


def run_job(url: str, steps: int, clients: int, interval: float, latencies: dict[str, list[float]]) -> dict:
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
                        latencies[route].append(time.perf_counter() - t)
                    done.wait(interval)

        def follow():
            with httpx.Client(base_url=url, timeout=None) as client:
                with client.stream("GET", f"/api/training/jobs/{job}/metrics/stream") as r:
                    for line in r.iter_lines():
                        if line.startswith("event: end") or done.is_set():
                            return

        threads = [threading.Thread(target=poll) for _ in range(clients)]
        threads += [threading.Thread(target=follow)] if clients else []
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
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        proc, url = start_service(Path(tmp) / "runs")
        latencies: dict[str, list[float]] = {"status": [], "metrics": []}
        alone, watched, service_cpu = [], [], []
        try:
            run_job(url, 20, 0, args.interval, {"status": [], "metrics": []})  # warm caches (corpus, imports)
            for i in range(args.rounds):
                order = [(0, alone), (args.clients, watched)]
                for clients, into in order if i % 2 == 0 else order[::-1]:
                    cpu, wall = cpu_seconds(proc.pid), time.monotonic()
                    result = run_job(url, args.steps, clients, args.interval, latencies)
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
    print(
        f"\ntokens/s, median of {args.rounds}: 0 clients {statistics.median(alone):,.0f} | "
        f"{args.clients} polling clients (every {args.interval:g} s) + 1 event-stream follower "
        f"{statistics.median(watched):,.0f} | ratio {ratio:.3f} (target >= 0.97)"
    )
    print(f"service CPU while watched: {100 * statistics.median(service_cpu):.1f}% of one core (median)")
    for route, values in latencies.items():
        print(
            f"GET /jobs/{{id}}/{route}: {len(values)} requests, p50 {1000 * percentile(values, 0.5):.1f} ms, "
            f"p99 {1000 * percentile(values, 0.99):.1f} ms"
        )


if __name__ == "__main__":
    main()
