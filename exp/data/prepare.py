"""CLI: tokenize text files, folders, JSONL and Hugging Face datasets into train.bin/val.bin for data=memmap.

Tokens are bytes (the default), a byte-level BPE trained on the inputs (--tokenizer bpe), or an existing
tokenizer.json (--tokenizer PATH); the BPE ones and hf: inputs need `pip install -e '.[hf]'`. Several documents
are split by document; a single one (one text file) by tokens, its tail going to val.

An INPUT starting with hf: is a Hugging Face dataset, read through `datasets` (--split, --text-field):
  hf:NAME[:CONFIG]    a hub dataset (add --streaming to read it without downloading it whole),
                      or a local folder that datasets.load_dataset reads
  hf:DIR              a folder written by DatasetDict.save_to_disk (--split picks one), or by
                      Dataset.save_to_disk (one split: read whole)
  hf:json:FILES       local files through a datasets builder: json (JSON and JSONL), parquet, csv, text
                      or arrow; FILES is a path or glob, several joined by commas (hf:parquet:data/*.parquet)

  python -m exp.data.prepare hf:allenai/c4:en --streaming --max-docs 100000 --tokenizer bpe --out data/c4
  python -m exp.data.prepare hf:json:'corpus/*.jsonl' --tokenizer data/c4/tokenizer.json --out data/mine

Documents stream through: memory stays flat in corpus size, BPE encodes batches on --workers threads, and
the output folder appears only when complete (Ctrl-C leaves nothing). --tokenizer bpe reads the inputs twice:
once to train, once to encode.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from pathlib import Path
from typing import Any

import numpy as np

from . import bpe, hf
from .corpus import write_token_files
from .sft.sources import read_jsonl
from .tokenizer import ByteTokenizer

DEFAULT_EXTS = ".txt,.md,.rst,.py,.jsonl"
# text per encode batch: enough documents to keep every worker busy, few enough tokens that the batch's
# Encoding objects (ids, offsets, token strings: ~70 bytes a token) stay small; two batches are in flight
BATCH_BYTES = 1 << 20
BATCH_DOCS = 1024
REFRESH_S = 0.5  # seconds between updates of the progress bar's figures

Document = tuple[str, str | bytes]  # (name, text): files give bytes, hf: datasets give str


class PrepareError(Exception):
    """An input problem, reported as one line naming the file (and line)."""


def _jsonl_docs(path: Path, field: str) -> Iterator[tuple[str, bytes]]:
    for where, obj in read_jsonl(path):  # `file:line: not valid JSON (...)` for a line that is not
        if not isinstance(obj, dict) or field not in obj:
            raise PrepareError(f"{where}: no field {field!r}")
        if not isinstance(obj[field], str):
            raise PrepareError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not a string")
        yield where, obj[field].encode("utf-8")


def _files_under(root: Path, exts: set[str]) -> Iterator[Path]:
    """Files under root with one of exts, in sorted(root.rglob("*")) order (by path parts), listed one folder at
    a time so that a folder of millions of files is never held as one list."""
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        p = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _files_under(p, exts)
        elif entry.is_file() and p.suffix.lower() in exts:
            yield p


def iter_documents(
    inputs: list[str],
    exts: set[str],
    field: str,
    split: str = "train",
    streaming: bool = False,
    cache_dir: str | None = None,
) -> Iterator[Document]:
    """(name, text) per document: one per file, JSONL line or dataset row; names are paths or sources as given."""
    # (device, inode) of files that could be met twice: a file named directly and again inside a folder, or a
    # link, counts once; one stat per file (resolve() walks every folder), none kept for most of a single folder
    seen: set[tuple[int, int]] = set()
    for arg in inputs:
        if hf.is_hf(arg):
            yield from hf.texts(arg, split, field, streaming=streaming, cache_dir=cache_dir)
            continue
        root = Path(arg)
        for p in _files_under(root, exts) if root.is_dir() else [root]:
            st = p.stat()
            if (st.st_dev, st.st_ino) in seen:
                continue
            if len(inputs) > 1 or st.st_nlink > 1 or p.is_symlink():
                seen.add((st.st_dev, st.st_ino))
            if p.suffix.lower() == ".jsonl":
                yield from _jsonl_docs(p, field)
            else:
                yield p.as_posix(), p.read_bytes()


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="python -m exp.data.prepare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, .jsonl file, folder, or hf:... dataset")
    ap.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents/tokens for val")
    ap.add_argument("--text-field", default="text", help="JSONL field or dataset column holding the text")
    ap.add_argument("--ext", default=DEFAULT_EXTS, help="comma-separated extensions taken from folders")
    ap.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes (default), bpe (train a byte-level BPE on the inputs), or a tokenizer.json / folder holding one",
    )
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192)")
    ap.add_argument("--split", default="train", help="split of hf: datasets (default train)")
    ap.add_argument(
        "--streaming", action="store_true", help="stream hf: datasets record by record instead of downloading them"
    )
    ap.add_argument("--cache-dir", default=None, help="where datasets keeps hf: downloads (default: its own cache)")
    ap.add_argument("--max-docs", type=int, default=None, help="stop after this many documents (all inputs together)")
    ap.add_argument(
        "--workers", type=int, default=None, help="threads encoding BPE (default: all cores; 1: one document at a time)"
    )
    ap.add_argument("--quiet", action="store_true", help="no progress bar (none either when stderr is not a terminal)")
    return ap


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on bad input, with nothing written)."""
    args = _parser().parse_intermixed_args(argv)  # options may stand between inputs
    exts = {e if e.startswith(".") else f".{e}" for e in args.ext.lower().split(",") if e}
    if args.workers is not None and args.workers >= 1:
        # tokenizers sizes its thread pool once, when a process first encodes a batch
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)
    args.workers = args.workers if args.workers is not None else len(os.sched_getaffinity(0))
    show = not args.quiet and sys.stderr.isatty()
    try:
        _check_args(args)
        if not show and any(hf.is_hf(a) for a in args.inputs):
            hf.datasets_module(next(a for a in args.inputs if hf.is_hf(a))).disable_progress_bars()

        def docs() -> Iterator[Document]:
            it = iter_documents(args.inputs, exts, args.text_field, args.split, args.streaming, args.cache_dir)
            return islice(it, args.max_docs) if args.max_docs is not None else it

        if args.tokenizer == "bytes":
            tok = ByteTokenizer()
            tokens = ((n, tok.encode_bytes(b), len(b)) for n, b in ((n, _bytes(d)) for n, d in docs()))
            meta = write_token_files(_tokens(_progress(tokens, "tokenizing", show)), args.out, args.val_fraction)
        else:
            meta = _prepare_bpe(args, docs, show)
    except KeyboardInterrupt:
        print(f"interrupted: nothing written to {args.out}", file=sys.stderr)
        return 130
    except (PrepareError, hf.HFSourceError, bpe.MissingTokenizers, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val = meta["num_train_tokens"], meta["num_val_tokens"]
    if meta["split"] == "tokens":  # one document: its tail is val, so say so rather than "0 val documents"
        split = f"1 document: split by tokens, last {100 * val / (train + val):.3g}% to val"
    else:
        split = f"{meta['num_documents']} documents ({meta['num_val_documents']} val)"
    print(f"prepared {split}: {train} train / {val} val tokens -> {Path(args.out).absolute()}")
    bpe_note = ""
    if meta["vocab_size"] != ByteTokenizer.vocab_size:
        bpe_note = f"  # its {meta['vocab_size']:,}-token tokenizer.json comes along"
    print(f"train on it with: python train.py data=memmap data.path={args.out}{bpe_note}")
    return 0


def _check_args(args: argparse.Namespace) -> None:
    """Every argument and local input checked, and every hf: source opened, before anything is written."""
    for arg in args.inputs:
        if not hf.is_hf(arg) and not Path(arg).exists():
            raise PrepareError(f"{arg}: no such file or directory")
    if not 0.0 < args.val_fraction < 0.5:
        raise PrepareError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        raise PrepareError("--vocab-size only applies to --tokenizer bpe")
    if args.max_docs is not None and args.max_docs < 1:
        raise PrepareError(f"--max-docs must be at least 1, got {args.max_docs}")
    if args.workers < 1:
        raise PrepareError(f"--workers must be at least 1, got {args.workers}")
    if args.streaming and not any(hf.is_hf(a) for a in args.inputs):
        raise PrepareError("--streaming only applies to hf: inputs")
    for arg in args.inputs:
        if hf.is_hf(arg):  # a missing package, dataset, config, split or field fails here, before any output
            next(hf.texts(arg, args.split, args.text_field, streaming=args.streaming, cache_dir=args.cache_dir), None)


def _bytes(data: str | bytes) -> bytes:
    return data.encode("utf-8") if isinstance(data, str) else data


def _text(data: str | bytes) -> str:
    # BPE works on text: invalid UTF-8 bytes in a file become U+FFFD
    return data if isinstance(data, str) else data.decode("utf-8", errors="replace")


def _size(data: str | bytes) -> int:
    """UTF-8 bytes of a document (for MB/s); isascii is O(1) on CPython strings, so most text costs no encode."""
    return len(data) if isinstance(data, bytes) or data.isascii() else len(data.encode("utf-8"))


def _progress(items: Iterable[tuple[str, Any, int]], what: str, show: bool, count_tokens: bool = True) -> Iterator:
    """items (name, tokens or text, UTF-8 bytes) passed through, drawing documents, tokens and MB/s on stderr;
    the bar stays with the final figures."""
    if not show:
        yield from items
        return
    from tqdm import tqdm

    start = shown = time.perf_counter()
    num_bytes = num_tokens = 0

    def figures() -> str:
        rate = num_bytes / 1e6 / max(time.perf_counter() - start, 1e-9)
        tokens = f"{num_tokens:,} tokens, " if count_tokens else ""
        return f"{tokens}{num_bytes / 1e6:,.1f} MB, {rate:.2f} MB/s"

    with tqdm(desc=what, unit=" docs", file=sys.stderr, dynamic_ncols=True) as bar:
        for item in items:
            num_bytes, num_tokens = num_bytes + item[2], num_tokens + (len(item[1]) if count_tokens else 0)
            bar.update()
            if time.perf_counter() - shown >= REFRESH_S:
                bar.set_postfix_str(figures(), refresh=False)  # drawn at tqdm's next refresh
                shown = time.perf_counter()
            yield item
        bar.set_postfix_str(figures(), refresh=False)


def _tokens(items: Iterable[tuple[str, Any, int]]) -> Iterator[tuple[str, Any]]:
    return ((name, tokens) for name, tokens, _ in items)


def _encode_batch(tok: Any, texts: list[str]) -> list[np.ndarray]:
    """Token ids of each text as uint32 arrays, encoded in parallel by tokenizers (special-token strings stay
    plain text, as in bpe.encode); encode_batch_fast skips the offsets that prepare does not need."""
    tok.encode_special_tokens = True
    try:
        fast = getattr(tok, "encode_batch_fast", tok.encode_batch)  # tokenizers >= 0.20
        encodings = fast(texts, add_special_tokens=False)
    finally:
        tok.encode_special_tokens = False
    encodings.reverse()
    ids = []
    while encodings:  # each Encoding freed as soon as its ids are copied out
        ids.append(np.array(encodings.pop().ids, dtype=np.uint32))
    return ids


def _batches(docs: Iterable[Document]) -> Iterator[list[tuple[str, str, int]]]:
    batch, size = [], 0
    for name, data in docs:
        nbytes = _size(data)
        batch.append((name, _text(data), nbytes))
        size += nbytes
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def encode_documents(tok: Any, docs: Iterable[Document], workers: int) -> Iterator[tuple[str, np.ndarray, int]]:
    """(name, token ids, text size) per document, in order.

    workers > 1: batches go to tokenizers' encode_batch (Rust threads, RAYON_NUM_THREADS=workers set by the
    CLI) on a background thread, so reading and writing overlap encoding; 1: one document at a time. A pool of
    processes each encoding alone was no faster on 2 cores (2.0 against 2.4 MB/s) and pays for pickling.
    """
    if workers == 1:
        for name, data in docs:
            yield name, np.asarray(bpe.encode(tok, _text(data)), dtype=np.uint32), _size(data)
        return
    with ThreadPoolExecutor(1, thread_name_prefix="encode") as pool:
        pending = None
        for batch in _batches(docs):
            job = pool.submit(_encode_batch, tok, [text for _, text, _ in batch])
            if pending is not None:
                yield from _finish(*pending)
            pending = (batch, job)
        if pending is not None:
            yield from _finish(*pending)


def _finish(batch: list[tuple[str, str, int]], job) -> Iterator[tuple[str, np.ndarray, int]]:
    for (name, _, size), ids in zip(batch, job.result(), strict=True):
        yield name, ids, size


def _prepare_bpe(args: argparse.Namespace, docs: Callable[[], Iterator[Document]], show: bool) -> dict:
    """--tokenizer bpe (trained on the documents) or PATH (loaded): tokenize, write, save tokenizer.json."""
    if args.tokenizer == "bpe":
        vocab_size = 8192 if args.vocab_size is None else args.vocab_size
        training = _progress(((n, d, _size(d)) for n, d in docs()), "training BPE", show, count_tokens=False)
        tok = bpe.train_bpe((_text(d) for _, d, _ in training), vocab_size)
        json_bytes, kind = tok.to_str().encode("utf-8"), "bpe"
    else:
        if not Path(args.tokenizer).exists():
            raise PrepareError(
                f"--tokenizer {args.tokenizer}: not bytes, bpe, or an existing tokenizer.json (or folder holding one)"
            )
        tok = bpe.load_tokenizer(args.tokenizer)
        json_bytes, kind = bpe.tokenizer_file(args.tokenizer).read_bytes(), "file"
    described = bpe.describe(tok, kind, json_bytes)
    return write_token_files(
        _tokens(_progress(encode_documents(tok, docs(), args.workers), "tokenizing", show)),
        args.out,
        args.val_fraction,
        vocab_size=described["vocab_size"],
        eot=bpe.eot_id(tok),
        tokenizer=described,
        tokenizer_json=json_bytes,
    )


if __name__ == "__main__":
    sys.exit(main())
