"""Tokenizers of a run: the byte-level one (ids 0..255 are raw bytes, 256..263 special tokens), or a Hugging Face
tokenizer.json (exp.data.bpe.HFTokenizer; bpe.tokenizer_in and bpe.open_tokenizer find either) beside the data,
in checkpoints and in exports.

Both offer: vocab_size, EOT, PAD, specials, encode, decode, special(name), fingerprint and to_json() (None for
bytes, which need no file).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import numpy as np

SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|pad|>",
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",
    "<|reserved_0|>",
    "<|reserved_1|>",
)
EOT = 256
PAD = 257
VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)
TOKENIZER_FILE = "tokenizer.json"  # a Hugging Face tokenizers file: no file means byte tokens


def fingerprint(json_bytes: bytes) -> str:
    """How a tokenizer.json is recognised: the SHA-256 of its bytes."""
    return "sha256:" + hashlib.sha256(json_bytes).hexdigest()


def check_byte_vocab(vocab_size: int) -> int:
    """VOCAB_SIZE, if that is what data.vocab_size says: the key exists so that model configs can interpolate
    ${data.vocab_size}, and byte-tokenized data takes no other size."""
    if int(vocab_size) != VOCAB_SIZE:
        raise ValueError(f"data.vocab_size={vocab_size} must be {VOCAB_SIZE}, the byte tokenizer's size")
    return VOCAB_SIZE


class ByteTokenizer:
    """UTF-8 bytes as token ids, plus special tokens that only exist as ids (never parsed from text)."""

    EOT = EOT
    PAD = PAD
    vocab_size = VOCAB_SIZE
    kind = "bytes"
    fingerprint = "bytes"
    specials: dict[str, int] = {name: 256 + i for i, name in enumerate(SPECIAL_TOKENS)}

    def to_json(self) -> None:
        """Byte tokens need no tokenizer.json."""
        return None

    def with_chat_tokens(self) -> ByteTokenizer:
        """The chat template's tokens are among the 8 special ones already."""
        return self

    def encode(self, text: str) -> list[int]:
        """UTF-8 bytes of text; special-token strings in text stay plain bytes."""
        return list(text.encode("utf-8"))

    def encode_bytes(self, data: bytes) -> np.ndarray:
        """Raw bytes as a uint16 token array (the fast path for files)."""
        return np.frombuffer(data, dtype=np.uint8).astype(np.uint16)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids: byte runs decoded with errors="replace", special ids as their strings."""
        parts: list[str] = []
        run = bytearray()
        for i in ids:
            i = int(i)
            if 0 <= i < 256:
                run.append(i)
            elif 256 <= i < VOCAB_SIZE:
                # flush first so a special token splits byte runs, as it did in the source
                parts.append(run.decode("utf-8", errors="replace"))
                run.clear()
                parts.append(SPECIAL_TOKENS[i - 256])
            else:
                raise ValueError(f"token id {i} outside the vocabulary [0, {VOCAB_SIZE})")
        parts.append(run.decode("utf-8", errors="replace"))
        return "".join(parts)

    def special(self, name: str) -> int:
        """Id of a special token, by full string ("<|endoftext|>") or bare name ("endoftext")."""
        key = name if name.startswith("<|") else f"<|{name}|>"
        if key not in self.specials:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(self.specials)}")
        return self.specials[key]


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable character for each byte: the alphabet of the ByteLevel pre-tokenizer and decoder."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    return chars


def added_token(i: int, content: str) -> dict:
    """A special token as tokenizer.json's added_tokens list holds it."""
    flags = dict(single_word=False, lstrip=False, rstrip=False, normalized=False, special=True)
    return {"id": i, "content": content, **flags}


def byte_tokenizer_json() -> dict:
    """exp's byte tokenizer as a tokenizers tokenizer.json: a BPE without merges over the ByteLevel alphabet,
    byte b at id b, then SPECIAL_TOKENS at 256.. (so encoding text gives its UTF-8 bytes as ids)."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}
    vocab = {ch: b for b, ch in bytes_to_unicode().items()}
    return {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [added_token(256 + i, s) for i, s in enumerate(SPECIAL_TOKENS)],
        "normalizer": None,
        "pre_tokenizer": byte_level,
        "post_processor": None,
        "decoder": byte_level,
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": False,
            "vocab": vocab,
            "merges": [],
        },
    }
