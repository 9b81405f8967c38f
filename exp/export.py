"""Export a checkpoint's weights and model config for inference: python -m exp.export CHECKPOINT OUT."""

from __future__ import annotations

import argparse
import atexit
import json
import shutil
import sys
import tempfile
from pathlib import Path

import torch
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException
from safetensors.torch import save_model
from torch import nn

from exp.checkpoint import (
    MANIFEST,
    CheckpointError,
    _sha256,
    latest_valid_checkpoint,
    load_model_weights,
    verify_checkpoint,
)
from exp.model import GPT
from exp.rundir import atomic_file, write_atomic, write_json

# config.yaml is read from disk, so its _target_ is data, not code: only these classes are ever built.
ALLOWED_TARGETS: dict[str, type[nn.Module]] = {"exp.model.GPT": GPT}


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
    """The resolved model node (node=None: the whole file) of a config.yaml, as a plain dict."""
    config_file = Path(config_file)
    try:
        cfg = OmegaConf.load(config_file)
        model_cfg = cfg.get(node) if node else cfg
        if model_cfg is None:
            raise CheckpointError(f"{config_file}: has no {node!r} node")
        model_cfg = OmegaConf.to_container(model_cfg, resolve=True)
    except (OSError, OmegaConfBaseException, ValueError) as e:
        msg = " ".join(str(e).split())  # OmegaConf errors span lines; the CLI prints one
        raise CheckpointError(f"{config_file}: cannot read the model config ({msg})") from None
    if not isinstance(model_cfg, dict):
        raise CheckpointError(f"{config_file}: the model config is not a mapping")
    return model_cfg


def build_model(model_cfg: dict, source) -> nn.Module:
    """Construct an allowlisted model class from its config; nested values are passed as plain data."""
    target = model_cfg.get("_target_")
    if target not in ALLOWED_TARGETS:
        raise CheckpointError(
            f"{source}: model _target_ {target!r} is not allowed (allowed: {', '.join(sorted(ALLOWED_TARGETS))})"
        )
    kwargs = {k: v for k, v in model_cfg.items() if not k.startswith("_")}
    try:
        return ALLOWED_TARGETS[target](**kwargs)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{source}: cannot build {target} ({e})") from None


def _find_model(path) -> tuple[Path, dict]:
    """(model.safetensors, or a sharded checkpoint folder, and the resolved model config) of path."""
    path = Path(path)
    if (path / "config.yaml").is_file() and (path / "model.safetensors").is_file() and not (path / MANIFEST).exists():
        return path / "model.safetensors", read_model_config(path / "config.yaml", None)  # an export folder
    path = find_checkpoint(path)
    sharded = verify_checkpoint(path).get("sharded") is True
    model_cfg = read_model_config(path / "config.yaml", "model")
    return (path if sharded else path / "model.safetensors"), model_cfg


def _load_consolidated(checkpoint: Path, model: nn.Module) -> None:
    """Load a (verified) sharded checkpoint's consolidated weights into model; tied weights stay tied."""
    from exp.dist_checkpoint import consolidate  # here: torch.distributed.checkpoint adds ~0.6 s to every import

    try:
        model.load_state_dict(consolidate(checkpoint, verify=False), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{checkpoint / 'dcp'}: does not fit the model of its config.yaml ({e})") from None


# Consolidated weights files written this process, by checkpoint and manifest, so a second lookup reuses one.
_consolidated: dict[tuple[Path, str], Path] = {}


def _consolidated_file(checkpoint: Path, model_cfg: dict) -> Path:
    key = (checkpoint.resolve(), _sha256(checkpoint / MANIFEST))
    if key not in _consolidated or not _consolidated[key].is_file():
        model = build_model(model_cfg, checkpoint / "config.yaml")
        _load_consolidated(checkpoint, model)
        folder = Path(tempfile.mkdtemp(prefix="exp-consolidated-"))  # private (0700), removed at exit
        atexit.register(shutil.rmtree, folder, ignore_errors=True)
        save_model(model, str(folder / "model.safetensors"))
        _consolidated[key] = folder / "model.safetensors"
    return _consolidated[key]


def locate_model(path) -> tuple[Path, dict]:
    """(model.safetensors, resolved model config) of a checkpoint folder, run directory or export folder."""
    # Callers load the file with load_model_weights, so a sharded checkpoint is consolidated into one first.
    weights, model_cfg = _find_model(path)
    if weights.is_dir():
        weights = _consolidated_file(weights, model_cfg)
    return weights, model_cfg


def load_model_for_inference(path, device="cpu") -> tuple[nn.Module, dict]:
    """(model in eval mode, resolved model config) from a checkpoint folder, run directory or export folder."""
    weights, model_cfg = _find_model(path)
    config_file = (weights if weights.is_dir() else weights.parent) / "config.yaml"
    with torch.device(device):
        model = build_model(model_cfg, config_file)
    if weights.is_dir():
        _load_consolidated(weights, model)  # sharded: straight from the shards, no temporary file
    else:
        load_model_weights(weights, model)
    return model.eval(), model_cfg


def export_checkpoint(checkpoint, out) -> Path:
    """Write out/model.safetensors, out/config.yaml (resolved model node) and out/export.json."""
    source = find_checkpoint(checkpoint)
    model, model_cfg = load_model_for_inference(source)
    step = json.loads((source / MANIFEST).read_text())["step"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": str(source.resolve()), "step": step, "num_params": sum(p.numel() for p in model.parameters())}
    # Each file appears whole or not at all: written beside its final name, then renamed over it.
    with atomic_file(out / "model.safetensors") as tmp:
        save_model(model, str(tmp), metadata={"step": str(step)})
    write_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(model_cfg)))
    write_json(out / "export.json", info)
    return out


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on any checkpoint or config error)."""
    parser = argparse.ArgumentParser(prog="python -m exp.export", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX, sharded or not) or run directory")
    parser.add_argument("out", help="output folder")
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "export.json").read_text())
    print(f"exported step {info['step']} ({info['num_params']:,} parameters) from {info['source']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
