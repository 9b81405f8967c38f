"""Strict validation of the composed config, complete before anything is built or written."""

from __future__ import annotations

import dataclasses
import inspect
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("model", "optimizer", "scheduler", "data", "stage", "hardware", "tracking", "checkpoint")
INSTANTIATE_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
CONFIG_ERROR_EXIT = 2


class ConfigError(ValueError):
    """A config value is wrong; the message names the key."""


@dataclass(kw_only=True)
class SampleConfig:
    """Text generated from the trained model at the end of a run."""

    prompt: str = "def "
    max_new_tokens: int = 200
    temperature: float = 0.8
    top_k: int | None = 40

    def __post_init__(self):
        if self.max_new_tokens < 0:
            raise ValueError(f"sample.max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ValueError(f"sample.temperature={self.temperature} must be >= 0")


@dataclass(kw_only=True)
class NanConfig:
    """The `nan` node: what a non-finite or spiking loss does."""

    max_consecutive: int = 3  # bad steps in a row that are skipped before rolling back
    max_rollbacks: int = 2  # rollbacks before the run stops as FAILED
    lr_factor: float = 0.5  # the learning rate is multiplied by this at each rollback
    spike_threshold: float = 0.0  # a loss above mean + threshold * std of the recent window is a spike; 0 = off
    spike_window: int = 50

    def __post_init__(self):
        if self.max_consecutive < 0 or self.max_rollbacks < 0:
            raise ValueError("nan.max_consecutive and nan.max_rollbacks must be >= 0")
        if not 0 < self.lr_factor <= 1:
            raise ValueError(f"nan.lr_factor={self.lr_factor} must be in (0, 1]")
        if self.spike_threshold < 0 or self.spike_window < 2:
            raise ValueError("nan.spike_threshold must be >= 0 and nan.spike_window >= 2")


@dataclass(kw_only=True)
class EarlyStoppingConfig:
    """The `early_stopping` node: stop when val loss stops improving."""

    patience: int = 0  # evaluations without an improvement of min_delta before stopping; 0 = off
    min_delta: float = 0.0

    def __post_init__(self):
        if self.patience < 0 or self.min_delta < 0:
            raise ValueError("early_stopping.patience and early_stopping.min_delta must be >= 0")


@dataclass(kw_only=True)
class ResumeConfig:
    """Where a run continues from."""

    path: str | None = "auto"  # auto | a checkpoint folder | a run directory | null (start fresh)
    allow_config_change: bool = False

    def __post_init__(self):
        if self.path not in (None, "auto") and not Path(self.path).expanduser().exists():
            raise ValueError(
                f"resume.path={self.path} does not exist (use auto, a checkpoint folder or a run directory)"
            )


@dataclass(kw_only=True)
class RunConfig:
    """Run-level keys of conf/config.yaml, next to the groups."""

    seed: int = 0
    dry_run: bool = False
    run_name: str = "run"
    run_dir: str = "."
    resume: ResumeConfig = dataclasses.field(default_factory=ResumeConfig)
    nan: NanConfig = dataclasses.field(default_factory=NanConfig)
    early_stopping: EarlyStoppingConfig = dataclasses.field(default_factory=EarlyStoppingConfig)
    callbacks: dict[str, Any] = dataclasses.field(default_factory=dict)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)


@dataclass
class Validated:
    """The typed pieces validation produced, so the run builds from checked objects."""

    run: RunConfig
    stage: object  # an exp.stages.StageConfig subclass
    hardware: object  # exp.hardware.Hardware


def validate(cfg: DictConfig) -> Validated:
    """Check every key, type, value and interpolation; raise ConfigError naming the first problem."""
    _check_resolvable(cfg)
    known = set(GROUPS) | {f.name for f in dataclasses.fields(RunConfig)}
    for key in cfg:
        if key not in known:
            raise ConfigError(f"unknown key '{key}' at the top level (known: {', '.join(sorted(known))})")
    for group in GROUPS:
        if group not in cfg or not isinstance(cfg[group], DictConfig) or "_target_" not in cfg[group]:
            raise ConfigError(f"{group}: missing, or has no _target_")
    run_node = OmegaConf.masked_copy(cfg, [f.name for f in dataclasses.fields(RunConfig) if f.name in cfg])
    if "resume" in run_node and not isinstance(run_node.resume, DictConfig):  # resume=auto is resume.path=auto
        run_node.resume = {"path": run_node.resume}
    run = _typed("", RunConfig, run_node)
    stage = _typed("stage", get_object(cfg.stage._target_), _without_meta(cfg.stage))
    hardware = _typed("hardware", get_object(cfg.hardware._target_), _without_meta(cfg.hardware))
    for group in ("model", "optimizer", "scheduler", "data", "tracking", "checkpoint"):
        _check_signature(group, cfg[group])
    for name, node in cfg.callbacks.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"callbacks.{name}: needs a _target_ (an exp.loop.Callback subclass)")
        _check_signature(f"callbacks.{name}", node)
    _guard("hardware", lambda: hardware.torch_dtype(stage.dtype))
    _check_writable("checkpoint.dir", cfg.checkpoint.dir)
    _check_buildable(cfg, stage)
    return Validated(run=run, stage=stage, hardware=hardware)


