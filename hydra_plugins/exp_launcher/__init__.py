"""exp's sweep launchers, where Hydra looks for plugins: Hydra's and submitit's launchers behind exp.sweep.launch."""

# Hydra's basic launcher has no public import path: this shim is exp's one use of hydra._internal.
from hydra._internal.core_plugins.basic_launcher import BasicLauncher as _HydraBasicLauncher
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher as _SubmititLocal
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurm

from exp.sweep.launch import SlurmSweep, SubmititSweep, ValidatedSweep


class BasicLauncher(ValidatedSweep, _HydraBasicLauncher):
    """Runs the points one after another in this process (`hydra/launcher=exp_basic`, the default)."""


class LocalLauncher(SubmititSweep, _SubmititLocal):
    """Runs the points as local subprocesses through submitit (`hydra/launcher=exp_local`)."""


class SlurmLauncher(SlurmSweep, _SubmititSlurm):
    """Submits the points as a SLURM job array through submitit (`hydra/launcher=exp_slurm`, `hardware=slurm_*`)."""
