"""Strict validation of the composed config, complete before anything is built or written."""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import tempfile
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException

from exp.errors import ConfigError
from exp.targets import Allowlist
from exp.text import first_line

GROUPS = ("model", "optimizer", "scheduler", "data", "stage", "hardware", "tracking", "checkpoint")
# keys exp reads itself, not parameters of the group's _target_: component() leaves them out of what is built
# model.tokenizer: model=hf's; model.adapter: LoRA (exp.model.adapters)
EXP_KEYS = {"model": ("freeze", "recipe", "tokenizer", "adapter"), "optimizer": ("param_groups",)}
INSTANTIATE_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_"}
CONFIG_ERROR_EXIT = ConfigError.exit_code
# Set by the job service for every job and sweep it starts (comma-separated packages or objects the operator
# declared, exp.targets): a job checks its own config against it before building anything, whatever a sweeper drew.
TARGET_ALLOWLIST_ENV = "EXP_TARGET_ALLOWLIST"


def _check_target_allowlist(cfg: DictConfig) -> None:
    """In a job the service started: every `_target_` must locate to an allowed object (exp.targets), checked
    before anything below imports one for building."""
    spec = os.environ.get(TARGET_ALLOWLIST_ENV)
    if spec is None:
        return
    allowlist = Allowlist.of(spec.split(","))
    found = allowlist.first_refused(OmegaConf.to_container(cfg, resolve=False))
    if found:
        key, value, why = found
        raise ConfigError(
            f"{key}={value!r} is not allowed in a job the service started: {why} (allowed: {allowlist.describe()})"
        )


@dataclass(kw_only=True)
class SampleConfig:
    """Text generated from the trained model at the end of a run."""

    prompt: str | None = None  # None: from the data's validation text (exp.sampling); SFT: a user's turn
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
class ProfileConfig:
    """The `profile` node: torch.profiler over steps [a, b] (exp.profiling; the next N steps on request too)."""

    steps: list[int] | None = None  # [first, last] step numbers, 1-based; null: only when asked while running
    row_limit: int = 30  # operators in ops.txt

    def __post_init__(self):
        if self.steps is not None:
            steps = list(self.steps)
            if len(steps) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) for s in steps):
                raise ValueError(f"profile.steps={steps} must be [first, last], two step numbers")
            if not 1 <= steps[0] <= steps[1]:
                raise ValueError(f"profile.steps={steps} must have 1 <= first <= last")
        if self.row_limit < 1:
            raise ValueError(f"profile.row_limit={self.row_limit} must be >= 1")


@dataclass(kw_only=True)
class LRFindConfig:
    """The `lr_find` node (`lr_find=true` is short for lr_find.enabled=true): an LR range test instead of the run."""

    enabled: bool = False
    min_lr: float = 1e-6
    max_lr: float = 1.0
    num_steps: int = 100  # at most; the test stops once the smoothed loss diverges
    smoothing: float = 0.05  # weight of each new loss in the smoothed loss; at least 10 / num_steps (exp.lr_find)
    diverge: float = 4.0  # stop when the smoothed loss exceeds this times its lowest value

    def __post_init__(self):
        if not 0 < self.min_lr < self.max_lr:
            raise ValueError(f"lr_find.min_lr={self.min_lr} and lr_find.max_lr={self.max_lr} need 0 < min < max")
        if self.num_steps < 5:
            raise ValueError(f"lr_find.num_steps={self.num_steps} must be >= 5")
        if not 0 < self.smoothing <= 1:
            raise ValueError(f"lr_find.smoothing={self.smoothing} must be in (0, 1]")
        if self.diverge <= 1:
            raise ValueError(f"lr_find.diverge={self.diverge} must be > 1")


