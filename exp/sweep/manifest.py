"""A sweep on disk: sweep.json (exp's launchers write it, one entry per trial) and reading any sweep directory.

A trial's status, losses, MLflow run and SLURM job come from its run directory's summary.json; sweep.json keeps a
copy (SUMMARY_KEYS), refreshed whenever the sweep is read. A sweep launched without exp's launchers (plain Hydra,
Optuna) has no sweep.json: its numbered run directories are its trials.
"""

from __future__ import annotations

import contextlib
import json
import time
from pathlib import Path

import yaml

from exp.errors import ExpError
from exp.rundir import lock_holder, write_json
from exp.sweep.jobs import (
    SlurmState,
    close_left_running,
    fresh_summary,
    has_started,
    mlflow_run_of,
    slurm_states,
)

MANIFEST = "sweep.json"
# what sweep.json keeps of each trial's summary.json
SUMMARY_KEYS = ("status", "val_loss", "step", "num_steps", "tokens_per_s", "mlflow_run_id", "slurm_job_id", "error")


class SweepError(ExpError):
    """Not a usable sweep directory; the message is the one line the user sees."""

    exit_code = 2


# --- sweep.json ---------------------------------------------------------------------------------------


def new_manifest(
    sweep_dir: Path, *, overrides: list[str], launcher: str, tracking_uri: str | None, parent_run_id: str | None
) -> dict:
    """The manifest of a sweep about to launch its first batch: no trials yet."""
    return {
        "sweep_dir": str(Path(sweep_dir).resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "overrides": list(overrides),
        "launcher": launcher,
        "mlflow_tracking_uri": tracking_uri,
        "mlflow_parent_run_id": parent_run_id,
        "trials": {},
    }


def read_manifest(sweep_dir) -> dict | None:
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(sweep_dir, manifest: dict) -> None:
    write_json(Path(sweep_dir) / MANIFEST, manifest)


def mark_unsubmitted(sweep_dir: Path) -> None:
    """Trials of a batch the scheduler refused are NOT_SUBMITTED, not PENDING."""
    manifest = read_manifest(sweep_dir)
    for trial in manifest["trials"].values():
        if trial["status"] == "PENDING":
            trial["status"] = "NOT_SUBMITTED"
    write_manifest(sweep_dir, manifest)


def refresh_trial(trial: dict, run_dir, slurm: dict[str, SlurmState] | None = None) -> None:
    """A trial's status, losses, MLflow run and SLURM job, from its run directory; without a summary, from its
    lock and SLURM job (`slurm`: slurm_states of the sweep's jobs): RUNNING while either holds, else KILLED once
    it had started (its trainer died without a summary)."""
    if lock_holder(run_dir):
        trial["status"] = "RUNNING"
        return
    summary = fresh_summary(run_dir, trial.get("started"))
    if summary is not None:
        trial.update({k: summary.get(k) for k in SUMMARY_KEYS})
    else:
        _refresh_unsummarised(trial, run_dir, slurm or {})
    found = mlflow_run_of(run_dir) if not trial.get("mlflow_run_id") else None
    if found is not None:  # its trainer died, or stopped, before it knew its run's id
        trial["mlflow_run_id"] = found[1]


def _refresh_unsummarised(trial: dict, run_dir, slurm: dict[str, SlurmState]) -> None:
    job_id = str(trial.get("slurm_job_id") or "")
    job = slurm.get(job_id)
    if job is not None and job.active:
        trial["status"] = "RUNNING" if job.state == "RUNNING" else "PENDING"
    elif (job is not None or has_started(run_dir)) and trial.get("status") in (None, "PENDING", "RUNNING"):
        trial["status"] = "KILLED"
        trial["error"] = killed_error(job_id, job)


def killed_error(job_id: str, job: SlurmState | None) -> str:
    """Why a trial ended without a summary."""
    said = "its trainer was killed without writing summary.json (SIGKILL, node failure or out of memory)"
    return f"{said}; {job.describe(job_id)}" if job is not None else said


def refresh_manifest(sweep_dir, close_killed: bool = True) -> dict:
    """Each trial refreshed from its run directory (refresh_trial); written back. A trial found dead has its MLflow
    run closed KILLED when `close_killed` (its trainer could not)."""
    manifest = read_manifest(sweep_dir)
    refresh_all(manifest["trials"].values(), close_killed=close_killed)
    write_manifest(sweep_dir, manifest)
    return manifest


def refresh_all(trials, close_killed: bool = False) -> None:
    """refresh_trial for each trial, with one SLURM query for the jobs of those without a summary."""
    trials = list(trials)
    waiting = [t for t in trials if not (Path(t["run_dir"]) / "summary.json").exists()]
    slurm = slurm_states(t.get("slurm_job_id") for t in waiting)
    for trial in trials:
        before = trial.get("status")
        refresh_trial(trial, trial["run_dir"], slurm)
        if close_killed and trial["status"] == "KILLED" and before in (None, "PENDING", "RUNNING"):
            close_left_running(trial["run_dir"], "KILLED")


# --- reading any sweep directory ----------------------------------------------------------------------


def is_sweep_dir(path: Path) -> bool:
    """sweep.json (exp's launchers), or Hydra's multirun.yaml / Optuna's results next to numbered run dirs."""
    path = Path(path)
    return (path / MANIFEST).exists() or (
        ((path / "multirun.yaml").exists() or (path / "optimization_results.yaml").exists()) and bool(_numbered(path))
    )


def load_sweep(sweep_dir: Path, write: bool = True) -> dict:
    """The manifest with every trial refreshed from its run dir (written back when `write` and possible)."""
    sweep_dir = Path(sweep_dir)
    if not sweep_dir.is_dir():
        raise SweepError(f"{sweep_dir}: no such directory")
    if not is_sweep_dir(sweep_dir):
        raise SweepError(f"{sweep_dir} is not a sweep directory (no {MANIFEST}, multirun.yaml or numbered run dirs)")
    manifest = read_manifest(sweep_dir) if (sweep_dir / MANIFEST).exists() else None
    ours = manifest is not None
    if manifest is None:  # launched without exp's launchers: the numbered run dirs are the trials
        manifest = {"sweep_dir": str(sweep_dir.resolve()), "trials": {}}
        for path in _numbered(sweep_dir):
            overrides = path / ".hydra" / "overrides.yaml"
            manifest["trials"][path.name] = {
                "num": int(path.name),
                "overrides": (yaml.safe_load(overrides.read_text()) or []) if overrides.exists() else [],
                "run_dir": str(path),
                "status": "PENDING",
            }
    launch_cwd = hydra_config(sweep_dir).get("runtime", {}).get("cwd")
    launch_cwd = Path(launch_cwd) if launch_cwd else None
    recorded = {num: trial["run_dir"] for num, trial in manifest["trials"].items()}
    for trial in manifest["trials"].values():
        trial["run_dir"] = str(resolve_run_dir(sweep_dir, trial, launch_cwd))
    refresh_all(manifest["trials"].values(), close_killed=write)
    if write and ours:
        kept = {num: {**t, "run_dir": recorded[num]} for num, t in manifest["trials"].items()}
        with contextlib.suppress(OSError):  # a read-only sweep dir still reports
            write_manifest(sweep_dir, {**manifest, "trials": kept})
    if not manifest["trials"]:
        raise SweepError(f"{sweep_dir}: the sweep has no trials")
    return manifest


def trials_of(manifest: dict) -> list[dict]:
    """The trials in job order."""
    return sorted(manifest["trials"].values(), key=lambda t: int(t["num"]))


def resolve_run_dir(sweep_dir: Path, trial: dict, launch_cwd: Path | None) -> Path:
    """A trial's run dir; a relative one (hydra.sweep.dir was relative) is relative to where the sweep was launched."""
    recorded = Path(trial["run_dir"])
    if recorded.is_absolute():
        return recorded
    candidates = [(launch_cwd or Path.cwd()) / recorded, Path.cwd() / recorded, sweep_dir / str(trial["num"])]
    return next((c.resolve() for c in candidates if c.exists()), candidates[0].resolve())


def hydra_config(sweep_dir: Path, manifest: dict | None = None) -> dict:
    """The sweep's `hydra` node, unresolved: multirun.yaml, else a trial's .hydra/hydra.yaml (Optuna writes none)."""
    sources = [Path(sweep_dir) / "multirun.yaml"]
    if manifest:
        sources += [Path(t["run_dir"]) / ".hydra" / "hydra.yaml" for t in trials_of(manifest)]
    sources += [p / ".hydra" / "hydra.yaml" for p in _numbered(Path(sweep_dir))]
    for path in sources:
        if path.exists():
            return (yaml.safe_load(path.read_text()) or {}).get("hydra", {})
    return {}


def _numbered(path: Path) -> list[Path]:
    if not path.is_dir():
        return []
    return sorted((p for p in path.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name))
