"""exp's sweep launchers, where Hydra looks for plugins; the logic lives in exp.launch."""

import shutil
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher as _HydraBasicLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocal
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm

from exp.launch import ValidatedSweep, mark_unsubmitted, refuse
from exp.text import first_line


class BasicLauncher(ValidatedSweep, _HydraBasicLauncher):
    """Runs the points one after another in this process (`hydra/launcher=exp_basic`, the default)."""


class LocalLauncher(ValidatedSweep, _SubmititLocal):
    """Runs the points as local subprocesses through submitit (`hydra/launcher=exp_local`)."""


class SlurmLauncher(ValidatedSweep, _SubmititSlurm):
    """Submits the points as a SLURM job array through submitit (`hydra/launcher=exp_slurm`, `hardware=slurm_*`)."""

    jobs_run_here = False  # a GPU job submitted from a login node without one: each job checks its node

    def _preflight(self, sweep_dir: Path) -> None:
        if shutil.which("sbatch") is None:
            refuse(
                sweep_dir,
                "hydra/launcher=exp_slurm needs Slurm's sbatch, which is not on this machine; "
                "hydra/launcher=exp_local runs the same jobs here",
            )

    def launch(self, job_overrides, initial_job_idx):
        try:
            return super().launch(job_overrides, initial_job_idx)
        except Exception as e:  # sbatch refused the request (partition, resources): say what it said
            text = str(e)
            if "sbatch" not in text and "Submission" not in text:
                raise
            detail = next((line for line in text.splitlines() if "error" in line.lower()), first_line(e))
            mark_unsubmitted(Path(str(self.config.hydra.sweep.dir)))
            print(f"error: SLURM refused the job array: {detail.strip()}", flush=True)
            raise SystemExit(2) from None
