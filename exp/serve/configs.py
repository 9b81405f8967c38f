"""Configs arriving over HTTP: overrides checked against the target allowlist, then composed through Hydra and
validated exactly as train.py does, before anything is stored or launched."""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Callable
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict

from exp import config
from exp.checkpoint.weights import allowed_prefixes
from exp.errors import ConfigError
from exp.paths import CONF_DIR
from exp.targets import Allowlist

# the service decides where a run goes, how it is launched, what it resumes from and where it records: a client
# names none of these, in any syntax (a key, a parent node set to a mapping, a GROUP@PACKAGE placement)
RESERVED_KEYS = ("hydra", "run_dir", "resume")
RESERVED_PATHS = ("tracking.run_id", "tracking.uri", "tracking.artifact_location", "checkpoint.dir", "data.cache_dir")
MAX_OVERRIDES = 64
MAX_OVERRIDE_CHARS = 1000
_GROUP_CHOICE = re.compile(r"^[+~]?[a-z_]+(/[a-z_]+)*$")
_OPTION = re.compile(r"^[A-Za-z0-9_]+(,[A-Za-z0-9_]+)*$")  # group options (tracking=mlflow; a grid: a,b), not a mapping
_compose_lock = threading.Lock()  # Hydra's global state (GlobalHydra, HydraConfig) is one per process


class Refused(ConfigError):
    """A config the service will not compose: names code outside the allowlist, or a key the service owns."""


def allowlist(allow: tuple[str, ...] = ()) -> Allowlist:
    """What a `_target_` may locate to over HTTP: exp's own targets, torch's optimizers and what the operator
    declared (--allow-target, EXP_ALLOWED_TARGETS)."""
    return Allowlist.of(allowed_prefixes(allow))


def target_allowed(target: str, allow: tuple[str, ...] = ()) -> bool:
    return allowlist(allow).refusal(target) is None


def job_env(allow: tuple[str, ...] = ()) -> dict[str, str]:
    """What the service adds to a job's environment: the allowlist the job checks its own config against."""
    return {config.TARGET_ALLOWLIST_ENV: ",".join(allowlist(allow).roots)}


def check_overrides(overrides: list[str], allow: tuple[str, ...] = ()) -> None:
    """Refuse, before Hydra parses anything, overrides the service owns, that place a config elsewhere, or that
    would resolve anything on this machine (an interpolation: ${oc.env:...} reads the service's environment)."""
    if len(overrides) > MAX_OVERRIDES:
        raise Refused(f"{len(overrides)} overrides: at most {MAX_OVERRIDES}")
    for item in overrides:
        if not isinstance(item, str) or not item.strip():
            raise Refused(f"override {item!r}: must be a non-empty string KEY=VALUE or GROUP=OPTION")
        if len(item) > MAX_OVERRIDE_CHARS or "\n" in item or "\x00" in item:
            raise Refused(f"override {item[:40]!r}...: too long or not one line")
        if item.startswith("-"):
            raise Refused(f"override {item!r}: command-line flags are not accepted, only KEY=VALUE")
        key, _, value = (part.strip() for part in item.partition("="))
        key = key.lstrip("+~").strip()
        if "@" in key:
            raise Refused(f"override {key}: GROUP@PACKAGE placements are not accepted over HTTP")
        if "${" in item:  # never resolved in the service, so never echoed back either
            raise Refused(f"override {key}: interpolations (${{...}}) are not accepted over HTTP; give the value")
        _check_owned(key, value)
        if "=" not in item and not _GROUP_CHOICE.match(item):
            raise Refused(f"override {item!r}: expected KEY=VALUE")


def _check_owned(key: str, value: str) -> None:
    dotted = key.replace("/", ".")
    parent_of_owned = any(p.startswith(dotted + ".") for p in RESERVED_PATHS) and not _OPTION.match(value)
    if dotted.split(".", 1)[0] in RESERVED_KEYS or dotted in RESERVED_PATHS or parent_of_owned:
        raise Refused(
            f"{key}: set by the service (the run directory, its launcher, checkpoints, data cache, MLflow store "
            "and run, and resumption)"
        )


def check_targets(node, allow: tuple[str, ...] = (), prefix: str = "") -> None:
    """Every `_target_` of the composed config must locate to an allowed class or function (exp.targets); only
    modules of allowed packages are imported to find out, and nothing is built."""
    allowed = allowlist(allow)
    found = allowed.first_refused(node, prefix)
    if found:
        key, value, why = found
        raise Refused(
            f"{key}={value!r} is not allowed over HTTP: {why} (allowed: {allowed.describe()}); the operator can "
            "allow a package with python -m exp.serve --allow-target PACKAGE"
        )


