"""The end-to-end cases of tests/unit/test_extend_data.py: those that start a process or run a training
job."""

import json

import numpy as np
import torch

from ..conftest import run_train
from ..unit.test_extend_data import RUN, final  # noqa: F401


def run(tmp_path, name, *overrides):
    run_dir = tmp_path / name
    proc = run_train(*RUN, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    return proc, run_dir


def test_a_plain_dataset_trains_and_resumes_exactly_through_train_py(tmp_path):
    proc, straight = run(tmp_path, "straight")
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary, weights, losses = final(straight)
    assert summary["status"] == "FINISHED" and summary["step"] == 6 and np.isfinite(summary["val_loss"])
    assert (
        summary["data"]["dataset"] == "tests.unit.test_extend_data.MyDataset" and summary["data"]["num_val_items"] > 0
    )

    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=3"]
    proc, resumed = run(tmp_path, "resumed", *stop)
    assert json.loads((resumed / "summary.json").read_text())["status"] == "KILLED", proc.stderr[-3000:]
    proc, _ = run(tmp_path, "resumed")  # resume=auto is the default; callbacks may change at a resume
    assert proc.returncode == 0 and "at step 3" in proc.stderr + proc.stdout, proc.stderr[-3000:]
    summary2, weights2, losses2 = final(resumed)
    assert summary2["val_loss"] == summary["val_loss"] and summary2["train_loss"] == summary["train_loss"]
    assert losses2 == losses
    assert weights2.keys() == weights.keys() and all(torch.equal(weights[k], weights2[k]) for k in weights)


def test_a_bad_dataset_exits_2_with_one_line_naming_data_dataset(tmp_path):
    proc, run_dir = run(tmp_path, "run", "+data.dataset.num_items=0")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert lines == ["config error: data.dataset: tests.unit.test_extend_data.MyDataset is empty"], proc.stderr
    assert not run_dir.exists()