@dataclass(kw_only=True)
class EvalConfig:
    """Downstream evaluation (the `eval` group: eval=none, eval=lm_eval; exp/eval/)."""

    harness: str | None = None  # None: validation loss only; lm_eval: lm-evaluation-harness tasks
    tasks: list[str] = dataclasses.field(default_factory=list)  # []: exp's offline exp_stdlib_mc
    include_path: str | None = None  # a folder of task YAMLs of your own
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task (a fraction when below 1); null: all
    batch_size: int = 16
    seed: int = 0
    every_n_steps: int = 0  # 0: only at the end
    at_end: bool = True
    bootstrap_iters: int = 1000
    max_gen_toks: int = 256
    launcher: str = "local"  # local: in the training process; slurm: each new checkpoint in a SLURM job of its own
    slurm: dict[str, Any] = dataclasses.field(default_factory=dict)  # partition, timeout_min, cpus_per_task, ...

    def __post_init__(self):
        if self.launcher not in ("local", "slurm"):
            raise ValueError(f"eval.launcher={self.launcher} must be local or slurm")
        if self.harness not in (None, "lm_eval"):
            raise ValueError(f"eval.harness={self.harness} must be lm_eval or null (eval=none)")
        if self.batch_size < 1 or self.every_n_steps < 0 or self.max_gen_toks < 1 or self.bootstrap_iters < 0:
            raise ValueError(
                "eval.batch_size and eval.max_gen_toks must be >= 1, eval.every_n_steps and eval.bootstrap_iters >= 0"
            )
        if self.limit is not None and self.limit <= 0:
            raise ValueError(f"eval.limit={self.limit} must be > 0 (a count, or a fraction below 1), or null")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"eval.num_fewshot={self.num_fewshot} must be >= 0")

    @property
    def enabled(self) -> bool:
        return self.harness is not None

    def spec(self):
        """What exp.eval.harness runs."""
        from exp.eval.harness import Spec

        fields = ("tasks", "include_path", "num_fewshot", "limit", "batch_size", "seed", "bootstrap_iters")
        return Spec(**{f: getattr(self, f) for f in fields}, max_gen_toks=self.max_gen_toks)


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
    lr_find: LRFindConfig = dataclasses.field(default_factory=LRFindConfig)
    profile: ProfileConfig = dataclasses.field(default_factory=ProfileConfig)
    eval: EvalConfig = dataclasses.field(default_factory=EvalConfig)


@dataclass
class Validated:
    """The typed pieces validation produced, so the run builds from checked objects."""

    run: RunConfig
    stage: object  # an exp.stages.StageConfig subclass
    hardware: object  # exp.hardware.Hardware


def validate(cfg: DictConfig, node: bool = True) -> Validated:
    """Check every key, type, value and interpolation; raise ConfigError naming the first problem.

    With `node` (the default), also that this machine has the device and dtype asked for. A launcher that
    submits jobs to other machines (SLURM) validates without it: each job checks its own node at start.
    """
    _check_target_allowlist(cfg)  # before anything below imports a _target_
    _check_resolvable(cfg)
    _settle_recipe(cfg)
    _link_stage_values(cfg)
    _derive_num_steps(cfg)
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
    if "lr_find" in run_node and not isinstance(run_node.lr_find, DictConfig):  # lr_find=true
        run_node.lr_find = {"enabled": run_node.lr_find}
    run = _typed("", RunConfig, run_node)
    stage = _typed("stage", get_object(cfg.stage._target_), _without_meta(cfg.stage))
    hardware = _typed("hardware", get_object(cfg.hardware._target_), _without_meta(cfg.hardware))
    _check_hf_source(cfg)
    for group in ("model", "optimizer", "scheduler", "data", "tracking", "checkpoint"):
        _check_signature(group, cfg[group])
    _check_tracking(cfg)
    for name, node in cfg.callbacks.items():
        if not isinstance(node, DictConfig) or "_target_" not in node:
            raise ConfigError(f"callbacks.{name}: needs a _target_ (an exp.loop.Callback subclass)")
        _check_signature(f"callbacks.{name}", node)
    if node:
        _guard("hardware", lambda: hardware.check_node(stage.dtype))
    else:
        from exp.hardware import check_dtype_name

        _guard("stage", lambda: check_dtype_name(stage.dtype or hardware.dtype))
    _check_writable("checkpoint.dir", cfg.checkpoint.dir)
    _check_buildable(cfg, stage)
    if run.eval.enabled:
        from exp.eval.harness import check_tasks

        check_tasks(run.eval.spec())  # lm-eval installed, the task YAMLs parse, every task is known
        if run.eval.launcher == "slurm":
            from exp.eval.side import check_slurm

            _guard("eval", check_slurm)
    return Validated(run=run, stage=stage, hardware=hardware)


