"""Read a `python -m exp.export RUN OUT --format hf` folder back into exp's GPT: the inverse of exp.export.hf.

config.json's LlamaConfig keys become GPT's arguments and model.safetensors' names exp's (q/k/v_proj fused back into
qkv), so `python -m exp.generate OUT` works on the folder without transformers. Its tokenizer.json is exp's byte
tokenizer when it is the one exp.export.hf writes for byte tokens, else read as a tokenizer.json (`tokenizers`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from exp.checkpoint import CheckpointError
from exp.data.tokenizer import TOKENIZER_FILE, ByteTokenizer
from exp.model import GPT
from exp.text import first_line


def is_hf_folder(path) -> bool:
    """A transformers folder (config.json and model.safetensors), not an exp export (config.yaml)."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and (path / "model.safetensors").is_file()
        and not (path / "config.yaml").is_file()
    )


def gpt_config(hf: dict, source) -> dict:
    """GPT's arguments for a LlamaForCausalLM config.json (what exp.export.hf.hf_config writes)."""
    if hf.get("model_type") != "llama" or hf.get("attention_bias") or hf.get("mlp_bias"):
        raise CheckpointError(f"{source}: not a Llama model without biases as exp exports (model_type llama)")
    if hf.get("head_dim") and hf["head_dim"] * hf.get("num_attention_heads", 0) != hf.get("hidden_size"):
        raise CheckpointError(f"{source}: head_dim x num_attention_heads is not hidden_size, as exp's GPT has it")
    theta = hf.get("rope_theta") or (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
    try:
        return {
            "_target_": "exp.model.GPT",
            "vocab_size": hf["vocab_size"],
            "seq_len": hf["max_position_embeddings"],
            "n_layer": hf["num_hidden_layers"],
            "n_head": hf["num_attention_heads"],
            "n_kv_head": hf.get("num_key_value_heads") or hf["num_attention_heads"],
            "d_model": hf["hidden_size"],
            "mlp_hidden": hf["intermediate_size"],
            "rope_theta": float(theta),
            "norm_eps": float(hf.get("rms_norm_eps", 1e-5)),
            "tie_embeddings": bool(hf.get("tie_word_embeddings", True)),
        }
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json has no {e.args[0]}") from None


def exp_state_dict(weights: dict[str, torch.Tensor], model: GPT, source) -> dict[str, torch.Tensor]:
    """LlamaForCausalLM's tensors under exp's names (the inverse of exp.export.hf.hf_state_dict)."""
    w = dict(weights)
    try:
        out = {"tok_emb.weight": w.pop("model.embed_tokens.weight"), "norm.weight": w.pop("model.norm.weight")}
        out["lm_head.weight"] = out["tok_emb.weight"] if model.tie_embeddings else w.pop("lm_head.weight")
        for i in range(model.n_layer):
            b, L = f"blocks.{i}.", f"model.layers.{i}."
            qkv = [w.pop(f"{L}self_attn.{p}_proj.weight") for p in "qkv"]
            out[b + "attn.qkv.weight"] = torch.cat(qkv)
            for exp_name, hf_name in (
                ("attn.proj", "self_attn.o_proj"),
                ("attn_norm", "input_layernorm"),
                ("mlp_norm", "post_attention_layernorm"),
                ("mlp.gate", "mlp.gate_proj"),
                ("mlp.up", "mlp.up_proj"),
                ("mlp.down", "mlp.down_proj"),
            ):
                out[f"{b}{exp_name}.weight"] = w.pop(f"{L}{hf_name}.weight")
    except KeyError as e:
        raise CheckpointError(f"{source}: model.safetensors has no {e.args[0]}") from None
    w.pop("lm_head.weight", None)  # a tied head saved anyway
    if w:
        raise CheckpointError(f"{source}: model.safetensors holds tensors exp's GPT lacks: {', '.join(sorted(w))}")
    return out


def load_hf_folder(path, device="cpu") -> tuple[GPT, dict]:
    """(GPT in eval mode with the folder's weights, its config) from an HF folder."""
    path = Path(path)
    try:
        hf = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path / 'config.json'}: cannot be read ({e})") from None
    model_cfg = gpt_config(hf, path)
    with torch.device(device):
        model = GPT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    weights = load_file(str(path / "model.safetensors"), device=str(device))
    try:
        model.load_state_dict(exp_state_dict(weights, model, path), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: model.safetensors does not fit config.json ({first_line(e)})") from None
    return model.eval(), model_cfg


def hf_folder_tokenizer(path):
    """The folder's tokenizer: exp's byte tokenizer when tokenizer.json is the one exp.export.hf writes for it."""
    from exp.export.hf import byte_tokenizer_json

    file = Path(path) / TOKENIZER_FILE
    try:
        if json.loads(file.read_text(encoding="utf-8")) == byte_tokenizer_json():
            return ByteTokenizer()
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    from exp.data.bpe import tokenizer_in

    try:
        return tokenizer_in(Path(path))
    except (OSError, ValueError, ImportError) as e:
        raise CheckpointError(f"{file}: {first_line(e)}") from None
