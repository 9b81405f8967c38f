"""Repeat a past run with changes: `python -m exp.repeat RUN_DIR [OVERRIDES...]`.

The run's command-line overrides (RUN_DIR/.hydra/overrides.yaml) come first and yours after them, so yours win;
train.py's own Hydra app composes them from conf/ (and the run's --config-dir / --config-name, if it had them), so
group choices (`tracking=none`, `optimizer=sgd`), values, `+key=...` additions and exit codes behave exactly as
with train.py: a bad override ends with one line and exit 2, and nothing is written. The repeat goes to a new run
directory unless you pass `hydra.run.dir=...`: the run's own `hydra.run.*` / `hydra.sweep.*` overrides are left
out, and so is a sweep trial's `tracking.parent_run_id` (the repeat is not a trial of that sweep).

Normalisation, so that what would make Hydra fail on a plain concatenation does not:
- a key you set that the run set too replaces the run's override (`+a.b=1` then `a.b=2` becomes `++a.b=2`);
- a group you switch to another option keeps the run's values under that group where the new option has the
  key (`stage.num_steps=2` across stages) and leaves out the rest (`tracking=none` leaves out `tracking.uri=...`).
Everything left out is printed before the run starts, with the equivalent train.py command.
"""

from __future__ import annotations

import runpy
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from exp.config import CONFIG_ERROR_EXIT, expand_shorthand
from exp.paths import CONF_DIR, TRAIN_PY
from exp.text import first_line

HYDRA_DIR = ".hydra"

# Hydra overrides of the repeated run that would send the repeat into that run's directory, or sweep again.
DROPPED_HYDRA = ("hydra.run.", "hydra.sweep.", "hydra.sweeper.", "hydra.mode", "hydra.job.num", "hydra.job.id")
DROP_REASONS = {
    "hydra.run.": "the repeat gets a run dir of its own; hydra.run.dir=... chooses it",
    "hydra.sweep.": "the repeat gets a run dir of its own; hydra.run.dir=... chooses it",
    "hydra.sweeper.": "the run's own point is repeated, not the search space it came from",
    "hydra.job.": "Hydra's numbering of that sweep's jobs",
}
# Task overrides that tie a run to its launch: the MLflow parent run of the sweep (or pipeline) it belonged to, and
# the MLflow run the job service created for it.
DROPPED_TASK = ("tracking.parent_run_id", "tracking.run_id")
# train.py's (Hydra's) flags: those taking a value, and those the repeat sets itself from the run.
VALUE_FLAGS = {"--cfg", "-c", "--package", "-p", "--experimental-rerun"}
CONFIG_FLAGS = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd"}
INFO_CHOICES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
QUIET_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--version", "--shell-completion", "-sc"}


class RepeatError(Exception):
    """Not a run that can be repeated; the message is the one line the user sees."""


@dataclass
class Recorded:
    """What a run directory says about the command that made it."""

    run_dir: Path
    overrides: list[str]  # .hydra/overrides.yaml: the task overrides
    hydra_overrides: list[str] = field(default_factory=list)  # hydra.yaml: hydra.overrides.hydra
    config_name: str = "config"
    config_dir: str | None = None  # --config-dir of the launch (e.g. sweeps/), if any
    choices: dict = field(default_factory=dict)  # group -> option the run composed
    cwd: str | None = None


@dataclass
class Plan:
    """The argv for train.py and what was left out of the recorded overrides, with why."""

    argv: list[str]
    recorded: list[str]
    new: list[str]
    dropped: list[tuple[str, str]]


