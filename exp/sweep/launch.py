"""Launching a sweep: every point validated before anything is submitted, sweep.json, an MLflow parent run.

Hydra loads launchers only from the hydra_plugins namespace: hydra_plugins/exp_launcher puts these classes in
front of Hydra's basic launcher and submitit's (local, SLURM), selected by
`hydra/launcher=exp_basic|exp_local|exp_slurm`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf, open_dict

from exp import config
from exp.signals import sigint_ignored
from exp.sweep.manifest import mark_unsubmitted, new_manifest, read_manifest, refresh_manifest, write_manifest
from exp.sweep.supervise import (
    INTERRUPTED_EXIT,
    Flight,
    Interrupts,
    Outcome,
    Watch,
    best_trial,
    point_name,
    stopped_line,
    swept_points,
    waiting_line,
)
from exp.text import first_line, fmt_loss
from exp.tracking.parent import ParentRun, open_parent_run

log = logging.getLogger("exp")
_launched: list[Path] = []  # sweep directories this process launched into (exp.job reports their failures)
# overrides the launcher or sweeper adds to a point, not part of what was tried: left out of sweep.json
UNRECORDED = ("tracking.parent", "callbacks.optuna", "run_name=")
POLL_S = 1.0  # how often a grid's launcher looks at its jobs


def launched_sweeps() -> list[Path]:
    """The sweep directories this process launched trials into, in order, each once."""
    return list(dict.fromkeys(_launched))


def failed_trials_message(sweep_dir: Path) -> str | None:
    """`N of M trials FAILED` (and `K KILLED`) and where to look, or None when none failed or was killed."""
    manifest = read_manifest(sweep_dir) or {"trials": {}}
    trials = manifest["trials"].values()
    failed = sum(t.get("status") == "FAILED" for t in trials)
    killed = sum(t.get("status") == "KILLED" for t in trials)
    if not failed and not killed:
        return None
    if failed and killed:
        head = f"{failed + killed} of {len(trials)} trials did not finish ({failed} FAILED, {killed} KILLED)"
    else:
        head = f"{failed or killed} of {len(trials)} trials {'FAILED' if failed else 'KILLED'}"
    return f"{head}: python -m exp.sweep status {sweep_dir}"


def close_parent(parent: ParentRun, manifest: dict, status: str, direction: str = "minimize") -> None:
    """The sweep's MLflow run gets its best FINISHED trial (val loss, point, number), then `status`."""
    best = best_trial(manifest, direction)
    if best is not None:
        parent.record_best(best["val_loss"], best.get("params") or {}, int(best["num"]))
    parent.end(status)


def log_ended(trials) -> None:
    """One error line per FAILED or KILLED trial, at the end of a batch."""
    for trial in trials:
        if trial["status"] in ("FAILED", "KILLED"):
            overrides = " ".join(trial["overrides"])
            log.error(f"trial #{trial['num']} ({overrides}) {trial['status']}: {trial.get('error')}")


def supervise(sweep_dir: Path, flights: list[Flight]) -> tuple[dict[int, Outcome], bool]:
    """Watch the flights until every one has ended, recording each; Ctrl-C stops them (they save and end KILLED)
    and is waited out, a second one leaves them running. The outcomes by trial number and whether interrupted."""
    watch, outcomes = Watch(sweep_dir, list(flights)), {}
    with Interrupts() as ctrl_c:
        try:
            while watch.flights:
                for flight, outcome in watch.ended():
                    outcomes[flight.number] = outcome
                    log.info(f"trial #{flight.number} {outcome.status}: val loss {fmt_loss(outcome.value)}")
                if ctrl_c.requested and not watch.stopping:
                    print(waiting_line(watch.flights), flush=True)
                    watch.stop()
                if watch.flights:
                    time.sleep(POLL_S)
        except KeyboardInterrupt:
            nums = ", ".join(f"#{f.number}" for f in watch.flights)
            print(f"interrupted again: no longer waiting for {nums}", flush=True)
    return outcomes, ctrl_c.requested


def job_return(overrides: list[str], outcome: Outcome):
    """What Hydra's sweeper gets for a trial: its value (NaN unless FINISHED), never an exception to re-raise."""
    from hydra.core.utils import JobReturn, JobStatus

    returned = JobReturn(overrides=overrides, status=JobStatus.COMPLETED)
    returned.return_value = outcome.value if math.isfinite(outcome.value) else float("nan")
    return returned


