"""Sweeps on the local SLURM cluster: a grid as a job array, a failing trial, a preempted job that resumes exactly."""

import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch
from mlflow.tracking import MlflowClient
from safetensors.torch import load_file

from ..conftest import ROOT, run_train

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch: run scripts/slurm-local.sh"),
]

TINY = [
    "model.n_layer=1",
    "model.d_model=32",
    "model.seq_len=32",
    "stage.log_every_n_steps=5",
    "stage.eval_every_n_steps=10",
    "sample.max_new_tokens=0",
    "hardware.num_threads=1",
    "hydra.launcher.timeout_min=30",
]  # >10 min, or submitit counts every signal as a time limit


def trials(sweep_dir):
    return json.loads((sweep_dir / "sweep.json").read_text())["trials"]


# three points: a trial that fails (NaN), one whose trainer is SIGKILLed once its MLflow run exists (node death; a
# rerun goes on) and one that finishes
POINTS = (
    "{_target_:tests.hooks.PoisonWeightsAt,step:3}",
    "{_target_:tests.hooks.SignalAt,step:3,signal_name:SIGKILL,wait_for:'${run_dir}/mlflow_run.json',"
    "once:'${run_dir}/killed'}",
    "{_target_:tests.hooks.PoisonWeightsAt,step:1000}",
)


def test_grid_on_slurm_supervises_every_trial_to_its_end_and_reruns_the_killed_one(tmp_path):
    """A trial whose trainer dies without a result (SIGKILL) is KILLED (sacct and its free run lock), its MLflow run
    closed; the other trials are still supervised to their end, the sweep's MLflow run (closed after them) has the
    best trial, child runs are named by their point, and rerun-failed continues the killed trial's own run."""
    store = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hardware=slurm_cpu",
        *TINY,
        "stage.num_steps=10",
        "nan.max_rollbacks=0",
        "+callbacks.p=" + ",".join(POINTS),
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]  # all trials ran, one FAILED, one KILLED
    said = f"2 of 3 trials did not finish (1 FAILED, 1 KILLED): python -m exp.sweep status {sweep}"
    assert proc.stderr.strip().splitlines()[-1] == said
    by_num = trials(sweep)
    assert by_num["0"]["status"] == "FAILED" and "TrainingFailed" in by_num["0"]["error"]
    assert by_num["1"]["status"] == "KILLED" and "without writing summary.json" in by_num["1"]["error"]
    assert "FAILED" in by_num["1"]["error"] and not (sweep / "1" / "summary.json").exists()  # sacct's word
    assert by_num["2"]["status"] == "FINISHED" and by_num["2"]["val_loss"] > 0
    assert all(t["slurm_job_id"] and "ended" in t for t in by_num.values())
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(by_num["0"]["mlflow_run_id"]).info.status == "FAILED"
    killed_run = by_num["1"]["mlflow_run_id"]
    assert client.get_run(killed_run).info.status == "KILLED"  # never left RUNNING
    finished = client.get_run(by_num["2"]["mlflow_run_id"])
    assert finished.info.status == "FINISHED"
    parent = client.get_run(json.loads((sweep / "sweep.json").read_text())["mlflow_parent_run_id"])
    assert finished.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert finished.data.tags["slurm_job_id"] == by_num["2"]["slurm_job_id"]
    assert finished.info.run_name == "#2 callbacks.p={_target_:tests.hooks.PoisonWeightsAt,step:1000}"
    # closed after the last trial ended, with the best one
    assert parent.info.status == "FINISHED" and parent.info.end_time >= 1000 * max(t["ended"] for t in by_num.values())
    assert parent.data.metrics["best_val_loss"] == pytest.approx(by_num["2"]["val_loss"])
    assert parent.data.tags["best_trial"] == "2" and parent.data.tags["best.callbacks.p"] == POINTS[2]
    assert (sweep / ".submitit").is_dir()  # submitit's logs stay inside the sweep

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "exp.sweep", "rerun-failed", str(sweep)]
    rerun = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # trial 0 FAILED again; the killed one goes on
    assert [line.split()[:3] for line in rerun.stdout.splitlines() if line.startswith("trial ")][:2] == [
        ["trial", "0", "(FAILED)"],
        ["trial", "1", "(KILLED)"],
    ]
    after = trials(sweep)
    assert [after[n]["status"] for n in "012"] == ["FAILED", "FINISHED", "FINISHED"]
    assert after["1"]["mlflow_run_id"] == killed_run  # its own child run, continued
    assert client.get_run(killed_run).info.status == "FINISHED"
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 3  # one per trial


