"""Jobs as the run directory and the process (or SLURM job) behind it say they are: launch, signal, read.

Local jobs are `python train.py` in their own session, so they outlive the service; SLURM jobs go through
submitit. Stop is SIGTERM (the run finishes its step, saves a checkpoint and ends KILLED), save-now is SIGUSR1
(exp.faults.SaveOnSignal), both sent only once the run has installed its handlers.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from exp.checkpoint.format import MANIFEST, list_checkpoints, read_trainer_state
from exp.paths import TRAIN_PY
from exp.rundir import METRICS, SUMMARY, lock_holder, read_summary
from exp.serve.guard import Refused, open_inside, read_inside, relative_inside
from exp.tracking.worker import RUN_MARKER

TERMINAL = ("FINISHED", "FAILED", "KILLED")


class Conflict(Exception):
    """The job is not in a state that allows this (stop a finished job, resume a running one): HTTP 409."""


class Claims:
    """Keys held while a request checks that nothing the same is under way and then starts it (FastAPI runs sync
    routes on a thread pool): two requests for one thing at once cannot both pass the check."""

    def __init__(self):
        self._held: set[str] = set()
        self._lock = threading.Lock()

    @contextlib.contextmanager
    def hold(self, key: str, busy: str):
        """Hold `key` for the block; Conflict(busy) when another request holds it."""
        with self._lock:
            if key in self._held:
                raise Conflict(busy)
            self._held.add(key)
        try:
            yield
        finally:
            with self._lock:
                self._held.discard(key)


# --- processes ----------------------------------------------------------------------------------------


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat): with the pid, it tells
    a job's process apart from a later one that reused its pid. None when no such process is alive."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] == "Z":  # a zombie: ended, waiting to be reaped
        return None
    return fields[19]


def process_alive(job: dict) -> bool:
    pid = job.get("pid")
    return bool(pid) and process_start_time(pid) == job.get("pid_start")


def catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for `signum` installed (SigCgt in /proc/PID/status)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (signum - 1) & 1)
    except (OSError, ValueError):
        pass
    return False


class Launcher:
    """Starts train.py for a job, locally or on SLURM, and keeps the local children it started so they are reaped
    (a job that outlives the service is reaped by init)."""

    def __init__(self, runs_dir: Path, env: dict[str, str] | None = None):
        self.runs_dir = Path(runs_dir).resolve()
        self.env = dict(env or {})  # added to every job's environment (the target allowlist it checks itself)
        self.logs = self.runs_dir / ".serve" / "logs"
        self._children: dict[int, subprocess.Popen] = {}
        self._exited: dict[int, int] = {}  # pid -> exit status of children that ended
        self._lock = threading.Lock()
        threading.Thread(target=self._reap, daemon=True, name="reaper").start()
        # jobs are started from this thread, created with the service's own priority: a child inherits the nice
        # value of the thread that forks it, and the request threads may run niced (exp.serve --nice)
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spawner")
        self._spawner.submit(lambda: None).result()

    def spawn(self, *args, **kwargs) -> subprocess.Popen:
        """subprocess.Popen on the spawner thread, with the jobs' environment; the child is reaped when it ends
        (no zombie sweeps)."""
        kwargs["env"] = {**(kwargs.get("env") or os.environ), **self.env}
        child = self._spawner.submit(subprocess.Popen, *args, **kwargs).result()
        with self._lock:
            self._children[child.pid] = child
            self._exited.pop(child.pid, None)  # a pid the system reused
        return child

    def spawn_logged(self, command: list[str], log_path: Path, **kwargs) -> subprocess.Popen:
        """A process of the service (a sweep, an evaluation) in its own session, from the folder that holds the runs
        directory, its output appended to log_path."""
        with open(log_path, "ab") as log:
            return self.spawn(
                command,
                cwd=self.runs_dir.parent,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                **kwargs,
            )

    def command(self, overrides: list[str], run_dir: Path) -> list[str]:
        return [sys.executable, str(TRAIN_PY), *overrides, f"hydra.run.dir={run_dir}"]

    def start_local(self, job_id: str, overrides: list[str], run_dir: Path) -> dict:
        self.logs.mkdir(parents=True, exist_ok=True)
        log_path = self.logs / f"{job_id}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        env.setdefault("OMP_NUM_THREADS", "1")
        with open(log_path, "ab") as log:
            child = self.spawn(
                self.command(overrides, run_dir),
                cwd=self.runs_dir.parent,  # runs/mlflow.db, the embedded store, is the one beside the runs
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: the service's Ctrl-C or exit does not reach it
                env=env,
            )
        return {"pid": child.pid, "pid_start": process_start_time(child.pid), "log_path": str(log_path)}

    def start_slurm(self, job_id: str, overrides: list[str], run_dir: Path, resources: dict) -> dict:
        import submitit

        folder = self.runs_dir / ".serve" / "slurm" / job_id
        executor = submitit.SlurmExecutor(folder=folder)
        params = {
            "job_name": f"exp-{job_id}",
            "time": int(resources.get("timeout_min", 60)),
            "cpus_per_task": int(resources.get("cpus_per_task", 1)),
            "mem": f"{int(resources.get('mem_gb', 4))}GB",
            "signal_delay_s": 120,
        }
        for key in ("partition", "account", "qos", "constraint"):
            if resources.get(key):
                params[key] = resources[key]
        if resources.get("gpus_per_node"):
            params["gpus_per_node"] = int(resources["gpus_per_node"])
        # several tasks: each runs train.py as one rank (DDP/FSDP), the rendezvous from SLURM's variables
        params["nodes"] = int(resources.get("nodes", 1))
        params["ntasks_per_node"] = int(resources.get("tasks_per_node", 1))
        executor.update_parameters(**params)
        job = executor.submit(exec_train, self.command(overrides, run_dir), str(self.runs_dir.parent), self.env)
        log_path = folder / f"{job.job_id}_0_log.out"  # the log lines; SLURM's own and tracebacks go to .err
        return {"slurm_job_id": str(job.job_id), "log_path": str(log_path)}

    def poll(self, pid: int | None) -> int | None:
        """The exit status of a child this service started and has seen end, else None."""
        with self._lock:
            if pid in self._exited:
                return self._exited[pid]
            child = self._children.get(pid) if pid else None
        return child.poll() if child is not None else None

    def running(self, pid: int | None) -> bool:
        """Whether pid is a child this service started that has not been reaped: a process whose last threads are
        still exiting shows as a zombie before its exit status can be collected, and counts as running till then."""
        with self._lock:
            child = self._children.get(pid) if pid else None
        return child is not None and child.poll() is None

    def _reap(self) -> None:
        """Reap ended children; only their exit status is kept (a long-lived service starts many)."""
        while True:
            time.sleep(1.0)
            with self._lock:
                children = list(self._children.items())
            for pid, child in children:
                if child.poll() is not None:
                    with self._lock:
                        self._exited[pid] = child.returncode
                        self._children.pop(pid, None)


def exec_train(command: list[str], cwd: str, env: dict[str, str] | None = None) -> None:
    """What a SLURM job runs: train.py in place of this process, so the job's signals (scancel --signal) reach
    the trainer itself."""
    os.chdir(cwd)
    os.environ.update(env or {})
    os.execv(command[0], command)


# --- SLURM ----------------------------------------------------------------------------------------------


_slurm_states: dict[str, tuple[float, str | None]] = {}


def slurm_state(job_id: str, max_age_s: float = 2.0) -> str | None:
    """PENDING, RUNNING, COMPLETED, ... from squeue (while queued or running) or sacct (after); asked at most every
    `max_age_s` seconds per job, however many clients poll."""
    cached = _slurm_states.get(job_id)
    if cached is not None and time.monotonic() - cached[0] < max_age_s:
        return cached[1]
    state = _ask_slurm(job_id)
    _slurm_states[job_id] = (time.monotonic(), state)
    return state


def _ask_slurm(job_id: str) -> str | None:
    for cmd in (["squeue", "-h", "-j", job_id, "-o", "%T"], ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"]):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            continue
        if out:
            return out.splitlines()[0].split()[0]
    return None


def slurm_signal(job_id: str, name: str) -> None:
    subprocess.run(["scancel", f"--signal={name}", job_id], check=True, capture_output=True, timeout=30)


# --- status ---------------------------------------------------------------------------------------------


class MetricsCache:
    """metrics.jsonl files read incrementally: each poll reads only the lines appended since the last one."""

    def __init__(self):
        self._files: dict[str, tuple[int, int, list[dict]]] = {}  # path -> (inode, offset, rows)
        self._latest: dict[str, tuple[int, dict]] = {}  # path -> (rows folded in, newest value of each key)
        self._configured: dict[str, tuple[float, dict]] = {}  # run dir -> (config mtime, configured(run_dir))
        self._lock = threading.Lock()

    def latest(self, run_dir: Path) -> dict:
        """latest_metrics of the run, updated with only the rows that arrived since the last call."""
        rows = self.rows(run_dir)
        key = str(Path(run_dir) / METRICS)
        with self._lock:
            folded, latest = self._latest.get(key, (0, {}))
            if folded > len(rows):  # rewritten
                folded, latest = 0, {}
            latest = {**latest, **latest_metrics(rows[folded:])}
            self._latest[key] = (len(rows), latest)
            return latest

    def configured(self, run_dir: Path) -> dict:
        """What the run's composed config says (`configured`), read again only when .hydra/config.yaml changes."""
        path = Path(run_dir) / ".hydra" / "config.yaml"
        try:
            mtime = path.lstat().st_mtime
        except OSError:
            return {}
        cached = self._configured.get(str(run_dir))
        if cached is None or cached[0] != mtime:
            cached = (mtime, configured(run_dir))
            if "${" not in cached[1].get("run_name", ""):  # else .hydra/hydra.yaml was not there yet: read again
                self._configured[str(run_dir)] = cached
        return cached[1]

    def rows(self, run_dir: Path) -> list[dict]:
        path = Path(run_dir) / METRICS
        try:  # never a symlinked metrics.jsonl: its target's lines would be served as metrics
            f = open_inside(run_dir, METRICS)
        except (OSError, Refused):
            return []
        key = str(path)
        with f, self._lock:
            stat = os.fstat(f.fileno())
            inode, offset, rows = self._files.get(key, (stat.st_ino, 0, []))
            if inode != stat.st_ino or stat.st_size < offset:  # rewritten (a resume drops lines past its step)
                offset, rows = 0, []
            if stat.st_size > offset:
                f.seek(offset)
                chunk = f.read(stat.st_size - offset)
                complete = chunk.rfind(b"\n") + 1  # a line still being written waits for the next poll
                for line in chunk[:complete].splitlines():
                    try:
                        rows.append(json.loads(line))
                    except ValueError:
                        continue
                offset += complete
            self._files[key] = (stat.st_ino, offset, rows)
            return rows