def load_run(path: str | Path) -> Recorded:
    """Read RUN_DIR/.hydra/overrides.yaml (required) and .hydra/hydra.yaml (optional)."""
    run_dir = Path(path)
    if run_dir.name == HYDRA_DIR and (run_dir / "overrides.yaml").is_file():
        run_dir = run_dir.parent  # RUN_DIR/.hydra given: the same run
    hydra_dir = run_dir / HYDRA_DIR
    overrides_file = hydra_dir / "overrides.yaml"
    if not overrides_file.is_file():
        if not run_dir.is_dir():
            raise RepeatError(f"{path}: no such run directory")
        if (run_dir / "multirun.yaml").exists() or (run_dir / "sweep.json").exists():
            raise RepeatError(f"{path} is a sweep directory: repeat one of its trials, e.g. {run_dir / '0'}")
        raise RepeatError(f"{path} has no {HYDRA_DIR}/overrides.yaml: not a run directory of train.py")
    try:
        overrides = yaml.safe_load(overrides_file.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise RepeatError(f"{overrides_file}: unreadable ({first_line(e)})") from None
    overrides = [] if overrides is None else overrides
    if not isinstance(overrides, list) or not all(isinstance(o, str) for o in overrides):
        raise RepeatError(f"{overrides_file}: not a list of overrides")
    recorded = Recorded(run_dir=run_dir, overrides=overrides)
    try:  # missing or unreadable: the run was launched with conf/config.yaml and no Hydra overrides
        hydra = (yaml.safe_load((hydra_dir / "hydra.yaml").read_text()) or {}).get("hydra") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        hydra = {}
    runtime = hydra.get("runtime") or {}
    recorded.hydra_overrides = list((hydra.get("overrides") or {}).get("hydra") or [])
    recorded.config_name = (hydra.get("job") or {}).get("config_name") or "config"
    recorded.config_dir = next(
        (s.get("path") for s in runtime.get("config_sources") or [] if s.get("provider") == "command-line"), None
    )
    recorded.choices = dict(runtime.get("choices") or {})
    recorded.cwd = runtime.get("cwd")
    return recorded


def split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """train.py's flags (Hydra's: -m, --cfg job, ...) and its overrides."""
    flags, overrides, i = [], [], 0
    while i < len(args):
        arg = args[i]
        name = arg.split("=", 1)[0]
        if name in CONFIG_FLAGS:
            raise RepeatError(f"{name}: the repeat composes the run's own config; give overrides only")
        if arg.startswith("-"):
            flags.append(arg)
            optional = name in ("--info", "-i") and i + 1 < len(args) and args[i + 1] in INFO_CHOICES
            if (name in VALUE_FLAGS or optional) and "=" not in arg and i + 1 < len(args):
                flags.append(args[i + 1])
                i += 1
        else:
            overrides.append(arg)
        i += 1
    return flags, overrides


def _parse(line: str):
    """Hydra's parse of one override, or None where it does not parse (Hydra then reports it, as train.py does)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(line)
    except Exception:  # noqa: BLE001 - a syntax error is Hydra's to report, with train.py's message and exit code
        return None


def _key(override) -> tuple[str, str | None]:
    return override.key_or_group, override.package


def merge(recorded: Recorded, user: list[str]) -> tuple[list[str], list[str], list[tuple[str, str]]]:
    """The recorded overrides that stay, the user's as they go after them (normalised so that they win and Hydra
    accepts the list), and the recorded ones left out, each with why."""
    dropped: list[tuple[str, str]] = []
    base: list[str] = []
    for line in recorded.overrides + recorded.hydra_overrides:
        key = line.lstrip("+~").split("=", 1)[0]
        if key.startswith(DROPPED_HYDRA):
            if not key.startswith("hydra.mode"):  # Hydra records its own hydra.mode=RUN: not news
                dropped.append((line, DROP_REASONS[next(k for k in DROP_REASONS if key.startswith(k))]))
        elif key.startswith(DROPPED_TASK):
            reason = "the repeat is no trial of that run's sweep"
            if key.startswith("tracking.run_id"):
                reason = "the repeat records a new MLflow run of its own"
            dropped.append((line, reason))
        else:
            base.append(line)

    parsed_base = [(line, _parse(line)) for line in base]
    new: list[str] = []
    for line in user:
        line = expand_shorthand(line)  # run_cli's shorthands, spelled out so they meet a recorded resume.path
        u = _parse(line)
        if u is None:
            new.append(line)
            continue
        group = _is_group(recorded, u.key_or_group)
        known, old = _choice(recorded, u.key_or_group, parsed_base)
        if group and u.package is None and known:
            option = None if u.is_delete() else u.input_line.split("=", 1)[1]
            if option != old:  # another option: the old one's values may not fit it
                parsed_base = _switch_group(recorded, u.key_or_group, old, option, parsed_base, dropped)
        same = [p for p in parsed_base if p[1] is not None and _key(p[1]) == _key(u)]
        if not same:
            new.append(line)
            continue
        r = same[-1][1]
        if u.is_delete():
            if group:
                for p in same:
                    parsed_base.remove(p)
                if not r.is_add():  # deleting what the run added: the group stays out without a deletion
                    new.append(line)
            else:  # a value the run set is deleted after it is set; a second deletion would fail
                for p in [p for p in same if p[1].is_delete()]:
                    parsed_base.remove(p)
                new.append(line)
            continue
        for p in same:
            parsed_base.remove(p)
        body = line.lstrip("+")
        if group:  # the run's spelling was valid against the base defaults list (++ is refused for groups)
            new.append(("+" if r.is_add() else "") + body)
        elif any(o.is_add() or o.is_force_add() or o.is_delete() for o in (r, u)):
            new.append("++" + body)  # set whether or not the key exists after the run's overrides are gone
        else:
            new.append(body)
    return [p[0] for p in parsed_base], new, dropped


def _choice(recorded: Recorded, group: str, parsed: list) -> tuple[bool, str | None]:
    """Whether the run's option of `group` is known, and which: hydra.yaml's choices, else its own override."""
    if group in recorded.choices:
        old = recorded.choices[group]
        return True, None if old is None else str(old)
    own = [o for _, o in parsed if o is not None and o.key_or_group == group and o.package is None]
    if own:
        return True, None if own[-1].is_delete() else own[-1].input_line.split("=", 1)[1]
    return False, None


def _switch_group(recorded: Recorded, group: str, old, option: str | None, parsed: list, dropped: list) -> list:
    """The recorded overrides once `group` is switched to `option`: a value under the group stays where the new
    option has that key too (`stage.num_steps=2` across stages); the rest were for the old option and are left out
    (`tracking.uri=...` once tracking=none, `+optimizer.nesterov=true` once optimizer=adamw)."""
    prefix = group.replace("/", ".") + "."
    keys = _option_tree(recorded, group, option) if option is not None else None
    out = []
    for line, o in parsed:
        if o is None or not o.key_or_group.startswith(prefix) or o.package is not None:
            out.append((line, o))
        elif keys is not None and not o.is_delete() and _has_key(keys, o.key_or_group):
            out.append((line if o.type.name == "CHANGE" else "++" + line.lstrip("+"), o))
        else:
            where = f"{group}={option}" if option is not None else f"~{group}"
            dropped.append((line, f"for {group}={old}; {where} has no {o.key_or_group}"))
    return out


def _option_tree(recorded: Recorded, group: str, option: str) -> dict | None:
    """The keys an option's file puts in the config, nested from the root; None where it cannot be read."""
    dirs = ([Path(recorded.config_dir)] if recorded.config_dir else []) + [CONF_DIR]
    path = next((d / group / f"{option}.yaml" for d in dirs if (d / group / f"{option}.yaml").is_file()), None)
    try:
        text = path.read_text() if path else ""
        data = yaml.safe_load(text) if text else None
    except (OSError, yaml.YAMLError):
        return None
    if not isinstance(data, dict):
        return None
    package = group.replace("/", ".")
    for head in text.splitlines():  # Hydra's `# @package ...` header
        if not head.startswith("#"):
            break
        words = head.lstrip("#").split()
        if len(words) == 2 and words[0] == "@package":
            package = "" if words[1] == "_global_" else package if words[1] == "_group_" else words[1]
    for part in reversed([p for p in package.split(".") if p]):
        data = {part: data}
    return data


