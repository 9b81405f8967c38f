"""Faults the loop survives or ends cleanly on: NaN/inf and loss spikes, signals, early stopping."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import signal
import time
from collections import deque
from collections.abc import Callable

from exp.config import EarlyStoppingConfig, NanConfig
from exp.errors import TrainingFailed
from exp.loop import Callback, TrainState, nonfinite_message

log = logging.getLogger("exp")


class FaultGuard:
    """Skips bad steps, rolls back to the last good checkpoint with a lower LR, and gives up after a budget.

    `rollback(state, lr_factor)` restores model, optimizer, scheduler and counters from the newest checkpoint
    into `state` in place and returns False when there is none; the data sampler is not rewound, so the
    windows that caused the trouble are not replayed. Skipped steps are reported once per run of them
    (`on_event`, at the step they failed to follow); a rollback through `on_rollback` (default: `on_event`).
    """

    def __init__(self, cfg: NanConfig, rollback: Callable[[TrainState, float], bool], on_event=None, on_rollback=None):
        self.cfg, self.rollback, self.on_event = cfg, rollback, on_event or (lambda state, event: None)
        self.on_rollback = on_rollback or self.on_event
        self.recent: deque[float] = deque(maxlen=cfg.spike_window)
        self.consecutive = self.num_skipped = self.num_rollbacks = 0
        self.pending: dict[str, int] = {}  # skipped steps since the last good one, by reason

    def should_skip(self, state: TrainState, loss: float, grad_norm: float, finite: bool) -> bool:
        reason = None if finite else "non-finite"
        if reason is None and self._is_spike(loss):
            reason = "spike"
        if reason is None:
            self.consecutive = 0
            self.recent.append(loss)
            self._report_skips(state)
            return False
        self.consecutive += 1
        self.num_skipped += 1
        self.pending[reason] = self.pending.get(reason, 0) + 1
        log.warning(
            f"step {state.step + 1}: {reason} loss {loss:.4g} (grad norm {grad_norm:.4g}); update skipped "
            f"({self.consecutive}/{self.cfg.max_consecutive} in a row)"
        )
        if self.consecutive > self.cfg.max_consecutive:
            self._roll_back(state, loss, grad_norm)
        return True

    def _report_skips(self, state: TrainState) -> None:
        """The steps skipped since the last good one, as one record: one value per step and key."""
        if self.pending:
            counts = {f"faults/{reason.replace('-', '_')}": n for reason, n in self.pending.items()}
            self.pending = {}
            self.on_event(state, {"faults/skipped_steps": self.num_skipped, **counts})

    def _is_spike(self, loss: float) -> bool:
        if not self.cfg.spike_threshold or len(self.recent) < max(2, self.cfg.spike_window // 2):
            return False
        mean = sum(self.recent) / len(self.recent)
        std = math.sqrt(sum((x - mean) ** 2 for x in self.recent) / (len(self.recent) - 1))
        return loss > mean + self.cfg.spike_threshold * max(std, 1e-3 * abs(mean))

    def _roll_back(self, state: TrainState, loss: float, grad_norm: float) -> None:
        self._report_skips(state)  # a rollback voids this record with the steps it replays; a failure keeps it
        if self.num_rollbacks >= self.cfg.max_rollbacks:
            raise TrainingFailed(
                f"{nonfinite_message(state, loss, grad_norm)}; gave up after "
                f"{self.num_rollbacks} rollbacks (nan.max_rollbacks={self.cfg.max_rollbacks})"
            )
        failed_at = state.step + 1
        if not self.rollback(state, self.cfg.lr_factor):
            raise TrainingFailed(
                f"{nonfinite_message(state, loss, grad_norm)}; no checkpoint to roll back to "
                "(lower checkpoint.every_n_steps or stage.learning_rate)"
            )
        self.num_rollbacks += 1
        self.consecutive = 0
        self.recent.clear()
        log.warning(
            f"rolled back from step {failed_at} to step {state.step} with the learning rate x"
            f"{self.cfg.lr_factor} (rollback {self.num_rollbacks}/{self.cfg.max_rollbacks})"
        )
        self.on_rollback(state, {"faults/rollbacks": self.num_rollbacks, "faults/rolled_back_from": failed_at})


class HoldUntilCheckpoint(Callback):
    """Passes a recorder's step records (logs, evaluations, faults) on once a checkpoint covers their step: a rollback
    replays the steps after the checkpoint it goes back to, and a record that cannot take a point back (MLflow) must
    get the replayed values only, once each. Records are held from the first checkpoint on (from the start when
    `armed`: a resumed run can roll back to its resume point), released at each checkpoint and at the end; a
    rollback drops what is held. A recorder with log_metrics(step, metrics, stamp) keeps each record's own time."""

    def __init__(self, inner: Callback, armed: bool = False, saving: Callable[[], bool] | None = None):
        self.inner, self.armed, self.saving = inner, armed, saving
        self.held: list[tuple[str, TrainState, dict, float]] = []

    def _hold(self, hook: str, state: TrainState, metrics: dict[str, float]) -> None:
        # `saving`: whether a checkpoint is being written; a rollback may return to it once it is published
        self.armed = self.armed or (self.saving is not None and self.saving())
        if self.armed:
            self.held.append((hook, dataclasses.replace(state), dict(metrics), time.time()))
        else:
            getattr(self.inner, hook)(state, metrics)

    def _release(self, up_to: int | None = None) -> None:
        """Pass on the held records (those of steps up to `up_to`: a checkpoint written in the background covers
        the steps up to its own, not those trained while it was written)."""
        held = [h for h in self.held if up_to is None or h[1].step <= up_to]
        self.held = [h for h in self.held if up_to is not None and h[1].step > up_to]
        log_metrics = getattr(self.inner, "log_metrics", None)
        for hook, state, metrics, stamp in held:
            if log_metrics is not None:
                log_metrics(state.step, metrics, stamp)
            else:
                getattr(self.inner, hook)(state, metrics)

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._hold("on_log", state, metrics)

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._hold("on_eval_end", state, metrics)

    def on_fault(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._hold("on_fault", state, metrics)

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._hold("on_task_eval", state, metrics)

    def on_rollback(self, state: TrainState, metrics: dict[str, float]) -> None:
        self.held.clear()  # the first values of the replayed steps never leave
        self._hold("on_rollback", state, metrics)

    def on_checkpoint(self, state: TrainState, path) -> None:
        self._release(up_to=state.step)
        self.armed = True
        self.inner.on_checkpoint(state, path)

    def on_train_end(self, state: TrainState, status: str) -> None:
        self._release()
        self.inner.on_train_end(state, status)

    def on_build(self, model, optimizer, scheduler) -> None:
        self.inner.on_build(model, optimizer, scheduler)

    def on_train_start(self, state: TrainState) -> None:
        self.inner.on_train_start(state)

    def on_step_end(self, state: TrainState, loss: float) -> None:
        self.inner.on_step_end(state, loss)

    def on_save_request(self, state: TrainState) -> None:
        self.inner.on_save_request(state)


class EarlyStopping(Callback):
    """Stops after `patience` evaluations without the val loss improving by min_delta."""

    def __init__(self, cfg: EarlyStoppingConfig):
        self.cfg = cfg
        self.best, self.bad_evals = math.inf, 0

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        if not self.cfg.patience:
            return
        loss = metrics["val/loss"]
        if loss < self.best - self.cfg.min_delta:
            self.best, self.bad_evals = loss, 0
            return
        self.bad_evals += 1
        if self.bad_evals >= self.cfg.patience:
            self.stop_reason = (
                f"early stopping at step {state.step}: val loss has not improved on {self.best:.4f} by "
                f"early_stopping.min_delta={self.cfg.min_delta:g} for {self.bad_evals} evaluations "
                f"(early_stopping.patience={self.cfg.patience})"
            )
            log.info(self.stop_reason)
            self.should_stop = True

    def state_dict(self) -> dict:
        """The best loss and the evaluations since: a resumed run keeps counting its patience."""
        return {"best": None if math.isinf(self.best) else self.best, "bad_evals": self.bad_evals}

    def load_state_dict(self, state: dict) -> None:
        best = state.get("best")
        self.best = math.inf if best is None else float(best)
        self.bad_evals = int(state.get("bad_evals", 0))


class SaveOnSignal(Callback):
    """SIGUSR1 asks for a checkpoint at the next step boundary while training goes on (the job service's
    "save now"). The signal may reach one rank only (a DDP or FSDP job): the request is agreed across ranks by
    the loop, and every rank saves at the same step. Installed at train start; after training a late SIGUSR1 is
    ignored rather than fatal."""

    def __init__(self, save: Callable[[TrainState], object]):
        self.save = save
        self._previous = None

    def on_train_start(self, state: TrainState) -> None:
        self._previous = signal.signal(signal.SIGUSR1, self._handle)

    def _handle(self, signum, frame) -> None:
        self.save_requested = True

    def on_save_request(self, state: TrainState) -> None:
        self.save_requested = False
        log.info(f"SIGUSR1: saving a checkpoint at step {state.step} and going on")
        self.save(state)

    def on_train_end(self, state: TrainState, status: str) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGUSR1, signal.SIG_IGN)
            self._previous = None


