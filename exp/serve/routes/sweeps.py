"""Sweeps: every sweep under the runs directory (started here or from the command line) with its trials; start a
grid or an Optuna study, resume one, rerun its failed trials."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query

import exp.serve.configs as configs
import exp.serve.control as control
import exp.serve.study as study
from exp.paths import REPO_ROOT, TRAIN_PY
from exp.serve.bodies import ID, RelaunchIn, SweepIn
from exp.serve.registry import new_id
from exp.serve.state import Service, ServiceDep

router = APIRouter(tags=["sweeps"])
TRIAL_FIELDS = ("num", "status", "overrides", "run_dir", "val_loss", "step", "num_steps", "slurm_job_id")
TRIAL_FIELDS += ("mlflow_run_id", "error")


def sweeps(svc: Service) -> dict[str, Path]:
    """Sweep directories by id (Registry.sweep_dirs)."""
    return svc.registry.sweep_dirs()


def sweep_or_404(svc: Service, sweep_id: str) -> Path:
    path = sweeps(svc).get(sweep_id)
    if path is None:
        raise HTTPException(404, f"no sweep {sweep_id}")
    return path


def sweep_view(svc: Service, sweep_id: str, path: Path) -> dict:
    from exp.sweep.manifest import SweepError, load_sweep, trials_of

    process = svc.registry.sweep(sweep_id)  # the process the service started for it, if any
    try:
        manifest = load_sweep(path, write=False)
    except (SweepError, OSError, ValueError) as e:
        return _unread_view(svc, sweep_id, path, process, e)
    trials = [{k: t.get(k) for k in TRIAL_FIELDS} for t in trials_of(manifest)]
    counts: dict[str, int] = {}
    for t in trials:
        counts[str(t["status"])] = counts.get(str(t["status"]), 0) + 1
    # the best finished trial by val loss (an Optuna study's direction: the value train.py returns)
    sign = -1 if (manifest.get("study") or {}).get("direction") == "maximize" else 1
    done = [t for t in trials if t["status"] == "FINISHED" and isinstance(t["val_loss"], (int, float))]
    best = min(done, key=lambda t: sign * t["val_loss"])["num"] if done else None
    status = "RUNNING" if control.sweep_running(process, trials) else "FINISHED"
    return {
        "sweep_id": sweep_id,
        "sweep_dir": str(path),
        "status": status,
        "counts": counts,
        "best": best,
        "trials": trials,
    }


def _unread_view(svc: Service, sweep_id: str, path: Path, process: dict | None, error: Exception) -> dict:
    """A sweep whose sweep.json cannot be read: STARTING while its process has not written it yet."""
    starting = process is not None and control.process_alive(process)
    message = None if starting else str(error)
    if process is not None and not starting:
        message += f" (its process ended, exit {svc.launcher.poll(process['pid'])}: see {process['log_path']})"
    return {
        "sweep_id": sweep_id,
        "sweep_dir": str(path),
        "status": "STARTING" if starting else "FAILED" if process else "UNKNOWN",
        "error": message,
        "trials": [],
        "counts": {},
        "best": None,
    }


@router.get("/api/training/sweeps")
def list_sweeps(svc: ServiceDep) -> list[dict]:
    """Sweeps under the runs directory with their trial counts by status (PENDING, RUNNING, PRUNED, ...)."""
    return [{k: v for k, v in sweep_view(svc, i, p).items() if k != "trials"} for i, p in sweeps(svc).items()]


@router.get("/api/training/sweeps/{sweep_id}")
def get_sweep(sweep_id: ID, svc: ServiceDep) -> dict:
    """A sweep's trials with status, overrides, val loss, SLURM job and MLflow run."""
    return sweep_view(svc, sweep_id, sweep_or_404(svc, sweep_id))


@router.get("/api/training/sweeps/{sweep_id}/curves")
def sweep_curves(
    sweep_id: ID, svc: ServiceDep, key: Annotated[str, Query(max_length=200, pattern=r"^[\w./-]+$")] = "train/loss"
) -> dict:
    """One metric of every trial, [step, value] pairs from its metrics.jsonl (trials outside the runs directory,
    named by a sweep.json, are left out: the service reads nothing there)."""
    view = sweep_view(svc, sweep_id, sweep_or_404(svc, sweep_id))
    root = svc.runs_dir.resolve()
    curves = []
    for trial in view["trials"]:
        run_dir = Path(str(trial["run_dir"] or "")).resolve()
        if not trial["run_dir"] or not run_dir.is_relative_to(root):
            continue
        points = [[r["step"], r[key]] for r in svc.cache.rows(run_dir) if isinstance(r.get(key), (int, float))]
        curves.append({"num": trial["num"], "status": trial["status"], "points": points})
    return {"sweep_id": sweep_id, "key": key, "trials": curves}


@router.get("/api/training/sweeps/{sweep_id}/importances")
def sweep_importances(sweep_id: ID, svc: ServiceDep) -> dict:
    """Each parameter's importance to each objective of an Optuna sweep's study (Optuna's PED-ANOVA evaluator; none,
    with a `message`, before two trials have finished). 404 for a grid, or a study not stored as a file in the
    sweep's folder (read only there, never through a symlink)."""
    return {"sweep_id": sweep_id, **study.importances(_study(svc, sweep_id))}


@router.get("/api/training/sweeps/{sweep_id}/pareto")
def sweep_pareto(sweep_id: ID, svc: ServiceDep) -> dict:
    """The finished trials' objective values with the Pareto front marked (a multi-objective study's best trials);
    404 as for the importances."""
    return {"sweep_id": sweep_id, **study.pareto_front(_study(svc, sweep_id))}


