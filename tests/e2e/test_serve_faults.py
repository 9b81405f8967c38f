"""Faults that used to lose track of a job in the service: a job killed with SIGKILL (its status, summary.json and
MLflow run), duplicate and pointless starts and resumes (409 unless `force`), and a sweep known under one id from
the moment it is started."""

import json
import os
import shutil
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from exp.rundir import RunLock  # noqa: E402
from exp.serve import Settings, create_app  # noqa: E402

from ..conftest import TINY  # noqa: E402
from .test_serve_e2e import JOB  # noqa: E402

LOCAL = "http://127.0.0.1"  # the Host a browser on the default bind sends


@pytest.fixture
def service(tmp_path):
    """An app over an empty runs directory; every process it started is killed at the end."""
    app = create_app(Settings(runs_dir=tmp_path / "runs"))
    with TestClient(app, base_url=LOCAL) as client:
        yield client
    for pid in list(app.state.launcher._children):
        kill(pid)


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def sleeping(state, monkeypatch) -> list[int]:
    """Jobs and sweep tools launched as `sleep 60`: a live process and nothing else. Returns their pids."""
    spawn, pids = state.launcher.spawn, []

    def fake(args, **kwargs):
        child = spawn(["sleep", "60"], **kwargs)
        pids.append(child.pid)
        return child

    monkeypatch.setattr(state.launcher, "spawn", fake)
    return pids


def wait_for(check, timeout: float = 30, every: float = 0.2):
    deadline = time.monotonic() + timeout
    while not (found := check()) and time.monotonic() < deadline:
        time.sleep(every)
    return found


def test_same_overrides_started_at_once_make_one_job(service, monkeypatch):
    """Four simultaneous starts of one config: one job, three 409s; `force` starts another; a job killed by a
    signal is KILLED with the signal named, and no longer counts as running."""
    pids = sleeping(service.app.state, monkeypatch)
    body = {"overrides": TINY}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: service.post("/api/training/jobs/start", json=body), range(4)))
    assert sorted(r.status_code for r in answers) == [201, 409, 409, 409], [r.text for r in answers]
    (job_id,) = [r.json()["job_id"] for r in answers if r.status_code == 201]
    for r in answers:
        if r.status_code == 409:
            detail = r.json()["detail"]
            assert detail.endswith("pass force=true to start another") and (
                "being started" in detail or job_id in detail
            )
    again = service.post("/api/training/jobs/start", json=body)
    assert again.status_code == 409
    assert (
        again.json()["detail"] == f"job {job_id} with the same overrides is PENDING; pass force=true to start another"
    )
    assert service.post("/api/training/jobs/start", json={**body, "force": True}).status_code == 201
    assert service.post("/api/training/jobs/start", json={"overrides": [*TINY, "seed=5"]}).status_code == 201
    assert len(pids) == 3
    for pid in pids:
        kill(pid)
    status = wait_for(
        lambda: (s := service.get(f"/api/training/jobs/{job_id}/status").json())["status"] != "PENDING" and s
    )
    assert status["status"] == "KILLED" and status["signal"] == "SIGKILL" and status["exit_code"] == -9
    assert status["stop_reason"] == status["error"] == "killed by SIGKILL"
    assert service.post("/api/training/jobs/start", json=body).status_code == 201


