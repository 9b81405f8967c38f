"""The job service end to end: `python -m exp.serve` on a free 127.0.0.1 port, real train.py jobs, curl's view of
it (httpx): start, watch (status, event stream), save now, stop, resume with more steps, and a service killed
mid-run that finds its job FINISHED when it comes back."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from ..conftest import ROOT, TINY  # noqa: E402

pytestmark = pytest.mark.slow

# a job that trains until stopped; no checkpoint but the ones asked for (no periodic, no best-val saves)
JOB = [o for o in TINY if not o.startswith(("stage.num_steps", "stage.log_every", "stage.eval_every"))] + [
    "stage.log_every_n_steps=5",
    "stage.eval_every_n_steps=100000",
    "checkpoint.every_n_steps=0",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Service:
    """`python -m exp.serve` in a subprocess on a free loopback port, with a client (that sends `token`, if any,
    as a bearer token)."""

    def __init__(self, runs_dir: Path, *args: str, token: str | None = None):
        self.runs_dir, self.args, self.token = runs_dir, args, token
        self.proc = None

    def start(self) -> "Service":
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
        env.pop("EXP_SERVE_TOKEN", None)
        if self.token:
            env["EXP_SERVE_TOKEN"] = self.token
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "exp.serve", "--port", str(self.port), "--runs-dir", str(self.runs_dir), *self.args],
            cwd=ROOT,
            env=env,
        )
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
        self.client = httpx.Client(base_url=self.url, timeout=60, headers=headers)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if self.client.get("/api/health").status_code == 200:
                    return self
            except httpx.HTTPError:
                time.sleep(0.1)
        raise AssertionError("the service did not answer /api/health within 60 s")

    def kill_jobs(self) -> None:
        """End the local jobs this service still runs (a test that failed half-way leaves nothing behind)."""
        for job in self.client.get("/api/training/jobs").json():
            if job["status"] in ("RUNNING", "PENDING") and job["pid"] and job["source"] == "service":
                os.kill(job["pid"], signal.SIGKILL)

    def kill(self, sig=signal.SIGTERM) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.client.close()

    def status(self, job_id: str) -> dict:
        r = self.client.get(f"/api/training/jobs/{job_id}/status")
        assert r.status_code == 200, r.text
        return r.json()

    def wait(self, job_id: str, until, timeout: float = 120) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.status(job_id)
            if until(status):
                return status
            time.sleep(0.3)
        raise AssertionError(f"job {job_id} never got there: {status}\n{self.logs(job_id)}")

    def logs(self, job_id: str) -> str:
        return self.client.get(f"/api/training/jobs/{job_id}/logs").json()["text"]

    def start_job(self, overrides: list[str]) -> str:
        r = self.client.post("/api/training/jobs/start", json={"overrides": overrides})
        assert r.status_code == 201, r.text
        return r.json()["job_id"]


@pytest.fixture(scope="module")
def service(tmp_path_factory, corpus_cache):
    svc = Service(tmp_path_factory.mktemp("serve-e2e") / "runs").start()
    yield svc
    svc.kill_jobs()
    svc.kill()


@pytest.fixture(scope="module")
def running_job(service):
    """One long job, watched, checkpointed, stopped and resumed by the tests below, in order."""
    job_id = service.start_job([*JOB, "stage.num_steps=100000"])
    service.wait(job_id, lambda s: s["status"] == "RUNNING" and s["step"] >= 5)
    return job_id


def test_status_of_a_running_job(service, running_job):
    status = service.status(running_job)
    assert status["status"] == "RUNNING" and status["num_steps"] == 100000 and status["source"] == "service"
    assert 0 < status["step"] < 100000 and status["eta_seconds"] > 0
    assert status["metrics"]["train/loss"] > 0 and status["exit_code"] is None
    assert Path(status["run_dir"]).parent == service.runs_dir.resolve() / "serve"
    listed = service.client.get("/api/training/jobs", params={"status": "RUNNING"}).json()
    assert [j["job_id"] for j in listed] == [running_job]
    # the service answers requests niced (--nice 10); the job it started runs at the service's own priority
    assert nice(service.proc.pid) == 10 and nice(status["pid"]) == 0  # the event loop's thread; the job
    assert {nice(service.proc.pid, tid) for tid in os.listdir(f"/proc/{service.proc.pid}/task")} == {0, 10}


def nice(pid: int, tid=None) -> int:
    stat = Path(f"/proc/{pid}/task/{tid}/stat" if tid else f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[16])


def test_event_stream_follows_new_metric_lines(service, running_job):
    after = service.status(running_job)["step"]
    steps = []
    with service.client.stream(
        "GET", f"/api/training/jobs/{running_job}/metrics/stream", params={"after_step": after}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        event = None
        for line in r.iter_lines():
            if line.startswith("event: "):
                event = line[7:]
            elif line.startswith("data: ") and event == "metrics":
                row = json.loads(line[6:])
                steps.append(row["step"])
                assert "train/loss" in row
                if len(steps) == 3:
                    break
    assert steps[0] > after and steps == sorted(steps) and len(set(steps)) == 3


def test_save_now_keeps_training(service, running_job):
    ckpts = f"/api/training/jobs/{running_job}/checkpoints"
    assert service.client.get(ckpts).json() == []
    r = service.client.post(f"/api/training/jobs/{running_job}/checkpoint")
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 60
    while not (saved := service.client.get(ckpts).json()) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert len(saved) == 1, service.logs(running_job)
    step = saved[0]["step"]
    status = service.wait(running_job, lambda s: s["step"] > step + 5)
    assert status["status"] == "RUNNING"
    assert "SIGUSR1: saving a checkpoint at step" in service.logs(running_job)


def test_profile_the_next_steps_of_a_running_job(service, running_job):
    """The job page's Profile: torch.profiler over the next 3 steps, the trace and top operators in the run dir."""
    r = service.client.post(f"/api/training/jobs/{running_job}/profile", json={"steps": 3})
    assert r.status_code == 202 and r.json()["steps"] == 3, r.text
    run_dir = Path(service.status(running_job)["run_dir"])
    deadline = time.monotonic() + 60
    while not list(run_dir.glob("profile/steps_*/ops.txt")) and time.monotonic() < deadline:
        time.sleep(0.2)
    (ops,) = run_dir.glob("profile/steps_*/ops.txt")
    first, last = map(int, ops.parent.name.removeprefix("steps_").split("-"))
    assert last - first == 2 and "aten::mm" in ops.read_text()
    assert json.loads((ops.parent / "trace.json").read_text())["traceEvents"]
    assert service.status(running_job)["status"] == "RUNNING"  # and it trains on
    bad = service.client.post(f"/api/training/jobs/{running_job}/profile", json={"steps": 0})
    assert bad.status_code == 422