def _study(svc: Service, sweep_id: str):
    path = sweep_or_404(svc, sweep_id)
    try:
        return study.load_study(svc.runs_dir, path)
    except study.StudyUnavailable as e:
        raise HTTPException(404, str(e)) from None
    except study.StudyUnreadable as e:
        raise HTTPException(409, str(e)) from None


def relaunch_sweep(svc: Service, sweep_id: str, mode: str, force: bool) -> dict:
    path = sweep_or_404(svc, sweep_id)
    with svc.claims.hold("sweep " + sweep_id, f"sweep {sweep_id} is being relaunched"):
        view = sweep_view(svc, sweep_id, path)
        if not view["trials"] and view["status"] != "STARTING":
            raise control.Conflict(f"sweep {sweep_id} has no trials to {mode}: {view['error']}")
        why = "starting" if view["status"] == "STARTING" else None
        why = why or control.sweep_running(svc.registry.sweep(sweep_id), view["trials"])
        if why and not force:
            raise control.Conflict(f"sweep {sweep_id} is still running ({why}); pass force=true to {mode} anyway")
        return sweep_tool(svc, sweep_id, path, mode)


def sweep_tool(svc: Service, sweep_id: str, path: Path, mode: str) -> dict:
    """python -m exp.sweep MODE SWEEP_DIR in the background, recorded as the sweep's process."""
    log_path = _log_dir(svc) / f"{sweep_id}-{mode}-{int(time.time())}.log"
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    child = _spawn(svc, [sys.executable, "-m", "exp.sweep", mode, str(path)], log_path, env=env)
    svc.registry.add_sweep(sweep_id, path, **process_of(child, log_path))
    return {"sweep_id": sweep_id, "requested": mode, "pid": child.pid, "log_path": str(log_path)}


def process_of(child: subprocess.Popen, log_path: Path) -> dict:
    return {"pid": child.pid, "pid_start": control.process_start_time(child.pid), "log_path": str(log_path)}


def _log_dir(svc: Service) -> Path:
    log_dir = svc.runs_dir / ".serve" / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    return log_dir


def _spawn(svc: Service, command: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
    """A sweep's process in its own session, from the directory that holds the runs directory, logging to log_path."""
    return svc.launcher.spawn_logged(command, log_path, **kwargs)


@router.post("/api/training/sweeps/start", status_code=201)
def start_sweep(body: SweepIn, svc: ServiceDep) -> dict:
    """A sweep: `train.py -m` through exp's launchers (here: one trial after another, or `parallelism`
    subprocesses; on SLURM: jobs). A grid starts once every point composes and validates; an Optuna search
    (`search`) once a point of its space does, with every value of each choice (422 with the CLI's line
    otherwise)."""
    sweep_dir = svc.runs_dir / "multirun" / "serve" / new_id("s")
    local, search = body.launcher == "local", body.search
    if search is None:
        points = configs.sweep_points(body.overrides)
        sweeper, launcher_name = [], "exp_basic" if local else "exp_slurm"
    else:
        points = configs.search_points(body.overrides, search.sampler)
        sweeper = [
            "hydra/sweeper=optuna",
            f"hydra/sweeper/sampler={search.sampler}",
            f"hydra.sweeper.n_trials={search.n_trials}",
            f"hydra.sweeper.parallelism={search.parallelism}",
            f"hydra.sweeper.pruner={search.pruner}",
            f"hydra.sweeper.direction={search.direction}",
            f"hydra.sweeper.study_name={sweep_dir.name}",
            *([f"hydra.sweeper.sampler.seed={search.seed}"] if search.seed is not None else []),
        ]
        launcher_name = "exp_slurm" if not local else "exp_local" if search.parallelism > 1 else "exp_basic"
    for num, point in enumerate(points):
        configs.compose(point, sweep_dir / str(num), svc.settings.allow_targets, node=local)
    command = [sys.executable, str(TRAIN_PY), "-m", *sweeper, *body.overrides]
    log_path = _log_dir(svc) / f"{sweep_dir.name}.log"
    child = _spawn(svc, [*command, f"hydra/launcher={launcher_name}", f"hydra.sweep.dir={sweep_dir}"], log_path)
    sweep_id = sweep_dir.name  # listed under it at once (STARTING until the sweep writes sweep.json)
    svc.registry.add_sweep(sweep_id, sweep_dir, **process_of(child, log_path))
    return {
        "sweep_id": sweep_id,
        "sweep_dir": str(sweep_dir),
        "num_points": len(points) if search is None else search.n_trials,
        "sweeper": "grid" if search is None else "optuna",
        "pid": child.pid,
        "log_path": str(log_path),
    }


@router.post("/api/training/sweeps/{sweep_id}/resume", status_code=202)
def resume_sweep(sweep_id: ID, svc: ServiceDep, body: Annotated[RelaunchIn | None, Body()] = None) -> dict:
    """python -m exp.sweep resume: every unfinished trial continues from its newest checkpoint (409 while the sweep
    still runs, unless `force`)."""
    return relaunch_sweep(svc, sweep_id, "resume", bool(body and body.force))


@router.post("/api/training/sweeps/{sweep_id}/rerun-failed", status_code=202)
def rerun_failed(sweep_id: ID, svc: ServiceDep, body: Annotated[RelaunchIn | None, Body()] = None) -> dict:
    """python -m exp.sweep rerun-failed: the FAILED trials run again (409 while the sweep still runs, unless
    `force`)."""
    return relaunch_sweep(svc, sweep_id, "rerun-failed", bool(body and body.force))
