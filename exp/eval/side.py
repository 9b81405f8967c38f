"""eval.launcher=slurm: each new checkpoint evaluated in a SLURM job of its own while training goes on.

The checkpoint's files are hard-linked into RUN_DIR/eval/pending/step_<N>/ first (no copy: the same blocks), so that
rotation may delete the checkpoint while its evaluation waits in the queue. The job runs `python -m exp.eval` on
them, which logs the scores into the training run's MLflow run at the checkpoint's step and writes
RUN_DIR/eval/step_<N>.json, then removes its links. Training never waits for a job; a job that fails is named in
the run's log (at the next checkpoint and at the end) and in RUN_DIR/eval/jobs.json, and changes nothing else.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
from pathlib import Path

from exp.errors import ConfigError
from exp.events import Callback, TrainState
from exp.rundir import write_json

log = logging.getLogger("exp")

PENDING = "pending"
JOBS = "jobs.json"


def check_slurm() -> None:
    if shutil.which("sbatch") is None:
        raise ConfigError("eval.launcher=slurm: sbatch is not on PATH (no SLURM here); use eval.launcher=local")


class SideJobs(Callback):
    """Submits an evaluation job for every published checkpoint (rank 0), and reports the jobs that failed."""

    def __init__(self, cfg, run_dir: Path, allow: tuple[str, ...] = ()):
        self.cfg, self.run_dir, self.allow = cfg, Path(run_dir), tuple(allow)
        self.folder = self.run_dir / "eval"
        self.jobs: list[dict] = []
        self._reported: set[str] = set()

    def on_checkpoint(self, state: TrainState, path) -> None:
        try:
            self.submit(Path(path), state.step)
        except Exception as e:  # the queue refusing a job never stops training
            log.error(f"evaluation of step {state.step} could not be submitted: {type(e).__name__}: {e}")
        self.report()

    def on_train_end(self, state: TrainState, status: str) -> None:
        self.report()

    def submit(self, checkpoint: Path, step: int) -> None:
        import submitit

        pending = self.folder / PENDING / checkpoint.name
        if pending.exists():
            shutil.rmtree(pending)
        pending.mkdir(parents=True)
        for file in sorted(checkpoint.rglob("*")):  # hard links: rotation may remove the checkpoint meanwhile
            target = pending / file.relative_to(checkpoint)
            if file.is_dir() and not file.is_symlink():
                target.mkdir(exist_ok=True)  # a sharded checkpoint's folders
            elif file.is_file() and not file.is_symlink():
                os.link(file, target)
        command = [sys.executable, "-m", "exp.eval", str(pending), "--record-into", str(self.run_dir)]
        command += ["--remove-after", "--tasks", ",".join(self.cfg.tasks or ["exp_stdlib_mc"])]
        command += ["--limit", f"{self.cfg.limit:g}"] if self.cfg.limit else []
        command += ["--batch-size", str(self.cfg.batch_size), "--seed", str(self.cfg.seed)]
        command += [a for prefix in self.allow for a in ("--allow-target", prefix)]
        executor = submitit.SlurmExecutor(folder=self.folder / "slurm")
        resources = dict(self.cfg.slurm or {})
        params = {
            "job_name": f"exp-eval-{step}",
            "time": int(resources.pop("timeout_min", 60)),
            "cpus_per_task": int(resources.pop("cpus_per_task", 1)),
            "mem": f"{int(resources.pop('mem_gb', 4))}GB",
        }
        params.update({k: v for k, v in resources.items() if v is not None})
        executor.update_parameters(**params)
        job = executor.submit(submitit.helpers.CommandFunction(command, cwd=os.getcwd()))
        self.jobs.append({"step": step, "job_id": str(job.job_id), "checkpoint": str(checkpoint), "_job": job})
        self._write()
        log.info(f"evaluation of step {step}: SLURM job {job.job_id}")

    def report(self) -> None:
        """One line for each job that has ended badly since the last report; jobs.json says how each ended."""
        changed = False
        for entry in self.jobs:
            job = entry["_job"]
            if entry.get("state") or not job.done():
                continue
            try:
                job.result()
                entry["state"] = "COMPLETED"
            except Exception as e:
                entry["state"], entry["error"] = "FAILED", _last_line(e)
                log.warning(f"evaluation job {entry['job_id']} of step {entry['step']} failed: {entry['error']}")
            changed = True
        if changed:
            self._write()

    def _write(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        write_json(self.folder / JOBS, [{k: v for k, v in e.items() if k != "_job"} for e in self.jobs])


def _last_line(error: Exception) -> str:
    lines = [ln.strip() for ln in str(error).splitlines() if ln.strip()]
    said = [ln for ln in lines if ln.startswith(("error:", "skipped"))]
    return (said or lines or [type(error).__name__])[-1][:300]


def read_jobs(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "eval" / JOBS
    return json.loads(path.read_text()) if path.is_file() else []
