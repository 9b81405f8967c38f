"""Token datasets: a train/val pair of token files, read as random training windows and fixed val windows."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from exp.text import first_line

from .batches import PermutationSampler, WindowSampler, check_max_examples, check_order, eval_batches
from .cache import check_cache_dir
from .corpus import check_val_fraction, pystdlib_corpus
from .protocol import Batch, DataError
from .tokenizer import TOKENIZER_FILE, VOCAB_SIZE, ByteTokenizer, check_byte_vocab

_DTYPES = {"uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32)}


_MAX_IDS: dict[tuple, int] = {}  # (path, size, mtime_ns, dtype) -> largest token id


def max_token_id(path: Path, dtype: np.dtype, chunk: int = 1 << 24) -> int:
    """Largest token id in a token file, read in chunks so memory stays flat; remembered per file version."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, dtype.str)
    if key not in _MAX_IDS:  # a sweep validates each point, and the run checks again: scan each file once
        tokens = np.memmap(path, dtype=dtype, mode="r")
        _MAX_IDS[key] = max(int(tokens[i : i + chunk].max()) for i in range(0, len(tokens), chunk))
        del tokens
    return _MAX_IDS[key]


class TokenData:
    """Base: a train/val pair of uint16 token files."""

    name = "tokens"
    dtype: np.dtype | None = _DTYPES["uint16"]

    def __init__(
        self,
        seq_len: int,
        vocab_size: int,
        max_examples: int | None = None,
        document_mask: bool = False,
        order: str = "permutation",
    ):
        if int(seq_len) <= 0:
            raise ValueError(f"data.seq_len must be > 0, got {seq_len}")
        self.seq_len = int(seq_len)
        self.vocab_size = int(vocab_size)
        self.max_examples = check_max_examples(max_examples)  # train on the first this many windows only
        self.document_mask = bool(document_mask)  # attention stops at each end-of-text token (exp.data.protocol)
        self.order = check_order(order)
        self._paths: tuple[Path, Path] | None = None
        self._arrays: tuple[np.ndarray, np.ndarray] | None = None

    def __getstate__(self) -> dict:
        # pickled into launcher jobs: ship the config, not open memmaps (they would pickle as copies)
        return {**self.__dict__, "_paths": None, "_arrays": None}

    def check(self) -> None:
        """Cheap validation; raises DataError naming the config key."""

    def files(self) -> tuple[Path, Path]:
        """(train.bin, val.bin), building or caching them if needed."""
        raise NotImplementedError

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) token memmaps, opened on first use."""
        if self._arrays is None:
            self._paths = self.files()
            train, val = (np.memmap(p, dtype=self.dtype, mode="r") for p in self._paths)
            if self.max_examples is not None:  # the first max_examples windows of seq_len (+1 for the last target)
                train = train[: self.max_examples * self.seq_len + 1]
            self._arrays = train, val
        return self._arrays

    def epoch_size(self) -> int:
        """Training samples in one pass (stage.num_epochs): the train tokens as windows of seq_len."""
        return max(1, (len(self.arrays()[0]) - 1) // self.seq_len)

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        """This rank's training windows: each once per epoch in a seeded permutation, or random (data.order)."""
        sampler = PermutationSampler if self.order == "permutation" else WindowSampler
        return sampler(self.arrays()[0], self.seq_len, batch_size, seed, rank, world_size)

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """Fixed validation windows, identical across calls and runs."""
        return eval_batches(self.arrays()[1], self.seq_len, batch_size, num_batches)

    def tokenizer(self):
        """The tokenizer that made the tokens, for the sample, checkpoints and exports: bytes here."""
        return ByteTokenizer()

    def describe(self) -> dict:
        """Small dict for logging; paths and token counts once the files are open."""
        out = {"name": self.name, "seq_len": self.seq_len, "vocab_size": self.vocab_size, "order": self.order}
        if self.max_examples is not None:
            out["max_examples"] = self.max_examples
        if self.document_mask:
            out["document_mask"] = True
        if self._arrays is not None:
            out.update(
                train_path=str(self._paths[0]),
                val_path=str(self._paths[1]),
                train_tokens=len(self._arrays[0]),
                val_tokens=len(self._arrays[1]),
            )
        return out


class PyStdlib(TokenData):
    """The installed Python standard library's .py sources, byte-tokenized and cached."""

    name = "pystdlib"

    def __init__(
        self,
        seq_len: int,
        cache_dir: str = "~/.cache/exp",
        val_fraction: float = 0.005,
        vocab_size: int = VOCAB_SIZE,
        max_examples: int | None = None,
        document_mask: bool = False,
        order: str = "permutation",
    ):
        super().__init__(seq_len, check_byte_vocab(vocab_size), max_examples, document_mask, order)
        self.cache_dir = str(cache_dir)
        self.val_fraction = check_val_fraction(val_fraction)

    def check(self) -> None:
        """cache_dir must not be an existing non-directory."""
        check_cache_dir(self.cache_dir)

    def files(self) -> tuple[Path, Path]:
        """Build the cached corpus on first use (a few seconds), then reuse it."""
        self.check()
        d = pystdlib_corpus(self.cache_dir, self.val_fraction)
        return d / "train.bin", d / "val.bin"

    def describe(self) -> dict:
        """Base description plus cache settings."""
        return {**super().describe(), "cache_dir": self.cache_dir, "val_fraction": self.val_fraction}


