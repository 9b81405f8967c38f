"""The MLflow side of tracking, run in its own process: no import of torch here, no GIL shared with training.

The trainer sends one Settings, then Metrics, Tags and Artifact messages and one End through `inbox`; this
process answers Started (the run id, or None), Warn and Done in `outbox`. The messages are the small dataclasses
below, pickled over the multiprocessing queues.

The process imports MLflow (over a second of CPU) before its settings arrive, so `prestart` can launch it
while the trainer itself is still starting (importing torch, building the model): the two start-ups share
the machine's cores instead of MLflow's competing with the first training steps. It runs under SCHED_IDLE,
on CPU time training leaves idle.
"""

from __future__ import annotations

import atexit
import json
import logging
import multiprocessing
import multiprocessing.util  # registers its exit handler now, so that ours (below) runs before it
import os
import queue
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig

from exp.rundir import write_json
from exp.signals import sigint_ignored
from exp.text import first_line

MAX_KEY = 250
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-call limits of log_batch
RUN_MARKER = "mlflow_run.json"  # in the run dir: which MLflow run this directory last wrote to
WORKER_IGNORES = {signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2}  # the trainer's to act on (with SIGINT)


# --- the messages -----------------------------------------------------------------------------------
# trainer -> worker


@dataclass(frozen=True)
class Settings:
    """The run to record, sent once, first: its store, experiment, parent, the run to reopen or the one created
    for it beforehand, tags and params."""

    uri: str
    experiment: str
    artifact_location: str | None
    parent_run_id: str | None
    resume_run_id: str | None
    run_dir: str
    tags: dict[str, str]
    params: dict[str, str]
    run_id: str | None = None  # created beforehand (by the job service, to answer with it at once): filled in
    system_metrics_interval: float | None = None  # seconds between MLflow's system metrics samples; None: off


@dataclass(frozen=True)
class Metrics:
    step: int
    time: float  # unix time, seconds
    values: dict[str, float]


@dataclass(frozen=True)
class Tags:
    tags: dict[str, str]
    run_id: str | None = None  # another run of the store (the branch a resume left behind); None: this run


@dataclass(frozen=True)
class Artifact:
    path: str
    artifact_path: str | None = None


@dataclass(frozen=True)
class End:
    """The run's last message: close it with this status."""

    status: str


# worker -> trainer


@dataclass(frozen=True)
class Started:
    """The run exists (created or reopened); run_id None when MLflow was unavailable."""

    run_id: str | None


@dataclass(frozen=True)
class Warn:
    """A line for the trainer's log."""

    message: str


@dataclass(frozen=True)
class Done:
    """The End was handled: everything before it is in MLflow, or was given up on with a Warn."""


# --- the process, as the trainer holds it --------------------------------------------------------------


class Handle:
    """A worker process and its two queues, as the trainer holds them. `uri` only says which store's code to
    import ahead; the run's settings, sent later, name the store."""

    def __init__(self, uri: str = ""):
        ctx = multiprocessing.get_context("spawn")  # a fresh interpreter: no torch, no fork of a big process
        self.inbox, self.outbox = ctx.Queue(), ctx.Queue()
        # the trainer's pid, not the worker's later getppid(): a trainer killed while the worker starts is gone by then
        args = (self.inbox, self.outbox, uri, os.getpid())
        self.process = ctx.Process(target=main, args=args, name="mlflow-tracker", daemon=True)
        # from birth: a Ctrl-C to the process group, or SLURM's signals to every process of the job (scancel
        # --signal=USR1 for save now), must not end it while it starts. SIGINT is ignored (inherited across exec);
        # the others are blocked for the start only, so the trainer still gets each one (delivered once unblocked)
        # and the worker ignores them before it unblocks them (main).
        with sigint_ignored():
            before = signal.pthread_sigmask(signal.SIG_BLOCK, WORKER_IGNORES)
            try:
                self.process.start()
            finally:
                signal.pthread_sigmask(signal.SIG_SETMASK, before)
        _yield_cpu(self.process.pid)
        _started[:] = [h for h in _started if h.process.is_alive()] + [self]


