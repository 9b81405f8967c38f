"""What the job service's routes accept and answer (pydantic): strict bodies, so an unknown field is a 422."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import Path as PathParam
from pydantic import BaseModel, ConfigDict, Field

import exp.serve.configs as configs

ID = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_]{1,64}$", description="an id the service gave out")]
CHECKPOINT_ID = Annotated[str, PathParam(pattern=r"^[A-Za-z0-9_]{1,64}-[0-9]{1,12}$", description="JOBID-STEP")]
Override = Annotated[str, Field(min_length=1, max_length=configs.MAX_OVERRIDE_CHARS)]
Overrides = Annotated[list[Override], Field(max_length=configs.MAX_OVERRIDES)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ConfigIn(Strict):
    name: str = Field(min_length=1, max_length=200)
    overrides: Overrides = []


class SlurmResources(Strict):
    partition: str | None = Field(None, max_length=100)
    account: str | None = Field(None, max_length=100)
    qos: str | None = Field(None, max_length=100)
    constraint: str | None = Field(None, max_length=200)
    cpus_per_task: int | None = Field(None, ge=1, le=1024)
    mem_gb: int | None = Field(None, ge=1, le=4096)
    timeout_min: int | None = Field(None, ge=1, le=60 * 24 * 30)
    gpus_per_node: int | None = Field(None, ge=0, le=64)
    nodes: int | None = Field(None, ge=1, le=1024)
    tasks_per_node: int | None = Field(None, ge=1, le=64, description="processes per node: DDP/FSDP ranks")


class StartIn(Strict):
    config_id: str | None = Field(None, pattern=r"^[A-Za-z0-9_]{1,64}$")
    overrides: Overrides = []  # added after the stored config's, when both are given
    run_name: str | None = Field(
        None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="the run's name (run_name=): the dashboard's"
    )
    launcher: Literal["local", "slurm"] = "local"
    slurm: SlurmResources = SlurmResources()
    force: bool = Field(False, description="start it even while a job with the same overrides runs")


class ResumeIn(Strict):
    step: int | None = Field(None, ge=0, description="checkpoint step to resume from; the newest valid when absent")
    overrides: Overrides = []  # allowed changes, e.g. stage.num_steps=600 (needs allow_config_change)
    allow_config_change: bool = False
    slurm: SlurmResources | None = None  # changes to the SLURM resources the job was started with (a longer time)
    force: bool = Field(False, description="resume a FINISHED job without more steps (runs its end again)")


class ProfileIn(Strict):
    steps: int = Field(5, ge=1, le=1000, description="profile this many steps, from the next one")


class RelaunchIn(Strict):
    force: bool = Field(False, description="relaunch even while the sweep's process or a trial still runs")


class SearchIn(Strict):
    """exp's Optuna sweeper (hydra/sweeper=optuna) over the overrides' search space."""

    n_trials: int = Field(20, ge=1, le=1000)
    parallelism: int = Field(1, ge=1, le=64, description="trials in flight (local subprocesses or SLURM jobs)")
    sampler: Literal["tpe", "random", "cmaes", "grid"] = "tpe"
    pruner: Literal["none", "median", "successive_halving", "hyperband"] = "none"
    direction: Literal["minimize", "maximize"] = "minimize"
    seed: int | None = Field(None, ge=0, le=2**31 - 1, description="the sampler's seed")


class SweepIn(Strict):
    overrides: Overrides = []  # a grid (KEY=a,b,c, range()) or, with `search`, a search space (interval(), ...)
    launcher: Literal["local", "slurm"] = "local"
    search: SearchIn | None = None  # an Optuna study; without it, the grid's every point, each validated first


class Started(BaseModel):
    job_id: str
    run_dir: str
    mlflow_run_id: str | None
