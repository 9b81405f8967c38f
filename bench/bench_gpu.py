"""The GPU figures in one command (under 5 minutes on one H100): train.py against a bare loop, in the same run.

    python bench/bench_gpu.py            # CUDA: gpt_small and a ~350M GPT, bf16 + torch.compile
    python bench/bench_gpu.py --cpu      # the same code on CPU at toy sizes (float32, no compile): a dry run

For each model: a bare PyTorch loop in this process (exp.model.GPT, fused AdamW, bf16 autocast, torch.compile, random
tokens) and `python train.py` in a subprocess with the same shape, batch and precision (data=pystdlib, tracking off,
no checkpoints). Printed: steady tokens/s, MFU (exp.perf: FLOPs per token x tokens/s / the device's datasheet peak),
peak memory (torch.cuda.max_memory_allocated; the process's RSS on CPU) and time to the first step (the bare loop's
from building its model, train.py's from its launch: interpreter, imports and config included), with train.py's
tokens/s as a ratio of the bare loop's. tests/e2e/test_gpu_bench.py runs the CPU mode.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from exp.model import GPT  # noqa: E402
from exp.model.protocol import flops_per_token  # noqa: E402
from exp.perf import peak_flops  # noqa: E402

# name: (model group or None, overrides of its shape, batch size); the ~350M GPT is gpt_small at GPT-2 medium's shape
MODELS = {
    "cuda": {
        "gpt_small": ("gpt_small", {}, 16),
        "gpt_350m": ("gpt_small", {"n_layer": 24, "n_head": 16, "d_model": 1024}, 8),
    },
    "cpu": {
        "gpt_tiny": ("gpt_tiny", {"seq_len": 64}, 8),
        "gpt_tiny_x2": ("gpt_tiny", {"seq_len": 64, "n_layer": 8}, 8),
    },
}
VOCAB = 264  # train.py's default data (the byte-level stdlib corpus) has this vocabulary


def shape(group: str, overrides: dict) -> dict:
    from omegaconf import OmegaConf

    node = OmegaConf.load(ROOT / "conf" / "model" / f"{group}.yaml")
    kw = {k: node[k] for k in ("seq_len", "n_layer", "n_head", "d_model") if k in node}
    return {**kw, **overrides}


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bare(kw: dict, batch: int, steps: int, device: torch.device, half: bool, compile: bool) -> dict:
    """The bare loop: time to the first step (from building the model), steady tokens/s, peak memory."""
    started = time.perf_counter()
    torch.manual_seed(0)
    model = GPT(vocab_size=VOCAB, **kw).to(device)
    fused = {"fused": True} if device.type == "cuda" else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, **fused)
    stepped = torch.compile(model) if compile else model
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    x = torch.randint(0, 256, (batch, kw["seq_len"]), device=device)
    times = []
    for i in range(steps):
        t0 = time.perf_counter()
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=half):
            _, loss = stepped(x, x)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t0)
        if i == 0:
            first = time.perf_counter() - started
    tokens_per_s = batch * kw["seq_len"] / statistics.median(times[1:])
    dtype = torch.bfloat16 if half else torch.float32
    peak = peak_flops(device, dtype)
    flops = flops_per_token(model, kw["seq_len"])
    mfu = flops * tokens_per_s / peak if peak else None
    return {"tokens_per_s": tokens_per_s, "mfu": mfu, "peak_mb": peak_memory_mb(device), "first_s": first}


def framework(group: str, overrides: dict, batch: int, steps: int, device: str, tmp: Path) -> dict:
    """train.py with the same shape, batch and precision, in a subprocess; its summary and metrics."""
    run_dir = tmp / f"run-{group}-{len(list(tmp.iterdir()))}"
    hardware = ["hardware=gpu"] if device == "cuda" else ["hardware=cpu"]
    args = [
        f"model={group}",
        *[f"model.{k}={v}" for k, v in overrides.items()],
        *hardware,
        f"stage.batch_size_per_gpu={batch}",
        f"stage.num_steps={steps}",
        f"stage.log_every_n_steps={max(1, steps // 4)}",
        "stage.eval_every_n_steps=100000",
        "checkpoint.every_n_steps=100000",  # the final save is outside the steps timed
        "sample.max_new_tokens=0",
        "tracking=none",
        f"hydra.run.dir={run_dir}",
    ]
    launched = time.time()
    proc = subprocess.run([sys.executable, str(ROOT / "train.py"), *args], capture_output=True, text=True, cwd=tmp)
    if proc.returncode != 0:
        raise SystemExit(f"train.py failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    peak_mb = max((r["perf/peak_memory_mb"] for r in rows if "perf/peak_memory_mb" in r), default=None)
    first = summary["first_step_time"] - launched if summary.get("first_step_time") else None  # from the launch
    return {"tokens_per_s": summary["tokens_per_s"], "mfu": summary.get("mfu"), "peak_mb": peak_mb, "first_s": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="toy sizes on CPU: every line but the GPU")
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default: 60 on CUDA, 8 on CPU)")
    args = ap.parse_args()
    kind = "cpu" if args.cpu else "cuda"
    if kind == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here: run with --cpu for the dry run")
    device = torch.device(kind)
    steps = args.steps or (60 if kind == "cuda" else 8)
    half = compile = kind == "cuda"
    name = torch.cuda.get_device_name(device) if kind == "cuda" else "CPU"
    print(f"{name}, {'bf16 + torch.compile' if half else 'float32, eager'}, {steps} steps a run")
    print(f"{'model':12s} {'':10s} {'tokens/s':>10s} {'MFU':>7s} {'peak MB':>9s} {'first step':>11s}")
    with tempfile.TemporaryDirectory() as tmp:
        for label, (group, overrides, batch) in MODELS[kind].items():
            kw = shape(group, overrides)
            ref = bare(kw, batch, steps, device, half, compile)
            ours = framework(group, overrides, batch, steps, kind, Path(tmp))
            for who, r in (("bare loop", ref), ("train.py", ours)):
                mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a"
                peak = f"{r['peak_mb']:,.0f}" if r["peak_mb"] is not None else "n/a"
                first = f"{r['first_s']:.1f} s" if r["first_s"] is not None else "n/a"
                print(f"{label:12s} {who:10s} {r['tokens_per_s']:10,.0f} {mfu:>7s} {peak:>9s} {first:>11s}")
            print(f"{'':12s} {'ratio':10s} {ours['tokens_per_s'] / ref['tokens_per_s']:10.3f}")


if __name__ == "__main__":
    main()
