"""Tracking, in one place: the trainer's side (tracker: MlflowTracker, NullTracker, the params and tags of a run),
the process that talks to MLflow (worker: started early by `prestart`, fed typed messages over a queue), and the
runs that pipelines and sweeps nest theirs under (parent)."""

from exp.tracking.parent import ParentRun, open_parent_run
from exp.tracking.tracker import (
    MlflowTracker,
    NullTracker,
    PendingTracker,
    flat_params,
    git_state,
    resumed_run_id,
    run_tags,
)
from exp.tracking.worker import prestart

__all__ = [
    "MlflowTracker",
    "NullTracker",
    "ParentRun",
    "PendingTracker",
    "flat_params",
    "git_state",
    "open_parent_run",
    "prestart",
    "resumed_run_id",
    "run_tags",
]
