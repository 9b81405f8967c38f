"""Multi-stage pipelines: each stage is a full run in <run_dir>/<stage>, composed from conf/ with its overrides."""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import DictConfig, OmegaConf, open_dict

from exp import config
from exp.errors import Stopped
from exp.paths import CONF_DIR
from exp.rundir import read_summary, write_summary
from exp.tracking.parent import ParentRun, open_parent_run

log = logging.getLogger("exp")


def run_pipeline(cfg: DictConfig, train: Callable[[DictConfig], float]) -> float:
    """Run the stages in order with `train` (exp.run.train), skipping finished ones; returns the last stage's
    validation loss."""

    root = Path(cfg.run_dir)
    compose_stages(cfg)  # every stage is composed and validated before the first one trains
    root.mkdir(parents=True, exist_ok=True)
    user = _stage_overrides()
    stages = list(cfg.pipeline.stages.items())
    parent = open_parent_run(cfg, root, kind="pipeline")
    status, results = "FAILED", {}
    try:
        for name, spec in stages:
            stage_dir = root / name
            done = _finished(stage_dir)
            if done:
                log.info(f"pipeline: stage {name} finished before (val loss {done['val_loss']:.4f}); skipping")
                results[name] = done
                continue
            log.info(f"pipeline: stage {name} in {stage_dir}")
            stage_cfg = _compose_stage(root, name, spec, user, results, parent_run_id=parent.run_id)
            train(stage_cfg)
            results[name] = read_summary(stage_dir)
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Stopped:
        status = "KILLED"
        raise
    finally:
        _write_summary(root, results, status, parent)
        parent.end(status)
    return results[stages[-1][0]]["val_loss"]


def compose_stages(cfg: DictConfig) -> dict[str, DictConfig]:
    """Each stage's config, validated (a teacher not trained yet is checked through its model config).

    Validation includes each stage's data check (records parsed, token ids and lengths checked), so
    bad data in the last stage stops the pipeline before the first stage trains.
    """
    root, user, composed = Path(cfg.run_dir), _stage_overrides(), {}
    for name, spec in cfg.pipeline.stages.items():
        composed[name] = _compose_stage(root, name, spec, user, composed, for_validation=True)
        try:
            config.validate(composed[name])
        except config.ConfigError as e:  # the same key can be fine in one stage and wrong in another
            raise config.ConfigError(f"{e} (pipeline stage {name})") from None
    return composed


def _stage_overrides() -> list[str]:
    """The command line's overrides, less the pipeline's own: they apply to every stage."""
    try:
        from hydra.core.hydra_config import HydraConfig

        task = list(HydraConfig.get().overrides.task)
    except ValueError:  # composed outside @hydra.main (tests): no command line to carry over
        task = []
    return [o for o in task if not o.lstrip("+~").startswith("pipeline")]


def _compose_stage(
    root: Path,
    name: str,
    spec: DictConfig,
    user: list[str],
    composed: dict,
    parent_run_id: str | None = None,
    for_validation: bool = False,
) -> DictConfig:
    """The config of one stage: the user's overrides, then the stage's, then its links to earlier stages."""
    for key in ("teacher", "init_from"):
        if spec.get(key) and spec[key] not in composed:
            raise config.ConfigError(f"pipeline.stages.{name}.{key}={spec[key]} is not an earlier stage")
    overrides = [
        *user,
        *spec.get("overrides", []),
        *spec.get("extra", []),
        f"run_dir={root / name}",
        f"run_name={name}",
    ]
    if spec.get("init_from") and not for_validation:
        overrides.append(f"stage.init_from={root / spec.init_from}")
    if GlobalHydra.instance().is_initialized():
        cfg = compose(config_name="config", overrides=overrides)
    else:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
            cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        if spec.get("teacher"):
            if for_validation:  # the teacher has not trained yet: check the student against its config instead
                cfg.stage.teacher.path = None
                cfg.stage.teacher.model = OmegaConf.to_container(composed[spec.teacher].model, resolve=True)
            else:
                cfg.stage.teacher.path = str(root / spec.teacher)
        if spec.get("init_from") and for_validation and "reference" in cfg.stage:
            # DPO's reference is the earlier stage's model, not trained yet: checked against its config instead
            cfg.stage.reference.model = OmegaConf.to_container(composed[spec.init_from].model, resolve=True)
        if parent_run_id and "parent_run_id" in cfg.tracking:
            cfg.tracking.parent_run_id = parent_run_id
    return cfg


def _finished(stage_dir: Path) -> dict | None:
    summary = read_summary(stage_dir)
    if summary is None:
        return None
    return summary if summary.get("status") == "FINISHED" and summary["step"] == summary["num_steps"] else None


def _write_summary(root: Path, results: dict, status: str, parent: ParentRun) -> None:
    """summary.json: each stage's result, and the MLflow parent run as a single run's summary names its run."""
    summary = {
        "status": status,
        "mlflow_tracking_uri": parent.uri,
        "mlflow_run_id": parent.run_id,
        "stages": {
            n: {k: s.get(k) for k in ("status", "step", "val_loss", "initial_val_loss", "checkpoint", "mlflow_run_id")}
            for n, s in results.items()
        },
    }
    last = list(results.values())[-1] if results else {}
    if last.get("initial_val_loss") is not None:  # what the last stage (SFT) gained on held-out data
        summary["final_stage_val_loss_before"] = last["initial_val_loss"]
        summary["final_stage_val_loss_after"] = last["val_loss"]
    write_summary(root, summary)
