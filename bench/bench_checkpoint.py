"""Checkpoint save/load throughput against a raw write/read of the same bytes, measured in one run.

    python bench/bench_checkpoint.py [--d-model 512] [--n-layer 8] [--repeats 3]

Save = exp.checkpoint.save_checkpoint (safetensors + JSON, SHA-256 manifest, fsync, atomic rename);
raw = one file of the same total size written with fsync. Load = exp.checkpoint.load_checkpoint
(verifies every checksum first) into a model and optimizer; raw = reading those bytes back.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from exp.checkpoint import load_checkpoint, save_checkpoint
from exp.model import GPT
from exp.schedules import cosine


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def raw_write(path: Path, num_bytes: int) -> float:
    data = os.urandom(1 << 20) * (num_bytes >> 20) + os.urandom(num_bytes & ((1 << 20) - 1))
    started = time.perf_counter()
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return time.perf_counter() - started


def raw_read(path: Path) -> float:
    started = time.perf_counter()
    with open(path, "rb") as f:
        while f.read(1 << 24):
            pass
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--n-layer", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    model = GPT(vocab_size=264, seq_len=256, n_layer=args.n_layer, n_head=8, d_model=args.d_model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = cosine(optimizer, num_steps=100)
    model(torch.zeros(1, 8, dtype=torch.long))[0].sum().backward()
    optimizer.step()  # optimizer state exists, as in any real checkpoint

    rows = {"save": [], "raw write": [], "load": [], "raw read": []}
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        root = Path(tmp)
        for i in range(args.repeats):
            started = time.perf_counter()
            path = save_checkpoint(
                root,
                i,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                trainer_state={"step": i},
                config_yaml="model: {}\n",
            )
            rows["save"].append(time.perf_counter() - started)
            size = folder_bytes(path)
            rows["raw write"].append(raw_write(root / f"raw_{i}.bin", size))
            started = time.perf_counter()
            load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
            rows["load"].append(time.perf_counter() - started)
            rows["raw read"].append(raw_read(root / f"raw_{i}.bin"))
    mb = size / 2**20
    print(
        f"checkpoint of {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters + AdamW state: "
        f"{mb:.0f} MiB, median of {args.repeats}"
    )
    for name, times in rows.items():
        median = statistics.median(times)
        print(f"  {name:<10} {median:6.2f} s  {mb / median:7.0f} MiB/s")
    print(
        f"  save / raw write: {statistics.median(rows['raw write']) / statistics.median(rows['save']):.2f} of raw "
        f"speed; load / raw read: {statistics.median(rows['raw read']) / statistics.median(rows['load']):.2f}"
    )


if __name__ == "__main__":
    main()
