"""Byte-level BPE tokenizers through Hugging Face `tokenizers` (the optional extra: pip install -e '.[hf]').

Nothing here downloads: a tokenizer is trained on local text or loaded from a local tokenizer.json.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from .tokenizer import SPECIAL_TOKENS, TOKENIZER_FILE, ByteTokenizer, fingerprint

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
        "fingerprint": fingerprint(json_bytes),
    }


CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")  # the SFT chat template's turn markers
PAD_CANDIDATES = ("<|pad|>", "<pad>", "[PAD]")


class HFTokenizer:
    """A Hugging Face tokenizer.json with the byte tokenizer's interface (exp.data.tokenizer): what the run's
    sample, exp.generate, SFT and distillation use, whatever the vocabulary."""

    kind = "file"

    def __init__(self, tok: Any, json_bytes: bytes | None = None):
        self.tok = tok
        self._json = json_bytes if json_bytes is not None else tok.to_str().encode("utf-8")
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        self.specials = special_tokens(tok)
        self.EOT = eot_id(tok)
        pad = next((tok.token_to_id(n) for n in PAD_CANDIDATES if tok.token_to_id(n) is not None), None)
        self.PAD = self.EOT if pad is None else int(pad)
        self.fingerprint = fingerprint(self._json)

    @classmethod
    def from_file(cls, path: str | Path) -> HFTokenizer:
        """Load a local tokenizer.json (or a folder holding one)."""
        f = tokenizer_file(path)
        return cls(load_tokenizer(f), f.read_bytes())

    def to_json(self) -> bytes:
        """The tokenizer.json bytes, as loaded: a checkpoint's copy has the same fingerprint."""
        return self._json

    def encode(self, text: str) -> list[int]:
        """Token ids; special-token strings inside text stay plain text."""
        return encode(self.tok, text)

    def decode(self, ids: Iterable[int]) -> str:
        """Text for ids, special tokens written out."""
        ids = [int(i) for i in ids]
        bad = next((i for i in ids if not 0 <= i < self.vocab_size), None)
        if bad is not None:
            raise ValueError(f"token id {bad} outside the vocabulary [0, {self.vocab_size})")
        return self.tok.decode(ids, skip_special_tokens=False)

    def special(self, name: str) -> int:
        """Id of a special token, by full string ("<|end|>") or bare name ("end")."""
        key = name if name.startswith("<") else f"<|{name}|>"
        if key not in self.specials:
            raise KeyError(f"unknown special token {name!r}; known: {', '.join(self.specials)}")
        return self.specials[key]

    def with_chat_tokens(self) -> HFTokenizer:
        """This tokenizer with the chat template's special tokens added where missing (new ids at the end)."""
        missing = [t for t in CHAT_TOKENS if t not in self.specials]
        if not missing:
            return self
        tok = load_tokenizer_bytes(self._json)
        tok.add_special_tokens(missing)
        return HFTokenizer(tok)


def load_tokenizer_bytes(json_bytes: bytes) -> Any:
    """A tokenizer from tokenizer.json bytes."""
    return _tokenizers().Tokenizer.from_str(json_bytes.decode("utf-8"))


def tokenizer_in(folder) -> ByteTokenizer | HFTokenizer:
    """The tokenizer a data folder, checkpoint or export holds: its tokenizer.json, or byte tokens without one."""
    f = Path(folder).expanduser() / TOKENIZER_FILE
    return HFTokenizer.from_file(f) if f.is_file() else ByteTokenizer()


def open_tokenizer(spec) -> ByteTokenizer | HFTokenizer:
    """A tokenizer named by a config or CLI: "bytes", a tokenizer.json, or a folder holding one (a data folder,
    a checkpoint, an export); raises FileNotFoundError naming what is missing."""
    if str(spec) == "bytes":
        return ByteTokenizer()
    p = Path(str(spec)).expanduser()
    if p.is_dir() and not (p / TOKENIZER_FILE).is_file():
        raise FileNotFoundError(f"{p}: no {TOKENIZER_FILE} in this folder")
    if not p.exists():
        raise FileNotFoundError(f"{p}: no such tokenizer file or folder")
    return HFTokenizer.from_file(p)
