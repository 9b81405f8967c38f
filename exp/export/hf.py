"""`python -m exp.export RUN OUT --format hf`: a folder Hugging Face `transformers` loads as LlamaForCausalLM (a
model=hf run: as its own architecture, through save_pretrained).

exp's dense GPT is Llama-shaped (pre-norm RMSNorm, half-split RoPE as Llama's rotate_half, SwiGLU, GQA with
query head h reading key/value head h // (n_head / n_kv_head), no biases, 1/sqrt(head_dim) attention scale),
so the export is a renaming of its weights plus config.json, generation_config.json and the tokenizer files.
exp writes every file itself: nothing here imports transformers, and tokenizer.json is copied or, for byte
tokens, written as JSON.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from exp.checkpoint import CheckpointError
from exp.data.tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, added_token, byte_tokenizer_json
from exp.model import GPT, HFCausalLM
from exp.rundir import publish_dir

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EOS_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
# exp's SFT template (exp.data.sft.template): `<|role|>` content `<|end|>` per turn, then `<|endoftext|>` after
# a whole conversation; add_generation_prompt opens the assistant's turn instead.
CHAT_TEMPLATE = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)


def check_hf_exportable(model, model_cfg: dict, source) -> None:
    """Refuse what has no exact transformers counterpart: other model classes and mixture-of-experts GPTs."""
    if type(model) is not GPT:
        raise CheckpointError(f"{source}: --format hf exports exp.model.GPT only, not {model_cfg.get('_target_')}")
    if model.num_experts:
        raise CheckpointError(
            f"{source}: --format hf cannot export a mixture-of-experts model (num_experts={model.num_experts}): "
            "transformers has no class with exp's router; use --format exp"
        )


def hf_state_dict(model: GPT, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """exp's parameters under LlamaForCausalLM's names, in `dtype`; the fused qkv splits into q/k/v_proj."""
    sd = model.state_dict()
    hd = model.d_model // model.n_head
    out = {"model.embed_tokens.weight": sd.pop("tok_emb.weight"), "model.norm.weight": sd.pop("norm.weight")}
    head = sd.pop("lm_head.weight")
    if not model.tie_embeddings:
        out["lm_head.weight"] = head
    for i in range(model.n_layer):
        b, L = f"blocks.{i}.", f"model.layers.{i}."
        # rows are [q: n_head heads | k: n_kv_head heads | v: n_kv_head heads]; RoPE needs no permutation
        q, k, v = sd.pop(b + "attn.qkv.weight").split([model.n_head * hd, model.n_kv_head * hd, model.n_kv_head * hd])
        names = {
            "self_attn.q_proj": q,
            "self_attn.k_proj": k,
            "self_attn.v_proj": v,
            "self_attn.o_proj": sd.pop(b + "attn.proj.weight"),
            "input_layernorm": sd.pop(b + "attn_norm.weight"),
            "post_attention_layernorm": sd.pop(b + "mlp_norm.weight"),
            "mlp.gate_proj": sd.pop(b + "mlp.gate.weight"),
            "mlp.up_proj": sd.pop(b + "mlp.up.weight"),
            "mlp.down_proj": sd.pop(b + "mlp.down.weight"),
        }
        out.update({f"{L}{name}.weight": t for name, t in names.items()})
    if sd:  # a GPT change this mapping does not know: refuse rather than export a model missing weights
        raise CheckpointError(f"--format hf: no transformers name for {', '.join(sorted(sd))}")
    # clone: safetensors refuses views sharing storage (q/k/v of one qkv matrix)
    return {name: t.detach().to(dtype).contiguous().clone() for name, t in out.items()}


def _rope_theta(model_cfg: dict) -> float:
    return float(model_cfg.get("rope_theta", inspect.signature(GPT).parameters["rope_theta"].default))


def hf_config(model: GPT, model_cfg: dict, dtype_name: str, ids: dict) -> dict:
    """config.json: LlamaConfig keys. rope_theta is written both top-level (transformers 4.x) and in
    rope_parameters (5.x); the dtype both as torch_dtype (4.x) and dtype (5.x)."""
    theta = _rope_theta(model_cfg)
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": model.tok_emb.num_embeddings,
        "hidden_size": model.d_model,
        "intermediate_size": model.mlp_hidden,
        "num_hidden_layers": model.n_layer,
        "num_attention_heads": model.n_head,
        "num_key_value_heads": model.n_kv_head,
        "head_dim": model.d_model // model.n_head,
        "max_position_embeddings": model.seq_len,
        "rms_norm_eps": model.norm.eps,
        "rope_theta": theta,
        "rope_scaling": None,
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "tie_word_embeddings": model.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "initializer_range": float(model_cfg.get("init_std", 0.02)),
        "use_cache": True,
        "torch_dtype": dtype_name,
        "dtype": dtype_name,
        **ids,
    }


def read_tokenizer_json(path: Path) -> tuple[bytes, dict[str, int], int]:
    """(bytes, {special token: id}, vocabulary size counting added tokens) of a tokenizer.json, read as JSON."""
    raw = path.read_bytes()
    try:
        tok = json.loads(raw)
        vocab = tok["model"]["vocab"]
        ids = list(vocab.values()) if isinstance(vocab, dict) else list(range(len(vocab)))  # Unigram: a list
        added = tok.get("added_tokens") or []
        ids += [int(t["id"]) for t in added]
        specials = {t["content"]: int(t["id"]) for t in added if t.get("special")}
        size = max(ids, default=-1) + 1
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise CheckpointError(f"{path}: not a Hugging Face tokenizer.json ({type(e).__name__}: {e})") from None
    return raw, specials, size


def tokenizer_source(tokenizer, checkpoint: Path) -> Path | None:
    """--tokenizer (a tokenizer.json or a folder holding one), else the checkpoint's own; None: byte tokens."""
    if tokenizer is None:
        own = checkpoint / TOKENIZER_FILE
        return own if own.is_file() else None
    path = Path(tokenizer).expanduser()
    f = path / TOKENIZER_FILE if path.is_dir() else path
    if not f.is_file():
        raise CheckpointError(f"--tokenizer {tokenizer}: no such tokenizer.json")
    return f


