"""The job service with the SLURM launcher on the local cluster (scripts/slurm-local.sh): a DDP job of two SLURM
tasks submitted through submitit shows its SLURM id and state, saves a checkpoint on request (scancel
--signal=USR1, every rank agreeing on the step) and stops gracefully (scancel --signal=TERM) with a checkpoint,
KILLED."""

import os
import shutil
import subprocess
import time

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from ..conftest import ROOT  # noqa: E402
from .test_serve_e2e import JOB, Service  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch: run scripts/slurm-local.sh"),
]


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if os.geteuid() == 0:  # idempotent, ~0.1 s when it is up
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "slurm-local.sh")], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    elif subprocess.run(["sinfo", "-h"], capture_output=True, timeout=20).returncode != 0:
        pytest.skip("local Slurm cluster is down: run scripts/slurm-local.sh as root")


def test_slurm_job_checkpointed_and_stopped(tmp_path, corpus_cache):
    service = Service(tmp_path / "runs").start()
    job_id = slurm_id = None
    try:
        # tracked to the embedded store beside the runs: save-now's SIGUSR1 reaches every process of the job, the
        # MLflow worker included, which must survive it
        overrides = [o.replace("hardware=cpu", "hardware=slurm_ddp") for o in JOB if o != "tracking=none"]
        overrides += ["stage.num_steps=100000"]
        resources = {"timeout_min": 30, "mem_gb": 2, "tasks_per_node": 2}
        r = service.client.post(
            "/api/training/jobs/start", json={"overrides": overrides, "launcher": "slurm", "slurm": resources}
        )
        assert r.status_code == 201, r.text
        job_id, mlflow_run_id = r.json()["job_id"], r.json()["mlflow_run_id"]
        status = service.wait(job_id, lambda s: s["status"] == "RUNNING" and s["step"] >= 10, timeout=180)
        assert status["launcher"] == "slurm" and status["slurm"]["state"] == "RUNNING"
        assert "| 2 ranks (ddp)" in service.logs(job_id), service.logs(job_id)
        slurm_id = status["slurm"]["job_id"]
        assert service.client.post(f"/api/training/jobs/{job_id}/checkpoint").status_code == 202
        ckpts = f"/api/training/jobs/{job_id}/checkpoints"
        deadline = time.monotonic() + 60
        while not service.client.get(ckpts).json() and time.monotonic() < deadline:
            time.sleep(0.3)
        saved = service.client.get(ckpts).json()
        assert len(saved) == 1 and service.status(job_id)["status"] == "RUNNING", service.logs(job_id)
        assert service.client.post(f"/api/training/jobs/{job_id}/stop").status_code == 202
        status = service.wait(job_id, lambda s: s["status"] != "RUNNING", timeout=120)
        assert status["status"] == "KILLED" and "SIGTERM" in status["stop_reason"]
        assert [c["step"] for c in service.client.get(ckpts).json()] == [saved[0]["step"], status["step"]]
        service.wait(job_id, lambda s: "killed: step" in service.logs(job_id), timeout=30)  # logged after the summary
        # resumed on SLURM with the resources it was started with (30 min, 2 tasks), a longer run allowed
        target = status["step"] + 6
        body = {"overrides": [f"stage.num_steps={target}"], "allow_config_change": True}
        assert service.client.post(f"/api/training/jobs/{job_id}/resume", json=body).status_code == 201
        resumed = service.wait(job_id, lambda s: s["slurm"]["job_id"] != slurm_id, timeout=30)
        slurm_id = resumed["slurm"]["job_id"]
        done = service.wait(job_id, lambda s: s["status"] in ("FINISHED", "FAILED", "KILLED"), timeout=180)
        assert done["status"] == "FINISHED" and done["step"] == target, service.logs(job_id)
        assert "| 2 ranks (ddp)" in service.logs(job_id)
        sacct = ["sacct", "-n", "-X", "-P", "-j", slurm_id, "-o", "Timelimit,AllocCPUS"]
        assert subprocess.run(sacct, capture_output=True, text=True).stdout.split() == ["00:30:00|2"]
        from mlflow.tracking import MlflowClient

        store = MlflowClient(f"sqlite:///{service.runs_dir / 'mlflow.db'}")
        deadline = time.monotonic() + 60  # the run's summary.json comes first, then its tracker closes the run
        while store.get_run(mlflow_run_id).info.status != "FINISHED" and time.monotonic() < deadline:
            time.sleep(0.3)
        assert done["mlflow_run_id"] == mlflow_run_id and store.get_run(mlflow_run_id).info.status == "FINISHED"
        assert store.get_metric_history(mlflow_run_id, "train/loss")[-1].step == target
        job_id = None
    finally:
        if job_id is not None and slurm_id is not None:  # failed half-way: nothing of ours stays queued
            subprocess.run(["scancel", slurm_id], check=False)
        service.kill()
