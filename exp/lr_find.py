"""The LR range test (`python train.py lr_find=true ...`): train from the configured init with a learning rate
growing exponentially from lr_find.min_lr to max_lr, stop once the smoothed loss diverges, and suggest a
stage.learning_rate. Nothing is checkpointed; the run directory gets lr_find.json, lr_find.png and summary.json.

The suggestion is the learning rate where the (centred average) loss falls fastest against log(lr), before its minimum
(the "steepest" rule of fastai and lr-finder; the minimum's lr / 10 is reported too). Both are heuristics: on
transformers with warmup and decay the best lr of a real run is often several times either (see docs/configuration.md's
comparison). The running and the centred average span at most a tenth of the test (effective_smoothing), so a
short test still sees the fall and the divergence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from exp.loop import Trained, train_step

SPAN = 0.1  # the most of the test's steps an average may span: lr_find.smoothing is raised to 1 / (SPAN * num_steps)


@dataclass
class RangeTest:
    """What the test measured and what it suggests."""

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str  # why it ended
    suggestion: float | None = None
    method: str = ""
    min_loss_lr: float | None = None

    def to_dict(self) -> dict:
        return {
            "suggested_learning_rate": self.suggestion,
            "method": self.method,
            "min_loss_lr": self.min_loss_lr,
            "stopped": self.stopped,
            "lrs": self.lrs,
            "losses": self.losses,
            "smoothed": self.smoothed,
        }


def run_range_test(t: Trained, batches, settings) -> RangeTest:
    """Optimizer steps at exponentially growing learning rates (every group at its lr_mult times the step's lr),
    from the model as built; all ranks see the same averaged loss and stop together."""
    lrs, losses, smoothed = [], [], []
    avg, best, stopped = 0.0, math.inf, f"reached lr_find.max_lr={settings.max_lr:g}"
    ratio = settings.max_lr / settings.min_lr
    smoothing = effective_smoothing(settings.smoothing, settings.num_steps)
    for i in range(settings.num_steps):
        lr = settings.min_lr * ratio ** (i / (settings.num_steps - 1))
        for group in t.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        t.optimizer.zero_grad(set_to_none=True)
        out = train_step(t.stage, t.stepped, t.optimizer, batches, t.rt, t.scaler, diagnostics=False)
        loss = out["loss"].detach().float()
        if t.dist.enabled:
            loss = t.dist.sum(loss.reshape(1))[0] / t.dist.world_size
        loss = float(loss)
        if t.scaler is not None:
            t.scaler.step(t.optimizer)
            t.scaler.update()
        else:
            t.optimizer.step()
        if not math.isfinite(loss):
            stopped = f"the loss became {loss} at lr {lr:.3g}"
            break
        avg = (1 - smoothing) * avg + smoothing * loss
        smooth = avg / (1 - (1 - smoothing) ** (i + 1))  # bias-corrected: the first points are not low
        lrs.append(lr)
        losses.append(loss)
        smoothed.append(smooth)
        best = min(best, smooth)
        if smooth > settings.diverge * best:
            stopped = f"the smoothed loss passed {settings.diverge:g} x its lowest at lr {lr:.3g}"
            break
    result = RangeTest(lrs, losses, smoothed, stopped)
    suggest(result, smoothing)
    return result


def effective_smoothing(smoothing: float, num_steps: int) -> float:
    """lr_find.smoothing, raised so that an average spans at most SPAN of the steps: 1/0.05 = 20 steps of a 40-step
    test would average the fall away and notice the divergence only after it."""
    return min(1.0, max(smoothing, 1 / (SPAN * num_steps)))


def suggest(result: RangeTest, smoothing: float = 0.05) -> None:
    """Fill in the suggestion: the steepest descent of the loss against log10(lr) before its minimum (where it
    starts to diverge), both read from a centred moving average of about 1/smoothing steps (the running average
    that decides when to stop lags by ~1/smoothing steps, which would push the suggestion to larger rates)."""
    losses = np.asarray(result.losses)
    if len(losses) < 5:
        result.method = f"no suggestion: only {len(losses)} finite steps (lower lr_find.min_lr)"
        return
    half = max(1, round(0.5 / effective_smoothing(smoothing, len(losses))))  # a tenth of the steps recorded
    centred = np.array([losses[max(0, i - half) : i + half + 1].mean() for i in range(len(losses))])
    lowest = int(np.argmin(centred))
    result.min_loss_lr = result.lrs[lowest]
    start = min(half, len(losses) - 2)  # the first points' averages are one-sided
    window = slice(start, max(start + 2, lowest + 1))
    slopes = np.gradient(centred, np.log10(result.lrs))[window]
    steepest = window.start + int(np.argmin(slopes))
    result.suggestion = result.lrs[steepest]
    result.method = (
        f"steepest descent of the loss ({slopes.min():.3g} per decade at step {steepest + 1}, centred average of "
        f"{2 * half + 1} steps); the loss was lowest at lr {result.min_loss_lr:.3g} "
        f"(a tenth: {result.min_loss_lr / 10:.3g})"
    )


def plot(result: RangeTest, path: Path) -> Path:
    """Loss and smoothed loss against the learning rate (log scale), the suggestion marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(result.lrs, result.losses, color="0.75", linewidth=1, label="loss")
    ax.plot(result.lrs, result.smoothed, color="C0", linewidth=2, label="smoothed loss")
    if result.suggestion is not None:
        ax.axvline(result.suggestion, color="C3", linestyle="--", label=f"suggested lr {result.suggestion:.3g}")
    if result.min_loss_lr is not None:
        ax.axvline(result.min_loss_lr, color="0.4", linestyle=":", label=f"lowest loss at {result.min_loss_lr:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("learning rate")
    ax.set_ylabel("training loss")
    low, high = min(result.losses), max(result.smoothed[: max(1, len(result.smoothed) // 2)])
    ax.set_ylim(low - 0.1 * (high - low + 1e-9), high + 0.3 * (high - low + 1e-9))
    ax.set_title("LR range test")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
