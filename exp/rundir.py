"""The run directory: its lock, summary.json (the one writer and reader), metrics.jsonl, the run's plot,
and the one atomic file writer every other writer in exp calls.

    <run dir>/.lock  summary.json  metrics.jsonl  metrics.png  config_changes.json  branches.json  .hydra/  checkpoints/

A resume from before the newest checkpoint starts a new branch: the abandoned branch's later checkpoints and its
metrics.jsonl lines past the branch point move to checkpoints/abandoned/<n>_after_step_<step>/, and branches.json
lists each branch left behind.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from exp.errors import ExpError
from exp.events import Callback, TrainState
from exp.perf import mfu

SUMMARY = "summary.json"
METRICS = "metrics.jsonl"
PLOT = "metrics.png"
BRANCHES = "branches.json"


class RunDirInUse(ExpError, RuntimeError):
    """Another process holds the run directory's lock; the message names it."""


@contextlib.contextmanager
def atomic_file(path) -> Iterator[Path]:
    """A temporary sibling to write `path` through; renamed over it when the block ends without an error,
    so a reader never sees half a file (and a crash leaves the old one)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path, data: str | bytes) -> Path:
    """`data` written to `path` through atomic_file."""
    with atomic_file(path) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data)
    return Path(path)


def fsync(path) -> None:
    """Flush a file or directory to disk; a name (and a rename) is durable only once its directory is synced."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish_dir(tmp: Path, final: Path, before_rename: Callable[[Path], None] | None = None) -> None:
    """The one atomic step for a folder (checkpoint, corpus, SFT set) built under a temporary name: fsync it,
    rename it to its final name (an existing one steps aside first and is deleted after), fsync the parent."""
    for p in tmp.rglob("*"):
        fsync(p)
    fsync(tmp)
    if before_rename is not None:
        before_rename(tmp)
    if final.exists():
        trash = final.parent / f".{final.name}.trash-{os.getpid()}"
        os.rename(final, trash)
        os.rename(tmp, final)
        fsync(final.parent)
        shutil.rmtree(trash)
    else:
        os.rename(tmp, final)
        fsync(final.parent)


def write_json(path, obj) -> Path:
    """JSON, indented, written atomically."""
    return write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path) -> dict | list | None:
    """A JSON file's content, or None when it is absent or torn (a killed writer without write_atomic)."""
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return None


def discard_untouched(run_dir) -> None:
    """Remove a run directory that holds only what Hydra put there before the job ran (bad input, a dry run)."""
    path = Path(run_dir) if run_dir else None
    if path is not None and path.is_dir() and {p.name for p in path.iterdir()} <= {".hydra", "train.log"}:
        shutil.rmtree(path, ignore_errors=True)


def write_summary(run_dir, summary: dict) -> Path:
    """summary.json of a run or pipeline: status, losses, where its record and weights are."""
    return write_json(Path(run_dir) / SUMMARY, summary)


def run_summary(
    run_dir: Path,
    state: TrainState,
    stage,
    num_params: int,
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
    evaluation: dict | None = None,
    flops_per_token: float = 0.0,
    peak_flops: float | None = None,
    num_devices: int = 1,
) -> dict:
    """summary.json of a run that ended as planned (or stopped: `status`): final metrics and where to find the
    run's record and weights; write_summary writes it.

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
        "val_perplexity": (  # of a token-level cross-entropy only (not of DPO's loss)
            math.exp(min(state.val_loss, 50.0))
            if state.val_loss is not None and getattr(stage, "eval_perplexity", True)
            else None
        ),
        "tokens_per_s": tokens_per_s,
        "flops_per_token": flops_per_token or None,  # training FLOPs (exp.perf): 6 N + attention
        "tflops_per_device": flops_per_token * tokens_per_s / num_devices / 1e12 if flops_per_token else None,
        "mfu": mfu(flops_per_token, tokens_per_s, peak_flops, num_devices),  # None without a known peak
        "peak_flops": peak_flops,
        "train_seconds": state.train_seconds,
        "first_step_seconds": state.warmup_seconds,  # summed over the processes that trained this run
        "compile_seconds": compile_seconds,
        "wall_seconds": wall_seconds,
        "first_step_time": first_step_time,  # Unix time the first step of this process finished
        "num_params": num_params,
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
    if evaluation:  # eval=lm_eval: the last evaluation's step and scores (eval/<task>/<metric>)
        summary["eval"] = evaluation
    sources = source_metrics(read_metrics(run_dir / METRICS))
    if sources:  # data=mixture: each source's last val loss, tokens drawn and weight
        summary["sources"] = sources
    return summary


def source_metrics(rows: list[dict]) -> dict[str, dict[str, float]]:
    """A mixture's last val/loss/<source>, data/tokens/<source> and data/weight/<source> of metrics.jsonl rows, as
    {"val_loss": {source: value}, "tokens": {...}, "weight": {...}}; {} for other data."""
    out: dict[str, dict[str, float]] = {}
    for m in rows:
        for prefix, name in (("val/loss/", "val_loss"), ("data/tokens/", "tokens"), ("data/weight/", "weight")):
            for key, value in m.items():
                if key.startswith(prefix):
                    out.setdefault(name, {})[key[len(prefix) :]] = value
    return out


def failure_summary(
    run_dir: Path,
    state: TrainState,
    tracker,
    error: str | None,
    *,
    stage_name,
    num_steps,
    status: str = "FAILED",
    stop_reason: str | None = None,
    checkpoints: dict | None = None,
) -> dict:
    """summary.json of a run that failed (or was interrupted, KILLED): where it stopped, why, and the checkpoints
    it leaves (Checkpointer.kept); write_summary writes it."""
    return {
        "status": status,
        "error": error,
        "stop_reason": stop_reason,
        **(checkpoints or {}),
        "stage": stage_name,
        "step": state.step,
        "num_steps": num_steps,
        "val_loss": state.val_loss,
        "run_dir": str(run_dir.resolve()),
        "mlflow_tracking_uri": tracker.uri,
        "mlflow_run_id": tracker.run_id,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
    }


def read_summary(run_dir) -> dict | None:
    """A run directory's summary.json, or None before it has one."""
    summary = read_json(Path(run_dir) / SUMMARY)
    return summary if isinstance(summary, dict) else None


