"""Sweep launching: every point validated before anything is submitted, a manifest, an MLflow parent run.

The launchers (hydra_plugins/exp_launcher: Hydra only loads plugins from that namespace) are Hydra's basic
launcher and the submitit launchers (local, SLURM) with this layer in front of `launch`, selected by
`hydra/launcher=exp_basic|exp_local|exp_slurm`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from exp import config
from exp.rundir import read_summary, write_json
from exp.text import first_line

log = logging.getLogger("exp")
MANIFEST = "sweep.json"
_launched: list[Path] = []  # sweep directories this process launched into (exp.cli reports their failures)


def launched_sweeps() -> list[Path]:
    """The sweep directories this process launched trials into, in order, each once."""
    return list(dict.fromkeys(_launched))


def failed_trials_message(sweep_dir: Path) -> str | None:
    """`N of M trials FAILED` and where to look, or None when none failed."""
    manifest = read_manifest(sweep_dir) or {"trials": {}}
    trials = manifest["trials"].values()
    failed = sum(t.get("status") == "FAILED" for t in trials)
    if not failed:
        return None
    return f"{failed} of {len(trials)} trials FAILED: python -m exp.sweep status {sweep_dir}"


class ValidatedSweep:
    """Validates every point of a batch in this process, records the batch, then hands it to the launcher."""

    # whether the jobs run on this machine, so that its device and dtype are theirs to check here
    jobs_run_here = True

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int):
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        run_dirs, tracked = self._validate(job_overrides, initial_job_idx, sweep_dir)
        self._preflight(sweep_dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        parent = self._parent_run(sweep_dir) if tracked else None
        if parent is not None:
            job_overrides = [[*o, f"tracking.parent_run_id={parent[1]}"] for o in job_overrides]
        manifest = read_manifest(sweep_dir) or new_manifest(sweep_dir, self.config, parent)
        for i, overrides in enumerate(job_overrides):
            manifest["trials"][str(initial_job_idx + i)] = {
                "num": initial_job_idx + i,
                "overrides": [o for o in overrides if not o.startswith("tracking.parent")],
                "run_dir": str(run_dirs[i]),
                "status": "PENDING",
            }
        write_manifest(sweep_dir, manifest)
        _launched.append(sweep_dir)
        try:
            results = super().launch(job_overrides, initial_job_idx)
        finally:
            manifest = refresh_manifest(sweep_dir)
            if parent is not None:
                parent[0].set_terminated(parent[1], "FINISHED")
        failed = [t for t in manifest["trials"].values() if t["status"] == "FAILED"]
        for trial in failed:
            log.error(f"trial #{trial['num']} ({' '.join(trial['overrides'])}) FAILED: {trial.get('error')}")
        return results

    def _validate(self, job_overrides, initial_job_idx: int, sweep_dir: Path) -> tuple[list[Path], bool]:
        hydra_config = HydraConfig.instance().cfg
        run_dirs, tracked = [], False
        try:
            for i, overrides in enumerate(job_overrides):
                label = f"sweep point #{initial_job_idx + i} ({' '.join(overrides)})"
                try:
                    cfg = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
                    with open_dict(cfg):
                        cfg.hydra.job.num = initial_job_idx + i
                        run_dir = sweep_dir / str(cfg.hydra.sweep.subdir)
                    HydraConfig.instance().set_config(cfg)  # ${hydra:...} in the task config resolves as in the job
                    task = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
                    task.run_dir = str(run_dir)
                    config.validate(task, node=self.jobs_run_here)
                except config.ConfigError as e:
                    refuse(sweep_dir, f"{label}: {e}")
                except Exception as e:  # a point that does not even compose
                    refuse(sweep_dir, f"{label}: {first_line(e)}")
                run_dirs.append(run_dir)
                tracked = "parent_run_id" in task.tracking
        finally:
            if hydra_config is not None:
                HydraConfig.instance().set_config(hydra_config)
        return run_dirs, tracked

    def _preflight(self, sweep_dir: Path) -> None:
        """Launcher-specific checks that must fail before anything is submitted."""

    def _parent_run(self, sweep_dir: Path):
        from exp.tracking import open_parent_run

        try:
            return open_parent_run(self.config, sweep_dir, kind="sweep")
        except Exception as e:
            log.warning(
                f"MLflow at {self.config.tracking.uri} is unavailable ({first_line(e)}); "
                "trials are tracked without a parent run"
            )
            return None


def refuse(sweep_dir: Path, message: str) -> None:
    """A bad point: one line, exit 2, and no sweep directory left holding only Hydra's multirun.yaml."""
    print(f"config error: {message}", flush=True)
    if sweep_dir.is_dir() and {p.name for p in sweep_dir.iterdir()} <= {"multirun.yaml"}:
        shutil.rmtree(sweep_dir, ignore_errors=True)
    raise SystemExit(config.CONFIG_ERROR_EXIT)


# --- the manifest -----------------------------------------------------------------------------------


def new_manifest(sweep_dir: Path, cfg: DictConfig, parent) -> dict:
    hydra_cfg = HydraConfig.get()
    return {
        "sweep_dir": str(sweep_dir.resolve()),
        "created": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "overrides": list(hydra_cfg.overrides.task),
        "launcher": str(cfg.hydra.launcher._target_),
        "mlflow_tracking_uri": str(cfg.tracking.uri) if parent else None,
        "mlflow_parent_run_id": parent[1] if parent else None,
        "trials": {},
    }


def read_manifest(sweep_dir) -> dict | None:
    path = Path(sweep_dir) / MANIFEST
    return json.loads(path.read_text()) if path.exists() else None


def write_manifest(sweep_dir, manifest: dict) -> None:
    write_json(Path(sweep_dir) / MANIFEST, manifest)


def mark_unsubmitted(sweep_dir: Path) -> None:
    """Trials of a batch the scheduler refused are NOT_SUBMITTED, not PENDING."""
    manifest = read_manifest(sweep_dir)
    for trial in manifest["trials"].values():
        if trial["status"] == "PENDING":
            trial["status"] = "NOT_SUBMITTED"
    write_manifest(sweep_dir, manifest)


# what sweep.json keeps of each trial's summary.json
SUMMARY_KEYS = ("status", "val_loss", "step", "num_steps", "tokens_per_s", "mlflow_run_id", "slurm_job_id", "error")


def refresh_trial(trial: dict, run_dir) -> None:
    """A trial's status, losses, MLflow run and SLURM job, from its run directory."""
    summary = read_summary(run_dir)
    if summary is not None:
        trial.update({k: summary.get(k) for k in SUMMARY_KEYS})
    elif (Path(run_dir) / "metrics.jsonl").exists():
        trial["status"] = "RUNNING"  # started, no summary yet: running, or killed without one


def refresh_manifest(sweep_dir) -> dict:
    """Each trial refreshed from its run directory (refresh_trial); written back."""
    manifest = read_manifest(sweep_dir)
    for trial in manifest["trials"].values():
        refresh_trial(trial, trial["run_dir"])
    write_manifest(sweep_dir, manifest)
    return manifest
