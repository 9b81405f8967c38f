"""Weights for inference, `stage.init_from` and teachers: find a checkpoint, run directory or export
folder, build its (allowlisted) model class, load the weights; sharded checkpoints consolidate here."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_model
from torch import nn

from exp.checkpoint.format import (
    MANIFEST,
    CheckpointError,
    _sha256,
    adapter_metadata,
    latest_valid_checkpoint,
    load_model_weights,
    read_saved_config,
    read_trainer_state,
    verify_checkpoint,
)
from exp.checkpoint.hf_folder import (
    check_fits_gpt,
    hf_folder_tokenizer,
    is_hf_folder,
    load_into_gpt,
    read_hf_config,
)
from exp.model import GPT, HFCausalLM, adapters
from exp.targets import Allowlist, TargetRefused
from exp.text import first_line

# config.yaml is read from disk, so its _target_ is data, not code: only these classes are ever built, and the
# nn.Module classes of the packages a user allows (allowed_prefixes).
ALLOWED_TARGETS: dict[str, type[nn.Module]] = {"exp.model.GPT": GPT, "exp.model.HFCausalLM": HFCausalLM}
ALLOW_ENV = "EXP_ALLOWED_TARGETS"  # comma-separated, like --allow-target: my_pkg. or my_pkg.models.MyLM
ALLOW_TARGET_HELP = (  # --allow-target of the CLIs that build a model from a config.yaml
    "also build the model classes of this package (my_pkg.) or this class (my_pkg.models.MyLM) when a "
    f"config.yaml names them; exp's own are always allowed (repeatable; the {ALLOW_ENV} environment "
    "variable adds comma-separated ones)"
)


# keys of a model config that exp reads itself, not constructor arguments (exp.config.EXP_KEYS)
EXP_MODEL_KEYS = ("freeze", "recipe", "tokenizer", "adapter")


def allowed_prefixes(allow=()) -> tuple[str, ...]:
    """The packages (my_pkg.) or classes (my_pkg.models.MyLM) allowed beyond exp's own: `allow` (the CLIs'
    --allow-target) and the EXP_ALLOWED_TARGETS environment variable, read here only."""
    given = [*allow, *os.environ.get(ALLOW_ENV, "").split(",")]
    return tuple(p.strip().rstrip(".") for p in given if p.strip().rstrip("."))


def model_class(target, source, allow=()) -> type[nn.Module]:
    """The nn.Module class `target` names, if it locates to an allowed object (exp.targets: exp's own, or a class
    defined in a declared package); nothing outside the declared packages is imported to find out."""
    if target in ALLOWED_TARGETS:
        return ALLOWED_TARGETS[target]
    name = target if isinstance(target, str) else ""
    try:
        cls = Allowlist.of(allowed_prefixes(allow)).locate(target)
    except TargetRefused as e:
        allowed = ", ".join(sorted(ALLOWED_TARGETS))
        if not str(e).endswith("outside the allowed packages"):  # located, and not code to allow: no advice
            message = f"{source}: model _target_ {target!r} is not allowed ({e}; allowed: {allowed})"
            raise CheckpointError(message) from None
        package = name.rpartition(".")[0] or name or "PACKAGE"
        raise CheckpointError(
            f"{source}: model _target_ {target!r} is not allowed (allowed: {allowed}); "
            f"if you trust that code, allow it with --allow-target {package}. (python -m exp.export, exp.generate) "
            f"or {ALLOW_ENV}={package}."
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise CheckpointError(f"{source}: model _target_ {target!r} is not an nn.Module class")
    return cls


def find_checkpoint(path, warn=lambda msg: print(f"warning: {msg}", file=sys.stderr)) -> Path:
    """A checkpoint folder as given, or a run directory's newest valid one under run_dir/checkpoints/."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path} does not exist")
    if (path / MANIFEST).is_file():
        return path
    if (path / "checkpoints").is_dir():
        found = latest_valid_checkpoint(path / "checkpoints", warn=warn)
        if found is None:
            raise CheckpointError(f"run directory {path} has no valid checkpoint under {path / 'checkpoints'}")
        return found
    raise CheckpointError(f"{path} is neither a checkpoint folder (no {MANIFEST}) nor a run directory")


