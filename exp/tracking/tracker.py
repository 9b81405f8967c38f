"""The trainer's side of tracking: MlflowTracker hands everything to a separate process (exp.tracking.worker),
so the training step never waits on MLflow or the network; NullTracker (tracking=none) records nothing."""

from __future__ import annotations

import json
import logging
import os
import platform
import queue
import subprocess
import time
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from exp.events import Callback, TrainState
from exp.paths import REPO_ROOT
from exp.rundir import read_json, write_json
from exp.text import first_line
from exp.tracking.worker import (
    MAX_KEY,
    RUN_MARKER,
    Artifact,
    Done,
    End,
    Metrics,
    Settings,
    Started,
    Tags,
    Warn,
    absolute_uri,
    fail_fast_http,
    take,
)

log = logging.getLogger("exp")

MAX_PARAM_VALUE = 6000  # MLflow 3's limit on a param value's length
START_TIMEOUT_S = 60.0
CLOSE_TIMEOUT_S = 30.0  # how long the end of a run waits for MLflow before leaving the rest in metrics.jsonl
MLFLOW_STATUSES = ("RUNNING", "SCHEDULED", "FINISHED", "FAILED", "KILLED")


class NullTracker(Callback):
    """tracking=none: nothing leaves the run directory."""

    uri: str | None = None

    def __init__(self, *, cfg: DictConfig | None = None, run_dir: Path | None = None, resume_run_id: str | None = None):
        pass

    @property
    def run_id(self) -> str | None:
        return None

    known_run_id = run_id

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        pass

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        pass


class PendingTracker(NullTracker):
    """Stands in for a resumed run's tracker until every rank has restored the checkpoint: a refused or failed
    resume then leaves the MLflow run as it was. What it is given meanwhile (the config changes) is replayed."""

    def __init__(self):
        self._calls: list[tuple[str, tuple]] = []

    def log_artifact(self, path: Path, artifact_path: str | None = None) -> None:
        self._calls.append(("log_artifact", (path, artifact_path)))

    def set_tags(self, tags: dict[str, str], *args) -> None:
        self._calls.append(("set_tags", (dict(tags), *args)))

    def replay(self, tracker):
        """`tracker`, handed what this one was given, in order."""
        for name, args in self._calls:
            getattr(tracker, name)(*args)
        return tracker


def resumed_run_id(trainer_state: dict, checkpoint: Path) -> str | None:
    """The MLflow run a checkpoint's run continues: the id saved in it, else (saved before the worker had reported
    it) the run its run directory's worker created or reopened, named in that directory's mlflow_run.json."""
    if trainer_state.get("mlflow_run_id") or not trainer_state.get("mlflow_tracking_uri"):
        return trainer_state.get("mlflow_run_id")
    marker = read_json(Path(checkpoint).parent.parent / RUN_MARKER)  # checkpoints/step_N in the run dir
    if isinstance(marker, dict) and marker.get("tracking_uri") == trainer_state["mlflow_tracking_uri"]:
        return marker.get("run_id")
    return None


