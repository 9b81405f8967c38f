"""The pretrain -> distill -> SFT pipeline end to end: nested MLflow runs, SFT gain, resuming after a kill."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from ..conftest import ROOT, run_train

TINY_PIPELINE = [
    "pipeline=pretrain_distill_sft",
    "model.seq_len=64",
    "stage.num_steps=30",
    "stage.batch_size_per_gpu=8",
    "stage.log_every_n_steps=10",
    "stage.eval_every_n_steps=15",
    "checkpoint.every_n_steps=10",
    "sample.max_new_tokens=8",
    "hardware=cpu",
]


def children(store, parent_id):
    client = MlflowClient(tracking_uri=store)
    parent = client.get_run(parent_id)
    runs = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    return parent, {r.data.tags["run_name"]: r for r in runs}


@pytest.mark.slow
def test_pipeline_runs_three_nested_stages_and_sft_improves_completion_loss(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "pipe"
    proc = run_train(*TINY_PIPELINE, f"tracking.uri={store}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and list(summary["stages"]) == ["teacher", "student", "sft"]
    assert summary["final_stage_val_loss_after"] < summary["final_stage_val_loss_before"]
    parent_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    parent, kids = children(store, parent_id)
    assert parent.info.status == "FINISHED"
    assert sorted(kids) == ["sft", "student", "teacher"]
    assert all(r.info.status == "FINISHED" for r in kids.values())
    assert kids["student"].data.params["stage.name"] == "midtrain"
    assert kids["student"].data.params["stage.teacher.path"] == str(run_dir / "teacher")
    assert kids["sft"].data.params["stage.init_from"] == str(run_dir / "student")
    assert "val/loss" in kids["sft"].data.metrics
    # the pipeline's summary.json names its parent run as a single run's names its run
    assert summary["mlflow_run_id"] == parent.info.run_id == parent_id
    assert summary["mlflow_tracking_uri"] == store
    found = MlflowClient(tracking_uri=summary["mlflow_tracking_uri"]).get_run(summary["mlflow_run_id"])
    assert found.data.tags["run_dir"] == str(run_dir.resolve())
    assert {n: s["mlflow_run_id"] for n, s in summary["stages"].items()} == {n: r.info.run_id for n, r in kids.items()}


def test_bad_data_in_the_last_stage_exits_2_before_any_stage_trains(tmp_path):
    # prompts longer than model.seq_len=64: every SFT example would be dropped, which once failed the third stage
    # after the first two had trained; validation now reads each stage's data before the first one starts
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps({"prompt": c * 100, "response": "r"}) + "\n" for c in "pq"))
    run_dir = tmp_path / "pipe"
    sft_data = "pipeline.stages.sft.extra=['data=sft_jsonl','data.path=chat.jsonl','data.val_path=chat.jsonl']"
    proc = run_train(*TINY_PIPELINE, "tracking=none", sft_data, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-3000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(
        "config error: data.path=chat.jsonl: all 2 train examples were dropped at data.seq_len=64"
    )
    assert lines[0].endswith("(pipeline stage sft)")
    assert not run_dir.exists()  # no stage ran, and the pipeline's own directory is gone too


@pytest.mark.slow
def test_killed_pipeline_resumes_the_unfinished_stage_and_skips_finished_ones(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    run_dir = tmp_path / "pipe"
    args = [
        *TINY_PIPELINE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.slow._target_=tests.hooks.SleepEachStep",
        "+callbacks.slow.seconds=0.05",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 180
    while not list((run_dir / "student" / "checkpoints").glob("step_*")) and time.time() < deadline:
        assert proc.poll() is None
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    teacher_summary = (run_dir / "teacher" / "summary.json").stat().st_mtime_ns
    assert not (run_dir / "student" / "summary.json").exists()

    again = run_train(*args, cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-3000:]
    out = again.stdout + again.stderr
    assert "stage teacher finished before" in out and "resumed from" in out
    assert (run_dir / "teacher" / "summary.json").stat().st_mtime_ns == teacher_summary  # not redone
    student = json.loads((run_dir / "student" / "summary.json").read_text())
    assert student["status"] == "FINISHED" and student["step"] == 30
    parent, kids = children(store, json.loads((run_dir / "mlflow_run.json").read_text())["run_id"])
    assert parent.info.status == "FINISHED" and sorted(kids) == ["sft", "student", "teacher"]
    assert all(r.info.status == "FINISHED" for r in kids.values())
