"""What the GPU tests run, written device-agnostic so that tests/unit/test_gpu_helpers.py runs every line on CPU."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import torch

import exp.job
from exp.hardware import Runtime
from exp.loop import Trained, train_step
from exp.model import GPT
from exp.optim import build_optimizer
from exp.rundir import read_metrics
from exp.stages import Pretrain

from ..conftest import TINY, compose_train


def device_overrides(device: str, dtype: str = "float32", compile: bool = False) -> list[str]:
    """hardware=... overrides for a run on `device` (cuda or cpu) in `dtype`."""
    return [
        "hardware=gpu" if device == "cuda" else "hardware=cpu",
        f"hardware.device={device}",
        f"stage.dtype={dtype}",
        f"hardware.compile={str(compile).lower()}",
    ]


def run(run_dir: Path, *overrides: str) -> dict:
    """train.py's job in this process; its summary.json."""
    tiny = [o for o in TINY if not o.startswith("hardware=")]
    try:
        exp.job.run_job(compose_train(*tiny, *overrides, run_dir=run_dir))
    except SystemExit as e:
        if e.code not in (0, None):
            raise
    return json.loads((run_dir / "summary.json").read_text())


def losses(run_dir: Path) -> list[float]:
    return [m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]


def tiny_model(device: str, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(vocab_size=264, seq_len=32, n_layer=2, n_head=2, d_model=64).to(device)


def steps_with_overflow(device: str, dtype: torch.dtype, num_steps: int = 6) -> list[dict]:
    """`num_steps` optimizer steps through exp's train_step with a GradScaler whose first scale overflows in fp16:
    each step's scale, whether the weights moved, and the loss."""
    model = tiny_model(device)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3), model, torch.device(device))
    rt = Runtime(torch.device(device), dtype)
    scaler = torch.amp.GradScaler(device, init_scale=2.0**40, enabled=dtype is torch.float16)
    stage = Pretrain(name="pretrain", num_steps=num_steps, batch_size_per_gpu=4, learning_rate=1e-3)
    t = Trained(stage, model, optimizer, None, rt, scaler)
    gen = torch.Generator().manual_seed(0)
    batches = iter(lambda: (torch.randint(0, 256, (4, 32), generator=gen),) * 2, None)
    out = []
    for _ in range(num_steps):
        before = model.lm_head.weight.detach().clone()
        optimizer.zero_grad(set_to_none=True)
        result = train_step(t.stage, model, optimizer, batches, rt, scaler)
        scale = scaler.get_scale()
        scaler.step(optimizer)
        scaler.update()
        moved = not torch.equal(before, model.lm_head.weight.detach())
        out.append({"scale": scale, "moved": moved, "loss": float(result["loss"])})
    return out


def optimizer_is_fused(device: str) -> bool:
    model = tiny_model(device)
    optimizer = build_optimizer(functools.partial(torch.optim.AdamW, lr=1e-3), model, torch.device(device))
    return bool(optimizer.defaults.get("fused"))


def cached_generation_agrees(device: str) -> bool:
    from exp.model.protocol import sample

    model = tiny_model(device).eval()
    prompt = torch.randint(0, 256, (2, 5), device=device)
    with torch.no_grad():
        return torch.equal(
            model.generate(prompt, 20, temperature=0), sample(model, prompt, 20, temperature=0, seq_len=32)
        )
