"""MLflow tracking on a background thread: the training step never waits on MLflow or the network."""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import subprocess
import threading
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from exp.config import first_line
from exp.loop import Callback, TrainState

log = logging.getLogger("exp")

MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param value's length
MAX_KEY = 250
BATCH = {"metrics": 1000, "params": 100, "tags": 100}  # MLflow's per-call limits of log_batch
START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 30.0  # how long the end of a run waits for MLflow before leaving the rest in metrics.jsonl
RUN_MARKER = "mlflow_run.json"  # in the run dir: which MLflow run this directory last wrote to


class NullTracker(Callback):
    """tracking=none: nothing leaves the run directory."""

    uri: str | None = None

    def __init__(self, *, cfg: DictConfig | None = None, run_dir: Path | None = None, resume_run_id: str | None = None):
        pass

    @property
    def run_id(self) -> str | None:
        return None

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass


class MlflowTracker(Callback):
    """Records one run: params from the resolved config, tags, metrics with their step, artifacts, status.

    All MLflow calls, its import included (over a second), happen on one worker thread fed by a queue.
    """

    def __init__(
        self,
        uri: str,
        experiment: str = "exp",
        artifact_location: str | None = None,
        parent_run_id: str | None = None,  # set by a pipeline: this run nests under it
        *,
        cfg: DictConfig,
        run_dir: Path,
        resume_run_id: str | None = None,
    ):
        self.resume_run_id, self.parent_run_id = resume_run_id, parent_run_id
        self.checkpoints: list[dict] = []
        self._skip_until: dict[str, int] = {}  # metric -> last step already in MLflow (a resumed run)
        self.uri = _absolute_sqlite(uri)
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self._queue: queue.Queue = queue.Queue()
        self._started = threading.Event()
        self._run_id: str | None = None
        self._failed: str | None = None
        self._thread = threading.Thread(target=self._work, name="mlflow-tracker", daemon=True)

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the worker has created the run (waits for it up to a minute)."""
        self._started.wait(START_TIMEOUT_S)
        return self._run_id

    def on_train_start(self, state: TrainState) -> None:
        if not self._thread.is_alive() and not self._started.is_set():
            self._thread.start()

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._queue.put(("metrics", state.step, time.time(), metrics))

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._queue.put(("metrics", state.step, time.time(), metrics))

    def on_fault(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._queue.put(("metrics", state.step, time.time(), metrics))

    def on_checkpoint(self, state: TrainState, path: Path) -> None:
        """Checkpoints are recorded by reference (path, step, bytes, SHA-256), never uploaded."""
        manifest = json.loads((Path(path) / "manifest.json").read_text())
        files = manifest.get("files", {})
        self.checkpoints = [c for c in self.checkpoints if c["step"] != state.step] + [
            {
                "path": str(Path(path).resolve()),
                "step": state.step,
                "bytes": sum(f["size"] for f in files.values()),
                "sha256": {name: f["sha256"] for name, f in files.items()},
            }
        ]

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._queue.put(("artifact", Path(path), artifact_path))

    def on_train_end(self, state: TrainState, status: str) -> None:
        self.on_train_start(state)  # a run that failed before the loop is still recorded
        self.checkpoints = [c for c in self.checkpoints if Path(c["path"]).exists()]  # rotation deleted the rest
        if self.checkpoints:
            refs = self.run_dir / "checkpoints.json"
            refs.write_text(json.dumps(self.checkpoints, indent=2) + "\n")
            self.log_artifact(refs)
            if status == "FINISHED":  # the final weights and their config, small enough to upload
                final = Path(self.checkpoints[-1]["path"])
                self.log_artifact(final / "model.safetensors", "model")
                self.log_artifact(final / "config.yaml", "model")
        self._queue.put(("end", status))
        self._thread.join(CLOSE_TIMEOUT_S)
        if self._thread.is_alive():
            log.warning(
                f"MLflow at {self.uri} did not answer within {CLOSE_TIMEOUT_S:.0f} s at the end of the run; "
                "the run's metrics are in metrics.jsonl"
            )

    # --- worker thread -------------------------------------------------------------------------

    def _work(self) -> None:
        try:
            client, run_id = self._start_run()
        except Exception as e:
            self._fail(f"MLflow at {self.uri} is unavailable ({first_line(e)}); metrics stay in metrics.jsonl")
            self._started.set()
            self._drain()
            return
        self._started.set()
        while True:
            items = [self._queue.get()]
            while not self._queue.empty():  # batch whatever has queued up since the last call
                items.append(self._queue.get_nowait())
            if self._handle(client, run_id, items):
                return

    def _start_run(self):
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")  # the default retries a dead server ~4 min
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
        from mlflow.entities import Param, RunTag
        from mlflow.tracking import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        self._reconcile_previous(client)
        if self.resume_run_id:
            resumed = self._reopen(client)
            if resumed:
                return client, resumed
        experiment_id = experiment_id_for(client, self.uri, self.experiment, self.artifact_location)
        tags = {k: str(v)[:MAX_PARAM_VALUE] for k, v in run_tags(self.cfg, self.run_dir).items()}
        if self.parent_run_id:
            tags["mlflow.parentRunId"] = self.parent_run_id
        run = client.create_run(experiment_id, run_name=tags.get("run_name"), tags=tags)
        self._run_id = run.info.run_id
        self._write_marker()
        params = [Param(k[:MAX_KEY], v) for k, v in flat_params(self.cfg).items()]
        for i in range(0, len(params), BATCH["params"]):
            client.log_batch(self._run_id, params=params[i : i + BATCH["params"]])
        client.log_batch(self._run_id, tags=[RunTag("mlflow.source.name", "train.py")])
        return client, self._run_id

    def _reconcile_previous(self, client) -> None:
        """A run this directory left RUNNING (its process was SIGKILLed) is closed as KILLED."""
        marker = self.run_dir / RUN_MARKER
        if not marker.exists():
            return
        previous = json.loads(marker.read_text()).get("run_id")
        if not previous or previous == self.resume_run_id:
            return
        try:
            if client.get_run(previous).info.status == "RUNNING":
                client.set_terminated(previous, "KILLED")
                log.warning(
                    f"MLflow run {previous} of {self.run_dir} was left RUNNING by a killed process; marked KILLED"
                )
        except Exception as e:  # another store, or the run was deleted: nothing to reconcile here
            log.debug(f"cannot reconcile MLflow run {previous}: {first_line(e)}")

    def _reopen(self, client) -> str | None:
        """Continue the checkpoint's MLflow run: back to RUNNING, and no step it already has is logged again."""
        try:
            run = client.get_run(self.resume_run_id)
        except Exception as e:
            log.warning(
                f"MLflow run {self.resume_run_id} of the checkpoint is not in {self.uri} "
                f"({first_line(e)}); starting a new run"
            )
            return None
        for key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            self._skip_until[key] = max((m.step for m in history), default=-1)
        client.update_run(run.info.run_id, status="RUNNING")
        self._run_id = run.info.run_id
        self._write_marker()
        return self._run_id

    def _write_marker(self) -> None:
        marker = self.run_dir / RUN_MARKER
        marker.write_text(json.dumps({"tracking_uri": self.uri, "run_id": self._run_id}) + "\n")

    def _handle(self, client, run_id: str, items: list) -> bool:
        from mlflow.entities import Metric

        metrics, done = [], False
        for item in items:
            if item[0] == "metrics":
                _, step, stamp, values = item
                metrics += [
                    Metric(k, float(v), int(stamp * 1000), step)
                    for k, v in values.items()
                    if step > self._skip_until.get(k, -1)
                ]
            elif item[0] == "artifact":
                self._flush(client, run_id, metrics)
                metrics = []
                self._call(client.log_artifact, run_id, str(item[1]), item[2])
            elif item[0] == "end":
                self._flush(client, run_id, metrics)
                metrics = []
                self._call(client.set_terminated, run_id, item[1])
                done = True
        self._flush(client, run_id, metrics)
        return done

    def _flush(self, client, run_id: str, metrics: list) -> None:
        for i in range(0, len(metrics), BATCH["metrics"]):
            self._call(client.log_batch, run_id, metrics=metrics[i : i + BATCH["metrics"]])

    def _call(self, fn, *args, **kwargs) -> None:
        if self._failed:
            return
        try:
            fn(*args, **kwargs)
        except Exception as e:
            self._fail(
                f"MLflow at {self.uri} stopped answering ({first_line(e)}); "
                "the rest of this run's metrics stay in metrics.jsonl"
            )

    def _fail(self, message: str) -> None:
        if not self._failed:
            self._failed = message
            log.warning(message)

    def _drain(self) -> None:
        while self._queue.get()[0] != "end":
            pass


