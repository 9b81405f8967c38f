"""The LR range test's suggestion against the best learning rate of a short grid, on gpt_tiny (the main job).

    python bench/bench_lr_find.py [--steps 200] [--lrs 3e-4,1e-3,3e-3,1e-2,3e-2]

Runs `train.py lr_find=true`, then one short run per grid point (same seed and data), and prints each run's
final val loss, the grid's best, and where the suggestion falls. Not a test: LR finders are heuristics.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def train(run_dir: Path, *overrides: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, str(ROOT / "train.py"), "tracking=none", f"hydra.run.dir={run_dir}", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")
    return json.loads((run_dir / "summary.json").read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200, help="steps of each grid run")
    ap.add_argument("--lrs", default="3e-4,1e-3,3e-3,1e-2,3e-2")
    args = ap.parse_args()
    lrs = [float(x) for x in args.lrs.split(",")]
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        found = train(Path(tmp) / "lr_find", "lr_find=true")
        print(
            f"lr_find: suggested {found['suggested_learning_rate']:.3g} in {time.perf_counter() - started:.0f} s "
            f"({found['method']})"
        )
        results = {}
        for lr in lrs:
            summary = train(Path(tmp) / f"lr{lr:g}", f"stage.learning_rate={lr}", f"stage.num_steps={args.steps}")
            results[lr] = summary["val_loss"]
            print(f"grid: lr {lr:<8g} val loss {summary['val_loss']:.4f}")
    best = min(results, key=results.get)
    suggestion = found["suggested_learning_rate"]
    print(
        f"best grid lr {best:g} (val loss {results[best]:.4f}); "
        f"suggestion {suggestion:.3g} = best x {suggestion / best:.2g}"
    )


if __name__ == "__main__":
    main()