class StopSignals(Callback):
    """SIGINT/SIGTERM ask the loop to stop after the current step; a second SIGINT interrupts at once.

    Under submitit (a SLURM job), SIGUSR2 is the pre-timeout/preemption signal: it too stops the loop at the
    next step boundary, the run saves a checkpoint, and only then `hand_over()` passes the signal to submitit,
    which requeues the job. This class is the one place that owns preemption; after training has ended a
    SIGUSR2 is ignored, so a job that finished never requeues.

    exp.run installs the handlers before the run starts and restores them once its ending (summary.json, the
    MLflow close) is complete, so that no signal breaks the ending. The phase decides what a signal does:
    "opening" (before the run's record can be written) notes it and `starting()` raises it; "starting" (building,
    restoring) interrupts at once with KeyboardInterrupt; "training" stops after the step, and a second SIGINT
    interrupts at once; "ending" notes the first signal (the run ends KILLED if its status is not decided yet)
    and ignores the others.
    """

    def __init__(self):
        self.received: int | None = None
        self.phase = "opening"
        self._previous: dict = {}
        self._installed_by_run = False

    def install(self) -> StopSignals:
        """Take SIGINT, SIGTERM (and submitit's SIGUSR2) until restore(); the run's owner calls both."""
        self._installed_by_run = True
        self._install()
        return self

    def _install(self) -> None:
        signals = [signal.SIGINT, signal.SIGTERM]
        if callable(signal.getsignal(signal.SIGUSR2)):  # submitit installed its requeue handler
            signals.append(signal.SIGUSR2)
        for sig in signals:
            self._previous[sig] = signal.signal(sig, self._handle)

    def starting(self) -> None:
        """The run's record is open: a signal from now on interrupts the start-up at once (one noted already, now)."""
        self.phase = "starting"
        if self.received is not None:
            self.phase = "ending"
            raise KeyboardInterrupt

    @contextlib.contextmanager
    def training(self):
        """The loop's steps: a signal stops after the step, a second SIGINT at once; after them, the ending."""
        self.phase = "training"
        try:
            yield
        finally:
            self.phase = "ending"

    def interrupted(self) -> None:
        """A KeyboardInterrupt reached the run (a signal at start-up, a second SIGINT, or raised by code): it ends."""
        self.phase = "ending"
        if self.received is None:
            self._note(signal.SIGINT)

    def on_train_start(self, state: TrainState) -> None:
        if not self._installed_by_run:  # used as a plain callback (benchmarks): the loop's steps only
            self._install()
            self.phase = "training"

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        first = self.received is None
        if first:
            self._note(signum)
        if self.phase == "starting" or (self.phase == "training" and not first and signum == signal.SIGINT):
            self.phase = "ending"  # one interruption; later signals wait for the ending
            log.warning(f"{name}: interrupting now" + (" (start-up)" if first else ""))
            raise KeyboardInterrupt
        if not first:
            log.warning(f"{name}: already stopping; the run's ending (summary.json, MLflow) completes first")
            return
        what = "preemption or time limit" if signum == signal.SIGUSR2 else name
        when = {"training": "after this step and saving a checkpoint", "opening": "once the run is open"}
        log.warning(f"{what} ({name}): stopping {when.get(self.phase, 'as the run ends')}")

    def _note(self, signum: int) -> None:
        self.received = signum
        self.should_stop = True
        what = "preemption or time limit" if signum == signal.SIGUSR2 else signal.Signals(signum).name
        self.stop_reason = f"{what} ({signal.Signals(signum).name})"

    @property
    def preempted(self) -> bool:
        return self.received == signal.SIGUSR2

    @property
    def exit_code(self) -> int:
        return 128 + (self.received or 0)

    def on_train_end(self, state: TrainState, status: str) -> None:
        self.phase = "ending"
        if not self._installed_by_run:
            self.restore()

    def restore(self) -> None:
        """The handlers from before install(); SIGUSR2 is ignored from now on (a finished job never requeues)."""
        for sig, handler in self._previous.items():
            if sig == signal.SIGUSR2:
                self._requeue = handler
                handler = signal.SIG_IGN  # training is over: a late preemption signal must not requeue
            signal.signal(sig, handler)
        self._previous.clear()

    def hand_over(self) -> None:
        """Let submitit requeue the job (it exits the process) now that the checkpoint is saved."""
        log.warning("requeueing: the requeued job resumes from the checkpoint just saved")
        self._requeue(signal.SIGUSR2, None)
