"""One run, as a table of contents: validate, start distributed, open the run dir, build, restore, loop, finish."""

from __future__ import annotations

import contextlib
import logging
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from exp import config, hardware, loop, rundir
from exp import dist as exp_dist
from exp.callbacks import ConsoleLog, FirstStepClock, ProgressBar
from exp.checkpoint import Checkpointer, CheckpointError, check_tokenizer, find_resume
from exp.checkpoint import init_weights as load_init_from
from exp.checkpoint.weights import base_folder
from exp.data import document_token
from exp.errors import ConfigError, ExpError, ResumeError, Stopped
from exp.events import Events, TrainState
from exp.faults import EarlyStopping, FaultGuard, HoldUntilCheckpoint, SaveOnSignal, StopSignals
from exp.model import adapters
from exp.model.protocol import flops_per_token, num_params
from exp.optim import build_optimizer, freeze, group_rules
from exp.profiling import Profiler
from exp.rundir import MetricsFile, RunLock, plot_run
from exp.sampling import end_of_run_sample
from exp.stages import SFT
from exp.text import first_line, fmt_loss
from exp.tracking import NullTracker, PendingTracker, resumed_run_id
from exp.tracking.worker import RUN_MARKER, absolute_uri

log = logging.getLogger("exp")


def train(cfg: DictConfig) -> float:
    """Validate, build, train, evaluate, sample and summarise one run; return the final validation loss.

    Bad input raises ConfigError before anything is written; a failure inside a sweep is recorded (FAILED)
    and returns NaN so the sweep goes on. exp.job turns the errors into one line and an exit status.
    """
    config.job_started()
    try:
        valid = config.validate(cfg)
    except ConfigError as e:
        if in_sweep():  # the launcher validated this point; what fails now is this node's (no GPU, no bf16)
            return fail_at_start(cfg, e)
        raise
    if valid.run.dry_run:
        from exp.plan import format_plan, make_plan

        print(format_plan(make_plan(cfg, valid.stage, valid.hardware)))
        rundir.discard_untouched(valid.run.run_dir)
        return float("nan")
    try:  # checked here, not in validation: a sweep's launching process is one process by design
        exp_dist.check_launch(valid.hardware.distributed)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    dist = exp_dist.init(valid.hardware.distributed, valid.hardware.torch_device().type)
    try:
        run_dir = _open_run_dir(valid.run.run_dir, dist)
        with RunLock(run_dir) if dist.is_main else contextlib.nullcontext():
            if valid.run.lr_find.enabled:
                return find_lr(cfg, valid, run_dir, dist)
            return _train(cfg, valid, run_dir, dist)
    finally:
        exp_dist.shutdown(clean=sys.exc_info()[0] is None)


def _train(cfg: DictConfig, valid: config.Validated, run_dir: Path, dist: exp_dist.Dist) -> float:
    """_run with the stop signals taken until its ending is written: a signal never breaks summary.json or the
    MLflow close (exp.faults.StopSignals)."""
    signals = StopSignals().install()
    try:
        return _run(cfg, valid, run_dir, dist, signals)
    finally:
        signals.restore()


@dataclass
class Launch:
    """One launch of a run, as its steps and its ending read it: what it was given, what it built, what it records."""

    cfg: DictConfig
    valid: config.Validated
    run_dir: Path
    dist: exp_dist.Dist
    signals: StopSignals
    started: float  # perf_counter at the start
    events: Events
    clock: FirstStepClock
    stateful: dict  # the callbacks whose state goes into each checkpoint, by name
    tracker: object  # a PendingTracker until a resume has restored its checkpoint everywhere
    point: object = None  # the ResumePoint, or None
    state: TrainState = field(default_factory=TrainState)
    status: str = "FAILED"
    built: Built | None = None
    checkpointer: Checkpointer | None = None
    guard: FaultGuard | None = None
    recorder: object = None  # the tracker as the loop's events reach it (held while a rollback may replay steps)
    final: Path | None = None  # the final checkpoint
    task_eval: object = None  # exp.eval.callback.TaskEval with eval=lm_eval

    def write_failure(self, error: str | None, status: str = "FAILED", stop_reason: str | None = None) -> None:
        """summary.json of a launch that failed or was interrupted, naming the checkpoints it leaves."""
        stage = self.valid.stage
        summary = rundir.failure_summary(
            self.run_dir,
            self.state,
            self.tracker,
            error,
            stage_name=stage.name,
            num_steps=stage.num_steps,
            status=status,
            stop_reason=stop_reason,
            checkpoints=kept_checkpoints(self.checkpointer),
        )
        rundir.write_summary(self.run_dir, summary)