def test_gpu_sweep_from_a_machine_without_a_gpu_is_submitted_and_fails_on_its_node(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hardware=slurm_gpu",  # device=cuda, bfloat16, compile: none of it exists here or on the node
        *TINY,
        "stage.num_steps=4",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.mem_gb=1",
        "stage.learning_rate=1e-3,2e-3",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    # submitted (not refused in this GPU-less process), with the GPU request
    scripts = list((sweep / ".submitit").rglob("*_submission.sh"))
    assert scripts and all("#SBATCH --gpus-per-node=1" in p.read_text() for p in scripts)
    # failed on the node, each trial with the one-line CUDA message, and the sweep says so
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"2 of 2 trials FAILED: python -m exp.sweep status {sweep}"
    client = MlflowClient(tracking_uri=store)
    for trial in trials(sweep).values():
        assert trial["status"] == "FAILED" and trial["slurm_job_id"]
        assert "hardware.device=cuda but no CUDA device is available on" in trial["error"]
        assert client.get_run(trial["mlflow_run_id"]).info.status == "FAILED"
    for log in (sweep / ".submitit").rglob("*_log.err"):  # each job's stderr: the one line, no traceback
        said = [line for line in log.read_text().splitlines() if "CUDA" in line or "Traceback" in line]
        assert len(said) == 1 and said[0].startswith("config error: hardware.device=cuda but no CUDA device")


def _squeue(job: str) -> tuple[str, str]:
    out = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T %r"], capture_output=True, text=True).stdout.split()
    return (out[0], out[1]) if len(out) >= 2 else ("", "")


def test_preempted_job_checkpoints_requeues_and_ends_with_the_uninterrupted_weights(tmp_path):
    steps = ["stage.num_steps=40", "checkpoint.every_n_steps=1000", "checkpoint.keep_best=false", "tracking=none"]
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "-m",
        "hardware=slurm_cpu",
        *TINY,
        *steps,
        "+callbacks.slow._target_=tests.hooks.SleepEachStep",
        "+callbacks.slow.seconds=0.25",
        f"hydra.sweep.dir={sweep}",
    ]
    launcher = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    run_dir = sweep / "0"
    deadline = time.time() + 240
    while time.time() < deadline:  # wait until the job is training
        rows = (run_dir / "metrics.jsonl").read_text().splitlines() if (run_dir / "metrics.jsonl").exists() else []
        if len(rows) >= 2:
            break
        assert launcher.poll() is None, launcher.stdout.read()[-3000:]
        time.sleep(0.2)
    job = next(p.name for p in (sweep / ".submitit").iterdir() if p.name[0].isdigit())
    subprocess.run(["scancel", "--signal=USR2", job], check=True)  # what SLURM sends before a preemption
    released = False
    while time.time() < deadline and launcher.poll() is None:
        state, reason = _squeue(job)
        if state == "PENDING" and "BeginTime" in reason and not released:
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            released = True
        time.sleep(0.5)
    out = launcher.communicate(timeout=300)[0]
    assert launcher.returncode == 0, out[-3000:]
    assert released, "the job was not requeued"
    saved = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*"))
    assert len(saved) == 2 and saved[-1] == "step_00000040"  # the one saved on USR2, and the final one
    log = (run_dir / "train.log").read_text()
    assert "preemption or time limit" in log and "resumed from" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["step"] == 40

    reference = tmp_path / "reference"
    proc = run_train(
        "hardware=cpu",
        *[o for o in TINY if not o.startswith("hydra.launcher")],
        *steps,
        f"hydra.run.dir={reference}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    ours = load_file(run_dir / "checkpoints" / "step_00000040" / "model.safetensors")
    theirs = load_file(reference / "checkpoints" / "step_00000040" / "model.safetensors")
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)


def test_an_invalid_partition_surfaces_sbatch_and_keeps_the_sweep_dir(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        "hardware=slurm_cpu",
        *TINY,
        "stage.num_steps=2",
        "tracking=none",
        "hydra.launcher.partition=no_such_partition",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert "error: SLURM refused the job array" in proc.stdout and "no_such_partition" in proc.stdout
    assert (sweep / "multirun.yaml").exists()
    assert all(t["status"] == "NOT_SUBMITTED" for t in trials(sweep).values())


def test_a_two_task_slurm_job_trains_ddp_into_one_mlflow_run(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        *TINY,
        "hardware=slurm_ddp",
        "hardware.device=cpu",
        "hardware.num_threads=1",
        "stage.num_steps=10",
        "stage.batch_size_per_gpu=4",
        "hydra.launcher.tasks_per_node=2",
        "hydra.launcher.mem_gb=2",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((sweep / "0" / "summary.json").read_text())
    assert summary["status"] == "FINISHED"
    assert summary["tokens_seen"] == 10 * 4 * 32 * 2  # two ranks of batch 4
    client = MlflowClient(tracking_uri=store)
    runs = client.search_runs(
        [client.get_run(summary["mlflow_run_id"]).info.experiment_id], "attributes.status = 'FINISHED'"
    )
    assert len([r for r in runs if r.data.tags.get("kind") != "sweep"]) == 1  # one run, not one per rank


def test_two_trial_grid_on_slurm_finishes_with_two_finished_runs(tmp_path):
    store = f"sqlite:///{tmp_path}/mlflow.db"
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-m",
        *TINY,
        "hardware=slurm_cpu",
        "hardware.num_threads=1",
        "stage.num_steps=10",
        "optimizer=adamw,sgd",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    client = MlflowClient(tracking_uri=store)
    for trial in trials(sweep).values():
        assert trial["status"] == "FINISHED", trial
        assert json.loads((sweep / str(trial["num"]) / "summary.json").read_text())["step"] == 10
        assert client.get_run(trial["mlflow_run_id"]).info.status == "FINISHED"
