"""Build everything one run needs from the composed config, in order, and run the loop."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from exp import config, hardware, loop, rundir
from exp import dist as exp_dist
from exp.callbacks import Checkpointer, ConsoleLog, FirstStepClock, ProgressBar
from exp.checkpoint import (
    CheckpointError,
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from exp.faults import EarlyStopping, FaultGuard, StopSignals
from exp.optim import build_optimizer, hyperparameters, resume_with_changes
from exp.rundir import MetricsFile, RunDirInUse, RunLock, plot_run, write_json
from exp.text import first_line, fmt_loss
from exp.tracking import NullTracker

log = logging.getLogger("exp")

# Keys that may change between a checkpoint and its resumption without changing what is trained.
RESUME_IGNORES = (
    "run_dir",
    "run_name",
    "dry_run",
    "resume",
    "sample",
    "tracking",
    "checkpoint",
    "nan",
    "early_stopping",
    "callbacks",
    "hardware.num_threads",
)


def train(cfg: DictConfig) -> float:
    """Validate, build, train, evaluate, sample and summarise one run; return the final validation loss."""
    config.job_started()
    try:
        valid = config.validate(cfg)
    except config.ConfigError as e:
        if in_sweep():  # the launcher validated this point; what fails now is this node's (no GPU, no bf16)
            return fail_at_start(cfg, e)
        config.exit_on_config_error(e, run_dir=OmegaConf.select(cfg, "run_dir", throw_on_resolution_failure=False))
    if valid.run.dry_run:
        from exp.plan import format_plan, make_plan

        print(format_plan(make_plan(cfg, valid.stage, valid.hardware)))
        config.discard_untouched_run_dir(valid.run.run_dir)
        return float("nan")

    try:  # checked here, not in validation: a sweep's launching process is one process by design
        exp_dist.check_launch(valid.hardware.distributed)
    except ValueError as e:
        config.exit_on_config_error(config.ConfigError(str(e)), run_dir=valid.run.run_dir)
    dist = exp_dist.init(valid.hardware.distributed, valid.hardware.torch_device().type)
    # every rank composed the config itself; a time-stamped run dir can differ by a second: rank 0's wins
    run_dir = Path(dist.broadcast_str(str(valid.run.run_dir)))
    if not dist.is_main:
        if str(run_dir) != str(valid.run.run_dir):
            config.discard_untouched_run_dir(valid.run.run_dir)
        logging.getLogger("exp").setLevel(logging.WARNING)  # one rank reports
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        lock = RunLock(run_dir) if dist.is_main else contextlib.nullcontext()
        lock.__enter__()
    except RunDirInUse as e:
        _exit(f"error: {e}", 1)
    try:
        return _train(cfg, valid, run_dir, dist)
    finally:
        lock.__exit__(None, None, None)
        exp_dist.shutdown()


def _train(cfg: DictConfig, valid: config.Validated, run_dir: Path, dist: exp_dist.Dist) -> float:
    started = time.perf_counter()
    stage, run = valid.stage, valid.run
    ckpt_root = Path(cfg.checkpoint.dir)
    sharded = dist.strategy == "fsdp" and dist.enabled
    try:
        found = find_resume_checkpoint(run.resume, ckpt_root) if dist.is_main else None
        resume_from = Path(found) if (found := dist.broadcast_str(str(found or ""))) else None
        resumed = read_trainer_state(resume_from) if resume_from else {}
        saved_cfg, current_cfg, changes = {}, {}, {}
        if resume_from:
            saved_cfg, current_cfg, changes = check_config_change(
                resume_from / "config.yaml", cfg, run.resume.allow_config_change
            )
    except config.ConfigError as e:
        config.exit_on_config_error(e)
    except CheckpointError as e:
        _exit(f"error: cannot resume: {e}", 2)
    state = _state_from_dict(resumed.get("state", {}))

    make_tracker = instantiate(cfg.tracking) if dist.is_main else NullTracker  # only rank 0 talks to MLflow
    tracker = make_tracker(cfg=cfg, run_dir=run_dir, resume_run_id=resumed.get("mlflow_run_id"))
    signals, clock = StopSignals(), FirstStepClock()
    stateful = {"early_stopping": EarlyStopping(run.early_stopping)}  # kept in checkpoints (Callback.state_dict)
    stateful |= {f"callbacks.{name}": instantiate(node) for name, node in cfg.callbacks.items()}
    callbacks = [clock, signals, *stateful.values()]
    status, summary = "FAILED", None
    try:
        rt = hardware.setup(valid.hardware, stage.dtype, dist.local_rank)
        seed_everything(run.seed)
        data = instantiate(cfg.data)
        model = instantiate(cfg.model).to(rt.device)
        if sharded:  # FSDP shards before the optimizer exists, so it holds only this rank's shards
            model = exp_dist.wrap(model, dist, rt.dtype)
        optimizer = build_optimizer(instantiate(cfg.optimizer), model, device=rt.device)
        scheduler = instantiate(cfg.scheduler)(optimizer)
        scaler = rt.grad_scaler()
        batches = data.train_sampler(
            stage.batch_size_per_gpu, seed=run.seed, rank=dist.rank, world_size=dist.world_size
        )
        val_batches = [
            (x.to(rt.device), y.to(rt.device))
            for x, y in data.val_batches(stage.batch_size_per_gpu, stage.num_eval_batches)
        ]
        data_info = data.describe() | (data.stats() if hasattr(data, "stats") else {})
        log.info("data: " + ", ".join(f"{k}={v}" for k, v in data_info.items()))
        stage.setup(model, rt)
        if stage.init_from and not resume_from:
            from exp.checkpoint import load_model_weights
            from exp.export import locate_model

            weights, _ = locate_model(stage.init_from)
            load_model_weights(weights, model)
            log.info(f"initialised from {weights}")
        for cb in callbacks:
            cb.on_build(model, optimizer, scheduler)
        if resume_from:
            configured = hyperparameters(optimizer)  # this config's settings, before the checkpoint's replace them
            try:
                restored = _loader(sharded)(
                    resume_from, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
                )
            except CheckpointError as e:
                _exit(f"error: cannot resume from {resume_from}: {e}", 2)
            batches.load_state_dict(restored["sampler"])
            for name, values in restored.get("callbacks", {}).items():
                if name in stateful:
                    stateful[name].load_state_dict(values)
            resumed_lr = ""
            if changes:
                before, after = resume_with_changes(
                    optimizer, scheduler, configured, saved_cfg, current_cfg, state.step
                )
                resumed_lr = f" | lr {before:.3e} -> {after:.3e} (changed: {', '.join(changes)})"
            log.info(f"resumed from {resume_from} at step {state.step}{resumed_lr}")
        step_model = exp_dist.wrap(model, dist, rt.dtype) if dist.strategy == "ddp" else model
        step_model = torch.compile(step_model) if rt.compile else step_model
        config_yaml = OmegaConf.to_yaml(cfg, resolve=True)
        if changes and dist.is_main:
            record_config_changes(run_dir, tracker, state.step, changes)

        def save(st: loop.TrainState) -> Path:
            trainer_state = {
                "state": _state_to_dict(st),
                "sampler": batches.state_dict(),
                "callbacks": {k: v for k, cb in stateful.items() if (v := cb.state_dict()) is not None},
                "seed": run.seed,
                "mlflow_run_id": tracker.run_id,
                "mlflow_tracking_uri": tracker.uri,
            }
            if sharded:  # every rank writes its shard
                from exp.dist_checkpoint import save_sharded as saver
            elif dist.is_main:
                saver = save_checkpoint  # looked up at call time: tests stall it to kill a process mid-write
            else:  # DDP: the replicas are identical; rank 0 writes
                return ckpt_root / checkpoint_name(st.step)
            return saver(
                ckpt_root,
                st.step,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                trainer_state=trainer_state,
                config_yaml=config_yaml,
            )

        def rollback(st: loop.TrainState, lr_factor: float) -> bool:
            dist.barrier()  # rank 0 may still be writing the newest checkpoint
            found = latest_valid_checkpoint(ckpt_root, warn=log.warning) if dist.is_main else None
            if not (found := dist.broadcast_str(str(found or ""))):
                return False
            back = _loader(sharded)(Path(found), model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
            for key, value in dataclasses.asdict(_state_from_dict(back["state"])).items():
                setattr(st, key, value)
            for group in optimizer.param_groups:
                group["lr"] *= lr_factor
            scheduler.base_lrs = [lr * lr_factor for lr in scheduler.base_lrs]
            checkpointer.follow(st)  # the best checkpoint is the one the restored state knows
            return True

        def rotate(keep: int, protect: set) -> None:
            if dist.is_main:
                rotate_checkpoints(ckpt_root, keep, protect)

        # every callback hears of checkpoints and faults (the list is read at call time: the tracker joins below)
        checkpointer: Checkpointer = instantiate(cfg.checkpoint)(save=save, rotate=rotate, listeners=callbacks)
        if resume_from:
            checkpointer.last_path, checkpointer.last_step = resume_from, state.step
        metrics_file = MetricsFile(run_dir / "metrics.jsonl", keep_until_step=state.step)
        reporters = [ConsoleLog(stage.num_steps), metrics_file, ProgressBar(stage.num_steps)] if dist.is_main else []
        callbacks += [checkpointer, *reporters]
        guard = FaultGuard(run.nan, rollback, on_event=lambda st, m: [cb.on_fault(st, m) for cb in callbacks])
        log.info(
            f"run dir {run_dir} | {model.num_params():,} parameters | {rt.device} {rt.dtype} "
            f"| {stage.num_steps} steps of {stage.samples_per_step} x {cfg.data.seq_len} tokens"
        )
        for cb in callbacks:
            cb.on_train_start(state)
        callbacks.append(tracker)
        state = loop.train(
            stage,
            step_model,
            optimizer,
            scheduler,
            batches,
            val_batches,
            rt,
            callbacks,
            state,
            scaler=scaler,
            guard=guard,
            dist=dist,
        )

        final = checkpointer.save(state)
        status = "KILLED" if signals.received else "FINISHED"  # a preempted job is KILLED until requeued
        stop_reason = next((cb.stop_reason for cb in callbacks if cb.should_stop and cb.stop_reason), None)
        if stop_reason and dist.is_main:
            tracker.set_tags({"stop_reason": stop_reason, "stopped_at_step": str(state.step)})
        if not dist.is_main:
            return state.val_loss
        sample = None
        if status == "FINISHED" and not sharded:  # a sharded model has no whole copy here to sample from
            sample = generate_sample(model, run.sample, data.vocab_size, rt)
        if sample is not None:
            log.info(f"sample:\n{run.sample.prompt}{sample}")
        summary = write_summary(
            run_dir,
            state,
            stage,
            model,
            tracker,
            sample,
            time.perf_counter() - started,
            status=status,
            checkpoint=final,
            best_checkpoint=checkpointer.best_path,
            first_step_time=clock.first_step_time,
            num_skipped_steps=guard.num_skipped,
            num_rollbacks=guard.num_rollbacks,
            data=data_info,
            stop_reason=stop_reason,
            compiled=rt.compile,
        )
        _log_run_artifacts(run_dir, tracker)
        log.info(
            f"{status.lower()}: step {state.step} | val loss {fmt_loss(state.val_loss, 'n/a')} "
            f"| {summary['tokens_per_s']:,.0f} tok/s"
            + (f" (compile {summary['compile_seconds']:.1f} s)" if summary["compile_seconds"] is not None else "")
            + f" | checkpoint {final} | summary {run_dir / 'summary.json'}"
        )
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    except Exception as e:
        if isinstance(e, loop.TrainingFailed):
            log.error(str(e))
        else:
            log.exception(f"training failed: {e}")
        if dist.is_main:
            error = f"{type(e).__name__}: {first_line(e)}"
            write_failure_summary(run_dir, state, tracker, error, stage_name=stage.name, num_steps=stage.num_steps)
        if in_sweep():  # one failed trial is recorded (FAILED) and the sweep goes on
            return float("nan")
        if isinstance(e, loop.TrainingFailed):
            _exit(f"error: {e}", 1)
        raise
    finally:
        if tracker not in callbacks:
            callbacks.append(tracker)
        for cb in callbacks:
            cb.on_train_end(state, status)
    if signals.preempted:
        signals.hand_over()  # submitit requeues the job and exits; the requeued job resumes from the checkpoint
    if status == "KILLED":
        _exit(
            f"stopped by {signals.received and _signal_name(signals.received)} at step {state.step}; "
            f"rerun with the same hydra.run.dir (resume=auto) to continue",
            signals.exit_code,
        )
    return state.val_loss


def find_resume_checkpoint(resume: config.ResumeConfig, ckpt_root: Path) -> Path | None:
    """The checkpoint a run continues from: resume.path=auto, a checkpoint folder, a run dir, or None."""
    if resume.path is None:
        if list_checkpoints(ckpt_root):
            raise config.ConfigError(
                f"resume.path=null but {ckpt_root} already holds checkpoints: resume=auto "
                "continues them, or choose a new hydra.run.dir"
            )
        return None
    if resume.path == "auto":
        return latest_valid_checkpoint(ckpt_root, warn=log.warning)
    path = Path(resume.path).expanduser()
    if (path / "manifest.json").exists() or (path / "trainer_state.json").exists():
        verify_checkpoint(path)
        return path
    for root in (path / "checkpoints", path):
        found = latest_valid_checkpoint(root, warn=log.warning)
        if found:
            return found
    raise config.ConfigError(f"resume.path={path} holds no valid checkpoint")


def check_config_change(saved_yaml: Path, cfg: DictConfig, allowed: bool) -> tuple[dict, dict, dict]:
    """Refuse to resume with a different config (listing the keys) unless resume.allow_config_change=true.

    Returns the checkpoint's and this run's resolved configs and the changed keys as {key: (old, new)}.
    """
    saved_tree = OmegaConf.to_container(OmegaConf.load(saved_yaml), resolve=True)
    current_tree = OmegaConf.to_container(cfg, resolve=True)
    saved, current = _flat(saved_tree), _flat(current_tree)
    changed = {
        k: (saved.get(k), current.get(k))
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k) and not k.startswith(RESUME_IGNORES)
    }
    if not changed:
        return saved_tree, current_tree, {}
    listing = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(changed.items())[:8])
    if len(changed) > 8:
        listing += f" and {len(changed) - 8} more"
    if allowed:
        log.warning(f"resuming with a changed config: {listing}")
        return saved_tree, current_tree, changed
    raise config.ConfigError(
        f"config differs from the checkpoint's {saved_yaml}: {listing}; "
        "set resume.allow_config_change=true to resume anyway"
    )


def record_config_changes(run_dir: Path, tracker, step: int, changes: dict) -> None:
    """Keys changed at a resume (old -> new), in config_changes.json and on the MLflow run: MLflow params
    keep the first launch's values (they cannot change), so this record says which ones stopped being true."""
    path = run_dir / "config_changes.json"
    history = json.loads(path.read_text()) if path.exists() else []
    history = [h for h in history if h["step"] < step]  # a resume from an older checkpoint rewrites what followed
    history.append({"step": step, "changes": {k: [old, new] for k, (old, new) in changes.items()}})
    write_json(path, history)
    listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
    tracker.set_tags({"config_changed": "true", f"config_changes.step_{step}": listing})
    tracker.log_artifact(path)


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def _state_to_dict(state: loop.TrainState) -> dict:
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(state).items()}