def read_model_config(config_file, node: str | None = "model") -> dict:
    """The resolved model node (node=None: the whole file) of a saved config.yaml, as plain data
    (read_saved_config: no resolver runs)."""
    config_file = Path(config_file)
    tree = read_saved_config(config_file, "model config")
    model_cfg = tree.get(node) if node else tree
    if model_cfg is None:
        raise CheckpointError(f"{config_file}: has no {node!r} node")
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{config_file}: the model config is not a mapping")
    return model_cfg


def build_model(model_cfg: dict, source, allow=()) -> nn.Module:
    """Construct an allowed model class (model_class) from its config; every value is passed as plain data
    (a nested `_target_` arrives as a dict, never instantiated)."""
    target = model_cfg.get("_target_")
    cls = model_class(target, source, allow)
    kwargs = {k: v for k, v in model_cfg.items() if not k.startswith("_") and k not in EXP_MODEL_KEYS}
    try:
        return cls(**kwargs)
    except (TypeError, ValueError, ImportError) as e:
        raise CheckpointError(f"{source}: cannot build {target} ({e})") from None


def _find_model(path) -> tuple[Path, dict]:
    """(model.safetensors, or a sharded checkpoint folder, and the resolved model config) of path."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file() and not (path / MANIFEST).exists():
        return path / "model.safetensors", read_model_config(path / "config.yaml", None)  # an export folder
    if is_hf_folder(path):
        raise CheckpointError(f"{path}: a transformers folder, read with load_model_for_inference or init_weights")
    path = find_checkpoint(path)
    sharded = verify_checkpoint(path).get("sharded") is True
    model_cfg = read_model_config(path / "config.yaml", "model")
    return (path if sharded else path / "model.safetensors"), model_cfg


def _load_consolidated(checkpoint: Path, model: nn.Module) -> None:
    """Load a (verified) sharded checkpoint's consolidated weights into model; tied weights stay tied."""
    from exp.checkpoint.sharded import consolidate  # here: torch.distributed.checkpoint adds ~0.6 s to every import

    try:
        model.load_state_dict(consolidate(checkpoint, verify=False), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint / 'dcp'}: does not fit the model of its config.yaml ({e})") from None


# Consolidated weights files written this process, by checkpoint and manifest, so a second lookup reuses one.
_consolidated: dict[tuple[Path, str], Path] = {}


def _consolidated_file(checkpoint: Path, model_cfg: dict, allow=()) -> Path:
    key = (checkpoint.resolve(), _sha256(checkpoint / MANIFEST))
    if key not in _consolidated or not _consolidated[key].is_file():
        model = build_model(model_cfg, checkpoint / "config.yaml", allow)
        _load_consolidated(checkpoint, model)
        _consolidated[key] = _write_private(model)
    return _consolidated[key]


def locate_model(path, allow=()) -> tuple[Path, dict]:
    """(model.safetensors, resolved model config) of a checkpoint folder, run directory or export folder."""
    # Callers load the file with load_model_weights, so a sharded checkpoint is consolidated into one first, and
    # an adapter's checkpoint is merged into its base's weights first (its config then has no adapter).
    weights, model_cfg = _find_model(path)
    if weights.is_dir():
        weights = _consolidated_file(weights, model_cfg, allow)
    elif adapter_metadata(weights) is not None:
        key = (weights.resolve(), _sha256(weights))
        if key not in _consolidated or not _consolidated[key].is_file():
            model, model_cfg = load_model_for_inference(path, allow=allow)
            _consolidated[key] = _write_private(model)
        model_cfg = without_adapter(model_cfg)
        weights = _consolidated[key]
    return weights, model_cfg


def _write_private(model: nn.Module) -> Path:
    folder = Path(tempfile.mkdtemp(prefix="exp-consolidated-"))  # private (0700), removed at exit
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    save_model(model, str(folder / "model.safetensors"))
    return folder / "model.safetensors"


def without_adapter(model_cfg: dict) -> dict:
    """A model config with its adapter merged away: the plain model's."""
    return {k: v for k, v in model_cfg.items() if k != "adapter"}


def base_folder(path) -> Path:
    """The folder weights come from (a run directory's newest valid checkpoint), absolute: what an adapter records
    as its base, so that its base stays the same checkpoint while that run goes on."""
    return _folder_of(path).resolve()


