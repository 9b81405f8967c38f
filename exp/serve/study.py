"""A sweep's Optuna study as the dashboard shows it: each parameter's importance, and the Pareto front of a
multi-objective study.

The study is read only from its file in the sweep's folder (SQLite `optuna.db` or a journal `optuna.journal`, as
exp's sweeper stores it), opened through open_inside (no symlink on the way, nothing outside the runs directory)
and copied to a temporary file that Optuna opens: the sweep's own file is never written, nor locked, by the service.
A study in a database server (hydra.sweeper.storage=postgresql://...) is not read.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import warnings
from pathlib import Path, PurePosixPath

from exp.serve.guard import Refused, open_inside, read_inside, relative_inside
from exp.sweep.manifest import MANIFEST
from exp.sweep.pruning import JOURNAL

SQLITE = "sqlite:///"
EVALUATOR = "PedAnovaImportanceEvaluator"  # Optuna's own, no scikit-learn needed (fANOVA, the default, needs it)


class StudyUnavailable(Exception):
    """No study to read: a grid, a storage outside the sweep's folder, a symlink, a missing file (HTTP 404)."""


class StudyUnreadable(Exception):
    """The study's file is there but could not be read now (being written, another Optuna's format): HTTP 409."""


def study_file(runs_dir: Path, sweep_dir: Path) -> tuple[PurePosixPath, str, str, dict]:
    """(the study file relative to the runs directory, its kind: sqlite or journal, the study's name, sweep.json's
    study block) from the sweep's sweep.json; StudyUnavailable with the line to show otherwise."""
    try:
        folder = PurePosixPath(relative_inside(runs_dir, sweep_dir))
        manifest = json.loads(read_inside(runs_dir, folder / MANIFEST))
    except (FileNotFoundError, NotADirectoryError):
        raise StudyUnavailable(f"sweep {sweep_dir.name} is not an Optuna study (no {MANIFEST})") from None
    except Refused as e:
        raise StudyUnavailable(f"sweep {sweep_dir.name}: {e}") from None
    except (OSError, ValueError) as e:
        raise StudyUnreadable(f"{MANIFEST} of sweep {sweep_dir.name} could not be read: {e}") from None
    block = manifest.get("study") if isinstance(manifest, dict) else None
    if not isinstance(block, dict) or not isinstance(block.get("storage"), str):
        raise StudyUnavailable(f"sweep {sweep_dir.name} is not an Optuna study (a grid, or no trial has started)")
    spec = block["storage"]
    if spec.startswith(SQLITE):
        kind, path = "sqlite", spec[len(SQLITE) :]
    elif spec.startswith(JOURNAL):
        kind, path = "journal", spec[len(JOURNAL) :]
    else:
        scheme = spec.split(":", 1)[0][:40]
        raise StudyUnavailable(f"the study of sweep {sweep_dir.name} is in a {scheme} database: not read here")
    path = PurePosixPath(path)
    # the file the sweeper made in the sweep's folder, where the sweep lies now or was when it ran (moved since)
    recorded = {str(Path(sweep_dir).resolve()), str(manifest.get("sweep_dir") or "")}
    if str(path.parent) not in recorded or path.name in ("", ".", ".."):
        raise StudyUnavailable(f"the study of sweep {sweep_dir.name} is stored outside its folder: not read")
    return folder / path.name, kind, str(block.get("study_name") or "exp"), block


