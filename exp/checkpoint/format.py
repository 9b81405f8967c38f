"""Atomic, pickle-free, checksummed checkpoint folders: safetensors for tensors, JSON for the rest."""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from exp.errors import CheckpointError  # here, so that models (exp.model.hf) raise it without importing this
from exp.model import adapters
from exp.model.protocol import inner as unwrap  # strip DDP and torch.compile wrappers before saving
from exp.rundir import fsync, publish_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# Files every checkpoint has; scaler.json is optional. verify_checkpoint refuses a manifest without these.
REQUIRED_FILES = (
    "model.safetensors",
    "optimizer.safetensors",
    "optimizer.json",
    "scheduler.json",
    "trainer_state.json",
    "config.yaml",
)
# A sharded checkpoint (exp.checkpoint.sharded) keeps model and optimizer as DCP shards under dcp/ instead.
SHARDED_REQUIRED_FILES = ("dcp/.metadata", "scheduler.json", "trainer_state.json", "config.yaml")
RNG_KEY = "rng"  # reserved key in trainer_state.json
_STEP_DIR = re.compile(r"step_(\d{8,})")
ABANDONED = "abandoned"  # under a checkpoint root: the branches that resumes from earlier steps left behind
_HASH_CHUNK = 1 << 24


# `${name:...}`: a resolver call (oc.env reads the environment, exp's read files), as opposed to `${a.b}`
_RESOLVER_CALL = re.compile(r"\$\{\s*[\w.]+\s*:")


