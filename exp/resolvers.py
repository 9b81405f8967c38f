"""OmegaConf resolvers the configs use, registered when exp is imported (before Hydra composes a config).

  ${exp_data_vocab:${data.path}}          the vocabulary size a prepared data folder records (meta.json)
  ${exp_mixture_vocab:${data.sources}}    the largest vocabulary the mixture's prepared folders record (264: bytes)
  ${exp_tokenizer_vocab:${data.tokenizer}} a tokenizer's size, chat tokens included ("bytes" or null: 264)
  ${exp_padded_vocab:${data.vocab_size}}  the model's vocabulary: the tokenizer's rounded up to a multiple of 64
                                          (when that adds at most 1/16: bytes stay 264)

  ${exp_hf_folder:${model.name_or_path}}   model=hf: the model's local folder (a hub name: its snapshot in the
                                          Hugging Face cache; downloaded unless HF_HUB_OFFLINE is set)
  ${exp_hf_seq_len:${model.name_or_path}}  model=hf: config.json's max_position_embeddings (n_positions)

They never fail on a path that does not exist: the data's own checks name that problem, in one line.

  ${exp_run_dir:}                         the job's output directory (hydra.runtime.output_dir); before a job
                                          runs (`train.py --cfg job --resolve`) the one it would get
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from omegaconf import OmegaConf

BYTE_VOCAB = 264  # exp.data.tokenizer.VOCAB_SIZE, without importing the data package (torch) here


def data_vocab(path) -> int:
    """meta.json's vocab_size in a prepared data folder; the byte tokenizer's size when there is none."""
    try:
        meta = json.loads((Path(str(path)).expanduser() / "meta.json").read_text())
        return int(meta["vocab_size"])
    except (OSError, ValueError, TypeError, KeyError):
        return BYTE_VOCAB


def mixture_vocab(sources) -> int:
    """The largest vocab_size the meta.json of a mixture's source folders records; bytes' size without any."""
    paths = [str(s.get("path")) for s in (sources or {}).values() if hasattr(s, "get") and s.get("path")]
    return max([BYTE_VOCAB, *(data_vocab(p) for p in paths)])


def tokenizer_vocab(spec) -> int:
    """The vocabulary size of an SFT tokenizer (a tokenizer.json or folder), chat tokens added."""
    if spec is None or str(spec) == "bytes":
        return BYTE_VOCAB
    from exp.data.bpe import open_tokenizer

    try:
        return open_tokenizer(spec).with_chat_tokens().vocab_size
    except (OSError, ValueError, ImportError):
        return BYTE_VOCAB  # the data's check reports the missing or broken tokenizer by its key


def padded_vocab(vocab_size, multiple: int = 64) -> int:
    """vocab_size rounded up to a multiple of 64 for fast matmuls, when that adds at most 1/16 to it: a real
    vocabulary (50,257 -> 50,304, 1,000 -> 1,024) gains, while a tiny one (the byte tokenizer's 264, which
    would grow by 21%) only pays for the extra logits and stays as it is."""
    n = int(vocab_size)
    padded = -(-n // multiple) * multiple
    return padded if (padded - n) * 16 <= n else n


def hf_folder(name_or_path) -> str:
    """A transformers model's local folder, or name_or_path as given when there is none (model=hf's own checks
    then name the problem)."""
    from exp.model.hf import folder_or_name

    return folder_or_name(name_or_path)


HF_LENGTH_KEYS = ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length")


def hf_seq_len(name_or_path) -> int | None:
    """The context length a transformers model's config.json declares; None when it declares none or cannot be read."""
    try:
        config = json.loads((Path(hf_folder(name_or_path)) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    found = next((config[k] for k in HF_LENGTH_KEYS if isinstance(config.get(k), int)), None)
    return int(found) if found else None


def run_dir() -> str | None:
    """hydra.runtime.output_dir once the job runs. Hydra sets it only then, so `--cfg job --resolve` would print
    null: a single run's is hydra.run.dir made absolute, as Hydra makes it; a sweep's trial has none yet."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra = HydraConfig.get()
    output_dir = OmegaConf.select(hydra, "runtime.output_dir", default=None)  # ??? until the job runs
    if output_dir:
        return output_dir
    return None if hydra.mode == RunMode.MULTIRUN else os.path.abspath(hydra.run.dir)  # --cfg: mode None


def register() -> None:
    for name, fn in (
        ("exp_data_vocab", data_vocab),
        ("exp_tokenizer_vocab", tokenizer_vocab),
        ("exp_padded_vocab", padded_vocab),
        ("exp_hf_folder", hf_folder),
        ("exp_hf_seq_len", hf_seq_len),
    ):
        if not OmegaConf.has_resolver(name):  # cached per config: validation resolves it many times
            OmegaConf.register_new_resolver(name, fn, use_cache=True)
    if not OmegaConf.has_resolver("exp_mixture_vocab"):  # not cached: its argument is a config node
        OmegaConf.register_new_resolver("exp_mixture_vocab", mixture_vocab)
    if not OmegaConf.has_resolver("exp_run_dir"):  # not cached: the directory is set once the job starts
        OmegaConf.register_new_resolver("exp_run_dir", run_dir)