def _run(cfg: DictConfig, valid: config.Validated, run_dir: Path, dist: exp_dist.Dist, signals: StopSignals) -> float:
    launch = _launch(cfg, valid, run_dir, dist, signals)
    try:
        signals.starting()  # a signal from here on ends the run with its record written
        _prepare(launch)
        t = launch.built.trained
        with signals.training():
            launch.state = loop.train(
                t, launch.built.batches, launch.built.val_batches, launch.events, launch.state, launch.guard
            )
        launch.final = launch.checkpointer.save(launch.state)
        if launch.task_eval is not None and not signals.received:
            launch.task_eval.at_end(launch.state)
        # a preempted job is KILLED until requeued; a callback that stopped the run may name its status (PRUNED)
        launch.status = "KILLED" if signals.received else (launch.events.stop_status or "FINISHED")
        if dist.is_main:
            finish(launch)
    except KeyboardInterrupt:  # a signal at start-up, or a second SIGINT while training: no checkpoint of this step
        _interrupted(launch)
    except Exception as e:
        _failed(launch, e)
        if in_sweep():  # one failed trial is recorded (FAILED) and the sweep goes on
            return float("nan")
        raise
    finally:
        _close(launch)
    return _after(launch)


def _launch(cfg: DictConfig, valid: config.Validated, run_dir: Path, dist: exp_dist.Dist, signals) -> Launch:
    """Find the resume point and set up what records the run before anything is built."""
    started = time.perf_counter()
    point = find_resume(cfg, valid.run.resume, dist)
    if point is not None:
        check_resume_tokenizer(cfg, point)
    # a resume opens its MLflow run once every rank has restored the checkpoint: a resume refused or failed before
    # that leaves the run's record (summary.json, the MLflow run) as it was
    tracker = open_tracker(cfg, run_dir, dist) if point is None else PendingTracker()
    clock = FirstStepClock()
    stateful = {"early_stopping": EarlyStopping(valid.run.early_stopping)}  # kept in checkpoints (state_dict)
    stateful |= {f"callbacks.{name}": instantiate(node) for name, node in cfg.callbacks.items()}
    events = Events([clock, signals, *stateful.values()])
    state = point.state if point else TrainState()
    return Launch(cfg, valid, run_dir, dist, signals, started, events, clock, stateful, tracker, point, state)