def read_saved_config(path, what: str = "config") -> dict:
    """A config.yaml exp wrote (resolved when saved) as plain data. A checkpoint or export may come from
    elsewhere, so no resolver runs: an `${oc.env:...}` planted in it is refused, never read; references to its own
    keys (`${data.vocab_size}`) still resolve. CheckpointError (one line, naming the file) otherwise."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        cfg = OmegaConf.load(path)
        found = _resolver_call(OmegaConf.to_container(cfg, resolve=False))
        if found:
            raise CheckpointError(f"{path}: {found} calls a resolver; a saved config is read as data")
        tree = OmegaConf.to_container(cfg, resolve=True)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read the {what} ({' '.join(str(e).split())})") from None
    if not isinstance(tree, dict):
        raise CheckpointError(f"{path}: the {what} is not a mapping")
    return tree


def _resolver_call(node, where: str = "") -> str | None:
    """The dotted key of the first string (or key) calling a resolver, or None."""
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if any(isinstance(v, str) and _RESOLVER_CALL.search(v) for v in (key, value)):
            return f"{where}{key}"
        found = _resolver_call(value, f"{where}{key}.")
        if found:
            return found
    return None


def checkpoint_name(step: int) -> str:
    """Folder name of the checkpoint at step: "step_00000042"."""
    return f"step_{step:08d}"


# JSON: tuples (AdamW betas), int keys and non-finite floats (best_val_loss starts at inf) are tagged
# so they come back as they went in and the files stay strict JSON; tensors become references into a
# safetensors file.


def _encode(obj, tensors: dict | None = None, key: str = ""):
    if isinstance(obj, torch.Tensor):
        if tensors is None:
            raise TypeError(f"tensor at {key or 'top level'} cannot go to JSON")
        tensors[key] = obj.detach()  # where it is: take_snapshot brings it to host memory once
        return {"__tensor__": key}
    if isinstance(obj, dict):
        out = {str(k): _encode(v, tensors, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
        if obj and all(isinstance(k, int) and not isinstance(k, bool) for k in obj):
            return {"__int_keys__": out}  # optimizer state is keyed by parameter index
        bad = [k for k in obj if not isinstance(k, str)]
        if bad:
            raise TypeError(f"key {bad[0]!r} at {key or 'top level'} is neither a string nor an int")
        return out
    if isinstance(obj, (list, tuple)):
        items = [_encode(v, tensors, f"{key}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, float) and not math.isfinite(obj):
        return {"__float__": repr(obj)}
    if isinstance(obj, (np.integer, np.floating, np.bool_)):
        return _encode(obj.item(), tensors, key)
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{type(obj).__name__} at {key or 'top level'} is not JSON-serialisable")


def _decode(obj, tensors: dict | None = None):
    if isinstance(obj, dict):
        if obj.keys() == {"__tensor__"}:
            if tensors is None or obj["__tensor__"] not in tensors:
                raise KeyError(obj["__tensor__"])
            return tensors[obj["__tensor__"]]
        if obj.keys() == {"__tuple__"}:
            return tuple(_decode(v, tensors) for v in obj["__tuple__"])
        if obj.keys() == {"__float__"}:
            return float(obj["__float__"])
        if obj.keys() == {"__int_keys__"}:
            return {int(k): _decode(v, tensors) for k, v in obj["__int_keys__"].items()}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    return obj


def _json_text(obj, name: str, tensors: dict | None = None) -> str:
    try:
        return json.dumps(_encode(obj, tensors), indent=1, allow_nan=False) + "\n"
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{name}: cannot store state as JSON ({e})") from None


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({e})") from None


def capture_rng() -> dict:
    """Python, NumPy (legacy global), torch CPU and CUDA generator states as JSON-safe values."""
    version, mt, gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state = {
        # Mersenne Twister words (and Python's trailing position, < 625) all fit uint32.
        "python": [version, _b64(np.asarray(mt, dtype=np.uint32)), gauss],
        "numpy": [np_name, _b64(np_keys.astype(np.uint32)), int(np_pos), int(np_has_gauss), float(np_gauss)],
        "torch": _b64(torch.get_rng_state().numpy()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [_b64(s.numpy()) for s in torch.cuda.get_rng_state_all()]
    return state


def _b64(array: np.ndarray) -> str:
    return base64.b64encode(array.tobytes()).decode()


def _unb64(text: str, dtype) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text), dtype=dtype).copy()


def restore_rng(state: dict) -> None:
    """Set the generators back to a capture_rng() state; CUDA states are applied only where devices exist."""
    version, mt, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in _unb64(mt, np.uint32)), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, _unb64(keys, np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(torch.from_numpy(_unb64(state["torch"], np.uint8)))
    if "cuda" in state and torch.cuda.is_available():
        cuda = [torch.from_numpy(_unb64(s, np.uint8)) for s in state["cuda"]][: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _is_leftover(path: Path) -> bool:
    return path.is_dir() and re.fullmatch(r"\.step_\d{8,}\.(tmp|trash)-\d+", path.name) is not None


@dataclass
class Snapshot:
    """What a checkpoint folder will hold, taken on the training thread: tensors (copies, when the training goes on
    while they are written), JSON texts (the RNG states of the moment included) and files. write_snapshot writes it."""

    step: int
    tensors: dict[str, dict[str, torch.Tensor]]  # file name -> its tensors
    metadata: dict[str, dict[str, str]]  # file name -> its safetensors metadata
    texts: dict[str, str]
    files: dict[str, bytes]


def take_snapshot(
    step: int,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    trainer_state: dict,
    config_yaml: str,
    scaler=None,
    files: dict[str, bytes] | None = None,
    into: dict | None = None,
) -> Snapshot:
    """The checkpoint of this moment. With `into` (host buffers by file and tensor name, filled the first time and
    reused after: allocating fresh memory for each save costs more than the copy) every tensor is copied to host
    memory, so training may change the originals while a background writer saves the copy (the Checkpointer's
    asynchronous saves); without, the snapshot holds the tensors themselves."""
    if RNG_KEY in trainer_state:
        raise CheckpointError(f"trainer_state.json: key {RNG_KEY!r} is reserved for the RNG states")
    # JSON first: an unserialisable value fails before hundreds of MB are copied or written.
    opt_tensors: dict[str, torch.Tensor] = {}
    texts = {
        "optimizer.json": _json_text(optimizer.state_dict(), "optimizer.json", opt_tensors),
        "scheduler.json": _json_text(scheduler.state_dict(), "scheduler.json"),
        "trainer_state.json": _json_text({**trainer_state, RNG_KEY: capture_rng()}, "trainer_state.json"),
        "config.yaml": config_yaml,
    }
    if scaler is not None:
        texts["scaler.json"] = _json_text(scaler.state_dict(), "scaler.json")  # {} for a disabled scaler
    weights, metadata = _model_tensors(model, step)
    tensors = {"model.safetensors": weights, "optimizer.safetensors": opt_tensors}
    if into is not None:  # one copy, device to the reused host buffers
        tensors = {name: _copy_into(into.setdefault(name, {}), group) for name, group in tensors.items()}
    else:
        tensors = {name: {k: t.cpu().contiguous() for k, t in group.items()} for name, group in tensors.items()}
    meta = {"model.safetensors": metadata, "optimizer.safetensors": {"step": str(step)}}
    return Snapshot(step, tensors, meta, texts, dict(files or {}))


def _copy_into(buffers: dict[str, torch.Tensor], tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors copied into host buffers of their shape and dtype (pinned where CUDA copies from them); buffers
    of tensors that are gone are dropped."""
    for gone in buffers.keys() - tensors.keys():
        del buffers[gone]
    for key, t in tensors.items():
        buf = buffers.get(key)
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            buf = buffers[key] = torch.empty(t.shape, dtype=t.dtype, pin_memory=torch.cuda.is_available())
        buf.copy_(t)
    return dict(buffers)


