"""Supervising a sweep's trials to their end: every job is watched until it has ended (a result, or SLURM or the
run lock saying it is gone), and each trial is recorded once, with one status everywhere.

A trial's status is its summary.json's (FINISHED, PRUNED, FAILED, KILLED); a job that ended without one was
killed (SIGKILL, node failure, out of memory, scancel before training) and is KILLED, its MLflow run closed.
Ctrl-C stops the sweep: the trials in flight finish their step, save a checkpoint and end KILLED while the
launcher waits for them; a second Ctrl-C stops waiting.
"""

from __future__ import annotations

import logging
import math
import re
import signal
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from exp.sweep.jobs import SlurmState, close_left_running, fresh_summary, slurm_states
from exp.sweep.manifest import killed_error, read_manifest, refresh_trial, write_manifest
from exp.text import first_line

log = logging.getLogger("exp")

SLURM_POLL_S = 5.0  # sacct is asked at most this often while jobs run
INTERRUPTED_EXIT = 130  # 128 + SIGINT, as a shell reports Ctrl-C


@dataclass
class Flight:
    """A started trial: its number, its job (a submitit job, or anything with done() and results()), its run dir
    and when it was started (a summary.json older than that is an earlier launch's)."""

    number: int
    job: Any
    run_dir: Path
    started: float | None = None

    @property
    def slurm_id(self) -> str | None:
        return str(self.job.job_id) if is_slurm_job(self.job) else None


@dataclass
class Outcome:
    """How a trial ended: its status, the value it returned (NaN unless FINISHED) and why it did not finish."""

    status: str
    value: float = math.nan
    error: str | None = None
    returned: Any = None  # the job's hydra JobReturn, when it returned one
    objective_values: list[float] | None = None  # a study's objectives, read from the finished trial's metrics


def is_slurm_job(job) -> bool:
    return type(job).__name__ == "SlurmJob"


def is_submitit_job(job) -> bool:
    return hasattr(job, "paths") and hasattr(job, "job_id")


class NoResult(Exception):
    """The job ended without a result: its process was killed."""


class JobFailed(Exception):
    """The job's process raised outside the trial (submitit pickled the traceback)."""


def job_result(job):
    """The JobReturn of an ended job; NoResult when it left none, JobFailed when its process raised."""
    if not is_submitit_job(job):
        return job.results()[0]
    from submitit.core.utils import pickle_load

    path = job.paths.result_pickle
    if not path.exists():
        raise NoResult(f"job {job.job_id} left no result")
    outcome, result = pickle_load(path)
    if outcome != "success":
        lines = [line for line in str(result).strip().splitlines() if line.strip()]
        raise JobFailed(lines[-1] if lines else "the job failed")
    return result


def outcome_of(flight: Flight, slurm: dict[str, SlurmState] | None = None) -> Outcome:
    """How an ended trial ended: its summary.json first, then what its job returned or left."""
    returned, value, error, lost = None, math.nan, None, False
    try:
        returned = job_result(flight.job)
        value = returned.return_value  # raises what the trial raised
    except NoResult:
        lost = True
    except Exception as e:
        error = f"{type(e).__name__}: {first_line(e)}"
    summary = fresh_summary(flight.run_dir, flight.started)
    if summary is not None:
        status, error = summary.get("status") or "FAILED", summary.get("error") or error
    elif lost:
        job_id = flight.slurm_id or ""
        status, error = "KILLED", killed_error(job_id, (slurm or {}).get(job_id))
    else:
        status, error = "FAILED", error or "the trial ended without writing summary.json"
    return Outcome(status, float(value) if status == "FINISHED" and _finite(value) else math.nan, error, returned)


def record(sweep_dir: Path, flight: Flight, outcome: Outcome) -> dict:
    """The ended trial in sweep.json (status, losses, error, `ended`); an MLflow run its trainer left open is
    closed with the same status. Returns the trial's entry."""
    manifest = read_manifest(sweep_dir)
    entry = manifest["trials"][str(flight.number)]
    refresh_trial(entry, flight.run_dir)
    entry["status"], entry["ended"] = outcome.status, time.time()
    if outcome.error and (outcome.status != "FINISHED"):
        entry["error"] = outcome.error
    write_manifest(sweep_dir, manifest)
    close_left_running(flight.run_dir, outcome.status)
    return entry