def experiment_id_for(client, uri: str, name: str, artifact_location: str | None) -> str:
    """The id of the named experiment, created (with a local artifact folder for local stores) if missing."""
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    location = None
    if artifact_location and not uri.startswith(("http://", "https://", "databricks")):
        location = Path(artifact_location).resolve().as_uri()
    return client.create_experiment(name, artifact_location=location)


def open_parent_run(cfg: DictConfig, run_dir: Path, kind: str = "pipeline"):
    """(client, run id) of a pipeline's or sweep's parent run: reopened when run_dir has one, else created."""
    from mlflow.tracking import MlflowClient

    uri = _absolute_sqlite(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    marker = Path(run_dir) / RUN_MARKER
    if marker.exists():
        run_id = json.loads(marker.read_text()).get("run_id")
        try:
            client.update_run(run_id, status="RUNNING")
            return client, run_id
        except Exception:  # gone from this store: start a new parent
            pass
    experiment_id = experiment_id_for(client, uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    tags = {"run_dir": str(Path(run_dir).resolve()), "host": platform.node(), "kind": kind}
    if kind == "pipeline":
        tags["pipeline"] = ",".join(cfg.pipeline.stages.keys())
    else:
        tags["sweep_dir"] = tags["sweep_id"] = str(Path(run_dir).resolve())
    run = client.create_run(experiment_id, run_name=f"{kind}-{Path(run_dir).name}", tags=tags)
    marker.write_text(json.dumps({"tracking_uri": uri, "run_id": run.info.run_id}) + "\n")
    return client, run.info.run_id


def flat_params(cfg: DictConfig) -> dict[str, str]:
    """The resolved config as `group.key` -> value strings, cut to MLflow's length limit."""
    container = OmegaConf.to_container(cfg, resolve=True)
    flat: dict[str, str] = {}

    def walk(prefix: str, node) -> None:
        if isinstance(node, dict):
            for k, v in node.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = str(node)[:MAX_PARAM_VALUE]

    walk("", container)
    return flat


def run_tags(cfg: DictConfig, run_dir: Path) -> dict[str, str]:
    """Where and from what code a run came: git commit, host, versions, overrides, stage, run dir."""
    import torch

    tags = {
        "run_name": str(cfg.get("run_name", "run")),
        "run_dir": str(Path(run_dir).resolve()),
        "host": platform.node(),
        "torch_version": torch.__version__,
        "cuda_version": str(torch.version.cuda),
        "stage": str(cfg.stage.get("name", "")),
    }
    commit, dirty = git_state()
    if commit:
        tags["mlflow.source.git.commit"], tags["git_dirty"] = commit, str(dirty).lower()
    try:
        from hydra.core.hydra_config import HydraConfig

        hydra_cfg = HydraConfig.get()
        tags["overrides"] = " ".join(hydra_cfg.overrides.task) or "(none)"
        if hydra_cfg.mode is not None and hydra_cfg.mode.name == "MULTIRUN":
            tags["sweep_dir"] = tags["sweep_id"] = str(Path(str(hydra_cfg.sweep.dir)).resolve())
            tags["sweep_trial"] = str(hydra_cfg.job.num)
    except ValueError:  # HydraConfig not set: called outside @hydra.main
        pass
    for env, tag in (("SLURM_JOB_ID", "slurm_job_id"), ("SLURM_ARRAY_JOB_ID", "slurm_array_job_id")):
        if env in os.environ:
            tags[tag] = os.environ[env]
    return tags


def git_state() -> tuple[str | None, bool]:
    """(commit, dirty) of the code that is running, or (None, False) outside a git checkout."""
    root = Path(__file__).resolve().parents[1]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5, check=True
        ).stdout.strip()
        status = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout
    except (OSError, subprocess.SubprocessError):
        return None, False
    return commit, bool(status.strip())


def _absolute_sqlite(uri: str) -> str:
    """A relative sqlite path is made absolute (and its folder created) so every process finds the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri[len(prefix) :].startswith("/"):
        path = Path(uri[len(prefix) :]).resolve()
        path.parent.mkdir(parents=True, exist_ok=True)
        return prefix + str(path)
    if uri.startswith(prefix):
        Path(uri[len(prefix) :]).parent.mkdir(parents=True, exist_ok=True)
    return uri