_prestarted: Handle | None = None
_started: list[Handle] = []


def prestart(cfg) -> None:
    """Launch the worker for the run `cfg` is about to start, if it tracks to MLflow from this process."""
    global _prestarted
    rank = os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0"))
    tracking = cfg.get("tracking")
    if (
        isinstance(tracking, DictConfig)  # anything else is refused by validation, one line, right after
        and _prestarted is None
        and rank == "0"
        and str(tracking.get("_target_", "")).endswith("MlflowTracker")
        and not cfg.get("dry_run")
        and cfg.get("pipeline") is None  # a pipeline's stages start their own trackers, one after another
    ):
        _prestarted = Handle(str(tracking.get("uri") or ""))


def take(uri: str) -> Handle:
    """The prestarted worker, or a new one."""
    global _prestarted
    handle, _prestarted = _prestarted, None
    if handle is not None and handle.process.is_alive():
        return handle
    return Handle(uri)


@atexit.register  # registered after multiprocessing's exit handler, so it runs before that one joins workers
def _kill_leftovers() -> None:
    """At exit, a worker still alive is one no run claimed (the config was refused, the job failed early) or one
    whose run could not end it; it ignores SIGTERM, so it is killed. A run it left RUNNING is reconciled on the
    next launch of its run directory."""
    for handle in _started:
        if handle.process.is_alive():
            handle.process.kill()
            handle.process.join()