def _settle_recipe(cfg: DictConfig) -> None:
    """model.recipe holds a model preset's defaults for stage keys (conf/model/gpt_small.yaml), which the stage's
    file interpolates where it has no value of its own. Fix those stage values and drop model.recipe, in place, so
    what is recorded, checkpointed and exported holds the values, not the preset's defaults."""
    model, stage = cfg.get("model"), cfg.get("stage")
    if not isinstance(model, DictConfig) or model.get("recipe") is None:
        return
    if not isinstance(model.recipe, DictConfig):
        raise ConfigError(f"model.recipe={model.recipe!r} must be a mapping of stage keys to values")
    for key in model.recipe:
        if not isinstance(stage, DictConfig) or key not in stage:
            raise ConfigError(f"model.recipe.{key}: not a stage key (known: {', '.join(stage or ())})")
    raw = OmegaConf.to_container(stage, resolve=False)
    for key, value in raw.items():
        if isinstance(value, str) and "model.recipe." in value:
            stage[key] = stage[key]
    with open_dict(model):
        del model["recipe"]


def _link_stage_values(cfg: DictConfig) -> None:
    """Make optimizer.lr and stage.learning_rate one value, in place (and weight decay, when
    optimizer.weight_decay is given on the command line).

    `optimizer.lr=1e-3` on its own sets the stage's value too (MLflow records stage.learning_rate, the
    optimizer follows it); both set to different values is an error naming both.
    """
    from exp.optim import STAGE_LINKS

    optimizer, stage = cfg.get("optimizer"), cfg.get("stage")
    if not isinstance(optimizer, DictConfig) or not isinstance(stage, DictConfig):
        return
    given = _command_line_keys()
    for opt_key, stage_key in STAGE_LINKS.items():
        if opt_key not in optimizer or stage_key not in stage or OmegaConf.is_interpolation(optimizer, opt_key):
            continue
        if opt_key != "lr" and f"optimizer.{opt_key}" not in given:
            continue  # an optimizer that sets its own (adam's weight_decay: 0.0) keeps it, as its file says
        value, recipe = optimizer[opt_key], stage[stage_key]
        if value == recipe:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"optimizer.{opt_key}={value!r} must be a number")
        if value < 0 or (opt_key == "lr" and value == 0):  # named as typed, not as the stage key it sets
            raise ConfigError(f"optimizer.{opt_key}={value} must be {'> 0' if opt_key == 'lr' else '>= 0'}")
        if f"stage.{stage_key}" in given:
            raise ConfigError(
                f"optimizer.{opt_key}={value} and stage.{stage_key}={recipe} disagree: set one of them "
                f"(optimizer.{opt_key} follows stage.{stage_key})"
            )
        stage[stage_key] = value
        optimizer[opt_key] = f"${{stage.{stage_key}}}"


