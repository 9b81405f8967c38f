"""Transformers folders (config.json + model.safetensors) as exp reads them: a Llama-architecture one into exp's
GPT (what `python -m exp.export RUN OUT --format hf` writes, and any LlamaForCausalLM of the same shapes:
stage.init_from, exp.generate), without transformers.

config.json's LlamaConfig keys become GPT's arguments and model.safetensors' names exp's (q/k/v_proj fused back into
qkv). The conventions agree: RoPE on split halves (Llama's rotate_half), RMSNorm with config.json's rms_norm_eps,
GQA query head h reading key/value head h // (n_head / n_kv_head), a tied or separate head. Its tokenizer.json is
exp's byte tokenizer when it is the one exp.export.hf writes for byte tokens, else read as a tokenizer.json.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from exp.checkpoint.format import CheckpointError
from exp.data.tokenizer import TOKENIZER_FILE, ByteTokenizer, byte_tokenizer_json
from exp.model import GPT
from exp.model.hf import folder_state_dict
from exp.text import first_line


def is_hf_folder(path) -> bool:
    """A transformers folder (config.json and model.safetensors, or its shards' index), not an exp export
    (config.yaml)."""
    path = Path(path)
    return (
        (path / "config.json").is_file()
        and ((path / "model.safetensors").is_file() or (path / "model.safetensors.index.json").is_file())
        and not (path / "config.yaml").is_file()
    )


def read_hf_config(path) -> dict:
    """A transformers folder's config.json; CheckpointError when it cannot be read."""
    file = Path(path) / "config.json"
    try:
        hf = json.loads(file.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{file}: cannot be read ({e})") from None
    if not isinstance(hf, dict):
        raise CheckpointError(f"{file}: not a transformers config.json")
    return hf


def gpt_config(hf: dict, source) -> dict:
    """GPT's arguments for a LlamaForCausalLM config.json (what exp.export.hf.hf_config writes, or any Llama
    without biases, scaled RoPE or another activation: those have no exact counterpart in exp's GPT)."""
    if hf.get("model_type") != "llama":
        raise CheckpointError(
            f"{source}: model_type {hf.get('model_type')!r} is not llama; exp's GPT reads Llama-architecture folders "
            "only (train this one with model=hf model.name_or_path=...)"
        )
    rope = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    unlike = [
        ("attention_bias", bool(hf.get("attention_bias"))),
        ("mlp_bias", bool(hf.get("mlp_bias"))),
        (f"hidden_act={hf.get('hidden_act')}", hf.get("hidden_act", "silu") != "silu"),
        (
            f"rope type {rope.get('rope_type') or rope.get('type')}",
            (rope.get("rope_type") or rope.get("type") or "default") != "default",
        ),
    ]
    found = [name for name, differs in unlike if differs]
    if found:
        raise CheckpointError(f"{source}: a Llama model exp's GPT cannot express ({', '.join(found)})")
    if hf.get("head_dim") and hf["head_dim"] * hf.get("num_attention_heads", 0) != hf.get("hidden_size"):
        raise CheckpointError(f"{source}: head_dim x num_attention_heads is not hidden_size, as exp's GPT has it")
    theta = hf.get("rope_theta") or rope.get("rope_theta", 10000.0)
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
            "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),  # LlamaConfig's defaults where config.json is silent
            "tie_embeddings": bool(hf.get("tie_word_embeddings", False)),
        }
    except KeyError as e:
        raise CheckpointError(f"{source}: config.json has no {e.args[0]}") from None


# GPT's arguments a Llama folder must match to load into a configured GPT: (argument, config.json's name)
SHAPE_KEYS = (
    ("vocab_size", "vocab_size"),
    ("n_layer", "num_hidden_layers"),
    ("d_model", "hidden_size"),
    ("n_head", "num_attention_heads"),
    ("n_kv_head", "num_key_value_heads"),
    ("mlp_hidden", "intermediate_size"),
    ("tie_embeddings", "tie_word_embeddings"),
    ("rope_theta", "rope_theta"),
    ("norm_eps", "rms_norm_eps"),
)


def gpt_values(model: GPT) -> dict:
    """A (possibly meta) GPT's values of SHAPE_KEYS."""
    return {
        "vocab_size": model.tok_emb.num_embeddings,
        "n_layer": model.n_layer,
        "d_model": model.d_model,
        "n_head": model.n_head,
        "n_kv_head": model.n_kv_head,
        "mlp_hidden": model.mlp_hidden,
        "tie_embeddings": model.tie_embeddings,
        "rope_theta": float(model.rope_theta),
        "norm_eps": float(model.norm.eps),
    }


def check_fits_gpt(path, model: GPT, key: str = "stage.init_from") -> dict:
    """The GPT arguments of a Llama folder that has model's shapes; CheckpointError naming the first that differs."""
    if type(model) is not GPT or model.num_experts:
        raise CheckpointError(
            f"{key}={path}: a transformers folder loads into exp's dense GPT or into model=hf, not "
            f"{type(model).__qualname__}{' with experts' if type(model) is GPT else ''}"
        )
    theirs = gpt_config(read_hf_config(path), f"{key}={path}")
    ours = gpt_values(model)
    for name, hf_name in SHAPE_KEYS:
        if theirs[name] != ours[name]:
            raise CheckpointError(
                f"{key}={path}: {hf_name}={theirs[name]} in its config.json but model.{name}={ours[name]}; "
                f"set {'+' if name == 'norm_eps' else ''}model.{name}={theirs[name]} (the shapes must match)"
            )
    return theirs


def load_into_gpt(path, model: GPT, key: str = "stage.init_from") -> None:
    """A Llama folder's weights into a GPT of the same shapes (check_fits_gpt), in place."""
    check_fits_gpt(path, model, key)
    _load_folder(path, model, f"{key}={path}")


def _load_folder(path, model: GPT, where: str) -> None:
    """The folder's tensors, renamed to exp's, into the GPT; CheckpointError led by `where`."""
    try:
        weights = folder_state_dict(path)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{where}: {first_line(e)}") from None
    try:
        model.load_state_dict(exp_state_dict(weights, model, path), strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: model.safetensors does not fit config.json ({first_line(e)})") from None


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
    """(GPT in eval mode with the folder's weights, its config) from a Llama-architecture transformers folder."""
    path = Path(path)
    model_cfg = gpt_config(read_hf_config(path), path)
    with torch.device(device):
        model = GPT(**{k: v for k, v in model_cfg.items() if k != "_target_"})
    _load_folder(path, model, str(path))
    return model.eval(), model_cfg


def hf_folder_tokenizer(path):
    """The folder's tokenizer: exp's byte tokenizer when tokenizer.json is the one exp.export.hf writes for it."""
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