def latest_metrics(rows: list[dict]) -> dict:
    """The newest value of every metric, with the step it was logged at."""
    latest: dict = {}
    for row in rows:
        for key, value in row.items():
            if key != "step":
                latest[key] = {"value": value, "step": row["step"]}
    return latest


def configured(run_dir: Path) -> dict:
    """stage.num_steps and run_name of the run's composed config (.hydra/config.yaml, never through a symlink)."""
    import yaml

    try:
        with open_inside(run_dir, Path(".hydra") / "config.yaml") as f:
            cfg = yaml.safe_load(f.read(1 << 20)) or {}
    except (OSError, Refused, yaml.YAMLError):
        return {}
    out = {}
    try:
        out["num_steps"] = int(cfg["stage"]["num_steps"])
    except (KeyError, TypeError, ValueError):
        pass
    ui_url = (cfg.get("tracking") or {}).get("ui_url") if isinstance(cfg, dict) else None
    if isinstance(ui_url, str) and ui_url.startswith(("http://", "https://")):
        out["ui_url"] = ui_url
    if isinstance(cfg, dict) and isinstance(cfg.get("run_name"), str):
        out["run_name"] = _with_choices(run_dir, cfg["run_name"])
    return out


CHOICE = re.compile(r"\$\{hydra:runtime\.choices\.([\w./@-]+)\}")