def _derive_num_steps(cfg: DictConfig) -> None:
    """stage.num_epochs given: set stage.num_steps, in place, to the steps that many passes over the training
    data take (the data's epoch_size() samples per pass; all ranks' batches per step, WORLD_SIZE ranks)."""
    stage = cfg.get("stage")
    if not isinstance(stage, DictConfig) or stage.get("num_epochs") is None:
        return
    epochs = stage.num_epochs
    if isinstance(epochs, bool) or not isinstance(epochs, (int, float)) or epochs <= 0:
        raise ConfigError(f"stage.num_epochs={epochs!r} must be a number > 0, or null")
    if stage.get("num_steps") is not None and "stage.num_steps" in _command_line_keys():  # =null: not set
        raise ConfigError(
            f"stage.num_steps={stage.num_steps} and stage.num_epochs={epochs} are both set: set one of them "
            "(the other is derived)"
        )
    data = _guard("data", lambda: instantiate(cfg.data))
    if not hasattr(data, "epoch_size"):
        raise ConfigError(
            f"stage.num_epochs: {cfg.data._target_} has no epoch size (no epoch_size()): set stage.num_steps"
        )
    _guard("data", data.check)
    size = _guard("data", data.epoch_size)
    world = int(os.environ.get("WORLD_SIZE") or os.environ.get("SLURM_NTASKS") or 1)
    per_step = stage.batch_size_per_gpu * stage.gradient_accumulation_steps * world
    stage.num_steps = max(1, math.ceil(epochs * size / per_step))


def expand_shorthand(arg: str) -> str:
    """`resume=X` is short for resume.path=X and `lr_find=true|false` for lr_find.enabled=...: both are nodes, and
    Hydra would replace the node with the value, so `lr_find=true lr_find.num_steps=40` could not combine."""
    key, eq, value = arg.partition("=")
    if eq and key == "resume":
        return f"resume.path={value}"
    if eq and key == "lr_find" and value.lower() in ("true", "false"):
        return f"lr_find.enabled={value.lower()}"
    return arg


def _command_line_keys() -> set[str]:
    """The keys set by this job's overrides (command line or sweep point); empty outside Hydra."""
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = HydraConfig.get().overrides.task
    except ValueError:  # not under Hydra (a config built in code)
        return set()
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides}


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


def component(cfg: DictConfig, group: str) -> DictConfig:
    """cfg[group] as its _target_ is built: without the keys exp reads itself (EXP_KEYS), resolved."""
    node, own = cfg[group], EXP_KEYS.get(group, ())
    if not any(k in node for k in own):
        return node
    return OmegaConf.create({k: v for k, v in OmegaConf.to_container(node, resolve=True).items() if k not in own})


def _check_signature(group: str, node: DictConfig) -> None:
    """Keys of a `_target_` group must be parameters of the target, with numbers where numbers are expected."""
    try:
        target = get_object(node._target_)
    except Exception as e:  # hydra wraps import errors of every kind
        raise ConfigError(f"{group}._target_={node._target_!r} cannot be imported: {first_line(e)}") from None
    params = inspect.signature(target).parameters
    hints = _hints(target)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for key in node:
        if key in INSTANTIATE_KEYS or key in EXP_KEYS.get(group, ()):
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
        problem = _type_problem(hints.get(key), OmegaConf.to_container(node, resolve=True)[key])
        if problem:
            raise ConfigError(f"{group}.{key}={_show(node, key)} must be {problem}")


def _hints(target) -> dict:
    """The target's parameter annotations, as types; {} where they cannot be evaluated."""
    try:
        return typing.get_type_hints(target.__init__ if inspect.isclass(target) else target)
    except Exception:  # forward references to names the target's module does not define: no checks
        return {}


