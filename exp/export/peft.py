"""`python -m exp.export RUN OUT --format peft`: a LoRA run's adapter as a peft folder (adapter_config.json,
adapter_model.safetensors) for the transformers export of its base (exp.export.hf):
`PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE_HF_EXPORT), OUT)`.

Module names follow exp.export.hf's mapping. exp's attention has one fused qkv Linear where Llama has q_proj,
k_proj and v_proj; its update B @ A splits by output rows: B's rows are [q | k | v] as the weight's are, so q_proj
gets (A, B_q), k_proj (A, B_k) and v_proj (A, B_v), with the same r and alpha, and B_q @ A, B_k @ A, B_v @ A are
exactly the q, k and v rows of B @ A. (In training the three shared one dropout mask on the input; in inference
dropout is off and the split adapter computes the same.)
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from exp.checkpoint import CheckpointError, build_model
from exp.checkpoint.weights import without_adapter
from exp.export.hf import _json_bytes, check_hf_exportable, check_out, write_folder
from exp.model import adapters

# exp's module (under blocks.N.) -> Llama's (under model.layers.N.); the fused qkv is split apart
HF_MODULES = {
    "attn.proj": "self_attn.o_proj",
    "mlp.gate": "mlp.gate_proj",
    "mlp.up": "mlp.up_proj",
    "mlp.down": "mlp.down_proj",
}
PEFT_PREFIX = "base_model.model."  # peft's saved names: the PeftModel's path to the transformers model's modules


def hf_adapter_tensors(tensors: dict[str, torch.Tensor], model) -> dict[str, torch.Tensor]:
    """exp's adapter tensors (`blocks.0.attn.qkv.lora_A.weight`, ...) under the names peft saves for the transformers
    export (`base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight`, ...)."""
    hd = model.d_model // model.n_head
    rows = [model.n_head * hd, model.n_kv_head * hd, model.n_kv_head * hd]
    out = {}
    for key, t in sorted(tensors.items()):
        module, sep, part = key.rpartition(".lora_")  # "blocks.0.attn.qkv", "A.weight"
        found = re.fullmatch(r"blocks\.(\d+)\.(.+)", module)
        if not sep or part not in ("A.weight", "B.weight"):
            raise CheckpointError(f"--format peft: {key} is not a LoRA tensor")
        if module == "lm_head":
            out[f"lm_head.lora_{part}"] = t
        elif found and found.group(2) == "attn.qkv":
            prefix = f"model.layers.{found.group(1)}.self_attn."
            parts = [t, t, t] if part == "A.weight" else t.split(rows)  # A shared, B by rows [q | k | v]
            for name, piece in zip(("q_proj", "k_proj", "v_proj"), parts, strict=True):
                out[f"{prefix}{name}.lora_{part}"] = piece
        elif found and found.group(2) in HF_MODULES:
            out[f"model.layers.{found.group(1)}.{HF_MODULES[found.group(2)]}.lora_{part}"] = t
        else:
            raise CheckpointError(f"--format peft: no transformers name for {module}")
    # clone: safetensors refuses tensors sharing storage (A given to q, k and v; B's row views)
    return {PEFT_PREFIX + k: v.detach().contiguous().clone() for k, v in out.items()}


def export_peft(source: Path, model_cfg: dict, out, info: dict, metadata: dict) -> Path:
    """Write `out` as a peft LoRA folder for the transformers export of the adapter's base; whole or absent."""
    try:
        peft = adapters.require_peft("--format peft")
        adapter = adapters.adapter_config(model_cfg.get("adapter"))
    except ValueError as e:
        raise CheckpointError(f"{source / 'config.yaml'}: {e}") from None
    with torch.device("meta"):  # the shapes only: which rows of the fused qkv are q, k and v
        model = build_model(without_adapter(model_cfg), source / "config.yaml")
    check_hf_exportable(model, model_cfg, source)
    tensors = hf_adapter_tensors(load_file(str(source / "model.safetensors")), model)
    targets = sorted({k.removeprefix(PEFT_PREFIX).rpartition(".lora_")[0] for k in tensors})
    config = peft.LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        target_modules=targets,  # whole module names: peft matches a list by name or dotted suffix
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=metadata.get(adapters.META_BASE) or None,
    )
    out = Path(out)
    check_out(out)

    def write(tmp: Path) -> None:
        save_file(tensors, str(tmp / "adapter_model.safetensors"), metadata={"format": "pt", "step": str(info["step"])})
        config.save_pretrained(str(tmp))  # adapter_config.json, as this peft version writes it
        record = {**info, "format": "peft", "base_fingerprint": metadata.get(adapters.META_FINGERPRINT)}
        (tmp / "export.json").write_bytes(_json_bytes({**record, "target_modules": targets}))

    return write_folder(out, write)
