"""MLflow against a real store and a real server: what a run records, its status on every ending, a dead server."""

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
from mlflow.tracking import MlflowClient

from ..conftest import TINY, run_train

BASE = [o for o in TINY if not o.startswith("tracking")] + [
    "stage.num_steps=8",
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=4",
    "checkpoint.every_n_steps=4",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(tmp_path):
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--backend-store-uri",
            f"sqlite:///{tmp_path}/server.db",
            "--artifacts-destination",
            str(tmp_path / "art"),
            "--workers",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 90
    while time.time() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return proc, url
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError("mlflow server did not start")


def stop_server(proc):
    os.killpg(proc.pid, signal.SIGKILL)  # its own session: the server and its gunicorn/uvicorn workers
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, url = start_server(tmp_path_factory.mktemp("mlflow_server"))
    yield url
    stop_server(proc)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    return f"sqlite:///{tmp_path_factory.mktemp('store')}/mlflow.db"


def summary(run_dir):
    return json.loads((run_dir / "summary.json").read_text())


@pytest.mark.slow
def test_a_run_on_a_server_records_params_tags_metrics_artifacts_and_finishes(server, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *BASE, f"tracking.uri={server}", "tracking.experiment=server_test", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = summary(run_dir)
    assert out["mlflow_tracking_uri"] == server
    client = MlflowClient(tracking_uri=server)
    run = client.get_run(out["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["stage.num_steps"] == "8" and run.data.params["model.n_layer"] == "2"
    assert run.data.tags["stage"] == "pretrain" and run.data.tags["host"] and "overrides" in run.data.tags
    assert "mlflow.source.git.commit" in run.data.tags
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(1, 9))
    assert [m.step for m in client.get_metric_history(run.info.run_id, "val/loss")] == [4, 8]
    top = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "metrics.png", "checkpoints.json", "model", "hydra"} <= top
    assert {a.path for a in client.list_artifacts(run.info.run_id, "model")} == {
        "model/model.safetensors",
        "model/config.yaml",
    }
    refs = json.loads(open(client.download_artifacts(run.info.run_id, "checkpoints.json", str(tmp_path))).read())
    assert [r["step"] for r in refs] == [4, 8] and all(r["bytes"] > 0 and r["sha256"] for r in refs)


def _warnings_about_mlflow(proc) -> list[str]:
    return [line for line in (proc.stdout + proc.stderr).splitlines() if "WARNING" in line and "MLflow" in line]


@pytest.mark.slow
def test_server_killed_mid_run_training_finishes_with_one_warning(tmp_path):
    server_proc, url = start_server(tmp_path)
    run_dir = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(run_train.__globals__["ROOT"])}
    cmd = [
        sys.executable,
        str(run_train.__globals__["ROOT"] / "train.py"),
        *BASE,
        "stage.num_steps=60",
        f"tracking.uri={url}",
        f"hydra.run.dir={run_dir}",
        # the run waits at step 10 until the server is gone: its metrics so far reach the server first, however
        # slowly the worker (SCHED_IDLE beside a loaded machine) starts, and 50 steps remain to log to a dead one
        "+callbacks.pause._target_=tests.hooks.PauseIn",
        "+callbacks.pause.hook=on_step_end",
        "+callbacks.pause.step=10",
        f"+callbacks.pause.ready={tmp_path / 'paused'}",
        f"+callbacks.pause.release={tmp_path / 'killed'}",
        "+callbacks.pause.seconds=240",
    ]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(tracking_uri=url)
    deadline = time.time() + 180
    reached = False
    while time.time() < deadline and proc.poll() is None:  # wait until metrics have reached the server
        marker = run_dir / "mlflow_run.json"
        if (tmp_path / "paused").exists() and marker.exists():
            if client.get_metric_history(json.loads(marker.read_text())["run_id"], "train/loss"):
                reached = True
                break
        time.sleep(0.2)
    assert reached, "no metric reached the server while the run waited"
    stop_server(server_proc)
    killed_at = time.time()
    (tmp_path / "killed").touch()
    stdout, stderr = proc.communicate(timeout=300)
    finished = subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)
    assert finished.returncode == 0, stderr[-3000:]
    assert summary(run_dir)["step"] == 60
    assert time.time() - killed_at < 90  # no step waited minutes on the dead server
    assert len(_warnings_about_mlflow(finished)) == 1, _warnings_about_mlflow(finished)
    assert (
        len([r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines()) if "train/loss" in r])
        == 60
    )  # everything is in the local record