class MlflowTracker(Callback):
    """Records one run: params from the resolved config, tags, metrics with their step, artifacts, status.

    MLflow lives in a child process (exp.tracking.worker) fed by a queue: its import (over a second, 120 MB)
    and every call to the store or server happen beside training, never inside a step, and share no GIL.
    """

    def __init__(
        self,
        uri: str,
        experiment: str = "exp",
        artifact_location: str | None = None,
        parent_run_id: str | None = None,  # set by a pipeline or sweep: this run nests under it
        run_id: str | None = None,  # an MLflow run created beforehand for this one (the job service's): filled in
        system_metrics: bool = True,  # MLflow's system metrics (CPU, memory, disk, network, the job's GPUs)
        system_metrics_interval: float = 10.0,  # seconds between samples
        ui_url: str | None = None,  # the MLflow UI's address, for links to the run (the dashboard's)
        *,
        cfg: DictConfig,
        run_dir: Path,
        resume_run_id: str | None = None,
    ):
        if not system_metrics_interval > 0:
            raise ValueError(f"tracking.system_metrics_interval={system_metrics_interval} must be > 0 (seconds)")
        self.uri = absolute_uri(uri)
        self.run_dir = Path(run_dir)
        self.checkpoints: list[dict] = []
        self._run_id: str | None = None
        self._started = self._done = False
        handle = take(self.uri)  # prestarted by train.py while the trainer was starting, or new
        self._inbox, self._outbox, self._proc = handle.inbox, handle.outbox, handle.process
        self._inbox.put(
            Settings(
                uri=self.uri,
                experiment=experiment,
                artifact_location=artifact_location,
                parent_run_id=parent_run_id,
                resume_run_id=resume_run_id,
                run_id=run_id,
                system_metrics_interval=float(system_metrics_interval) if system_metrics else None,
                run_dir=str(self.run_dir),
                tags={k: str(v)[:MAX_PARAM_VALUE] for k, v in run_tags(cfg, self.run_dir).items()},
                params=flat_params(cfg),
            )
        )

    @property
    def run_id(self) -> str | None:
        """The MLflow run id, once the worker has created the run (waits for it up to a minute)."""
        self._poll(until=Started, timeout=START_TIMEOUT_S)
        return self._run_id

    @property
    def known_run_id(self) -> str | None:
        """The MLflow run id if the worker has reported it yet, else None: never waits (a checkpoint's record)."""
        self._poll()
        return self._run_id

    def _send(self, message: Metrics | Tags | Artifact | End) -> None:
        self._inbox.put(message)
        self._poll()

    def _poll(self, until: type[Started] | type[Done] | None = None, timeout: float = 0.0) -> None:
        """Log the worker's warnings; with `until`, wait (up to timeout) for that message."""
        if (until is Started and self._started) or (until is Done and self._done):
            return
        deadline = time.monotonic() + timeout
        while True:
            try:
                # waiting in slices: a worker that died (OOM killer, a signal) is not waited for to the deadline
                message = (
                    self._outbox.get(timeout=min(1.0, max(0.0, deadline - time.monotonic())))
                    if until
                    else self._outbox.get_nowait()
                )
            except queue.Empty:
                if until is None or time.monotonic() >= deadline or not self._proc.is_alive():
                    return
                continue
            if isinstance(message, Warn):
                log.warning(message.message)
            elif isinstance(message, Started):
                self._started, self._run_id = True, message.run_id
            elif isinstance(message, Done):
                self._done = True
            if until is not None and isinstance(message, until):
                return

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._send(Metrics(state.step, time.time(), metrics))

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._send(Metrics(state.step, time.time(), metrics))

    def on_fault(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._send(Metrics(state.step, time.time(), metrics))

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._send(Metrics(state.step, time.time(), metrics))

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
        self._send(Artifact(str(path), artifact_path))

    def set_tags(self, tags: dict[str, str], run_id: str | None = None) -> None:
        """Tags on this run, or on another run of the store (`run_id`: the branch a resume left behind)."""
        self._send(Tags({k[:MAX_KEY]: str(v)[:MAX_PARAM_VALUE] for k, v in tags.items()}, run_id))

    def log_metrics(self, step: int, metrics: dict[str, float], stamp: float) -> None:
        """Metrics of `step` taken at `stamp` (Unix seconds), passed on later: held until a checkpoint covered them."""
        self._send(Metrics(step, stamp, metrics))

    def on_train_end(self, state: TrainState, status: str) -> None:
        self.checkpoints = [c for c in self.checkpoints if Path(c["path"]).exists()]  # rotation deleted the rest
        if self.checkpoints:
            refs = self.run_dir / "checkpoints.json"
            write_json(refs, self.checkpoints)
            self.log_artifact(refs)
            final = Path(self.checkpoints[-1]["path"])
            if status == "FINISHED" and (final / "model.safetensors").exists():  # the final weights, uploaded
                self.log_artifact(final / "model.safetensors", "model")
                self.log_artifact(final / "config.yaml", "model")
                if (final / "tokenizer.json").exists():  # a BPE run's weights are unusable without their tokenizer
                    self.log_artifact(final / "tokenizer.json", "model")
        if status not in MLFLOW_STATUSES:  # PRUNED: MLflow has no such status; KILLED, with the status as a tag
            self.set_tags({"status": status})
        self._send(End(status if status in MLFLOW_STATUSES else "KILLED"))
        self._poll(until=Started, timeout=START_TIMEOUT_S)
        self._poll(until=Done, timeout=CLOSE_TIMEOUT_S)
        if not self._done and not self._proc.is_alive():  # the worker died during the run
            self._close_from_here(status if status in MLFLOW_STATUSES else "KILLED")
        elif not self._done:  # never left RUNNING: the worker is stopped and the run closed from here
            self._proc.kill()
            self._close_from_here(
                status if status in MLFLOW_STATUSES else "KILLED",
                f"MLflow at {self.uri} did not answer within {CLOSE_TIMEOUT_S:.0f} s at the end of the run",
                tags={"status": status} if status not in MLFLOW_STATUSES else {},
            )
        self._proc.join(10)

    def _close_from_here(self, status: str, why: str | None = None, tags: dict | None = None) -> None:
        """The worker process is gone (killed by the OOM killer or a signal) or did not answer (`why`): the run's
        ending is set from this process, so MLflow does not show it RUNNING; what the worker had not logged stays
        in metrics.jsonl."""
        message = (
            f"{why or f'the MLflow worker process ended during the run (exit code {self._proc.exitcode})'}; "
            "the run's metrics are in metrics.jsonl"
        )
        if self._run_id is None:  # killed before its Started message: the run it created, if any, is in the marker
            marker = read_json(self.run_dir / RUN_MARKER)
            self._run_id = marker.get("run_id") if isinstance(marker, dict) else None
        if self._run_id is None:
            log.warning(message)
            return
        try:
            from mlflow.tracking import MlflowClient

            fail_fast_http()
            client = MlflowClient(tracking_uri=self.uri)
            for key, value in (tags or {}).items():
                client.set_tag(self._run_id, key, value)
            client.set_terminated(self._run_id, status)
            log.warning(f"{message}; MLflow run {self._run_id} closed {status} from the trainer")
        except Exception as e:
            log.warning(f"{message}; MLflow run {self._run_id} could not be closed ({first_line(e)})")


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
    root = REPO_ROOT
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