def _type_problem(hint, value) -> str | None:
    """What `value` should be to fit the annotation `hint` (numbers, flags, fixed-length tuples), or None.

    Only what a constructor would fail on obscurely is checked: a string where a number goes fails deep
    inside it as "unsupported operand type(s)", a short tuple as "list index out of range".
    """
    if hint is None or value is None and _optional(hint):
        return None
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    numbers = [o for o in options if o in (int, float)]
    if numbers and all(o in (int, float, type(None)) or _is_tensor(o) for o in options):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return "an integer" if numbers == [int] else "a number"
        if numbers == [int] and not isinstance(value, int):
            return "an integer"
    origin = typing.get_origin(hint)
    if origin is tuple and (args := typing.get_args(hint)) and Ellipsis not in args:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            return f"a list of {len(args)} values, e.g. [{', '.join('...' for _ in args)}]"
        for arg, item in zip(args, value, strict=True):
            if _type_problem(arg, item):
                return f"a list of {len(args)} numbers"
    return None


def _is_union(hint) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _optional(hint) -> bool:
    return _is_union(hint) and type(None) in typing.get_args(hint)


def _is_tensor(hint) -> bool:
    return getattr(hint, "__name__", "") == "Tensor"


def _show(node: DictConfig, key: str) -> str:
    value = OmegaConf.to_container(node, resolve=True)[key]
    return (
        str(value).replace(" ", "")
        if isinstance(value, list)
        else repr(value)
        if isinstance(value, str)
        else str(value)
    )


def _check_tracking(cfg: DictConfig) -> None:
    """Values the tracker (built once the run starts) would refuse: refused now, before anything is written."""
    interval = OmegaConf.select(cfg, "tracking.system_metrics_interval", default=None)
    if interval is not None and not interval > 0:
        raise ConfigError(f"tracking.system_metrics_interval={float(interval)} must be > 0 (seconds between samples)")
    ui_url = OmegaConf.select(cfg, "tracking.ui_url", default=None)
    if ui_url is not None and not str(ui_url).startswith(("http://", "https://")):
        raise ConfigError(f"tracking.ui_url={ui_url} must be an http:// or https:// address (the MLflow UI's)")


def _check_writable(key: str, path: str) -> None:
    """The nearest existing ancestor of `path` must be a directory this process can create a folder in.

    Tried, not asked: os.access says yes to root everywhere, also on read-only and pseudo filesystems.
    """
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise ConfigError(f"{key}={path} cannot be created: {probe} is not a directory")
    try:
        tempfile.TemporaryDirectory(dir=probe, prefix=".exp-write-check-").cleanup()
    except OSError as e:
        raise ConfigError(f"{key}={path} is not writable ({probe}: {e.strerror or first_line(e)})") from None


def _check_buildable(cfg: DictConfig, stage=None) -> None:
    """Build what is cheap to build (model on the meta device, optimizer and scheduler on one dummy
    parameter, data without opening files) so constructor checks run now, before any side effect."""
    import torch

    with torch.device("meta"):
        model = _guard("model", lambda: instantiate(component(cfg, "model")))
    _check_adapter(cfg, model, stage)
    _check_groups(cfg, model)
    dummy = torch.nn.Parameter(torch.zeros(1))
    optimizer = _guard("optimizer", lambda: instantiate(component(cfg, "optimizer"))([dummy]))
    _guard("scheduler", lambda: instantiate(cfg.scheduler)(optimizer))
    from exp.data import check_data_source, document_token

    data = _guard("data", lambda: instantiate(cfg.data))
    _guard("data", lambda: check_data_source(data))  # a plain Dataset given as data: say what to use instead
    if stage is not None and hasattr(stage, "check_data"):  # pairs for DPO only: before the data is read
        _guard("stage", lambda: stage.check_data(data))
    _guard("data", data.check)
    _check_documents(model, _guard("data", lambda: document_token(data)), stage)
    tokenizer = _guard("data", lambda: data.tokenizer() if hasattr(data, "tokenizer") else None)
    _check_model_tokenizer(cfg, model, tokenizer)
    if stage is not None:  # the stage's weights (init_from, a teacher) after the data: the tokenizer says most
        from exp.checkpoint import check_init_from
        from exp.model.protocol import declared

        _check_tokenizers(stage, tokenizer)
        if getattr(stage, "init_from", None):
            _guard("stage", lambda: check_init_from(stage.init_from, model))
        model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
        model_cfg["vocab_size"] = declared(model, "vocab_size") or model_cfg.get("vocab_size")  # as built (model=hf)
        _guard("stage", lambda: stage.check(model_cfg))


