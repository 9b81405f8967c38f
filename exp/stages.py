"""Training stages: the recipe fields every stage shares, and each stage's train and eval step."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from exp.losses import lm_loss

DTYPE_NAMES = ("auto", "float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class StageConfig:
    """The recipe of one stage. Optimizer and scheduler configs interpolate these fields."""

    name: str
    num_steps: int
    batch_size_per_gpu: int
    learning_rate: float
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    lr_decay_ratio: float = 0.1
    gradient_accumulation_steps: int = 1
    dtype: str = "auto"
    log_every_n_steps: int = 10
    eval_every_n_steps: int = 100
    num_eval_batches: int = 8

    def __post_init__(self):
        checks = [
            (self.num_steps > 0, "num_steps", "must be > 0"),
            (self.batch_size_per_gpu > 0, "batch_size_per_gpu", "must be > 0"),
            (self.learning_rate > 0, "learning_rate", "must be > 0"),
            (self.weight_decay >= 0, "weight_decay", "must be >= 0"),
            (self.max_grad_norm > 0, "max_grad_norm", "must be > 0 (clipping cannot be switched off with 0)"),
            (
                0 <= self.warmup_steps < self.num_steps,
                "warmup_steps",
                f"must be in [0, stage.num_steps={self.num_steps})",
            ),
            (0 <= self.warmup_ratio < 1, "warmup_ratio", "must be in [0, 1)"),
            (0 <= self.lr_decay_ratio <= 1, "lr_decay_ratio", "must be in [0, 1]"),
            (self.gradient_accumulation_steps >= 1, "gradient_accumulation_steps", "must be >= 1"),
            (self.dtype in DTYPE_NAMES, "dtype", f"must be one of {', '.join(DTYPE_NAMES)}"),
            (self.log_every_n_steps > 0, "log_every_n_steps", "must be > 0"),
            (self.eval_every_n_steps > 0, "eval_every_n_steps", "must be > 0"),
            (self.num_eval_batches > 0, "num_eval_batches", "must be > 0"),
        ]
        for ok, key, rule in checks:
            if not ok:
                raise ValueError(f"stage.{key}={getattr(self, key)!r} {rule}")

    @property
    def samples_per_step(self) -> int:
        return self.batch_size_per_gpu * self.gradient_accumulation_steps


@dataclass(kw_only=True)
class Pretrain(StageConfig):
    """Causal language modelling: next-token cross-entropy on every position."""

    label_smoothing: float = 0.0

    def __post_init__(self):
        super().__post_init__()
        if not 0 <= self.label_smoothing < 1:
            raise ValueError(f"stage.label_smoothing={self.label_smoothing} must be in [0, 1)")

    def train_step(self, model, batch) -> dict[str, torch.Tensor]:
        """One micro-batch forward: `loss` to backpropagate, plus detached metrics."""
        x, y = batch
        logits, _ = model(x)
        return lm_loss(logits, y, self.label_smoothing)

    def eval_step(self, model, batch) -> dict[str, torch.Tensor]:
        x, y = batch
        logits, _ = model(x)
        return lm_loss(logits, y)
