"""The end-to-end cases of tests/unit/test_rundir.py: those that start a process or run a training
job."""

import os
import socket
import subprocess
import sys

import pytest

from exp.rundir import (
    RunDirInUse,
    RunLock,
)

from ..conftest import ROOT

LOCKER = """
import sys
from exp.rundir import RunDirInUse, RunLock
try:
    RunLock(sys.argv[1]).acquire()
except RunDirInUse as e:
    print(e)
    sys.exit(3)
"""


def test_run_lock_refuses_second_holder_and_can_be_retaken(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = f"host={socket.gethostname()} pid={os.getpid()}"
    with RunLock(tmp_path):
        assert (tmp_path / ".lock").read_text().strip() == holder
        r = subprocess.run([sys.executable, "-c", LOCKER, str(tmp_path)], capture_output=True, text=True, env=env)
        assert r.returncode == 3, r.stderr
        assert r.stdout.strip() == f"run directory {tmp_path} is in use by {holder} (lock {tmp_path / '.lock'})"
        with pytest.raises(RunDirInUse, match="is in use by"):
            RunLock(tmp_path).acquire()  # flock is per open file, so this process is refused too
    with RunLock(tmp_path):
        pass
