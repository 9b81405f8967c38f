"""A Hugging Face transformers causal LM (`model=hf model.name_or_path=PATH`) behind exp's model protocol.

transformers is an optional extra (pip install -e '.[hf]'), imported only when such a model is built. Nothing here
runs code from a model folder (trust_remote_code is never set): the architecture must be one transformers ships.

A run's checkpoints hold the wrapped model's weights in exp's format and, in config.yaml, the model's config.json as
`model.config` (saved_arguments): export, exp.generate and distillation teachers rebuild it from that with
AutoModelForCausalLM.from_config, so they need neither the source folder nor the hub.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

INSTALL_HINT = "pip install -e '.[hf]'"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
ATTENTION = ("eager", "sdpa")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # org/name or name, as the hub spells repositories
# what a model folder needs from the hub: config, weights, tokenizer files (never *.py: no remote code runs)
HUB_FILES = ["*.json", "*.safetensors", "*.model", "*.txt"]


class MissingTransformers(ImportError):
    """transformers is not installed; the message says which extra brings it."""


def transformers():
    """The transformers module, or MissingTransformers naming the extra to install."""
    try:
        import transformers as tf
    except ImportError:
        raise MissingTransformers(f"model=hf needs Hugging Face transformers: {INSTALL_HINT}") from None
    tf.utils.logging.disable_progress_bar()  # "Loading weights" bars in every run's log say nothing
    return tf


def local_folder(name_or_path) -> Path:
    """The local folder of a model: name_or_path itself when it exists, else a hub name's snapshot in the Hugging
    Face cache (downloaded only when HF_HUB_OFFLINE is not set). Raises ValueError naming what is missing."""
    path = Path(str(name_or_path)).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"model.name_or_path={name_or_path} is a file, not a model folder")
    if not HUB_ID.match(str(name_or_path)):
        raise ValueError(f"model.name_or_path={name_or_path} does not exist")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ValueError(
            f"model.name_or_path={name_or_path} is not a local folder, and a hub name needs huggingface_hub "
            f"({INSTALL_HINT})"
        ) from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        return Path(snapshot_download(str(name_or_path), allow_patterns=HUB_FILES, local_files_only=offline))
    except Exception as e:  # hub errors of every kind: not found, offline and not cached, no network
        where = "in the Hugging Face cache (HF_HUB_OFFLINE is set)" if offline else "on the hub"
        line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"model.name_or_path={name_or_path} is not a local folder, nor found {where} ({line})"
        ) from None


def folder_or_name(name_or_path) -> str:
    """${exp_hf_folder:...}: the local folder of a model (local_folder), or name_or_path as given when there is none
    (the model's own checks then name the problem in one line)."""
    try:
        return str(local_folder(name_or_path))
    except ValueError:
        return str(name_or_path)


def read_config_json(folder: Path, key: str = "model.name_or_path") -> dict:
    """A model folder's config.json as a dict; ValueError naming the key when it is missing or broken."""
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text())
    except FileNotFoundError:
        raise ValueError(f"{key}={folder} has no config.json (not a transformers model folder)") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"{key}={file} cannot be read ({e})") from None
    if not isinstance(config, dict) or "model_type" not in config:
        raise ValueError(f"{key}={file} is not a transformers config.json (no model_type)")
    return config


def _hf_config(tf, config: dict, source: str):
    """A transformers config object from a config.json dict; only architectures transformers ships."""
    values = {k: v for k, v in config.items() if k not in ("auto_map", "transformers_version", "_name_or_path")}
    model_type = values.pop("model_type", None)
    try:
        return tf.AutoConfig.for_model(model_type, **values)
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{source}: model_type {model_type!r} is not one transformers knows ({e})") from None