def _state_from_dict(values: dict) -> loop.TrainState:
    state = loop.TrainState(**{k: v for k, v in values.items() if k in loop.TrainState.__dataclass_fields__})
    if state.best_val_loss is None:
        state.best_val_loss = math.inf
    return state


def _log_run_artifacts(run_dir: Path, tracker) -> None:
    plot = plot_run(run_dir / "metrics.jsonl", run_dir / "metrics.png")
    for path in (run_dir / "summary.json", run_dir / "metrics.jsonl", plot):
        if path is not None:
            tracker.log_artifact(path)
    if (run_dir / ".hydra").is_dir():
        for path in sorted((run_dir / ".hydra").iterdir()):
            tracker.log_artifact(path, "hydra")


def _loader(sharded: bool):
    if sharded:
        from exp.dist_checkpoint import load_sharded

        return load_sharded
    return load_checkpoint


def in_sweep() -> bool:
    """Whether this run is one point of a Hydra multirun (a failure then must not end the sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().mode.name == "MULTIRUN"
    except (ValueError, AttributeError):
        return False


def fail_at_start(cfg: DictConfig, error: config.ConfigError) -> float:
    """A sweep job whose node cannot run its point: one line, FAILED in summary.json (so in sweep.json) and in
    MLflow, and NaN for the sweeper, which goes on with the other trials."""
    message = f"config error: {error}"
    print(message, file=sys.stderr, flush=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        tracker = instantiate(cfg.tracking)(cfg=cfg, run_dir=run_dir)
    except Exception as e:  # the record in summary.json does not depend on MLflow
        log.warning(f"MLflow: {first_line(e)}")
        tracker = NullTracker()
    state = loop.TrainState()
    stage_name, num_steps = OmegaConf.select(cfg, "stage.name"), OmegaConf.select(cfg, "stage.num_steps")
    write_failure_summary(run_dir, state, tracker, f"ConfigError: {error}", stage_name=stage_name, num_steps=num_steps)
    tracker.set_tags({"error": message})
    tracker.on_train_end(state, "FAILED")
    return float("nan")


def write_failure_summary(
    run_dir: Path, state: loop.TrainState, tracker, error: str, *, stage_name: str, num_steps: int
) -> None:
    """summary.json of a failed run: where it stopped and why."""
    summary = {
        "status": "FAILED",
        "error": error,
        "stage": stage_name,
        "step": state.step,
        "num_steps": num_steps,
        "val_loss": state.val_loss,
        "run_dir": str(run_dir.resolve()),
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_run_id": tracker.run_id,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }
    rundir.write_summary(run_dir, summary)


def _signal_name(signum: int) -> str:
    import signal

    return signal.Signals(signum).name


def _exit(message: str, code: int):
    print(message, file=sys.stderr)
    raise SystemExit(code)


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@torch.no_grad()
def generate_sample(model, sample, vocab_size: int, rt: hardware.Runtime) -> str | None:
    """Text continued from sample.prompt by the trained model; None when the data has no byte tokenizer."""
    from exp.data.tokenizer import VOCAB_SIZE, ByteTokenizer

    if sample.max_new_tokens == 0 or vocab_size != VOCAB_SIZE:
        return None
    tokenizer = ByteTokenizer()
    prompt = torch.tensor([tokenizer.encode(sample.prompt) or [tokenizer.EOT]], device=rt.device)
    generator = torch.Generator(rt.device).manual_seed(0)
    model.eval()
    with rt.autocast():
        out = model.generate(
            prompt, sample.max_new_tokens, temperature=sample.temperature, top_k=sample.top_k, generator=generator
        )
    model.train()
    return tokenizer.decode(out[0, prompt.size(1) :].tolist())


def write_summary(
    run_dir: Path,
    state: loop.TrainState,
    stage,
    model,
    tracker,
    sample: str | None,
    wall_seconds: float,
    *,
    status: str = "FINISHED",
    checkpoint: Path | None = None,
    best_checkpoint: Path | None = None,
    first_step_time: float | None = None,
    num_skipped_steps: int = 0,
    num_rollbacks: int = 0,
    data: dict | None = None,
    stop_reason: str | None = None,
    compiled: bool = False,
) -> dict:
    """summary.json: final metrics and where to find the run's record and weights, written atomically.

    tokens_per_s is the steady state: each process's first step (compilation with hardware.compile=true,
    warm-up otherwise) is left out and reported as first_step_seconds (compile_seconds when compiling).
    """
    steady_tokens = state.tokens_seen - state.warmup_tokens
    steady_seconds = state.train_seconds - state.warmup_seconds
    steady = steady_tokens > 0 and steady_seconds > 0
    tokens_per_s = steady_tokens / steady_seconds if steady else state.tokens_seen / max(state.train_seconds, 1e-9)
    # what the first steps took beyond their tokens at the steady rate: compilation, when compiling
    compile_seconds = (
        max(0.0, state.warmup_seconds - state.warmup_tokens / tokens_per_s) if compiled and steady else None
    )
    summary = {
        "status": status,
        "stage": stage.name,
        "step": state.step,
        "num_steps": stage.num_steps,
        "tokens_seen": state.tokens_seen,
        "train_loss": state.train_loss,
        "val_loss": state.val_loss,
        "best_val_loss": None if math.isinf(state.best_val_loss) else state.best_val_loss,
        "initial_val_loss": state.initial_val_loss,  # before this stage trained (stage.eval_at_start)
        "val_perplexity": math.exp(min(state.val_loss, 50.0)) if state.val_loss is not None else None,
        "tokens_per_s": tokens_per_s,
        "train_seconds": state.train_seconds,
        "first_step_seconds": state.warmup_seconds,  # summed over the processes that trained this run
        "compile_seconds": compile_seconds,
        "wall_seconds": wall_seconds,
        "first_step_time": first_step_time,  # Unix time the first step of this process finished
        "num_params": model.num_params(),
        "num_skipped_steps": num_skipped_steps,
        "num_rollbacks": num_rollbacks,
        "stop_reason": stop_reason,  # why training ended before num_steps (early stopping, a signal), or null
        "checkpoint": str(checkpoint.resolve()) if checkpoint else None,
        "best_checkpoint": str(best_checkpoint.resolve()) if best_checkpoint else None,
        "run_dir": str(run_dir.resolve()),
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_run_id": tracker.run_id,
        "sample": sample,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "data": data,  # what was trained on; SFT sets add their example, truncation and drop counts
    }
    rundir.write_summary(run_dir, summary)
    return summary