def check_confined(cfg: DictConfig, run_dir: Path) -> None:
    """The composed job writes its checkpoints inside its own run directory, whatever the overrides said."""
    folder = Path(str(OmegaConf.select(cfg, "checkpoint.dir", default=""))).expanduser()
    folder = folder if folder.is_absolute() else Path.cwd() / folder
    if not os.path.normpath(folder).startswith(os.path.normpath(run_dir.absolute()) + os.sep):
        raise Refused(f"checkpoint.dir={folder}: must be inside the job's run directory {run_dir}")


def check_eval_code(cfg: DictConfig) -> None:
    """A folder of task YAMLs can run code (lm-eval's `!function` imports a Python file beside them): not over
    HTTP. Tasks by name come from the installed harness and exp (validation refuses anything else, paths too)."""
    if OmegaConf.select(cfg, "eval.include_path", default=None) is not None:
        raise Refused(
            "eval.include_path is not accepted over HTTP: task YAMLs can run Python (!function); name installed "
            "lm-eval tasks in eval.tasks, or run the job with train.py"
        )


def check_data_sources(cfg: DictConfig) -> None:
    """A mixture prepares raw sources while the config is validated (a process of exp.data.prepare in the service):
    over HTTP its sources must already be token data (prepared folders, token files, pystdlib), never hf:
    datasets or raw text, which validation would read and tokenize here."""
    sources = OmegaConf.select(cfg, "data.sources", default=None)
    if not isinstance(sources, DictConfig):
        return
    for name, spec in sources.items():
        path = str(spec.get("path", "")) if isinstance(spec, DictConfig) else ""
        folder = Path(path).expanduser()
        prepared = path == "pystdlib" or folder.suffix == ".bin" or (folder / "train.bin").is_file()
        if path.startswith("hf:") or not prepared:
            raise Refused(
                f"data.sources.{name}.path={path} is not accepted over HTTP: a mixture's sources must be prepared "
                "token data here (python -m exp.data.prepare, then its folder), or run the job with train.py"
            )


def check_downloads(cfg: DictConfig) -> None:
    """Nothing is downloaded in the service on a client's behalf: validation would fetch a model=hf hub name's
    snapshot and an hf: dataset here. Over HTTP a model comes from a local folder and SFT or preference data from a
    JSONL file (hf: names stay for train.py)."""
    model = cfg.get("model")
    name = model.get("name_or_path") if isinstance(model, DictConfig) and "name_or_path" in model else None
    if name is not None and not Path(str(name)).expanduser().is_dir():
        raise Refused(
            f"model.name_or_path={name} is not accepted over HTTP: the service downloads nothing for a client; give "
            "a local model folder, or run the job with train.py"
        )
    for key in ("data.path", "data.val_path"):
        value = OmegaConf.select(cfg, key, default=None, throw_on_missing=False)
        if isinstance(value, str) and value.startswith("hf:"):
            raise Refused(
                f"{key}={value} is not accepted over HTTP: validation would load that Hugging Face dataset in the "
                "service; give a JSONL file (or prepared token data), or run the job with train.py"
            )


def compose(
    overrides: list[str],
    run_dir: Path,
    allow: tuple[str, ...] = (),
    node: bool = True,
    service_overrides: tuple[str, ...] = (),
    check: Callable[[DictConfig], None] | None = None,
) -> tuple[DictConfig, dict]:
    """The config train.py would get for these overrides, validated as train.py validates it, and its `hydra`
    node. `service_overrides` (the service's own: resume) skip the client checks; `check(cfg)` runs while the
    composed config still resolves (resume's drift check).

    Raises ConfigError (Refused for allowlist and reserved keys) with the one line the CLI prints.
    """
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.hydra_config import HydraConfig

    check_overrides(overrides, allow)
    with _compose_lock:
        try:
            with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
                cfg = hydra_compose(
                    "config",
                    overrides=[*overrides, *service_overrides, f"run_dir={run_dir}"],
                    return_hydra_config=True,
                )
        except Exception as e:  # Hydra's own errors: an unknown group option or key, a bad override
            raise ConfigError(config.hydra_message(e)) from None
        # the launcher Hydra would use is Hydra's business; the job's own nodes are what may name code
        job = OmegaConf.to_container(cfg, resolve=False)
        job.pop("hydra", None)
        check_targets(job, allow)
        HydraConfig.instance().set_config(cfg)  # so ${hydra:runtime.choices.*} resolves and overrides are known
        hydra_node = OmegaConf.to_container(cfg.hydra, resolve=False)
        with open_dict(cfg):
            del cfg["hydra"]
        check_confined(cfg, run_dir)
        check_eval_code(cfg)
        check_data_sources(cfg)
        check_downloads(cfg)
        config.validate(cfg, node=node)
        if check is not None:
            check(cfg)
    return cfg, hydra_node