def _model_tensors(model: nn.Module, step: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The model's tensors as safetensors.torch.save_model writes them (one name per shared tensor, the others
    named in the metadata), so a snapshot's file is the very file save_model writes."""
    from safetensors.torch import _remove_duplicate_names  # save_model's own choice of the names to keep

    model = unwrap(model)
    adapter = adapters.info(model)
    if adapter is not None:  # the adapter's tensors only, and which base they go on (exp.model.adapters)
        metadata = {"step": str(step), adapters.META_KIND: adapter["config"].kind}
        metadata |= {adapters.META_FINGERPRINT: adapter["fingerprint"] or "", adapters.META_BASE: adapter["base"] or ""}
        return {k: v.detach() for k, v in adapters.adapter_tensors(model).items()}, metadata
    state = model.state_dict()
    metadata = {"step": str(step)}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata.setdefault(name, kept)
            del state[name]
    return {k: v.detach() for k, v in state.items()}, metadata


def save_checkpoint(root, step: int, *, before_rename: Callable[[Path], None] | None = None, **state) -> Path:
    """Write root/step_{step:08d}/ atomically (temp folder, fsync, rename) and return its path. `state`: what
    take_snapshot takes (model, optimizer, scheduler, trainer_state, config_yaml, scaler, files: written into the
    folder as they are, tokenizer.json, and listed in the manifest)."""
    return write_snapshot(root, take_snapshot(step, **state), before_rename)


def write_snapshot(root, snapshot: Snapshot, before_rename: Callable[[Path], None] | None = None) -> Path:
    """Write a snapshot as root/step_{step:08d}/ atomically: temp folder, manifest of sizes and SHA-256, fsync,
    rename. Safe on a background thread: it touches nothing but the snapshot and the folder."""
    root = Path(root)
    if not root.is_dir():
        root.mkdir(parents=True)
        fsync(root.parent)
    name = checkpoint_name(snapshot.step)
    final, tmp = root / name, root / f".{name}.tmp-{os.getpid()}"
    # One writer per root (RunLock), so any temp/trash folder here is debris from a crashed save.
    for leftover in filter(_is_leftover, root.iterdir()):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp.mkdir()
    try:
        for fname, tensors in snapshot.tensors.items():
            save_file(tensors, str(tmp / fname), metadata=snapshot.metadata.get(fname))
        for fname, text in snapshot.texts.items():
            (tmp / fname).write_text(text)
        for fname, data in snapshot.files.items():
            (tmp / fname).write_bytes(data)
        entries = sorted(tmp.iterdir())
        hashes = hash_files(entries)
        files = {p.name: {"size": p.stat().st_size, "sha256": hashes[p]} for p in entries}
        manifest = {"format_version": FORMAT_VERSION, "step": snapshot.step, "files": files}
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1) + "\n")
        publish_dir(tmp, final, before_rename)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def hash_files(paths) -> dict[Path, str]:
    """SHA-256 of each file, several at once (hashlib releases the GIL): a checkpoint's model and optimizer files
    hash in the time of the larger one."""
    paths = list(paths)
    if len(paths) <= 1:
        return {p: _sha256(p) for p in paths}
    with ThreadPoolExecutor(max_workers=min(len(paths), os.cpu_count() or 1, 8)) as pool:
        return dict(zip(paths, pool.map(_sha256, paths), strict=True))