HF_TARGET = "exp.model.HFCausalLM"


def _check_hf_source(cfg: DictConfig) -> None:
    """model=hf: its folder (or hub snapshot) and config.json, named before the values derived from them are
    checked (data.seq_len comes from config.json)."""
    if cfg.model.get("_target_") != HF_TARGET or cfg.model.get("config") is not None:
        return
    from exp.model.hf import local_folder, read_config_json

    _guard("model", lambda: read_config_json(local_folder(cfg.model.name_or_path)))


def _check_model_tokenizer(cfg: DictConfig, model, tokenizer) -> None:
    """model=hf: the data's tokens must come from the model's tokenizer (model.tokenizer: its folder's
    tokenizer.json), chat tokens added or not."""
    from exp.data.tokenizer import TOKENIZER_FILE
    from exp.model import HFCausalLM

    spec = cfg.model.get("tokenizer")
    if not isinstance(model, HFCausalLM) or spec is None:
        return
    folder = Path(str(spec)).expanduser()
    file = folder / TOKENIZER_FILE if folder.is_dir() else folder
    if not file.is_file():
        raise ConfigError(
            f"model.tokenizer={spec}: no {TOKENIZER_FILE} there; model=hf trains on the model's own tokenizer: save "
            f"it into the folder (AutoTokenizer.from_pretrained(...).save_pretrained(FOLDER) writes one) or set "
            "model.tokenizer=PATH"
        )
    if tokenizer is None:  # token files that name no tokenizer: nothing to compare
        return
    from exp.checkpoint import CheckpointError
    from exp.checkpoint.hf_folder import hf_folder_tokenizer

    try:
        theirs = hf_folder_tokenizer(file.parent)
    except CheckpointError as e:
        raise ConfigError(f"model.tokenizer={spec}: {e}") from None
    if tokenizer.fingerprint in (theirs.fingerprint, theirs.with_chat_tokens().fingerprint):
        return
    kind = "byte tokens" if tokenizer.kind == "bytes" else f"a tokenizer of {tokenizer.vocab_size} tokens"
    raise ConfigError(
        f"data: its tokens come from {kind}, not from model.tokenizer={spec}; tokenize the data with the model's "
        f"tokenizer: python -m exp.data.prepare INPUT --tokenizer {file} --out DIR, then data=memmap data.path=DIR"
    )


def _check_adapter(cfg: DictConfig, model, stage) -> None:
    """model.adapter: its values, peft installed, a base to train on (stage.init_from), its target among the (meta)
    model's linear layers. Injected there, so that model.freeze and optimizer.param_groups are tried on the
    adapted model, as the run builds it."""
    from exp.model import adapters

    node = OmegaConf.to_container(cfg.model, resolve=True).get("adapter")
    adapter = _guard("model", lambda: adapters.adapter_config(node))
    if adapter is None:
        return
    from exp.model import HFCausalLM

    # model=hf's pretrained weights come with it (its folder is the base); other models need stage.init_from's
    if stage is not None and not getattr(stage, "init_from", None) and not isinstance(model, HFCausalLM):
        raise ConfigError(
            "model.adapter needs stage.init_from: the pretrained weights the adapter trains on "
            "(a checkpoint, run directory or export)"
        )
    if OmegaConf.select(cfg, "hardware.distributed") == "fsdp":
        raise ConfigError("model.adapter: hardware.distributed=fsdp would shard a frozen base; use ddp (or none)")
    _guard("model", adapters.require_peft)
    _guard("model", lambda: adapters.inject(model, adapter))