def tokenizer_files(tokenizer, checkpoint: Path, vocab_size: int, seq_len: int) -> tuple[dict[str, bytes], dict]:
    """({file name: bytes} of tokenizer.json, tokenizer_config.json, special_tokens_map.json; the token ids
    for config.json: bos/eos/pad). The tokenizer must fit the model's embedding rows."""
    source = tokenizer_source(tokenizer, checkpoint)
    if source is None:
        if vocab_size != 256 + len(SPECIAL_TOKENS):
            raise CheckpointError(
                f"{checkpoint}: vocab_size={vocab_size} is not the byte tokenizer's {256 + len(SPECIAL_TOKENS)} and "
                "the checkpoint holds no tokenizer.json; give one with --tokenizer PATH"
            )
        raw = (json.dumps(byte_tokenizer_json(), indent=2, ensure_ascii=False) + "\n").encode("utf-8")
        specials, size = {s: 256 + i for i, s in enumerate(SPECIAL_TOKENS)}, 256 + len(SPECIAL_TOKENS)
    else:
        raw, specials, size = read_tokenizer_json(source)
        if size > vocab_size:
            raise CheckpointError(f"{source}: its {size} tokens do not fit the model's vocab_size={vocab_size}")
    eos = next((s for s in EOS_CANDIDATES if s in specials), None)
    if eos is None:
        where = source or "the byte tokenizer"
        raise CheckpointError(f"{where}: has no end-of-text special token (looked for {', '.join(EOS_CANDIDATES)})")
    pad = next((s for s in PAD_CANDIDATES if s in specials), None)
    chat = [s for s in CHAT_TOKENS if s in specials]
    # exp trains without a BOS token; documents are separated by end-of-text, so that is what starts one
    # (as GPT-2 does): lm-evaluation-harness prefixes an empty context with it.
    named = {"bos_token": eos, "eos_token": eos, "unk_token": None, **({"pad_token": pad} if pad else {})}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **named,
        "additional_special_tokens": chat,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": seq_len,
        "added_tokens_decoder": {
            str(i): {k: v for k, v in added_token(i, s).items() if k != "id"}
            for s, i in sorted(specials.items(), key=lambda kv: kv[1])
        },
    }
    if len(chat) == len(CHAT_TOKENS):
        config["chat_template"] = CHAT_TEMPLATE
    special_map = {k: v for k, v in named.items() if v is not None} | {"additional_special_tokens": chat}
    files = {
        TOKENIZER_FILE: raw,
        "tokenizer_config.json": _json_bytes(config),
        "special_tokens_map.json": _json_bytes(special_map),
    }
    ids = {"bos_token_id": specials[eos], "eos_token_id": specials[eos], "pad_token_id": specials.get(pad)}
    ids["end_token_id"] = specials.get("<|end|>")  # for generation_config.json only
    return files, ids


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