def sweep_points(overrides: list[str], max_points: int = 64) -> list[list[str]]:
    """The grid a multirun's overrides expand to (`seed=0,1 optimizer=adamw,sgd`: four points), each point a list
    of plain overrides; ConfigError for what does not parse or expands past `max_points`."""
    import itertools

    from hydra.core.override_parser.overrides_parser import OverridesParser

    check_overrides(overrides)
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
        axes = []
        for o in parsed:
            prefix = {"ADD": "+", "FORCE_ADD": "++", "DEL": "~"}.get(o.type.name, "")
            values = list(o.sweep_string_iterator()) if o.is_sweep_override() else [o.get_value_element_as_str()]
            axes.append([f"{prefix}{o.key_or_group}={v}" for v in values])
    except Exception as e:  # a syntax error, or a search space (interval) only a sweeper can sample
        raise ConfigError(f"sweep overrides: {config.hydra_message(e)} (grids of KEY=a,b,c or range() only)") from None
    num_points = 1
    for axis in axes:
        num_points *= len(axis)
    if num_points > max_points:
        raise ConfigError(f"the grid has {num_points} points: at most {max_points} from the service")
    return [list(point) for point in itertools.product(*axes)]


def search_points(overrides: list[str], sampler: str = "tpe", max_points: int = 64) -> list[list[str]]:
    """Points of the Optuna search the overrides describe (`interval()`, `tag(log, interval())`, `choice()`,
    `range()`, `a,b`; the rest fixed), as plain overrides to compose and validate before the study starts: each
    interval's low bound with each choice's first value, then every other value of each choice swapped in one at
    a time, so every value the sampler may draw for a choice (a group option, a `_target_`) is composed, validated
    and checked against the allowlist as a grid's points are. ConfigError for what the sweeper would refuse."""
    from exp.sweep.optuna import SpaceError, as_overrides, first_point, make_sampler, parse_space

    check_overrides(overrides)
    try:
        space, fixed = parse_space({line.split("=", 1)[0].lstrip("+~"): line for line in overrides})
    except SpaceError as e:
        if e.key is None:
            raise ConfigError(
                "an Optuna search needs a search space: KEY=interval(a, b), tag(log, interval(a, b)), choice(a, b), "
                "range(a, b) or a,b"
            ) from None
        if isinstance(e.__cause__, (ValueError, TypeError)):  # parsed, but no distribution the sweeper can draw
            line = next(o for o in overrides if o.split("=", 1)[0].lstrip("+~") == e.key)
            raise ConfigError(f"{line}: {e}") from None
        raise ConfigError(f"sweep overrides: {config.hydra_message(e.__cause__)}") from None  # Hydra's syntax
    try:
        make_sampler(sampler, {}, space)
    except ValueError as e:
        raise ConfigError(f"sampler {e}") from None
    first = first_point(space)
    points = [[*fixed, *as_overrides(first)]]
    for key, dist in space.items():
        for value in getattr(dist, "choices", ())[1:]:
            points.append([*fixed, *as_overrides({**first, key: value})])
    if len(points) > max_points:
        raise ConfigError(
            f"the search's choices add up to {len(points)} points to validate: at most {max_points} from the service"
        )
    return points


def launcher_defaults(hydra_node: dict) -> dict:
    """The SLURM resources the composed config's hardware option sets under hydra.launcher (slurm_* options)."""
    values = hydra_node.get("launcher") or {}
    keys = (
        "partition",
        "account",
        "qos",
        "cpus_per_task",
        "mem_gb",
        "timeout_min",
        "gpus_per_node",
        "constraint",
        "nodes",
        "tasks_per_node",
    )
    return {k: values[k] for k in keys if values.get(k) is not None}


def check_ranks(cfg: DictConfig, resources: dict) -> None:
    """SLURM's process count (nodes x tasks_per_node) must fit hardware.distributed: several for ddp/fsdp, one
    otherwise (each extra task would train alone, as rank 0, in the same run directory)."""
    ranks = int(resources.get("nodes") or 1) * int(resources.get("tasks_per_node") or 1)
    distributed = str(OmegaConf.select(cfg, "hardware.distributed", default="none") or "none")
    if distributed == "none" and ranks > 1:
        raise ConfigError(
            f"slurm: nodes x tasks_per_node = {ranks} processes, but hardware.distributed=none trains in one: "
            "use hardware=slurm_ddp (or hardware.distributed=ddp|fsdp), or one task"
        )
    if distributed != "none" and ranks < 2:
        raise ConfigError(
            f"hardware.distributed={distributed} needs several processes: set slurm.tasks_per_node (or nodes) so "
            "that nodes x tasks_per_node >= 2"
        )


def group_options() -> dict[str, list[str]]:
    """The options of every config group in conf/: what the dashboard's start form offers."""
    return {
        g.name: sorted(f.stem for f in g.glob("*.yaml"))
        for g in sorted(CONF_DIR.iterdir())
        if g.is_dir() and g.name != "hydra"
    }
