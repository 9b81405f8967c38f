"""The trial's side of an Optuna sweep: its study's storage, the pruners, and the loop callback that reports each
evaluation to the study and stops a trial the pruner prunes.

The sweeper (exp.sweep.optuna) attaches the callback to every trial as `callbacks.optuna` with the study's storage,
name and the trial's number: an ordinary, validated config key, so a trial's saved config says which study it
belongs to and the trial needs nothing from its environment (a SLURM job on another node included).
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path

from exp.events import Callback, TrainState
from exp.text import first_line

log = logging.getLogger("exp")

JOURNAL = "journal:"  # a storage spec naming an Optuna journal file: journal:/abs/path/optuna.journal
# pruner name -> Optuna class name; `none` prunes nothing
PRUNERS = {
    "median": "MedianPruner",
    "successive_halving": "SuccessiveHalvingPruner",
    "hyperband": "HyperbandPruner",
    "none": "NopPruner",
}


def storage_spec(storage: str | None, sweep_dir: Path) -> str:
    """The study's storage as one string every trial can open: `null`/`sqlite` a SQLite file in the sweep dir,
    `journal` an Optuna journal file there (several nodes over a shared filesystem), else an RDB URL as given."""
    sweep_dir = Path(sweep_dir).resolve()
    if storage in (None, "sqlite"):
        return f"sqlite:///{sweep_dir / 'optuna.db'}"
    if storage == "journal":
        return f"{JOURNAL}{sweep_dir / 'optuna.journal'}"
    return str(storage)


def open_storage(spec: str):
    """An Optuna storage from storage_spec's string."""
    import optuna

    if spec.startswith(JOURNAL):
        from optuna.storages.journal import JournalFileBackend

        return optuna.storages.JournalStorage(JournalFileBackend(spec[len(JOURNAL) :]))
    # a trial reporting while the sweeper polls: SQLite waits for the lock instead of failing at once
    engine = {"connect_args": {"timeout": 60}} if spec.startswith("sqlite:") else None
    return optuna.storages.RDBStorage(spec, engine_kwargs=engine)


def make_pruner(name: str, args: dict | None = None):
    """The Optuna pruner called `name` (PRUNERS) with its keyword arguments; ValueError naming what is wrong."""
    import optuna

    if name not in PRUNERS:
        raise ValueError(f"unknown pruner '{name}' (one of: {', '.join(PRUNERS)})")
    if name == "none":  # its arguments are the other pruners': switching a sweep's pruner off keeps them
        return optuna.pruners.NopPruner()
    try:
        return getattr(optuna.pruners, PRUNERS[name])(**(args or {}))
    except TypeError as e:
        raise ValueError(f"{first_line(e)} (set hydra.sweeper.pruner_args to its arguments)") from None


class OptunaPruning(Callback):
    """Reports each evaluation's val loss to this trial of the study; when the study's pruner prunes the trial, the
    run stops after the step, saves its checkpoint and ends PRUNED. Only the main process reports."""

    stop_status = "PRUNED"

    def __init__(self, storage: str, study_name: str, trial_number: int, metric: str = "val/loss"):
        self.storage, self.study_name, self.trial_number = storage, study_name, int(trial_number)
        self.metric = metric  # the study's objective: val/loss, or any metric an evaluation logs (eval/<task>/...)
        self.trial = None
        self.pruner_name = "none"

    def on_train_start(self, state: TrainState) -> None:
        if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":  # one rank reports for the trial
            return
        import optuna

        storage = open_storage(self.storage)
        study = optuna.load_study(study_name=self.study_name, storage=storage)
        attrs = study.user_attrs
        self.pruner_name = attrs.get("pruner", "none")
        study.pruner = make_pruner(self.pruner_name, attrs.get("pruner_args"))
        study_id = storage.get_study_id_from_name(self.study_name)
        trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, self.trial_number)
        if len(study.directions) > 1:  # Optuna prunes single-objective studies only: nothing to report
            return
        if storage.get_trial(trial_id).state.is_finished():  # a repeat of a finished trial reports nothing
            log.info(
                f"trial {self.trial_number} of study {self.study_name} has ended; its evaluations are not reported"
            )
            return
        self.trial = optuna.trial.Trial(study, trial_id)

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._report(state, metrics)

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._report(state, metrics)

    def _report(self, state: TrainState, metrics: dict[str, float]) -> None:
        value = metrics.get(self.metric)
        if self.trial is None or value is None or not math.isfinite(value):
            return
        self.trial.report(float(value), state.step)
        if self.trial.should_prune():
            what = "val loss" if self.metric == "val/loss" else self.metric
            self.stop_reason = (
                f"pruned at step {state.step} by the {self.pruner_name} pruner of study {self.study_name} "
                f"({what} {value:.4f})"
            )
            log.info(self.stop_reason)
            self.should_stop = True