def check_out(out: Path) -> None:
    """OUT may be new, empty, or an earlier export (replaced whole); anything else is not overwritten."""
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "export.json").is_file())):
        raise CheckpointError(f"{out} exists and is not an empty folder or an earlier export; give a new folder")


def export_hf(model, model_cfg: dict, source: Path, out, info: dict, dtype=None, tokenizer=None) -> Path:
    """Write `out` as a transformers LlamaForCausalLM folder: config.json, generation_config.json,
    model.safetensors (`dtype`: float32|bfloat16|float16, default the weights' own), the tokenizer files and
    export.json (`info` + format and dtype). The folder is built beside `out` and renamed: whole or absent."""
    if isinstance(model, HFCausalLM):
        return export_hf_model(model, source, out, info, dtype, tokenizer)
    check_hf_exportable(model, model_cfg, source)
    dtype_name = dtype or str(model.tok_emb.weight.dtype).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"--dtype {dtype_name}: must be one of {', '.join(DTYPES)}")
    out = Path(out)
    check_out(out)
    files, ids = tokenizer_files(tokenizer, source, model.tok_emb.num_embeddings, model.seq_len)
    end = ids.pop("end_token_id")
    generation = {k: v for k, v in ids.items() if v is not None}
    if end is not None:  # a chat model's reply ends at <|end|>, as exp.generate --chat stops there
        generation["eos_token_id"] = [ids["eos_token_id"], end]
    files |= {
        "config.json": _json_bytes(hf_config(model, model_cfg, dtype_name, ids)),
        "generation_config.json": _json_bytes(generation),
        "export.json": _json_bytes({**info, "format": "hf", "dtype": dtype_name}),
    }
    weights = hf_state_dict(model, DTYPES[dtype_name])

    def write(tmp: Path) -> None:
        # format=pt: transformers refuses a safetensors file without it
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt", "step": str(info["step"])})
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return write_folder(out, write)


def write_folder(out: Path, write) -> Path:
    """`write(tmp)` fills a folder built beside `out` under a temporary name, then it becomes `out` in one rename
    (exp.rundir.publish_dir): an export is whole or absent, and a failed one leaves nothing behind."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        write(tmp)
        publish_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_hf_model(model: HFCausalLM, source: Path, out, info: dict, dtype=None, tokenizer=None) -> Path:
    """A model=hf run's model as the transformers folder it came from: the wrapped model's save_pretrained
    (config.json, model.safetensors, generation_config.json; `dtype` as for export_hf) and the tokenizer files of
    the checkpoint's tokenizer.json (or --tokenizer). Built beside `out` and renamed: whole or absent."""
    dtype_name = dtype or str(next(model.hf.parameters()).dtype).removeprefix("torch.")
    if dtype_name not in DTYPES:
        raise CheckpointError(f"--dtype {dtype_name}: must be one of {', '.join(DTYPES)}")
    out = Path(out)
    check_out(out)
    files, _ = tokenizer_files(tokenizer, source, model.vocab_size, model.seq_len)
    files["export.json"] = _json_bytes({**info, "format": "hf", "dtype": dtype_name})

    def write(tmp: Path) -> None:
        model.hf.to(DTYPES[dtype_name]).save_pretrained(str(tmp))
        for name, data in files.items():
            (tmp / name).write_bytes(data)

    return write_folder(out, write)