class HFCausalLM(nn.Module):
    """Any transformers AutoModelForCausalLM, trained by exp's stages: forward(ids) -> logits (B, T, vocab).

    name_or_path: a local folder (config.json, weights) or a hub name. vocab_size: the data's vocabulary; the
    model's embeddings grow to it when it is larger (the SFT chat tokens added to the model's tokenizer), never
    shrink. seq_len: null takes config.json's max_position_embeddings. config: the model's config.json as saved in
    a checkpoint's config.yaml: given, the model is built from it (random weights, to be loaded) and the folder is
    not read.
    """

    def __init__(
        self,
        name_or_path: str,
        vocab_size: int | None = None,
        seq_len: int | None = None,
        dtype: str = "float32",
        attn_implementation: str = "sdpa",
        config: dict | None = None,
    ):
        super().__init__()
        if dtype not in (*DTYPES, "auto"):
            raise ValueError(f"model.dtype={dtype} must be one of {', '.join(DTYPES)} or auto (config.json's)")
        if attn_implementation not in ATTENTION:
            raise ValueError(f"model.attn_implementation={attn_implementation} must be one of {', '.join(ATTENTION)}")
        tf = transformers()
        self.name_or_path = str(name_or_path)
        meta = torch.get_default_device().type == "meta"  # validation builds every model on the meta device
        options = {"attn_implementation": attn_implementation, "trust_remote_code": False}
        if config is not None or meta:
            source = "model.config" if config is not None else "model.name_or_path"
            config = dict(config) if config is not None else read_config_json(local_folder(name_or_path))
            hf_config = _hf_config(tf, config, source)
            torch_dtype = DTYPES.get(dtype) or _config_dtype(config)
            try:
                model = tf.AutoModelForCausalLM.from_config(hf_config, **options, **_dtype_arg(tf, torch_dtype))
            except ValueError as e:  # a config class with no causal LM (an encoder, a vision model)
                raise ValueError(f"{source}: not a causal language model ({_first(e)})") from None
        else:
            folder = local_folder(name_or_path)
            read_config_json(folder)  # a folder without config.json: one line naming the key
            torch_dtype = DTYPES.get(dtype, "auto")
            try:
                model = tf.AutoModelForCausalLM.from_pretrained(
                    str(folder), **options, **_dtype_arg(tf, torch_dtype), local_files_only=True
                )
            except (OSError, ValueError) as e:
                raise ValueError(f"model.name_or_path={name_or_path}: cannot be loaded ({_first(e)})") from None
        self.hf = model.train()  # from_pretrained returns eval mode: dropout would stay off until the first eval
        rows = model.get_input_embeddings().num_embeddings
        if vocab_size is not None and vocab_size > rows:  # new rows: drawn around the mean of the others
            # (transformers' default) from a fixed seed: the grown model is a function of its folder alone, the same
            # in every run and on every rebuild (a LoRA's base is its folder: its new rows are not checkpointed)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(0)
                model.resize_token_embeddings(int(vocab_size), mean_resizing=not meta)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        limit = getattr(model.config, "max_position_embeddings", None)
        if seq_len is not None and limit is not None and seq_len > limit:
            raise ValueError(f"model.seq_len={seq_len} exceeds the model's max_position_embeddings={limit}")
        if seq_len is None and limit is None:
            raise ValueError("model.seq_len: config.json names no max_position_embeddings; set model.seq_len")
        self.seq_len = int(seq_len if seq_len is not None else limit)
        self.n_layer = getattr(model.config, "num_hidden_layers", None)  # flops_per_token's attention term
        self.d_model = getattr(model.config, "hidden_size", None)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids (B, T) int64 -> logits (B, T, vocab)."""
        return self.hf(input_ids=ids, use_cache=False).logits

    def hf_config(self) -> dict:
        """The wrapped model's config.json, as a dict of plain values (vocab_size after any growth)."""
        return json.loads(self.hf.config.to_json_string(use_diff=False))

    def saved_arguments(self) -> dict:
        """What a checkpoint's config.yaml adds to the model node so that the model rebuilds without its folder."""
        return {"config": self.hf_config()}

    def load_folder_weights(self, folder) -> None:
        """Load a transformers folder's weights (model.safetensors, or its shards) into the wrapped model."""
        from exp.errors import CheckpointError

        state = folder_state_dict(folder)
        current = self.hf.state_dict()
        problems = [f"{k} is missing" for k in current if k not in state and not _tied_alias(self.hf, k)]
        problems += [f"{k} is not in the model" for k in state if k not in current]
        problems += [
            f"{k} has shape {list(state[k].shape)}, the model {list(current[k].shape)}"
            for k in state
            if k in current and state[k].shape != current[k].shape
        ]
        if problems:
            raise CheckpointError(f"{folder}: does not fit model=hf's model: " + "; ".join(problems[:3]))
        self.hf.load_state_dict(state, strict=False)


def folder_state_dict(folder) -> dict[str, torch.Tensor]:
    """All tensors of a transformers folder: model.safetensors, or the shards its index names."""
    from safetensors.torch import load_file

    folder = Path(folder)
    single = folder / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    index = folder / "model.safetensors.index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{folder}: no model.safetensors (nor its index)")
    shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(folder / shard)))
    return state


def _tied_alias(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` shares its tensor with another of the model's (a tied head saved once)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    if name not in params:
        return False
    return any(p is params[name] and k != name for k, p in params.items())


def _dtype_arg(tf, dtype) -> dict:
    """from_pretrained/from_config's dtype keyword: `dtype` since transformers 4.56, `torch_dtype` before."""
    major, minor = (int(x) for x in tf.__version__.split(".")[:2])
    return {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}


def _config_dtype(config: dict) -> torch.dtype:
    name = config.get("dtype") or config.get("torch_dtype") or "float32"
    return DTYPES.get(str(name).removeprefix("torch."), torch.float32)


def _first(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