def _yield_cpu(pid: int) -> None:
    """Let the worker (its start-up too: interpreter, imports) run only on CPU time training leaves idle.

    With as many compute threads as cores, any process that takes a core stalls every thread of a step at
    its next barrier; SCHED_IDLE gives the core back at once when a training thread wakes. Where that policy
    is missing, the lowest priority nice allows is the next best.
    """
    try:
        os.sched_setscheduler(pid, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        try:
            os.setpriority(os.PRIO_PROCESS, pid, 19)
        except OSError:
            pass


# --- the process itself --------------------------------------------------------------------------------


def _import_store(uri: str) -> None:
    """Import the code of the store `uri` names (half a second for SQLAlchemy's), touching no store."""
    try:
        if uri.startswith(("http://", "https://", "databricks")):
            import mlflow.store.tracking.rest_store  # noqa: F401
        elif uri.split(":", 1)[0].split("+")[0] in ("sqlite", "postgresql", "mysql", "mssql"):
            import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
    except ImportError:  # a driver missing: the settings' store reports it properly
        pass


def main(inbox, outbox, uri: str = "", trainer: int | None = None) -> None:
    """Import MLflow, wait for the run's settings, create or reopen the run, then log whatever arrives until
    the end message (or until the trainer, process `trainer`, is gone)."""
    # The trainer decides when the run ends: Ctrl-C (sent to the whole process group), SIGTERM or SLURM's
    # USR2 must reach it, not stop this process before it has logged the ending.
    # SIGUSR1 (save now) too: on SLURM, scancel --signal reaches every process of the job, this one included
    for sig in (signal.SIGINT, *WORKER_IGNORES):
        signal.signal(sig, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, WORKER_IGNORES)  # blocked by the trainer while this process started
    trainer = trainer or os.getppid()
    if os.getppid() != trainer:  # SIGKILLed while this process started: this one is an orphan already
        return
    fail_fast_http()
    import mlflow.tracking  # noqa: F401  (most of the start-up; done before the settings are needed)

    _import_store(uri)

    settings = None
    while settings is None:
        try:
            message = inbox.get(timeout=1.0)
        except queue.Empty:
            if os.getppid() != trainer:
                return
            continue
        if isinstance(message, Settings):
            settings = message
    if os.getppid() != trainer:  # killed before its run existed (its checkpoints name none): no run to leave RUNNING
        return
    worker = _Worker(settings, outbox)
    try:
        worker.start()
    except Exception as e:
        worker.fail(f"MLflow at {settings.uri} is unavailable ({first_line(e)}); metrics stay in metrics.jsonl")
    outbox.put(Started(worker.run_id))
    worker.start_system_metrics()
    while True:
        try:
            items = [inbox.get(timeout=worker.timeout())]
        except queue.Empty:
            if os.getppid() != trainer:  # the trainer was SIGKILLed: its run is reconciled on the next launch
                return
            worker.sample_system()
            continue
        while not inbox.empty():  # batch whatever has queued up since the last call
            items.append(inbox.get_nowait())
        if worker.handle(items):
            outbox.put(Done())
            return
        worker.sample_system()


class _Worker:
    def __init__(self, settings: Settings, outbox):
        self.s, self.outbox = settings, outbox
        self.client = self.run_id = self.experiment_id = self.failed = self.system = None
        self.skip_until: dict[str, int] = {}  # metric -> last step already in MLflow (a resumed run)

    def start(self) -> None:
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        s = self.s
        self.client = MlflowClient(tracking_uri=s.uri)
        self._reconcile_previous()
        if s.resume_run_id and self._reopen():
            return
        tags = dict(s.tags)
        if s.parent_run_id:
            tags["mlflow.parentRunId"] = s.parent_run_id
        if s.run_id and self._adopt():
            run_tags = [RunTag(k, v) for k, v in tags.items()]
            if tags.get("run_name"):  # created under the job's id; named as the CLI would have named it
                run_tags.append(RunTag("mlflow.runName", tags["run_name"]))
            for i in range(0, len(run_tags), BATCH["tags"]):
                self.client.log_batch(self.run_id, tags=run_tags[i : i + BATCH["tags"]])
            self.client.update_run(self.run_id, status="RUNNING")
        else:
            experiment_id = experiment_id_for(self.client, s.uri, s.experiment, s.artifact_location)
            run = self.client.create_run(experiment_id, run_name=tags.get("run_name"), tags=tags)
            self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._write_marker()
        params = [Param(k[:MAX_KEY], v) for k, v in s.params.items()]
        for i in range(0, len(params), BATCH["params"]):
            self.client.log_batch(self.run_id, params=params[i : i + BATCH["params"]])
        self.client.log_batch(self.run_id, tags=[RunTag("mlflow.source.name", "train.py")])

    def start_system_metrics(self) -> None:
        """MLflow's system metrics for this run, sampled by this process's loop (`SystemMetrics`)."""
        if not self.s.system_metrics_interval or self.run_id is None or self.failed:
            return
        try:
            steps = [step for key, step in self.skip_until.items() if key.startswith(SystemMetrics.PREFIX)]
            self.system = SystemMetrics(self.s.system_metrics_interval, first_step=max(steps, default=-1) + 1)
        except Exception as e:  # psutil missing, a collector that cannot start: the run goes on without them
            self.warn(f"MLflow system metrics are off ({first_line(e)})")

    def timeout(self) -> float:
        """How long the loop may wait for a message: until the next system-metrics sample is due, at most 1 s."""
        return 1.0 if self.system is None else min(1.0, self.system.wait())

    def sample_system(self, last: bool = False) -> None:
        """Log a system-metrics sample if one is due (or `last`: the run is ending)."""
        if self.system is not None and (last or self.system.wait() == 0):
            self._flush(self.system.sample())

    def _reconcile_previous(self) -> None:
        """A run this directory left RUNNING (its process was SIGKILLed) is closed as KILLED."""
        marker = Path(self.s.run_dir) / RUN_MARKER
        if not marker.exists():
            return
        previous = json.loads(marker.read_text()).get("run_id")
        if not previous or previous in (self.s.resume_run_id, self.s.run_id):  # the run this launch continues
            return
        try:
            if self.client.get_run(previous).info.status == "RUNNING":
                self.client.set_terminated(previous, "KILLED")
                self.warn(
                    f"MLflow run {previous} of {self.s.run_dir} was left RUNNING by a killed process; marked KILLED"
                )
        except Exception:  # another store, or the run was deleted: nothing to reconcile here
            pass

    def _adopt(self) -> bool:
        """Take the run created beforehand for this one (tracking.run_id); a missing or ended run costs a warning
        and a new run."""
        try:
            info = self.client.get_run(self.s.run_id).info
            status, self.experiment_id = info.status, info.experiment_id
        except Exception as e:
            self.warn(
                f"MLflow run {self.s.run_id} (tracking.run_id) is not in {self.s.uri} ({first_line(e)}); "
                "starting a new run"
            )
            return False
        if status not in ("RUNNING", "SCHEDULED"):
            self.warn(f"MLflow run {self.s.run_id} (tracking.run_id) has ended ({status}); starting a new run")
            return False
        self.run_id = self.s.run_id
        return True

    def _reopen(self) -> bool:
        """Continue the checkpoint's MLflow run: back to RUNNING, and no step it already has is logged again."""
        try:
            run = self.client.get_run(self.s.resume_run_id)
        except Exception as e:
            self.warn(
                f"MLflow run {self.s.resume_run_id} of the checkpoint is not in {self.s.uri} "
                f"({first_line(e)}); starting a new run"
            )
            return False
        for key in run.data.metrics:
            history = self.client.get_metric_history(run.info.run_id, key)
            self.skip_until[key] = max((m.step for m in history), default=-1)
        self.client.update_run(run.info.run_id, status="RUNNING")
        self.run_id, self.experiment_id = run.info.run_id, run.info.experiment_id
        self._write_marker()
        return True

    def _write_marker(self) -> None:
        record = {"tracking_uri": self.s.uri, "run_id": self.run_id, "experiment_id": self.experiment_id}
        write_json(Path(self.s.run_dir) / RUN_MARKER, record)

    def handle(self, items: list) -> bool:
        """Log a batch of messages; True once the run has ended."""
        from mlflow.entities import Metric, RunTag

        metrics, done = [], False
        for item in items:
            match item:
                case Metrics(step=step, time=stamp, values=values):
                    metrics += [
                        Metric(k, float(v), int(stamp * 1000), step)
                        for k, v in values.items()
                        if step > self.skip_until.get(k, -1)
                    ]
                case Tags(tags=tags, run_id=other) if other:
                    self._tag_other(other, tags)
                case Tags(tags=tags):
                    self._call(
                        lambda tags=tags: self.client.log_batch(
                            self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]
                        )
                    )
                case Artifact(path=path, artifact_path=artifact_path):
                    self._flush(metrics)
                    metrics = []
                    self._call(lambda p=path, a=artifact_path: self.client.log_artifact(self.run_id, p, a))
                case End(status=status):
                    self._flush(metrics)
                    metrics = []
                    self.sample_system(last=True)  # its last sample before the run ends
                    self._call(lambda status=status: self.client.set_terminated(self.run_id, status))
                    done = True
        self._flush(metrics)
        return done

    def _tag_other(self, run_id: str, tags: dict[str, str]) -> None:
        """Tag another run (the branch a resume left behind): one that is gone costs a warning, not this run's."""
        from mlflow.entities import RunTag

        if self.failed or self.run_id is None:
            return
        try:
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        except Exception as e:
            self.warn(f"MLflow run {run_id} could not be tagged ({first_line(e)})")

    def _flush(self, metrics: list) -> None:
        for i in range(0, len(metrics), BATCH["metrics"]):
            self._call(
                lambda chunk=metrics[i : i + BATCH["metrics"]]: self.client.log_batch(self.run_id, metrics=chunk)
            )

    def _call(self, fn) -> None:
        if self.failed or self.run_id is None:
            return
        try:
            fn()
        except Exception as e:
            self.fail(
                f"MLflow at {self.s.uri} stopped answering ({first_line(e)}); "
                "the rest of this run's metrics stay in metrics.jsonl"
            )

    def fail(self, message: str) -> None:
        if not self.failed:
            self.failed = message
            self.warn(message)

    def warn(self, message: str) -> None:
        self.outbox.put(Warn(message))