def _has_key(tree: dict, dotted: str) -> bool:
    node = tree
    for part in dotted.split("."):
        if not isinstance(node, dict) or part not in node:
            return False
        node = node[part]
    return True


def _is_group(recorded: Recorded, key: str) -> bool:
    if key in recorded.choices:
        return True
    dirs = [CONF_DIR] + ([Path(recorded.config_dir)] if recorded.config_dir else [])
    return any((d / key).is_dir() for d in dirs)


def plan(run_dir: str | Path, args: list[str]) -> Plan:
    """train.py's argv for repeating `run_dir` with `args` (flags and overrides)."""
    recorded = load_run(run_dir)
    flags, user = split_args(args)
    base, new, dropped = merge(recorded, user)
    head = []
    if recorded.config_dir:
        head += ["--config-dir", recorded.config_dir]
    if recorded.config_name != "config":
        head += ["--config-name", recorded.config_name]
    # a sweep config (sweeps/grid.yaml) sets hydra.mode=MULTIRUN and a search space: a repeat is one run,
    # and with -m it sweeps over your comma lists only
    mode = ["hydra.sweeper.params=null"] if {"-m", "--multirun"} & set(flags) else ["hydra.mode=RUN"]
    argv = [*head, *flags, *base, *mode, *new]
    return Plan(argv=argv, recorded=recorded.overrides, new=new, dropped=dropped)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        sys.exit(0 if argv else CONFIG_ERROR_EXIT)
    try:
        p = plan(argv[0], argv[1:])
    except RepeatError as e:
        print(f"config error: {e}", file=sys.stderr)
        sys.exit(CONFIG_ERROR_EXIT)
    if not QUIET_FLAGS & {a.split("=", 1)[0] for a in argv[1:]}:  # --cfg job prints the config only, as train.py
        run = load_run(argv[0])
        print(f"repeating {run.run_dir.resolve()}: {shlex.join(p.recorded) or '(no overrides)'}")
        print(f"  with: {shlex.join(p.new) or '(nothing new)'}")
        for line, why in p.dropped:
            print(f"  left out: {line} ({why})")
        if run.cwd and Path(run.cwd).resolve() != Path.cwd().resolve():
            print(f"  note: that run was launched from {run.cwd}; relative paths are now read from {Path.cwd()}")
        print(f"  = python {shlex.quote(str(TRAIN_PY))} {shlex.join(p.argv)}", flush=True)
    sys.argv = [str(TRAIN_PY), *p.argv]
    runpy.run_path(str(TRAIN_PY), run_name="__main__")  # train.py itself: @hydra.main under exp.job.run_cli


if __name__ == "__main__":
    main()
