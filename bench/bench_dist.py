"""DDP on CPU: tokens/s of 2 ranks (torchrun, gloo) against 1 rank, same per-rank batch, interleaved pairs.

    python bench/bench_dist.py [--pairs 2] [--steps 60]

Each rank gets one thread, so 2 ranks use both cores of a 2-core machine; the ratio shows what the
gradient all-reduce costs (perfect scaling is 2.0).
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


def run(nproc: int, run_dir: Path, steps: int) -> float:
    overrides = [
        "model=gpt_tiny",
        f"stage.num_steps={steps}",
        "stage.log_every_n_steps=20",
        f"stage.eval_every_n_steps={steps}",
        "stage.num_eval_batches=1",
        "sample.max_new_tokens=0",
        "tracking=none",
        "checkpoint.every_n_steps=0",
        "hardware.device=cpu",
        "hardware.num_threads=1",
        f"hydra.run.dir={run_dir}",
    ]
    if nproc > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            str(ROOT / "train.py"),
            "hardware=ddp",
            *overrides,
        ]
    else:
        cmd = [sys.executable, str(ROOT / "train.py"), "hardware=cpu", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    subprocess.run(cmd, env=env, check=True, capture_output=True, cwd=run_dir.parent)
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steady = [r["perf/tokens_per_s"] for r in rows if "perf/tokens_per_s" in r][1:]  # the first interval warms up
    return statistics.median(steady)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", type=int, default=2)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    one, two = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.pairs):
            one.append(run(1, Path(tmp) / f"one_{i}", args.steps))
            two.append(run(2, Path(tmp) / f"two_{i}", args.steps))
    ratios = [b / a for a, b in zip(one, two, strict=True)]
    print(f"gpt_tiny on CPU, batch 16 x 128 per rank, one thread per rank, median of {args.pairs} pairs")
    print(f"  1 rank   {statistics.median(one):9,.0f} tok/s")
    print(
        f"  2 ranks  {statistics.median(two):9,.0f} tok/s (total)   ratio {statistics.median(ratios):.2f} (ideal 2.00)"
    )


if __name__ == "__main__":
    main()