@dataclass
class Watch:
    """The trials in flight, polled until each has ended; SLURM jobs are asked about through sacct."""

    sweep_dir: Path
    flights: list[Flight] = field(default_factory=list)
    stopping: bool = False  # stop() was called: the flights are ending
    _slurm: dict[str, SlurmState] = field(default_factory=dict)
    _asked: float = 0.0

    def ended(self) -> list[tuple[Flight, Outcome]]:
        """The flights that have ended since the last call, each recorded in sweep.json, with their outcome."""
        self._ask_slurm()
        out = []
        for flight in [f for f in self.flights if self._has_ended(f)]:
            self.flights.remove(flight)
            outcome = outcome_of(flight, self._slurm)
            record(self.sweep_dir, flight, outcome)
            out.append((flight, outcome))
        return out

    def _ask_slurm(self) -> None:
        waiting = [f.slurm_id for f in self.flights if f.slurm_id and not f.job.paths.result_pickle.exists()]
        if waiting and time.monotonic() - self._asked >= SLURM_POLL_S:
            self._slurm, self._asked = slurm_states(waiting), time.monotonic()

    def _has_ended(self, flight: Flight) -> bool:
        if not is_slurm_job(flight.job):
            return flight.job.done()
        if flight.job.paths.result_pickle.exists():
            return True
        state = self._slurm.get(flight.slurm_id)
        return state is not None and not state.active

    def stop(self) -> None:
        """Ask SLURM's trials to stop: SIGINT to a running job (it saves and ends KILLED), a pending one cancelled.
        Local trials already had the Ctrl-C: it reaches every process of the terminal's process group."""
        self.stopping = True
        ids = [f.slurm_id for f in self.flights if f.slurm_id]
        states = slurm_states(ids)
        for job in ids:
            pending = job in states and states[job].state == "PENDING"
            command = ["scancel", job] if pending else ["scancel", "--signal=INT", job]
            subprocess.run(command, capture_output=True, timeout=30)


class Interrupts:
    """While trials run, Ctrl-C (SIGINT) asks the sweep to stop instead of raising in the middle of a write;
    a second Ctrl-C raises KeyboardInterrupt (stop waiting)."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def __enter__(self) -> Interrupts:
        try:
            self._previous = signal.signal(signal.SIGINT, self._handle)
        except ValueError:  # not the main thread: Ctrl-C stays Python's
            self._previous = None
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)


def stopped_line(sweep_dir: Path, entries: list[dict], resume: str) -> str:
    """The one line a sweep stopped by Ctrl-C ends with."""
    killed = [e for e in entries if e.get("status") == "KILLED"]
    saved = sum(bool((Path(e["run_dir"]) / "checkpoints").is_dir()) for e in killed)
    return (
        f"interrupted: {len(killed)} trial(s) in flight stopped KILLED ({saved} with a checkpoint); "
        f"continue with: python -m exp.sweep {resume} {sweep_dir}"
    )


def waiting_line(flights: list[Flight]) -> str:
    nums = ", ".join(f"#{f.number}" for f in flights)
    return (
        f"interrupted: waiting for {len(flights)} trial(s) in flight ({nums}) to save and stop; "
        "Ctrl-C again to leave them"
    )


# --- the record of a sweep -------------------------------------------------------------------------------


def point_name(num: int, point: dict) -> str:
    """A trial's MLflow run name: its number and the values that make its point (safe inside a quoted override)."""
    parts = [f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in point.items()]
    return re.sub(r"[\\'$]", "", " ".join([f"#{num}", *parts]))[:250]


def swept_points(job_overrides: list[list[str]]) -> list[dict]:
    """Each point's values for the keys that differ between the points of a batch (one point: none)."""
    as_dicts = [dict(_split(o) for o in overrides) for overrides in job_overrides]
    keys = [k for k in dict.fromkeys(k for d in as_dicts for k in d) if len({d.get(k) for d in as_dicts}) > 1]
    return [{k: d[k] for k in keys if k in d} for d in as_dicts]


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key.lstrip("+~"), value


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def best_trial(manifest: dict, direction: str = "minimize") -> dict | None:
    """The FINISHED trial with the best val loss, or None."""
    done = [t for t in manifest["trials"].values() if t.get("status") == "FINISHED" and _finite(t.get("val_loss"))]
    if not done:
        return None
    pick = max if direction == "maximize" else min
    return pick(done, key=lambda t: t["val_loss"])
