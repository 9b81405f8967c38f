"""The local Slurm cluster from scripts/slurm-local.sh: jobs run, and sacct reports how they ended.

These talk to the real daemons on localhost. As root, the module fixture runs the (idempotent)
start script, which brings the cluster up in a few seconds when it is down; as another user the
tests skip unless the cluster is already up.
"""

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytestmark = [
    pytest.mark.slurm,
    pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch: run scripts/slurm-local.sh"),
]

ROOT = Path(__file__).resolve().parents[2]
START = ROOT / "scripts" / "slurm-local.sh"
# sacct states after which a job's record no longer changes.
FINAL = (
    "COMPLETED",
    "FAILED",
    "CANCELLED",
    "TIMEOUT",
    "OUT_OF_MEMORY",
    "NODE_FAIL",
    "PREEMPTED",
    "BOOT_FAIL",
    "DEADLINE",
)


def sh(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout)


def cluster_answers() -> bool:
    try:
        node = sh("sinfo", "-h", "-n", "localhost", "-o", "%T", timeout=10)
        acct = sh("sacct", "-n", "-X", "-S", "now", timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return (
        node.returncode == 0
        and node.stdout.strip() in {"idle", "mixed", "allocated", "completing"}
        and acct.returncode == 0
    )


@pytest.fixture(scope="module", autouse=True)
def cluster():
    if os.geteuid() == 0:
        # Idempotent: ~0.1 s when the cluster is up. Cheaper than asking sinfo first, which
        # keeps retrying for ~10 s when slurmctld is down.
        proc = sh(str(START), timeout=300)
        assert proc.returncode == 0, f"slurm-local.sh failed:\n{proc.stdout}\n{proc.stderr}"
    elif not cluster_answers():
        pytest.skip("local Slurm cluster is down: run scripts/slurm-local.sh as root")


def sbatch(*args: str, cwd: Path, output: str = "%j.out") -> str:
    """Submits a batch job (output in cwd, killed after 2 minutes whatever happens) and returns its id."""
    proc = sh(
        "sbatch",
        "--parsable",
        "--job-name=exp-slurm-test",
        "--time=2",
        f"--chdir={cwd}",
        f"--output={cwd}/{output}",
        *args,
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().split(";")[0]


def sacct_rows(job_id: str) -> dict[str, tuple[str, str]]:
    """{JobID: (State, ExitCode)} for the job (each array task is one row), allocations only."""
    proc = sh("sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State,ExitCode")
    assert proc.returncode == 0, proc.stderr
    rows = (line.split("|") for line in proc.stdout.splitlines() if line.strip())
    return {job: (state, code) for job, state, code in rows}


def wait_final(job_id: str, count: int = 1, timeout: float = 20) -> dict[str, tuple[str, str]]:
    """Polls sacct until `count` records of the job have reached a final state."""
    deadline = time.monotonic() + timeout
    while True:
        rows = sacct_rows(job_id)
        # An array job has a placeholder row like "12_[0-1]" while tasks are still pending.
        if len(rows) == count and all(state.startswith(FINAL) for state, _ in rows.values()):
            return rows
        if time.monotonic() > deadline:
            pytest.fail(f"job {job_id} not finished in sacct after {timeout} s: {rows}")
        time.sleep(0.2)


def test_trivial_job_completes(tmp_path):
    job = sbatch("--wrap", "echo hello from $SLURM_JOB_ID", cwd=tmp_path)
    assert wait_final(job) == {job: ("COMPLETED", "0:0")}
    assert (tmp_path / f"{job}.out").read_text().strip() == f"hello from {job}"


def test_failing_job_exit_code(tmp_path):
    job = sbatch("--wrap", "exit 3", cwd=tmp_path)
    assert wait_final(job) == {job: ("FAILED", "3:0")}


def test_job_array_tasks_complete_side_by_side(tmp_path):
    # The node was free: cons_tres + CR_Core_Memory + DefMemPerCPU must let both 1-CPU tasks run at once.
    node_free = sh("squeue", "-h", "-o", "%i").stdout.strip() == ""
    # Each task leaves a mark, then waits up to 10 s for its sibling's mark: "together" if both ran at once.
    script = (
        "touch mark.$SLURM_ARRAY_TASK_ID; other=mark.$((1 - SLURM_ARRAY_TASK_ID)); result=alone; "
        "for i in $(seq 100); do if [ -e $other ]; then result=together; break; fi; sleep 0.1; done; "
        "echo $result"
    )
    job = sbatch("--array=0-1", "--cpus-per-task=1", "--wrap", script, cwd=tmp_path, output="%A_%a.out")
    rows = wait_final(job, count=2, timeout=40)
    assert rows == {f"{job}_0": ("COMPLETED", "0:0"), f"{job}_1": ("COMPLETED", "0:0")}
    results = [(tmp_path / f"{job}_{i}.out").read_text().strip() for i in (0, 1)]
    if node_free:
        assert results == ["together", "together"]


def test_scancel_running_job_is_cancelled(tmp_path):
    job = sbatch("--wrap", "sleep 300", cwd=tmp_path)
    try:
        deadline = time.monotonic() + 20
        while sh("squeue", "-h", "-j", job, "-o", "%T").stdout.strip() != "RUNNING":
            assert time.monotonic() < deadline, "sleep job never started"
            time.sleep(0.2)
    finally:
        assert sh("scancel", job).returncode == 0
    ((state, _),) = wait_final(job).values()
    assert state.startswith("CANCELLED")  # "CANCELLED by 0"


@pytest.mark.skipif(os.geteuid() != 0, reason="slurm-local.sh runs as root")
def test_start_script_is_idempotent():
    for _ in range(2):
        start = time.monotonic()
        proc = sh(str(START), timeout=120)
        took = time.monotonic() - start
        assert proc.returncode == 0, proc.stderr
    # The cluster was up already (module fixture): both runs only check it.
    assert took < 5, f"second run took {took:.1f} s"
    assert proc.stdout.startswith("slurm-local: up (partition debug"), proc.stdout
