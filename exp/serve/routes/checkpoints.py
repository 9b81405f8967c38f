"""Checkpoints of a job: listed with their checksums, downloaded as a tar stream or one file at a time. Every file
is opened through open_inside: a regular file inside the run directory, no symlink followed."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Annotated, BinaryIO
from urllib.parse import quote

from fastapi import APIRouter, HTTPException, Query
from fastapi.responses import StreamingResponse

import exp.serve.control as control
from exp.rundir import read_summary
from exp.serve.bodies import CHECKPOINT_ID, ID
from exp.serve.guard import Refused, open_inside, read_inside
from exp.serve.state import ServiceDep

router = APIRouter(tags=["checkpoints"])


@router.get("/api/training/jobs/{job_id}/checkpoints")
def job_checkpoints(job_id: ID, svc: ServiceDep) -> list[dict]:
    """Checkpoints: id (for download), step, bytes, SHA-256 of each file, and which is best."""
    job = svc.job_or_404(job_id)
    found = control.checkpoints(Path(job["run_dir"]), read_summary(job["run_dir"]))
    return [{"id": f"{job_id}-{c['step']}", **c} for c in found]


@router.get("/api/training/checkpoints/{checkpoint_id}/download")
def download(
    checkpoint_id: CHECKPOINT_ID, svc: ServiceDep, file: Annotated[str | None, Query(max_length=300)] = None
) -> StreamingResponse:
    """The checkpoint as a tar stream (manifest.json first: it holds each file's SHA-256), or one `file` of it with
    its SHA-256 in the X-Checksum-SHA256 and Digest headers."""
    job_id, _, step = checkpoint_id.rpartition("-")
    run_dir = Path(svc.job_or_404(job_id)["run_dir"])
    path = control.checkpoint_dir(run_dir, int(step))
    if path is None:
        raise HTTPException(404, f"no checkpoint {checkpoint_id}")
    folder = Path("checkpoints") / path.name
    try:
        manifest_bytes = read_inside(run_dir, folder / control.MANIFEST)
        files = json.loads(manifest_bytes)["files"]
    except (OSError, ValueError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict):
        raise HTTPException(404, f"checkpoint {checkpoint_id} has no readable manifest")
    if file is not None:
        return _one_file(run_dir, folder / file, files.get(file), f"{file!r} is not a file of {checkpoint_id}")
    opened = _open_listed(run_dir, folder, [n for n in files if n != control.MANIFEST])
    headers = {
        "Content-Disposition": f'attachment; filename="{checkpoint_id}.tar"',
        "X-Manifest-SHA256": hashlib.sha256(manifest_bytes).hexdigest(),
        "Content-Length": str(_tar_size([len(manifest_bytes), *(size for _, _, size in opened)])),
    }
    stream = _tar_stream(path.name, manifest_bytes, opened)
    return StreamingResponse(stream, media_type="application/x-tar", headers=headers)


def _tar_header(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = size, 0o644, int(time.time())
    return info.tobuf(format=tarfile.USTAR_FORMAT)


def _tar_size(sizes: list[int]) -> int:
    return sum(512 + s + (-s) % 512 for s in sizes) + 1024


def _tar_stream(folder: str, manifest_bytes: bytes, opened: list[tuple[str, BinaryIO, int]]):
    """An uncompressed tar, written as it is sent: <checkpoint>/manifest.json, then each file it lists."""
    try:
        yield _tar_header(f"{folder}/{control.MANIFEST}", len(manifest_bytes))
        yield manifest_bytes + b"\0" * ((-len(manifest_bytes)) % 512)
        for name, f, size in opened:
            yield _tar_header(f"{folder}/{name}", size)
            yield from _chunks(f, size)
            yield b"\0" * ((-size) % 512)
        yield b"\0" * 1024
    finally:
        for _, f, _ in opened:
            f.close()


def _open_listed(run_dir: Path, folder: Path, names: list[str]) -> list[tuple[str, BinaryIO, int]]:
    """Each listed file that is there, opened now (its size fixed for Content-Length); Refused (404) when one is a
    symlink or no regular file inside the checkpoint."""
    opened = []
    try:
        for name in names:
            try:
                f = open_inside(run_dir, folder / name)
            except OSError:  # missing: left out, as before
                continue
            opened.append((name, f, os.fstat(f.fileno()).st_size))
    except BaseException:
        for _, f, _ in opened:
            f.close()
        raise
    return opened


def _one_file(run_dir: Path, relative: Path, entry, missing: str) -> StreamingResponse:
    """One file a checkpoint's manifest lists, with the manifest's SHA-256 in X-Checksum-SHA256 and Digest."""
    try:
        digest = base64.b64encode(bytes.fromhex(entry["sha256"])).decode()
        f = open_inside(run_dir, relative)
    except (TypeError, KeyError, ValueError, OSError, Refused):
        raise HTTPException(404, missing) from None
    size = os.fstat(f.fileno()).st_size
    headers = {
        "Content-Length": str(size),
        "Content-Disposition": _attachment(relative.name),
        "X-Checksum-SHA256": entry["sha256"],
        "Digest": f"sha-256={digest}",
    }
    return StreamingResponse(_chunks(f, size), media_type="application/octet-stream", headers=headers)


def _chunks(f: BinaryIO, size: int):
    """`size` bytes of an opened file, then closed; zeros for what it lost since it was opened (the SHA-256 tells)."""
    with f:
        left = size
        while left and (chunk := f.read(min(left, 1 << 20))):
            left -= len(chunk)
            yield chunk
        if left:
            yield b"\0" * left


def _attachment(name: str) -> str:
    quoted = quote(name)
    return f'attachment; filename="{name}"' if quoted == name else f"attachment; filename*=utf-8''{quoted}"
