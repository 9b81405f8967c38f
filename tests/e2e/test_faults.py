"""Faults: NaN skip and rollback, spikes, early stopping, kills mid-checkpoint, corrupt checkpoints, bad resumes."""

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest

import exp.job
from exp.checkpoint import verify_checkpoint
from exp.config import NanConfig
from exp.faults import FaultGuard, HoldUntilCheckpoint
from exp.loop import Callback, TrainingFailed, TrainState
from exp.rundir import read_metrics

from ..conftest import ROOT, TINY, compose_train, run_train

BASE = [
    *TINY,
    "stage.num_steps=12",
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "checkpoint.keep_last=0",
]


def train(run_dir, *overrides):
    return exp.job.run_job(compose_train(*BASE, *overrides, run_dir=run_dir))


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def test_nan_steps_are_skipped_then_rolled_back_and_the_run_finishes(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "+callbacks.poison._target_=tests.hooks.PoisonWeightsAt", "+callbacks.poison.step=6")
    out = summary(run_dir)
    assert out["status"] == "FINISHED" and out["step"] == 12
    assert out["num_rollbacks"] == 1 and out["num_skipped_steps"] == 4  # max_consecutive=3, the 4th rolls back
    assert math.isfinite(out["val_loss"])
    rows = read_metrics(run_dir / "metrics.jsonl")
    assert any(r.get("faults/rollbacks") == 1 and r["step"] == 4 for r in rows)  # back to the step-4 checkpoint
    assert_one_value_per_step(rows)  # steps 5 and 6 ran twice: only the replayed values are kept
    assert [r["step"] for r in rows if "train/loss" in r] == list(range(1, 13))
    lrs = {r["step"]: r["train/lr"] for r in rows if "train/lr" in r}
    fresh = compose_train(*BASE, run_dir=tmp_path / "unused")
    assert lrs[12] == pytest.approx(0.5 * fresh.stage.learning_rate * fresh.stage.lr_decay_ratio)  # lr_factor 0.5


def assert_one_value_per_step(rows: list[dict]) -> None:
    seen = [(r["step"], k) for r in rows for k in r if k != "step"]
    assert len(seen) == len(set(seen)), sorted(k for k in seen if seen.count(k) > 1)


@pytest.mark.slow
def test_mlflow_holds_one_value_per_step_through_a_rollback_and_a_branch(tmp_path):
    from mlflow.tracking import MlflowClient

    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    tracked = [o for o in BASE if not o.startswith("tracking")]
    tracked += [f"tracking.uri={store}", f"tracking.artifact_location={tmp_path / 'artifacts'}"]

    def tracked_run(*overrides):
        try:
            exp.job.run_job(compose_train(*tracked, *overrides, run_dir=run_dir))
        except SystemExit:  # stopped by the signal: part of the scenario
            pass

    def history(run_id, rows):
        """Every metric of the MLflow run, one value per step, and the same values as metrics.jsonl."""
        client = MlflowClient(store)
        for key in client.get_run(run_id).data.metrics:
            points = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
            assert len({s for s, _ in points}) == len(points), f"{key}: {sorted(points)}"
            if key.startswith("system/"):  # MLflow's system metrics: sampled by the tracking process, not in the file
                continue
            assert sorted(points) == sorted((r["step"], pytest.approx(r[key])) for r in rows if key in r), key
        return client.get_run(run_id).data.tags

    tracked_run("+callbacks.poison._target_=tests.hooks.PoisonWeightsAt", "+callbacks.poison.step=6")
    first = summary(run_dir)
    assert first["num_rollbacks"] == 1
    history(first["mlflow_run_id"], read_metrics(run_dir / "metrics.jsonl"))
    before = read_metrics(run_dir / "metrics.jsonl")

    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6"]
    tracked_run(f"resume={run_dir / 'checkpoints' / 'step_00000004'}", *stop)
    tracked_run("resume=auto")
    out, rows = summary(run_dir), read_metrics(run_dir / "metrics.jsonl")
    assert out["status"] == "FINISHED" and out["mlflow_run_id"] != first["mlflow_run_id"]
    assert_one_value_per_step(rows)
    tags = history(out["mlflow_run_id"], rows)  # the branch's own run: steps 1-4 carried over, then its own
    assert tags["branch.from_step"] == "4" and tags["branch.abandoned_run"] == first["mlflow_run_id"]
    left = history(first["mlflow_run_id"], before)  # the run left behind keeps its values and says so
    assert left["branch.abandoned_after_step"] == "4"
    assert left["branch.abandoned"] == "checkpoints/abandoned/001_after_step_00000004"