def test_stop_ends_killed_with_a_checkpoint_and_refuses_a_second(service, running_job):
    r = service.client.post(f"/api/training/jobs/{running_job}/stop")
    assert r.status_code == 202, r.text
    status = service.wait(running_job, lambda s: s["status"] != "RUNNING")
    assert status["status"] == "KILLED" and "SIGTERM" in status["stop_reason"]
    assert status["checkpoint"].endswith(f"step_{status['step']:08d}")
    steps = [c["step"] for c in service.client.get(f"/api/training/jobs/{running_job}/checkpoints").json()]
    assert steps[-1] == status["step"] and len(steps) == 2
    again = service.client.post(f"/api/training/jobs/{running_job}/stop")
    assert again.status_code == 409 and "KILLED" in again.json()["detail"]
    ended = service.client.post(f"/api/training/jobs/{running_job}/profile")
    assert ended.status_code == 409 and "only a running job can be profiled" in ended.json()["detail"]


def test_resume_with_more_steps_finishes(service, running_job):
    stopped_at = service.status(running_job)["step"]
    target = stopped_at + 15
    refused = service.client.post(
        f"/api/training/jobs/{running_job}/resume", json={"overrides": [f"stage.num_steps={target}"]}
    )
    assert refused.status_code == 422 and "resume.allow_config_change=true" in refused.json()["detail"]
    r = service.client.post(
        f"/api/training/jobs/{running_job}/resume",
        json={"overrides": [f"stage.num_steps={target}"], "allow_config_change": True},
    )
    assert r.status_code == 201, r.text
    status = service.wait(running_job, lambda s: s["status"] in ("FINISHED", "FAILED", "KILLED"))
    assert status["status"] == "FINISHED", service.logs(running_job)
    assert status["step"] == status["num_steps"] == target
    assert f"resumed from {status['run_dir']}/checkpoints/step_{stopped_at:08d}" in service.logs(running_job)
    assert service.wait(running_job, lambda s: s["exit_code"] is not None, timeout=10)["exit_code"] == 0  # reaped
    rows = service.client.get(f"/api/training/jobs/{running_job}/metrics/history", params={"key": "train/loss"})
    steps = [row["step"] for row in rows.json()["rows"]]
    assert steps == sorted(set(steps)) and steps[-1] == target


