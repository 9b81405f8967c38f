"""The reference side of bench_loop.py: the same GPT, batches, AdamW and schedule in a plain PyTorch loop.

Run as its own process so that its startup time and peak RSS can be compared with a framework run.
It imports only torch, numpy and exp.model (which imports only torch), never Hydra, MLflow or exp.run,
and writes what it measured as JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

# The repository root, so that exp.model imports without the project being installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from exp.model import GPT  # noqa: E402


def parse_args() -> argparse.Namespace:
    """Command line: everything the parent resolved from the framework's composed config."""
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--train-bin", required=True, help="uint16 token file the framework trains on")
    p.add_argument("--val-bin", required=True, help="uint16 token file the framework evaluates on")
    p.add_argument("--model", required=True, help="GPT keyword arguments as JSON (the resolved model group)")
    p.add_argument("--batch-size", type=int, required=True)
    p.add_argument("--num-steps", type=int, required=True)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--betas", type=float, nargs=2, required=True)
    p.add_argument("--eps", type=float, required=True)
    p.add_argument("--weight-decay", type=float, required=True)
    p.add_argument("--warmup-steps", type=int, default=0, help="LR warmup length; 0 means use --warmup-ratio")
    p.add_argument("--warmup-ratio", type=float, required=True)
    p.add_argument("--lr-decay-ratio", type=float, required=True)
    p.add_argument("--max-grad-norm", type=float, required=True)
    p.add_argument("--log-every", type=int, required=True, help="interval over which mean losses are recorded")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="where to write the measurements (JSON)")
    return p.parse_args()


def cosine_lambda(num_steps: int, warmup_steps: int, warmup_ratio: float, end: float):
    """Linear warmup then half-cosine to `end` at the last step: the shape of the default scheduler=cosine."""
    w = warmup_steps if warmup_steps > 0 else round(warmup_ratio * num_steps)
    span = max(1, num_steps - 1 - w)

    def lr_lambda(i: int) -> float:
        if i < w:
            return (i + 1) / w
        p = min(max((i - w) / span, 0.0), 1.0)
        return end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * p))

    return lr_lambda


def windows(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, y) int64 batches of the windows starting at `starts`."""
    win = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)]).astype(np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


class BareLoop:
    """The plain loop: AdamW over decay / no-decay groups, warmup-cosine LambdaLR, clipping, the loss read
    every step. `run(steps)` trains that many steps and returns the time each one ended."""

    def __init__(
        self, model, tokens: np.ndarray, *, batch_size: int, num_steps: int, lr: float, betas, eps: float,
        weight_decay: float, warmup_steps: int, warmup_ratio: float, lr_decay_ratio: float, max_grad_norm: float,
        seed: int,
    ):  # fmt: skip
        self.model, self.tokens, self.batch_size, self.max_grad_norm = model, tokens, batch_size, max_grad_norm
        decay = [p for p in model.parameters() if p.ndim >= 2]
        no_decay = [p for p in model.parameters() if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.optimizer = torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), eps=eps)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, cosine_lambda(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
        )
        # Same generator and seeding as the framework's sampler, so both sides see the same windows.
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0])))
        self.seq_len = model.seq_len
        self.max_start = len(tokens) - self.seq_len - 1
        self.losses: list[float] = []

    def run(self, steps: int) -> list[float]:
        step_ends = []
        for _ in range(steps):
            starts = self.rng.integers(0, self.max_start, size=self.batch_size, endpoint=True)
            x, y = windows(self.tokens, starts, self.seq_len)
            self.optimizer.zero_grad(set_to_none=True)
            _, loss = self.model(x, y)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            self.losses.append(loss.item())  # read every step, as the framework does to stop on a NaN at once
            self.optimizer.step()
            self.scheduler.step()
            step_ends.append(time.perf_counter())
        return step_ends


def main() -> None:
    """Train, evaluate once at the end (untimed), and write the measurements."""
    args = parse_args()
    model_kwargs = json.loads(args.model)
    seq_len = int(model_kwargs["seq_len"])

    # The framework seeds torch before building the model, so both sides start from identical weights.
    torch.manual_seed(args.seed)
    train = np.memmap(args.train_bin, dtype=np.uint16, mode="r")
    val = np.memmap(args.val_bin, dtype=np.uint16, mode="r")
    model = GPT(**model_kwargs)
    loop = BareLoop(
        model, train, batch_size=args.batch_size, num_steps=args.num_steps, lr=args.lr, betas=args.betas,
        eps=args.eps, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        warmup_ratio=args.warmup_ratio, lr_decay_ratio=args.lr_decay_ratio, max_grad_norm=args.max_grad_norm,
        seed=args.seed,
    )  # fmt: skip

    start = time.perf_counter()
    step_ends = loop.run(1)
    first_step_time = time.time()
    step_ends += loop.run(args.num_steps - 1)
    losses = loop.losses

    # Stamps, not per-step sums: the time between one step's end and the next step's start counts too.
    bounds = [start, *step_ends]
    step_seconds = [b - a for a, b in zip(bounds[:-1], bounds[1:], strict=True)]

    # One evaluation batch at the end, like the framework's stage.num_eval_batches=1, so peak RSS compares.
    model.eval()
    with torch.no_grad():
        vstarts = np.linspace(0, len(val) - seq_len - 1, args.batch_size).round().astype(np.int64)
        vx, vy = windows(val, vstarts, seq_len)
        _, val_loss = model(vx, vy)

    interval_losses = [
        sum(losses[i : i + args.log_every]) / len(losses[i : i + args.log_every])
        for i in range(0, len(losses), args.log_every)
    ]
    result = {
        "first_step_time": first_step_time,
        "step_seconds": step_seconds,
        "tokens_per_step": args.batch_size * seq_len,
        "interval_losses": interval_losses,
        "val_loss": val_loss.item(),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,  # KiB on Linux
        "num_threads": torch.get_num_threads(),
    }
    with open(args.out, "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
