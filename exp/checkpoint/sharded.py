"""Sharded (FSDP2) checkpoints: one torch.distributed.checkpoint folder per step beside exp.checkpoint's JSON files."""

from __future__ import annotations

import functools
import json
import re
import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from exp.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST,
    RNG_KEY,
    CheckpointError,
    _is_leftover,
    _json_text,
    _read_json,
    capture_rng,
    checkpoint_name,
    fill_tied,
    hash_files,
    load_run_state,
    read_optimizer_state,
    verify_checkpoint,
    verify_together,
)
from exp.checkpoint.layout import is_sharded  # noqa: F401  (exp.checkpoint.sharded.is_sharded)
from exp.rundir import fsync, publish_dir
from exp.text import first_line

DCP_DIR = "dcp"
_SHARDED_TMP = re.compile(r"\.step_\d{8,}\.tmp-sharded")


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def _world_size() -> int:
    return dist.get_world_size() if _distributed() else 1


def _on_rank0(fn: Callable[[], object]):
    """fn() on rank 0, its result on every rank; a failure there raises on every rank, so none waits forever."""
    if not _distributed():
        return fn()
    result, error = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except Exception as e:  # re-raised below, after the other ranks have heard of it
            error = e
    box = [None if error is None else f"{type(error).__name__}: {error}", result]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise CheckpointError(f"rank 0 failed: {box[0]}")
    return box[1]


def save_sharded(
    root,
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    config_yaml: str,
    scaler=None,
    files: dict[str, bytes] | None = None,
    async_group=None,
) -> Path | Callable[[], Path]:
    """Collective: write root/step_{step:08d}/ (DCP shards of model and optimizer plus JSON state, and `files` as
    they are) atomically.

    With `async_group` (a process group of its own, so the writer's collectives never meet the training's), DCP
    copies the shards to host memory and writes them on a background thread: the return is then a function that
    waits for the shards and (rank 0) publishes the folder, to run off the training thread; it calls no collective.
    """
    if RNG_KEY in trainer_state:
        raise CheckpointError(f"trainer_state.json: key {RNG_KEY!r} is reserved for the RNG states")
    root = Path(root)
    name = checkpoint_name(step)
    final, tmp = root / name, root / f".{name}.tmp-sharded"
    texts: dict[str, str] = {}
    extra_files = dict(files or {})

    def prepare() -> None:
        # JSON first, as in exp.checkpoint: an unserialisable value fails before any shard is written.
        texts["scheduler.json"] = _json_text(scheduler.state_dict(), "scheduler.json")
        texts["trainer_state.json"] = _json_text({**trainer_state, RNG_KEY: capture_rng()}, "trainer_state.json")
        texts["config.yaml"] = config_yaml
        if scaler is not None:
            texts["scaler.json"] = _json_text(scaler.state_dict(), "scaler.json")
        if not root.is_dir():
            root.mkdir(parents=True)
            fsync(root.parent)
        # One writer per root (RunLock), so temp and trash folders here are debris from a crashed save.
        for p in root.iterdir():
            if _is_leftover(p) or (p.is_dir() and _SHARDED_TMP.fullmatch(p.name)):
                shutil.rmtree(p, ignore_errors=True)
        (tmp / DCP_DIR).mkdir(parents=True)

    _on_rank0(prepare)
    model_sd, optim_sd = get_state_dict(model, optimizer)
    is_writer = not _distributed() or dist.get_rank() == 0

    finish = functools.partial(_publish, tmp, final, step, texts, extra_files)
    state = {"model": model_sd, "optimizer": optim_sd}
    if async_group is not None:
        return _save_async(state, tmp, final, async_group, is_writer, finish)
    try:
        # Every rank writes its own __<rank>_0.distcp (fsynced); rank 0 writes .metadata once all are written.
        dcp.save(state, storage_writer=FileSystemWriter(tmp / DCP_DIR))
    except BaseException as e:  # CheckpointException derives from BaseException
        if is_writer:
            shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, CheckpointException):
            raise _write_failed(tmp, e) from e
        raise
    # The broadcast in _on_rank0 doubles as the closing barrier: no rank returns before the rename.
    _on_rank0(finish)
    return final


def _save_async(
    state: dict, tmp: Path, final: Path, group, is_writer: bool, finish: Callable[[], Path]
) -> Callable[[], Path]:
    """DCP's async_save of the shards (staged to host memory here; the writes, and the gather after which rank 0
    writes .metadata, on DCP's thread over `group`: rank 0's future ends once every rank's shard is written), and
    the function that waits for it and (rank 0) publishes the folder."""
    future = dcp.async_save(state, storage_writer=FileSystemWriter(tmp / DCP_DIR), process_group=group)

    def complete() -> Path:
        try:
            future.result()
        except BaseException as e:
            if is_writer:
                shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, CheckpointException):
                raise _write_failed(tmp, e) from e
            raise
        return finish() if is_writer else final

    return complete


