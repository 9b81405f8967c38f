"""What the loop reports and to whom: the run's progress (TrainState), the hooks (Callback), and the one
object that sends every hook to every callback (Events). No torch, files or tracking here."""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass
class TrainState:
    """Everything about progress that a resumed run must continue from."""

    step: int = 0
    tokens_seen: int = 0
    train_seconds: float = 0.0
    loss_ema: float | None = None
    train_loss: float | None = None  # mean over the last log interval
    val_loss: float | None = None  # the last evaluation's
    best_val_loss: float = math.inf
    best_step: int | None = None  # the step whose evaluation gave best_val_loss
    initial_val_loss: float | None = None  # before the first step, when the stage evaluates at start
    # each process's first step (compilation, allocator and cache warm-up), left out of steady-state throughput
    warmup_seconds: float = 0.0
    warmup_tokens: int = 0


class Callback:
    """Hooks the loop calls; subclasses override what they need.

    Setting should_stop ends the run cleanly after the step (stop_reason says why, in summary.json and
    MLflow); stop_status, when set, is the status the run then ends with instead of FINISHED (a pruned
    sweep trial: PRUNED). Setting save_requested asks for a checkpoint after the step while training goes on:
    every rank agrees on it with the stop decision, and every callback then hears on_save_request on every rank,
    at the same step. A callback whose state must survive a resume returns it from state_dict() (JSON values);
    the checkpoint stores it and load_state_dict() gets it back.
    """

    should_stop: bool = False
    stop_reason: str | None = None
    stop_status: str | None = None
    save_requested: bool = False

    def state_dict(self) -> dict | None:
        """JSON-serialisable state to keep in checkpoints; None: nothing to keep."""
        return None

    def load_state_dict(self, state: dict) -> None: ...

    def on_build(self, model, optimizer, scheduler) -> None:
        """Once the training objects exist (before any resume restores them)."""

    def on_train_start(self, state: TrainState) -> None: ...

    def on_step_end(self, state: TrainState, loss: float) -> None:
        """After the step's update, log and evaluation: the state is complete here (checkpoints save now)."""

    def on_save_request(self, state: TrainState) -> None:
        """A callback on some rank set save_requested at this step: checkpoint now (every rank calls this)."""

    def on_checkpoint(self, state: TrainState, path) -> None: ...

    def on_fault(self, state: TrainState, metrics: dict[str, float]) -> None:
        """A skipped step or a rollback (exp.faults), as counters to record."""

    def on_rollback(self, state: TrainState, metrics: dict[str, float]) -> None:
        """The run went back to the checkpoint of state.step (exp.faults): what was recorded after that checkpoint
        was written is void, its steps are replayed; `metrics` mark the rollback. By default, an on_fault."""
        self.on_fault(state, metrics)

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None: ...

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        """Downstream task scores at state.step (exp.eval: eval/<task>/<metric>), on rank 0."""

    def on_train_end(self, state: TrainState, status: str) -> None: ...


class Events(Callback):
    """Every hook to every callback, in order: the one event path (loop, Checkpointer and fault guard send here).

    The list is read at each call, so callbacks added after it was built (the tracker) hear everything after.
    """

    def __init__(self, callbacks: list[Callback] | None = None):
        self.callbacks = callbacks if callbacks is not None else []

    def add(self, *callbacks: Callback) -> None:
        self.callbacks.extend(callbacks)

    @property
    def should_stop(self) -> bool:
        return any(cb.should_stop for cb in self.callbacks)

    @property
    def save_requested(self) -> bool:
        return any(cb.save_requested for cb in self.callbacks)

    @property
    def stop_reason(self) -> str | None:
        return next((cb.stop_reason for cb in self.callbacks if cb.should_stop and cb.stop_reason), None)

    @property
    def stop_status(self) -> str | None:
        return next((cb.stop_status for cb in self.callbacks if cb.should_stop and cb.stop_status), None)

    def on_build(self, model, optimizer, scheduler) -> None:
        for cb in self.callbacks:
            cb.on_build(model, optimizer, scheduler)

    def on_train_start(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_train_start(state)

    def on_step_end(self, state: TrainState, loss: float) -> None:
        for cb in self.callbacks:
            cb.on_step_end(state, loss)

    def on_save_request(self, state: TrainState) -> None:
        for cb in self.callbacks:
            cb.on_save_request(state)

    def on_checkpoint(self, state: TrainState, path) -> None:
        for cb in self.callbacks:
            cb.on_checkpoint(state, path)

    def on_fault(self, state: TrainState, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_fault(state, metrics)

    def on_rollback(self, state: TrainState, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_rollback(state, metrics)

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_log(state, metrics)

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_eval_end(state, metrics)

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_task_eval(state, metrics)

    def on_train_end(self, state: TrainState, status: str) -> None:
        for cb in self.callbacks:
            cb.on_train_end(state, status)