def _check_resolvable(cfg: DictConfig) -> None:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=...)")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key}: {first_line(e)}") from None


def _without_meta(node: DictConfig) -> DictConfig:
    return OmegaConf.create(
        {k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in INSTANTIATE_KEYS}
    )


def _typed(group: str, schema: type, node: DictConfig):
    """Merge a group into its dataclass schema (unknown keys and wrong types fail) and run its checks."""
    prefix = f"{group}." if group else ""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), node)
        return OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        key = f"{prefix}{e.full_key}" if e.full_key else group
        raise ConfigError(f"{key}: {first_line(e)}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(_named(group, e)) from None


def _check_signature(group: str, node: DictConfig) -> None:
    """Keys of a `_target_` group must be parameters of the target, with numbers where numbers are expected."""
    try:
        target = get_object(node._target_)
    except Exception as e:  # hydra wraps import errors of every kind
        raise ConfigError(f"{group}._target_={node._target_!r} cannot be imported: {first_line(e)}") from None
    params = inspect.signature(target).parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in node:
        if key in INSTANTIATE_KEYS:
            continue
        if key not in params and not takes_any:
            raise ConfigError(
                f"{group}.{key}: not a parameter of {node._target_} "
                f"(known: {', '.join(k for k in params if k not in ('self', 'params', 'optimizer'))})"
            )
        default, value = params[key].default if key in params else None, node[key]
        if isinstance(default, bool) and not isinstance(value, bool):
            raise ConfigError(f"{group}.{key}={value!r} must be true or false")
        if (
            isinstance(default, (int, float))
            and not isinstance(default, bool)
            and (isinstance(value, bool) or not isinstance(value, (int, float)))
        ):
            raise ConfigError(f"{group}.{key}={value!r} must be a number")


def _check_writable(key: str, path: str) -> None:
    """The nearest existing ancestor of `path` must be a writable directory."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{key}={path} is not writable ({probe} refuses writes)")


def _check_buildable(cfg: DictConfig, stage=None) -> None:
    """Build what is cheap to build (model on the meta device, optimizer and scheduler on one dummy
    parameter, data without opening files) so constructor checks run now, before any side effect."""
    import torch

    with torch.device("meta"):
        _guard("model", lambda: instantiate(cfg.model))
    if stage is not None:
        _guard("stage", lambda: stage.check(OmegaConf.to_container(cfg.model, resolve=True)))
    dummy = torch.nn.Parameter(torch.zeros(1))
    optimizer = _guard("optimizer", lambda: instantiate(cfg.optimizer)([dummy]))
    _guard("scheduler", lambda: instantiate(cfg.scheduler)(optimizer))
    data = _guard("data", lambda: instantiate(cfg.data))
    _guard("data", data.check)


def _guard(group: str, build: Callable):
    try:
        return build()
    except ConfigError:
        raise
    except Exception as e:
        cause = e.__cause__ if type(e).__name__ == "InstantiationException" and e.__cause__ else e
        raise ConfigError(_named(group, cause)) from None


def _named(group: str, error: BaseException) -> str:
    """Prefix a constructor's message with its group unless it already names a key."""
    msg = first_line(error)
    head = msg.split("=", 1)[0].split(":", 1)[0]
    return msg if "." in head and " " not in head else f"{group}: {msg}"


def first_line(error: BaseException) -> str:
    """The first line of an error's message (its type name when empty)."""
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


def exit_on_config_error(error: ConfigError, run_dir: str | None = None) -> None:
    """One line on stderr, exit 2, and no run directory left behind holding only what Hydra wrote into it."""
    print(f"config error: {error}", file=sys.stderr)
    discard_untouched_run_dir(run_dir)
    sys.exit(CONFIG_ERROR_EXIT)


def discard_untouched_run_dir(run_dir: str | None) -> None:
    """Remove a run directory that holds only what Hydra put there before the job ran."""
    path = Path(run_dir) if run_dir else None
    if path is not None and path.is_dir() and {p.name for p in path.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(path, ignore_errors=True)


_job_started = False


def job_started() -> None:
    """Mark that Hydra composed the config and handed it to the job."""
    global _job_started
    _job_started = True


def run_cli(main: Callable) -> None:
    """Run a @hydra.main function; Hydra's own compose errors (exit 1 before the job starts) exit 2.

    `resume=auto` / `resume=PATH` on the command line are short for `resume.path=...`: `resume` is a node
    (it also holds allow_config_change), and Hydra cannot assign a string to a node.
    """
    sys.argv = [f"resume.path={a[len('resume=') :]}" if a.startswith("resume=") else a for a in sys.argv]
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _job_started:
            sys.exit(CONFIG_ERROR_EXIT)
        raise