class ValidatedSweep:
    """Validates every point of a batch in this process, records the batch, then hands it to the launcher."""

    # whether the jobs run on this machine, so that its device and dtype are theirs to check here
    jobs_run_here = True

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        job_overrides, parent = self.prepare(job_overrides, initial_job_idx)
        status = "KILLED"  # a trial in this process stopped by a signal ends the sweep (SystemExit)
        try:
            results = super().launch(job_overrides, initial_job_idx)
            status = "FINISHED"
        finally:
            manifest = refresh_manifest(sweep_dir)
            close_parent(parent, manifest, status)
        log_ended(manifest["trials"].values())
        return results

    def prepare(
        self,
        job_overrides: Sequence[Sequence[str]],
        initial_job_idx: int,
        parent: ParentRun | None = None,
        points: list[dict] | None = None,
    ) -> tuple[list[list[str]], ParentRun]:
        """Validate the points, open (or reuse) the sweep's MLflow parent run and record the points in sweep.json
        as PENDING; the overrides to launch them with (the parent run's id and the run's name added) and the
        parent run. `points`: each job's swept values (default: those that differ between the jobs)."""
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        run_dirs, tracked = self._validate(job_overrides, initial_job_idx, sweep_dir)
        self._preflight(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        if parent is None:
            parent = open_parent_run(self.config, sweep_dir, kind="sweep") if tracked else ParentRun(kind="sweep")
        points = points if points is not None else swept_points([list(o) for o in job_overrides])
        job_overrides = [
            [*o, f"++run_name='{point_name(initial_job_idx + i, points[i])}'"] if points[i] else list(o)
            for i, o in enumerate(job_overrides)
        ]
        if parent.run_id is not None:
            job_overrides = [[*o, f"tracking.parent_run_id={parent.run_id}"] for o in job_overrides]
        manifest = read_manifest(sweep_dir) or new_manifest(
            sweep_dir,
            overrides=HydraConfig.get().overrides.task,
            launcher=str(self.config.hydra.launcher._target_),
            tracking_uri=parent.uri if parent.run_id is not None else None,  # absolute: any directory finds it
            parent_run_id=parent.run_id,
        )
        for i, overrides in enumerate(job_overrides):
            manifest["trials"][str(initial_job_idx + i)] = {
                "num": initial_job_idx + i,
                "overrides": [o for o in overrides if not o.lstrip("+").startswith(UNRECORDED)],
                "run_dir": str(run_dirs[i]),
                "status": "PENDING",
                "started": time.time(),  # a summary.json older than this is an earlier launch's
                **({"params": points[i]} if points[i] else {}),
            }
        write_manifest(sweep_dir, manifest)
        _launched.append(sweep_dir)
        return job_overrides, parent

    def start(self, overrides: Sequence[str], job_idx: int):
        """Run one prepared point; a handle with done() and results() (JobReturns). Here: in this process, so the
        point has ended when this returns."""
        return Ended(super().launch([list(overrides)], job_idx)[0])

    def _validate(self, job_overrides, initial_job_idx: int, sweep_dir: Path) -> tuple[list[Path], bool]:
        hydra_config = HydraConfig.instance().cfg
        run_dirs, tracked = [], False
        try:
            for i, overrides in enumerate(job_overrides):
                label = f"sweep point #{initial_job_idx + i} ({' '.join(overrides)})"
                try:
                    cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                    with open_dict(cfg):
                        cfg.hydra.job.num = initial_job_idx + i
                        run_dir = sweep_dir / str(cfg.hydra.sweep.subdir)
                    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the task config resolves as in the job
                    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                    task.run_dir = str(run_dir)
                    config.validate(task, node=self.jobs_run_here)
                except config.ConfigError as e:
                    refuse(sweep_dir, f"{label}: {e}")
                except Exception as e:  # a point that does not even compose
                    refuse(sweep_dir, f"{label}: {first_line(e)}")
                run_dirs.append(run_dir)
                tracked = "parent_run_id" in task.tracking
        finally:
            if hydra_config is not None:
                HydraConfig.instance().set_config(hydra_config)
        return run_dirs, tracked

    def _preflight(self, sweep_dir: Path) -> None:
        """Launcher-specific checks that must fail before anything is submitted."""


class Ended:
    """A point that ran in this process: done, with its JobReturn."""

    def __init__(self, result):
        self._result = result

    def done(self) -> bool:
        return True

    def results(self) -> list:
        return [self._result]


class SubmititSweep(ValidatedSweep):
    """A launcher in front of submitit's: start() submits one point as its own job and returns at once; launch()
    submits a batch (on SLURM one job array) and supervises every trial to its end (exp.sweep.supervise)."""

    _executor = None

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        job_overrides, parent = self.prepare(job_overrides, initial_job_idx)
        status, outcomes, interrupted = "FAILED", {}, False
        try:
            flights = self.submit(job_overrides, initial_job_idx)
            outcomes, interrupted = supervise(sweep_dir, flights)
            status = "KILLED" if interrupted else "FINISHED"
        finally:
            manifest = read_manifest(sweep_dir)
            close_parent(parent, manifest, status)
        if interrupted:
            entries = [manifest["trials"][str(initial_job_idx + i)] for i in range(len(job_overrides))]
            print(stopped_line(sweep_dir, entries, "resume"), flush=True)
            raise SystemExit(INTERRUPTED_EXIT)
        log_ended(manifest["trials"].values())
        return [job_return(o, outcomes[initial_job_idx + i]) for i, o in enumerate(job_overrides)]

    def start(self, overrides: Sequence[str], job_idx: int):
        return self.submit([overrides], job_idx)[0].job

    def submit(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> list[Flight]:
        """Submit the prepared points (several: as one array); their flights, with the job ids in sweep.json."""
        from hydra.core.singleton import Singleton

        if self._executor is None:
            self._executor = self._make_executor()
        state = Singleton.get_state()
        nums = [initial_job_idx + i for i in range(len(job_overrides))]
        args = [
            (list(o), "hydra.sweep.dir", n, f"job_id_for_{n}", state) for o, n in zip(job_overrides, nums, strict=True)
        ]
        started = time.time()
        with self._controllers_keep_running():
            jobs = self._executor.map_array(self, *zip(*args, strict=True))
        return self._record_jobs(nums, jobs, started)

    def _record_jobs(self, nums: list[int], jobs: list, started: float) -> list[Flight]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        manifest = read_manifest(sweep_dir)
        flights = []
        for num, job in zip(nums, jobs, strict=True):
            entry = manifest["trials"][str(num)]
            entry.update(job_id=str(job.job_id), started=started)
            if self._EXECUTOR == "slurm":  # what `exp.sweep status` asks sacct about until the trial has a summary
                entry["slurm_job_id"] = str(job.job_id)
            flights.append(Flight(num, job, Path(entry["run_dir"]), started))
        write_manifest(sweep_dir, manifest)
        return flights

    def _controllers_keep_running(self):
        """submitit's local controller, on Ctrl-C, sends its tasks a second SIGINT and SIGKILL a second later:
        started with SIGINT ignored it never does, and the trainers (which get the terminal's Ctrl-C themselves)
        finish their step, save and end KILLED."""
        return sigint_ignored() if self._EXECUTOR == "local" else contextlib.nullcontext()

    def __call__(self, *args, **kwargs):
        """The job itself: Ctrl-C back to Python's KeyboardInterrupt (its controller was started ignoring it)."""
        signal.signal(signal.SIGINT, signal.default_int_handler)
        return super().__call__(*args, **kwargs)

    def _make_executor(self):
        """The executor submitit's Hydra launcher builds for a batch (BaseSubmititLauncher.launch, which offers no
        way to get it without submitting the batch): the same folder, requeue limit and resources."""
        import submitit
        from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf

        init_keys = {"submitit_folder", "max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR,
            folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_max_num_timeout": self.params["max_num_timeout"]}
            if "max_num_timeout" in self.params
            else {},
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(
            **{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in init_keys}
        )
        return executor


class SlurmSweep(SubmititSweep):
    """A sweep submitted as one SLURM job array: sbatch must exist here, and a request sbatch refuses (partition,
    resources) ends with what it said, exit 2, and the batch's trials NOT_SUBMITTED."""

    jobs_run_here = False  # a GPU job submitted from a login node without one: each job checks its node

    def _preflight(self, sweep_dir: Path) -> None:
        if shutil.which("sbatch") is None:
            refuse(
                sweep_dir,
                "hydra/launcher=exp_slurm needs Slurm's sbatch, which is not on this machine; "
                "hydra/launcher=exp_local runs the same jobs here",
            )

    def launch(self, job_overrides, initial_job_idx):
        with self._refusal("job array"):
            return super().launch(job_overrides, initial_job_idx)

    def start(self, overrides, job_idx):
        with self._refusal("job"):
            return super().start(overrides, job_idx)

    @contextlib.contextmanager
    def _refusal(self, what: str):
        """sbatch refusing the request: what it said, the trials NOT_SUBMITTED, exit 2."""
        from submitit.core.utils import FailedJobError, FailedSubmissionError

        try:
            yield
        except (FailedJobError, FailedSubmissionError) as e:
            if not _refused_submission(e):  # a job that failed after it was submitted
                raise
            text = str(e)
            detail = next((line for line in text.splitlines() if "error" in line.lower()), first_line(e))
            mark_unsubmitted(Path(str(self.config.hydra.sweep.dir)))
            print(f"error: SLURM refused the {what}: {detail.strip()}", flush=True)
            raise SystemExit(2) from None


def _refused_submission(error: Exception) -> bool:
    """Whether submitit's error is sbatch's refusal: its output unreadable (FailedSubmissionError), or sbatch
    exiting non-zero (FailedJobError raised from the CalledProcessError of the sbatch command)."""
    from submitit.core.utils import FailedSubmissionError

    if isinstance(error, FailedSubmissionError):
        return True
    cause = error.__cause__
    return isinstance(cause, subprocess.CalledProcessError) and Path(str(cause.cmd[0])).name == "sbatch"


def refuse(sweep_dir: Path, message: str) -> None:
    """A bad point: one line, exit 2, and no sweep directory left holding only Hydra's multirun.yaml."""
    print(f"config error: {message}", flush=True)
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    raise SystemExit(config.CONFIG_ERROR_EXIT)