def lock_holder(run_dir) -> str | None:
    """Who holds the run dir's lock (a trainer still running: its `host=... pid=...` line), or None. The one
    reader of the lock: sweeps, the sweep CLI and the job service ask here."""
    path = Path(run_dir) / ".lock"
    if not path.exists():
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    except BlockingIOError:
        return os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
    finally:
        os.close(fd)


class RunLock:
    """Exclusive flock on run_dir/.lock for as long as the context is open; a second holder is refused."""

    def __init__(self, run_dir):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / ".lock"
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        """Take the lock or raise RunDirInUse naming the current holder."""
        self.run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            raise RunDirInUse(f"run directory {self.run_dir} is in use by {holder} (lock {self.path})") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"host={socket.gethostname()} pid={os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        """Drop the lock; the file stays, since unlinking it would race with the next holder."""
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


class MetricsFile(Callback):
    """Every logged metric as one JSON line per step in the run directory: the record that needs no server."""

    def __init__(self, path: Path, keep_until_step: int = 0):
        self.path = Path(path)
        self.keep_until_step = keep_until_step
        self._file = None
        self._lines = self._at_checkpoint = 0  # lines in the file; of them, written before the newest checkpoint

    def on_train_start(self, state: TrainState) -> None:
        """Drop lines past the step this run starts from, so a resumed run's record has no duplicate steps."""
        if not self.path.exists():
            return
        self._keep([m for m in read_metrics(self.path) if m["step"] <= self.keep_until_step])

    def _keep(self, rows: list[dict]) -> None:
        self._close()
        write_atomic(self.path, "".join(json.dumps(m) + "\n" for m in rows))
        self._lines = self._at_checkpoint = len(rows)

    def _write(self, step: int, metrics: dict[str, float]) -> None:
        if self._file is None:  # kept open between lines; line-buffered, so each line reaches the OS at once
            self._file = self.path.open("a", buffering=1)
        self._file.write(json.dumps({"step": step, **metrics}) + "\n")
        self._lines += 1

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def on_train_end(self, state: TrainState, status: str) -> None:
        self._close()

    def on_checkpoint(self, state: TrainState, path) -> None:
        self._at_checkpoint = self._lines

    def on_rollback(self, state: TrainState, metrics: dict[str, float]) -> None:
        """The lines written since the checkpoint rolled back to go (their steps are replayed, each once), and the
        rollback is written at the step it went back to."""
        self._keep([m for m in read_metrics(self.path)[: self._at_checkpoint] if m["step"] <= state.step])
        self._write(state.step, metrics)

    def on_log(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._write(state.step, metrics)

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._write(state.step, metrics)

    def on_fault(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._write(state.step, metrics)

    def on_task_eval(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._write(state.step, metrics)


def read_metrics(path: Path) -> list[dict]:
    """The lines of a metrics.jsonl file (a line torn by a killed process is skipped)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return rows


def record_branch(run_dir, step: int, folder: Path, entry: dict) -> dict:
    """A new branch from `step`, the abandoned one's checkpoints already set aside in `folder`: the metrics.jsonl lines
    past `step` move there too, and branches.json lists the branch left behind. Returns its entry."""
    run_dir, folder = Path(run_dir), Path(folder)
    rows = read_metrics(run_dir / METRICS)
    write_atomic(folder / METRICS, "".join(json.dumps(m) + "\n" for m in rows if m["step"] > step))
    if (run_dir / METRICS).exists():
        write_atomic(run_dir / METRICS, "".join(json.dumps(m) + "\n" for m in rows if m["step"] <= step))
    where = os.path.relpath(folder, run_dir) if folder.resolve().is_relative_to(run_dir.resolve()) else str(folder)
    at = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    entry = {"step": step, "abandoned": where, **entry, "at": at}
    write_json(run_dir / BRANCHES, [*branches(run_dir), entry])
    return entry


def branches(run_dir) -> list[dict]:
    """branches.json: the branches this run directory left behind, oldest first."""
    found = read_json(Path(run_dir) / BRANCHES)
    return found if isinstance(found, list) else []


def left_behind(run_dir, mlflow_run_id: str | None) -> dict | None:
    """The newest branch of this run directory that left MLflow run `mlflow_run_id` behind, or None: a resume never
    reopens such a run (a branch killed before its first checkpoint resumes from a checkpoint that names it)."""
    found = [b for b in branches(run_dir) if isinstance(b, dict) and b.get("mlflow_run_id") == mlflow_run_id]
    return found[-1] if found and mlflow_run_id else None


def carry_over(tracker, run_dir, step: int, branch: dict | None = None) -> None:
    """A resume that starts a new MLflow run: the steps up to `step` from metrics.jsonl (logged now: the file keeps no
    times), and for a branch the tags linking it and the run it left, with branches.json."""
    run_dir = Path(run_dir)
    for row in read_metrics(run_dir / METRICS):
        if row["step"] <= step:
            tracker.on_log(TrainState(step=row.pop("step")), row)
    if branch is None:
        return
    left, aside, at = branch.get("mlflow_run_id"), branch["abandoned"], str(branch["step"])
    tracker.set_tags({"branch.from_step": at, "branch.abandoned_run": left or "none", "branch.abandoned": aside})
    if left:  # the run left behind says so: its points past the branch's step belong to no live branch
        tracker.set_tags({"branch.abandoned_after_step": at, "branch.abandoned": aside}, run_id=left)
    tracker.log_artifact(run_dir / BRANCHES)


def plot_run(metrics_path: Path, out: Path) -> Path | None:
    """A PNG against step of train/val loss (a mixture's per source too), the downstream scores (eval=lm_eval), a
    mixture's tokens drawn per source, and the learning rate; None when nothing was logged."""
    rows = read_metrics(metrics_path)
    train = [(m["step"], m["train/loss"]) for m in rows if "train/loss" in m]
    if not train:
        return None
    plt = pyplot()
    series = lambda key: [(m["step"], m[key]) for m in rows if key in m]
    keys = lambda prefix: sorted({k for m in rows for k in m if k.startswith(prefix)})
    scores, sources = task_scores(rows), keys("data/tokens/")
    panels = ["loss", *(["scores"] if scores else []), *(["tokens"] if sources else []), "lr"]
    heights = {"loss": 3, "scores": 2, "tokens": 1.5, "lr": 1}
    fig, axes = plt.subplots(
        len(panels), 1, figsize=(7, 2 + 2 * len(panels)), sharex=True, height_ratios=[heights[p] for p in panels]
    )
    ax = dict(zip(panels, axes, strict=True))
    ax["loss"].plot(*zip(*train, strict=True), label="train/loss")
    if series("val/loss"):
        ax["loss"].plot(*zip(*series("val/loss"), strict=True), "o-", label="val/loss")
    for key in keys("val/loss/"):  # a mixture's sources
        ax["loss"].plot(*zip(*series(key), strict=True), ".--", alpha=0.8, label=key)
    ax["loss"].set_ylabel("loss")
    for name, points in scores.items():
        ax["scores"].plot(*zip(*points, strict=True), "o-", label=name)
    for key in sources:
        ax["tokens"].plot(*zip(*series(key), strict=True), label=key[len("data/tokens/") :])
    ax["lr"].plot(*zip(*series("train/lr"), strict=True), color="tab:green")
    labels = {"loss": "loss", "scores": "task score", "tokens": "tokens drawn", "lr": "learning rate"}
    for name, a in ax.items():
        a.set_ylabel(labels[name])
        a.grid(alpha=0.3)
        if name != "lr":
            a.legend(fontsize=7 if name != "loss" else None)
    ax["lr"].set_xlabel("step")
    fig.suptitle(Path(metrics_path).parent.name, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


def task_metrics(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """The downstream evaluations (eval=lm_eval) of metrics.jsonl rows, {"<task>/<metric>": [(step, value)]}, their
    stderr left out."""
    found: dict[str, list[tuple[int, float]]] = {}
    for m in rows:
        for key, value in m.items():
            if key.startswith("eval/") and not key.endswith("_stderr") and isinstance(value, (int, float)):
                found.setdefault(key[5:], []).append((m["step"], float(value)))
    return found


def task_scores(rows: list[dict]) -> dict[str, list[tuple[int, float]]]:
    """task_metrics that are fractions (accuracies, exact match): the ones a plot of scores shows, not perplexities."""
    lower_is_better = ("perplexity", "bits_per_byte")
    return {
        k: v
        for k, v in task_metrics(rows).items()
        if not any(w in k for w in lower_is_better) and all(0.0 <= x <= 1.0 for _, x in v)
    }


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display on clusters), imported on first use."""
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    return plt
