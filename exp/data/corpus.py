"""Token corpora on disk: an atomic train/val writer, deterministic splits, and the cached Python-stdlib corpus."""

from __future__ import annotations

import hashlib
import json
import math
import os
import sys
import sysconfig
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np

from .cache import building, cached
from .protocol import DataError
from .tokenizer import EOT, VOCAB_SIZE, ByteTokenizer

FORMAT_VERSION = 1
# Directories skipped under the stdlib root: third-party packages, and test suites / IDLE, whose
# fixtures and data files would make the corpus less like ordinary library code.
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"})
# Val gets at least this many tokens (unless that is over half the corpus), so a long eval window fits.
MIN_VAL_TOKENS = 4097

TokenLike = bytes | Sequence[int] | np.ndarray


def stdlib_root(root: str | Path | None = None) -> Path:
    """root, or this interpreter's standard library folder."""
    return Path(root if root is not None else sysconfig.get_paths()["stdlib"])


def stdlib_sources(root: Path) -> list[Path]:
    """Sorted .py files under root, minus EXCLUDED_DIRS; FileNotFoundError if there are none."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if d not in EXCLUDED_DIRS]
        found.extend(Path(dirpath, f) for f in filenames if f.endswith(".py"))
    if not found:
        raise FileNotFoundError(f"no .py sources under {root}")
    return sorted(found)


def split_value(name: str) -> float:
    """Deterministic value in [0, 1) from a document name; below val_fraction means validation."""
    return int.from_bytes(hashlib.sha256(name.encode("utf-8")).digest()[:8], "big") / 2**64


def check_val_fraction(val_fraction: float) -> float:
    """data.val_fraction as a float; DataError unless it lies in (0, 0.5)."""
    if not 0.0 < float(val_fraction) < 0.5:
        raise DataError(f"data.val_fraction must be in (0, 0.5), got {val_fraction}")
    return float(val_fraction)


def holdout(keys: Sequence[float] | np.ndarray, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) indices by key < fraction; each side keeps at least one: with no key below fraction the
    smallest goes to val, with every key below it the largest stays in train (the last of equal ones)."""
    keys = np.asarray(keys, dtype=np.float64)
    if len(keys) < 2:
        raise ValueError(f"need at least 2 records to hold out validation ones, got {len(keys)}")
    val = keys < fraction
    if not val.any():
        val[np.argmin(keys)] = True
    if val.all():
        val[len(keys) - 1 - np.argmax(keys[::-1])] = False
    return np.flatnonzero(~val), np.flatnonzero(val)


def token_dtype(vocab_size: int) -> str:
    """The token files' dtype for a vocabulary: "uint16" while every id fits in it, else "uint32"."""
    if not 0 < vocab_size <= 2**32:
        raise ValueError(f"vocab_size {vocab_size} must be in [1, 2**32]")
    return "uint16" if vocab_size <= 2**16 else "uint32"


_LE = {"uint16": "<u2", "uint32": "<u4"}


def byte_tokenizer_meta() -> dict:
    """meta.json's "tokenizer" entry for byte tokens (there is no tokenizer.json to fingerprint)."""
    specials = dict(ByteTokenizer.specials)
    return {"kind": "bytes", "vocab_size": VOCAB_SIZE, "special_tokens": specials, "fingerprint": None}


def _as_tokens(doc: TokenLike, vocab_size: int, le: str = "<u2") -> np.ndarray:
    if isinstance(doc, bytes | bytearray | memoryview):
        return np.frombuffer(doc, dtype=np.uint8).astype(le)
    arr = np.asarray(doc)
    if arr.ndim != 1 or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise ValueError(f"a document must be bytes or a 1-D integer sequence, got {arr.dtype} {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= vocab_size):
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got [{arr.min()}, {arr.max()}]")
    return arr.astype(le)


def _check_writable_target(out_dir: Path) -> None:
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "meta.json").exists())):
        raise FileExistsError(f"{out_dir} exists and is not a token corpus; refusing to replace it")


def _split_tail(tmp: Path, name: str, num_val: int, le: str = "<u2") -> tuple[int, int]:
    """Rewrite the one document in tmp/name as train.bin (its head) and val.bin (its last num_val tokens)."""
    src = np.memmap(tmp / name, dtype=le, mode="r")
    cut = len(src) - max(1, min(num_val, len(src) - 1))  # each side keeps a token
    with open(tmp / "train.new", "wb") as ftrain, open(tmp / "val.new", "wb") as fval:
        ftrain.write(src[:cut])  # memmap slices go to the file without a copy
        fval.write(src[cut:])
    total = len(src)
    del src
    os.replace(tmp / "train.new", tmp / "train.bin")
    os.replace(tmp / "val.new", tmp / "val.bin")
    return cut, total - cut


INDEX = "train.idx"  # the writer's temporary index of train documents
INDEX_DTYPE = np.dtype([("key", "<f8"), ("offset", "<i8"), ("length", "<i8")])
INDEX_FLUSH = 1 << 16  # index rows buffered before they go to disk
COPY_CHUNK = 16 << 20  # bytes per read when train.bin is rewritten


