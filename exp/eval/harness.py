"""Evaluation with lm-evaluation-harness: which tasks (checked before a run starts), running them on an ExpLM, and
the results as exp records them (eval/<task>/<metric> metrics, the harness's table and results JSON).

`lm-eval` is an optional extra (`pip install -e '.[eval]'`): this module imports it only inside its functions, so
that `eval=none` (the default) and the rest of exp never need it.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from exp.errors import ConfigError

log = logging.getLogger("exp")

BUILTIN_TASKS = Path(__file__).with_name("tasks")
BUILTIN = ("exp_stdlib_mc", "exp_stdlib_ppl")
DEFAULT_TASKS = ("exp_stdlib_mc",)  # eval=lm_eval with no tasks named: the offline multiple-choice task
CHANCE = {"exp_stdlib_mc": {"acc": 0.25, "acc_norm": 0.25}}  # what guessing scores, shown beside the results
INSTALL_HINT = "lm-eval is not installed: pip install -e '.[eval]' (lm-eval >= 0.4)"


@dataclass
class Spec:
    """What to evaluate and how (the `eval` config node, or exp.eval's command line)."""

    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    include_path: str | None = None
    num_fewshot: int | None = None
    limit: float | None = None  # examples per task (a fraction when below 1); None: all
    batch_size: int = 16
    seed: int = 0
    bootstrap_iters: int = 1000  # the harness's bootstrap for stderr of non-mean metrics (perplexities)
    max_gen_toks: int = 256

    def __post_init__(self):
        self.tasks = list(self.tasks or DEFAULT_TASKS)


def require_lm_eval() -> None:
    """ConfigError (one line, exit 2) when lm-eval cannot be imported."""
    try:
        import lm_eval  # noqa: F401
    except ImportError:
        raise ConfigError(INSTALL_HINT) from None


class _TaskYamlLoader(yaml.SafeLoader):
    """Reads a task YAML as data: `!function` tags stay strings (nothing is imported to check a file)."""


_TaskYamlLoader.add_constructor("!function", lambda loader, node: loader.construct_scalar(node))


def check_include_path(include_path: str | None, where: str = "eval.include_path") -> Path | None:
    """The folder of task YAMLs, each parsed: ConfigError naming the first that is missing or does not parse."""
    if include_path is None:
        return None
    folder = Path(include_path).expanduser()
    if not folder.is_dir():
        raise ConfigError(f"{where}={include_path}: no such folder of task YAMLs")
    for path in sorted(folder.rglob("*.yaml")):
        try:
            loaded = yaml.load(path.read_text("utf-8"), Loader=_TaskYamlLoader)
        except (yaml.YAMLError, UnicodeDecodeError) as e:
            mark = getattr(e, "problem_mark", None)
            at = f" line {mark.line + 1}" if mark is not None else ""
            problem = getattr(e, "problem", None) or type(e).__name__
            raise ConfigError(f"{where}: {path}{at}: not a task YAML ({problem})") from None
        if not isinstance(loaded, dict):
            raise ConfigError(f"{where}: {path}: not a task YAML (a mapping of task keys)")
    return folder


def task_manager(spec: Spec, where: str = "eval."):
    """The harness's TaskManager over exp's built-in tasks and spec.include_path; the harness's own tasks (slow to
    index: thousands of YAMLs) only when a task named is not among those."""
    require_lm_eval()
    from lm_eval.tasks import TaskManager

    folder = check_include_path(spec.include_path, f"{where}include_path".replace("--include_path", "--include-path"))
    if folder is None:  # the installed harness's and exp's tasks only: indexed once per process
        manager = _installed_tasks(False)
        return manager if all(t in manager.all_tasks for t in spec.tasks) else _installed_tasks(True)
    paths = [str(BUILTIN_TASKS), str(folder)]  # a folder of the user's: read again each time (it may change)
    manager = TaskManager(include_path=paths, include_defaults=False, verbosity="ERROR")
    if all(t in manager.all_tasks for t in spec.tasks):
        return manager
    return TaskManager(include_path=paths, include_defaults=True, verbosity="ERROR")


@functools.lru_cache(maxsize=2)
def _installed_tasks(include_defaults: bool):
    """exp's built-in tasks, with the harness's own (thousands of YAMLs, seconds to index) when asked."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=[str(BUILTIN_TASKS)], include_defaults=include_defaults, verbosity="ERROR")


def check_tasks(spec: Spec, manager=None, where: str = "eval."):
    """The TaskManager, once every task in spec.tasks is known: ConfigError naming the first unknown one (`where`:
    how the user named the keys, "eval." in a config, "--" on the command line)."""
    manager = manager or task_manager(spec, where)
    known = set(manager.all_tasks)
    for name in spec.tasks:
        if name not in known:
            hint = f" (nor in {spec.include_path})" if spec.include_path else ""
            raise ConfigError(
                f"{where}tasks: unknown task {name!r}: not one of lm-eval's tasks nor exp's {', '.join(BUILTIN)}{hint}"
            )
    return manager


def run(lm, spec: Spec, manager=None) -> dict | None:
    """The harness's results dict (on rank 0; None on other ranks) for spec's tasks on lm."""
    from lm_eval import simple_evaluate

    manager = manager or check_tasks(spec)
    _quiet_harness()
    # the harness draws a progress bar per task and request type on stderr (tqdm, no switch to turn them off);
    # a run's log and exp.eval's table say what was done. Log records keep their own stream.
    with contextlib.redirect_stderr(io.StringIO()):
        return _evaluate(simple_evaluate, lm, spec, manager)


def _evaluate(simple_evaluate, lm, spec: Spec, manager) -> dict | None:
    return simple_evaluate(
        model=lm,
        tasks=list(spec.tasks),
        num_fewshot=spec.num_fewshot,
        limit=spec.limit,
        task_manager=manager,
        bootstrap_iters=spec.bootstrap_iters,
        log_samples=False,
        random_seed=spec.seed,
        numpy_random_seed=spec.seed,
        torch_random_seed=spec.seed,
        fewshot_random_seed=spec.seed,
    )


def _quiet_harness() -> None:
    """The harness logs every task it builds at INFO and warns about defaults it chose; exp prints its own table."""
    for name in ("lm-eval", "lm_eval", "lm_eval.api.task", "lm_eval.evaluator"):
        logging.getLogger(name).setLevel(logging.ERROR)


def metrics_of(results: dict) -> dict[str, float]:
    """{"eval/<task>/<metric>": value} of every numeric result: `acc,none` -> acc, `acc_stderr,none` -> acc_stderr,
    a metric under another filter as `<metric>@<filter>`. Values that are not numbers (N/A) are left out."""
    out = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            if key in ("alias", "sample_len") or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            metric, _, filt = key.partition(",")
            name = metric if filt in ("", "none") else f"{metric}@{filt}"
            if math.isfinite(value):
                out[f"eval/{task}/{name}"] = float(value)
    return out


def table(results: dict) -> str:
    """The harness's own table of the results (markdown), with the chance level of exp's tasks below it."""
    from lm_eval.utils import make_table

    text = make_table(results)
    chance = [
        f"{task} chance: " + ", ".join(f"{m} {v:.2f}" for m, v in CHANCE[task].items())
        for task in results.get("results", {})
        if task in CHANCE
    ]
    return text + ("\n".join(chance) + "\n" if chance else "")


def results_json(results: dict) -> str:
    """The harness's results as JSON (its configs hold functions and paths: those become strings)."""
    return json.dumps(results, indent=2, default=str, sort_keys=True) + "\n"
