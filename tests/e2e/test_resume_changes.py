"""Resuming with a changed config: learning rate, schedule and weight decay take effect; best checkpoint,
early-stopping patience and every documented callback hook survive; steady-state throughput."""

import json
import math

import pytest
from mlflow.tracking import MlflowClient

import exp.job
from exp.rundir import read_metrics

from ..conftest import TINY, compose_train

BASE = [
    *TINY,
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "sample.max_new_tokens=0",
]


def train(run_dir, *overrides):
    try:
        return exp.job.run_job(compose_train(*BASE, *overrides, run_dir=run_dir))
    except SystemExit as e:  # a stop by signal is part of some scenarios
        return e.code


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


def lrs(run_dir) -> dict[int, float]:
    return {m["step"]: m["train/lr"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/lr" in m}


def val_losses(run_dir) -> dict[int, float]:
    return {m["step"]: m["val/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in m}


def test_a_learning_rate_changed_on_resume_takes_effect_and_is_recorded(tmp_path, caplog):
    run_dir, store = tmp_path / "run", f"sqlite:///{tmp_path}/mlflow.db"
    constant = ["scheduler=constant", "stage.warmup_ratio=0", "tracking=mlflow", f"tracking.uri={store}"]
    train(run_dir, *constant, "stage.num_steps=4", "stage.learning_rate=1e-3")
    with caplog.at_level("INFO", logger="exp"):
        train(run_dir, *constant, "stage.num_steps=8", "stage.learning_rate=2e-3", "resume.allow_config_change=true")
    got = lrs(run_dir)
    assert [got[s] for s in range(1, 5)] == pytest.approx([1e-3] * 4)
    assert [got[s] for s in range(5, 9)] == pytest.approx([2e-3] * 4)  # was 1e-3: the checkpoint's lr won
    assert "lr 1.000e-03 -> 2.000e-03" in caplog.text
    changes = json.loads((run_dir / "config_changes.json").read_text())
    assert changes[0]["step"] == 4 and changes[0]["changes"]["stage.learning_rate"] == [1e-3, 2e-3]
    run = MlflowClient(tracking_uri=store).get_run(summary(run_dir)["mlflow_run_id"])
    assert "stage.learning_rate: 0.001 -> 0.002" in run.data.tags["config_changes.step_4"]
    assert run.data.params["stage.learning_rate"] == "0.001"  # params keep the first launch's value


def test_two_resumes_with_different_learning_rates_train_differently(tmp_path):
    base = ["scheduler=constant", "stage.warmup_ratio=0", "stage.num_steps=4"]
    train(tmp_path / "a", *base)
    finals = []
    for name, lr in (("b", 0.3), ("c", 5.0)):
        resumed = ["stage.num_steps=8", f"stage.learning_rate={lr}", "resume.allow_config_change=true"]
        train(tmp_path / name, *base[:2], *resumed, f"resume.path={tmp_path / 'a'}")
        finals.append(summary(tmp_path / name)["train_loss"])
    assert not math.isclose(finals[0], finals[1], rel_tol=1e-4)


@pytest.mark.parametrize("scheduler", ["cosine", "linear", "exponential"])
def test_training_longer_decays_from_the_current_lr_without_a_jump(tmp_path, scheduler):
    run_dir = tmp_path / "run"
    common = [f"scheduler={scheduler}", "stage.warmup_steps=2", "stage.lr_decay_ratio=0.1"]
    train(run_dir, *common, "stage.num_steps=8")
    first = lrs(run_dir)
    longer = ["stage.num_steps=16", "resume.allow_config_change=true"]
    train(run_dir, *common, *longer, f"resume.path={run_dir}/checkpoints/step_00000004")
    got = lrs(run_dir)
    assert got[5] == pytest.approx(first[5], rel=1e-12)  # the step after resuming runs where it would have
    assert all(got[s] > got[s + 1] for s in range(5, 16))  # then decays over the 12 steps left
    assert got[16] == pytest.approx(3e-3 * 0.1)  # to the end of the longer schedule
    # a finished run trained longer goes on at the lr it reached instead of jumping back up
    train(run_dir, *common, "stage.num_steps=20", "resume.allow_config_change=true")
    assert [lrs(run_dir)[s] for s in range(17, 21)] == pytest.approx([3e-4] * 4)


def test_wsd_trained_longer_extends_its_stable_phase(tmp_path):
    run_dir = tmp_path / "run"
    common = ["scheduler=wsd", "stage.warmup_steps=2", "stage.lr_decay_ratio=0.1", "scheduler.decay_fraction=0.25"]
    train(run_dir, *common, "stage.num_steps=8", "checkpoint.every_n_steps=4")
    first = lrs(run_dir)
    assert first[7] < 3e-3 and first[8] == pytest.approx(3e-4)  # decayed over its last 2 steps
    # from step 4 (stable phase) to 16 steps: stable until the new decay window (the last 4 steps)
    longer = ["stage.num_steps=16", "resume.allow_config_change=true"]
    train(run_dir, *common, *longer, f"resume.path={run_dir}/checkpoints/step_00000004")
    got = lrs(run_dir)
    assert [got[s] for s in range(3, 13)] == [3e-3] * 10
    assert got[12] > got[13] > got[14] > got[15] > got[16] == pytest.approx(3e-4)
    # from the end of a decayed run to 24 steps: it goes on at the lr it reached, never back up to the peak
    train(run_dir, *common, "stage.num_steps=24", "resume.allow_config_change=true")
    got = lrs(run_dir)
    assert [got[s] for s in range(17, 25)] == pytest.approx([3e-4] * 8)


def test_weight_decay_and_betas_changed_on_resume_take_effect(tmp_path):
    run_dir = tmp_path / "run"
    train(run_dir, "stage.num_steps=4")
    changed = ["stage.weight_decay=0.25", "optimizer.betas=[0.8,0.9]", "resume.allow_config_change=true"]
    train(run_dir, "stage.num_steps=8", *changed)
    groups = json.loads((run_dir / "checkpoints" / "step_00000008" / "optimizer.json").read_text())["param_groups"]
    by_name = {g["name"]: g for g in groups}
    assert by_name["decay"]["weight_decay"] == 0.25 and by_name["no_decay"]["weight_decay"] == 0.0
    assert all(g["betas"] == {"__tuple__": [0.8, 0.9]} for g in groups)  # optimizer.json encodes tuples


def test_the_best_checkpoint_survives_a_resume_and_rotation(tmp_path):
    run_dir = tmp_path / "run"
    keep = ["checkpoint.keep_last=1", "checkpoint.keep_best=true"]
    train(run_dir, *keep, "stage.num_steps=8")
    best_before = summary(run_dir)
    # resumed with noisy weights: every later evaluation is worse than the best so far
    noise = ["+callbacks.noise._target_=tests.hooks.NoiseWeightsAt", "+callbacks.noise.step=9"]
    train(run_dir, *keep, "stage.num_steps=16", *noise, "resume.allow_config_change=true")
    out, vals = summary(run_dir), val_losses(run_dir)
    assert min(vals[12], vals[16]) > best_before["best_val_loss"]  # the scenario: no new best after resuming
    assert out["best_val_loss"] == pytest.approx(min(vals.values()))
    best_step = min(vals, key=vals.get)
    assert out["best_checkpoint"].endswith(f"step_{best_step:08d}")  # not the first evaluation after resuming
    assert (run_dir / "checkpoints" / f"step_{best_step:08d}").is_dir()  # rotation spared it
    # and again: a second resume still knows it
    train(run_dir, *keep, "stage.num_steps=20", *noise, "resume.allow_config_change=true")
    assert summary(run_dir)["best_checkpoint"].endswith(f"step_{best_step:08d}")


def test_early_stopping_patience_survives_a_resume_and_the_summary_says_why(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    stop = ["early_stopping.patience=2", "early_stopping.min_delta=100", "stage.num_steps=24"]
    tracked = ["tracking=mlflow", f"tracking.uri={store}"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    train(straight, *stop)
    assert summary(straight)["step"] == 12  # best at 4 (from inf), no improvement of 100 at 8 and 12
    sigterm = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=8"]
    assert train(resumed, *stop, *sigterm) == 143
    train(resumed, *stop, *tracked)  # one evaluation without improvement is already counted
    out = summary(resumed)
    assert out["step"] == 12 and out["status"] == "FINISHED"
    assert out["stop_reason"].startswith("early stopping at step 12") and "patience=2" in out["stop_reason"]
    tags = MlflowClient(tracking_uri=store).get_run(out["mlflow_run_id"]).data.tags
    assert tags["stop_reason"] == out["stop_reason"] and tags["stopped_at_step"] == "12"


def test_a_user_callback_receives_every_documented_hook(tmp_path):
    run_dir, record = tmp_path / "run", tmp_path / "hooks.jsonl"
    train(
        run_dir,
        "stage.num_steps=8",
        "nan.max_rollbacks=1",
        "+callbacks.rec._target_=tests.hooks.RecordHooks",
        f"+callbacks.rec.path={record}",
        "+callbacks.poison._target_=tests.hooks.PoisonWeightsAt",
        "+callbacks.poison.step=5",
    )
    events = [json.loads(line) for line in record.read_text().splitlines()]
    hooks = {e["hook"] for e in events}
    assert hooks == {
        "on_build",
        "on_train_start",
        "on_step_end",
        "on_log",
        "on_eval_end",
        "on_checkpoint",
        "on_fault",
        "on_train_end",
    }
    saved = [e["path"] for e in events if e["hook"] == "on_checkpoint"]
    assert saved and saved[0].endswith("step_00000004")
    faults = [e["metrics"] for e in events if e["hook"] == "on_fault"]
    assert any("faults/skipped_steps" in m for m in faults) and any("faults/rollbacks" in m for m in faults)


def test_a_rollback_to_the_checkpoint_resumed_from_keeps_the_changed_learning_rate(tmp_path):
    run_dir = tmp_path / "run"
    constant = ["scheduler=constant", "stage.warmup_ratio=0", "checkpoint.every_n_steps=4"]
    train(run_dir, *constant, "stage.num_steps=4", "stage.learning_rate=1e-3")
    poison = ["+callbacks.p._target_=tests.hooks.PoisonWeightsAt", "+callbacks.p.step=5", "nan.max_consecutive=0"]
    longer = ["stage.num_steps=8", "stage.learning_rate=2e-3", "resume.allow_config_change=true"]
    train(run_dir, *constant, *longer, *poison, "checkpoint.every_n_steps=100")
    assert json.loads((run_dir / "summary.json").read_text())["num_rollbacks"] == 1
    # rolled back to step 4, written at lr 1e-3: the resumed config's 2e-3 still holds, halved by the rollback
    assert lrs(run_dir)[8] == pytest.approx(2e-3 * 0.5)