def _with_choices(run_dir: Path, text: str) -> str:
    """`text` with its ${hydra:runtime.choices.GROUP} (the default run_name's) replaced by the run's choices, from
    .hydra/hydra.yaml (the composed config keeps the interpolation)."""
    import yaml

    if not CHOICE.search(text):
        return text
    try:
        with open_inside(run_dir, Path(".hydra") / "hydra.yaml") as f:
            choices = ((yaml.safe_load(f.read(1 << 20)) or {}).get("hydra") or {}).get("runtime", {}).get("choices")
    except (OSError, Refused, yaml.YAMLError, AttributeError):
        return text
    if not isinstance(choices, dict):
        return text
    return CHOICE.sub(lambda m: str(choices.get(m.group(1), m.group(0))), text)


def _ended(run_dir: Path) -> float | None:
    try:
        return (Path(run_dir) / SUMMARY).lstat().st_mtime
    except OSError:
        return None


def run_record(run_dir: Path) -> dict | None:
    """What the run's tracker recorded of its MLflow run (mlflow_run.json: run id, experiment id, tracking URI), read
    without following a symlink; None while it is missing, unreadable or not a record."""
    try:
        record = json.loads(read_inside(Path(run_dir), RUN_MARKER))
    except (OSError, ValueError, Refused):
        return None
    return record if isinstance(record, dict) else None