class SystemMetrics:
    """MLflow's system-metrics collectors (system/cpu_utilization_percentage, system/system_memory_usage_megabytes,
    disk, network; through nvidia-ml-py the job's own GPUs), sampled every `interval` seconds and logged by the
    worker's loop with the run's other metrics.

    Not MLflow's SystemMetricsMonitor thread: it asks the store for the run after every sample and is joined at
    the run's end, so a dead server or a busy SQLite file held runs at their end for minutes. Here a sample is one
    more log_batch of the one thread that talks to the store, failing as the others do (one warning)."""

    PREFIX = "system/"

    def __init__(self, interval: float, first_step: int = 0):
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.collectors = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        gpus = _gpu_collector()
        if gpus is not None:
            self.collectors.append(gpus)
        self.interval, self.step = float(interval), first_step
        for collector in self.collectors:  # psutil's CPU figure counts from its previous call: this one primes it
            collector.collect_metrics()
            collector.clear_metrics()
        self.due = time.monotonic() + self.interval

    def wait(self) -> float:
        return max(0.0, self.due - time.monotonic())

    def sample(self) -> list:
        """One sample of every collector as MLflow metrics at the next step."""
        from mlflow.entities import Metric

        stamp, values = int(time.time() * 1000), {}
        for collector in self.collectors:
            collector.collect_metrics()
            values.update(collector.aggregate_metrics())
            collector.clear_metrics()
        metrics = [Metric(self.PREFIX + k, float(v), stamp, self.step) for k, v in values.items()]
        self.step += 1
        self.due = max(self.due + self.interval, time.monotonic())  # behind (a slow store): the next one at once
        return metrics