def finished_run(runs: Path, name: str) -> Path:
    """A run directory as a finished 6-step CLI run leaves it: config, summary.json, a checkpoint at step 6."""
    from exp.serve import configs

    overrides = [*TINY, "stage.num_steps=6"]
    (runs / "cli" / name / ".hydra").mkdir(parents=True)
    run_dir = (runs / "cli" / name).resolve()
    cfg, _ = configs.compose(overrides, run_dir)
    (run_dir / ".hydra" / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
    (run_dir / "summary.json").write_text(json.dumps({"status": "FINISHED", "step": 6, "num_steps": 6}))
    checkpoint = run_dir / "checkpoints" / "step_00000006"
    checkpoint.mkdir(parents=True)
    (checkpoint / "manifest.json").write_text(json.dumps({"files": {}}))
    (checkpoint / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    return run_dir


def test_resuming_a_finished_job_needs_more_steps_or_force(service, monkeypatch, tmp_path):
    runs = tmp_path / "runs"
    done, other, branched = finished_run(runs, "done"), finished_run(runs, "other"), finished_run(runs, "branched")
    launched = []
    monkeypatch.setattr(
        service.app.state.launcher, "start_local", lambda job_id, o, run_dir: launched.append(o) or {"pid": None}
    )
    jobs = {j["run_dir"]: j for j in service.get("/api/training/jobs").json()}
    job, forced = jobs[str(done)]["job_id"], jobs[str(other)]["job_id"]
    assert jobs[str(done)]["status"] == "FINISHED"
    for body in ({}, {"overrides": ["stage.num_steps=6"], "allow_config_change": True}):
        r = service.post(f"/api/training/jobs/{job}/resume", json=body)
        assert r.status_code == 409, r.text
        assert r.json()["detail"].startswith(f"job {job} finished at step 6: pass force=true to run its end again")
    assert not launched
    more = {"overrides": ["stage.num_steps=8"], "allow_config_change": True}
    assert service.post(f"/api/training/jobs/{job}/resume", json=more).status_code == 201
    assert "stage.num_steps=8" in launched[-1] and f"resume.path={done}/checkpoints/step_00000006" in launched[-1]
    assert service.post(f"/api/training/jobs/{forced}/resume", json={"force": True}).status_code == 201
    assert len(launched) == 2
    shutil.copytree(branched / "checkpoints" / "step_00000006", branched / "checkpoints" / "step_00000004")
    here = service.post(f"/api/training/jobs/{jobs[str(branched)]['job_id']}/resume", json={"step": 4})
    assert here.status_code == 201, here.text  # "resume from here", from an earlier step: a new branch, not the end
    assert f"resume.path={branched}/checkpoints/step_00000004" in launched[-1]


def test_sweep_is_known_at_once_under_its_folder_name(service, monkeypatch):
    """The id the start answers with is the sweep folder's name, and the sweep is there (STARTING) before its
    process writes sweep.json; resume and rerun-failed are refused while it runs (its process, or a trial
    holding its run directory), unless forced."""
    pids = sleeping(service.app.state, monkeypatch)
    started = service.post("/api/training/sweeps/start", json={"overrides": [*TINY, "seed=0,1"]})
    assert started.status_code == 201, started.text
    sweep_id, sweep_dir = started.json()["sweep_id"], Path(started.json()["sweep_dir"])
    assert sweep_id == sweep_dir.name
    view = service.get(f"/api/training/sweeps/{sweep_id}")
    assert view.status_code == 200 and view.json()["status"] == "STARTING" and view.json()["trials"] == []
    assert sweep_id in [s["sweep_id"] for s in service.get("/api/training/sweeps").json()]
    r = service.post(f"/api/training/sweeps/{sweep_id}/resume")
    assert r.status_code == 409 and r.json()["detail"].startswith(f"sweep {sweep_id} is still running (starting)")

    # the sweeper writes its manifest (what exp's launchers write): trial 0 finished, trial 1 training
    trials = {}
    for num in (0, 1):
        run_dir = sweep_dir / str(num)
        run_dir.mkdir(parents=True)
        (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 5.0}\n')
        trials[str(num)] = {"num": num, "overrides": [f"seed={num}"], "run_dir": str(run_dir), "status": "PENDING"}
    (sweep_dir / "0" / "summary.json").write_text(json.dumps({"status": "FINISHED", "step": 4, "val_loss": 5.0}))
    held = RunLock(sweep_dir / "1").acquire()  # a live process (this one) holds it
    (sweep_dir / "sweep.json").write_text(json.dumps({"sweep_dir": str(sweep_dir), "trials": trials}))
    kill(pids[0])
    assert wait_for(lambda: service.app.state.launcher.poll(pids[0]) is not None)
    view = service.get(f"/api/training/sweeps/{sweep_id}").json()
    assert view["status"] == "RUNNING" and view["counts"] == {"FINISHED": 1, "RUNNING": 1}
    r = service.post(f"/api/training/sweeps/{sweep_id}/rerun-failed")
    assert r.status_code == 409
    assert r.json()["detail"] == (
        f"sweep {sweep_id} is still running (trial 1 is RUNNING); pass force=true to rerun-failed anyway"
    )
    forced = service.post(f"/api/training/sweeps/{sweep_id}/resume", json={"force": True})
    assert forced.status_code == 202 and forced.json()["pid"] == pids[1]
    held.release()  # the trial's process has ended
    (sweep_dir / "1" / ".lock").write_text(f"host=here pid={pids[0]}\n")
    r = service.post(f"/api/training/sweeps/{sweep_id}/resume")
    assert r.status_code == 409 and f"(its process {pids[1]} is running)" in r.json()["detail"]
    kill(pids[1])
    assert wait_for(lambda: service.get(f"/api/training/sweeps/{sweep_id}").json()["status"] == "FINISHED")
    assert service.post(f"/api/training/sweeps/{sweep_id}/resume").status_code == 202

    # a sweep whose process ended before writing sweep.json: FAILED, nothing to resume
    lost = service.post("/api/training/sweeps/start", json={"overrides": [*TINY, "seed=2,3"]}).json()
    kill(pids[-1])
    view = wait_for(
        lambda: (v := service.get(f"/api/training/sweeps/{lost['sweep_id']}").json())["status"] != "STARTING" and v
    )
    assert view["status"] == "FAILED" and lost["log_path"] in view["error"]
    r = service.post(f"/api/training/sweeps/{lost['sweep_id']}/resume", json={"force": True})
    assert r.status_code == 409 and "has no trials to resume" in r.json()["detail"]


def descendants(pid: int) -> list[int]:
    """Every live process under pid (the trainer's MLflow worker, multiprocessing's resource tracker)."""
    parents = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z":
                parents.setdefault(int(fields[1]), []).append(int(entry.name))
    found, level = [], [pid]
    while level:
        level = [c for p in level for c in parents.get(p, [])]
        found += level
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
def test_job_killed_with_sigkill_ends_killed_with_its_mlflow_run(tmp_path, corpus_cache):
    """A real job tracking to the embedded MLflow store, SIGKILLed once its tracker took the run created ahead of
    it: the status says KILLED and names the signal, summary.json says so too (also to a service started later),
    the MLflow run is closed KILLED in the background, and the trainer's MLflow worker does not linger."""
    from mlflow.tracking import MlflowClient

    runs = tmp_path / "runs"
    # the job pauses after step 10 (logged at 5 and 10): the MLflow worker runs at SCHED_IDLE, on CPU time the
    # training leaves, so without the pause its first metric waits on whatever else the suite runs (up to minutes)
    pause = ["+callbacks.pause._target_=tests.hooks.PauseIn", "+callbacks.pause.hook=on_step_end"]
    pause += [
        "+callbacks.pause.step=10",
        f"+callbacks.pause.ready={tmp_path / 'paused'}",
        "+callbacks.pause.seconds=300",
    ]
    tracked = [o for o in JOB if o != "tracking=none"] + ["stage.num_steps=100000", *pause]
    store = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    left: list[int] = []
    settings = Settings(runs_dir=runs, allow_targets=("tests.hooks.PauseIn",))  # the test's pause, nothing else
    with TestClient(create_app(settings), base_url=LOCAL) as client:
        started = client.post("/api/training/jobs/start", json={"overrides": tracked})
        assert started.status_code == 201, started.text
        job_id, run_id = started.json()["job_id"], started.json()["mlflow_run_id"]

        def status():
            return client.get(f"/api/training/jobs/{job_id}/status").json()

        try:
            assert wait_for(lambda: status()["status"] == "RUNNING" and status()["step"] >= 5, timeout=120), status()
            assert wait_for(lambda: (tmp_path / "paused").exists(), timeout=120)
            assert wait_for(lambda: store.get_metric_history(run_id, "train/loss"), timeout=120)  # its tracker took it
            assert store.get_run(run_id).info.status == "RUNNING"
            dup = client.post("/api/training/jobs/start", json={"overrides": tracked})
            assert dup.status_code == 409 and f"job {job_id} with the same overrides is RUNNING" in dup.json()["detail"]
            pid = status()["pid"]
            left = descendants(pid)
            assert left, "the trainer has no MLflow worker"
            os.kill(pid, signal.SIGKILL)
            ended = wait_for(lambda: (s := status())["status"] != "RUNNING" and s, timeout=30)
            assert ended["status"] == "KILLED" and ended["signal"] == "SIGKILL" and ended["exit_code"] == -9, str(ended)
            assert ended["stop_reason"] == ended["error"] == "killed by SIGKILL"
            assert ended["mlflow_run_id"] == run_id
            assert wait_for(lambda: store.get_run(run_id).info.status == "KILLED", timeout=30)
            summary = json.loads((Path(ended["run_dir"]) / "summary.json").read_text())
            assert (
                summary["status"] == "KILLED" and summary["signal"] == "SIGKILL" and summary["mlflow_run_id"] == run_id
            )
            assert summary["step"] >= 5 and summary["written_by"] == "exp.serve"
            lingering = wait_for(lambda: not any(alive(p) for p in left), timeout=15)
            assert lingering, f"the trainer's children outlived it: {[p for p in left if alive(p)]}"
        finally:
            for pid in [p for p in left if alive(p)]:
                kill(pid)
            if status()["status"] == "RUNNING":
                kill(status()["pid"])
    with TestClient(
        create_app(Settings(runs_dir=runs)), base_url=LOCAL
    ) as client:  # no exit status known: summary.json says it
        again = client.get(f"/api/training/jobs/{job_id}/status").json()
        assert again["status"] == "KILLED" and again["signal"] == "SIGKILL" and again["exit_code"] == -9


def test_summary_left_running_by_a_dead_process_reads_killed(tmp_path):
    """A summary.json that still says RUNNING, with no process behind it and no exit status known (the service
    restarted meanwhile): KILLED, not RUNNING or FAILED."""
    from exp.serve import control

    (tmp_path / "summary.json").write_text(json.dumps({"status": "RUNNING", "step": 3}))
    job = {"id": "j1", "run_dir": str(tmp_path), "pid": None, "source": "service", "launcher": "local"}
    launcher = control.Launcher(tmp_path / "runs")
    status = control.job_status({**job, "overrides": [], "created": 0}, launcher, control.MetricsCache())
    assert status["status"] == "KILLED" and status["step"] == 3 and status["signal"] is None
