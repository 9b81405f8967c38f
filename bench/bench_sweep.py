"""The same Optuna search three ways: synchronous batches (Hydra's Optuna sweeper), asynchronous, asynchronous with
the median pruner. Wall time and best val loss of each, and the ratios to the synchronous search.

    python bench/bench_sweep.py [--trials 12] [--parallelism 2] [--steps 120] [--out DIR]

12 TPE trials (seed 0) over stage.learning_rate and stage.weight_decay on gpt_tiny, 2 at a time as local
subprocesses (hydra/launcher=exp_local), tracking off. Target (issue 13): asynchronous with pruning in <= 0.6 of
the synchronous wall time, with a best val loss no worse. Not a test: timings depend on the machine's load.
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

import optuna

ROOT = Path(__file__).resolve().parents[1]
MODES = {
    "synchronous": ["hydra.sweeper.synchronous=true", "hydra.sweeper.pruner=none"],
    "asynchronous": ["hydra.sweeper.pruner=none"],
    "asynchronous + median pruner": ["hydra.sweeper.pruner=median"],
}


def sweep(sweep_dir: Path, args, mode_overrides: list[str]) -> dict:
    """One search; its wall time, best val loss and trial states."""
    eval_every = max(1, args.steps // 6)
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        "-cd",
        str(ROOT / "sweeps"),
        "-cn",
        "optuna",
        "hydra/launcher=exp_local",
        "model=gpt_tiny",
        "hardware=cpu",
        "hardware.num_threads=1",
        "tracking=none",
        "sample.max_new_tokens=0",
        f"stage.num_steps={args.steps}",
        f"stage.eval_every_n_steps={eval_every}",
        "stage.num_eval_batches=4",
        # the search space of sweeps/optuna.yaml less its warmup_ratio: a fixed value on the command line wins
        "stage.warmup_ratio=0.05",
        f"hydra.sweeper.n_trials={args.trials}",
        f"hydra.sweeper.parallelism={args.parallelism}",
        "hydra.sweeper.sampler.seed=0",
        "hydra.sweeper.pruner_args.n_startup_trials=4",
        f"hydra.sweeper.pruner_args.n_warmup_steps={eval_every}",
        "hydra.sweeper.poll_interval_s=0.5",
        f"hydra.sweep.dir={sweep_dir}",
        *mode_overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    proc = subprocess.run(command, cwd=sweep_dir.parent, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    study = optuna.load_study(study_name="exp-lr-wd", storage=f"sqlite:///{sweep_dir}/optuna.db")
    states = [t.state.name for t in study.trials]
    steps = [json.loads((sweep_dir / str(t.number) / "summary.json").read_text())["step"] for t in study.trials]
    return {
        "wall_s": wall,
        "best_val_loss": study.best_value,
        "best_params": study.best_params,
        "states": {s: states.count(s) for s in sorted(set(states))},
        "steps_trained": sum(steps),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--parallelism", type=int, default=2)
    ap.add_argument("--steps", type=int, default=120, help="steps of each trial")
    ap.add_argument("--out", type=Path, default=None, help="keep the sweep dirs here (default: a temporary dir)")
    ap.add_argument("--modes", default=",".join(MODES), help="which of the three searches to run (comma-separated)")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory() as tmp:
        root = args.out or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        results = {}
        for i, (mode, overrides) in enumerate(MODES.items()):
            if mode not in args.modes.split(","):
                continue
            results[mode] = sweep(root / f"sweep{i}", args, overrides)
            r = results[mode]
            print(
                f"{mode:<30} wall {r['wall_s']:7.1f} s | best val loss {r['best_val_loss']:.4f} | "
                f"{r['steps_trained']} steps trained | {r['states']}",
                flush=True,
            )
    if "synchronous" not in results:
        return
    base = results["synchronous"]
    print(f"\n{args.trials} TPE trials, parallelism {args.parallelism}, {args.steps} steps each (gpt_tiny, CPU)")
    for mode, r in results.items():
        ratio = r["wall_s"] / base["wall_s"]
        delta = r["best_val_loss"] - base["best_val_loss"]
        print(f"{mode:<30} {ratio:5.2f} x synchronous wall time | best val loss {delta:+.4f} vs synchronous")
    pruned = results.get("asynchronous + median pruner")
    if pruned is None:
        return
    ok_time = pruned["wall_s"] <= 0.6 * base["wall_s"]
    ok_loss = pruned["best_val_loss"] <= base["best_val_loss"]
    print(
        f"target (<= 0.60 x wall time, best val loss no worse): "
        f"time {'met' if ok_time else 'MISSED'}, loss {'met' if ok_loss else 'MISSED'}"
    )


if __name__ == "__main__":
    main()
