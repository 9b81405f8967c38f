"""Export a checkpoint's weights and model config for inference: python -m exp.export CHECKPOINT OUT."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_model

from exp.checkpoint import MANIFEST, CheckpointError, find_checkpoint, load_model_for_inference
from exp.checkpoint.weights import ALLOW_TARGET_HELP
from exp.model.protocol import num_params
from exp.rundir import atomic_file, write_atomic, write_json


def export_checkpoint(checkpoint, out, allow=()) -> Path:
    """Write out/model.safetensors, out/config.yaml (resolved model node) and out/export.json.
    `allow`: model packages or classes to build besides exp's own (--allow-target)."""
    source = find_checkpoint(checkpoint)
    model, model_cfg = load_model_for_inference(source, allow=allow)
    step = json.loads((source / MANIFEST).read_text())["step"]
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    info = {"source": str(source.resolve()), "step": step, "num_params": num_params(model)}
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
    parser.add_argument("--allow-target", action="append", default=[], metavar="PREFIX", help=ALLOW_TARGET_HELP)
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(args.checkpoint, args.out, allow=args.allow_target)
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "export.json").read_text())
    print(f"exported step {info['step']} ({info['num_params']:,} parameters) from {info['source']} to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
