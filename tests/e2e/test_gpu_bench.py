"""bench/bench_gpu.py's CPU mode: the GPU benchmark's every line but the device, so a lent GPU's run is a formality."""

import subprocess
import sys

from ..conftest import ROOT


def test_the_gpu_benchmark_runs_in_its_cpu_mode(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--cpu", "--steps", "3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert sum(" bare loop " in line for line in lines) == 2 and sum(" train.py " in line for line in lines) == 2
    assert sum(line.strip().startswith("ratio") for line in lines) == 2
