"""Test-only loop callbacks, plugged in through the `callbacks` config node like any user callback."""

import os
import random
import signal
import time

import numpy as np
import torch

from exp.loop import Callback


class SignalAt(Callback):
    """Sends this process a signal at the end of a chosen step (SIGKILL included), once `wait_for` exists (a path, or
    a list of paths: a checkpoint written in the background included); with
    `rank`, only the process of that rank (RANK) signals itself; with `once` (a file), only the first launch does
    (it creates the file), so that a rerun goes on."""

    def __init__(
        self,
        step: int,
        signal_name: str = "SIGTERM",
        wait_for: str | None = None,
        rank: int | None = None,
        once: str | None = None,
    ):
        self.step, self.signum, self.wait_for, self.rank = step, getattr(signal, signal_name), wait_for, rank
        self.once = once

    def on_step_end(self, state, loss):
        if self.once and os.path.exists(self.once):
            return
        if state.step == self.step and (self.rank is None or int(os.environ.get("RANK", "0")) == self.rank):
            if self.once:
                open(self.once, "w").close()
            deadline = time.time() + 60
            paths = [self.wait_for] if isinstance(self.wait_for, str) else list(self.wait_for or [])
            while not all(os.path.exists(p) for p in paths) and time.time() < deadline:
                time.sleep(0.05)
            os.kill(os.getpid(), self.signum)


class SignalAtLr(SignalAt):
    """SignalAt, only in a run whose learning rate is `lr`: one point of a sweep stopped by a signal."""

    def __init__(self, lr: float, **kwargs):
        super().__init__(**kwargs)
        self.lr = lr

    def on_build(self, model, optimizer, scheduler):
        self.optimizer = optimizer

    def on_step_end(self, state, loss):
        lr = max(g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups)
        if abs(lr - self.lr) <= 1e-9 * self.lr:
            super().on_step_end(state, loss)


class InterruptAt(Callback):
    """Raises KeyboardInterrupt (a hard stop: nothing saved) at the end of a chosen step."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, state, loss):
        if state.step == self.step:
            raise KeyboardInterrupt


class GlobalRngUser(Callback):
    """Consumes Python's and NumPy's global generators each step, as user code (augmentation, example
    dropping) does, so a run only ends in the same state when those generators were restored too."""

    def on_step_end(self, state, loss):
        self.draws = (random.random(), float(np.random.rand()))


class PoisonWeightsAt(Callback):
    """Sets every parameter to NaN once, after a chosen step, so the following steps produce NaN losses."""

    def __init__(self, step: int):
        self.step, self.done = step, False

    def on_build(self, model, optimizer, scheduler):
        self.model = model

    def on_step_end(self, state, loss):
        if state.step == self.step and not self.done:
            self.done = True
            with torch.no_grad():
                for p in self.model.parameters():
                    p.fill_(float("nan"))


class StallCheckpointAt(Callback):
    """Makes the checkpoint of a chosen step hang between writing its files and the rename, so a test can
    SIGKILL the process while that checkpoint is half-done."""

    def __init__(self, step: int, seconds: float = 120.0):
        self.step, self.seconds = step, seconds

    def on_build(self, model, optimizer, scheduler):
        import exp.checkpoint.checkpointer as checkpointer

        original = checkpointer.write_snapshot  # the Checkpointer looks it up at each save

        def stalled(root, snapshot, before_rename=None):
            if snapshot.step == self.step:
                before_rename = lambda tmp: time.sleep(self.seconds)  # noqa: E731
            return original(root, snapshot, before_rename)

        checkpointer.write_snapshot = stalled


class SleepEachStep(Callback):
    """Makes every step take at least `seconds`, so a test can act while a run is in flight; not once the file
    `until` exists (a test's rerun goes at full speed)."""

    def __init__(self, seconds: float, until: str | None = None):
        self.seconds, self.until = seconds, until

    def on_step_end(self, state, loss):
        if not (self.until and os.path.exists(self.until)):
            time.sleep(self.seconds)


class RecordHooks(Callback):
    """Appends every hook it receives to a JSON-lines file: which documented hooks reach a user's callback."""

    def __init__(self, path: str):
        self.path = path

    def _record(self, hook: str, state, **extra):
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps({"hook": hook, "step": state.step if state is not None else None, **extra}) + "\n")

    def on_build(self, model, optimizer, scheduler):
        self._record("on_build", None)

    def on_train_start(self, state):
        self._record("on_train_start", state)

    def on_step_end(self, state, loss):
        self._record("on_step_end", state)

    def on_log(self, state, metrics):
        self._record("on_log", state)

    def on_eval_end(self, state, metrics):
        self._record("on_eval_end", state)

    def on_checkpoint(self, state, path):
        self._record("on_checkpoint", state, path=str(path))

    def on_fault(self, state, metrics):
        self._record("on_fault", state, metrics=metrics)

    def on_train_end(self, state, status):
        self._record("on_train_end", state, status=status)


class NoiseWeightsAt(Callback):
    """Adds Gaussian noise of a given scale to every parameter after a chosen step: later evaluations get worse."""

    def __init__(self, step: int, scale: float = 1.0):
        self.step, self.scale = step, scale

    def on_build(self, model, optimizer, scheduler):
        self.model = model

    def on_step_end(self, state, loss):
        if state.step == self.step:
            generator = torch.Generator().manual_seed(self.step)
            with torch.no_grad():
                for p in self.model.parameters():
                    p.add_(torch.randn(p.shape, generator=generator) * self.scale)


