"""python -m exp.eval PATH: downstream tasks on a checkpoint, run directory, exp export or `--format hf` export.

Prints the harness's table (exp's built-in exp_stdlib_mc when no --tasks are given). A checkpoint of a run with an
MLflow run gets the scores in that run at the checkpoint's step (eval/<task>/<metric>), and the harness's results
JSON beside the run's own (RUN_DIR/eval/step_<N>.json). --all-checkpoints evaluates every kept checkpoint of a
run directory, oldest first, so the curve lands in the run; a checkpoint still being written (a temporary folder)
or one that fails its checksums is named and skipped.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import time
from pathlib import Path

from exp.checkpoint import CheckpointError
from exp.checkpoint.format import MANIFEST, list_checkpoints, read_trainer_state, verify_checkpoint
from exp.checkpoint.weights import ALLOW_TARGET_HELP, find_checkpoint
from exp.errors import ConfigError, ExpError
from exp.eval import harness
from exp.eval.callback import EVAL_DIR, write_results
from exp.generate import load_with_tokenizer
from exp.hardware import resolve_device
from exp.rundir import write_atomic
from exp.text import first_line

log = logging.getLogger("exp")

RUN_ID_WAIT_S = 300  # eval.launcher=slurm: how long a job waits for the training run to name its MLflow run


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m exp.eval", description=__doc__.split("\n\n")[0])
    p.add_argument("path", help="checkpoint folder, run directory, export folder or --format hf export")
    p.add_argument(
        "--tasks",
        action="append",
        default=[],
        metavar="NAMES",
        help="lm-eval task names, comma-separated or repeated (default: exp_stdlib_mc)",
    )
    p.add_argument("--include-path", help="a folder of task YAMLs of your own")
    p.add_argument("--limit", type=float, help="examples per task (a fraction when below 1)")
    p.add_argument("--num-fewshot", type=int)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N, mps or auto")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--all-checkpoints", action="store_true", help="every kept checkpoint of a run directory")
    p.add_argument("--no-record", action="store_true", help="print only: nothing goes to MLflow or the run dir")
    p.add_argument("--output", metavar="FILE", help="also write the harness's results JSON to FILE (one PATH only)")
    p.add_argument("--allow-target", action="append", default=[], metavar="PREFIX", help=ALLOW_TARGET_HELP)
    # eval.launcher=slurm's jobs: the checkpoint's hard links in RUN_DIR/eval/pending/, scored into RUN_DIR's run
    p.add_argument("--record-into", metavar="RUN_DIR", help=argparse.SUPPRESS)
    p.add_argument("--remove-after", action="store_true", help=argparse.SUPPRESS)
    return p


def main(argv=None) -> int:
    """CLI entry point: 0 when something was evaluated; 2 on bad input (before any model is loaded)."""
    args = _parser().parse_args(argv)
    cpus = os.environ.get("SLURM_CPUS_PER_TASK")
    if cpus and cpus.isdigit():  # a SLURM job (eval.launcher=slurm) uses the cores it was given, not the node's
        import torch

        torch.set_num_threads(int(cpus))
    try:
        spec = _spec(args)
        manager = harness.check_tasks(spec, where="--")
        targets = _targets(Path(args.path), args.all_checkpoints)
    except (ExpError, CheckpointError, OSError) as e:
        print(f"error: {first_line(e)}", file=sys.stderr)
        return 2
    evaluated = 0
    for target in targets:
        try:
            _evaluate(target, spec, manager, args)
            evaluated += 1
        except (CheckpointError, OSError, ValueError, KeyError) as e:
            print(f"skipped {target}: {first_line(e)}", file=sys.stderr)
            if args.record_into:  # a side job's failure, where the run's readers look: RUN_DIR/eval/
                failed = Path(args.record_into) / EVAL_DIR / f"{target.name}.failed"
                failed.write_text(f"{type(e).__name__}: {first_line(e)}\n")
        finally:
            _remove_pending(target, args)
    if not evaluated:
        print(f"error: {args.path}: no checkpoint could be evaluated", file=sys.stderr)
        return 2
    return 0


def _remove_pending(target: Path, args) -> None:
    """--remove-after: the hard links a side job was given, and only those (a folder under RUN_DIR/eval/pending)."""
    if not (args.remove_after and args.record_into):
        return
    pending = Path(args.record_into).resolve() / EVAL_DIR / "pending"
    if target.resolve().parent == pending and not target.is_symlink():
        shutil.rmtree(target, ignore_errors=True)


def _spec(args) -> harness.Spec:
    tasks = [t.strip() for group in args.tasks for t in group.split(",") if t.strip()]
    if args.batch_size < 1 or (args.limit is not None and args.limit <= 0):
        raise ConfigError("--batch-size must be >= 1 and --limit > 0")
    if args.output and args.all_checkpoints:
        raise ConfigError("--output takes the results of one PATH: it cannot be given with --all-checkpoints")
    return harness.Spec(
        tasks=tasks,
        include_path=args.include_path,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size,
        seed=args.seed,
    )


def _targets(path: Path, every: bool) -> list[Path]:
    """What to evaluate: the path itself, or with `every` each kept checkpoint of a run directory (the ones being
    written, in temporary folders, are named on stderr)."""
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if not every:  # a run directory: its newest valid checkpoint (named on stderr when newer ones are unusable)
        return [find_checkpoint(path) if (path / "checkpoints").is_dir() else path]
    root = path / "checkpoints"
    if not root.is_dir():
        raise CheckpointError(f"--all-checkpoints: {path} is not a run directory (no checkpoints/ folder)")
    for partial in sorted(p for p in root.iterdir() if p.name.startswith(".step_")):
        print(f"skipped {partial}: a checkpoint still being written (or left by a killed save)", file=sys.stderr)
    found = list_checkpoints(root)
    if not found:
        raise CheckpointError(f"--all-checkpoints: {root} holds no checkpoint")
    return found


def _evaluate(target: Path, spec: harness.Spec, manager, args) -> None:
    import torch

    from exp.eval.adapter import ExpLM

    checkpoint = target if (target / MANIFEST).is_file() else None
    if checkpoint is not None:
        verify_checkpoint(checkpoint)  # a corrupt or half-copied checkpoint is named, not scored
    model, tokenizer = load_with_tokenizer(target, resolve_device(args.device), args.allow_target)
    dtype = getattr(torch, args.dtype)
    device = next(model.parameters()).device
    autocast = None if dtype is torch.float32 else (lambda: torch.autocast(device.type, dtype=dtype))
    lm = ExpLM(model, tokenizer, batch_size=spec.batch_size, autocast=autocast, seed=spec.seed)
    started = time.perf_counter()
    results = harness.run(lm, spec, manager)
    seconds = time.perf_counter() - started
    step = read_trainer_state(checkpoint)["state"]["step"] if checkpoint is not None else None
    print(f"{target}" + (f" (step {step})" if step is not None else "") + f": {seconds:.1f} s")
    print(harness.table(results))
    if args.output:
        write_atomic(args.output, harness.results_json(results))
    if checkpoint is not None and not args.no_record:
        _record(checkpoint, step, results, Path(args.record_into) if args.record_into else None)


def _record(checkpoint: Path, step: int, results: dict, run_dir: Path | None = None) -> None:
    """The results JSON in the run dir's eval/ folder, and the scores in the checkpoint's MLflow run at its step
    (`run_dir`: the run the checkpoint belongs to, when it is not the folder above checkpoints/)."""
    from exp.tracking import resumed_run_id

    if run_dir is not None:  # the run dir names the MLflow run where the checkpoint does not yet
        checkpoint_in_run = run_dir / "checkpoints" / checkpoint.name
    else:
        run_dir, checkpoint_in_run = checkpoint.parent.parent, checkpoint
    path = write_results(run_dir, step, results) if checkpoint_in_run.parent.name == "checkpoints" else None
    state = read_trainer_state(checkpoint)
    uri, run_id = state.get("mlflow_tracking_uri"), resumed_run_id(state, checkpoint_in_run)
    deadline = time.monotonic() + RUN_ID_WAIT_S
    while uri and run_id is None and checkpoint_in_run != checkpoint and time.monotonic() < deadline:
        time.sleep(1)  # a side job of a run whose MLflow worker has not named its run yet (mlflow_run.json)
        run_id = resumed_run_id(state, checkpoint_in_run)
    if not uri or not run_id:
        return
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    stamp = int(time.time() * 1000)
    metrics = [Metric(k, v, stamp, step) for k, v in harness.metrics_of(results).items()]
    try:
        client.log_batch(run_id, metrics=metrics)
        if path is not None:
            client.log_artifact(run_id, str(path), EVAL_DIR)
    except Exception as e:  # the scores are printed and kept in the run dir; MLflow being away loses nothing
        print(f"warning: MLflow run {run_id} at {uri}: {first_line(e)}", file=sys.stderr)
        return
    print(f"logged to MLflow run {run_id} at step {step}")
