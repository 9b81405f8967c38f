"""Tiny random transformers models saved as local folders, with a tokenizer.json trained here: nothing downloads."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from .conftest import JSON_SOURCES

TEXTS = [Path(JSON_SOURCES, name).read_text() for name in sorted(os.listdir(JSON_SOURCES)) if name.endswith(".py")]


def save_tokenizer(folder: Path, vocab_size: int, special_tokens=None) -> int:
    """A byte-level BPE trained on the json package's sources, saved as folder/tokenizer.json; its size."""
    from exp.data.bpe import train_bpe
    from exp.data.tokenizer import SPECIAL_TOKENS

    tok = train_bpe(TEXTS, vocab_size, tuple(special_tokens or SPECIAL_TOKENS))
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    return tok.get_vocab_size(with_added_tokens=True)


def llama_folder(folder: Path, tokenizer: bool = True, seed: int = 0, **config) -> Path:
    """A 2-layer LlamaForCausalLM (GQA: 4 query heads, 2 key/value heads) with exp's special tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    vocab = save_tokenizer(folder, 300) if tokenizer else 300
    values = dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=128,
        vocab_size=vocab,
        max_position_embeddings=64,
        rms_norm_eps=1e-6,
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    LlamaForCausalLM(LlamaConfig(**{**values, **config})).save_pretrained(str(folder))
    return folder


def gpt2_folder(folder: Path, seed: int = 0) -> Path:
    """A 2-layer GPT2LMHeadModel (head tied to wte) whose tokenizer has <|endoftext|> only: SFT adds the chat
    tokens, so the model's embeddings grow."""
    from transformers import GPT2Config, GPT2LMHeadModel

    vocab = save_tokenizer(folder, 290, ("<|endoftext|>",))
    torch.manual_seed(seed)
    ids = dict(bos_token_id=0, eos_token_id=0)  # <|endoftext|>, as the tokenizer has it
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=vocab, n_positions=64, **ids)
    GPT2LMHeadModel(config).save_pretrained(str(folder))
    return folder


def token_data(source: Path, tokenizer_folder: Path, out: Path) -> Path:
    """source's files tokenized with tokenizer_folder's tokenizer.json (python -m exp.data.prepare)."""
    from exp.data.prepare import main as prepare

    argv = [str(source), "--out", str(out), "--tokenizer", str(tokenizer_folder / "tokenizer.json"), "--quiet"]
    assert prepare(argv) == 0
    return out