def load_study(runs_dir: Path, sweep_dir: Path):
    """The sweep's Optuna study, from a private copy of its file. StudyUnavailable / StudyUnreadable."""
    import optuna

    relative, kind, name, _ = study_file(runs_dir, sweep_dir)
    with tempfile.TemporaryDirectory(prefix="exp-study-") as tmp:
        copy = Path(tmp) / relative.name
        try:
            with open_inside(runs_dir, relative) as src, open(copy, "wb") as dst:
                shutil.copyfileobj(src, dst)
        except (Refused, FileNotFoundError) as e:
            raise StudyUnavailable(f"the study file of sweep {sweep_dir.name}: {e}") from None
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            if kind == "sqlite":
                storage = optuna.storages.RDBStorage(f"{SQLITE}{copy}")
            else:
                from optuna.storages.journal import JournalFileBackend

                storage = optuna.storages.JournalStorage(JournalFileBackend(str(copy)))
            study = optuna.load_study(study_name=name, storage=storage)
            study.get_trials(deepcopy=False)  # read now, before the copy goes
            return in_memory(study)
        except KeyError:
            raise StudyUnavailable(f"no study {name!r} in the study file of sweep {sweep_dir.name}") from None
        except Exception as e:  # a torn copy of a file being written, a newer Optuna's schema: one line, not a 500
            line = str(e).strip().splitlines()[0][:300] if str(e).strip() else type(e).__name__
            raise StudyUnreadable(f"the study of sweep {sweep_dir.name} could not be read: {line}") from None


def in_memory(study):
    """The study's finished trials, directions and user attributes copied into memory, to outlive the temporary
    file."""
    import optuna

    copy = optuna.create_study(directions=study.directions, study_name=study.study_name)
    for key, value in study.user_attrs.items():
        copy.set_user_attr(key, value)
    copy.add_trials(complete_trials(study))
    return copy


def objective_names(study) -> list[str]:
    names = study.user_attrs.get("objectives")
    if isinstance(names, list) and len(names) == len(study.directions):
        return [str(n) for n in names]
    return ["val/loss"] if len(study.directions) == 1 else [f"objective {i}" for i in range(len(study.directions))]


def complete_trials(study) -> list:
    from optuna.trial import TrialState

    return study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))


def importances(study) -> dict:
    """Each parameter's importance to each objective (Optuna's PED-ANOVA, summing to 1 per objective); with fewer
    than two finished trials, none and a `message` saying why."""
    from optuna.importance import PedAnovaImportanceEvaluator, get_param_importances
    from optuna.study import StudyDirection

    done = complete_trials(study)
    names = objective_names(study)
    out = {"evaluator": EVALUATOR, "num_complete": len(done), "objectives": [], "message": None}
    if len(done) < 2:
        out["message"] = f"{len(done)} finished trial{'s' if len(done) != 1 else ''}: importances need at least 2"
        return out
    for i, (name, direction) in enumerate(zip(names, study.directions, strict=True)):
        sign = -1.0 if direction == StudyDirection.MAXIMIZE else 1.0  # the evaluator takes lower as better

        def target(trial, i=i, sign=sign):
            return sign * trial.values[i]

        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "assumes minimization": the sign above sees to it
            try:
                found = get_param_importances(study, evaluator=PedAnovaImportanceEvaluator(), target=target)
            except (ValueError, RuntimeError) as e:  # parameters whose ranges changed between trials, ...
                out["message"] = f"importances could not be computed: {str(e).strip().splitlines()[0][:300]}"
                return out
        out["objectives"].append(
            {
                "name": name,
                "direction": direction.name.lower(),
                "importances": {k: float(v) for k, v in found.items()},
            }
        )
    if not any(o["importances"] for o in out["objectives"]):
        out["message"] = "no parameter was sampled in every finished trial"
    return out


def pareto_front(study) -> dict:
    """Every finished trial's objective values, those on the Pareto front marked (study.best_trials); a
    single-objective study has no front (`multi_objective` false, and a `message`)."""
    names = objective_names(study)
    directions = [d.name.lower() for d in study.directions]
    out = {"objectives": names, "directions": directions, "multi_objective": len(names) > 1, "trials": []}
    if len(names) < 2:
        out["message"] = "a single-objective study: its best trial is starred in the trials' table"
        return out
    front = {t.number for t in study.best_trials}
    out["trials"] = [
        {"num": t.number, "values": [float(v) for v in t.values], "front": t.number in front, "params": t.params}
        for t in complete_trials(study)
    ]
    if not out["trials"]:
        out["message"] = "no finished trial yet"
    return out