def mlflow_run_id(record: dict | None, summary: dict | None, ahead: str | None = None) -> str | None:
    """The run's MLflow run: summary.json's, else the one its tracker last wrote to (`record`: run_record), else the
    one the service created ahead of it (`ahead`)."""
    if summary and summary.get("mlflow_run_id"):
        return summary["mlflow_run_id"]
    return ((record or {}).get("run_id")) or ahead


def mlflow_url(record: dict | None, run_id: str | None, ui_url: str | None) -> str | None:
    """The MLflow UI's page of the run: under tracking.ui_url, else under its tracking URI when that is an http(s)
    server; None for a file or SQLite store without a UI address, or before the run's tracker recorded it
    (`record`: run_record)."""
    from urllib.parse import quote

    if not isinstance(record, dict) or not run_id or record.get("run_id") != run_id or not record.get("experiment_id"):
        return None
    uri = str(record.get("tracking_uri") or "")
    base = ui_url or (uri if uri.startswith(("http://", "https://")) else None)
    if not base:
        return None
    return f"{base.rstrip('/')}/#/experiments/{quote(str(record['experiment_id']))}/runs/{quote(run_id)}"


def job_status(job: dict, launcher: Launcher, cache: MetricsCache) -> dict:
    """status as in summary.json once the run wrote it; before that RUNNING while its process lives (or SLURM
    says it runs), PENDING while queued or starting, UNKNOWN while SLURM does not say, else FAILED (it ended
    without a summary) or KILLED (stopped before it could write one, or ended by a signal: `signal` names it)."""
    run_dir = Path(job["run_dir"])
    summary = read_summary(run_dir)
    if summary is not None and _written_before_launch(job, run_dir):
        summary = None  # a resumed job's previous ending, until this launch writes its own
    record = run_record(run_dir)  # read once: the MLflow run's id and its page in the UI
    rows = cache.rows(run_dir)
    train_rows = [r for r in rows if "train/loss" in r]
    step = (summary or {}).get("step") if summary else (train_rows[-1]["step"] if train_rows else 0)
    config = cache.configured(run_dir)  # read once: stage.num_steps, run_name, tracking.ui_url
    num_steps = (summary or {}).get("num_steps") or config.get("num_steps")
    slurm = None
    alive = process_alive(job) or launcher.running(job.get("pid"))  # ended only once its exit status is known
    if job.get("slurm_job_id"):
        slurm = {"job_id": job["slurm_job_id"], "state": slurm_state(job["slurm_job_id"])}
        alive = slurm["state"] in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "REQUEUED", "SUSPENDED")
    if summary and summary.get("status") in TERMINAL:
        status = summary["status"]
    elif slurm is not None and slurm["state"] is None:
        status = "UNKNOWN"  # neither squeue nor sacct answered (a busy controller, no accounting): not an ending
    elif alive:
        queued = slurm is not None and slurm["state"] == "PENDING"
        status = "RUNNING" if _started(job, run_dir) and not queued else "PENDING"
    elif job["source"] in ("cli", "sweep") and lock_holder(run_dir):
        status = "RUNNING"
    else:
        signalled = killed_by(launcher.poll(job.get("pid"))) or bool(summary)  # a summary still saying RUNNING
        status = "KILLED" if job.get("stop_requested") or signalled else "FAILED"
    eta = None
    if status == "RUNNING" and num_steps and train_rows:
        step_ms = train_rows[-1].get("perf/step_ms")
        if step_ms:
            eta = max(0.0, (num_steps - step) * step_ms / 1000)
    out = {
        "job_id": job["id"],
        "status": status,
        "step": step,
        "num_steps": num_steps,
        "eta_seconds": eta,
        "run_dir": str(run_dir),
        "source": job["source"],
        "launcher": job["launcher"],
        "overrides": job["overrides"],
        "run_name": config.get("run_name"),  # the config's run_name (settable at start)
        "config_id": job.get("config_id"),  # the saved config it was started from
        "sweep_id": job.get("sweep_id"),  # the sweep it is a trial of, and its number there (its folder's name)
        "trial": int(run_dir.name) if job.get("sweep_id") and run_dir.name.isdigit() else None,
        "created": job["created"],
        "ended": _ended(run_dir) if status in TERMINAL else None,  # when its summary.json was last written
        "mlflow_run_id": mlflow_run_id(record, summary, job.get("mlflow_run_id")),
        "metrics": {k: v["value"] for k, v in cache.latest(run_dir).items()},
        "slurm": slurm,
        "pid": job.get("pid"),
        "exit_code": launcher.poll(job.get("pid")),
    }
    if summary:
        for key in (
            "error",
            "stop_reason",
            "val_loss",
            "train_loss",
            "tokens_per_s",
            "checkpoint",
            "best_checkpoint",
        ):
            out[key] = summary.get(key)
        if summary.get("signal"):  # written by the service for a run killed without one (killed_summary)
            out["exit_code"] = out["exit_code"] or summary.get("exit_code")
    out["mlflow_url"] = mlflow_url(record, out["mlflow_run_id"], config.get("ui_url"))
    out["signal"] = killed_by(out["exit_code"])
    if out["signal"] and status == "KILLED" and not (summary and summary.get("status") in TERMINAL):
        # ended from outside (SIGKILL, the OOM killer) before the run could write its ending
        out["stop_reason"] = f"killed by {out['signal']}"
        out["error"] = None if job.get("stop_requested") else out["stop_reason"]
    return out