class Memmap(TokenData):
    """Pre-tokenized .bin files: a directory from exp.data.prepare, or a train file plus val_path."""

    name = "memmap"

    def __init__(
        self,
        path: str,
        seq_len: int,
        vocab_size: int = VOCAB_SIZE,
        val_path: str | None = None,
        dtype: str = "uint16",
        max_examples: int | None = None,
        document_mask: bool = False,
        order: str = "permutation",
    ):
        super().__init__(seq_len, vocab_size, max_examples, document_mask, order)
        self.path = str(path)
        self.val_path = None if val_path is None else str(val_path)
        self.dtype_name = str(dtype)
        self.dtype = _DTYPES.get(self.dtype_name)  # None until check() rejects it

    def _resolve(self) -> tuple[tuple[str, Path], tuple[str, Path]]:
        p = Path(self.path).expanduser()
        if self.val_path is not None:
            return ("data.path", p), ("data.val_path", Path(self.val_path).expanduser())
        if p.is_file():
            raise DataError(
                f"data.path={p} is a file: set data.val_path too, or point data.path at a directory "
                "holding train.bin and val.bin"
            )
        return ("data.path", p / "train.bin"), ("data.path", p / "val.bin")

    def check(self) -> None:
        """Paths, dtype, whole-token sizes, meta.json, one window per file, every token id below vocab_size."""
        if self.vocab_size <= 0:
            raise DataError(f"data.vocab_size={self.vocab_size} must be > 0")
        if self.dtype is None:
            raise DataError(f"data.dtype={self.dtype_name} must be one of {', '.join(_DTYPES)}")
        self._follow_meta_dtype()
        if self.vocab_size > np.iinfo(self.dtype).max + 1:
            raise DataError(f"data.vocab_size={self.vocab_size} does not fit data.dtype={self.dtype_name}")
        if not Path(self.path).expanduser().exists():
            raise DataError(f"data.path={Path(self.path).expanduser()} does not exist")
        resolved = self._resolve()
        for key, f in resolved:
            if f.is_dir() and self.val_path is not None:
                need = f"{key} must be the {'train' if key == 'data.path' else 'val'} token file"
                raise DataError(f"{key}={f} is a directory; with data.val_path set, {need}")
            if not f.is_file():
                raise DataError(f"{key}={f} {'is not a file' if f.exists() else 'does not exist'}")
        for key, f in resolved:
            size = f.stat().st_size
            if size == 0 or size % self.dtype.itemsize:
                raise DataError(f"{key}={f} has {size} bytes, not a positive multiple of {self.dtype_name}")
        meta = self._meta(resolved[0][1])
        for key, f in resolved:
            num_tokens = f.stat().st_size // self.dtype.itemsize
            if num_tokens < self.seq_len + 1:  # the samplers cut windows of seq_len inputs plus one target
                raise DataError(
                    f"{key}={f} holds {num_tokens} tokens, fewer than one window of data.seq_len={self.seq_len} + 1 "
                    "(use a smaller model.seq_len, or more data)"
                )
        if meta is not None and meta.get("max_token_id", self.vocab_size) < self.vocab_size:
            return  # prepare.py recorded the largest id and the sizes still match: no need to read the files
        for key, f in resolved:
            largest = max_token_id(f, self.dtype)
            if largest >= self.vocab_size:  # the embedding lookup would fail mid-run with an IndexError
                raise DataError(
                    f"{key}={f} holds token id {largest} >= data.vocab_size={self.vocab_size} "
                    f"(set data.vocab_size={largest + 1} or more if that is the tokenizer's size)"
                )

    def _follow_meta_dtype(self) -> None:
        """A prepared folder's meta.json names its files' dtype (uint32 past 65536 ids): read them as that,
        whatever data.dtype says; data.dtype is for token files without meta.json."""
        meta_path = Path(self.path).expanduser() / "meta.json"
        if self.val_path is not None or not meta_path.is_file():
            return
        try:
            name = json.loads(meta_path.read_text()).get("dtype", self.dtype_name)
        except (ValueError, AttributeError):
            return  # _meta reports a broken meta.json
        if name not in _DTYPES:
            raise DataError(f"{meta_path} says dtype {name!r}; data=memmap reads {', '.join(_DTYPES)}")
        self.dtype_name, self.dtype = name, _DTYPES[name]

    def _meta(self, train: Path) -> dict | None:
        """prepare.py's meta.json while its sizes match the files, else None; refuses a dtype or vocab it denies."""
        meta_path = train.parent / "meta.json"
        if self.val_path is not None or not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as e:
            raise DataError(f"data.path={meta_path} is not valid JSON ({e})") from None
        if meta.get("dtype", self.dtype_name) != self.dtype_name:
            raise DataError(f"data.dtype={self.dtype_name} but {meta_path} says {meta['dtype']}")
        if meta.get("vocab_size", 0) > self.vocab_size:
            raise DataError(f"data.vocab_size={self.vocab_size} but {meta_path} says {meta['vocab_size']}")
        sizes = [meta.get(f"num_{split}_tokens") for split in ("train", "val")]
        actual = [(train.parent / f"{split}.bin").stat().st_size // self.dtype.itemsize for split in ("train", "val")]
        return meta if sizes == actual else None

    def tokenizer(self):
        """The folder's tokenizer.json; byte tokens when there is none and the ids fit them; else None (unknown)."""
        folder = Path(self.path).expanduser()
        if self.val_path is None and (folder / TOKENIZER_FILE).is_file():
            from .bpe import tokenizer_in

            try:
                return tokenizer_in(folder)
            except (OSError, ValueError, ImportError) as e:
                raise DataError(f"data.path={folder / TOKENIZER_FILE}: {first_line(e)}") from None
        return ByteTokenizer() if self.vocab_size == VOCAB_SIZE else None

    def files(self) -> tuple[Path, Path]:
        """The checked (train, val) paths."""
        self.check()
        (_, train), (_, val) = self._resolve()
        return train, val

    def describe(self) -> dict:
        """Base description plus dtype."""
        return {**super().describe(), "dtype": self.dtype_name}
