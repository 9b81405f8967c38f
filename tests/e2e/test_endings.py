"""How a run ends when its disk fills up or a second signal arrives: one line, summary.json, nothing half-written."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from exp.checkpoint import list_checkpoints, verify_checkpoint

from ..conftest import ROOT, TINY, run_train

PAGE = 4096


def summary(run_dir) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def disk_usage(folder) -> int:
    """What a checkpoint folder takes on a tmpfs: its files in whole pages."""
    return sum(-(-p.stat().st_size // PAGE) * PAGE for p in folder.iterdir() if p.is_file())


@pytest.fixture(scope="module")
def checkpoint_size(tmp_path_factory) -> int:
    """One TINY checkpoint's size on disk (model and optimizer state), from a run on the ordinary disk."""
    tmp = tmp_path_factory.mktemp("measure")
    done = run_train(*TINY, "stage.num_steps=2", f"hydra.run.dir={tmp / 'run'}", cwd=tmp)
    assert done.returncode == 0, done.stderr
    return disk_usage(list_checkpoints(tmp / "run" / "checkpoints")[-1])


@pytest.fixture
def small_disk(tmp_path):
    """mount(size_in_bytes) -> a fresh tmpfs of that size, unmounted after the test."""
    mounted = []

    def mount(size: int):
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        command = ["mount", "-t", "tmpfs", "-o", f"size={size // 1024}k", "tmpfs", str(folder)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            pytest.skip(f"a small disk needs a tmpfs mount (root): {done.stderr.strip()}")
        mounted.append(folder)
        return folder

    yield mount
    for folder in mounted:
        subprocess.run(["umount", str(folder)], check=False)


def test_a_full_disk_ends_in_one_line_and_keeps_the_valid_checkpoints(tmp_path, small_disk, checkpoint_size):
    disk = small_disk(int(1.6 * checkpoint_size))  # the step-2 checkpoint fits, the step-4 one does not
    ckpts, run_dir = disk / "checkpoints", tmp_path / "run"
    overrides = ["checkpoint.every_n_steps=2", "checkpoint.keep_last=0", f"checkpoint.dir={ckpts}"]
    # the step-2 save (a new best) is still being written when step 4 evaluates a newer best: a slow disk
    gate = ["+callbacks.gate._target_=tests.hooks.GateCheckpointWriter", "+callbacks.gate.step=2"]
    gate += ["+callbacks.gate.until=4", f"+callbacks.gate.log={tmp_path / 'writes.jsonl'}"]
    done = run_train(*TINY, *overrides, *gate, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 1
    (line,) = done.stderr.splitlines()
    assert str(ckpts) in line and "step_00000004" in line and "needs about 1." in line and "MB" in line, line
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]  # no .step_*.tmp folder left
    out = summary(run_dir)
    assert out["status"] == "FAILED" and str(ckpts) in out["stop_reason"] and "space" in out["stop_reason"]
    assert out["checkpoint"] == out["best_checkpoint"] == str(ckpts / "step_00000002")
    verify_checkpoint(out["checkpoint"])


def test_a_short_disk_rotates_the_old_checkpoint_out_before_saving(tmp_path, small_disk, checkpoint_size):
    """keep_last=2: at step 6 the step-2 checkpoint would be rotated out after the save; deleted first, two fit."""
    disk = small_disk(int(2.5 * checkpoint_size))
    ckpts, run_dir = disk / "checkpoints", tmp_path / "run"
    overrides = ["checkpoint.every_n_steps=2", "checkpoint.keep_last=2", "checkpoint.keep_best=false"]
    done = run_train(
        *TINY, "stage.num_steps=6", *overrides, f"checkpoint.dir={ckpts}", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr
    assert summary(run_dir)["status"] == "FINISHED"
    assert [p.name for p in list_checkpoints(ckpts)] == ["step_00000004", "step_00000006"]
    assert "removed step_00000002 before saving" in done.stdout
    for path in list_checkpoints(ckpts):
        verify_checkpoint(path)


def start_train(tmp_path, *overrides, tracking: str | None = None) -> subprocess.Popen:
    """train.py in the background with Ctrl-C's default handling (a background job starts with SIGINT ignored);
    with `tracking` (a store URI), into MLflow."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    out, err = open(tmp_path / "stdout.txt", "w"), open(tmp_path / "stderr.txt", "w")
    tiny = [o for o in TINY if not o.startswith("tracking")] + [f"tracking.uri={tracking}"] if tracking else TINY
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *tiny, *overrides, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        stdout=out,
        stderr=err,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def wait_for(path, proc, timeout=60.0) -> None:
    deadline = time.time() + timeout
    while not path.exists():
        assert proc.poll() is None, (path.parent / "stderr.txt").read_text()
        assert time.time() < deadline, f"{path} never appeared"
        time.sleep(0.05)


PAUSE = "+callbacks.pause._target_=tests.hooks.PauseIn"


@pytest.mark.parametrize(
    "where,overrides,status,step,code",
    [
        ("start-up", ["+callbacks.pause.hook=on_build"], "KILLED", 0, 130),
        # the second interrupts at once, in the step's callbacks before its checkpoint: the ending is still written
        ("training", ["+callbacks.pause.hook=on_step_end", "+callbacks.pause.step=2"], "KILLED", 2, 130),
        # the final checkpoint (no other save: every_n_steps=0, keep_best=false), before the status is decided
        ("the final save", ["+callbacks.pause.hook=on_checkpoint", "+callbacks.pause.step=4"], "KILLED", 4, 130),
        # summary.json already says FINISHED: the run finished, and its ending (the MLflow close) still completes
        ("on_train_end", ["+callbacks.pause.hook=on_train_end"], "FINISHED", 4, 0),
    ],
)
def test_a_second_sigint_leaves_the_first_ones_ending_whole(tmp_path, where, overrides, status, step, code):
    assert interrupt_twice(tmp_path, overrides) == code, where
    stderr = (tmp_path / "stderr.txt").read_text()
    assert "Traceback" not in stderr, stderr
    if code:
        (line,) = stderr.splitlines()
        assert line.startswith(f"stopped by SIGINT at step {step}"), line
    out = summary(tmp_path / "run")
    assert (out["status"], out["step"]) == (status, step), out
    if status == "KILLED":
        assert "SIGINT" in out["stop_reason"]


def interrupt_twice(tmp_path, overrides, tracking: str | None = None) -> int:
    """Run train.py paused in a hook, send it SIGINT twice, let it go on; its exit status."""
    ready, release = tmp_path / "ready", tmp_path / "release"
    pause = [PAUSE, f"+callbacks.pause.ready={ready}", f"+callbacks.pause.release={release}", *overrides]
    proc = start_train(tmp_path, "checkpoint.every_n_steps=0", "checkpoint.keep_best=false", *pause, tracking=tracking)
    try:
        wait_for(ready, proc)
        for _ in range(2):
            proc.send_signal(signal.SIGINT)
            time.sleep(0.1)  # two deliveries, not one pending signal
        release.touch()
        return proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_run_interrupted_at_once_closes_its_mlflow_run_killed(tmp_path):
    from mlflow.tracking import MlflowClient

    store = f"sqlite:///{tmp_path}/mlflow.db"
    assert interrupt_twice(tmp_path, ["+callbacks.pause.hook=on_step_end", "+callbacks.pause.step=2"], store) == 130
    out = summary(tmp_path / "run")
    assert out["status"] == "KILLED" and out["mlflow_run_id"]
    assert MlflowClient(store).get_run(out["mlflow_run_id"]).info.status == "KILLED"


@pytest.mark.slow
def test_a_full_disk_under_two_fsdp_ranks_ends_in_one_line_and_keeps_the_valid_checkpoint(
    tmp_path, small_disk, checkpoint_size
):
    from .test_dist import torchrun

    disk = small_disk(int(1.9 * checkpoint_size))  # the sharded step-2 checkpoint (DCP: larger) fits, not step 4
    ckpts, run_dir = disk / "checkpoints", tmp_path / "run"
    overrides = ["hardware=fsdp", "hardware.device=cpu", "checkpoint.every_n_steps=2", "checkpoint.keep_last=0"]
    done = torchrun(*TINY, *overrides, f"checkpoint.dir={ckpts}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode != 0
    lines = [line for line in done.stderr.splitlines() if "no space left" in line]
    assert lines and all(str(ckpts) in line and "step_00000004" in line for line in lines), done.stderr[-3000:]
    assert not [line for line in done.stderr.splitlines() if line.startswith("[rank")], done.stderr[-3000:]
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_00000002"]  # no temporary folder left
    out = summary(run_dir)
    assert out["status"] == "FAILED" and "space" in out["stop_reason"]
    assert out["checkpoint"] == str(ckpts / "step_00000002")
    verify_checkpoint(out["checkpoint"])
