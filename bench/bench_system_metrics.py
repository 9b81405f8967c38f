"""MLflow's system metrics cost no training speed: tokens/s with them against without, in the same session.

    python bench/bench_system_metrics.py [--rounds 3] [--steps 150] [--interval 1.0]

gpt_tiny for --steps steps through train.py (a subprocess each, MLflow on a local SQLite store), with
tracking.system_metrics on (a sample every --interval seconds: 1 s is ten times the default's rate) and off, the two
alternating round by round; each run's steady tokens/s is summary.json's. Target: with / without >= 0.99.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run(tmp: Path, name: str, steps: int, system_metrics: bool, interval: float) -> float:
    run_dir = tmp / name
    args = [
        f"stage.num_steps={steps}",
        "stage.eval_every_n_steps=100000",
        "checkpoint.every_n_steps=100000",
        f"tracking.uri=sqlite:///{tmp}/mlflow.db",
        f"tracking.system_metrics={str(system_metrics).lower()}",
        f"tracking.system_metrics_interval={interval}",
        "sample.max_new_tokens=0",
        f"hydra.run.dir={run_dir}",
    ]
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(proc.stderr[-2000:])
    return json.loads((run_dir / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--interval", type=float, default=1.0)
    args = ap.parse_args()
    on, off = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.rounds):
            off.append(run(Path(tmp), f"off{i}", args.steps, False, args.interval))
            on.append(run(Path(tmp), f"on{i}", args.steps, True, args.interval))
            print(f"round {i + 1}: without {off[-1]:,.0f} tok/s, with {on[-1]:,.0f} tok/s ({on[-1] / off[-1]:.3f})")
    ratio = statistics.median(on) / statistics.median(off)
    print(f"gpt_tiny, {args.steps} steps, a sample every {args.interval:g} s, {os.cpu_count()} cores:")
    print(f"  median tokens/s without {statistics.median(off):,.0f}, with {statistics.median(on):,.0f}: {ratio:.3f}")


if __name__ == "__main__":
    main()
