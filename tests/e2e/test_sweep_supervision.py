"""The records of a sweep's trials, apart from the sweeps that test them end to end (tests/test_slurm_sweeps.py,
tests/test_optuna_sweeper.py, tests/test_report.py): the run a worker did not close, a worker Ctrl-C must not end,
the failure line, the names."""

import json
import os
import signal
import time

import pytest

from exp.events import TrainState
from exp.sweep.launch import failed_trials_message
from exp.sweep.supervise import point_name, swept_points

from ..conftest import TINY, compose_train


@pytest.mark.slow  # an MLflow worker's start-up and a new SQLite store: ~5-10 s
def test_a_run_whose_worker_does_not_answer_at_the_end_is_closed_from_the_trainer(tmp_path, monkeypatch):
    """A pruned trial whose MLflow worker is stuck (here: stopped) is not left RUNNING: after the wait the worker
    is killed and the trainer closes the run, KILLED with the tag status=PRUNED."""
    from mlflow.tracking import MlflowClient

    from exp.tracking import tracker as tracking

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    tracker = tracking.MlflowTracker(uri, cfg=compose_train(*TINY, run_dir=run_dir), run_dir=run_dir)
    run_id = tracker.run_id  # the worker has created the run and logged its params
    os.kill(tracker._proc.pid, signal.SIGSTOP)
    monkeypatch.setattr(tracking, "CLOSE_TIMEOUT_S", 1.0)
    tracker.on_train_end(TrainState(step=2), "PRUNED")
    run = MlflowClient(tracking_uri=uri).get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["status"] == "PRUNED"
    assert not tracker._proc.is_alive()


def test_the_mlflow_worker_is_born_ignoring_ctrl_c():
    """Ctrl-C reaches the whole process group, the trainer's MLflow worker too, maybe while its interpreter is
    still starting: that must not end it (the trainer decides when its run ends)."""
    from exp.tracking.worker import Handle

    handle = Handle()
    try:
        for _ in range(3):  # during the interpreter's start-up and its imports
            os.kill(handle.process.pid, signal.SIGINT)
            time.sleep(0.3)
        assert handle.process.is_alive(), handle.process.exitcode
    finally:
        handle.process.kill()
        handle.process.join()


@pytest.mark.parametrize(
    "statuses,line",
    [
        (["FINISHED", "FAILED"], "1 of 2 trials FAILED"),
        (["FINISHED", "KILLED", "KILLED"], "2 of 3 trials KILLED"),
        (["FAILED", "KILLED", "PRUNED"], "2 of 3 trials did not finish (1 FAILED, 1 KILLED)"),
        (["FINISHED", "PRUNED"], None),
    ],
)
def test_the_sweeps_last_line_counts_failed_and_killed_trials(tmp_path, statuses, line):
    trials = {str(i): {"num": i, "status": s} for i, s in enumerate(statuses)}
    (tmp_path / "sweep.json").write_text(json.dumps({"trials": trials}))
    said = failed_trials_message(tmp_path)
    assert said == (f"{line}: python -m exp.sweep status {tmp_path}" if line else None)


def test_a_trials_run_is_named_by_the_values_that_differ_between_the_points():
    points = swept_points([["model.n_layer=1", "optimizer=adamw", "+p.x=1"], ["model.n_layer=1", "optimizer=sgd"]])
    assert points == [{"optimizer": "adamw", "p.x": "1"}, {"optimizer": "sgd"}]
    assert point_name(3, {"stage.learning_rate": 0.0022881136684755237, "optimizer": "sgd"}) == (
        "#3 stage.learning_rate=0.002288 optimizer=sgd"
    )
    assert point_name(0, {"x": "it's ${a}\\b"}) == "#0 x=its {a}b"  # nothing a quoted override would misread
    assert swept_points([["a=1"]]) == [{}]  # one point: no name of its own
