"""Jobs: start (locally or on SLURM), list, status, stop, save now, profile, resume, logs, config."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException, Query
from fastapi.responses import JSONResponse

import exp.serve.configs as configs
import exp.serve.control as control
from exp.checkpoint.checkpointer import check_config_change
from exp.profiling import write_request
from exp.serve.bodies import ID, ProfileIn, ResumeIn, SlurmResources, Started, StartIn
from exp.serve.guard import Refused, open_inside
from exp.serve.registry import new_id
from exp.serve.state import Service, ServiceDep
from exp.tracking.parent import create_run_ahead, end_run_ahead

router = APIRouter(tags=["jobs"])


@router.post("/api/training/jobs/start", status_code=201)
def start_job(body: StartIn, svc: ServiceDep) -> Started:
    """Validate and launch a run (locally, or on SLURM with the hardware option's resources)."""
    overrides = list(body.overrides)
    if body.config_id is not None:
        stored = svc.registry.config(body.config_id)
        if stored is None:
            raise HTTPException(404, f"no config {body.config_id}")
        overrides = merge_overrides(stored["overrides"], overrides)
    if body.run_name is not None:
        overrides = merge_overrides(overrides, [f"run_name={body.run_name}"])
    if body.force:
        return start(svc, body, overrides)
    busy = "a job with the same overrides is being started; pass force=true to start another"
    with svc.claims.hold("start " + json.dumps(sorted(overrides)), busy):
        refuse_duplicate(svc, overrides)
        return start(svc, body, overrides)


def refuse_duplicate(svc: Service, overrides: list[str]) -> None:
    """409 when a job this service started with the same overrides has not ended."""
    for job in svc.registry.service_jobs():
        if sorted(job["overrides"]) == sorted(overrides):
            status = svc.status_of(job)["status"]
            if status not in control.TERMINAL:
                raise control.Conflict(
                    f"job {job['id']} with the same overrides is {status}; pass force=true to start another"
                )


def start(svc: Service, body: StartIn, overrides: list[str]) -> Started:
    job_id = new_id("j")
    run_dir = svc.runs_dir / "serve" / job_id
    cfg, hydra_node = configs.compose(overrides, run_dir, svc.settings.allow_targets, node=body.launcher == "local")
    # the job's MLflow run, created now so its id is in this answer; the job's tracker fills it in. Only in the
    # operator's store: tracking.uri is the service's (configs.RESERVED_PATHS)
    ahead = create_run_ahead(cfg, run_dir, base=svc.runs_dir.parent)
    tracking = {"tracking_uri": ahead[0], "mlflow_run_id": ahead[1]} if ahead else {}
    own = [f"tracking.run_id={ahead[1]}"] if ahead else []
    try:
        process = launch(svc, job_id, [*overrides, *own], run_dir, body.launcher, body.slurm, hydra_node, cfg)
    except Exception:
        if ahead:
            end_run_ahead(*ahead, "FAILED")
        raise
    svc.registry.add_job(
        job_id, run_dir, launcher=body.launcher, overrides=overrides, config_id=body.config_id, **process, **tracking
    )
    return Started(job_id=job_id, run_dir=str(run_dir), mlflow_run_id=ahead[1] if ahead else None)


def launch(svc: Service, job_id, overrides, run_dir, kind, slurm: SlurmResources, hydra_node, cfg) -> dict:
    if kind == "local":
        return svc.launcher.start_local(job_id, overrides, run_dir)
    resources = configs.launcher_defaults(hydra_node) | slurm.model_dump(exclude_none=True)
    configs.check_ranks(cfg, resources)
    try:
        return svc.launcher.start_slurm(job_id, overrides, run_dir, resources) | {"slurm_resources": resources}
    except Exception as e:  # no sbatch, a partition SLURM refuses: the client's to fix
        raise HTTPException(422, f"SLURM refused the job: {str(e).strip().splitlines()[-1][:300]}") from None


@router.get("/api/training/jobs")
def list_jobs(
    svc: ServiceDep,
    status: Annotated[str | None, Query(max_length=20, description="RUNNING, FINISHED, ...")] = None,
    sweep: Annotated[
        str | None,
        Query(max_length=64, pattern=r"^[A-Za-z0-9_-]+$", description="a sweep's id: its trials; none: no trial"),
    ] = None,
) -> list[dict]:
    """The jobs this service started and the runs found in the runs directory (sweep trials with their sweep's id),
    newest first."""
    jobs = [
        j for j in svc.registry.jobs() if sweep is None or j.get("sweep_id") == (None if sweep == "none" else sweep)
    ]
    out = [svc.status_of(job) for job in jobs]
    return [j for j in out if status is None or j["status"] == status.upper()]


@router.get("/api/training/jobs/{job_id}/status")
def job_status(job_id: ID, svc: ServiceDep) -> JSONResponse:
    """status as in summary.json, step / num_steps, ETA, last metrics, SLURM job id and state."""
    return JSONResponse(svc.status_of(svc.job_or_404(job_id)))


@router.post("/api/training/jobs/{job_id}/stop", status_code=202)
def stop_job(job_id: ID, svc: ServiceDep) -> dict:
    """Graceful stop: the run finishes its step, saves a checkpoint and ends KILLED (409 if it has ended)."""
    job = svc.job_or_404(job_id)
    control.send(job, svc.status_of(job)["status"], signal.SIGTERM, "stop")
    svc.registry.mark_stop_requested(job_id)
    return {"job_id": job_id, "requested": "stop"}


@router.post("/api/training/jobs/{job_id}/checkpoint", status_code=202)
def checkpoint_job(job_id: ID, svc: ServiceDep) -> dict:
    """Save a checkpoint at the next step boundary and keep training."""
    job = svc.job_or_404(job_id)
    control.send(job, svc.status_of(job)["status"], signal.SIGUSR1, "checkpoint")
    return {"job_id": job_id, "requested": "checkpoint"}


@router.post("/api/training/jobs/{job_id}/profile", status_code=202)
def profile_job(job_id: ID, svc: ServiceDep, body: Annotated[ProfileIn | None, Body()] = None) -> dict:
    """Profile the next `steps` steps of a running job (torch.profiler: RUN_DIR/profile/steps_A-B/, and the run's
    MLflow artifacts); 409 when it is not running."""
    job = svc.job_or_404(job_id)
    status = svc.status_of(job)["status"]
    if status != "RUNNING":
        raise HTTPException(409, f"job {job_id} is {status}: only a running job can be profiled")
    steps = (body or ProfileIn()).steps
    write_request(Path(job["run_dir"]), steps)  # the run reads it at its next step boundary (exp.profiling)
    return {"job_id": job_id, "requested": "profile", "steps": steps}


@router.post("/api/training/jobs/{job_id}/resume", status_code=201)
def resume_job(job_id: ID, svc: ServiceDep, body: Annotated[ResumeIn | None, Body()] = None) -> Started:
    """Start the job again in its run directory from its newest (or the chosen) checkpoint, optionally with
    changes such as more steps (allow_config_change)."""
    with svc.claims.hold("resume " + job_id, f"job {job_id} is being resumed"):
        return resume(svc, job_id, body or ResumeIn())


def resume(svc: Service, job_id: str, body: ResumeIn) -> Started:
    job = svc.job_or_404(job_id)
    if job.get("sweep_id"):  # its sweep resumes it, so that its study (or grid) learns how it ended
        raise control.Conflict(
            f"job {job_id} is a trial of sweep {job['sweep_id']}: resume the sweep "
            f"(POST /api/training/sweeps/{job['sweep_id']}/resume)"
        )
    current = svc.status_of(job)
    status = current["status"]
    if status not in control.TERMINAL:
        raise control.Conflict(f"job {job_id} is {status}: stop it before resuming")
    run_dir = Path(job["run_dir"])
    path = resume_point(job_id, run_dir, body.step)
    configs.check_overrides(body.overrides, svc.settings.allow_targets)
    overrides = merge_overrides(job["overrides"], body.overrides)
    own = (f"resume.path={path}", f"resume.allow_config_change={str(body.allow_config_change).lower()}")
    kind = job["launcher"]

    def drift(cfg):  # refused here with the line the run would print, not after a launch
        check_config_change(path / "config.yaml", cfg, body.allow_config_change)

    cfg, hydra_node = configs.compose(
        overrides, run_dir, svc.settings.allow_targets, node=kind == "local", service_overrides=own, check=drift
    )
    resumed_at = current["step"] if body.step is None else body.step  # an earlier step starts a new branch
    if status == "FINISHED" and not body.force and cfg.stage.num_steps <= resumed_at:
        raise control.Conflict(
            f"job {job_id} finished at step {current['step']}: pass force=true to run its end again, or resume "
            "with more steps (stage.num_steps and allow_config_change=true)"
        )
    # the resources it was started with (its task count above all: a sharded checkpoint needs as many ranks)
    changes = body.slurm.model_dump(exclude_none=True) if body.slurm else {}
    slurm = SlurmResources.model_construct(**(job.get("slurm_resources") or {}) | changes)  # stored: validated
    process = launch(svc, job_id, [*overrides, *own], run_dir, kind, slurm, hydra_node, cfg)
    svc.registry.relaunched(job_id, launcher=kind, overrides=overrides, **process)
    return Started(
        job_id=job_id, run_dir=str(run_dir), mlflow_run_id=control.mlflow_run_id(control.run_record(run_dir), None)
    )


def resume_point(job_id: str, run_dir: Path, step: int | None) -> Path:
    """The checkpoint a resume starts from: the chosen step's, else the newest valid one."""
    if step is None:
        found = control.checkpoints(run_dir, None)
        if not found:
            raise control.Conflict(f"job {job_id} has no checkpoint to resume from")
        return Path(found[-1]["path"])
    path = control.checkpoint_dir(run_dir, step)
    if path is None:
        raise HTTPException(404, f"job {job_id} has no checkpoint at step {step}")
    return path


@router.get("/api/training/jobs/{job_id}/logs")
def job_logs(job_id: ID, svc: ServiceDep, tail_bytes: Annotated[int, Query(ge=1, le=1 << 20)] = 16384) -> dict:
    """The end of the job's console output (train.log for runs started from the command line)."""
    job = svc.job_or_404(job_id)
    path = Path(job["log_path"]) if job.get("log_path") else Path(job["run_dir"]) / "train.log"
    # the service's own logs lie under the runs directory; a CLI run's train.log in its run directory
    root = Path(job["run_dir"]) if path.is_relative_to(job["run_dir"]) else svc.runs_dir
    text = control.tail(root, path, tail_bytes)
    if job.get("slurm_job_id"):  # SLURM's messages and tracebacks: the job's stderr
        text += control.tail(root, path.with_suffix(".err"), tail_bytes)
    return {"job_id": job_id, "path": str(path), "text": text[-tail_bytes:]}


@router.get("/api/training/jobs/{job_id}/config")
def job_config(job_id: ID, svc: ServiceDep) -> dict:
    """The job's overrides and its resolved config as the run wrote it (.hydra/config.yaml; null before it has)."""
    job = svc.job_or_404(job_id)
    try:
        with open_inside(Path(job["run_dir"]), Path(".hydra") / "config.yaml") as f:
            text = f.read(CONFIG_BYTES).decode("utf-8", "replace")
    except (OSError, Refused):
        text = None
    return {"job_id": job_id, "overrides": job["overrides"], "config": text}


CONFIG_BYTES = 1 << 20  # a composed config is a few KiB; more is not one


def merge_overrides(base: list[str], changes: list[str]) -> list[str]:
    """`base` with `changes` applied: an override of the same key replaces the earlier one (Hydra refuses two)."""

    def key(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    changed = {key(c) for c in changes}
    return [b for b in base if key(b) not in changed] + list(changes)
