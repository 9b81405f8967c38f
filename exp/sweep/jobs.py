"""Where a trial stands when its launcher cannot say: the run directory's lock (its trainer holds it while it
runs), SLURM's accounting (sacct; squeue where accounting is off), and the MLflow run a dead trainer left open.

A trial whose run directory has no summary.json is RUNNING while a process holds its lock or its SLURM job is
active; once neither holds it was killed (SIGKILL, node failure, the OOM killer) and is KILLED.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from exp.rundir import read_json, read_summary
from exp.tracking.worker import RUN_MARKER

# SLURM job states of a job that has not ended (a requeued job passes through several)
ACTIVE = {
    "PENDING", "RUNNING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESIZING", "SUSPENDED", "CONFIGURING",
    "COMPLETING", "SIGNALING", "STAGE_OUT", "STOPPED",
}  # fmt: skip
_STEP = re.compile(r"step_\d+")


@dataclass(frozen=True)
class SlurmState:
    """A SLURM job's state as sacct reports it: `state` is its first word (CANCELLED, FAILED, ...)."""

    state: str
    detail: str = ""

    @property
    def active(self) -> bool:
        return self.state in ACTIVE

    def describe(self, job_id: str) -> str:
        return f"SLURM job {job_id} {self.detail or self.state}"


def slurm_states(job_ids) -> dict[str, SlurmState]:
    """The state of each SLURM job (array elements as `123_4` or their own id), in one sacct call; jobs SLURM does
    not report are left out. Without accounting, squeue tells active jobs from ended ones."""
    ids = sorted({str(j) for j in job_ids if j})
    if not ids or shutil.which("sacct") is None:
        return {}
    command = ["sacct", "-n", "-X", "-P", "-o", "JobID,JobIDRaw,State,ExitCode", "-j", ",".join(ids)]
    out = _run(command)
    if out is None:
        return _squeue_states(ids)
    states = {}
    for line in out.splitlines():
        fields = line.split("|")
        if len(fields) < 4 or not fields[2]:
            continue
        state = SlurmState(fields[2].split()[0], f"{fields[2]}, exit code {fields[3]}")
        states[fields[0]] = states[fields[1]] = state
    return {i: states[i] for i in ids if i in states}


def _squeue_states(ids: list[str]) -> dict[str, SlurmState]:
    states = {}
    for job in ids:  # one call each: squeue refuses a whole list when one of its ids has left the queue
        out = _run(["squeue", "-h", "-j", job, "-o", "%T"])
        state = (out or "").split()
        states[job] = SlurmState(state[0]) if state else SlurmState("ENDED", "ended (no accounting to say how)")
    return states


def _run(command: list[str]) -> str | None:
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout if proc.returncode == 0 else None


def fresh_summary(run_dir, started: float | None) -> dict | None:
    """The run dir's summary.json unless an earlier launch wrote it (older than this launch's `started`)."""
    summary = read_summary(run_dir)
    if summary is None or started is None:
        return summary
    try:
        written = (Path(run_dir) / "summary.json").stat().st_mtime
    except OSError:
        return None
    return summary if written >= started - 1.0 else None  # a second of slack for coarse file timestamps


def has_started(run_dir) -> bool:
    """Whether a trainer got as far as training in the run dir (it wrote metrics.jsonl)."""
    return (Path(run_dir) / "metrics.jsonl").exists()


def mlflow_run_of(run_dir) -> tuple[str, str] | None:
    """(store URI, run id) of the MLflow run the run dir last wrote to, from its marker."""
    marker = read_json(Path(run_dir) / RUN_MARKER)
    if isinstance(marker, dict) and marker.get("run_id") and marker.get("tracking_uri"):
        return marker["tracking_uri"], marker["run_id"]
    return None


def close_left_running(run_dir, status: str) -> None:
    """Close the run dir's MLflow run with `status` (PRUNED: KILLED) if its trainer died leaving it RUNNING."""
    found = mlflow_run_of(run_dir)
    if found is None:
        return
    from exp.tracking.parent import end_killed_run

    end_killed_run(*found, status=status if status in ("FINISHED", "FAILED", "KILLED") else "KILLED", settle_s=0.0)


def checkpoints_of(run_dir) -> list[Path]:
    """The run dir's step_* checkpoints, oldest first (what resume=auto would look at)."""
    root = Path(run_dir) / "checkpoints"
    if not root.is_dir():
        return []
    return sorted((p for p in root.iterdir() if _STEP.fullmatch(p.name) and p.is_dir()), key=lambda p: p.name)
