"""Saves that never stall and loads at disk speed, each against a reference measured in the same run.

    python bench/bench_async_save.py [--model gpt_small] [--steps 6] [--tokens 256]

1. Step time while an asynchronous save runs (the training thread copies the state to host memory, a background
   thread writes, hashes and publishes it) against steady steps (target <= 1.1x), and the time the training thread
   is blocked by a synchronous save (exp.checkpoint.save_checkpoint) against an asynchronous one.
2. A resume's load (verify every SHA-256 once, the files hashed in parallel, then load model and AdamW state)
   against safetensors loading the same tensors plus one plain read of the files (target <= 1.3x).
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from exp.checkpoint import load_checkpoint, save_checkpoint, take_snapshot, verify_checkpoint, write_snapshot
from exp.checkpoint.format import read_optimizer_state
from exp.model import GPT
from exp.paths import CONF_DIR
from exp.schedules import cosine


def build(name: str, tokens: int):
    shape = OmegaConf.load(CONF_DIR / "model" / f"{name}.yaml")
    kw = {k: shape[k] for k in ("n_layer", "n_head", "d_model", "mlp_hidden") if k in shape}
    torch.manual_seed(0)
    model = GPT(vocab_size=50304, seq_len=tokens, **kw)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    return model, optimizer, cosine(optimizer, num_steps=1000)


def step(model, optimizer, scheduler, tokens: int) -> float:
    started = time.perf_counter()
    x = torch.randint(0, 50304, (1, tokens + 1))
    _, loss = model(x[:, :-1], x[:, 1:])
    loss.backward()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return time.perf_counter() - started


def objects(model, optimizer, scheduler, i: int) -> dict:
    return dict(model=model, optimizer=optimizer, scheduler=scheduler, trainer_state={"step": i}, config_yaml="a: 1\n")


def saving(args, root: Path, model, optimizer, scheduler) -> dict:
    steady = [step(model, optimizer, scheduler, args.tokens) for _ in range(args.steps)]
    started = time.perf_counter()
    save_checkpoint(root / "sync", 1, **objects(model, optimizer, scheduler, 1))
    out = {"steady": statistics.median(steady), "sync_blocked": time.perf_counter() - started}
    buffers: dict = {}  # the Checkpointer's host buffers: allocated by the first save, reused by the next
    for save in ("first", "next"):
        started = time.perf_counter()
        snapshot = take_snapshot(2, **objects(model, optimizer, scheduler, 2), into=buffers)
        blocked = time.perf_counter() - started
        writer = threading.Thread(target=write_snapshot, args=(root / f"async_{save}", snapshot))
        started = time.perf_counter()
        writer.start()
        during = []
        while writer.is_alive():
            during.append(step(model, optimizer, scheduler, args.tokens))
        writer.join()
        out[save] = {"blocked": blocked, "during": statistics.mean(during), "steps": len(during)}
        out[save]["written_s"] = time.perf_counter() - started
    out["size"] = sum(p.stat().st_size for p in (root / "sync").rglob("*") if p.is_file())
    return out


def evict(files) -> None:
    """Drop the files from the page cache, so a read comes from the disk (no root needed)."""
    for f in files:
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def loading(root: Path, model, optimizer, scheduler, repeats: int) -> dict:
    path = root / "sync" / "step_00000001"
    files = sorted(p for p in path.iterdir() if p.is_file())
    ours, reference = [], []
    for _ in range(repeats):
        evict(files)
        started = time.perf_counter()
        for f in files:  # the reference: one plain read of every file from the disk ...
            with open(f, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        model.load_state_dict(load_file(str(path / "model.safetensors")), strict=False)  # ... and safetensors' load
        optimizer.load_state_dict(read_optimizer_state(path))
        reference.append(time.perf_counter() - started)
        evict(files)
        started = time.perf_counter()
        verify_checkpoint(path)  # what a resume does: find_resume verifies (the one read), restore loads
        load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, verified=True)
        ours.append(time.perf_counter() - started)
    return {"ours": statistics.median(ours), "reference": statistics.median(reference)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gpt_small")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # a core left for the writer, as a GPU job leaves the host's cores to it
    model, optimizer, scheduler = build(args.model, args.tokens)
    step(model, optimizer, scheduler, args.tokens)  # AdamW state exists, as in any real checkpoint
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        s = saving(args, Path(tmp), model, optimizer, scheduler)
        ld = loading(Path(tmp), model, optimizer, scheduler, args.repeats)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    print(
        f"{args.model}: {params:.1f}M parameters + AdamW state, checkpoint {s['size'] / 2**20:,.0f} MiB, "
        f"{args.tokens} tokens a step, 1 torch thread, {time.strftime('%Y-%m-%d')}"
    )
    print(f"  steady step {s['steady']:.3f} s; training thread blocked by a sync save {s['sync_blocked']:.2f} s")
    for save in ("first", "next"):
        a = s[save]
        print(
            f"  {save} async save: blocked {a['blocked']:.2f} s ({a['blocked'] / s['sync_blocked']:.2f}x of sync); "
            f"written in {a['written_s']:.1f} s while {a['steps']} steps ran at {a['during']:.3f} s: "
            f"{a['during'] / s['steady']:.2f}x steady (target <= 1.10x)"
        )
    print(
        f"  resume load, page cache dropped: {ld['ours']:.2f} s vs safetensors load + one read "
        f"{ld['reference']:.2f} s: {ld['ours'] / ld['reference']:.2f}x (target <= 1.30x)"
    )


if __name__ == "__main__":
    main()