def killed_by(exit_code: int | None) -> str | None:
    """The signal's name when a process ended by one (a negative exit status), else None."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


def killed_summary(job: dict, status: dict) -> dict | None:
    """summary.json for a launch that a signal ended before the run wrote one (`status`: job_status's answer), so
    that the run directory says KILLED to every reader; None when the run's own summary of this launch is there or
    the run directory was never created."""
    run_dir = Path(job["run_dir"])
    summary = read_summary(run_dir)
    own = summary is not None and summary.get("status") in TERMINAL and not _written_before_launch(job, run_dir)
    if own or not run_dir.is_dir():
        return None
    uri, run_id = killed_run(job) or (None, status.get("mlflow_run_id"))
    return {
        "status": "KILLED",
        "stop_reason": status.get("stop_reason"),
        "error": status.get("error"),
        "signal": status["signal"],
        "exit_code": status["exit_code"],
        "step": status["step"],
        "num_steps": status["num_steps"],
        "run_dir": str(run_dir.resolve()),
        "mlflow_tracking_uri": uri,
        "mlflow_run_id": run_id,
        "written_by": "exp.serve",  # the run itself could not write it
    }


def killed_run(job: dict) -> tuple[str, str] | None:
    """(store URI, run id) of the MLflow run a killed job may have left open, when it is in the store the service
    created the job's run in (the service connects to no store a client named); None otherwise."""
    uri = job.get("tracking_uri")
    if not uri:
        return None
    record = run_record(Path(job["run_dir"]))
    if record is not None and record.get("run_id"):  # the run its tracker took (or opened instead)
        return (uri, record["run_id"]) if record.get("tracking_uri") == uri else None
    return (uri, job["mlflow_run_id"]) if job.get("mlflow_run_id") else None


def _logged_since_launch(job: dict) -> bool:
    try:
        return (Path(job["run_dir"]) / METRICS).stat().st_mtime >= (job.get("launched") or 0)
    except OSError:
        return False


def _started(job: dict, run_dir: Path) -> bool:
    """Whether the job's latest launch has taken the run directory's lock (or logged a metric) yet."""
    since = job.get("launched") or 0
    for name in (".lock", METRICS):
        try:
            if (run_dir / name).stat().st_mtime >= since:
                return True
        except OSError:
            continue
    return False


def _written_before_launch(job: dict, run_dir: Path) -> bool:
    """Whether summary.json predates the job's latest launch (a resumed run's previous ending)."""
    try:
        return bool(job.get("launched")) and (run_dir / "summary.json").stat().st_mtime < job["launched"]
    except OSError:
        return False


def sweep_running(process: dict | None, trials: list[dict]) -> str | None:
    """Why a sweep is still running (the process the service started for it lives, a trial trains), or None."""
    if process and process_alive(process):
        return f"its process {process['pid']} is running"
    for trial in trials:
        if trial.get("status") == "RUNNING" and lock_holder(trial["run_dir"]):
            return f"trial {trial['num']} is RUNNING"
    return None


# --- steering -----------------------------------------------------------------------------------------------


def send(job: dict, status: str, signum: int, what: str) -> None:
    """Signal a running job's trainer (stop: SIGTERM, save now: SIGUSR1); Conflict when it is not running."""
    if status in TERMINAL:
        raise Conflict(f"job {job['id']} is {status}: nothing to {what}")
    if job.get("slurm_job_id"):
        # the handlers cannot be seen on another node: save-now waits for the first metric line, which the run
        # writes after installing them (an uncaught SIGUSR1 would end the job)
        if signum == signal.SIGUSR1 and not _logged_since_launch(job):
            status = "PENDING" if status == "RUNNING" else status
        if status != "RUNNING":
            if signum == signal.SIGTERM:
                subprocess.run(["scancel", job["slurm_job_id"]], capture_output=True, timeout=30)
                return
            raise Conflict(f"job {job['id']} is {status} on SLURM: it has not started training yet")
        slurm_signal(job["slurm_job_id"], signal.Signals(signum).name.removeprefix("SIG"))
        return
    if not process_alive(job):
        raise Conflict(f"job {job['id']} has no live process this service started (status {status})")
    if not catches(job["pid"], signum):
        if signum == signal.SIGTERM:  # still starting: nothing to save yet, so end it now
            os.kill(job["pid"], signum)
            return
        raise Conflict(f"job {job['id']} has not started training yet: try again in a moment")
    os.kill(job["pid"], signum)


# --- checkpoints --------------------------------------------------------------------------------------------


def checkpoints(run_dir: Path, summary: dict | None) -> list[dict]:
    """Every step_* checkpoint of a run: step, bytes, SHA-256 per file (from its manifest), best."""
    best = (summary or {}).get("best_checkpoint")
    out = []
    for path in served_checkpoints(run_dir):
        manifest = _manifest(run_dir, path)
        if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
            continue  # being written, or damaged: not offered
        files = manifest["files"]
        step = int(path.name.split("_")[1])
        out.append(
            {
                "step": step,
                "path": str(path),
                "size": sum(int(f.get("size", 0)) for f in files.values()),
                "files": {name: {"size": f.get("size"), "sha256": f.get("sha256")} for name, f in files.items()},
                "best": best is not None and Path(best).name == path.name,
            }
        )
    if out and (not any(c["best"] for c in out) or _older_than(run_dir / SUMMARY, Path(out[-1]["path"]) / MANIFEST)):
        # still training (a branch resumed from an earlier step too: summary.json is the last ending's, whose best may
        # have been set aside or share a name with a new checkpoint): the newest checkpoint's trainer state knows best
        try:
            best_step = read_trainer_state(Path(out[-1]["path"])).get("state", {}).get("best_step")
        except Exception:  # unreadable trainer state: no best marked
            best_step = None
        for item in out:
            item["best"] = item["step"] == best_step
    return out


def _older_than(path: Path, other: Path) -> bool:
    """Whether `path` was last written before `other` (False when either is missing)."""
    try:
        return path.stat().st_mtime < other.stat().st_mtime
    except OSError:
        return False


def checkpoint_dir(run_dir: Path, step: int) -> Path | None:
    for path in served_checkpoints(run_dir):
        manifest = path / MANIFEST
        if int(path.name.split("_")[1]) == step and manifest.is_file() and not manifest.is_symlink():
            return path
    return None


def served_checkpoints(run_dir: Path) -> list[Path]:
    """The run's step_* folders that are real folders inside it: a symlinked one (or checkpoints/) could point
    anywhere, so it is neither listed, downloaded nor resumed from."""
    root = Path(run_dir) / "checkpoints"
    return [] if root.is_symlink() else [p for p in list_checkpoints(root) if not p.is_symlink()]


def _manifest(run_dir: Path, path: Path) -> dict | None:
    """A checkpoint's manifest, read without following a symlink; None when missing or unreadable."""
    try:
        manifest = json.loads(read_inside(run_dir, Path("checkpoints") / path.name / MANIFEST))
    except (OSError, ValueError, Refused):
        return None
    return manifest if isinstance(manifest, dict) else None


def tail(root: Path, path: Path, num_bytes: int) -> str:
    """The last `num_bytes` of a log file below `root` ("" while it is missing); Refused for a symlink on the way
    or a file that is not regular."""
    try:
        with open_inside(root, relative_inside(root, path)) as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - num_bytes))
            return f.read().decode(errors="replace")
    except OSError:
        return ""
