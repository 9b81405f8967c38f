"""The first steps with MLflow tracking on a loaded machine, against tracking=none in the same run.

    python bench/bench_first_steps.py [--rounds 3] [--steps 30] [--load 2]

Each round runs train.py twice (gpt_tiny, a checkpoint at every step, so the first one falls while the MLflow
worker is still starting), with `--load` busy processes taking every core at normal priority, and records the wall
time at the end of every step (StepClock below). Target: no step waits for tracking, i.e. the longest gap between
two steps with tracking on exceeds the longest with tracking off by at most one median step.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from exp.events import Callback
from exp.paths import REPO_ROOT


class StepClock(Callback):
    """Appends the wall time of every step's end to `path` (JSON lines)."""

    def __init__(self, path: str):
        self.path = path

    def on_step_end(self, state, loss):
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.step, "t": time.time()}) + "\n")


def busy(stop) -> None:
    while not stop.is_set():
        sum(range(10_000))


def one_run(tmp: Path, tracking: str, steps: int) -> dict:
    clock = tmp / f"clock_{tracking}.jsonl"
    overrides = [
        "model=gpt_tiny",
        "hardware=cpu",
        f"stage.num_steps={steps}",
        "checkpoint.every_n_steps=1",
        "checkpoint.keep_last=2",
        f"tracking={tracking}",
        f"hydra.run.dir={tmp / tracking}",
        "+callbacks.clock._target_=bench.bench_first_steps.StepClock",
        f"+callbacks.clock.path={clock}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    env["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp / 'mlflow.db'}"
    subprocess.run(
        [sys.executable, str(REPO_ROOT / "train.py"), *overrides], cwd=tmp, env=env, check=True, capture_output=True
    )
    times = [json.loads(line)["t"] for line in clock.read_text().splitlines()]
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    return {"max_gap": max(gaps), "median_step": statistics.median(gaps), "gap_1_2": gaps[0]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--load", type=int, default=2)
    args = parser.parse_args()
    stop = mp.Event()
    hogs = [mp.Process(target=busy, args=(stop,), daemon=True) for _ in range(args.load)]
    for h in hogs:
        h.start()
    rows = []
    try:
        for _ in range(args.rounds):
            with tempfile.TemporaryDirectory() as tmp:
                rows.append({t: one_run(Path(tmp), t, args.steps) for t in ("none", "mlflow")})
    finally:
        stop.set()
        for h in hogs:
            h.join()
    print(
        f"gpt_tiny, a checkpoint every step, {args.load} busy processes on {os.cpu_count()} cores, "
        f"{time.strftime('%Y-%m-%d')}"
    )
    for i, r in enumerate(rows):
        off, on = r["none"], r["mlflow"]
        excess = on["max_gap"] - off["max_gap"]
        print(
            f"  round {i + 1}: longest gap between steps: tracking=none {off['max_gap']:.2f} s, mlflow "
            f"{on['max_gap']:.2f} s (steps 1-2: {off['gap_1_2']:.2f} / {on['gap_1_2']:.2f} s); median step "
            f"{on['median_step']:.2f} s; excess {excess:+.2f} s = {excess / on['median_step']:+.2f} steps "
            "(target <= 1 step)"
        )


if __name__ == "__main__":
    main()