def load_model_for_inference(path, device="cpu", allow=(), merge: bool = True) -> tuple[nn.Module, dict]:
    """(model in eval mode, resolved model config) from a checkpoint folder, run directory, export folder or
    transformers folder (built as exp.model.HFCausalLM, with transformers' own loading).
    `allow`: packages or classes whose models may be built besides exp's own (allowed_prefixes). An adapter's
    checkpoint is loaded onto its base (the one it records, whose fingerprint must match) and, with `merge`, merged
    into it: a plain model and a config without the adapter."""
    if is_hf_folder(path):
        model_cfg = hf_model_config(path)
        with torch.device(device):
            model = build_model({k: v for k, v in model_cfg.items() if k != "config"}, path, allow)
        return model.eval(), model_cfg
    weights, model_cfg = _find_model(path)
    config_file = (weights if weights.is_dir() else weights.parent) / "config.yaml"
    metadata = None if weights.is_dir() else adapter_metadata(weights)
    with torch.device(device):
        model = build_model(model_cfg, config_file, allow)
    if weights.is_dir():
        _load_consolidated(weights, model)  # sharded: straight from the shards, no temporary file
    elif metadata is not None:
        _load_onto_base(weights, metadata, model, model_cfg, allow)
        if merge:
            model, model_cfg = adapters.merge(model), without_adapter(model_cfg)
    else:
        load_model_weights(weights, model)
    return model.eval(), model_cfg


def hf_model_config(folder) -> dict:
    """The model node that builds a transformers folder as exp.model.HFCausalLM; `config` is its config.json."""
    hf = read_hf_config(folder)
    return {
        "_target_": "exp.model.HFCausalLM",
        "name_or_path": str(Path(folder).resolve()),
        "vocab_size": hf.get("vocab_size"),
        "config": hf,
    }


def model_config_of(path, allow=()) -> dict:
    """The resolved model config of a checkpoint, run directory, export or transformers folder (no weights read)."""
    return hf_model_config(path) if is_hf_folder(path) else locate_model(path, allow)[1]


def check_init_from(path, model: nn.Module, key: str = "stage.init_from") -> None:
    """Refuse, before anything is built or written, a transformers folder whose weights cannot load into `model`
    (a meta-device copy will do): a Llama folder into exp's GPT must have its shapes; model=hf takes a folder of
    its own architecture and shapes. Checkpoints and exports are checked when loaded."""
    if not is_hf_folder(path):
        return
    if not isinstance(model, HFCausalLM):
        check_fits_gpt(path, model, key)  # config.json only
        return
    theirs, ours = read_hf_config(path), model.hf_config()
    for name in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads"):
        if name == "vocab_size" and (theirs.get(name) or 0) <= (ours.get(name) or 0):
            continue  # a vocabulary the model grew from (SFT's chat tokens): loaded grown the same way
        if theirs.get(name) != ours.get(name):
            raise CheckpointError(
                f"{key}={path}: {name}={theirs.get(name)} in its config.json but {ours.get(name)} in model=hf's model "
                f"({model.name_or_path}); the shapes must match"
            )


def init_weights(path, model: nn.Module, key: str = "stage.init_from") -> Path:
    """Load the weights at `path` (a checkpoint, run directory, export, or transformers folder) into `model` in
    place; returns the file or folder read."""
    if not is_hf_folder(path):
        weights, _ = locate_model(path)
        load_model_weights(weights, model)
        return weights
    check_init_from(path, model, key)
    if isinstance(model, HFCausalLM):
        # transformers reads the folder its own way, grown as the model was (HFCausalLM grows from a fixed seed)
        loaded = HFCausalLM(str(path), vocab_size=model.vocab_size, attn_implementation="eager")
        try:
            model.hf.load_state_dict(loaded.hf.state_dict(), strict=True)
        except RuntimeError as e:
            raise CheckpointError(f"{key}={path}: does not fit model=hf's model ({first_line(e)})") from None
    else:
        load_into_gpt(path, model, key)
    return Path(path)