def _prepare(launch: Launch) -> None:
    """Build; restore the resume point (a new branch when older than the run's newest checkpoint) and open its
    tracker; add the checkpointer, the reporters and the fault guard; start."""
    cfg, dist, run = launch.cfg, launch.dist, launch.valid.run
    launch.built = build(cfg, launch.valid, dist, init_weights=launch.point is None)
    t = launch.built.trained
    launch.events.on_build(t.model, t.optimizer, t.scheduler)
    launch.checkpointer = checkpointer = instantiate(cfg.checkpoint)(
        trained=t,
        sampler=launch.built.batches,
        tracker=launch.tracker,
        events=launch.events,
        stateful=launch.stateful,
        config_yaml=saved_config_yaml(cfg, t.model),
        seed=run.seed,
        run_dir=str(launch.run_dir),
        tokenizer=launch.built.tokenizer,
    )
    launch.state, branch = TrainState(), None
    if launch.point is not None:
        launch.state = restore_everywhere(checkpointer, launch.point, dist)
        if dist.is_main:  # from before the run's newest checkpoint: a new branch
            branch = checkpointer.start_branch(
                launch.point, resumed_run_id(launch.point.trainer_state, launch.point.path)
            )
        opened = open_tracker(cfg, launch.run_dir, dist, launch.point, branch)
        launch.tracker = checkpointer.tracker = launch.tracker.replay(opened)
    reporters = [ConsoleLog(t.stage.num_steps, t.stage.num_epochs is not None), ProgressBar(t.stage.num_steps)]
    reporters.append(MetricsFile(launch.run_dir / rundir.METRICS, keep_until_step=launch.state.step))
    saver = SaveOnSignal(checkpointer.save)  # SIGUSR1 (on any rank): save now, keep training
    launch.events.add(checkpointer, saver, *(reporters if dist.is_main else []))
    # profile.steps, and the next N steps whenever RUN_DIR/profile.request asks
    profiler = Profiler(
        run.profile.steps, launch.run_dir, launch.tracker, dist.rank, t.rt.device, run.profile.row_limit
    )
    launch.events.add(profiler)
    if run.eval.enabled and run.eval.launcher == "slurm":  # each new checkpoint in a SLURM job of its own
        from exp.eval.side import SideJobs

        launch.events.add(*([SideJobs(run.eval, launch.run_dir)] if dist.is_main else []))
    elif run.eval.enabled:
        from exp.eval.callback import TaskEval

        launch.task_eval = TaskEval(run.eval, t, launch.built.tokenizer, launch.events, launch.run_dir, launch.tracker)
        launch.events.add(launch.task_eval)
    launch.guard = FaultGuard(
        run.nan, checkpointer.rollback, on_event=launch.events.on_fault, on_rollback=launch.events.on_rollback
    )
    log.info(
        f"run dir {launch.run_dir} | {num_params(t.model):,} parameters | {t.rt.device} {t.rt.dtype} "
        f"| {t.stage.num_steps} steps of {t.stage.samples_per_step} x {cfg.data.seq_len} tokens"
        + (f" | {dist.world_size} ranks ({dist.strategy})" if dist.enabled else "")
    )
    launch.events.on_train_start(launch.state)
    # after on_train_start: the tracker has started its run since it was built. While a rollback can replay
    # steps, what it records waits for a checkpoint to cover it: MLflow cannot take a point back
    held = HoldUntilCheckpoint(launch.tracker, armed=launch.point is not None, saving=checkpointer.saving)
    launch.recorder = held if run.nan.max_rollbacks else launch.tracker
    launch.events.add(launch.recorder)


def _interrupted(launch: Launch) -> None:
    launch.status = "KILLED"
    launch.signals.interrupted()
    if launch.dist.is_main and not isinstance(launch.tracker, PendingTracker):  # a resume not restored keeps its record
        reason = f"{launch.signals.stop_reason}: interrupted at step {launch.state.step}"
        launch.write_failure(None, status="KILLED", stop_reason=reason)


def _failed(launch: Launch, e: Exception) -> None:
    if isinstance(launch.tracker, PendingTracker):  # a refused or failed resume: the record stays as it was
        if not isinstance(e, ExpError):  # a refusal is one line, from exp.job
            log.exception(f"resume failed: {e}")
        return
    log.error(e.line()) if isinstance(e, ExpError) else log.exception(f"training failed: {e}")
    if launch.dist.is_main:
        launch.write_failure(f"{type(e).__name__}: {first_line(e)}", stop_reason=first_line(e))


def _close(launch: Launch) -> None:
    if launch.checkpointer is not None:
        launch.checkpointer.settle()  # a save in flight is a checkpoint once written
    if launch.recorder is None:
        launch.events.add(launch.tracker)
    launch.events.on_train_end(launch.state, launch.status)


