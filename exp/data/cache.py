"""Folders built once and reused: the one build-in-a-temporary-folder-then-publish step, and the cache on top.

The stdlib token corpus and the stdlib SFT set are both `cached(...)`; prepare's output folder is `building(...)`.
"""

from __future__ import annotations

import fcntl
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from exp.rundir import publish_dir

from .protocol import DataError


@contextmanager
def building(final: Path) -> Iterator[Path]:
    """A fresh `<final>.tmp-<pid>` folder to build into: published as `final` (atomically, replacing an old one)
    when the block ends, removed when it raises. A reader never sees a half-built `final`."""
    tmp = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    if tmp.exists():  # left by a crashed earlier process that had our pid
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        publish_dir(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_cache_dir(cache_dir: str) -> None:
    """data.cache_dir must be a directory or not exist yet (it is made on first use)."""
    p = Path(cache_dir).expanduser()
    if p.exists() and not p.is_dir():
        raise DataError(f"data.cache_dir={p} exists and is not a directory")


def has_meta(folder: Path) -> bool:
    """The default completeness test: meta.json, written last, inside the folder that is renamed into place."""
    return (folder / "meta.json").is_file()


def cached(
    cache_dir: str | Path,
    name: str,
    fingerprint: str,
    build: Callable[[Path], object],
    complete: Callable[[Path], bool] = has_meta,
) -> Path:
    """`cache_dir/<name>-<fingerprint[:16]>`, built by `build(tmp_folder)` unless a complete one is there.

    Check and build happen under an exclusive lock on `cache_dir/<name>.lock`: concurrent jobs (threads
    too: flock is per open file) wait, then find the finished folder. The fingerprint holds whatever the
    content depends on (sources, format version, settings), so a change builds a new folder.
    """
    cache_dir = Path(cache_dir).expanduser()
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / f"{name}-{fingerprint[:16]}"
    with open(cache_dir / f"{name}.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if complete(out):
            return out
        for stale in [*cache_dir.glob(f"{out.name}.tmp-*"), *cache_dir.glob(f".{out.name}.trash-*")]:
            shutil.rmtree(stale, ignore_errors=True)  # of crashed builders; we hold the lock
        with building(out) as tmp:
            build(tmp)
        return out