def verify_checkpoint(path, share: tuple[int, int] | None = None) -> dict:
    """Check every file against manifest.json (presence, size, SHA-256) and return the manifest. With `share`
    (index, count) this process hashes only every count-th file from index: the ranks of a run split the work."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint {path} does not exist")
    manifest = _read_json(path / MANIFEST)
    if not isinstance(manifest, dict) or manifest.get("format_version") != FORMAT_VERSION:
        version = manifest.get("format_version") if isinstance(manifest, dict) else None
        raise CheckpointError(f"{path / MANIFEST}: format_version {version!r}, expected {FORMAT_VERSION}")
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise CheckpointError(f"{path / MANIFEST}: has no file list")
    sharded = manifest.get("sharded") is True
    if sharded and not (isinstance(manifest.get("world_size"), int) and manifest["world_size"] > 0):
        raise CheckpointError(f"{path / MANIFEST}: a sharded checkpoint needs a positive world_size")
    for name in SHARDED_REQUIRED_FILES if sharded else REQUIRED_FILES:
        if name not in files:
            raise CheckpointError(f"{path / MANIFEST}: does not list {name}")
    to_hash = {}
    for i, (name, entry) in enumerate(sorted(files.items())):
        # Only plain names inside the folder (or its dcp/ when sharded), so a doctored manifest cannot point elsewhere.
        parts = name.split("/") if sharded and name.startswith("dcp/") else [name]
        plain = len(parts) <= 2 and all(Path(p).name == p and p not in ("", ".", "..") for p in parts)
        if not plain or not isinstance(entry, dict) or not {"size", "sha256"} <= entry.keys():
            raise CheckpointError(f"{path / MANIFEST}: malformed entry {name!r}")
        file = path / name
        if file.is_symlink() or not file.is_file():
            raise CheckpointError(f"{file} is missing" if not file.is_symlink() else f"{file} is a symlink")
        size = file.stat().st_size
        if size != entry["size"]:
            raise CheckpointError(f"{file} has {size} bytes, the manifest says {entry['size']}")
        if share is None or i % share[1] == share[0]:
            to_hash[file] = entry["sha256"]
    for file, digest in hash_files(to_hash).items():
        if digest != to_hash[file]:
            raise CheckpointError(f"{file} does not match its SHA-256 in the manifest (corrupted)")
    return manifest


def verify_together(path) -> dict:
    """verify_checkpoint split over the ranks of a run (collective when torch.distributed is initialized): each
    rank hashes its share of the files, and every rank raises the first failure any rank found."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()) or tdist.get_world_size() == 1:
        return verify_checkpoint(path)
    manifest, error = None, ""
    try:
        manifest = verify_checkpoint(path, share=(tdist.get_rank(), tdist.get_world_size()))
    except (CheckpointError, OSError) as e:
        error = str(e) or type(e).__name__
    errors: list = [None] * tdist.get_world_size()
    tdist.all_gather_object(errors, error)
    if first := next((e for e in errors if e), None):
        raise CheckpointError(first)
    return manifest


def load_model_weights(file, model: nn.Module, strict_shapes: bool = True) -> list[str]:
    """Copy model.safetensors into model in place (tied weights stay tied); returns names skipped for shape."""
    file = Path(file)
    model = unwrap(model)
    try:
        saved = load_file(str(file))
        metadata = adapter_metadata(file)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    if metadata is not None or adapters.info(model) is not None:
        _load_adapter(file, saved, metadata, model)
        return []
    current = model.state_dict(keep_vars=True)
    fill_tied(saved, current)
    problems = [f"the model's tensor {k} is missing from the checkpoint" for k in current if k not in saved]
    problems += [f"the checkpoint's tensor {k} does not exist in the model" for k in saved if k not in current]
    skipped = [k for k in current if k in saved and saved[k].shape != current[k].shape]
    if strict_shapes:
        problems += [
            f"tensor {k} has shape {list(saved[k].shape)} in the checkpoint but {list(current[k].shape)} in the model"
            for k in skipped
        ]
    if problems:
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        raise CheckpointError(f"{file}: " + "; ".join(problems[:5]) + more)
    for k in skipped:
        saved[k] = current[k].detach()  # keep the model's own value
    model.load_state_dict(saved, strict=True)
    return skipped