def _after(launch: Launch) -> float:
    """The launch's result once its ending is written; a signal's ending raises Stopped (exit 128+N) on rank 0."""
    signals = launch.signals
    signals.restore()  # the ending is written; a signal after it (its status was decided) changes nothing
    if launch.status == "KILLED" and signals.received and launch.dist.is_main:  # other ranks end quietly
        if signals.preempted:
            signals.hand_over()  # submitit requeues the job and exits; the requeued job resumes from the checkpoint
        name, step = signal.Signals(signals.received).name, launch.state.step
        again = "rerun with the same hydra.run.dir (resume=auto) to continue"
        raise Stopped(f"stopped by {name} at step {step}; {again}", signals.received)
    return launch.state.val_loss


def open_tracker(cfg: DictConfig, run_dir: Path, dist: exp_dist.Dist, point=None, branch: dict | None = None):
    """The run's tracker (only rank 0 talks to MLflow), continuing the MLflow run of the checkpoint resumed from. A new
    branch, or a checkpoint whose MLflow run a branch left behind, gets a new run (MLflow cannot take back the points
    of the abandoned steps) that starts with the steps up to the resume point (rundir.carry_over)."""
    resume_run_id = resumed_run_id(point.trainer_state, point.path) if point is not None else trial_run_id(cfg, run_dir)
    if branch is None and dist.is_main:
        branch = rundir.left_behind(run_dir, resume_run_id)
    if branch is not None:
        resume_run_id = None
    factory = instantiate(cfg.tracking) if dist.is_main else NullTracker
    tracker = factory(cfg=cfg, run_dir=run_dir, resume_run_id=resume_run_id)
    if point is not None and resume_run_id is None and dist.is_main:
        rundir.carry_over(tracker, run_dir, point.state.step, branch)
    return tracker


def trial_run_id(cfg: DictConfig, run_dir: Path) -> str | None:
    """A sweep trial launched again into its run dir with no checkpoint to resume (rerun-failed, a resumed study):
    the MLflow run the run dir already has, so that the trial keeps one child run."""
    uri = cfg.tracking.get("uri") if in_sweep() else None
    marker = rundir.read_json(Path(run_dir) / RUN_MARKER) if uri else None
    if isinstance(marker, dict) and marker.get("tracking_uri") == absolute_uri(str(uri)):
        return marker.get("run_id")
    return None


def restore_everywhere(checkpointer: Checkpointer, point, dist: exp_dist.Dist) -> TrainState:
    """The resume point restored on every rank or on none: the ranks agree before the run's record is opened."""
    try:
        state = checkpointer.restore(point)
    except Exception:
        dist.any(True)
        raise
    if dist.any(False):
        raise ResumeError(f"cannot resume from {point.path}: another rank could not restore it (see its error)")
    return state


def find_lr(cfg: DictConfig, valid: config.Validated, run_dir: Path, dist: exp_dist.Dist) -> float:
    """lr_find=true: the LR range test (exp.lr_find) from the configured init, instead of training. It writes
    lr_find.json and lr_find.png (also to MLflow, with the curve as lr_find/* metrics), summary.json unless the
    directory already holds a run's, no checkpoint; returns the suggested learning rate (NaN without one)."""
    from exp.lr_find import plot, run_range_test

    tracker = instantiate(cfg.tracking)(cfg=cfg, run_dir=run_dir) if dist.is_main else NullTracker()
    state, status, stage = TrainState(), "FAILED", valid.stage
    try:
        built = build(cfg, valid, dist)
        result = run_range_test(built.trained, built.batches, valid.run.lr_find)
        state.step, status = len(result.lrs), "FINISHED"
        if dist.is_main:
            for i, (lr, loss, smooth) in enumerate(zip(result.lrs, result.losses, result.smoothed, strict=True)):
                tracker.on_log(
                    TrainState(step=i + 1), {"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed": smooth}
                )
            rundir.write_json(run_dir / "lr_find.json", result.to_dict())
            png = plot(result, run_dir / "lr_find.png")
            for path in (run_dir / "lr_find.json", png):
                tracker.log_artifact(path)
            suggestion = result.suggestion
            tracker.set_tags({"lr_find.suggested_learning_rate": f"{suggestion:.3g}" if suggestion else "none"})
            if not (run_dir / rundir.SUMMARY).exists():  # a run's own summary.json stays as it is
                rundir.write_summary(
                    run_dir,
                    {
                        "status": status,
                        "kind": "lr_find",
                        "stage": stage.name,
                        "step": state.step,
                        "suggested_learning_rate": suggestion,
                        "method": result.method,
                        "stopped": result.stopped,
                        "run_dir": str(run_dir.resolve()),
                        "mlflow_tracking_uri": tracker.uri,
                        "mlflow_run_id": tracker.run_id,
                    },
                )
            said = f"stage.learning_rate={suggestion:.3g}" if suggestion else "no learning rate"
            print(f"lr_find: {len(result.lrs)} steps, {result.stopped}; suggested {said}: {result.method}; plot {png}")
        return result.suggestion if result.suggestion is not None else float("nan")
    except Exception as e:
        log.error(e.line()) if isinstance(e, ExpError) else log.exception(f"lr_find failed: {e}")
        if dist.is_main:
            error = f"{type(e).__name__}: {first_line(e)}"
            rundir.write_summary(
                run_dir,
                rundir.failure_summary(
                    run_dir, state, tracker, error, stage_name=stage.name, num_steps=stage.num_steps
                ),
            )
        raise
    finally:
        tracker.on_train_end(state, status)