def _docs_to_move(
    index: np.ndarray, val_fraction: float, target: int, num_val: int, num_val_docs: int, num_train: int
) -> np.ndarray:
    """Rows of the train index that move to val, in index order: the smallest split values first (ties by
    position) until val holds target tokens and a document, train keeping at least one.

    Only rows with a split value below a bound are gathered and sorted; the bound widens until they suffice,
    so memory follows the documents that move, not the corpus.
    """
    n = len(index)
    share = min(1.0, 2 * max(target - num_val, 1) / max(num_train, 1) + 64 / n)
    while True:
        bound = val_fraction + share * (1.0 - val_fraction) if share < 1.0 else math.inf
        rows = np.concatenate(
            [np.flatnonzero(index["key"][i : i + INDEX_FLUSH] < bound) + i for i in range(0, n, INDEX_FLUSH)]
        )
        rows = rows[np.argsort(index["key"][rows], kind="stable")]
        taken, got_val, got_docs = 0, num_val, num_val_docs
        for length in index["length"][rows]:
            if (got_docs and got_val >= target) or taken == n - 1:
                return np.sort(rows[:taken])
            taken, got_val, got_docs = taken + 1, got_val + int(length), got_docs + 1
        if (got_docs and got_val >= target) or taken == n - 1 or bound == math.inf:
            return np.sort(rows[:taken])
        share *= 4


def _copy_range(src: int, dst: int, start: int, stop: int) -> None:
    """Bytes [start, stop) of file descriptor src appended at dst's position, in the kernel where it can."""
    while start < stop:
        try:
            n = os.copy_file_range(src, dst, stop - start, start)
        except OSError:  # a filesystem or kernel without it
            n = os.write(dst, os.pread(src, min(COPY_CHUNK, stop - start), start))
        if n == 0:
            raise OSError(f"unexpected end of file at byte {start} of {stop}")
        start += n


def _move_to_val(tmp: Path, moved: np.ndarray, itemsize: int) -> None:
    """Rewrite tmp/train.bin without the moved (offset, length) documents, appending them to val.bin in order."""
    with open(tmp / "train.bin", "rb", buffering=0) as src, open(tmp / "train.new", "wb", buffering=0) as ftrain:
        with open(tmp / "val.bin", "r+b", buffering=0) as fval:  # not "ab": copy_file_range refuses O_APPEND
            fval.seek(0, os.SEEK_END)
            pos = 0
            for off, n in zip(moved["offset"].tolist(), moved["length"].tolist(), strict=True):
                _copy_range(src.fileno(), ftrain.fileno(), pos * itemsize, off * itemsize)
                _copy_range(src.fileno(), fval.fileno(), off * itemsize, (off + n) * itemsize)
                pos = off + n
        _copy_range(src.fileno(), ftrain.fileno(), pos * itemsize, os.fstat(src.fileno()).st_size)
    os.replace(tmp / "train.new", tmp / "train.bin")


def write_token_files(
    docs: Iterable[tuple[str, TokenLike]],
    out_dir: str | Path,
    val_fraction: float,
    *,
    tokenizer_json: bytes | None = None,
    **options,
) -> dict:
    """Write (name, tokens) documents, each followed by EOT, to train.bin/val.bin/meta.json atomically.

    Split is per document: split_value(name) < val_fraction goes to val; then, while val holds fewer
    than max(val_fraction * all tokens, min(min_val_tokens, half the tokens)), train documents move
    over in split_value order (train keeps at least one), so val is never empty. A single document
    is split by tokens instead: the last that many tokens go to val (meta "split": "tokens").
    Everything is built in `<out_dir>.tmp-<pid>` and renamed into place; returns the meta dict,
    which records the largest token id so readers can trust it instead of scanning the files.
    Files hold uint16 while vocab_size fits it, else uint32 (meta "dtype"); `eot` separates documents,
    `tokenizer` is meta's description of the tokenizer (byte tokens when None): `options` are
    write_token_dir's. `tokenizer_json`, if given, is written alongside as tokenizer.json.
    """
    out_dir = Path(out_dir).expanduser().absolute()
    _check_writable_target(out_dir)
    with building(out_dir) as tmp:
        meta = write_token_dir(tmp, docs, val_fraction, **options)  # sources, min_val_tokens, vocab_size, ...
        if tokenizer_json is not None:
            (tmp / "tokenizer.json").write_bytes(tokenizer_json)
        _check_writable_target(out_dir)  # it may have appeared while we were writing
    return meta