def adapter_metadata(file) -> dict | None:
    """model.safetensors' adapter record (kind, base, base_fingerprint) when it holds an adapter's tensors only."""
    with safe_open(str(file), framework="pt") as f:
        metadata = f.metadata() or {}
    return metadata if adapters.META_KIND in metadata else None


def _load_adapter(file: Path, saved: dict, metadata: dict | None, model: nn.Module) -> None:
    """An adapter checkpoint into an adapted model whose base has the fingerprint the adapter was trained on."""
    adapter = adapters.info(model)
    if metadata is None:
        raise CheckpointError(f"{file}: holds a whole model's weights, but this model has an adapter (model.adapter)")
    if adapter is None:
        raise CheckpointError(f"{file}: holds a LoRA adapter only, but this model has none (model.adapter is null)")
    theirs, ours = metadata.get(adapters.META_FINGERPRINT), adapter["fingerprint"]
    if theirs and ours and theirs != ours:
        raise CheckpointError(
            f"{file}: its adapter was trained on other base weights ({theirs[:12]}..., from "
            f"{metadata.get(adapters.META_BASE) or '?'}) than stage.init_from gives now ({ours[:12]}..., from "
            f"{adapter['base']}); resume on the base it was trained on"
        )
    try:
        adapters.load_adapter_tensors(model, saved, str(file))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def fill_tied(saved: dict, current: dict) -> None:
    """save_model keeps one name per shared tensor: give every alias of a saved name (in `current`, the model's
    state_dict(keep_vars=True)) the same values, in place."""
    aliases: dict[int, list[str]] = {}
    for k, t in current.items():
        aliases.setdefault(id(t), []).append(k)
    for names in aliases.values():
        have = [k for k in names if k in saved]
        for k in names:
            if have and k not in saved:
                saved[k] = saved[have[0]]


def read_optimizer_state(path: Path) -> dict:
    """The optimizer state_dict (torch's, keyed by parameter index) of a single-file checkpoint folder."""
    file = path / "optimizer.safetensors"
    try:
        tensors = load_file(str(file))
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from None
    try:
        return _decode(_read_json(path / "optimizer.json"), tensors)
    except KeyError as e:
        raise CheckpointError(f"{file}: tensor {e.args[0]} referenced by optimizer.json is missing") from None


def _load_optimizer(path: Path, optimizer: torch.optim.Optimizer) -> None:
    state = read_optimizer_state(path)
    try:
        optimizer.load_state_dict(state)
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"{path / 'optimizer.json'}: does not fit this optimizer ({e})") from None


def load_checkpoint(
    path,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    scheduler=None,
    scaler=None,
    strict_shapes: bool = True,
    verified: bool = False,
) -> dict:
    """Verify (unless `verified`: this run checked it just before), load everything given, restore the RNG states,
    and return the caller's trainer state."""
    path = Path(path)
    if not verified:
        verify_checkpoint(path)
    skipped = load_model_weights(path / "model.safetensors", model, strict_shapes)
    if skipped and optimizer is not None:
        raise CheckpointError(
            f"{path / 'optimizer.safetensors'}: cannot restore optimizer state for a model whose tensors "
            f"{', '.join(skipped)} were skipped for their shape"
        )
    if optimizer is not None:
        _load_optimizer(path, optimizer)
    return load_run_state(path, scheduler, scaler)


