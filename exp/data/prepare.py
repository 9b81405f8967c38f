"""CLI: tokenize text files, folders and JSONL into train.bin/val.bin for data=memmap.

Tokens are bytes (the default), a byte-level BPE trained on the inputs (--tokenizer bpe), or an existing
tokenizer.json (--tokenizer PATH); the BPE ones need `pip install -e '.[hf]'`. Several documents are split
by document; a single one (one text file) by tokens, its tail going to val.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

from . import bpe
from .corpus import write_token_files
from .sft.sources import read_jsonl
from .tokenizer import ByteTokenizer

DEFAULT_EXTS = ".txt,.md,.rst,.py,.jsonl"


class PrepareError(Exception):
    """An input problem, reported as one line naming the file (and line)."""


def _jsonl_docs(path: Path, field: str) -> Iterator[tuple[str, bytes]]:
    for where, obj in read_jsonl(path):  # `file:line: not valid JSON (...)` for a line that is not
        if not isinstance(obj, dict) or field not in obj:
            raise PrepareError(f"{where}: no field {field!r}")
        if not isinstance(obj[field], str):
            raise PrepareError(f"{where}: field {field!r} is {type(obj[field]).__name__}, not a string")
        yield where, obj[field].encode("utf-8")


def iter_documents(inputs: list[str], exts: set[str], field: str) -> Iterator[tuple[str, bytes]]:
    """(name, UTF-8 bytes) per document: one per file, one per JSONL line; names are paths as given."""
    seen: set[Path] = set()
    for arg in inputs:
        root = Path(arg)
        if root.is_dir():
            files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)
        else:
            files = [root]
        for p in files:
            if p.resolve() in seen:  # a file named directly and again inside a folder counts once
                continue
            seen.add(p.resolve())
            if p.suffix.lower() == ".jsonl":
                yield from _jsonl_docs(p, field)
            else:
                yield p.as_posix(), p.read_bytes()


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; returns the exit status (2 on bad input, with nothing written)."""
    ap = argparse.ArgumentParser(prog="python -m exp.data.prepare", description=__doc__)
    ap.add_argument("inputs", nargs="+", metavar="INPUT", help="text file, .jsonl file, or folder")
    ap.add_argument("--out", required=True, help="output directory (train.bin, val.bin, meta.json)")
    ap.add_argument("--val-fraction", type=float, default=0.01, help="share of documents/tokens for val")
    ap.add_argument("--text-field", default="text", help="JSONL field holding the text")
    ap.add_argument("--ext", default=DEFAULT_EXTS, help="comma-separated extensions taken from folders")
    ap.add_argument(
        "--tokenizer",
        default="bytes",
        help="bytes (default), bpe (train a byte-level BPE on the inputs), or a tokenizer.json / folder holding one",
    )
    ap.add_argument("--vocab-size", type=int, default=None, help="BPE vocabulary size (default 8192)")
    args = ap.parse_args(argv)
    exts = {e if e.startswith(".") else f".{e}" for e in args.ext.lower().split(",") if e}
    try:
        for arg in args.inputs:
            if not Path(arg).exists():
                raise PrepareError(f"{arg}: no such file or directory")
        if not 0.0 < args.val_fraction < 0.5:
            raise PrepareError(f"--val-fraction must be in (0, 0.5), got {args.val_fraction}")
        if args.vocab_size is not None and args.tokenizer != "bpe":
            raise PrepareError("--vocab-size only applies to --tokenizer bpe")
        docs = lambda: iter_documents(args.inputs, exts, args.text_field)  # noqa: E731
        if args.tokenizer == "bytes":
            tok = ByteTokenizer()
            meta = write_token_files(((n, tok.encode_bytes(d)) for n, d in docs()), args.out, args.val_fraction)
        else:
            meta = _prepare_hf(args, docs)
    except bpe.MissingTokenizers as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (PrepareError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    train, val = meta["num_train_tokens"], meta["num_val_tokens"]
    if meta["split"] == "tokens":  # one document: its tail is val, so say so rather than "0 val documents"
        split = f"1 document: split by tokens, last {100 * val / (train + val):.3g}% to val"
    else:
        split = f"{meta['num_documents']} documents ({meta['num_val_documents']} val)"
    print(f"prepared {split}: {train} train / {val} val tokens -> {Path(args.out).absolute()}")
    if meta["vocab_size"] != ByteTokenizer.vocab_size:
        print(f"train on it with: data=memmap data.path={args.out} data.vocab_size={meta['vocab_size']} (or more)")
    return 0


def _text(data: bytes) -> str:
    return data.decode("utf-8", errors="replace")  # BPE works on text: invalid UTF-8 bytes become U+FFFD


def _prepare_hf(args: argparse.Namespace, docs) -> dict:
    """--tokenizer bpe (trained on the documents) or PATH (loaded): tokenize, write, save tokenizer.json."""
    if args.tokenizer == "bpe":
        vocab_size = 8192 if args.vocab_size is None else args.vocab_size
        tok = bpe.train_bpe((_text(d) for _, d in docs()), vocab_size)
        json_bytes, kind = tok.to_str().encode("utf-8"), "bpe"
    else:
        if not Path(args.tokenizer).exists():
            raise PrepareError(
                f"--tokenizer {args.tokenizer}: not bytes, bpe, or an existing tokenizer.json (or folder holding one)"
            )
        tok = bpe.load_tokenizer(args.tokenizer)
        json_bytes, kind = bpe.tokenizer_file(args.tokenizer).read_bytes(), "file"
    described = bpe.describe(tok, kind, json_bytes)
    tokens = ((name, bpe.encode(tok, _text(data))) for name, data in docs())
    return write_token_files(
        tokens,
        args.out,
        args.val_fraction,
        vocab_size=described["vocab_size"],
        eot=bpe.eot_id(tok),
        tokenizer=described,
        tokenizer_json=json_bytes,
    )


if __name__ == "__main__":
    sys.exit(main())