def write_token_dir(
    tmp: Path,
    docs: Iterable[tuple[str, TokenLike]],
    val_fraction: float,
    *,
    sources: str | None = None,
    min_val_tokens: int = MIN_VAL_TOKENS,
    vocab_size: int = VOCAB_SIZE,
    eot: int = EOT,
    tokenizer: dict | None = None,
) -> dict:
    """write_token_files' content, written into the empty folder tmp (which the caller publishes)."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    dtype = token_dtype(vocab_size)
    le = _LE[dtype]
    itemsize = np.dtype(le).itemsize
    if not 0 <= eot < vocab_size:
        raise ValueError(f"end-of-text id {eot} outside the vocabulary [0, {vocab_size})")
    max_id = eot
    eot = np.array([eot], dtype=le).tobytes()
    content = hashlib.sha256()
    num_val = num_val_docs = num_train = num_train_docs = 0
    # (split value, offset, length) of each train document, kept on disk so memory stays flat in corpus size
    index: list[tuple[float, int, int]] = []
    with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval, open(tmp / INDEX, "wb") as fidx:
        for name, doc in docs:
            arr = _as_tokens(doc, vocab_size, le)
            if not arr.size:
                continue  # empty documents would only add lone EOTs
            max_id = max(max_id, int(arr.max()))
            content.update(name.encode("utf-8") + b"\0")
            content.update(arr)  # the same digest as hashing name, NUL and tokens joined, without the copy
            n, key = arr.size + 1, split_value(name)
            out = fval if key < val_fraction else ftrain
            out.write(arr)
            out.write(eot)
            if key < val_fraction:
                num_val, num_val_docs = num_val + n, num_val_docs + 1
            else:
                index.append((key, num_train, n))
                num_train, num_train_docs = num_train + n, num_train_docs + 1
                if len(index) >= INDEX_FLUSH:
                    np.array(index, dtype=INDEX_DTYPE).tofile(fidx)
                    index.clear()
        np.array(index, dtype=INDEX_DTYPE).tofile(fidx)
    num_docs = num_train_docs + num_val_docs
    if num_docs == 0:
        raise ValueError("no non-empty documents to write")
    # hash split alone gives val_fraction of the *documents*; top up to that share of the tokens,
    # and to min_val_tokens unless that would take more than half of a small corpus
    total = num_train + num_val
    target = max(math.ceil(val_fraction * total), min(min_val_tokens, total // 2))
    if num_docs == 1:  # one file (tiny Shakespeare): nothing to split by document, so split its tokens
        num_train, num_val = _split_tail(tmp, "val.bin" if num_val_docs else "train.bin", target, le)
        num_val_docs = 0
    elif num_train_docs:
        train_index = np.memmap(tmp / INDEX, dtype=INDEX_DTYPE, mode="r", shape=(num_train_docs,))
        moved = _docs_to_move(train_index, val_fraction, target, num_val, num_val_docs, num_train)
        if len(moved):
            _move_to_val(tmp, train_index[moved], itemsize)
            num_val, num_val_docs = num_val + int(train_index["length"][moved].sum()), num_val_docs + len(moved)
            num_train -= int(train_index["length"][moved].sum())
        del train_index
    (tmp / INDEX).unlink()
    meta = {
        "format_version": FORMAT_VERSION,
        "tokenizer": tokenizer if tokenizer is not None else byte_tokenizer_meta(),
        "vocab_size": vocab_size,
        "dtype": dtype,
        "num_train_tokens": num_train,
        "num_val_tokens": num_val,
        "num_documents": num_docs,
        "num_val_documents": num_val_docs,
        "split": "tokens" if num_docs == 1 else "documents",
        "max_token_id": max_id,
        "val_fraction": val_fraction,
        "sources": sources or f"sha256:{content.hexdigest()}",
    }
    (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta


def is_complete(corpus_dir: Path) -> bool:
    """True if corpus_dir has meta.json and bin files whose sizes match it."""
    try:
        meta = json.loads((corpus_dir / "meta.json").read_text())
        size = np.dtype(meta.get("dtype", "uint16")).itemsize
        return (corpus_dir / "train.bin").stat().st_size == size * meta["num_train_tokens"] and (
            corpus_dir / "val.bin"
        ).stat().st_size == size * meta["num_val_tokens"]
    except (OSError, ValueError, KeyError, TypeError):
        return False


def stdlib_fingerprint(sources: list[Path], root: Path, val_fraction: float) -> str:
    """sha256 over Python version, format version, val_fraction and (relative path, size, mtime_ns)."""
    h = hashlib.sha256(f"{FORMAT_VERSION}\n{sys.version}\n{val_fraction!r}\n".encode())
    for p in sources:
        st = p.stat()
        h.update(f"{p.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def pystdlib_corpus(cache_dir: str | Path, val_fraction: float = 0.005, *, root: str | Path | None = None) -> Path:
    """Directory with train.bin/val.bin of the stdlib sources (or root's), built once per fingerprint."""
    root = stdlib_root(root)
    sources = stdlib_sources(root)
    fingerprint = stdlib_fingerprint(sources, root, val_fraction)
    docs = ((p.relative_to(root).as_posix(), p.read_bytes()) for p in sources)
    build = lambda tmp: write_token_dir(tmp, docs, val_fraction, sources=fingerprint)
    return cached(cache_dir, "pystdlib", fingerprint, build, complete=is_complete)