def _open_run_dir(configured: str, dist: exp_dist.Dist) -> Path:
    """Rank 0's run directory, created: every rank composed the config itself, and a time-stamped name can differ
    by a second between them."""
    run_dir = Path(dist.broadcast_str(str(configured)))
    if not dist.is_main:
        if str(run_dir) != str(configured):
            rundir.discard_untouched(configured)
        logging.getLogger("exp").setLevel(logging.WARNING)  # one rank reports
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


@dataclass
class Built:
    """A run's objects: what is trained (loop.Trained), its data, and what its summary reports of the data."""

    trained: loop.Trained
    batches: object  # the data's resumable train sampler
    val_batches: list
    data: object
    data_info: dict
    tokenizer: object = None  # the data's (exp.data.tokenizer), or None when unknown


def build(cfg: DictConfig, valid: config.Validated, dist: exp_dist.Dist, init_weights: bool = True) -> Built:
    """Hardware, seed, data, model (stage.init_from's weights unless resuming; sharded or wrapped as the
    strategy wants), optimizer, scheduler, scaler."""
    stage, run = valid.stage, valid.run
    rt = hardware.setup(valid.hardware, stage.dtype, dist.local_rank)
    seed_everything(run.seed)
    data = instantiate(cfg.data)
    model = instantiate(config.component(cfg, "model")).to(rt.device)
    adapter = adapters.adapter_config(OmegaConf.to_container(cfg.model, resolve=True).get("adapter"))
    if adapter is not None:  # the base's weights first, on a resume too: a checkpoint holds the adapter only
        if stage.init_from:
            base = base_folder(stage.init_from)
            load_init_from(base, model)
        else:  # model=hf: its constructor loaded the pretrained weights of its folder, the base
            from exp.model.hf import local_folder

            base = local_folder(model.name_or_path).resolve()
        adapters.inject(model, adapter, base=str(base), fingerprint=adapters.fingerprint(model))
        trainable, frozen = adapters.count(model)
        log.info(
            f"LoRA r={adapter.r} on {len(adapters.info(model)['targets'])} layers of base {base}: "
            f"{trainable:,} trainable, {frozen:,} frozen parameters"
        )
    freeze(model, cfg.model.get("freeze"))  # before wrapping: frozen parameters get no gradients, no optimizer state
    if dist.strategy == "fsdp" and dist.enabled:  # FSDP shards before the optimizer exists: it holds only shards
        model = exp_dist.wrap(model, dist, rt.dtype)
    rules = group_rules(OmegaConf.to_container(cfg.optimizer, resolve=True).get("param_groups"))
    optimizer = build_optimizer(instantiate(config.component(cfg, "optimizer")), model, rt.device, rules=rules)
    scheduler = instantiate(cfg.scheduler)(optimizer)
    if hasattr(data, "total_samples"):  # where a mixture's weight schedule turns (fractions of the run's samples)
        data.total_samples = stage.num_steps * stage.samples_per_step * dist.world_size
    batches = data.train_sampler(stage.batch_size_per_gpu, seed=run.seed, rank=dist.rank, world_size=dist.world_size)
    val_batches = data.val_batches(stage.batch_size_per_gpu, stage.num_eval_batches)
    to_device = lambda batch: (batch[0].to(rt.device), batch[1].to(rt.device))
    val_batches = val_batches.map(to_device) if hasattr(val_batches, "map") else [to_device(b) for b in val_batches]
    data_info = data.describe() | (data.stats() if hasattr(data, "stats") else {})
    stage.epoch_size = data.epoch_size() if hasattr(data, "epoch_size") else None  # progress/epoch in the logs
    stage.document_token = document_token(data)  # rows of several documents: the models get their ids
    log.info("data: " + ", ".join(f"{k}={v}" for k, v in data_info.items()))
    stage.setup(model, rt)
    if init_weights and stage.init_from and adapter is None:
        log.info(f"initialised from {load_init_from(stage.init_from, model)}")
    step_model = exp_dist.wrap(model, dist, rt.dtype) if dist.strategy == "ddp" else model
    step_model = torch.compile(step_model) if rt.compile else step_model
    trained = loop.Trained(stage, model, optimizer, scheduler, rt, rt.grad_scaler(), dist, step_model)
    trained.flops_per_token = flops_per_token(model, data.seq_len)  # perf/tflops and perf/mfu (exp.perf)
    return Built(trained, batches, val_batches, data, data_info, tokenizer_of(data))


