"""What every route of the job service shares: the operator's settings, the registry, the launcher, the metrics
cache, the claims that keep duplicate actions apart, and a job's status (with what a job's ending asks of the
service). Routes reach it as a dependency (`ServiceDep`)."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

from fastapi import Depends, HTTPException, Request

import exp.serve.configs as configs
import exp.serve.control as control
from exp.rundir import write_summary
from exp.serve.registry import Registry
from exp.tracking.parent import end_killed_run, end_run_ahead


@dataclass
class Settings:
    """What the operator chooses when starting the service (python -m exp.serve --help)."""

    runs_dir: Path = Path("runs")
    token: str | None = None  # bearer token every route but /api/health needs, when set
    hosts: tuple[str, ...] = ()  # Host header names accepted beyond the loopback ones (DNS rebinding)
    allow_targets: tuple[str, ...] = ()  # packages whose classes and functions configs may name (exp.targets)
    max_body_bytes: int = 64 * 1024
    poll_s: float = 0.5  # how often the event stream looks for new metric lines
    extra: dict = field(default_factory=dict)


class Service:
    """The state behind the routes, one per app."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.runs_dir = Path(settings.runs_dir).resolve()
        self.registry = Registry(self.runs_dir)
        self.launcher = control.Launcher(self.runs_dir, env=configs.job_env(settings.allow_targets))
        self.cache = control.MetricsCache()
        self.claims = control.Claims()  # starts and resumes under way: a duplicate is refused, not raced
        self.evaluations: dict = {}  # job id -> the `python -m exp.eval` process "evaluate now" started

    def job_or_404(self, job_id: str) -> dict:
        job = self.registry.job(job_id)
        if job is None:
            raise HTTPException(404, f"no job {job_id}")
        return job

    def status_of(self, job: dict) -> dict:
        """The job's status, and, once, what its ending asks of the service: a launch a signal ended recorded, a run
        created ahead that its tracker never took closed. In the background, so no request waits on MLflow."""
        out = control.job_status(job, self.launcher, self.cache)
        registry, ahead = self.registry, job.get("mlflow_run_id")
        unrecorded = (job.get("ended_launch") or 0) < (job.get("launches") or 1)
        if out["signal"] and unrecorded and registry.claim_ending(job["id"]):
            registry.claim_ahead_close(job["id"])  # the run created ahead is closed below, if still open
            threading.Thread(target=record_kill, args=(job, out), daemon=True, name="close-run").start()
        elif (
            ahead
            and out["status"] in control.TERMINAL
            and not job.get("ahead_closed")
            and control.mlflow_run_id(control.run_record(Path(job["run_dir"])), None) != ahead
            and registry.claim_ahead_close(job["id"])  # one request closes it, however many poll
        ):  # ended before its tracker took the run created ahead of it: closed, never left SCHEDULED
            ending = "KILLED" if out["status"] == "KILLED" else "FAILED"
            threading.Thread(
                target=end_run_ahead, args=(job["tracking_uri"], ahead, ending), daemon=True, name="close-run"
            ).start()
        return out


def record_kill(job: dict, out: dict) -> None:
    """A launch that a signal ended (SIGKILL, the OOM killer), once: its summary.json (unless the run wrote its own)
    and its MLflow run closed, since the run itself could do neither."""
    summary = control.killed_summary(job, out)
    if summary is not None:
        write_summary(job["run_dir"], summary)
    found = control.killed_run(job)
    if found is not None:
        end_killed_run(*found, status=out["status"] if out["status"] in control.TERMINAL else "KILLED")


def service(request: Request) -> Service:
    return request.app.state.service


ServiceDep = Annotated[Service, Depends(service)]