class RaiseAboveLr(Callback):
    """Raises at the first step when the learning rate is above `max_lr`: a sweep point that breaks training."""

    def __init__(self, max_lr: float):
        self.max_lr = max_lr

    def on_build(self, model, optimizer, scheduler):
        self.optimizer = optimizer

    def on_step_end(self, state, loss):
        lr = max(g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups)
        if lr > self.max_lr:
            raise RuntimeError(f"learning rate {lr:g} is above {self.max_lr:g}")


class KillTrackerAt(Callback):
    """SIGKILLs the run's MLflow worker process at the end of a chosen step (as the OOM killer would)."""

    def __init__(self, step: int, wait_for: str | None = None):
        self.step, self.wait_for = step, wait_for

    def on_step_end(self, state, loss):
        if state.step == self.step:
            import multiprocessing

            deadline = time.time() + 60
            paths = [self.wait_for] if isinstance(self.wait_for, str) else list(self.wait_for or [])
            while not all(os.path.exists(p) for p in paths) and time.time() < deadline:
                time.sleep(0.05)

            for child in multiprocessing.active_children():
                if child.name == "mlflow-tracker":
                    child.kill()
                    child.join()


class RecordBatches(Callback):
    """Appends to `path`.RANK.jsonl, at the end of each step, a digest of every row (x and y) this rank drew for it:
    the data stream a run consumed, to compare across runs and numbers of ranks."""

    def __init__(self, path: str):
        self.path, self.rows, self.patched = f"{path}.{os.environ.get('RANK', '0')}.jsonl", [], []

    def on_build(self, model, optimizer, scheduler):
        from exp.data.batches import PermutationSampler, WindowSampler
        from exp.data.mixture import MixtureSampler
        from exp.data.sft.examples import ExampleSampler
        from exp.data.torch_dataset import ItemSampler

        # the samplers look __next__ up on their class
        for cls in (WindowSampler, PermutationSampler, MixtureSampler, ExampleSampler, ItemSampler):
            self.patched.append((cls, cls.__next__))
            cls.__next__ = self._recording(cls.__next__)

    def _recording(self, draw):
        def recorded(sampler):
            batch = draw(sampler)
            self.rows += row_digests(batch)
            return batch

        return recorded

    def on_step_end(self, state, loss):
        import json

        with open(self.path, "a") as f:
            f.write(json.dumps({"step": state.step, "rows": self.rows}) + "\n")
        self.rows = []

    def on_train_end(self, state, status):
        for cls, draw in self.patched:
            cls.__next__ = draw
        self.patched = []


def row_digests(batch) -> list[str]:
    """One short digest per row of an (x, y) batch."""
    import hashlib

    x, y = batch
    return [hashlib.sha1(a.numpy().tobytes() + b.numpy().tobytes()).hexdigest()[:16] for a, b in zip(x, y, strict=True)]


class PauseIn(Callback):
    """Creates the file `ready`, then waits in one hook (on_build, on_checkpoint, on_train_end, ...; with `step`,
    only at that step) until the file `release` exists or `seconds` pass: a test signals the run while it starts up
    or ends."""

    def __init__(self, hook: str, ready: str, release: str | None = None, seconds: float = 30, step: int | None = None):
        self.ready, self.release, self.seconds, self.step = ready, release, seconds, step
        setattr(self, hook, self._pause)

    def _pause(self, *args):
        if self.step is not None and getattr(args[0], "step", None) != self.step:
            return
        open(self.ready, "w").close()
        deadline = time.time() + self.seconds
        while time.time() < deadline and not (self.release and os.path.exists(self.release)):
            time.sleep(0.05)


class GateCheckpointWriter(Callback):
    """Holds the writing of the checkpoint of `step` until the training thread has ended step `until`, and appends
    each checkpoint write's step, start and end time, thread and whether its gate opened to `log` (JSON lines).

    A background writer is released while training goes on; a save on the training thread waits for a step that
    cannot come, and the gate gives up after `seconds` (recorded as not opened)."""

    def __init__(self, step: int, until: int, log: str, seconds: float = 20.0):
        import threading

        self.step, self.until, self.log, self.seconds = step, until, log, seconds
        self.opened = threading.Event()
        self.original = None

    def on_build(self, model, optimizer, scheduler):
        import json
        import threading

        import exp.checkpoint.checkpointer as checkpointer

        self.original = original = checkpointer.write_snapshot

        def gated(root, snapshot, before_rename=None):
            start = time.time()
            opened = self.opened.wait(self.seconds) if snapshot.step == self.step else None
            path = original(root, snapshot, before_rename)
            entry = {"step": snapshot.step, "start": start, "end": time.time(), "opened": opened}
            with open(self.log, "a") as f:
                f.write(json.dumps({**entry, "thread": threading.current_thread().name}) + "\n")
            return path

        checkpointer.write_snapshot = gated

    def on_step_end(self, state, loss):
        if state.step == self.until:
            self.opened.set()

    def on_train_end(self, state, status):
        import exp.checkpoint.checkpointer as checkpointer

        if self.original is not None:  # in-process runs: the next run saves as usual
            checkpointer.write_snapshot = self.original