def saved_config_yaml(cfg: DictConfig, model) -> str:
    """The resolved config each checkpoint holds; a model that needs more than its settings to be rebuilt elsewhere
    (model=hf: its config.json) adds it to the model node (saved_arguments)."""
    model = getattr(model, "module", model)
    extra = model.saved_arguments() if hasattr(model, "saved_arguments") else {}
    if not extra:
        return OmegaConf.to_yaml(cfg, resolve=True)
    tree = OmegaConf.to_container(cfg, resolve=True)
    tree["model"] = {**tree["model"], **extra}
    return OmegaConf.to_yaml(OmegaConf.create(tree))


def tokenizer_of(data):
    """The data's tokenizer (DataSource.tokenizer, optional), or None."""
    return data.tokenizer() if hasattr(data, "tokenizer") else None


def check_resume_tokenizer(cfg: DictConfig, point) -> None:
    """A checkpoint trained with another tokenizer than the data's is not resumed (ResumeError, exit 2)."""
    try:
        check_tokenizer(tokenizer_of(instantiate(cfg.data)), point.path, f"resume from {point.path}")
    except CheckpointError as e:
        raise ResumeError(str(e)) from None


def finish(launch: Launch) -> None:
    """The end of a run on rank 0: the sample, summary.json, the plot and artifacts, and the last log line."""
    t, state, tracker, checkpointer = launch.built.trained, launch.state, launch.tracker, launch.checkpointer
    stop_reason = launch.events.stop_reason
    if stop_reason:
        tracker.set_tags({"stop_reason": stop_reason, "stopped_at_step": str(state.step)})
    sample = None
    if launch.status == "FINISHED" and not checkpointer.sharded:  # a sharded model has no whole copy here to sample
        chat = isinstance(t.stage, SFT)  # SFT taught the chat template: the prompt is the user's turn
        sample = end_of_run_sample(
            t.model, launch.built.data, launch.built.tokenizer, launch.valid.run.sample, t.rt, chat
        )
    summary = rundir.run_summary(
        launch.run_dir,
        state,
        t.stage,
        num_params(t.model),
        tracker,
        sample,
        time.perf_counter() - launch.started,
        status=launch.status,
        checkpoint=launch.final,
        best_checkpoint=checkpointer.best_path,
        first_step_time=launch.clock.first_step_time,
        num_skipped_steps=launch.guard.num_skipped,
        num_rollbacks=launch.guard.num_rollbacks,
        data=launch.built.data_info,
        stop_reason=stop_reason,
        compiled=t.rt.compile,
        evaluation=_evaluation(launch.task_eval),
        flops_per_token=t.flops_per_token,
        peak_flops=t.rt.peak_flops,
        num_devices=t.dist.world_size,
    )
    rundir.write_summary(launch.run_dir, summary)
    _log_run_artifacts(launch.run_dir, tracker)
    compiled = f" (compile {summary['compile_seconds']:.1f} s)" if summary["compile_seconds"] is not None else ""
    log.info(
        f"{launch.status.lower()}: step {state.step} | val loss {fmt_loss(state.val_loss, 'n/a')} "
        f"| {summary['tokens_per_s']:,.0f} tok/s{compiled} | checkpoint {launch.final} "
        f"| summary {launch.run_dir / rundir.SUMMARY}"
    )