def test_killed_service_loses_nothing(tmp_path, corpus_cache):
    """The job tracks to the embedded MLflow store (runs/mlflow.db beside the runs): its MLflow run is created by
    the service, so the start answers with its id, and it ends FINISHED with the job's metrics and params."""
    from mlflow.tracking import MlflowClient

    svc = Service(tmp_path / "runs").start()
    tracked = [o for o in JOB if o != "tracking=none"]
    r = svc.client.post("/api/training/jobs/start", json={"overrides": [*tracked, "stage.num_steps=150"]})
    assert r.status_code == 201, r.text
    job_id, mlflow_run_id = r.json()["job_id"], r.json()["mlflow_run_id"]
    store = MlflowClient(f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}")
    assert store.get_run(mlflow_run_id).info.status in ("SCHEDULED", "RUNNING")
    status = svc.wait(job_id, lambda s: s["status"] == "RUNNING" and s["step"] >= 5)
    assert status["mlflow_run_id"] == mlflow_run_id
    # stopped while starting, before its tracker took the run created for it: the service closes that run. The
    # same overrides as the running job's: refused unless forced
    same = {"overrides": [*tracked, "stage.num_steps=150"]}
    assert svc.client.post("/api/training/jobs/start", json=same).status_code == 409
    early = svc.client.post("/api/training/jobs/start", json={**same, "force": True}).json()
    assert svc.client.post(f"/api/training/jobs/{early['job_id']}/stop").status_code == 202
    assert svc.wait(early["job_id"], lambda s: s["status"] != "PENDING")["status"] == "KILLED"
    deadline = time.monotonic() + 30  # closed in the background, off the request
    while store.get_run(early["mlflow_run_id"]).info.status != "KILLED" and time.monotonic() < deadline:
        time.sleep(0.2)
    assert store.get_run(early["mlflow_run_id"]).info.status == "KILLED"
    svc.kill(signal.SIGKILL)  # no shutdown of any kind
    summary = Path(status["run_dir"]) / "summary.json"
    deadline = time.monotonic() + 120
    while not summary.exists() and time.monotonic() < deadline:
        time.sleep(0.3)
    assert json.loads(summary.read_text())["status"] == "FINISHED"
    svc = Service(tmp_path / "runs").start()
    try:
        again = svc.wait(job_id, lambda s: s["status"] != "RUNNING", timeout=30)
        assert again["status"] == "FINISHED" and again["step"] == 150 and again["source"] == "service"
        assert again["metrics"]["train/loss"] > 0 and again["metrics"]["val/loss"] > 0
        assert again["mlflow_run_id"] == mlflow_run_id
        assert [j["job_id"] for j in svc.client.get("/api/training/jobs").json()] == [early["job_id"], job_id]
    finally:
        svc.kill()
    deadline = time.monotonic() + 60  # summary.json comes first, then the job's tracker closes the run
    while store.get_run(mlflow_run_id).info.status != "FINISHED" and time.monotonic() < deadline:
        time.sleep(0.3)
    run = store.get_run(mlflow_run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "gpt_tiny-pretrain"
    assert run.data.params["stage.num_steps"] == "150" and run.data.tags["run_dir"] == status["run_dir"]
    assert [m.step for m in store.get_metric_history(mlflow_run_id, "train/loss")][-1] == 150


def test_sweep_started_listed_and_relaunched(service):
    bad = service.client.post("/api/training/sweeps/start", json={"overrides": [*TINY, "stage.warmup_steps=0,9"]})
    assert bad.status_code == 422
    assert bad.json()["detail"] == "config error: stage.warmup_steps=9 must be in [0, stage.num_steps=4)"
    r = service.client.post("/api/training/sweeps/start", json={"overrides": [*TINY, "seed=0,1"]})
    assert r.status_code == 201, r.text
    started = r.json()
    assert started["num_points"] == 2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        listed = [s for s in service.client.get("/api/training/sweeps").json() if s["sweep_id"] == started["sweep_id"]]
        if listed and listed[0]["counts"] == {"FINISHED": 2} and listed[0]["status"] == "FINISHED":  # process ended
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{listed}: {Path(started['log_path']).read_text()[-2000:]}")
    trials = service.client.get(f"/api/training/sweeps/{started['sweep_id']}").json()["trials"]
    assert [(t["num"], t["status"], t["step"]) for t in trials] == [(0, "FINISHED", 4), (1, "FINISHED", 4)]
    assert [t["overrides"][-1] for t in trials] == ["seed=0", "seed=1"]
    # the trials are jobs too, with their sweep's id: listed by it, left out by sweep=none, resumed with their sweep
    jobs = service.client.get("/api/training/jobs").json()
    in_sweep = [j for j in jobs if started["sweep_dir"] in j["run_dir"]]
    assert sorted(j["run_dir"] for j in in_sweep) == sorted(t["run_dir"] for t in trials)
    assert {(j["sweep_id"], j["source"], j["status"]) for j in in_sweep} == {(started["sweep_id"], "sweep", "FINISHED")}
    of_sweep = service.client.get("/api/training/jobs", params={"sweep": started["sweep_id"]}).json()
    assert sorted(j["job_id"] for j in of_sweep) == sorted(j["job_id"] for j in in_sweep)
    alone = service.client.get("/api/training/jobs", params={"sweep": "none"}).json()
    assert not any(j["sweep_id"] for j in alone) and len(alone) + len(in_sweep) == len(jobs)
    r = service.client.post(f"/api/training/jobs/{in_sweep[0]['job_id']}/resume", json={"force": True})
    assert (
        r.status_code == 409 and f"resume the sweep (POST /api/training/sweeps/{started['sweep_id']}/resume)" in r.text
    )
    for mode in ("resume", "rerun-failed"):
        r = service.client.post(f"/api/training/sweeps/{started['sweep_id']}/{mode}")
        assert r.status_code == 202, r.text
        log = Path(r.json()["log_path"])
        deadline = time.monotonic() + 60
        while "nothing to" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            time.sleep(0.3)
        assert f"nothing to {mode.replace('-', ' ')}: 2 trials: 2 FINISHED" in log.read_text()
        view = f"/api/training/sweeps/{started['sweep_id']}"
        while service.client.get(view).json()["status"] != "FINISHED" and time.monotonic() < deadline:
            time.sleep(0.2)  # the relaunch's process is the sweep's until it exits: a second one waits for it


def test_optuna_search_started_over_http(service):
    """An Optuna study from the API: its trials run through exp's sweeper (sampled, told, pruning callback
    attached), and the sweep is listed with them."""
    import optuna

    space = ["stage.learning_rate=tag(log, interval(1e-4, 1e-2))", "seed=choice(0, 1)"]
    search = {"n_trials": 2, "sampler": "random", "seed": 0, "pruner": "median"}
    tracked = [o for o in TINY if o != "tracking=none"]  # the embedded store beside the runs
    r = service.client.post("/api/training/sweeps/start", json={"overrides": [*tracked, *space], "search": search})
    assert r.status_code == 201, r.text
    started = r.json()
    assert started["sweeper"] == "optuna" and started["num_points"] == 2
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        listed = [s for s in service.client.get("/api/training/sweeps").json() if s["sweep_id"] == started["sweep_id"]]
        done = "2 COMPLETE; best" in Path(started["log_path"]).read_text()  # the study told of both trials
        if done and listed and listed[0]["counts"] == {"FINISHED": 2}:
            break
        time.sleep(0.5)
    else:
        raise AssertionError(f"{listed}: {Path(started['log_path']).read_text()[-2000:]}")
    study = optuna.load_study(
        study_name=Path(started["sweep_dir"]).name, storage=f"sqlite:///{started['sweep_dir']}/optuna.db"
    )
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    trials = service.client.get(f"/api/training/sweeps/{started['sweep_id']}").json()["trials"]
    rates = sorted(t.params["stage.learning_rate"] for t in study.trials)
    found = sorted(
        float(o.split("=")[1]) for t in trials for o in t["overrides"] if o.startswith("stage.learning_rate=")
    )
    assert found == pytest.approx(rates) and all(1e-4 <= x <= 1e-2 for x in rates)
    # the sweep's MLflow store is recorded as an absolute URI: readable from any directory
    manifest = json.loads((Path(started["sweep_dir"]) / "sweep.json").read_text())
    assert manifest["mlflow_tracking_uri"] == f"sqlite:///{service.runs_dir.resolve() / 'mlflow.db'}"
    assert all(t["mlflow_run_id"] for t in trials)


def test_cli_run_elsewhere_is_found_through_mlflow(service):
    """A run started from the command line outside the runs directory, logging to the embedded MLflow store beside
    it, is listed (its run_dir tag), with its status and checkpoints."""
    from ..conftest import run_train

    elsewhere = service.runs_dir.parent / "scratch" / "two"
    tracked = [o for o in TINY if o != "tracking=none"] + [
        "stage.num_steps=6",
        "checkpoint.every_n_steps=2",
        f"tracking.uri=sqlite:///{service.runs_dir / 'mlflow.db'}",
        f"tracking.artifact_location={service.runs_dir / 'mlartifacts'}",
    ]
    proc = run_train(*tracked, f"hydra.run.dir={elsewhere}", cwd=service.runs_dir.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    time.sleep(2.1)  # the runs directory and the store are scanned at most every 2 s
    jobs = service.client.get("/api/training/jobs").json()
    (job,) = [j for j in jobs if j["run_dir"] == str(elsewhere.resolve())]
    assert job["status"] == "FINISHED" and job["source"] == "cli" and job["mlflow_run_id"]
    listed = service.client.get(f"/api/training/jobs/{job['job_id']}/checkpoints").json()
    assert [c["step"] for c in listed] == [2, 4, 6]