def _gpu_collector():
    """MLflow's NVIDIA (or AMD) GPU collector, watching only the job's GPUs; None where there is none."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # not its "skip logging GPU metrics"
    try:
        from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

        gpus = GPUMonitor()
    except Exception:
        try:
            from mlflow.system_metrics.metrics.rocm_monitor import ROCMMonitor

            return ROCMMonitor()
        except Exception:
            return None
    keep = own_gpus(gpus.num_gpus, os.environ.get("CUDA_VISIBLE_DEVICES"))
    gpus.gpu_handles = [gpus.gpu_handles[i] for i in keep]
    return gpus


# --- the store, shared with the trainer's side and parent runs ------------------------------------------


def own_gpus(num_gpus: int, visible: str | None) -> list[int]:
    """The NVML indices of the job's GPUs: those CUDA_VISIBLE_DEVICES names by index (SLURM sets it to the job's
    allocation), every GPU when it is unset; names NVML does not index (UUIDs, MIG) keep them all."""
    if visible is None:
        return list(range(num_gpus))
    names = [v.strip() for v in visible.split(",") if v.strip()]
    if not all(n.isdigit() for n in names):
        return list(range(num_gpus))
    return [int(n) for n in names if int(n) < num_gpus]


# MLflow 3 opens an experiment in its GenAI view unless told its kind: exp's are model training
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")


def experiment_id_for(client, uri: str, name: str, artifact_location: str | None, base: Path | None = None) -> str:
    """The id of the named experiment, created (with a local artifact folder for local stores, relative to `base`,
    else the working directory) if missing; one without a kind is tagged as model training (EXPERIMENT_KIND)."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        if EXPERIMENT_KIND[0] not in experiment.tags:
            client.set_experiment_tag(experiment.experiment_id, *EXPERIMENT_KIND)
        return experiment.experiment_id
    location = None
    if artifact_location and not uri.startswith(("http://", "https://", "databricks")):
        location = (Path(base or ".") / artifact_location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def fail_fast_http() -> None:
    """MLflow's HTTP client gives up on a dead server in seconds instead of retrying it for ~4 minutes (unless
    the user set these variables)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


def absolute_uri(uri: str, base: Path | None = None) -> str:
    """A relative sqlite path is made absolute (relative to `base`, else the working directory; its folder
    created) so every process finds the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        path = (Path(base or ".") / uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
    return uri
