"""torch.profiler on demand: chosen steps from the start (profile.steps=[a, b]), or the next N steps of a run that is
going (RUN_DIR/profile.request, which the job service's "Profile" writes, or `echo N > RUN_DIR/profile.request`).

Each profile goes to RUN_DIR/profile/steps_<a>-<b>/: trace.json (Chrome / Perfetto: https://ui.perfetto.dev), ops.txt
(the top operators by self time) and, on CUDA, memory_snapshot.pickle (torch.cuda.memory's allocation history, for
https://pytorch.org/memory_viz); every rank writes its own (trace.rank<R>.json ...), and rank 0's go to the run's
MLflow artifacts (profile/steps_<a>-<b>/). While a CUDA profile records, an out-of-memory error dumps the memory
history to RUN_DIR/profile/oom_memory_snapshot.pickle before the run fails. A file, not a signal: SIGUSR1 is save-now
and SLURM sends USR2 before preemption, and a file works the same for a local job and one on a cluster node.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, schedule

from exp.events import Callback, TrainState

log = logging.getLogger("exp")

REQUEST = "profile.request"  # in the run dir: a positive number of steps; each new write is a new request
FOLDER = "profile"
MEMORY_ENTRIES = 100_000  # allocation events kept while a CUDA profile records


def read_request(path: Path) -> int | None:
    """The number of steps a request file asks for; None when it is not a positive integer."""
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() and int(text) > 0 else None


def write_request(run_dir: Path, steps: int) -> Path:
    """Ask the run in run_dir to profile its next `steps` steps (atomically: a run never reads half a number)."""
    from exp.rundir import write_atomic

    path = Path(run_dir) / REQUEST
    write_atomic(path, f"{int(steps)}\n".encode())
    return path


class Profiler(Callback):
    """Profiles steps [first, last] with torch.profiler (one warm-up step before them when there is one), then writes
    the trace, the top operators and, on CUDA, the memory history (see the module's docstring)."""

    def __init__(self, steps, run_dir: Path, tracker, rank: int, device: torch.device, row_limit: int = 30):
        self.planned = tuple(steps) if steps else None
        self.run_dir, self.tracker, self.rank, self.device = Path(run_dir), tracker, rank, device
        self.row_limit = row_limit
        self.prof: profile | None = None
        self.window: tuple[int, int] | None = None
        self._written: list[Path] = []
        self._seen = self._request_stamp()  # a request written before this launch is not this launch's

    def on_train_start(self, state: TrainState) -> None:
        if self.planned and state.step < self.planned[1]:
            first = max(self.planned[0], state.step + 1)
            self._arm(state.step, first, self.planned[1])

    def on_step_end(self, state: TrainState, loss: float) -> None:
        if self.prof is not None:
            self.prof.step()
            if state.step >= self.window[1]:
                self._finish()
            return
        if self.planned and state.step + 1 < self.planned[0] <= state.step + 2:
            self._arm(state.step, self.planned[0], self.planned[1])  # the next step warms up
            return
        stamp = self._request_stamp()
        if stamp != self._seen:
            self._seen = stamp
            steps = read_request(self.run_dir / REQUEST)
            if steps is not None:
                self._arm(state.step, state.step + 1, state.step + steps)

    def on_train_end(self, state: TrainState, status: str) -> None:
        if self.prof is not None:  # the run ended inside the window: what was recorded is kept
            self._finish()

    def _request_stamp(self):
        try:
            st = (self.run_dir / REQUEST).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size, st.st_ino

    def _arm(self, now: int, first: int, last: int) -> None:
        """Start the profiler after step `now` so that steps first..last are recorded (first - 1 warms up)."""
        warmup = 1 if first - 1 > now else 0
        wait = max(0, first - 1 - warmup - now)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.device.type == "cuda" else [])
        self.window, self._written = (first, last), []
        self.prof = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=last - first + 1, repeat=1),
            on_trace_ready=self._write,
            record_shapes=True,
            with_stack=False,
        )
        if self.device.type == "cuda":
            torch.cuda.memory._record_memory_history(max_entries=MEMORY_ENTRIES)
            torch._C._cuda_attach_out_of_memory_observer(self._out_of_memory)
        self.prof.start()
        log.info(f"profiling steps {first}-{last}")

    def folder(self) -> Path:
        first, last = self.window
        return self.run_dir / FOLDER / f"steps_{first}-{last}"

    def _name(self, stem: str, suffix: str) -> str:
        return f"{stem}{'' if self.rank == 0 else f'.rank{self.rank}'}{suffix}"

    def _write(self, prof: profile) -> None:
        folder = self.folder()
        folder.mkdir(parents=True, exist_ok=True)
        trace = folder / self._name("trace", ".json")
        prof.export_chrome_trace(str(trace))
        sort = "self_cuda_time_total" if self.device.type == "cuda" else "self_cpu_time_total"
        ops = folder / self._name("ops", ".txt")
        ops.write_text(prof.key_averages().table(sort_by=sort, row_limit=self.row_limit) + "\n")
        self._written = [trace, ops]

    def _finish(self) -> None:
        prof, self.prof = self.prof, None
        prof.stop()  # inside the window (the run ended there) it writes what it recorded so far
        written = list(self._written)
        if self.device.type == "cuda":
            snapshot = self.folder() / self._name("memory_snapshot", ".pickle")
            snapshot.parent.mkdir(parents=True, exist_ok=True)
            torch.cuda.memory._dump_snapshot(str(snapshot))
            torch.cuda.memory._record_memory_history(enabled=None)
            written.append(snapshot)
        if not written:
            return
        log.info(f"profile of steps {self.window[0]}-{self.window[1]}: {self.folder()} (trace.json: ui.perfetto.dev)")
        if self.rank == 0:
            for path in written:
                self.tracker.log_artifact(path, f"{FOLDER}/{self.folder().name}")

    def _out_of_memory(self, device, alloc, device_alloc, device_free) -> None:
        path = self.run_dir / FOLDER / self._name("oom_memory_snapshot", ".pickle")
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.cuda.memory._dump_snapshot(str(path))
        log.error(f"CUDA out of memory: the allocation history is in {path} (pytorch.org/memory_viz)")
