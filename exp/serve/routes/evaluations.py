"""Downstream evaluation of a job: its scores by step (RUN_DIR/eval/step_<N>.json, written by eval=lm_eval in the
loop or by python -m exp.eval), and "evaluate now": python -m exp.eval on the job's newest checkpoint, in a process
of its own beside the training (which it never touches), its scores logged into the job's MLflow run at that
checkpoint's step (its output: RUNS/.serve/logs/<job>-evaluate.log)."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Body, HTTPException
from pydantic import BaseModel, Field

import exp.serve.control as control
from exp.rundir import read_summary
from exp.serve.bodies import ID
from exp.serve.guard import Refused, read_inside
from exp.serve.state import ServiceDep

router = APIRouter(tags=["evaluations"])

EVAL_DIR = "eval"  # exp.eval.callback.EVAL_DIR (not imported: the service does not need lm-eval to list scores)
RESULTS = re.compile(r"step_(\d{8,})\.json")
TASK_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,99}$"  # a task by name: never a path


class EvaluateIn(BaseModel):
    """What to evaluate: lm-eval task names (default: the job's eval.tasks, else exp_stdlib_mc) and a limit."""

    tasks: list[Annotated[str, Field(pattern=TASK_NAME)]] = Field(default_factory=list, max_length=16)
    limit: float | None = Field(default=None, gt=0, le=1_000_000)


@router.get("/api/training/jobs/{job_id}/evaluations")
def evaluations(job_id: ID, svc: ServiceDep) -> dict:
    """The job's downstream scores, oldest step first: {step, tasks: {task: {metric: value}}}, and whether an
    evaluation started here is still running."""
    job = svc.job_or_404(job_id)
    run_dir = Path(job["run_dir"])
    steps = []
    folder = run_dir / EVAL_DIR
    names = sorted(p.name for p in folder.iterdir()) if folder.is_dir() and not folder.is_symlink() else []
    for name in names:
        match = RESULTS.fullmatch(name)
        if match is None:
            continue
        try:
            results = json.loads(read_inside(run_dir, Path(EVAL_DIR) / name))["results"]
        except (OSError, ValueError, KeyError, TypeError, Refused):
            continue  # a file being replaced, or not the harness's
        steps.append({"step": int(match.group(1)), "tasks": _scores(results)})
    child = svc.evaluations.get(job_id)
    return {"job_id": job_id, "steps": steps, "running": child is not None and child.poll() is None}


def _scores(results) -> dict:
    out = {}
    for task, values in results.items() if isinstance(results, dict) else []:
        if isinstance(values, dict):
            out[str(task)] = {
                k.split(",")[0]: v
                for k, v in values.items()
                if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "sample_len"
            }
    return out


@router.post("/api/training/jobs/{job_id}/evaluate", status_code=202)
def evaluate_now(job_id: ID, svc: ServiceDep, body: Annotated[EvaluateIn | None, Body()] = None) -> dict:
    """python -m exp.eval on the job's newest checkpoint, beside the training. 409 while one runs or when the job has
    no checkpoint yet; 422 for a task lm-eval does not know (or lm-eval not installed)."""
    job = svc.job_or_404(job_id)
    run_dir = Path(job["run_dir"])
    body = body or EvaluateIn()
    if not control.served_checkpoints(run_dir):
        raise HTTPException(409, f"job {job_id} has no checkpoint to evaluate yet")
    tasks = body.tasks or _configured_tasks(run_dir)
    from exp.eval.harness import Spec, check_tasks

    check_tasks(Spec(tasks=tasks), where="")  # ConfigError: a 422 with its one line
    with svc.claims.hold(f"evaluate:{job_id}", f"job {job_id} is being evaluated already"):
        running = svc.evaluations.get(job_id)
        if running is not None and running.poll() is None:
            raise HTTPException(409, f"job {job_id} is being evaluated already")
        command = [sys.executable, "-m", "exp.eval", str(run_dir), "--tasks", ",".join(tasks)]
        command += [a for prefix in svc.settings.allow_targets for a in ("--allow-target", prefix)]
        command += ["--limit", f"{body.limit:g}"] if body.limit else []
        # the output goes to the service's own folder: nothing is written through a link planted in a run dir
        svc.launcher.logs.mkdir(parents=True, exist_ok=True)
        svc.evaluations[job_id] = svc.launcher.spawn_logged(command, svc.launcher.logs / f"{job_id}-evaluate.log")
    summary = read_summary(run_dir) or {}
    return {"job_id": job_id, "requested": "evaluate", "tasks": tasks, "status": summary.get("status")}


def _configured_tasks(run_dir: Path) -> list[str]:
    """The job's own eval.tasks (its .hydra/config.yaml), else exp's built-in task."""
    try:
        import yaml

        cfg = yaml.safe_load(read_inside(run_dir, Path(".hydra") / "config.yaml"))
        tasks = ((cfg or {}).get("eval") or {}).get("tasks") or []
    except (OSError, ValueError, Refused, AttributeError, yaml.YAMLError):
        tasks = []
    named = [t for t in tasks if isinstance(t, str) and re.match(TASK_NAME, t)]
    return named or ["exp_stdlib_mc"]
