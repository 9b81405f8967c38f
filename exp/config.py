"""Strict validation of the composed config, complete before anything is built or written."""

from __future__ import annotations

import dataclasses
import inspect
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

GROUPS = ("model", "optimizer", "scheduler", "data", "stage", "hardware", "tracking")
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
class RunConfig:
    """Run-level keys of conf/config.yaml, next to the groups."""

    seed: int = 0
    dry_run: bool = False
    run_name: str = "run"
    run_dir: str = "."
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
    run = _typed("", RunConfig, run_node)
    stage = _typed("stage", get_object(cfg.stage._target_), _without_meta(cfg.stage))
    hardware = _typed("hardware", get_object(cfg.hardware._target_), _without_meta(cfg.hardware))
    for group in ("model", "optimizer", "scheduler", "data", "tracking"):
        _check_signature(group, cfg[group])
    _guard("hardware", lambda: hardware.torch_dtype(stage.dtype))
    _check_buildable(cfg)
    return Validated(run=run, stage=stage, hardware=hardware)


def _check_resolvable(cfg: DictConfig) -> None:
    try:
        missing = sorted(OmegaConf.missing_keys(cfg))
        if missing:
            raise ConfigError(f"{missing[0]} is required but not set (e.g. {missing[0]}=...)")
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as e:
        raise ConfigError(f"{e.full_key}: {_first_line(e)}") from None


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
        raise ConfigError(f"{key}: {_first_line(e)}") from None
    except (ValueError, TypeError) as e:
        raise ConfigError(_named(group, e)) from None


def _check_signature(group: str, node: DictConfig) -> None:
    """Keys of a `_target_` group must be parameters of the target, with numbers where numbers are expected."""
    try:
        target = get_object(node._target_)
    except Exception as e:  # hydra wraps import errors of every kind
        raise ConfigError(f"{group}._target_={node._target_!r} cannot be imported: {_first_line(e)}") from None
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


def _check_buildable(cfg: DictConfig) -> None:
    """Build what is cheap to build (model on the meta device, optimizer and scheduler on one dummy
    parameter, data without opening files) so constructor checks run now, before any side effect."""
    import torch

    with torch.device("meta"):
        _guard("model", lambda: instantiate(cfg.model))
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
    msg = _first_line(error)
    head = msg.split("=", 1)[0].split(":", 1)[0]
    return msg if "." in head and " " not in head else f"{group}: {msg}"


def _first_line(error: BaseException) -> str:
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
    """Run a @hydra.main function; Hydra's own compose errors (exit 1 before the job starts) exit 2."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _job_started:
            sys.exit(CONFIG_ERROR_EXIT)
        raise
