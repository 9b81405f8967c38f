"""Byte-level BPE tokenizers through Hugging Face `tokenizers` (the optional extra: pip install -e '.[hf]').

Nothing here downloads: a tokenizer is trained on local text or loaded from a local tokenizer.json.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .tokenizer import SPECIAL_TOKENS

INSTALL_HINT = "pip install -e '.[hf]'"
# document separators tried in order when a loaded tokenizer has to name one
EOT_CANDIDATES = ("<|endoftext|>", "<|end_of_text|>", "</s>", "<eos>", "<|eos|>")


class MissingTokenizers(ImportError):
    """`tokenizers` is not installed; the message says which extra brings it."""


def _tokenizers() -> Any:
    try:
        import tokenizers
    except ImportError:
        raise MissingTokenizers(f"BPE tokenizers need the Hugging Face tokenizers package: {INSTALL_HINT}") from None
    return tokenizers


def train_bpe(texts: Iterable[str], vocab_size: int, special_tokens: tuple[str, ...] = SPECIAL_TOKENS) -> Any:
    """A byte-level BPE (GPT-2 style: ByteLevel pre-tokenizer and decoder, no normalizer) trained on texts.

    The special tokens take ids 0.. in order, so "<|endoftext|>" is 0; every byte has a token, so any
    text encodes and decodes back to itself.
    """
    tk = _tokenizers()
    if vocab_size < 256 + len(special_tokens):
        least = 256 + len(special_tokens)
        raise ValueError(f"--vocab-size {vocab_size} must be at least {least} (256 bytes + special tokens)")
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    trainer = tk.trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special_tokens),
        initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def tokenizer_file(path: str | Path) -> Path:
    """path itself if it is a file, else path/tokenizer.json (a Hugging Face tokenizer folder)."""
    p = Path(path).expanduser()
    f = p / "tokenizer.json" if p.is_dir() else p
    if not f.is_file():
        raise FileNotFoundError(f"{f}: no such tokenizer file")
    return f


def load_tokenizer(path: str | Path) -> Any:
    """A tokenizer from a local tokenizer.json, or a folder holding one (never the hub)."""
    tk = _tokenizers()
    f = tokenizer_file(path)
    try:
        return tk.Tokenizer.from_file(str(f))
    except Exception as e:  # tokenizers raises a bare Exception on a malformed file
        raise ValueError(f"{f}: not a tokenizers tokenizer.json ({str(e).splitlines()[0] if str(e) else e})") from None


def special_tokens(tok: Any) -> dict[str, int]:
    """{content: id} of the tokenizer's special added tokens, by id."""
    decoder = tok.get_added_tokens_decoder()
    return {t.content: i for i, t in sorted(decoder.items()) if t.special}


def eot_id(tok: Any) -> int:
    """The id that separates documents: the first of EOT_CANDIDATES the tokenizer knows."""
    for name in EOT_CANDIDATES:
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    raise ValueError(f"the tokenizer has no end-of-text token (looked for {', '.join(EOT_CANDIDATES)})")


def encode(tok: Any, text: str) -> list[int]:
    """Token ids of text, special-token strings in it encoded as plain text (as the byte tokenizer does;
    encode_special_tokens needs tokenizers>=0.15.1)."""
    tok.encode_special_tokens = True
    try:
        return tok.encode(text, add_special_tokens=False).ids
    finally:
        tok.encode_special_tokens = False


def describe(tok: Any, kind: str, json_bytes: bytes) -> dict:
    """meta.json's "tokenizer" entry: kind, vocab_size, special tokens and the sha256 of tokenizer.json."""
    return {
        "kind": kind,
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "special_tokens": special_tokens(tok),
        "fingerprint": "sha256:" + hashlib.sha256(json_bytes).hexdigest(),
    }