class Recorder(Callback):
    """A recorder like the MLflow tracker: hooks, and log_metrics for records passed on later with their own time."""

    def __init__(self):
        self.seen = []

    def on_log(self, state, metrics):
        self.seen.append((state.step, metrics, None))

    def log_metrics(self, step, metrics, stamp):
        self.seen.append((step, metrics, stamp))


def test_records_wait_for_a_checkpoint_and_a_rollback_drops_them_keeping_their_own_time(monkeypatch):
    recorder, clock = Recorder(), iter([100.0, 101.0, 102.0])
    monkeypatch.setattr(time, "time", lambda: next(clock))
    held = HoldUntilCheckpoint(recorder)
    held.on_log(TrainState(step=1), {"x": 1.0})  # no checkpoint yet, so nothing to roll back to: passed on
    assert recorder.seen == [(1, {"x": 1.0}, None)]
    held.on_checkpoint(TrainState(step=1), "step_00000001")
    held.on_log(TrainState(step=2), {"x": 2.0})  # at 100
    held.on_rollback(TrainState(step=1), {"faults/rollbacks": 1})  # at 101
    held.on_log(TrainState(step=2), {"x": 2.5})  # at 102
    assert len(recorder.seen) == 1
    held.on_train_end(TrainState(step=2), "FINISHED")
    assert recorder.seen[1:] == [(1, {"faults/rollbacks": 1}, 101.0), (2, {"x": 2.5}, 102.0)]


def test_nan_with_no_checkpoint_to_roll_back_to_fails_clearly(tmp_path, capsys):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as info:
        train(run_dir, "+callbacks.poison._target_=tests.hooks.PoisonWeightsAt", "+callbacks.poison.step=1")
    assert info.value.code == 1
    assert "no checkpoint to roll back to" in capsys.readouterr().err
    failed = summary(run_dir)
    assert failed["status"] == "FAILED" and "no checkpoint to roll back to" in failed["error"]


def test_rollback_budget_exhausted_fails(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train(
            tmp_path / "run",
            "nan.max_rollbacks=0",
            "+callbacks.poison._target_=tests.hooks.PoisonWeightsAt",
            "+callbacks.poison.step=5",
        )
    assert "nan.max_rollbacks=0" in capsys.readouterr().err


def test_a_loss_spike_is_skipped_like_a_nan():
    rollbacks = []
    guard = FaultGuard(
        NanConfig(spike_threshold=4.0, spike_window=10, max_consecutive=1),
        rollback=lambda state, f: rollbacks.append(f) or True,
    )
    state = TrainState()
    losses = [2.0 + 0.01 * (i % 3) for i in range(10)]
    assert not any(guard.should_skip(state, x, 1.0, True) for x in losses)
    assert guard.should_skip(state, 9.0, 1.0, True)  # far above mean + 4 std
    assert guard.should_skip(state, 9.0, 1.0, True) and rollbacks == [0.5]
    assert not guard.should_skip(state, 2.0, 1.0, True)
    no_budget = FaultGuard(NanConfig(max_consecutive=0, max_rollbacks=0), rollback=lambda s, f: True)
    with pytest.raises(TrainingFailed, match="max_rollbacks=0"):
        no_budget.should_skip(state, float("nan"), 1.0, False)


def test_early_stopping_stops_and_keeps_the_best_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "early_stopping.patience=1", "early_stopping.min_delta=100", "checkpoint.every_n_steps=0")
    out = summary(run_dir)
    assert out["status"] == "FINISHED" and out["step"] == 8  # improved at 4 (from inf), not enough at 8
    vals = {r["step"]: r["val/loss"] for r in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in r}
    assert out["best_checkpoint"].endswith(f"step_{min(vals, key=vals.get):08d}")
    verify_checkpoint(out["best_checkpoint"])


