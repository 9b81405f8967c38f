"""The end-to-end cases of tests/unit/test_checkpoint.py: those that start a process or run a training
job."""

import os
import signal
import subprocess
import sys
from pathlib import Path

from exp.checkpoint import (
    latest_valid_checkpoint,
    list_checkpoints,
    verify_checkpoint,
)
from exp.rundir import RunLock

from ..conftest import ROOT
from ..unit.test_checkpoint import make, save  # noqa: F401

CHILD = """
import sys, time
from pathlib import Path
import torch
from exp import optim, schedules
from exp.checkpoint import save_checkpoint
from exp.rundir import RunLock
from exp.model import GPT
from exp.rundir import RunLock

root = Path(sys.argv[1])
lock = RunLock(root.parent).acquire()
model = GPT(vocab_size=264, seq_len=16, n_layer=2, n_head=2, d_model=32)
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
kw = dict(model=model, optimizer=opt, scheduler=schedules.cosine(opt, 10), trainer_state={}, config_yaml="")
save_checkpoint(root, 1, **kw)

def hang(tmp):
    print(tmp, flush=True)
    time.sleep(30)

save_checkpoint(root, 2, before_rename=hang, **kw)
"""


def test_sigkill_mid_save_leaves_previous_checkpoint_and_frees_the_lock(tmp_path):
    run_dir = tmp_path / "run"
    root = run_dir / "checkpoints"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(root)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        tmp = Path(proc.stdout.readline().strip())  # printed from inside before_rename, just before it sleeps
        assert tmp.name == f".step_00000002.tmp-{proc.pid}" and tmp.is_dir()
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
    assert proc.returncode == -signal.SIGKILL
    assert list_checkpoints(root) == [root / "step_00000001"]
    verify_checkpoint(root / "step_00000001")
    warnings = []
    assert latest_valid_checkpoint(root, warn=warnings.append) == root / "step_00000001" and warnings == []

    with RunLock(run_dir):  # the kernel dropped the dead process's lock
        model, opt, sched = make()
        save(root, 2, model, opt, sched)
    assert sorted(p.name for p in root.iterdir()) == ["step_00000001", "step_00000002"]  # debris removed
