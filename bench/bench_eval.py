"""Downstream evaluation speed, each against a reference measured in the same run.

    python bench/bench_eval.py [--limit 200] [--steps 200]

1. Throughput (examples/s) of exp's adapter (exp.eval.adapter.ExpLM, the model in memory) against the harness's
   own Hugging Face path (lm_eval's HFLM on the `--format hf` export of the same weights), on the same tasks, in
   one process (target >= 1.0x): exp_stdlib_mc (multiple choice) and exp_stdlib_ppl (rolling windows).
2. What evaluating in the loop costs a run: the main job's model trained `--steps` steps with eval=lm_eval every
   quarter of the run against the same run with eval=none (wall time; training throughput is the steps' alone);
   with sbatch on PATH, also the same evaluations as SLURM side jobs (eval.launcher=slurm) beside the training.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from exp import export  # noqa: E402
from exp.checkpoint import load_model_for_inference  # noqa: E402
from exp.eval import harness  # noqa: E402
from exp.eval.adapter import ExpLM  # noqa: E402
from exp.generate import model_tokenizer  # noqa: E402

TASKS = ("exp_stdlib_mc", "exp_stdlib_ppl")


def train(run_dir: Path, steps: int, *overrides: str) -> float:
    """Wall seconds of train.py on the main job's config."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    started = time.perf_counter()
    command = [sys.executable, str(ROOT / "train.py"), f"stage.num_steps={steps}", "tracking=none"]
    done = subprocess.run(
        [*command, "sample.max_new_tokens=0", f"hydra.run.dir={run_dir}", *overrides],
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(done.stderr[-2000:])
    return time.perf_counter() - started


def examples_per_s(lm, task: str, limit: int) -> tuple[float, float]:
    """(examples/s, the task's first metric) of one task on lm."""
    spec = harness.Spec(tasks=[task], limit=limit, batch_size=16, bootstrap_iters=0)
    manager = harness.check_tasks(spec)
    harness.run(lm, harness.Spec(tasks=[task], limit=4, batch_size=16, bootstrap_iters=0), manager)  # warm-up
    started = time.perf_counter()
    results = harness.run(lm, spec, manager)
    seconds = time.perf_counter() - started
    n = results["n-samples"][task]["effective"]
    metric = next(v for k, v in results["results"][task].items() if k.endswith(",none") and "stderr" not in k)
    return n / seconds, metric


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        plain = train(tmp / "plain", args.steps)
        every = max(1, args.steps // 4)
        evaluated = train(
            tmp / "eval", args.steps, "eval=lm_eval", f"eval.every_n_steps={every}", f"eval.limit={args.limit}"
        )
        seconds = [m["perf/eval_seconds"] for m in map(json.loads, (tmp / "eval" / "metrics.jsonl").open())
                   if "perf/eval_seconds" in m]  # fmt: skip
        speed = {d: json.loads((tmp / d / "summary.json").read_text())["tokens_per_s"] for d in ("plain", "eval")}
        print(f"in-loop evaluation: {len(seconds)} evaluations of {args.limit} examples, {sum(seconds):.1f} s")
        print(f"  run wall time {evaluated:.1f} s vs {plain:.1f} s without: {evaluated / plain:.2f}x")
        ratio = speed["eval"] / speed["plain"]
        print(f"  training tokens/s {speed['eval']:,.0f} vs {speed['plain']:,.0f}: {ratio:.2f}x")
        if shutil.which("sbatch"):  # the same evaluations as SLURM side jobs (scripts/slurm-local.sh on one machine)
            started = time.perf_counter()
            side = train(
                tmp / "side", args.steps, "eval=lm_eval", "eval.launcher=slurm", f"eval.limit={args.limit}",
                f"checkpoint.every_n_steps={every}", "checkpoint.keep_last=0", "eval.slurm.mem_gb=1",
            )  # fmt: skip
            tokens = json.loads((tmp / "side" / "summary.json").read_text())["tokens_per_s"]
            jobs = json.loads((tmp / "side" / "eval" / "jobs.json").read_text())
            done = [tmp / "side" / "eval" / f"step_{j['step']:08d}.{ext}" for j in jobs for ext in ("json", "failed")]
            while sum(p.exists() for p in done) < len(jobs):  # the jobs end before the next measurement starts
                time.sleep(1)
            print(f"  {len(jobs)} side jobs ended {time.perf_counter() - started - side:.1f} s after the run")
            print(f"side jobs (eval.launcher=slurm): run wall time {side:.1f} s vs {plain:.1f} s: {side / plain:.2f}x")
            print(f"  training tokens/s {tokens:,.0f} vs {speed['plain']:,.0f}: {tokens / speed['plain']:.2f}x")
        export.main([str(tmp / "plain"), str(tmp / "hf"), "--format", "hf"])
        model, _ = load_model_for_inference(tmp / "plain", torch.device("cpu"))
        ours = ExpLM(model, model_tokenizer(tmp / "plain", model), batch_size=16)
        from lm_eval.models.huggingface import HFLM

        theirs = HFLM(pretrained=str(tmp / "hf"), device="cpu", dtype="float32", batch_size=16)
        for task in TASKS:
            a, b = examples_per_s(ours, task, args.limit), examples_per_s(theirs, task, args.limit)
            print(
                f"{task}: exp adapter {a[0]:.1f} examples/s, lm_eval hf {b[0]:.1f} examples/s: {a[0] / b[0]:.2f}x "
                f"(target >= 1.0x; scores {a[1]:.4f} and {b[1]:.4f})"
            )


if __name__ == "__main__":
    main()