def test_sigkill_during_a_checkpoint_write_leaves_the_previous_one_and_resume_continues(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        *BASE,
        f"hydra.run.dir={run_dir}",
        "+callbacks.stall._target_=tests.hooks.StallCheckpointAt",
        "+callbacks.stall.step=8",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 120
    while not list(ckpts.glob(".step_00000008.tmp-*")) and time.time() < deadline:
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        time.sleep(0.1)
    time.sleep(0.5)  # the files are written; the rename has not happened
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert [p.name for p in ckpts.glob("step_*")] == ["step_00000004"]
    verify_checkpoint(ckpts / "step_00000004")
    resumed = run_train(*BASE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "step_00000004 at step 4" in resumed.stdout + resumed.stderr
    assert summary(run_dir)["step"] == 12
    assert not list(ckpts.glob(".step_*"))  # the stale temporary folder was cleared by the next save of step 8


def _flip_byte(path, offset_from_end=8):
    data = bytearray(path.read_bytes())
    data[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(data))


def test_corrupt_newest_checkpoint_falls_back_and_an_explicit_one_is_refused(tmp_path, caplog, capsys):
    caplog.set_level("INFO", logger="exp")
    run_dir = tmp_path / "run"
    train(run_dir, "stage.num_steps=8")
    newest = run_dir / "checkpoints" / "step_00000008"
    _flip_byte(newest / "model.safetensors")
    with pytest.raises(SystemExit) as info:
        train(tmp_path / "other", f"resume={newest}", "stage.num_steps=8")
    assert info.value.code == 2
    assert "model.safetensors" in capsys.readouterr().err
    train(run_dir, "stage.num_steps=8", "resume=auto")
    assert "step_00000008" in caplog.text and "falling back" in caplog.text
    assert any("resumed from" in r.message and "step_00000004" in r.message for r in caplog.records)
    verify_checkpoint(newest)  # saved again, whole, by the resumed run


def test_resume_with_a_changed_config_is_refused_unless_allowed(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_dir, "stage.num_steps=4")
    with pytest.raises(SystemExit) as info:
        train(run_dir, "stage.num_steps=8", "optimizer.lr=0.1")
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "optimizer.lr" in err and "stage.num_steps" in err and "allow_config_change" in err
    train(run_dir, "stage.num_steps=8", "resume.allow_config_change=true")
    assert summary(run_dir)["step"] == 8


def test_resume_into_a_different_model_shape_names_the_tensor(tmp_path, capsys):
    run_dir = tmp_path / "run"
    train(run_dir, "stage.num_steps=4")
    with pytest.raises(SystemExit) as info:
        train(run_dir, "stage.num_steps=4", "model.d_model=32", "resume.allow_config_change=true")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "model.safetensors: tensor " in err and "shape" in err, err


def test_second_process_on_the_same_run_dir_refuses(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen(
        [
            sys.executable,
            str(ROOT / "train.py"),
            *BASE,
            f"hydra.run.dir={run_dir}",
            "+callbacks.stall._target_=tests.hooks.StallCheckpointAt",
            "+callbacks.stall.step=4",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 120
        while not list((run_dir / "checkpoints").glob(".step_*")) and time.time() < deadline:
            time.sleep(0.1)
        second = run_train(*BASE, f"hydra.run.dir={run_dir}", cwd=tmp_path)
        assert second.returncode == 1
        assert f"pid={holder.pid}" in second.stderr and "in use" in second.stderr
    finally:
        holder.kill()
        holder.wait()


@pytest.mark.parametrize(
    "override,needle",
    [
        ("resume=/no/such/checkpoint", "resume.path=/no/such/checkpoint"),
        ("checkpoint.dir=/etc/hostname/ckpt", "checkpoint.dir"),
    ],
)
def test_bad_resume_and_checkpoint_paths_are_config_errors(tmp_path, capsys, override, needle):
    with pytest.raises(SystemExit) as info:
        train(tmp_path / "run", override)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err
