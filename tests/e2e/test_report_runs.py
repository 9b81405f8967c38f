"""The end-to-end cases of tests/unit/test_report.py: those that start a process or run a training
job."""

import json
import os
import subprocess
import sys

from exp.sweep import cli as sweep
from exp.sweep import report

from ..conftest import ROOT, run_train
from ..unit.test_report import grid_sweep, table_rows  # noqa: F401


def test_a_trial_is_running_while_its_trainer_holds_the_lock_and_killed_once_it_dies(grid_sweep, capsys):
    """No summary: RUNNING while a live process holds the run dir's lock; SIGKILLed, it is KILLED and rerun."""
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from exp.rundir import RunLock; RunLock(sys.argv[1]).acquire(); "
         "print('held', flush=True); time.sleep(120)", str(grid_sweep / "3")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "held"
        assert sweep.main(["status", str(grid_sweep)]) == 0
        assert capsys.readouterr().out.splitlines()[-1] == "5 trials: 1 FAILED, 3 FINISHED, 1 RUNNING"
        assert sweep.main(["rerun-failed", str(grid_sweep), "--dry-run"]) == 0
        assert "trial 3" not in capsys.readouterr().out
    finally:
        holder.kill()
        holder.wait()
    assert sweep.main(["status", str(grid_sweep)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "5 trials: 1 FAILED, 3 FINISHED, 1 KILLED"
    assert out[4].split()[:2] == ["3", "KILLED"] and out[4].endswith("(SIGKILL, node failure or out of memory)")
    assert json.loads((grid_sweep / "sweep.json").read_text())["trials"]["3"]["status"] == "KILLED"


def test_rerun_failed_reruns_only_the_failed_trial_of_a_real_sweep(tmp_path, capsys):
    sweep_dir = tmp_path / "sw"
    proc = run_train(
        "-m",
        "model.n_layer=1",
        "model.d_model=32",
        "model.seq_len=32",
        "stage.num_steps=10",
        "stage.log_every_n_steps=5",
        "stage.eval_every_n_steps=5",
        "hardware=cpu",
        "sample.max_new_tokens=0",
        "tracking=none",
        "nan.max_rollbacks=0",
        "+callbacks.p._target_=tests.hooks.PoisonWeightsAt",
        "+callbacks.p.step=2,100",
        f"hydra.sweep.dir={sweep_dir}",
        cwd=tmp_path,
    )
    # every trial ran; one FAILED, so the sweep exits 1 with one line saying where to look
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == f"1 of 2 trials FAILED: python -m exp.sweep status {sweep_dir}"
    assert report.main([str(sweep_dir)]) == 0
    header, first, second = table_rows(capsys.readouterr().out)[:3]
    assert first[:3] == ["1", "1", "100"] and first[-1] == "FINISHED"
    assert second[:3] == ["-", "0", "2"] and "FAILED: TrainingFailed:" in " ".join(second)
    failed, finished = sweep_dir / "0" / "summary.json", sweep_dir / "1" / "summary.json"
    before = {p: p.stat().st_mtime_ns for p in (failed, finished, *sweep_dir.glob("1/checkpoints/*/*"))}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rerun = subprocess.run(
        [sys.executable, "-m", "exp.sweep", "rerun-failed", str(sweep_dir)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 1, rerun.stderr[-3000:]  # the rerun trial FAILED again
    said = [line for line in rerun.stdout.splitlines() if line.startswith("trial ")]
    assert said[0].startswith("trial 0 (FAILED) -> ") and all(line.startswith("trial 0") for line in said)
    assert failed.stat().st_mtime_ns > before[failed]  # rerun: the poison is in its overrides, so FAILED again
    assert all(p.stat().st_mtime_ns == t for p, t in before.items() if p != failed)
    manifest = json.loads((sweep_dir / "sweep.json").read_text())
    (relaunch,) = manifest["relaunches"]
    assert relaunch["mode"] == "rerun-failed" and relaunch["trials"] == [0] and relaunch["returncodes"] == [1]
    assert f"hydra.sweep.subdir={sweep_dir / '0'}" in relaunch["commands"][0]
    assert [manifest["trials"][n]["status"] for n in ("0", "1")] == ["FAILED", "FINISHED"]
