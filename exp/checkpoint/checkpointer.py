"""The Checkpointer: built with a run's objects, it finds the checkpoint to resume, checks config drift,
restores, saves (plain or sharded), rotates and rolls back. `conf/checkpoint` targets it."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from exp.checkpoint.format import (
    MANIFEST,
    CheckpointError,
    checkpoint_name,
    expected_size,
    free_space,
    is_disk_full,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_saved_config,
    read_trainer_state,
    rotate_checkpoints,
    set_aside_checkpoints,
    take_snapshot,
    verify_together,
    write_snapshot,
)
from exp.checkpoint.layout import LAYOUT_KEYS, check_layout, describe, is_sharded, layout_of, saved_layout
from exp.checkpoint.weights import tokenizer_entry
from exp.data.tokenizer import TOKENIZER_FILE
from exp.errors import ConfigError, DiskFull, ResumeError
from exp.events import Callback, Events, TrainState
from exp.optim import STAGE_LINKS, hyperparameters
from exp.rundir import BRANCHES, read_json, record_branch, write_json
from exp.schedules import resume_with_changes
from exp.text import first_line

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
    "eval",  # downstream evaluation reads the model; it changes nothing that trains
    "profile",
    "model.config.",  # model=hf: the model's config.json, saved beside the settings so the model rebuilds anywhere
)
# Keys added since older checkpoints were saved, with the value that means what those checkpoints trained with: a saved
# config without one compares as holding it (where this run's data or model has the key at all)
ADDED_KEYS = {"data.document_mask": False, "data.order": "random"}
CONFIG_CHANGES = "config_changes.json"
# `_target_`s that moved: a checkpoint saved before names the same object at its old place
MOVED_TARGETS = {
    f"exp.optim.{name}": f"exp.schedules.{name}"
    for name in ("constant", "linear_warmup", "linear", "linear_to_zero", "cosine", "exponential", "wsd")
}


@dataclass
class ResumePoint:
    """The checkpoint a run continues from, what it holds, and how this run's config differs from its."""

    path: Path
    trainer_state: dict
    saved_cfg: dict
    current_cfg: dict
    changes: dict  # {key: (old, new)}
    layout: dict = dataclasses.field(default_factory=dict)  # ranks and batches {key: (old, new)}, when they changed

    @property
    def state(self) -> TrainState:
        return state_from_dict(self.trainer_state.get("state", {}))


def find_resume(cfg: DictConfig, resume, dist) -> ResumePoint | None:
    """The checkpoint to continue from (resume.path: auto, a checkpoint, a run dir; null: none), verified once, the
    ranks splitting the hashing, and checked for config drift. Collective. Raises ConfigError or ResumeError."""
    root = Path(cfg.checkpoint.dir)
    path = _find(resume, root, dist)
    if path is None:
        return None
    try:
        trainer_state = read_trainer_state(path)
        before = saved_layout(trainer_state, read_saved_config(path / "config.yaml"))
    except CheckpointError as e:
        raise ResumeError(f"cannot resume: {e}") from None
    now, allowed = layout_of(cfg.stage, dist), resume.allow_config_change
    same_batch = LAYOUT_KEYS if before.global_batch == now.global_batch else ()  # split otherwise: not a change
    saved, current, changes = check_config_change(path / "config.yaml", cfg, allowed, ignore=same_batch)
    layout = check_layout(path, before, now, trainer_state.get("sampler"), allowed)
    return ResumePoint(path, trainer_state, saved, current, changes, layout)


def _find(resume, root: Path, dist) -> Path | None:
    """Rank 0 decides where to look; every rank then verifies its share of each candidate's files."""
    where, refusal = None, ""
    if dist.is_main:
        try:
            where = _where(resume, root)
        except ConfigError as e:
            refusal = str(e)
    refusal, where = json.loads(dist.broadcast_str(json.dumps([refusal, where])))
    if refusal:
        raise ConfigError(refusal)
    if where is None:
        return None
    if where["checkpoint"]:
        try:
            verify_together(where["checkpoint"])
        except CheckpointError as e:
            raise ResumeError(f"cannot resume: {e}") from None
        return Path(where["checkpoint"])
    warn = log.warning if dist.is_main else _quiet
    for folder in where["folders"]:
        if found := latest_valid_checkpoint(folder, warn=warn, verify=verify_together):
            return found
    if resume.path == "auto":
        return None
    raise ConfigError(f"resume.path={where['folders'][-1]} holds no valid checkpoint")