def _publish(tmp: Path, final: Path, step: int, texts: dict[str, str], files: dict[str, bytes]) -> Path:
    """Rank 0, once every shard is written: the JSON state and files, the manifest, then the atomic rename."""
    try:
        for fname, text in texts.items():
            (tmp / fname).write_text(text)
        for fname, data in files.items():
            (tmp / fname).write_bytes(data)
        entries = sorted(p for p in tmp.rglob("*") if p.is_file())
        hashes = hash_files(entries)
        listed = {p.relative_to(tmp).as_posix(): {"size": p.stat().st_size, "sha256": hashes[p]} for p in entries}
        manifest = {
            "format_version": FORMAT_VERSION,
            "step": step,
            "sharded": True,
            "world_size": _world_size(),
            "files": listed,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _write_failed(tmp: Path, error: CheckpointException) -> CheckpointError:
    """DCP's CheckpointException (a BaseException, which no `except Exception` sees) as a CheckpointError naming
    the first rank's failure."""
    failures = getattr(error, "failures", None) or {}
    first = next(iter(failures.items()), None)
    if first is not None:
        rank, failure = first
        failure = failure[0] if isinstance(failure, tuple) else failure  # (exception, traceback)
        cause = f"rank {rank}: {first_line(failure)}"
    else:
        cause = first_line(error)
    return CheckpointError(f"{tmp.parent}: the shards of {tmp.name} could not be written ({cause})")


def load_sharded(
    path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    verified: bool = False,
):
    """Collective: verify, load everything given, restore rank 0's RNG states on all ranks, return the trainer state.

    Any number of ranks loads any checkpoint: DCP shards (a sharded checkpoint) reshard to this run's, or fill a
    whole model in one process; a single-file checkpoint fills a sharded model, each rank keeping its shards.
    """
    path = Path(path)
    # Each rank hashes its share of the files (unless this run verified them just before): the ranks read the same
    # bytes from the shared filesystem, so one check of each file covers them all.
    manifest = _read_json(path / MANIFEST) if verified else verify_together(path)
    load = _load_dcp if manifest.get("sharded") is True else _load_whole
    try:
        load(path, model, optimizer)
    except CheckpointError:
        raise
    except (CheckpointException, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"{path}: does not fit this model or optimizer ({first_line(e)})") from None
    return load_run_state(path, scheduler, scaler)


def _load_dcp(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """DCP shards into the model (and optimizer), resharded to this run's ranks."""
    if optimizer is None:
        state = {"model": get_model_state_dict(model)}
    else:
        model_sd, optim_sd = get_state_dict(model, optimizer)
        state = {"model": model_sd, "optimizer": optim_sd}
    with warnings.catch_warnings():
        # DCP warns when it loads in one process (no process group), which is what a single-process resume wants
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        # Fills the sharded tensors in place: each rank reads only the slices it owns.
        dcp.load(state, storage_reader=FileSystemReader(path / DCP_DIR))
    if optimizer is None:
        set_model_state_dict(model, state["model"])
    else:
        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])


def _load_whole(path: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None) -> None:
    """A single-file checkpoint into a sharded model: every rank reads the whole state and keeps its shards."""
    try:
        weights = load_file(str(path / "model.safetensors"))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path / 'model.safetensors'}: cannot read ({e})") from None
    fill_tied(weights, model.state_dict(keep_vars=True))
    full = StateDictOptions(full_state_dict=True)
    if optimizer is None:
        set_model_state_dict(model, weights, options=full)
        return
    by_name = _by_name(model, optimizer, read_optimizer_state(path))
    set_state_dict(model, optimizer, model_state_dict=weights, optim_state_dict=by_name, options=full)


def _by_name(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> dict:
    """torch's optimizer state_dict (keyed by parameter index, in the optimizer's order) keyed by parameter name,
    as DCP's state-dict functions take it; the run builds its groups from the same names in the same order."""
    names = {id(p): name for name, p in model.named_parameters()}
    order = [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    if len(order) != sum(len(g["params"]) for g in state["param_groups"]):
        raise ValueError("the checkpoint's optimizer holds another number of parameters than this one")
    return {
        "state": {order[i]: value for i, value in state["state"].items()},
        "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]],
    }


def consolidate(path, verify: bool = True) -> dict[str, torch.Tensor]:
    """Single process: the full model state dict (GPT's key names, tied weights under both) of a sharded checkpoint."""
    path = Path(path)
    if verify:
        manifest = verify_checkpoint(path)
        if manifest.get("sharded") is not True:
            raise CheckpointError(f"{path} is not a sharded checkpoint")
    reader = FileSystemReader(path / DCP_DIR)
    try:
        metadata = reader.read_metadata()
    except (OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path / DCP_DIR}: cannot read the DCP metadata ({e})") from None
    # Empty full-size tensors from the metadata: no model (or its config) is needed, and the optimizer is never read.
    state = {
        key.removeprefix("model."): torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{path / DCP_DIR}: holds no model tensors")
    try:
        with warnings.catch_warnings():
            # DCP warns about loading in one process even when told to with no_dist=True.
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
            dcp.load({"model": state}, storage_reader=reader, no_dist=True)
    except CheckpointException as e:
        raise CheckpointError(f"{path / DCP_DIR}: cannot read ({e})") from None
    return state
