"""What an Optuna study optimises: one or several metrics a trial logs (`hydra.sweeper.objective`), each with its
direction (`hydra.sweeper.direction`), read from the trial's metrics.jsonl once it has finished.

`objective: val/loss` (the default) is the final validation loss, the value train.py returns. Any other metric the
runs log works the same way: `eval/arc_easy/acc_norm` (with eval=lm_eval), `val/accuracy`, ... Several objectives
make a multi-objective study (Optuna's NSGA-II or TPE), whose result is a Pareto front instead of one best trial.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from exp.rundir import read_metrics, task_metrics

DEFAULT = "val/loss"
DIRECTIONS = ("minimize", "maximize")
# what every run logs at each evaluation (exp.loop.evaluate) and at each log interval
LOGGED = {"val/loss", "val/perplexity", "val/accuracy", "train/loss", "train/loss_ema", "train/accuracy"}


@dataclass(frozen=True)
class Objectives:
    names: tuple[str, ...]
    directions: tuple[str, ...]

    @property
    def multi(self) -> bool:
        return len(self.names) > 1

    @property
    def is_default(self) -> bool:
        return self.names == (DEFAULT,)

    def describe(self) -> str:
        return ", ".join(f"{d} {n}" for n, d in zip(self.names, self.directions, strict=True))


def parse(objective, direction) -> Objectives:
    """The objectives and their directions; ValueError (one line) for what does not fit. One direction applies to
    every objective; a list gives one each."""
    names = [objective] if isinstance(objective, str) or objective is None else list(objective)
    names = [DEFAULT if n is None else n for n in names]
    if not names or not all(isinstance(n, str) and n.count("/") >= 1 for n in names):
        raise ValueError(
            f"hydra.sweeper.objective={_show(objective)}: metric names such as val/loss or eval/<task>/<metric>"
        )
    if len(set(names)) != len(names):
        raise ValueError(f"hydra.sweeper.objective={_show(objective)}: a metric is named twice")
    directions = [direction] * len(names) if isinstance(direction, str) or direction is None else list(direction)
    directions = ["minimize" if d is None else d for d in directions]
    if len(directions) != len(names):
        raise ValueError(
            f"hydra.sweeper.direction={_show(direction)}: {len(directions)} directions for {len(names)} objective(s)"
        )
    bad = [d for d in directions if d not in DIRECTIONS]
    if bad:
        raise ValueError(f"hydra.sweeper.direction={bad[0]}: must be minimize or maximize")
    return Objectives(tuple(names), tuple(directions))


def _show(value) -> str:
    return "[" + ", ".join(map(str, value)) + "]" if isinstance(value, (list, tuple)) else str(value)


def check_logged(objectives: Objectives, trial_cfg: DictConfig) -> None:
    """ValueError naming the first objective a trial of this config would never log."""
    harness = OmegaConf.select(trial_cfg, "eval.harness", default=None)
    tasks = list(OmegaConf.select(trial_cfg, "eval.tasks", default=None) or [])
    for name in objectives.names:
        if name in LOGGED:
            continue
        if name.startswith("eval/") and name.count("/") == 2:
            task = name.split("/")[1]
            if harness is None:
                raise ValueError(
                    f"hydra.sweeper.objective={name}: the trials do not evaluate tasks (add eval=lm_eval "
                    f"eval.tasks=[{task}])"
                )
            from exp.eval.harness import DEFAULT_TASKS

            if task not in (tasks or list(DEFAULT_TASKS)):
                raise ValueError(
                    f"hydra.sweeper.objective={name}: the trials do not evaluate {task} (eval.tasks="
                    f"[{','.join(tasks or DEFAULT_TASKS)}])"
                )
            continue
        raise ValueError(
            f"hydra.sweeper.objective={name}: never logged by a run; use one of {', '.join(sorted(LOGGED))} or "
            "eval/<task>/<metric> (with eval=lm_eval)"
        )


class MissingObjective(Exception):
    """A finished trial never logged an objective (a task's metric misnamed, an evaluation that failed)."""


def values(run_dir: Path, objectives: Objectives) -> list[float]:
    """Each objective's last value in the trial's metrics.jsonl; MissingObjective naming the first one absent (or
    never finite)."""
    last: dict[str, float] = {}
    rows = read_metrics(Path(run_dir) / "metrics.jsonl")
    for row in rows:
        for name in objectives.names:
            value = row.get(name)
            if isinstance(value, (int, float)) and math.isfinite(value):
                last[name] = float(value)
    missing = [n for n in objectives.names if n not in last]
    if missing:
        hint = [f"eval/{name}" for name in sorted(task_metrics(rows))]
        raise MissingObjective(
            f"objective {missing[0]} was never logged" + (f" (the run logged {', '.join(hint)})" if hint else "")
        )
    return [last[n] for n in objectives.names]