def _where(resume, root: Path) -> dict | None:
    """{"checkpoint": one to verify} or {"folders": to search, in order}; None: start fresh."""
    if resume.path is None:
        if list_checkpoints(root):
            raise ConfigError(
                f"resume.path=null but {root} already holds checkpoints: resume=auto "
                "continues them, or choose a new hydra.run.dir"
            )
        return None
    if resume.path == "auto":
        return {"checkpoint": None, "folders": [str(root)]}
    path = Path(resume.path).expanduser()
    if (path / MANIFEST).exists() or (path / "trainer_state.json").exists():
        return {"checkpoint": str(path), "folders": []}
    return {"checkpoint": None, "folders": [str(path / "checkpoints"), str(path)]}


def _quiet(_line: str) -> None:
    pass


def check_config_change(saved_yaml: Path, cfg: DictConfig, allowed: bool, ignore=()) -> tuple[dict, dict, dict]:
    """Refuse to resume with a different config (listing the keys) unless resume.allow_config_change=true.

    Returns the checkpoint's and this run's resolved configs and the changed keys (but `ignore`) as {key: (old, new)}.
    """
    saved_tree = _moved(read_saved_config(saved_yaml))  # resolves nothing: the folder may come from elsewhere
    current_tree = OmegaConf.to_container(cfg, resolve=True)
    saved, current = _flat(saved_tree), _flat(current_tree)
    saved |= {k: v for k, v in ADDED_KEYS.items() if k in current and k not in saved}
    changed = {
        k: (saved.get(k), current.get(k))
        for k in sorted(set(saved) | set(current))
        if saved.get(k) != current.get(k) and not k.startswith(RESUME_IGNORES) and k not in ignore
    }
    for opt_key, stage_key in STAGE_LINKS.items():  # a checkpoint from before the link: what trained is the same
        if f"optimizer.{opt_key}" in saved and f"optimizer.{opt_key}" not in changed:
            changed.pop(f"stage.{stage_key}", None)
    if not changed:
        return saved_tree, current_tree, {}
    listing = ", ".join(f"{k} ({old!r} -> {new!r})" for k, (old, new) in list(changed.items())[:8])
    if len(changed) > 8:
        listing += f" and {len(changed) - 8} more"
    if allowed:
        log.warning(f"resuming with a changed config: {listing}")
        return saved_tree, current_tree, changed
    raise ConfigError(
        f"config differs from the checkpoint's {saved_yaml}: {listing}; "
        "set resume.allow_config_change=true to resume anyway"
    )


def _moved(node):
    """A saved config with the `_target_`s that moved since (MOVED_TARGETS) named at their new place."""
    if isinstance(node, dict):
        return {k: MOVED_TARGETS.get(v, v) if k == "_target_" else _moved(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_moved(v) for v in node]
    return node


def _flat(node, prefix: str = "") -> dict:
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: node}


def state_to_dict(state: TrainState) -> dict:
    """The state as JSON values (an infinite best loss is null)."""
    return {k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in dataclasses.asdict(state).items()}


def state_from_dict(values: dict) -> TrainState:
    """A state from trainer_state.json (keys it does not know, from other versions, are dropped)."""
    state = TrainState(**{k: v for k, v in values.items() if k in TrainState.__dataclass_fields__})
    if state.best_val_loss is None:
        state.best_val_loss = math.inf
    return state