def _load_onto_base(weights: Path, metadata: dict, model: nn.Module, model_cfg: dict, allow=()) -> None:
    """An adapter checkpoint's base (the folder it records), its fingerprint checked, then the adapter on it."""
    base = metadata.get(adapters.META_BASE)
    if not base or not Path(base).exists():
        raise CheckpointError(
            f"{weights}: holds a LoRA adapter whose base weights ({base or 'not recorded'}) are gone; "
            "they are needed to rebuild the model"
        )
    if is_hf_folder(base):  # model=hf's own folder
        init_weights(base, model)
    else:
        base_weights, _ = locate_model(base, allow)
        load_model_weights(base_weights, model)
    found = adapters.fingerprint(model)
    if found != metadata.get(adapters.META_FINGERPRINT):
        raise CheckpointError(
            f"{weights}: its adapter was trained on base weights {metadata.get(adapters.META_FINGERPRINT, '?')[:12]}, "
            f"but {base} now holds {found[:12]}: the base changed since"
        )
    try:
        adapter = adapters.adapter_config(model_cfg.get("adapter"))
    except ValueError as e:
        raise CheckpointError(f"{weights.parent / 'config.yaml'}: {e}") from None
    if adapter is None:
        raise CheckpointError(f"{weights}: holds a LoRA adapter, but its config.yaml has no model.adapter")
    try:
        adapters.inject(model, adapter, base=str(base), fingerprint=found)
    except ValueError as e:
        raise CheckpointError(f"{weights}: {e}") from None
    load_model_weights(weights, model)


def tokenizer_entry(tokenizer) -> dict | None:
    """trainer_state.json's and export.json's "tokenizer": kind, fingerprint, vocab_size (None: unknown)."""
    if tokenizer is None:
        return None
    return {"kind": tokenizer.kind, "fingerprint": tokenizer.fingerprint, "vocab_size": tokenizer.vocab_size}


def _folder_of(path) -> Path:
    """The checkpoint or export folder of path (a run directory's newest valid checkpoint)."""
    path = Path(path)
    if (path / "model.safetensors").is_file() and (path / "config.yaml").is_file() and not (path / MANIFEST).exists():
        return path  # an export folder
    return find_checkpoint(path)


def saved_tokenizer(path):
    """The tokenizer a checkpoint, run directory or export was trained with: its tokenizer.json, byte tokens when
    its record says so (or, for checkpoints older than that record, when its vocabulary is the byte one), else
    None. Raises CheckpointError when a tokenizer.json is there but cannot be read."""
    from exp.data.bpe import tokenizer_in
    from exp.data.tokenizer import TOKENIZER_FILE, VOCAB_SIZE, ByteTokenizer
    from exp.resolvers import padded_vocab

    if is_hf_folder(path):  # a transformers folder: its tokenizer.json, if it ships one
        return hf_folder_tokenizer(path) if (Path(path) / TOKENIZER_FILE).is_file() else None
    folder = _folder_of(path)
    if (folder / TOKENIZER_FILE).is_file():
        try:
            return tokenizer_in(folder)
        except (OSError, ValueError, ImportError) as e:
            raise CheckpointError(f"{folder / TOKENIZER_FILE}: {first_line(e)}") from None
    if (folder / MANIFEST).exists():
        record, model_cfg = read_trainer_state(folder), read_model_config(folder / "config.yaml", "model")
    else:  # an export folder
        info = folder / "export.json"
        record = json.loads(info.read_text()) if info.is_file() else {}
        model_cfg = read_model_config(folder / "config.yaml", None)
    if "tokenizer" not in record:  # written before tokenizers were recorded: byte models had the byte vocabulary
        return ByteTokenizer() if model_cfg.get("vocab_size") in (VOCAB_SIZE, padded_vocab(VOCAB_SIZE)) else None
    entry = record["tokenizer"]
    if entry is None:
        return None
    if entry.get("kind") != "bytes":
        raise CheckpointError(
            f"{folder}: was trained with a tokenizer.json of {entry.get('vocab_size')} tokens, "
            f"but {folder / TOKENIZER_FILE} is missing"
        )
    return ByteTokenizer()


def check_tokenizer(ours, path, what: str) -> None:
    """Refuse weights trained with another tokenizer than `ours` (the data's): `what` names the config key.
    Nothing is said when either side is unknown (token files without a tokenizer)."""
    if ours is None:
        return
    try:
        theirs = saved_tokenizer(path)
    except CheckpointError as e:
        raise CheckpointError(f"{what}: {e}") from None
    if theirs is None or theirs.fingerprint == ours.fingerprint:
        return
    name = lambda t: (
        "byte tokens" if t.kind == "bytes" else f"a tokenizer of {t.vocab_size} tokens ({t.fingerprint[:19]})"
    )
    raise CheckpointError(
        f"{what}: was trained with {name(theirs)}, but this run's data uses {name(ours)}; they must be the same"
    )
