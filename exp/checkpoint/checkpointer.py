"""The Checkpointer: built with a run's objects, it finds the checkpoint to resume, checks config drift,
restores, saves (plain or sharded), rotates and rolls back. `conf/checkpoint` targets it."""

from __future__ import annotations

import dataclasses
import logging
import math
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
    save_checkpoint,
    set_aside_checkpoints,
    verify_checkpoint,
)
from exp.checkpoint.layout import LAYOUT_KEYS, check_layout, describe, is_sharded, layout_of, saved_layout
from exp.checkpoint.weights import tokenizer_entry
from exp.data.tokenizer import TOKENIZER_FILE
from exp.errors import ConfigError, DiskFull, ResumeError
from exp.events import Callback, Events, TrainState
from exp.optim import STAGE_LINKS, hyperparameters, resume_with_changes
from exp.rundir import BRANCHES, read_json, record_branch, write_json

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
CONFIG_CHANGES = "config_changes.json"


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
    """The checkpoint to continue from (resume.path: auto, a checkpoint, a run dir; null: none), checked for
    config drift; rank 0 looks and every rank gets its answer. Raises ConfigError or ResumeError."""
    root = Path(cfg.checkpoint.dir)
    found = _find(resume, root) if dist.is_main else None
    found = dist.broadcast_str(str(found or ""))
    if not found:
        return None
    path = Path(found)
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


def _find(resume, root: Path) -> Path | None:
    if resume.path is None:
        if list_checkpoints(root):
            raise ConfigError(
                f"resume.path=null but {root} already holds checkpoints: resume=auto "
                "continues them, or choose a new hydra.run.dir"
            )
        return None
    if resume.path == "auto":
        return latest_valid_checkpoint(root, warn=log.warning)
    path = Path(resume.path).expanduser()
    if (path / MANIFEST).exists() or (path / "trainer_state.json").exists():
        try:
            verify_checkpoint(path)
        except CheckpointError as e:
            raise ResumeError(f"cannot resume: {e}") from None
        return path
    for candidate in (path / "checkpoints", path):
        found = latest_valid_checkpoint(candidate, warn=log.warning)
        if found:
            return found
    raise ConfigError(f"resume.path={path} holds no valid checkpoint")


def check_config_change(saved_yaml: Path, cfg: DictConfig, allowed: bool, ignore=()) -> tuple[dict, dict, dict]:
    """Refuse to resume with a different config (listing the keys) unless resume.allow_config_change=true.

    Returns the checkpoint's and this run's resolved configs and the changed keys (but `ignore`) as {key: (old, new)}.
    """
    saved_tree = read_saved_config(saved_yaml)  # resolves nothing: the folder may come from elsewhere
    current_tree = OmegaConf.to_container(cfg, resolve=True)
    saved, current = _flat(saved_tree), _flat(current_tree)
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

    # --- resume ---------------------------------------------------------------------------------------

    def restore(self, point: ResumePoint) -> TrainState:
        """Load the resume point into the run's objects (the config wins where it changed); return the state."""
        t = self.trained
        configured = hyperparameters(t.optimizer)  # this config's settings, before the checkpoint's replace them
        try:
            restored = self._load(point.path)
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

    def _load(self, path: Path) -> dict:
        t = self.trained
        if self.sharded or is_sharded(path):  # DCP reshards to any number of ranks, a single process included
            from exp.checkpoint.sharded import load_sharded as load
        else:
            load = load_checkpoint
        return load(path, model=t.model, optimizer=t.optimizer, scheduler=t.scheduler, scaler=t.scaler)

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
        new_best = self.keep_best and self._evaluated_at == state.step and state.best_step == state.step
        if new_best or (self.every_n_steps and state.step % self.every_n_steps == 0):
            self.save(state)
        if new_best:
            self.best_path = self.last_path

    # --- saving ---------------------------------------------------------------------------------------

    def save(self, state: TrainState) -> Path:
        """Save now (once per step), rotate, and tell every callback (the tracker records the reference). A disk
        too full for it raises DiskFull (one line: the directory and the space needed); nothing half-written stays."""
        if self.last_step == state.step:
            return self.last_path
        expected = self._make_room() if self.trained.dist.is_main else None
        try:
            path = self._write(state)
        except Exception as e:
            if is_disk_full(e):
                raise self._disk_full(state, expected) from None
            raise
        self.last_path, self.last_step = path, state.step
        if self.trained.dist.is_main:
            protect = {self.best_path} if self.best_path else set()
            rotate_checkpoints(self.dir, self.keep_last, protect | {path})
        if self.trained.dist.is_main or self.sharded:  # DDP: only rank 0 wrote it
            self.events.on_checkpoint(state, path)
        return path

    def _make_room(self) -> int:
        """The next checkpoint's expected size; when the disk has less free, the checkpoints rotation would delete
        after this save go first (never the best, never the newest this run saved or resumed from)."""
        t = self.trained
        expected = expected_size(self.dir, t.model, t.optimizer)
        free = free_space(self.dir)
        if self.keep_last and free < expected:
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

    def _write(self, state: TrainState) -> Path:
        t = self.trained
        if self.sharded:  # every rank writes its shard
            from exp.checkpoint.sharded import save_sharded as saver
        elif t.dist.is_main:
            saver = save_checkpoint
        else:  # DDP: the replicas are identical; rank 0 writes
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
        return saver(
            self.dir,
            state.step,
            model=t.model,
            optimizer=t.optimizer,
            scheduler=t.scheduler,
            scaler=t.scaler,
            trainer_state=trainer_state,
            config_yaml=self.config_yaml,
            files={TOKENIZER_FILE: data} if data is not None else None,
        )

    # --- faults ---------------------------------------------------------------------------------------

    def rollback(self, state: TrainState, lr_factor: float) -> bool:
        """Restore the newest valid checkpoint into the run's objects and `state` with the learning rate times
        lr_factor; False when there is none. The data sampler is not rewound (the bad windows are not replayed)."""
        t = self.trained
        t.dist.barrier()  # rank 0 may still be writing the newest checkpoint
        found = latest_valid_checkpoint(self.dir, warn=log.warning) if t.dist.is_main else None
        if not (found := t.dist.broadcast_str(str(found or ""))):
            return False
        back = self._load(Path(found))
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


def _mb(size: int) -> str:
    return f"{size / 1e6:.1f} MB"
