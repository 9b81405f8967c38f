"""The embedded default SFT set: documented functions of the Python standard library as prompt -> completion pairs."""

from __future__ import annotations

import ast
import gc
import hashlib
import json
import logging
import time
from collections.abc import Iterable
from pathlib import Path

from ..cache import cached
from ..corpus import holdout, split_value, stdlib_fingerprint, stdlib_root, stdlib_sources

log = logging.getLogger(__name__)

SFT_FORMAT_VERSION = 1
MAX_BODY_LINES = 40  # function bodies of 1..40 lines after the docstring


def _dedent(line: str, indent: int) -> str:
    # at most `indent` leading whitespace characters, so less-indented string contents stay intact
    return line[min(indent, len(line) - len(line.lstrip(" \t"))) :]


def function_pairs(source: str, max_body_lines: int = MAX_BODY_LINES) -> list[dict]:
    """{"prompt", "completion", "line"} per documented top-level function or method of a top-level class.

    prompt is the decorators, `def` line(s) and docstring; completion is the rest of the body (1 to
    max_body_lines lines); both lose the def's indentation, so prompt + completion is its dedented source.
    """
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    tree = ast.parse(source)
    lines = source.split("\n")  # not splitlines(): form feeds and the like do not end lines for ast
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in tree.body if isinstance(n, funcs)]
    nodes += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, funcs)]
    pairs = []
    for fn in sorted(nodes, key=lambda n: n.lineno):
        if len(fn.body) < 2 or ast.get_docstring(fn, clean=False) is None:
            continue
        doc, first = fn.body[0], fn.body[1]
        first_line = min([first.lineno, *(d.lineno for d in getattr(first, "decorator_list", []))])
        num_body = fn.end_lineno - doc.end_lineno
        if first_line <= doc.end_lineno or not 1 <= num_body <= max_body_lines:
            continue  # a statement on the docstring's line, or a body too long
        start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)]) - 1
        text = lambda part, indent=fn.col_offset: "".join(_dedent(line, indent) + "\n" for line in part)
        pairs.append(
            {
                "prompt": text(lines[start : doc.end_lineno]),
                "completion": text(lines[doc.end_lineno : fn.end_lineno]),
                "line": fn.lineno,
            }
        )
    return pairs


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def pystdlib_sft(cache_dir: str | Path, val_fraction: float = 0.05, *, root: str | Path | None = None) -> Path:
    """Directory with train.jsonl/val.jsonl/meta.json of stdlib function pairs, built once per fingerprint.

    Split by file (a hash of its relative path), so validation functions come from files never trained on.
    """
    root = stdlib_root(root)
    sources = stdlib_sources(root)
    base = stdlib_fingerprint(sources, root, val_fraction)
    fingerprint = hashlib.sha256(f"sft{SFT_FORMAT_VERSION}\n{MAX_BODY_LINES}\n{base}".encode()).hexdigest()
    build = lambda folder: _write_set(folder, sources, root, val_fraction, fingerprint)
    return cached(cache_dir, "sft-pystdlib", fingerprint, build)


def _write_set(folder: Path, sources: list[Path], root: Path, val_fraction: float, fingerprint: str) -> None:
    """Extract the pairs of every source file and write them, split by file, into folder; meta.json last."""
    started = time.perf_counter()
    by_file, skipped = [], 0
    gc_was_enabled = gc.isenabled()
    gc.disable()  # ASTs are millions of small objects freed by refcounting; cycle scans would double the time
    try:
        for p in sources:
            rel = p.relative_to(root).as_posix()
            try:
                pairs = function_pairs(p.read_bytes().decode("utf-8"))
            except (SyntaxError, ValueError):  # not UTF-8, or not this Python's syntax
                skipped += 1
                continue
            if pairs:
                by_file.append([{**pr, "source": f"{rel}:{pr.pop('line')}"} for pr in pairs])
    finally:
        if gc_was_enabled:
            gc.enable()
    train_files, val_files = holdout([split_value(f[0]["source"].rsplit(":", 1)[0]) for f in by_file], val_fraction)
    train = [p for i in train_files for p in by_file[i]]
    val = [p for i in val_files for p in by_file[i]]
    # template tokens: role + end per turn, plus endoftext
    tokens = lambda ps: sum(len(p["prompt"].encode()) + len(p["completion"].encode()) + 5 for p in ps)
    meta = {
        "format_version": SFT_FORMAT_VERSION,
        "root": str(root),
        "num_files": len(by_file),
        "num_skipped_files": skipped,
        "num_train_pairs": len(train),
        "num_val_pairs": len(val),
        "num_train_tokens": tokens(train),
        "num_val_tokens": tokens(val),
        "val_fraction": val_fraction,
        "build_seconds": round(time.perf_counter() - started, 2),
        "sources": fingerprint,
    }
    _write_jsonl(folder / "train.jsonl", train)
    _write_jsonl(folder / "val.jsonl", val)
    _write_jsonl(folder / "meta.json", [meta])
    log.info(
        f"built the stdlib SFT set: {len(train) + len(val):,} pairs from {len(by_file)} files, "
        f"{meta['num_train_tokens'] + meta['num_val_tokens']:,} tokens, in {meta['build_seconds']}s"
    )
