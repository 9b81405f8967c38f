"""Export a checkpoint's weights and model config for inference: python -m exp.export CHECKPOINT OUT;
--format hf writes a folder Hugging Face transformers loads as a causal LM (exp.export.hf; exp.export.from_hf
reads such a folder back). A LoRA run's adapter is merged into its base (--merge), or written alone with
--format peft (exp.export.peft)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from omegaconf import OmegaConf
from safetensors.torch import save_model

from exp.checkpoint import (
    MANIFEST,
    CheckpointError,
    find_checkpoint,
    load_model_for_inference,
    saved_tokenizer,
    tokenizer_entry,
)
from exp.checkpoint.format import adapter_metadata
from exp.checkpoint.weights import ALLOW_TARGET_HELP, read_model_config
from exp.data.tokenizer import TOKENIZER_FILE
from exp.export.hf import DTYPES, export_hf
from exp.export.peft import export_peft
from exp.model.adapters import META_BASE, META_FINGERPRINT
from exp.model.protocol import num_params
from exp.rundir import atomic_file, write_atomic, write_json


def export_checkpoint(checkpoint, out, allow=(), format="exp", dtype=None, tokenizer=None, merge=False) -> Path:
    """Write out/model.safetensors, out/config.yaml (resolved model node), the checkpoint's tokenizer.json (if it
    has one) and out/export.json (which names the tokenizer: byte tokens without the file).
    `allow`: model packages or classes to build besides exp's own (--allow-target).
    format="hf": a transformers folder instead (exp.export.hf.export_hf, with `dtype` and `tokenizer`).
    A LoRA run's checkpoint (model.adapter) is merged into its base for both (`merge` says so; it changes nothing
    else); format="peft" writes its adapter alone, for the transformers export of its base (exp.export.peft)."""
    source = find_checkpoint(checkpoint)
    weights = source / "model.safetensors"
    metadata = adapter_metadata(weights) if weights.is_file() else None
    step = json.loads((source / MANIFEST).read_text())["step"]
    out = Path(out)
    if format == "peft":
        if merge:
            raise CheckpointError("--merge writes full weights and --format peft the adapter alone: give one of them")
        if metadata is None:
            raise CheckpointError(f"{source}: has no adapter to export as peft (it trained with model.adapter=null)")
        if dtype is not None or tokenizer is not None:
            raise CheckpointError("--dtype and --tokenizer go with --format hf")
        model_cfg = read_model_config(source / "config.yaml")
        return export_peft(source, model_cfg, out, {"source": str(source.resolve()), "step": step}, metadata)
    model, model_cfg = load_model_for_inference(source, allow=allow)  # an adapter merged into its base
    info = {"source": str(source.resolve()), "step": step, "num_params": num_params(model)}
    if metadata is not None:
        info["merged_adapter"] = {
            "base": metadata.get(META_BASE),
            "base_fingerprint": metadata.get(META_FINGERPRINT),
            **read_model_config(source / "config.yaml")["adapter"],
        }
    if format == "hf":
        return export_hf(model, model_cfg, source, out, info, dtype=dtype, tokenizer=tokenizer)
    if dtype is not None or tokenizer is not None:
        raise CheckpointError("--dtype and --tokenizer go with --format hf")
    saved = saved_tokenizer(source)  # read before anything is written: a missing tokenizer.json stops here
    info["tokenizer"] = tokenizer_entry(saved)
    out.mkdir(parents=True, exist_ok=True)
    # Each file appears whole or not at all: written beside its final name, then renamed over it.
    with atomic_file(out / "model.safetensors") as tmp:
        save_model(model, str(tmp), metadata={"step": str(step)})
    write_atomic(out / "config.yaml", OmegaConf.to_yaml(OmegaConf.create(model_cfg)))
    if saved is not None and saved.to_json() is not None:
        write_atomic(out / TOKENIZER_FILE, saved.to_json())
    write_json(out / "export.json", info)
    return out


def main(argv=None) -> int:
    """CLI entry point; returns the exit status (2 on any checkpoint or config error)."""
    parser = argparse.ArgumentParser(prog="python -m exp.export", description=__doc__)
    parser.add_argument("checkpoint", help="checkpoint folder (step_XXXXXXXX, sharded or not) or run directory")
    parser.add_argument("out", help="output folder")
    parser.add_argument("--allow-target", action="append", default=[], metavar="PREFIX", help=ALLOW_TARGET_HELP)
    parser.add_argument(
        "--format",
        choices=("exp", "hf", "peft"),
        default="exp",
        help="exp: exp's own files (default); hf: config.json, model.safetensors, tokenizer files for transformers; "
        "peft: a LoRA run's adapter (adapter_config.json, adapter_model.safetensors) for the hf export of its base",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="a LoRA run: its adapter merged into the base's weights (what --format exp and hf always write)",
    )
    parser.add_argument("--dtype", help=f"hf: weights saved as {'|'.join(DTYPES)} (default: as trained)")
    parser.add_argument(
        "--tokenizer",
        metavar="PATH",
        help="hf: tokenizer.json (or a folder holding one) to ship; default: the checkpoint's, else byte tokens",
    )
    args = parser.parse_args(argv)
    try:
        out = export_checkpoint(
            args.checkpoint,
            args.out,
            args.allow_target,
            format=args.format,
            dtype=args.dtype,
            tokenizer=args.tokenizer,
            merge=args.merge,
        )
    except (CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    info = json.loads((out / "export.json").read_text())
    if info.get("format") == "peft":
        base = info.get("base_fingerprint") or "?"
        print(
            f"exported the LoRA adapter of step {info['step']} from {info['source']} to {out} (as peft: on the hf "
            f"export of its base {base[:12]}, {len(info['target_modules'])} modules)"
        )
        return 0
    fmt = f" as transformers {info['dtype']}" if info.get("format") == "hf" else ""
    fmt += " (LoRA merged into its base)" if "merged_adapter" in info else ""
    print(f"exported step {info['step']} ({info['num_params']:,} parameters) from {info['source']} to {out}{fmt}")
    return 0
