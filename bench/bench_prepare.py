"""prepare throughput: exp's BPE path against Hugging Face tokenizers' own batch encoding, and the byte path
against a raw file copy, at 1x and 4x a corpus size, measured in one run.

    python bench/bench_prepare.py [--size-mb 16] [--rounds 1] [--workers N]

The corpus is this interpreter's standard-library .py sources, repeated under new names until it holds
--size-mb MB, written to a temporary folder; the 4x corpus is four copies of it. A tokenizer.json (byte-level BPE,
8192 ids) is trained once on a 2 MB sample beforehand. Each exp run is `python -m exp.data.prepare` in a
fresh process that reports its own time (imports excluded) and peak RSS (imports included). The raw
tokenizer runs here: it encodes the same files in the same batches with `encode_batch` (offsets and all, as a
user would call it) and with `encode_batch_fast` (ids only, what prepare calls), files read outside the timed
part. The raw copy reads every file and appends it to one output file. MB are of input text, 1e6 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from functools import partial
from pathlib import Path

from exp.data import bpe
from exp.data.corpus import stdlib_sources
from exp.data.prepare import BATCH_BYTES, BATCH_DOCS

CHILD = """
import json, sys, time
from exp.data.prepare import main
t = time.perf_counter()
rc = main(sys.argv[1:] + ["--quiet"])
seconds = time.perf_counter() - t
# VmHWM, not ru_maxrss: Linux folds the parent's peak into ru_maxrss when a vforked child execs
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
peak_rss_mb = int(status["VmHWM"].split()[0]) / 1024
print(json.dumps({"rc": rc, "seconds": seconds, "peak_rss_mb": peak_rss_mb}))
"""


def write_corpus(folder: Path, size_mb: float) -> tuple[list[Path], int]:
    """Stdlib sources copied into folder (rep<i>/<path>) until they hold size_mb MB; (files, bytes)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    sources = stdlib_sources(root)
    files, total, rep = [], 0, 0
    while total < size_mb * 1e6:
        for src in sources:
            dst = folder / f"rep{rep}" / src.relative_to(root)
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            files.append(dst)
            total += dst.stat().st_size
            if total >= size_mb * 1e6:
                break
        rep += 1
    return files, total


def run_prepare(folder: Path, out: Path, *args: str) -> dict:
    """One `exp.data.prepare` in a fresh process; its own seconds (imports excluded) and peak RSS."""
    shutil.rmtree(out, ignore_errors=True)
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(folder), "--out", str(out), "--ext", ".py", *args],
        capture_output=True,
        text=True,
        check=True,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    shutil.rmtree(out)
    return result


def raw_encode(tok, files: list[Path], method: str) -> float:
    """Seconds of tok.<method>(batch) over the files, batched as prepare batches them; reading not timed."""
    encode = getattr(tok, method)
    tok.encode_special_tokens = True  # as prepare encodes: special-token strings stay text
    seconds, batch, size = 0.0, [], 0

    def flush() -> float:
        t = time.perf_counter()
        encode(batch, add_special_tokens=False)
        return time.perf_counter() - t

    for f in files:
        text = f.read_bytes().decode("utf-8", errors="replace")
        batch.append(text)
        size += len(text)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            seconds += flush()
            batch, size = [], 0
    if batch:
        seconds += flush()
    return seconds


def raw_copy(files: list[Path], out: Path) -> float:
    t = time.perf_counter()
    with open(out, "wb") as dst:
        for f in files:
            with open(f, "rb") as src:
                shutil.copyfileobj(src, dst, 1 << 20)
    seconds = time.perf_counter() - t
    out.unlink()
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-mb", type=float, default=16, help="the 1x corpus size; 4x is also measured")
    ap.add_argument("--rounds", type=int, default=1, help="interleaved repeats; medians are reported")
    ap.add_argument("--workers", type=int, default=None, help="prepare --workers (default: all cores)")
    args = ap.parse_args()
    workers = ["--workers", str(args.workers)] if args.workers else []
    if args.workers:
        os.environ["RAYON_NUM_THREADS"] = str(args.workers)  # the raw tokenizer gets the same threads
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        tmp = Path(tmp)
        sample, _ = write_corpus(tmp / "sample", 2)
        tok = bpe.train_bpe((f.read_text(errors="replace") for f in sample), 8192)
        tok.save(str(tmp / "tokenizer.json"))
        files, total = write_corpus(tmp / "x1", args.size_mb)
        corpora = {1: (files, total), 4: ([], 4 * total)}
        for i in range(4):  # 4x is 1x four times over: the same documents, so only the size changes
            shutil.copytree(tmp / "x1", tmp / "x4" / f"copy{i}")
            corpora[4][0].extend(tmp / "x4" / f"copy{i}" / f.relative_to(tmp / "x1") for f in files)
        for scale, (files, total) in corpora.items():
            print(f"{scale}x corpus: {len(files)} files, {total / 1e6:.1f} MB", flush=True)
        results: dict[tuple[int, str], list[float]] = {}
        rss: dict[tuple[int, str], list[float]] = {}
        for r in range(args.rounds):
            for scale, (files, total) in corpora.items():
                folder, mb = tmp / f"x{scale}", total / 1e6
                bpe_args = ("--tokenizer", str(tmp / "tokenizer.json"), *workers)
                runs = {
                    "exp bpe": partial(run_prepare, folder, tmp / "out", *bpe_args),
                    "encode_batch": partial(raw_encode, tok, files, "encode_batch"),
                    "encode_batch_fast": partial(raw_encode, tok, files, "encode_batch_fast"),
                    "exp bytes": partial(run_prepare, folder, tmp / "out"),
                    "raw copy": partial(raw_copy, files, tmp / "copy.bin"),
                }
                for name, run in runs.items():
                    got = run()
                    if isinstance(got, dict):
                        rss.setdefault((scale, name), []).append(got["peak_rss_mb"])
                        got = got["seconds"]
                    results.setdefault((scale, name), []).append(mb / got)
                    print(f"round {r + 1} {scale}x {name}: {mb / got:.2f} MB/s", flush=True)
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"\nmedians of {args.rounds} round(s), 1x = {corpora[1][1] / 1e6:.1f} MB, {os.cpu_count()} cores")
    print("| | 1x MB/s | 4x MB/s | 4x/1x | peak RSS 1x / 4x |")
    print("|---|---|---|---|---|")
    for name in ("exp bpe", "encode_batch", "encode_batch_fast", "exp bytes", "raw copy"):
        a, b = med[(1, name)], med[(4, name)]
        mem = (
            f"{statistics.median(rss[(1, name)]):.0f} / {statistics.median(rss[(4, name)]):.0f} MB"
            if (1, name) in rss
            else ""
        )
        print(f"| {name} | {a:.2f} | {b:.2f} | {b / a:.2f} | {mem} |")
    for scale in (1, 4):
        print(
            f"{scale}x: exp bpe / encode_batch {med[(scale, 'exp bpe')] / med[(scale, 'encode_batch')]:.2f}, "
            f"/ encode_batch_fast {med[(scale, 'exp bpe')] / med[(scale, 'encode_batch_fast')]:.2f}; "
            f"exp bytes / raw copy {med[(scale, 'exp bytes')] / med[(scale, 'raw copy')]:.2f}"
        )


if __name__ == "__main__":
    main()