def _check_documents(model, token: int | None, stage) -> None:
    """data.document_mask needs a model whose forward takes the rows' document ids; the stage passes them on."""
    from exp.model.protocol import takes_documents

    if token is not None and not takes_documents(model):
        kind = type(model).__qualname__
        raise ConfigError(
            f"data.document_mask=true but model {kind}.forward takes no doc_ids (the documents packed in each row): "
            "set data.document_mask=false, or give forward a doc_ids keyword (exp.model.protocol)"
        )
    if stage is not None:
        stage.document_token = token


def _check_tokenizers(stage, tokenizer) -> None:
    """Weights a stage starts from (init_from, a teacher) must come from the data's tokenizer."""
    from exp.checkpoint import check_tokenizer

    reference = getattr(getattr(stage, "reference", None), "path", None)  # DPO's
    weights = (("stage.init_from", getattr(stage, "init_from", None)), ("stage.teacher.path", _teacher(stage)))
    for key, path in (*weights, ("stage.reference.path", reference)):
        if path:
            _guard("stage", lambda key=key, path=path: check_tokenizer(tokenizer, path, f"{key}={path}"))


def _teacher(stage) -> str | None:
    teacher = getattr(stage, "teacher", None)
    return getattr(teacher, "path", None)


def _check_groups(cfg: DictConfig, model) -> None:
    """model.freeze and optimizer.param_groups, tried on the (meta) model: a pattern matching nothing is named."""
    from exp.optim import freeze, group_rules, param_groups

    freeze_patterns = OmegaConf.to_container(cfg.model, resolve=True).get("freeze") or []
    rules = OmegaConf.to_container(cfg.optimizer, resolve=True).get("param_groups") or []
    if not isinstance(freeze_patterns, list) or not all(isinstance(p, str) for p in freeze_patterns):
        raise ConfigError(f"model.freeze={freeze_patterns!r} must be a list of regular expressions")
    if not isinstance(rules, list):
        raise ConfigError(f"optimizer.param_groups={rules!r} must be a list of {{match: REGEX, lr_mult: X}}")
    _guard("model", lambda: freeze(model, freeze_patterns))
    _guard("optimizer", lambda: param_groups(model, 0.0, group_rules(rules)))


def _guard(group: str, build: Callable):
    try:
        return build()
    except ConfigError:
        raise
    except Exception as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ else e
        raise ConfigError(_named(group, cause)) from None


def _named(group: str, error: BaseException) -> str:
    """Prefix a constructor's message with its group unless it already names a key."""
    msg = first_line(error)
    head = msg.split("=", 1)[0].split(":", 1)[0]
    return msg if "." in head and " " not in head else f"{group}: {msg}"


_job_started = False


def job_started() -> None:
    """Mark that Hydra composed the config and handed it to the job."""
    global _job_started
    _job_started = True


def job_has_started() -> bool:
    """Whether a job started in this process (an exit 1 before it is one of Hydra's compose errors)."""
    return _job_started


def hydra_message(error: BaseException) -> str:
    """Hydra's multi-line compose error (an unknown key or group option, a bad override) as one line: its first
    paragraph, what OmegaConf said beneath it, and the options Hydra lists for a group. train.py prints it, and
    the job service answers with it."""
    text = str(error).strip()
    head = text.split("\n\n", 1)[0]
    line = " ".join(part.strip() for part in head.splitlines() if part.strip()) or first_line(error)
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException) and first_line(cause) not in line:  # "Key 'x' is not in struct"
        line += f" ({first_line(cause)})"
    for paragraph in text.split("\n\n")[1:]:  # an unknown group option: Hydra lists the options after a blank line
        title, _, rest = paragraph.partition("\n")
        if title.startswith("Available options in"):
            options = []
            for option in rest.splitlines():
                if not option.startswith(("\t", " ")):  # "Config search path:" and what follows it
                    break
                options.append(option.strip())
            line += f" (available: {', '.join(options)})"
            break
    return line
