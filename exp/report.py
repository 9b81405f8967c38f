"""Plots and reports of finished runs."""

from __future__ import annotations

from pathlib import Path

from exp.callbacks import read_metrics


def plot_run(metrics_path: Path, out: Path) -> Path | None:
    """A PNG of train/val loss and the learning rate against step; None when nothing was logged."""
    rows = read_metrics(metrics_path)
    train = [(m["step"], m["train/loss"]) for m in rows if "train/loss" in m]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")  # no display on clusters
    import matplotlib.pyplot as plt

    val = [(m["step"], m["val/loss"]) for m in rows if "val/loss" in m]
    lr = [(m["step"], m["train/lr"]) for m in rows if "train/lr" in m]
    fig, (ax_loss, ax_lr) = plt.subplots(2, 1, figsize=(7, 6), sharex=True, height_ratios=[3, 1])
    ax_loss.plot(*zip(*train, strict=True), label="train/loss")
    if val:
        ax_loss.plot(*zip(*val, strict=True), "o-", label="val/loss")
    ax_loss.set_ylabel("loss")
    ax_loss.grid(alpha=0.3)
    ax_loss.legend()
    ax_lr.plot(*zip(*lr, strict=True), color="tab:green")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.grid(alpha=0.3)
    fig.suptitle(Path(metrics_path).parent.name, fontsize=9)
    fig.tight_layout()
    out = Path(out)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
