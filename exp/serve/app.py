"""The HTTP API (FastAPI) and the dashboard's static files: configs, jobs, metrics, checkpoints and sweeps.

Every answer is read from the run directories, sweep manifests and the registry; bad input gets a 4xx with one
line in `detail`, never a 5xx.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
import subprocess
import sys
import tarfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, BinaryIO, Literal
from urllib.parse import quote

from fastapi import Body, FastAPI, HTTPException, Query, Request
from fastapi import Path as PathParam
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from pydantic import BaseModel, ConfigDict, Field

import exp.serve.configs as configs
import exp.serve.control as control
from exp.checkpoint.checkpointer import check_config_change
from exp.errors import ConfigError
from exp.rundir import read_summary, write_summary
from exp.serve.guard import Guard, Refused, open_inside, read_inside
from exp.serve.registry import Registry, new_id, run_id_for
from exp.tracking.parent import create_run_ahead, end_killed_run, end_run_ahead

STATIC = Path(__file__).parent / "static"
ID = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_]{1,64}$", description="an id the service gave out")]
CHECKPOINT_ID = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_]{1,64}-[0-9]{1,12}$", description="JOBID-STEP")]
Override = Annotated[str, Field(min_length=1, max_length=configs.MAX_OVERRIDE_CHARS)]
Overrides = Annotated[list[Override], Field(max_length=configs.MAX_OVERRIDES)]


@dataclass
class Settings:
    """What the operator chooses when starting the service (python -m exp.serve --help)."""

    runs_dir: Path = Path("runs")
    token: str | None = None  # bearer token every route but /api/health needs, when set
    hosts: tuple[str, ...] = ()  # Host header names accepted beyond the loopback ones (DNS rebinding)
    allow_targets: tuple[str, ...] = ()  # _target_ prefixes allowed over HTTP beyond exp's own and torch.optim
    max_body_bytes: int = 64 * 1024
    poll_s: float = 0.5  # how often the event stream looks for new metric lines
    extra: dict = field(default_factory=dict)


# --- bodies ---------------------------------------------------------------------------------------------------


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    overrides: Overrides = []


class SlurmResources(Strict):
    partition: str | None = Field(None, max_length=100)
    account: str | None = Field(None, max_length=100)
    qos: str | None = Field(None, max_length=100)
    constraint: str | None = Field(None, max_length=200)
    cpus_per_task: int | None = Field(None, ge=1, le=1024)
    mem_gb: int | None = Field(None, ge=1, le=4096)
    timeout_min: int | None = Field(None, ge=1, le=60 * 24 * 30)
    gpus_per_node: int | None = Field(None, ge=0, le=64)
    nodes: int | None = Field(None, ge=1, le=1024)
    tasks_per_node: int | None = Field(None, ge=1, le=64, description="processes per node: DDP/FSDP ranks")


class StartIn(Strict):
    config_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,64}$")
    overrides: Overrides = []  # added after the stored config's, when both are given
    launcher: Literal["local", "slurm"] = "local"
    slurm: SlurmResources = SlurmResources()
    force: bool = Field(False, description="start it even while a job with the same overrides runs")


class ResumeIn(Strict):
    step: int | None = Field(None, ge=0, description="checkpoint step to resume from; the newest valid when absent")
    overrides: Overrides = []  # allowed changes, e.g. stage.num_steps=600 (needs allow_config_change)
    allow_config_change: bool = False
    slurm: SlurmResources | None = None  # changes to the SLURM resources the job was started with (a longer time)
    force: bool = Field(False, description="resume a FINISHED job without more steps (runs its end again)")


class RelaunchIn(Strict):
    force: bool = Field(False, description="relaunch even while the sweep's process or a trial still runs")


class SearchIn(Strict):
    """exp's Optuna sweeper (hydra/sweeper=optuna) over the overrides' search space."""

    n_trials: int = Field(20, ge=1, le=1000)
    parallelism: int = Field(1, ge=1, le=64, description="trials in flight (local subprocesses or SLURM jobs)")
    sampler: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    direction: Literal["minimize", "maximize"] = "minimize"
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="the sampler's seed")


class SweepIn(Strict):
    overrides: Overrides = []  # a grid (KEY=a,b,c, range()) or, with `search`, a search space (interval(), ...)
    launcher: Literal["local", "slurm"] = "local"
    search: SearchIn | None = None  # an Optuna study; without it, the grid's every point, each validated first


class Started(BaseModel):
    job_id: str
    run_dir: str
    mlflow_run_id: str | None


# --- the app ------------------------------------------------------------------------------------------------


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    runs_dir = Path(settings.runs_dir).resolve()
    registry = Registry(runs_dir)
    launcher = control.Launcher(runs_dir, env=configs.job_env(settings.allow_targets))
    cache = control.MetricsCache()
    claims = control.Claims()  # starts and resumes under way: a duplicate is refused, not raced
    app = FastAPI(
        title="exp job service",
        version="1",
        description="Compose, launch, watch, steer and resume exp runs and sweeps.",
        docs_url=None,  # Swagger UI and ReDoc load their assets from a CDN: blank offline; /openapi.json stays
        redoc_url=None,
    )
    app.state.settings, app.state.registry, app.state.launcher = settings, registry, launcher

    app.add_middleware(Guard, token=settings.token, max_body_bytes=settings.max_body_bytes, hosts=tuple(settings.hosts))

    @app.exception_handler(ConfigError)
    async def config_error(request: Request, e: ConfigError):
        return JSONResponse({"detail": e.line()}, 422)

    @app.exception_handler(control.Conflict)
    async def conflict(request: Request, e: control.Conflict):
        return JSONResponse({"detail": str(e)}, 409)

    @app.exception_handler(Refused)
    async def refused(request: Request, e: Refused):
        return JSONResponse({"detail": str(e)}, 404)

    def job_or_404(job_id: str) -> dict:
        job = registry.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def status_of(job: dict) -> dict:
        out = control.job_status(job, launcher, cache)
        ahead = job.get("mlflow_run_id")
        unrecorded = (job.get("ended_launch") or 0) < (job.get("launches") or 1)
        if out["signal"] and unrecorded and registry.claim_ending(job["id"]):
            registry.claim_ahead_close(job["id"])  # the run created ahead is closed below, if still open
            threading.Thread(target=record_kill, args=(job, out), daemon=True, name="close-run").start()
        elif (
            ahead
            and out["status"] in control.TERMINAL
            and not job.get("ahead_closed")
            and control.mlflow_run_id(Path(job["run_dir"]), None) != ahead
            and registry.claim_ahead_close(job["id"])  # one request closes it, however many poll
        ):  # ended before its tracker took the run created ahead of it: closed, never left SCHEDULED; in the
            # background, so no request (nor the event stream's loop) waits on MLflow
            ending = "KILLED" if out["status"] == "KILLED" else "FAILED"
            threading.Thread(
                target=end_run_ahead, args=(job["tracking_uri"], ahead, ending), daemon=True, name="close-run"
            ).start()
        return out

    def record_kill(job: dict, out: dict) -> None:
        """A launch that a signal ended (SIGKILL, the OOM killer), once: its summary.json (unless the run wrote its
        own) and its MLflow run closed, since the run itself could do neither."""
        summary = control.killed_summary(job, out)
        if summary is not None:
            write_summary(job["run_dir"], summary)
        found = control.killed_run(job)
        if found is not None:
            end_killed_run(*found, status=out["status"] if out["status"] in control.TERMINAL else "KILLED")

    # --- service ----------------------------------------------------------------------------------------

    @app.get("/api/health", tags=["service"])
    def health() -> dict:
        """Liveness; the only route that needs no token."""
        return {"ok": True}

    @app.get("/api/options", tags=["service"])
    def options() -> dict:
        """The options of every config group in conf/, and the launchers."""
        return {"groups": configs.group_options(), "launchers": ["local", "slurm"]}

    # --- configs ----------------------------------------------------------------------------------------

    @app.post("/api/training/configs", status_code=201, tags=["configs"])
    def create_config(body: ConfigIn) -> dict:
        """Store a named set of overrides once it composes and validates as train.py would (422 with the CLI's
        line otherwise)."""
        configs.compose(body.overrides, runs_dir / "serve" / "_validate", settings.allow_targets, node=False)
        return registry.add_config(body.name, body.overrides)

    @app.get("/api/training/configs", tags=["configs"])
    def list_configs() -> list[dict]:
        return registry.configs()

    @app.get("/api/training/configs/{config_id}", tags=["configs"])
    def get_config(config_id: ID) -> dict:
        found = registry.config(config_id)
        if found is None:
            raise HTTPException(404, f"no config {config_id}")
        return found

    @app.delete("/api/training/configs/{config_id}", tags=["configs"])
    def delete_config(config_id: ID) -> dict:
        if not registry.delete_config(config_id):
            raise HTTPException(404, f"no config {config_id}")
        return {"deleted": config_id}

    # --- jobs -------------------------------------------------------------------------------------------

    @app.post("/api/training/jobs/start", status_code=201, tags=["jobs"])
    def start_job(body: StartIn) -> Started:
        """Validate and launch a run (locally, or on SLURM with the hardware option's resources)."""
        overrides = list(body.overrides)
        if body.config_id is not None:
            stored = registry.config(body.config_id)
            if stored is None:
                raise HTTPException(404, f"no config {body.config_id}")
            overrides = merge_overrides(stored["overrides"], overrides)
        if body.force:
            return start(body, overrides)
        busy = "a job with the same overrides is being started; pass force=true to start another"
        with claims.hold("start " + json.dumps(sorted(overrides)), busy):
            refuse_duplicate(overrides)
            return start(body, overrides)

    def refuse_duplicate(overrides: list[str]) -> None:
        """409 when a job this service started with the same overrides has not ended."""
        for job in registry.service_jobs():
            if sorted(job["overrides"]) == sorted(overrides):
                status = status_of(job)["status"]
                if status not in control.TERMINAL:
                    raise control.Conflict(
                        f"job {job['id']} with the same overrides is {status}; pass force=true to start another"
                    )

    def start(body: StartIn, overrides: list[str]) -> Started:
        job_id = new_id("j")
        run_dir = runs_dir / "serve" / job_id
        cfg, hydra_node = configs.compose(overrides, run_dir, settings.allow_targets, node=body.launcher == "local")
        # the job's MLflow run, created now so its id is in this answer; the job's tracker fills it in. Only in the
        # store the operator configured: the service itself connects to no URI a client named
        own_store = not any(o.split("=", 1)[0].lstrip("+~").startswith("tracking.uri") for o in overrides)
        ahead = create_run_ahead(cfg, run_dir, base=runs_dir.parent) if own_store else None
        tracking = {"tracking_uri": ahead[0], "mlflow_run_id": ahead[1]} if ahead else {}
        own = [f"tracking.run_id={ahead[1]}"] if ahead else []
        try:
            process = launch(job_id, [*overrides, *own], run_dir, body.launcher, body.slurm, hydra_node, cfg)
        except Exception:
            if ahead:
                end_run_ahead(*ahead, "FAILED")
            raise
        registry.add_job(
            job_id,
            run_dir,
            launcher=body.launcher,
            overrides=overrides,
            config_id=body.config_id,
            **process,
            **tracking,
        )
        return Started(job_id=job_id, run_dir=str(run_dir), mlflow_run_id=ahead[1] if ahead else None)

    def launch(job_id, overrides, run_dir, kind, slurm: SlurmResources, hydra_node, cfg) -> dict:
        if kind == "local":
            return launcher.start_local(job_id, overrides, run_dir)
        resources = configs.launcher_defaults(hydra_node) | slurm.model_dump(exclude_none=True)
        configs.check_ranks(cfg, resources)
        try:
            return launcher.start_slurm(job_id, overrides, run_dir, resources) | {"slurm_resources": resources}
        except Exception as e:  # no sbatch, a partition SLURM refuses: the client's to fix
            raise HTTPException(422, f"SLURM refused the job: {str(e).strip().splitlines()[-1][:300]}") from None

    @app.get("/api/training/jobs", tags=["jobs"])
    def list_jobs(
        status: Annotated[str | None, Query(max_length=20, description="RUNNING, FINISHED, ...")] = None,
    ) -> list[dict]:
        """The jobs this service started and the runs found in the runs directory, newest first."""
        out = [status_of(job) for job in registry.jobs()]
        return [j for j in out if status is None or j["status"] == status.upper()]

    @app.get("/api/training/jobs/{job_id}/status", tags=["jobs"])
    def job_status(job_id: ID) -> JSONResponse:
        """status as in summary.json, step / num_steps, ETA, last metrics, SLURM job id and state."""
        return JSONResponse(status_of(job_or_404(job_id)))

    @app.post("/api/training/jobs/{job_id}/stop", status_code=202, tags=["jobs"])
    def stop_job(job_id: ID) -> dict:
        """Graceful stop: the run finishes its step, saves a checkpoint and ends KILLED (409 if it has ended)."""
        job = job_or_404(job_id)
        control.send(job, status_of(job)["status"], signal.SIGTERM, "stop")
        registry.mark_stop_requested(job_id)
        return {"job_id": job_id, "requested": "stop"}

    @app.post("/api/training/jobs/{job_id}/checkpoint", status_code=202, tags=["jobs"])
    def checkpoint_job(job_id: ID) -> dict:
        """Save a checkpoint at the next step boundary and keep training."""
        job = job_or_404(job_id)
        control.send(job, status_of(job)["status"], signal.SIGUSR1, "checkpoint")
        return {"job_id": job_id, "requested": "checkpoint"}

    @app.post("/api/training/jobs/{job_id}/resume", status_code=201, tags=["jobs"])
    def resume_job(job_id: ID, body: Annotated[ResumeIn | None, Body()] = None) -> Started:
        """Start the job again in its run directory from its newest (or the chosen) checkpoint, optionally with
        changes such as more steps (allow_config_change)."""
        with claims.hold("resume " + job_id, f"job {job_id} is being resumed"):
            return resume(job_id, body or ResumeIn())

    def resume(job_id: str, body: ResumeIn) -> Started:
        job = job_or_404(job_id)
        current = status_of(job)
        status = current["status"]
        if status not in control.TERMINAL:
            raise control.Conflict(f"job {job_id} is {status}: stop it before resuming")
        run_dir = Path(job["run_dir"])
        if body.step is None:
            found = control.checkpoints(run_dir, None)
            if not found:
                raise control.Conflict(f"job {job_id} has no checkpoint to resume from")
            path = Path(found[-1]["path"])
        else:
            path = control.checkpoint_dir(run_dir, body.step)
            if path is None:
                raise HTTPException(404, f"job {job_id} has no checkpoint at step {body.step}")
        configs.check_overrides(body.overrides, settings.allow_targets)
        overrides = merge_overrides(job["overrides"], body.overrides)
        own = (f"resume.path={path}", f"resume.allow_config_change={str(body.allow_config_change).lower()}")
        kind = job["launcher"]

        def drift(cfg):  # refused here with the line the run would print, not after a launch
            check_config_change(path / "config.yaml", cfg, body.allow_config_change)

        cfg, hydra_node = configs.compose(
            overrides, run_dir, settings.allow_targets, node=kind == "local", service_overrides=own, check=drift
        )
        if status == "FINISHED" and not body.force and cfg.stage.num_steps <= current["step"]:
            raise control.Conflict(
                f"job {job_id} finished at step {current['step']}: pass force=true to run its end again, or resume "
                "with more steps (stage.num_steps and allow_config_change=true)"
            )
        # the resources it was started with (its task count above all: a sharded checkpoint needs as many ranks)
        changes = body.slurm.model_dump(exclude_none=True) if body.slurm else {}
        slurm = SlurmResources.model_construct(**(job.get("slurm_resources") or {}) | changes)  # stored: validated
        process = launch(job_id, [*overrides, *own], run_dir, kind, slurm, hydra_node, cfg)
        registry.relaunched(job_id, launcher=kind, overrides=overrides, **process)
        return Started(job_id=job_id, run_dir=str(run_dir), mlflow_run_id=control.mlflow_run_id(run_dir, None))

    @app.get("/api/training/jobs/{job_id}/logs", tags=["jobs"])
    def job_logs(job_id: ID, tail_bytes: Annotated[int, Query(ge=1, le=1 << 20)] = 16384) -> dict:
        """The end of the job's console output (train.log for runs started from the command line)."""
        job = job_or_404(job_id)
        path = Path(job["log_path"]) if job.get("log_path") else Path(job["run_dir"]) / "train.log"
        # the service's own logs lie under the runs directory; a CLI run's train.log in its run directory
        root = Path(job["run_dir"]) if path.is_relative_to(job["run_dir"]) else runs_dir
        text = control.tail(root, path, tail_bytes)
        if job.get("slurm_job_id"):  # SLURM's messages and tracebacks: the job's stderr
            text += control.tail(root, path.with_suffix(".err"), tail_bytes)
        return {"job_id": job_id, "path": str(path), "text": text[-tail_bytes:]}

    # --- metrics ----------------------------------------------------------------------------------------

    @app.get("/api/training/jobs/{job_id}/metrics", tags=["metrics"])
    def job_metrics(job_id: ID) -> JSONResponse:
        """The newest value of every metric, each with its step."""
        job = job_or_404(job_id)
        return JSONResponse({"job_id": job_id, "metrics": cache.latest(Path(job["run_dir"]))})

    @app.get("/api/training/jobs/{job_id}/metrics/history", tags=["metrics"])
    def metrics_history(
        job_id: ID,
        key: Annotated[list[str] | None, Query(max_length=32)] = None,
        min_step: Annotated[int | None, Query(ge=0)] = None,
        max_step: Annotated[int | None, Query(ge=0)] = None,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
        limit: Annotated[int, Query(ge=1, le=10000)] = 1000,
    ) -> dict:
        """metrics.jsonl lines, filtered by metric key(s) and step range, paged (offset, limit)."""
        rows = cache.rows(Path(job_or_404(job_id)["run_dir"]))
        picked = []
        for row in rows:
            if (min_step is not None and row["step"] < min_step) or (max_step is not None and row["step"] > max_step):
                continue
            if key:
                values = {k: row[k] for k in key if k in row}
                if not values:
                    continue
                row = {"step": row["step"], **values}
            picked.append(row)
        page = picked[offset : offset + limit]
        following = offset + limit if offset + limit < len(picked) else None
        return {"job_id": job_id, "total": len(picked), "offset": offset, "next_offset": following, "rows": page}

    @app.get("/api/training/jobs/{job_id}/throughput", tags=["metrics"])
    def throughput(job_id: ID) -> dict:
        """Tokens/s and step time: the newest interval's, the mean over the run, and summary.json's steady state."""
        job = job_or_404(job_id)
        rows = [r for r in cache.rows(Path(job["run_dir"])) if "perf/tokens_per_s" in r]
        summary = read_summary(job["run_dir"]) or {}
        values = [r["perf/tokens_per_s"] for r in rows]
        return {
            "job_id": job_id,
            "tokens_per_s": values[-1] if values else None,
            "mean_tokens_per_s": sum(values) / len(values) if values else None,
            "step_ms": rows[-1].get("perf/step_ms") if rows else None,
            "samples_per_s": rows[-1].get("perf/samples_per_s") if rows else None,
            "summary_tokens_per_s": summary.get("tokens_per_s"),
            "history": [{"step": r["step"], "tokens_per_s": r["perf/tokens_per_s"]} for r in rows[-200:]],
        }

    @app.get("/api/training/jobs/{job_id}/metrics/stream", tags=["metrics"])
    async def metrics_stream(
        request: Request, job_id: ID, after_step: Annotated[int, Query(ge=-1)] = -1
    ) -> StreamingResponse:
        """Server-sent events: one `metrics` event per metrics.jsonl line after `after_step`, then an `end` event
        with the final status."""
        job = job_or_404(job_id)
        run_dir = Path(job["run_dir"])

        async def events():
            sent, last_beat = 0, time.monotonic()
            rows = cache.rows(run_dir)
            while sent < len(rows) and rows[sent]["step"] <= after_step:
                sent += 1
            while not await request.is_disconnected():
                rows = cache.rows(run_dir)
                if len(rows) < sent:  # rewritten by a resume
                    sent = 0
                for row in rows[sent:]:
                    yield f"event: metrics\ndata: {json.dumps(row)}\n\n"
                sent = len(rows)
                status = status_of(registry.job(job_id) or job)["status"]
                if status in control.TERMINAL and len(cache.rows(run_dir)) == sent:
                    yield f"event: end\ndata: {json.dumps({'status': status})}\n\n"
                    return
                if time.monotonic() - last_beat > 15:
                    yield ": keep-alive\n\n"
                    last_beat = time.monotonic()
                await asyncio.sleep(settings.poll_s)

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    # --- checkpoints ------------------------------------------------------------------------------------

    @app.get("/api/training/jobs/{job_id}/checkpoints", tags=["checkpoints"])
    def job_checkpoints(job_id: ID) -> list[dict]:
        """Checkpoints: id (for download), step, bytes, SHA-256 of each file, and which is best."""
        job = job_or_404(job_id)
        found = control.checkpoints(Path(job["run_dir"]), read_summary(job["run_dir"]))
        return [{"id": f"{job_id}-{c['step']}", **c} for c in found]

    @app.get("/api/training/checkpoints/{checkpoint_id}/download", tags=["checkpoints"])
    def download(
        checkpoint_id: CHECKPOINT_ID, file: Annotated[str | None, Query(max_length=300)] = None
    ) -> StreamingResponse:
        """The checkpoint as a tar stream (manifest.json first: it holds each file's SHA-256), or one `file` of it
        with its SHA-256 in the X-Checksum-SHA256 and Digest headers."""
        job_id, _, step = checkpoint_id.rpartition("-")
        run_dir = Path(job_or_404(job_id)["run_dir"])
        path = control.checkpoint_dir(run_dir, int(step))
        if path is None:
            raise HTTPException(404, f"no checkpoint {checkpoint_id}")
        folder = Path("checkpoints") / path.name  # every file is read through open_inside: no symlink followed
        try:
            manifest_bytes = read_inside(run_dir, folder / control.MANIFEST)
            files = json.loads(manifest_bytes)["files"]
        except (OSError, ValueError, KeyError, TypeError):
            files = None
        if not isinstance(files, dict):
            raise HTTPException(404, f"checkpoint {checkpoint_id} has no readable manifest")
        if file is not None:
            return _one_file(run_dir, folder / file, files.get(file), f"{file!r} is not a file of {checkpoint_id}")
        opened = _open_listed(run_dir, folder, [n for n in files if n != control.MANIFEST])
        headers = {
            "Content-Disposition": f'attachment; filename="{checkpoint_id}.tar"',
            "X-Manifest-SHA256": _sha256(manifest_bytes),
            "Content-Length": str(_tar_size([len(manifest_bytes), *(size for _, _, size in opened)])),
        }
        stream = _tar_stream(path.name, manifest_bytes, opened)
        return StreamingResponse(stream, media_type="application/x-tar", headers=headers)

    # --- sweeps -----------------------------------------------------------------------------------------

    def sweeps() -> dict[str, Path]:
        from exp.sweep.manifest import is_sweep_dir

        found = {}
        level = [runs_dir]
        for _ in range(4):
            following = []
            for folder in level:
                try:
                    children = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
                except OSError:
                    continue
                for child in children:
                    if is_sweep_dir(child):
                        found[run_id_for(child).replace("r", "s", 1)] = child
                    elif not child.name.isdigit() and child.name not in ("checkpoints", "mlartifacts"):
                        if child == runs_dir / "serve":  # the jobs' run directories
                            continue
                        following.append(child)
            level = following
        started = {s["id"]: Path(s["sweep_dir"]) for s in registry.sweeps()}  # the service's: their folder's name
        return {**started, **{i: p for i, p in found.items() if p not in started.values()}}

    def sweep_or_404(sweep_id: str) -> Path:
        path = sweeps().get(sweep_id)
        if path is None:
            raise HTTPException(404, f"no sweep {sweep_id}")
        return path

    def sweep_view(sweep_id: str, path: Path) -> dict:
        from exp.sweep.manifest import SweepError, load_sweep, trials_of

        process = registry.sweep(sweep_id)  # the process the service started for it, if any
        try:
            manifest = load_sweep(path, write=False)
        except (SweepError, OSError, ValueError) as e:
            starting = process is not None and control.process_alive(process)  # sweep.json not written yet
            error = None if starting else str(e)
            if process is not None and not starting:
                error += f" (its process ended, exit {launcher.poll(process['pid'])}: see {process['log_path']})"
            return {
                "sweep_id": sweep_id,
                "sweep_dir": str(path),
                "status": "STARTING" if starting else "FAILED" if process else "UNKNOWN",
                "error": error,
                "trials": [],
                "counts": {},
                "best": None,
            }
        trials = [
            {
                k: t.get(k)
                for k in (
                    "num",
                    "status",
                    "overrides",
                    "run_dir",
                    "val_loss",
                    "step",
                    "num_steps",
                    "slurm_job_id",
                    "mlflow_run_id",
                    "error",
                )
            }
            for t in trials_of(manifest)
        ]
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

    @app.get("/api/training/sweeps", tags=["sweeps"])
    def list_sweeps() -> list[dict]:
        """Sweeps under the runs directory with their trial counts by status (PENDING, RUNNING, PRUNED, ...)."""
        return [{k: v for k, v in sweep_view(i, p).items() if k != "trials"} for i, p in sweeps().items()]

    @app.get("/api/training/sweeps/{sweep_id}", tags=["sweeps"])
    def get_sweep(sweep_id: ID) -> dict:
        """A sweep's trials with status, overrides, val loss, SLURM job and MLflow run."""
        return sweep_view(sweep_id, sweep_or_404(sweep_id))

    def relaunch_sweep(sweep_id: str, mode: str, force: bool) -> dict:
        path = sweep_or_404(sweep_id)
        with claims.hold("sweep " + sweep_id, f"sweep {sweep_id} is being relaunched"):
            view = sweep_view(sweep_id, path)
            if not view["trials"] and view["status"] != "STARTING":
                raise control.Conflict(f"sweep {sweep_id} has no trials to {mode}: {view['error']}")
            why = "starting" if view["status"] == "STARTING" else None
            why = why or control.sweep_running(registry.sweep(sweep_id), view["trials"])
            if why and not force:
                raise control.Conflict(f"sweep {sweep_id} is still running ({why}); pass force=true to {mode} anyway")
            return sweep_tool(sweep_id, path, mode)

    def sweep_tool(sweep_id: str, path: Path, mode: str) -> dict:
        """python -m exp.sweep MODE SWEEP_DIR in the background, recorded as the sweep's process."""
        log_dir = runs_dir / ".serve" / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{sweep_id}-{mode}-{int(time.time())}.log"
        with open(log_path, "ab") as log:
            child = launcher.spawn(
                [sys.executable, "-m", "exp.sweep", mode, str(path)],
                cwd=runs_dir.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, "PYTHONPATH": str(configs.ROOT)},
            )
        registry.add_sweep(sweep_id, path, **process_of(child, log_path))
        return {"sweep_id": sweep_id, "requested": mode, "pid": child.pid, "log_path": str(log_path)}

    def process_of(child: subprocess.Popen, log_path: Path) -> dict:
        return {"pid": child.pid, "pid_start": control.process_start_time(child.pid), "log_path": str(log_path)}

    @app.post("/api/training/sweeps/start", status_code=201, tags=["sweeps"])
    def start_sweep(body: SweepIn) -> dict:
        """A sweep: `train.py -m` through exp's launchers (here: one trial after another, or `parallelism`
        subprocesses; on SLURM: jobs). A grid starts once every point composes and validates; an Optuna search
        (`search`) once a point of its space does, with every value of each choice (422 with the CLI's line
        otherwise)."""
        sweep_dir = runs_dir / "multirun" / "serve" / new_id("s")
        local = body.launcher == "local"
        search = body.search
        if search is None:
            points = configs.sweep_points(body.overrides)
            sweeper = []
            launcher_name = "exp_basic" if local else "exp_slurm"
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
            configs.compose(point, sweep_dir / str(num), settings.allow_targets, node=local)
        command = [
            sys.executable,
            str(configs.TRAIN_PY),
            "-m",
            *sweeper,
            *body.overrides,
            f"hydra/launcher={launcher_name}",
        ]
        log_dir = runs_dir / ".serve" / "logs"
        log_dir.mkdir(parents=True, exist_ok=True)
        log_path = log_dir / f"{sweep_dir.name}.log"
        with open(log_path, "ab") as log:
            child = launcher.spawn(
                [*command, f"hydra.sweep.dir={sweep_dir}"],
                cwd=runs_dir.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        sweep_id = sweep_dir.name  # listed under it at once (STARTING until the sweep writes sweep.json)
        registry.add_sweep(sweep_id, sweep_dir, **process_of(child, log_path))
        return {
            "sweep_id": sweep_id,
            "sweep_dir": str(sweep_dir),
            "num_points": len(points) if search is None else search.n_trials,
            "sweeper": "grid" if search is None else "optuna",
            "pid": child.pid,
            "log_path": str(log_path),
        }

    @app.post("/api/training/sweeps/{sweep_id}/resume", status_code=202, tags=["sweeps"])
    def resume_sweep(sweep_id: ID, body: Annotated[RelaunchIn | None, Body()] = None) -> dict:
        """python -m exp.sweep resume: every unfinished trial continues from its newest checkpoint (409 while the
        sweep still runs, unless `force`)."""
        return relaunch_sweep(sweep_id, "resume", bool(body and body.force))

    @app.post("/api/training/sweeps/{sweep_id}/rerun-failed", status_code=202, tags=["sweeps"])
    def rerun_failed(sweep_id: ID, body: Annotated[RelaunchIn | None, Body()] = None) -> dict:
        """python -m exp.sweep rerun-failed: the FAILED trials run again (409 while the sweep still runs, unless
        `force`)."""
        return relaunch_sweep(sweep_id, "rerun-failed", bool(body and body.force))

    # --- dashboard --------------------------------------------------------------------------------------

    @app.get("/", include_in_schema=False)
    def dashboard() -> FileResponse:
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


def merge_overrides(base: list[str], changes: list[str]) -> list[str]:
    """`base` with `changes` applied: an override of the same key replaces the earlier one (Hydra refuses two)."""

    def key(item: str) -> str:
        return item.split("=", 1)[0].lstrip("+~")

    changed = {key(c) for c in changes}
    return [b for b in base if key(b) not in changed] + list(changes)


def _sha256(data: bytes) -> str:
    import hashlib

    return hashlib.sha256(data).hexdigest()


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _tar_size(sizes: list[int]) -> int:
    return sum(512 + s + (-s) % 512 for s in sizes) + 1024


def _tar_stream(folder: str, manifest_bytes: bytes, opened: list[tuple[str, BinaryIO, int]]):
    """An uncompressed tar, written as it is sent: <checkpoint>/manifest.json, then each file it lists."""
    try:
        yield _tar_header(f"{folder}/{control.MANIFEST}", len(manifest_bytes))
        yield manifest_bytes + b"\0" * ((-len(manifest_bytes)) % 512)
        for name, f, size in opened:
            yield _tar_header(f"{folder}/{name}", size)
            yield from _chunks(f, size)
            yield b"\0" * ((-size) % 512)
        yield b"\0" * 1024
    finally:
        for _, f, _ in opened:
            f.close()


def _open_listed(run_dir: Path, folder: Path, names: list[str]) -> list[tuple[str, BinaryIO, int]]:
    """Each listed file that is there, opened now (its size fixed for Content-Length); Refused (404) when one is a
    symlink or no regular file inside the checkpoint."""
    opened = []
    try:
        for name in names:
            try:
                f = open_inside(run_dir, folder / name)
            except OSError:  # missing: left out, as before
                continue
            opened.append((name, f, os.fstat(f.fileno()).st_size))
    except BaseException:
        for _, f, _ in opened:
            f.close()
        raise
    return opened


def _one_file(run_dir: Path, relative: Path, entry, missing: str) -> StreamingResponse:
    """One file a checkpoint's manifest lists, with the manifest's SHA-256 in X-Checksum-SHA256 and Digest."""
    try:
        digest = base64.b64encode(bytes.fromhex(entry["sha256"])).decode()
        f = open_inside(run_dir, relative)
    except (TypeError, KeyError, ValueError, OSError, Refused):
        raise HTTPException(404, missing) from None
    size = os.fstat(f.fileno()).st_size
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": _attachment(relative.name),
        "X-Checksum-SHA256": entry["sha256"],
        "Digest": f"sha-256={digest}",
    }
    return StreamingResponse(_chunks(f, size), media_type="application/octet-stream", headers=headers)


def _chunks(f: BinaryIO, size: int):
    """`size` bytes of an opened file, then closed; zeros for what it lost since it was opened (the SHA-256 tells)."""
    with f:
        left = size
        while left and (chunk := f.read(min(left, 1 << 20))):
            left -= len(chunk)
            yield chunk
        if left:
            yield b"\0" * left


def _attachment(name: str) -> str:
    quoted = quote(name)
    return f'attachment; filename="{name}"' if quoted == name else f"attachment; filename*=utf-8''{quoted}"