def _evaluation(task_eval) -> dict | None:
    """summary.json's `eval`: the step of the last downstream evaluation and its scores."""
    if task_eval is None or task_eval.last_step is None:
        return None
    return {"step": task_eval.last_step, "metrics": task_eval.last}


def _log_run_artifacts(run_dir: Path, tracker) -> None:
    plot = plot_run(run_dir / rundir.METRICS, run_dir / rundir.PLOT)
    for path in (run_dir / rundir.SUMMARY, run_dir / rundir.METRICS, plot):
        if path is not None:
            tracker.log_artifact(path)
    if (run_dir / ".hydra").is_dir():
        for path in sorted((run_dir / ".hydra").iterdir()):
            tracker.log_artifact(path, "hydra")


def in_sweep() -> bool:
    """Whether this run is one point of a Hydra multirun (a failure then must not end the sweep)."""
    try:
        from hydra.core.hydra_config import HydraConfig

        return HydraConfig.get().mode.name == "MULTIRUN"
    except (ValueError, AttributeError):
        return False


def fail_at_start(cfg: DictConfig, error: ConfigError) -> float:
    """A sweep job whose node cannot run its point: one line, FAILED in summary.json (so in sweep.json) and in
    MLflow, and NaN for the sweeper, which goes on with the other trials."""
    message = error.line()
    print(message, file=sys.stderr, flush=True)
    if os.environ.get("RANK", os.environ.get("SLURM_PROCID", "0")) != "0":  # one record per trial: rank 0's
        return float("nan")
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    try:
        tracker = instantiate(cfg.tracking)(cfg=cfg, run_dir=run_dir)
    except Exception as e:  # the record in summary.json does not depend on MLflow
        log.warning(f"MLflow: {first_line(e)}")
        tracker = NullTracker()
    state = TrainState()
    stage_name, num_steps = OmegaConf.select(cfg, "stage.name"), OmegaConf.select(cfg, "stage.num_steps")
    summary = rundir.failure_summary(
        run_dir, state, tracker, f"ConfigError: {error}", stage_name=stage_name, num_steps=num_steps
    )
    rundir.write_summary(run_dir, summary)
    tracker.set_tags({"error": message})
    tracker.on_train_end(state, "FAILED")
    return float("nan")


def kept_checkpoints(checkpointer: Checkpointer | None) -> dict:
    """The run's newest and best checkpoints that still exist (a failed save removed its own half)."""

    def named(path: Path | None) -> str | None:
        return str(path.resolve()) if path is not None and path.is_dir() else None

    if checkpointer is None:
        return {"checkpoint": None, "best_checkpoint": None}
    checkpointer.settle()  # a save in flight is a checkpoint once written
    return {"checkpoint": named(checkpointer.last_path), "best_checkpoint": named(checkpointer.best_path)}


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) from one integer."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