class Checkpointer(Callback):
    """A run's checkpoints: saves every `every_n_steps`, at each new best val loss (`keep_best`) and at the end;
    keeps the newest `keep_last` plus the best; restores a resume point and rolls back after faults.

    With `async_save` the saves during training do not wait for the disk: the training thread copies the state
    to host memory (DCP's async_save for sharded runs) and a background writer writes, hashes and publishes it;
    the next save, a rollback or the end waits for it first (never two in flight). The final save, a save on
    SIGUSR1 and a preemption's are synchronous. A checkpoint counts (rotation, best, the tracker told) once
    published, which the training thread notices at the next step.

    Built by exp.run as a partial of the `checkpoint` config with the run's objects: `trained`
    (exp.loop.Trained: model, optimizer, scheduler, scaler, dist), the data `sampler`, the `tracker` (its run
    id, if known yet, goes into trainer_state.json), `events` (told of each save), the `stateful` callbacks whose
    state_dict() goes into each checkpoint, and the data's `tokenizer` (its tokenizer.json is saved beside
    model.safetensors; trainer_state.json names it).
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        keep_last: int = 3,
        keep_best: bool = True,
        dir: str = "checkpoints",
        async_save: bool = True,
        *,
        trained=None,
        sampler=None,
        tracker=None,
        events: Events | None = None,
        stateful: dict[str, Callback] | None = None,
        config_yaml: str = "",
        seed: int = 0,
        run_dir: str | None = None,
        tokenizer=None,
    ):
        if every_n_steps < 0 or keep_last < 0:
            raise ValueError("checkpoint.every_n_steps and checkpoint.keep_last must be >= 0")
        self.every_n_steps, self.keep_last, self.keep_best, self.dir = every_n_steps, keep_last, keep_best, Path(dir)
        self.trained, self.sampler, self.tracker = trained, sampler, tracker
        self.events = events if events is not None else Events()
        self.stateful, self.config_yaml, self.seed = stateful or {}, config_yaml, seed
        self.run_dir = Path(run_dir) if run_dir is not None else self.dir.parent
        self.tokenizer = tokenizer
        self._resumed: tuple[ResumePoint, list[dict], int] | None = None  # re-applied after a rollback to it
        self.sharded = trained is not None and trained.dist.strategy == "fsdp" and trained.dist.enabled
        self.last_path: Path | None = None
        self.last_step: int | None = None
        self.best_path: Path | None = None
        self._evaluated_at: int | None = None
        self.async_save = async_save and trained is not None
        self._pending: _Pending | None = None
        self._host_buffers: dict = {}  # the snapshots' copies, reused from save to save (one in flight at most)
        # DCP's background writer gathers over a process group of its own (gloo: host memory), never the training's
        self._async_group = None
        if self.async_save and self.sharded:
            import torch.distributed as tdist

            self._async_group = tdist.new_group(backend="gloo")

    # --- resume ---------------------------------------------------------------------------------------

    def restore(self, point: ResumePoint) -> TrainState:
        """Load the resume point into the run's objects (the config wins where it changed); return the state."""
        t = self.trained
        configured = hyperparameters(t.optimizer)  # this config's settings, before the checkpoint's replace them
        try:
            restored = self._load(point.path, verified=True)  # find_resume verified it
        except CheckpointError as e:
            raise ResumeError(f"cannot resume from {point.path}: {e}") from None
        self.sampler.load_state_dict(restored["sampler"])
        for name, values in restored.get("callbacks", {}).items():
            if name in self.stateful:
                self.stateful[name].load_state_dict(values)
        state = point.state
        changed = ""
        if point.changes:
            before, after = resume_with_changes(
                t.optimizer, t.scheduler, configured, point.saved_cfg, point.current_cfg, state.step
            )
            changed = f" | lr {before:.3e} -> {after:.3e} (changed: {', '.join(point.changes)})"
            self._resumed = (point, configured, state.step)
        if (point.changes or point.layout) and t.dist.is_main:
            self._record_changes(state.step, {**point.changes, **point.layout})
        changed += f" | {describe(point.layout)}" if point.layout else ""
        log.info(f"resumed from {point.path} at step {state.step}{changed}")
        self.last_path, self.last_step = point.path, state.step
        self.follow(state, point.path.parent)  # resumed from another run dir: its best checkpoint counts too
        return state

    def start_branch(self, point: ResumePoint, mlflow_run_id: str | None) -> dict | None:
        """A resume from before this run's newest checkpoint starts a new branch: the later checkpoints move aside
        (checkpoints/abandoned/, with the metrics.jsonl lines past the resume point, listed in branches.json), so
        resume=auto, rotation and the best checkpoint follow the new branch. Returns the entry; None if no branch."""
        step = point.state.step
        folder = set_aside_checkpoints(self.dir, step)
        if folder is None:
            return None
        moved = sorted(p.name for p in folder.iterdir() if p.is_dir())
        entry = {"checkpoints": moved, "resumed_from": str(point.path.resolve()), "mlflow_run_id": mlflow_run_id}
        entry = record_branch(self.run_dir, step, folder, entry)
        log.warning(
            f"resuming from step {step} starts a new branch: the later checkpoints ({', '.join(moved)}) and metrics "
            f"are kept in {folder}, listed in {self.run_dir / BRANCHES}"
        )
        return entry

    def _record_changes(self, step: int, changes: dict) -> None:
        """Keys changed at a resume (old -> new), in config_changes.json and on the MLflow run: MLflow params
        keep the first launch's values (they cannot change), so this record says which stopped being true."""
        path = self.run_dir / CONFIG_CHANGES
        history = [h for h in (read_json(path) or []) if h["step"] < step]  # resumed earlier: rewrite what followed
        history.append({"step": step, "changes": {k: [old, new] for k, (old, new) in changes.items()}})
        write_json(path, history)
        listing = "; ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changes.items())
        self.tracker.set_tags({"config_changed": "true", f"config_changes.step_{step}": listing})
        self.tracker.log_artifact(path)

    def _load(self, path: Path, verified: bool = False) -> dict:
        t = self.trained
        if self.sharded or is_sharded(path):  # DCP reshards to any number of ranks, a single process included
            from exp.checkpoint.sharded import load_sharded as load
        else:
            load = load_checkpoint
        objects = dict(model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler)
        return load(path, **objects, verified=verified)

    # --- the loop's hooks -----------------------------------------------------------------------------

    def on_train_start(self, state: TrainState) -> None:
        if self.best_path is None:  # restore() may have found it in the run dir resumed from
            self.follow(state)

    def follow(self, state: TrainState, *elsewhere: Path) -> None:
        """Take the best checkpoint from the state (a resumed or rolled-back run), so rotation spares it; a run
        resumed from another run directory finds it there."""
        self.best_path = None
        if not self.keep_best or state.best_step is None:
            return
        for root in (self.dir, *elsewhere):
            if (root / checkpoint_name(state.best_step)).is_dir():
                self.best_path = root / checkpoint_name(state.best_step)
                return

    def on_eval_end(self, state: TrainState, metrics: dict[str, float]) -> None:
        self._evaluated_at = state.step

    def on_step_end(self, state: TrainState, loss: float) -> None:
        self._publish_if_done()
        new_best = self.keep_best and self._evaluated_at == state.step and state.best_step == state.step
        if new_best or (self.every_n_steps and state.step % self.every_n_steps == 0):
            final = state.step >= self.trained.stage.num_steps  # the end waits for it anyway
            self.save(state, blocking=final or not self.async_save)

    # --- saving ---------------------------------------------------------------------------------------

    def save(self, state: TrainState, blocking: bool = True) -> Path:
        """Save now (once per step), rotate, and tell every callback (the tracker records the reference). A disk
        too full for it raises DiskFull (one line: the directory and the space needed); nothing half-written stays.
        blocking=False (async_save) returns the path the checkpoint will have once the background writer is done."""
        pending = self._pending
        if pending is not None and pending.step == state.step:
            return self.wait() if blocking else pending.path
        self.wait()  # never two in flight
        if self.last_step == state.step:
            return self.last_path
        expected = self._make_room() if self.trained.dist.is_main or self.sharded else None
        try:
            job = self._write(state, blocking)
        except Exception as e:
            if self._out_of_space(e, expected):
                raise self._disk_full(state, expected) from None
            raise
        if isinstance(job, Path):
            self._published(dataclasses.replace(state), job)
            return job
        path = self.dir / checkpoint_name(state.step)
        self._pending = _Pending(state.step, path, dataclasses.replace(state), expected)
        self._pending.start(job)
        return self._pending.path

    def wait(self) -> Path | None:
        """Wait for the save in flight, publish it and return its path (the newest checkpoint's, without one).
        Its failure raises here, on the training thread: a full disk as DiskFull."""
        pending, self._pending = self._pending, None
        if pending is not None:
            try:
                path = pending.result()
            except Exception as e:
                if self._out_of_space(e, pending.expected):
                    raise self._disk_full(pending.state, pending.expected) from None
                raise
            self._published(pending.state, path)
        return self.last_path

    def saving(self) -> bool:
        """Whether a checkpoint is being written in the background."""
        return self._pending is not None

    def settle(self, timeout: float = 120.0) -> None:
        """At an ending that is already a failure: let a save in flight finish (it is a valid checkpoint) without
        raising; one that does not end within `timeout` is left behind (its temp folder is never a checkpoint)."""
        pending = self._pending
        if pending is None:
            return
        pending.thread.join(timeout)
        if pending.thread.is_alive():
            log.warning(f"the checkpoint of step {pending.step} was still being written; it is not counted")
            self._pending = None
            return
        try:
            self.wait()
        except Exception as e:
            log.warning(f"the checkpoint of step {pending.step} could not be written: {first_line(e)}")

    def _publish_if_done(self) -> None:
        if self._pending is not None and not self._pending.thread.is_alive():
            self.wait()

    def _published(self, state: TrainState, path: Path) -> None:
        """A checkpoint is on disk: it is the newest (the best, if it was saved as one), rotation runs, every
        callback hears of it."""
        self.last_path, self.last_step = path, state.step
        if self.keep_best and state.best_step == state.step:  # the state the checkpoint was taken at: a new best
            self.best_path = path  # (a save in flight may publish after a later step evaluated a newer best)
        if self.trained.dist.is_main:
            protect = {self.best_path} if self.best_path else set()
            rotate_checkpoints(self.dir, self.keep_last, protect | {path})
        if self.trained.dist.is_main or self.sharded:  # DDP: only rank 0 wrote it
            self.events.on_checkpoint(state, path)

    def _out_of_space(self, error: Exception, expected: int | None) -> bool:
        """Whether a failed save failed for want of space: the error says so, or (DCP's writer reports a full disk
        as a torch.save zip error) the disk, its half-written folder removed, cannot hold the checkpoint."""
        return is_disk_full(error) or (expected is not None and free_space(self.dir) < expected)

    def _make_room(self) -> int:
        """The next checkpoint's expected size; when the disk has less free, the checkpoints rotation would delete
        after this save go first (never the best, never the newest this run saved or resumed from). Rank 0 rotates."""
        t = self.trained
        expected = expected_size(self.dir, t.model, t.optimizer)
        free = free_space(self.dir)
        if self.keep_last and free < expected and t.dist.is_main:
            protect = {p for p in (self.best_path, self.last_path) if p is not None}
            gone = rotate_checkpoints(self.dir, max(self.keep_last - 1, 1), protect)
            if gone:
                log.warning(
                    f"{self.dir} has {_mb(free)} free and the next checkpoint needs about {_mb(expected)}: removed "
                    f"{', '.join(p.name for p in gone)} before saving it (rotation removes them after the save)"
                )
        return expected

    def _disk_full(self, state: TrainState, expected: int | None) -> DiskFull:
        name = checkpoint_name(state.step)
        needed = f"about {_mb(expected)}" if expected else "more"
        return DiskFull(
            f"no space left in {self.dir} for checkpoint {name}: it needs {needed}, {_mb(free_space(self.dir))} "
            "is free; free some space there or set checkpoint.dir to a larger disk"
        )

    def _write(self, state: TrainState, blocking: bool = True) -> Path | Callable[[], Path]:
        """Write the checkpoint of this step; not blocking: take it (on this thread) and return the rest of the work,
        for the background writer."""
        t = self.trained
        if not self.sharded and not t.dist.is_main:  # DDP: the replicas are identical; rank 0 writes
            return self.dir / checkpoint_name(state.step)
        trainer_state = {
            "state": state_to_dict(state),
            "sampler": self.sampler.state_dict(),
            "layout": layout_of(t.stage, t.dist).to_dict(),
            "callbacks": {k: v for k, cb in self.stateful.items() if (v := cb.state_dict()) is not None},
            "seed": self.seed,
            # known yet or null, never waited for: a resume finds a later id in the run dir's marker (exp.tracking)
            "mlflow_run_id": self.tracker.known_run_id,
            "mlflow_tracking_uri": self.tracker.uri,
            "tokenizer": tokenizer_entry(self.tokenizer),
        }
        data = self.tokenizer.to_json() if self.tokenizer is not None else None
        objects = dict(model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler)
        objects |= dict(trainer_state=trainer_state, config_yaml=self.config_yaml)
        objects["files"] = {TOKENIZER_FILE: data} if data is not None else None
        if self.sharded:  # every rank writes its shard
            from exp.checkpoint.sharded import save_sharded

            return save_sharded(self.dir, state.step, **objects, async_group=None if blocking else self._async_group)
        snapshot = take_snapshot(state.step, **objects, into=None if blocking else self._host_buffers)
        if blocking:
            return write_snapshot(self.dir, snapshot)
        return lambda: write_snapshot(self.dir, snapshot)

    # --- faults ---------------------------------------------------------------------------------------

    def rollback(self, state: TrainState, lr_factor: float) -> bool:
        """Restore the newest valid checkpoint into the run's objects and `state` with the learning rate times
        lr_factor; False when there is none. The data sampler is not rewound (the bad windows are not replayed)."""
        t = self.trained
        self.wait()  # a save in flight is the newest checkpoint once written
        t.dist.barrier()  # rank 0 may still be writing the newest checkpoint
        warn = log.warning if t.dist.is_main else _quiet
        if not (found := latest_valid_checkpoint(self.dir, warn=warn, verify=verify_together)):
            return False
        back = self._load(found, verified=True)
        for key, value in dataclasses.asdict(state_from_dict(back["state"])).items():
            setattr(state, key, value)
        self.last_path, self.last_step = Path(found), state.step  # a newer, unusable checkpoint is written again
        if self._resumed is not None and state.step <= self._resumed[2]:  # written under the config before resuming
            point, configured, _ = self._resumed
            resume_with_changes(t.optimizer, t.scheduler, configured, point.saved_cfg, point.current_cfg, state.step)
        for group in t.optimizer.param_groups:
            group["lr"] *= lr_factor
        t.scheduler.base_lrs = [lr * lr_factor for lr in t.scheduler.base_lrs]
        self.follow(state)  # the best checkpoint is the one the restored state knows
        return True


class _Pending:
    """The save in flight: its step and path, the state it was taken at, and the background thread writing it."""

    def __init__(self, step: int, path: Path, state: TrainState, expected: int | None):
        self.step, self.path, self.state, self.expected = step, path, state, expected
        self.thread: threading.Thread | None = None
        self._result: Path | None = None
        self._error: BaseException | None = None

    def start(self, job: Callable[[], Path]) -> None:
        def run() -> None:
            try:
                self._result = job()
            except BaseException as e:  # handed to the training thread by result()
                self._error = e

        self.thread = threading.Thread(target=run, name=f"checkpoint-{self.step}", daemon=True)
        self.thread.start()

    def result(self) -> Path:
        self.thread.join()
        if self._error is not None:
            raise self._error
        return self._result


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
