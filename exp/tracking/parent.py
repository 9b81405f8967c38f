"""The MLflow runs opened outside a trainer: the one a pipeline's stages or a sweep's trials nest under (their
`tracking.parent_run_id`), and one created ahead of a job (`tracking.run_id`: the job service answers with its id
before the job has started).

One implementation for both: exp.pipeline opens one per pipeline directory, exp.sweep.launch one per sweep
directory. The directory's mlflow_run.json names it, so launching into the same directory again (a rerun pipeline,
the next batch of a sweep, `python -m exp.sweep resume`) reopens the same run instead of starting another.
"""

from __future__ import annotations

import json
import logging
import platform
import time
from pathlib import Path

from omegaconf import DictConfig

from exp.rundir import write_json
from exp.text import first_line
from exp.tracking.worker import RUN_MARKER, absolute_uri, experiment_id_for, fail_fast_http

log = logging.getLogger("exp")
MEMBERS = {"pipeline": "stages", "sweep": "trials"}


class ParentRun:
    """An open parent run; without one (tracking=none, MLflow unavailable) run_id and uri are None and end() does
    nothing, so callers need no branch of their own."""

    def __init__(self, client=None, run_id: str | None = None, kind: str = "pipeline"):
        self.client, self.run_id, self.kind = client, run_id, kind
        self.uri: str | None = client.tracking_uri if client is not None else None

    def record_best(self, value: float, params: dict, trial: int, metric: str = "best_val_loss") -> None:
        """The best member so far on the run: `metric` (a point per call, stepped by trial number) and tags
        `best_trial` and `best.<key>` (tags, since a resumed sweep may find a better point and params are fixed)."""
        if self.client is None:
            return
        from mlflow.entities import Metric, RunTag

        tags = [RunTag("best_trial", str(trial))]
        tags += [RunTag(f"best.{k}"[:250], str(v)[:5000]) for k, v in params.items()]
        try:
            self.client.log_batch(self.run_id, metrics=[Metric(metric, float(value), int(time.time() * 1000), trial)])
            self.client.log_batch(self.run_id, tags=tags)
        except Exception as e:
            log.warning(f"could not record the best of the {self.kind}'s MLflow run {self.run_id}: {first_line(e)}")

    def end(self, status: str) -> None:
        """Close the run with `status` (FINISHED, FAILED, KILLED); a store that fails here costs one warning."""
        if self.client is None:
            return
        try:
            self.client.set_terminated(self.run_id, status)
        except Exception as e:
            log.warning(f"could not close the {self.kind}'s MLflow run {self.run_id}: {first_line(e)}")


def open_parent_run(cfg: DictConfig, run_dir: Path, kind: str = "pipeline") -> ParentRun:
    """The parent run of the pipeline (kind="pipeline") or sweep (kind="sweep") in run_dir: reopened when run_dir
    has one, else created. None open (ParentRun() without a run) when the tracker nests no runs (its config has no
    parent_run_id: tracking=none) or MLflow is unavailable, which costs one warning."""
    if "parent_run_id" not in cfg.tracking:
        return ParentRun(kind=kind)
    try:
        client, run_id = _open(cfg, Path(run_dir), kind)
    except Exception as e:
        log.warning(
            f"MLflow at {cfg.tracking.uri} is unavailable ({first_line(e)}); "
            f"the {MEMBERS[kind]} are tracked without a parent run"
        )
        return ParentRun(kind=kind)
    return ParentRun(client, run_id, kind)


def _open(cfg: DictConfig, run_dir: Path, kind: str):
    from mlflow.tracking import MlflowClient

    fail_fast_http()
    uri = absolute_uri(cfg.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    marker = run_dir / RUN_MARKER
    if marker.exists():
        run_id = json.loads(marker.read_text()).get("run_id")
        try:
            client.update_run(run_id, status="RUNNING")
            return client, run_id
        except Exception:  # gone from this store: start a new parent
            pass
    experiment_id = experiment_id_for(client, uri, cfg.tracking.experiment, cfg.tracking.artifact_location)
    tags = {"run_dir": str(run_dir.resolve()), "host": platform.node(), "kind": kind}
    if kind == "pipeline":
        tags["pipeline"] = ",".join(cfg.pipeline.stages.keys())
    else:
        tags["sweep_dir"] = tags["sweep_id"] = str(run_dir.resolve())
    run = client.create_run(experiment_id, run_name=f"{kind}-{run_dir.name}", tags=tags)
    write_json(marker, {"tracking_uri": uri, "run_id": run.info.run_id})
    return client, run.info.run_id


def create_run_ahead(cfg: DictConfig, run_dir: Path, base: Path) -> tuple[str, str] | None:
    """An MLflow run for the job `cfg` is about to start in `run_dir` (from the working directory `base`, which
    relative store paths are taken from), marked SCHEDULED until the job's tracker fills it in and sets it RUNNING
    (pass its id as `tracking.run_id`). Returns the store's absolute URI and the run id; None when the job tracks
    nothing to MLflow or MLflow is unavailable: the job then opens its run itself, as from the command line."""
    if "run_id" not in cfg.tracking or not str(cfg.tracking.get("_target_", "")).endswith("MlflowTracker"):
        return None
    try:
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        uri = absolute_uri(cfg.tracking.uri, base)
        client = MlflowClient(tracking_uri=uri)
        experiment_id = experiment_id_for(
            client, uri, cfg.tracking.experiment, cfg.tracking.artifact_location, base=base
        )
        tags = {"run_dir": str(Path(run_dir).resolve()), "host": platform.node()}
        if cfg.tracking.get("parent_run_id"):
            tags["mlflow.parentRunId"] = cfg.tracking.parent_run_id
        run = client.create_run(experiment_id, run_name=Path(run_dir).name, tags=tags)  # the tracker renames it
        try:
            client.update_run(run.info.run_id, status="SCHEDULED")
        except Exception:  # not left RUNNING with no job behind it
            client.set_terminated(run.info.run_id, "FAILED")
            raise
        return uri, run.info.run_id
    except Exception as e:
        log.warning(f"MLflow at {cfg.tracking.uri} is unavailable ({first_line(e)}); the job opens its own run")
        return None


def end_run_ahead(uri: str, run_id: str, status: str) -> None:
    """Close a run created ahead whose job ended before its tracker took it (stopped or failed while starting)."""
    try:
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        client = MlflowClient(tracking_uri=uri)
        if client.get_run(run_id).info.status == "SCHEDULED":
            client.set_terminated(run_id, status)
    except Exception as e:
        log.warning(f"could not close MLflow run {run_id}: {first_line(e)}")


def end_killed_run(uri: str, run_id: str, status: str = "KILLED", settle_s: float = 5.0) -> None:
    """Close a run whose job was killed from outside (SIGKILL, the OOM killer) while it was RUNNING or SCHEDULED:
    its tracker could not. Looked at again after `settle_s`, since a tracker worker that outlived its trainer by a
    moment may have set it RUNNING after the first close."""
    try:
        from mlflow.tracking import MlflowClient

        fail_fast_http()
        client = MlflowClient(tracking_uri=uri)
        for wait in (0.0, settle_s):
            time.sleep(wait)
            if client.get_run(run_id).info.status in ("RUNNING", "SCHEDULED"):
                client.set_terminated(run_id, status)
    except Exception as e:
        log.warning(f"could not close MLflow run {run_id}: {first_line(e)}")