def load_run_state(path: Path, scheduler=None, scaler=None) -> dict:
    """Restore scheduler, GradScaler and RNG states from a checkpoint folder; return its trainer state."""
    if scheduler is not None:
        scheduler.load_state_dict(_decode(_read_json(path / "scheduler.json")))
    # No scaler.json (a run saved without fp16) leaves a fresh scaler, which calibrates itself in a few steps.
    if scaler is not None and (path / "scaler.json").is_file():
        state = _decode(_read_json(path / "scaler.json"))
        if state and scaler.is_enabled():
            scaler.load_state_dict(state)
    state = _decode(_read_json(path / "trainer_state.json"))
    rng = state.pop(RNG_KEY, None)
    if rng is not None:
        restore_rng(rng)
    return state


def read_trainer_state(path) -> dict:
    """trainer_state.json of a checkpoint without its RNG states, loading no tensors."""
    state = _decode(_read_json(Path(path) / "trainer_state.json"))
    state.pop(RNG_KEY, None)
    return state


def list_checkpoints(root) -> list[Path]:
    """step_* folders under root, oldest first; temp and trash folders are not checkpoints."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.fullmatch(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def set_aside_checkpoints(root, after_step: int) -> Path | None:
    """Move the step_* folders after `after_step` into root/abandoned/<n>_after_step_<after_step>/: the branch a
    resume from an earlier step leaves behind, kept but no longer resumed, rotated or listed. None if there are none."""
    root = Path(root)
    later = [p for p in list_checkpoints(root) if int(_STEP_DIR.fullmatch(p.name).group(1)) > after_step]
    if not later:
        return None
    aside = root / ABANDONED
    aside.mkdir(exist_ok=True)
    number = 1 + max((int(m.group(1)) for p in aside.iterdir() if (m := re.match(r"(\d+)_", p.name))), default=0)
    folder = aside / f"{number:03d}_after_{checkpoint_name(after_step)}"
    folder.mkdir()
    for path in reversed(later):
        os.rename(path, folder / path.name)
    fsync(folder)
    fsync(aside)
    fsync(root)
    return folder


def latest_valid_checkpoint(root, warn: Callable[[str], object] = print, verify=verify_checkpoint) -> Path | None:
    """The newest checkpoint that verifies (`verify`: raises CheckpointError, or OSError); each newer unusable one
    is reported through warn. Read-only."""
    unusable = []
    found = None
    for path in reversed(list_checkpoints(root)):
        try:
            verify(path)
        except (CheckpointError, OSError) as e:
            unusable.append((path, e))
            continue
        found = path
        break
    for path, e in unusable:
        warn(f"checkpoint {path} is unusable ({e}); falling back to {found or 'no checkpoint'}")
    return found


def rotate_checkpoints(root, keep_last: int, protect: set[Path] = frozenset()) -> list[Path]:
    """Delete all but the newest keep_last checkpoints, sparing those in protect; keep_last <= 0 keeps all."""
    if keep_last <= 0:
        return []
    keep = {Path(p).resolve() for p in protect}
    deleted = []
    for path in list_checkpoints(root)[:-keep_last]:
        if path.resolve() in keep:
            continue
        # Renamed out of the step_* namespace first, so a crash mid-delete never leaves half a step_* folder.
        trash = path.parent / f".{path.name}.trash-{os.getpid()}"
        os.rename(path, trash)
        shutil.rmtree(trash)
        deleted.append(path)
    if deleted:
        fsync(Path(root))
    return deleted


def folder_size(path) -> int:
    """Bytes in a checkpoint folder's files (a sharded one's dcp/ included)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file())


def state_size(model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the model's and the optimizer's tensors: what a checkpoint of them holds, give or take its JSON."""
    tensors = {id(t): t for t in unwrap(model).state_dict().values() if isinstance(t, torch.Tensor)}
    for values in optimizer.state.values():
        tensors |= {id(t): t for t in values.values() if isinstance(t, torch.Tensor)}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def expected_size(root, model: nn.Module, optimizer: torch.optim.Optimizer) -> int:
    """The size the next checkpoint under root will have: the newest one's, or the model and optimizer state's."""
    saved = list_checkpoints(root)
    return folder_size(saved[-1]) if saved else state_size(model, optimizer)


def free_space(path) -> int:
    """Bytes free to this user on the disk holding path (or its nearest existing parent)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).free


def is_disk_full(error: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a full disk or quota: safetensors reports `os error 28`."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        if "os error 28" in str(error) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False