def test_unreachable_tracking_server_at_start_costs_one_warning(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(*BASE, f"tracking.uri=http://127.0.0.1:{free_port()}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(_warnings_about_mlflow(proc)) == 1, proc.stdout + proc.stderr
    assert summary(run_dir)["mlflow_run_id"] is None and summary(run_dir)["step"] == 8


def _status(store, run_dir):
    run_id = json.loads((run_dir / "mlflow_run.json").read_text())["run_id"]
    return run_id, MlflowClient(tracking_uri=store).get_run(run_id).info.status


def test_a_worker_killed_mid_run_is_not_waited_for_and_the_run_is_closed_from_the_trainer(store, tmp_path):
    """The MLflow worker SIGKILLed at step 3 (the OOM killer's way): training finishes, the run's ending is set by
    the trainer itself (never left RUNNING), with one warning; metrics.jsonl has every step."""
    run_dir = tmp_path / "killed-worker"
    proc = run_train(
        *BASE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.kill._target_=tests.hooks.KillTrackerAt",
        "+callbacks.kill.step=3",
        f"+callbacks.kill.wait_for={run_dir / 'mlflow_run.json'}",  # once it has created the run
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(run_dir)["status"] == "FINISHED"
    run_id, status = _status(store, run_dir)
    assert status == "FINISHED"
    warnings = [line for line in (proc.stdout + proc.stderr).splitlines() if "MLflow worker process ended" in line]
    assert len(warnings) == 1 and f"MLflow run {run_id} closed FINISHED from the trainer" in warnings[0], warnings
    assert "did not answer within" not in proc.stdout + proc.stderr
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 8


def test_sigterm_ends_the_run_killed_and_nan_failure_ends_it_failed(store, tmp_path):
    run_dir = tmp_path / "term"
    proc = run_train(
        *BASE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.stop._target_=tests.hooks.SignalAt",
        "+callbacks.stop.step=3",
        cwd=tmp_path,
    )
    assert proc.returncode == 128 + signal.SIGTERM, proc.stderr[-3000:]
    assert _status(store, run_dir)[1] == "KILLED"
    assert (run_dir / "checkpoints" / "step_00000003").is_dir()  # saved on the way out

    run_dir = tmp_path / "nan"
    proc = run_train(
        *BASE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "nan.max_rollbacks=0",
        "+callbacks.poison._target_=tests.hooks.PoisonWeightsAt",
        "+callbacks.poison.step=5",
        cwd=tmp_path,
    )
    assert proc.returncode == 1
    assert _status(store, run_dir)[1] == "FAILED"


def test_sigkilled_run_is_reconciled_and_resume_continues_the_same_run_without_duplicate_steps(store, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *BASE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.stop._target_=tests.hooks.SignalAt",
        "+callbacks.stop.step=6",
        "+callbacks.stop.signal_name=SIGKILL",
        # once the worker has created the run and the step-4 checkpoint (written in the background) is on disk
        f"+callbacks.stop.wait_for=[{run_dir / 'mlflow_run.json'},{run_dir / 'checkpoints' / 'step_00000004'}]",
        cwd=tmp_path,
    )
    assert proc.returncode == -signal.SIGKILL
    run_id, status = _status(store, run_dir)
    assert status == "RUNNING"  # what plain MLflow leaves behind

    proc = run_train(*BASE, f"tracking.uri={store}", f"hydra.run.dir={run_dir}", cwd=tmp_path)  # resume=auto
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert summary(run_dir)["mlflow_run_id"] == run_id  # the checkpoint at step 4 (or the run dir's marker) named it
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert sorted(steps) == list(range(1, 9))

    # killed before its first checkpoint: the next launch starts a new run and closes the old one as KILLED
    run_dir = tmp_path / "early"
    run_train(
        *BASE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.stop._target_=tests.hooks.SignalAt",
        "+callbacks.stop.step=2",
        "+callbacks.stop.signal_name=SIGKILL",
        f"+callbacks.stop.wait_for={run_dir / 'mlflow_run.json'}",
        cwd=tmp_path,
    )
    old_id, status = _status(store, run_dir)
    assert status == "RUNNING"
    proc = run_train(*BASE, f"tracking.uri={store}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0
    assert client.get_run(old_id).info.status == "KILLED"
    assert summary(run_dir)["mlflow_run_id"] != old_id


def _session_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def test_a_run_uses_the_prestarted_worker_at_idle_priority_and_finishes(store, tmp_path, make_cfg):
    from exp.loop import TrainState
    from exp.tracking import MlflowTracker
    from exp.tracking import worker as mlflow_worker

    cfg = make_cfg("tracking=mlflow", f"tracking.uri={store}")
    mlflow_worker.prestart(cfg)
    prestarted = mlflow_worker._prestarted
    assert prestarted is not None and prestarted.process.is_alive()
    if hasattr(os, "SCHED_IDLE"):
        assert os.sched_getscheduler(prestarted.process.pid) == os.SCHED_IDLE
    tracker = MlflowTracker(store, experiment="prestart", cfg=cfg, run_dir=tmp_path)
    assert tracker._proc is prestarted.process and mlflow_worker._prestarted is None  # claimed, not a second one
    tracker.on_log(TrainState(step=1), {"train/loss": 2.5})
    tracker.on_train_end(TrainState(step=1), "FINISHED")
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(tracker.run_id).info.status == "FINISHED"
    assert [m.value for m in client.get_metric_history(tracker.run_id, "train/loss")] == [2.5]
    assert not prestarted.process.is_alive()


def test_nothing_is_prestarted_without_mlflow_on_this_rank_or_for_a_dry_run(store, make_cfg, monkeypatch):
    from exp.tracking import worker as mlflow_worker

    for overrides, env in (
        (["tracking=none"], {}),
        (["tracking=mlflow", f"tracking.uri={store}", "dry_run=true"], {}),
        (["tracking=mlflow", f"tracking.uri={store}"], {"RANK": "1"}),
    ):
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        mlflow_worker.prestart(make_cfg(*overrides))
        assert mlflow_worker._prestarted is None, overrides


def test_a_refused_config_exits_at_once_and_leaves_no_worker_behind(tmp_path):
    """The worker is launched before validation; a run that never claims it must not wait on it or leak it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(run_train.__globals__["ROOT"])}
    cmd = [
        sys.executable,
        str(run_train.__globals__["ROOT"] / "train.py"),
        *BASE,
        f"tracking.uri=sqlite:///{tmp_path}/mlflow.db",
        "+optimizer.lrr=0.1",
    ]
    started = time.time()
    proc = subprocess.Popen(
        cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 2 and "optimizer.lrr" in stderr, stderr[-2000:]
    assert time.time() - started < 60
    deadline = time.time() + 5
    while _session_alive(proc.pid) and time.time() < deadline:
        time.sleep(0.1)
    assert not _session_alive(proc.pid), "a process of the run outlived it"
    assert not (tmp_path / "mlflow.db").exists()  # no run was created for a refused config


def _worker_of(trainer_pid: int) -> int | None:
    """The pid of the MLflow worker the trainer process started (a multiprocessing spawn child), from /proc."""
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = open(f"/proc/{entry}/status").read()
            cmdline = open(f"/proc/{entry}/cmdline", "rb").read()
        except OSError:
            continue
        if f"\nPPid:\t{trainer_pid}\n" in status and b"spawn_main" in cmdline:
            return int(entry)
    return None


def _running(pid: int) -> bool:
    """Whether the process exists and has not exited (a zombie nobody reaped yet has exited)."""
    try:
        return open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_worker(pid: int | None) -> None:
    if pid is not None and _running(pid):
        os.kill(pid, signal.SIGKILL)


def test_checkpoints_never_wait_for_the_mlflow_worker_and_a_resume_continues_its_run(store, tmp_path):
    """The worker held stopped (SIGSTOP: a busy node starving it) from the trainer's start: the checkpoints of
    steps 1 and 2 are written all the same, without the run id. The trainer is SIGKILLed at step 3 once the
    worker has created the run; the resume from step 2 finds that run in the run dir and continues it."""
    run_dir = tmp_path / "run"
    marker = run_dir / "mlflow_run.json"
    cmd = [
        sys.executable,
        str(run_train.__globals__["ROOT"] / "train.py"),
        *BASE,
        "stage.num_steps=4",
        "checkpoint.every_n_steps=1",
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "+callbacks.stop._target_=tests.hooks.SignalAt",
        "+callbacks.stop.step=3",
        "+callbacks.stop.signal_name=SIGKILL",
        f"+callbacks.stop.wait_for={marker}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(run_train.__globals__["ROOT"])}
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    worker = None
    try:
        deadline = time.time() + 30
        while worker is None and proc.poll() is None and time.time() < deadline:
            worker = _worker_of(proc.pid)
        assert worker is not None, "no MLflow worker was started"
        os.kill(worker, signal.SIGSTOP)
        stopped = time.time()
        second = run_dir / "checkpoints" / "step_00000002"
        while not second.is_dir() and proc.poll() is None and time.time() < stopped + 40:
            time.sleep(0.05)
        waited = time.time() - stopped
        assert second.is_dir(), f"no checkpoint within {waited:.0f} s of the worker stopping"
        assert not marker.exists()  # the worker was still stopped: no run had been created
        for step in (1, 2):
            saved = json.loads((run_dir / "checkpoints" / f"step_0000000{step}" / "trainer_state.json").read_text())
            assert saved["mlflow_run_id"] is None
        with contextlib.suppress(AttributeError, OSError):  # no longer starved: the rest need not wait on idle time
            os.sched_setscheduler(worker, os.SCHED_OTHER, os.sched_param(0))
        os.kill(worker, signal.SIGCONT)
        _, stderr = proc.communicate(timeout=120)
        assert proc.returncode == -signal.SIGKILL, stderr[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        if worker is not None and _running(worker):
            os.kill(worker, signal.SIGCONT)
            _stop_worker(worker)
    run_id, status = _status(store, run_dir)
    assert status == "RUNNING"

    from exp import job

    from ..conftest import compose_train

    job.run_job(compose_train(*BASE, "stage.num_steps=4", f"tracking.uri={store}", run_dir=run_dir))  # resume=auto
    assert summary(run_dir)["mlflow_run_id"] == run_id and summary(run_dir)["status"] == "FINISHED"
    client = MlflowClient(tracking_uri=store)
    assert client.get_run(run_id).info.status == "FINISHED"
    steps = [m.step for m in client.get_metric_history(run_id, "train/loss")]
    assert len(steps) == len(set(steps)) and max(steps) == 4


def test_a_worker_whose_trainer_is_killed_while_it_starts_exits(tmp_path):
    """The trainer SIGKILLed right after starting its MLflow worker (before the worker ran a line): the worker,
    an orphan from its first instruction, exits instead of waiting forever with the store open."""
    script = (
        "import os, signal\n"
        "from exp.tracking.worker import Handle\n"
        f"handle = Handle('sqlite:///{tmp_path}/mlflow.db')\n"
        "print(handle.process.pid, flush=True)\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(run_train.__globals__["ROOT"])}
    with open(tmp_path / "out", "w") as out:  # not a pipe: an orphaned worker would hold it open
        trainer = subprocess.run([sys.executable, "-c", script], env=env, stdout=out, timeout=60)
    assert trainer.returncode == -signal.SIGKILL
    worker = int((tmp_path / "out").read_text())
    try:
        deadline = time.time() + 20
        while _running(worker) and time.time() < deadline:
            time.sleep(0.1)
        assert not _running(worker), "the MLflow worker outlived its SIGKILLed trainer"
    finally:
        _stop_worker(worker)


def test_a_refused_resume_leaves_the_finished_runs_record_as_it_was(store, tmp_path):
    """A resume refused after the config was accepted (another model shape, resume.allow_config_change=true:
    the checkpoint does not load) exits 2 with one line; summary.json, metrics.jsonl, the checkpoints and the
    MLflow run (status, end time) stay exactly as the finished run left them."""
    from exp import job

    from ..conftest import compose_train

    run_dir = tmp_path / "run"
    job.run_job(compose_train(*BASE, f"tracking.uri={store}", run_dir=run_dir))

    def record():
        client = MlflowClient(tracking_uri=store)
        run = client.get_run(summary(run_dir)["mlflow_run_id"])
        files = [run_dir / "summary.json", run_dir / "metrics.jsonl", *sorted((run_dir / "checkpoints").rglob("*"))]
        runs = len(client.search_runs([run.info.experiment_id]))  # and no new run was created either
        return {str(p): p.read_bytes() for p in files if p.is_file()}, (run.info.status, run.info.end_time), runs

    before = record()
    assert before[1][0] == "FINISHED"
    proc = run_train(
        *BASE,
        f"tracking.uri={store}",
        f"hydra.run.dir={run_dir}",
        "model.n_layer=3",
        "resume.allow_config_change=true",
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if "cannot resume" in line]
    assert len(errors) == 1 and errors[0].startswith("error: cannot resume from "), proc.stderr[-3000:]
    assert record() == before


def test_slurm_signals_to_every_process_of_the_job_never_end_a_starting_worker():
    """scancel --signal=USR1 (save now), TERM or USR2 reach every process of a SLURM job, a worker still importing
    Python included: it is born with them blocked and ignores them, while the trainer still receives its own."""
    from exp.tracking.worker import Handle

    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: received.append("USR1"))
    try:
        handle = Handle()
        for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGUSR2):
            os.kill(handle.process.pid, sig)  # at once: the new interpreter has not reached main() yet
        os.kill(os.getpid(), signal.SIGUSR1)
        time.sleep(3)
        assert handle.process.is_alive(), handle.process.exitcode
        assert received == ["USR1"]
    finally:
        signal.signal(signal.SIGUSR1, previous)
        handle.process.kill()
        handle.process.join()
