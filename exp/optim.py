"""Optimizer construction and LR schedules; conventions are spelled out below.

Step counting: each schedule is a ``LambdaLR`` whose lambda receives ``i``, the number of
optimizer steps already taken (``last_epoch``; 0 before the first step). Step ``s`` (1-based)
trains with multiplier ``m(s - 1)``.

Warmup: its length is ``w = warmup_steps`` if ``warmup_steps > 0`` else
``round(warmup_ratio * num_steps)``. For ``i < w``, ``m(i) = (i + 1) / w``: the first step runs
at ``lr / w`` and step ``w`` at the full lr. ``w == 0`` means no warmup.

Decay: after warmup, progress ``p = (i - w) / max(1, num_steps - 1 - w)`` clipped to [0, 1], so
``m(w) == 1.0`` and the last step's multiplier ``m(num_steps - 1) == lr_decay_ratio``, both
exactly. Past ``num_steps - 1`` the multiplier stays at its final value. When warmup fills all but
the last step (``w == num_steps - 1``) nothing is left to decay over and that step runs at 1.0.

``wsd`` holds 1.0 after warmup and decays over the last ``d = max(1, round(decay_fraction *
num_steps))`` steps: ``p = (i - (num_steps - 1 - d)) / d``, so those ``d`` steps fall below 1.0
and the last one lands on ``lr_decay_ratio``.

Every lambda is a plain closure, so ``LambdaLR.state_dict()`` holds only counters and learning
rates: it is JSON-serialisable and restores through ``load_state_dict``.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "param_groups",
    "build_optimizer",
    "constant",
    "linear_warmup",
    "linear",
    "linear_to_zero",
    "cosine",
    "exponential",
    "wsd",
    "multipliers",
]


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into a decayed group (ndim >= 2) and an undecayed one (ndim < 2)."""
    decay, no_decay = [], []
    # model.parameters() yields a tied parameter once, so each lands in exactly one group.
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]
    # torch rejects a group with no parameters.
    return [g for g in groups if g["params"]]


def build_optimizer(
    make_optimizer: Callable[..., torch.optim.Optimizer],
    model: nn.Module,
    device: torch.device,
    weight_decay: float | None = None,
) -> torch.optim.Optimizer:
    """Build the optimizer from a partial over ``param_groups``, asking for fused kernels on CUDA.

    The decayed group's weight decay defaults to the partial's own ``weight_decay`` (the config's).
    """
    cls = getattr(make_optimizer, "func", make_optimizer)
    preset = getattr(make_optimizer, "keywords", None) or {}
    if weight_decay is None:
        weight_decay = preset.get("weight_decay", 0.0)
    extra = {}
    # An explicit foreach=True conflicts with fused=True, so the config's choice wins.
    if (
        device.type == "cuda"
        and "fused" in inspect.signature(cls).parameters
        and preset.get("fused") is None
        and not preset.get("foreach")
    ):
        extra["fused"] = True
    return make_optimizer(param_groups(model, weight_decay), **extra)


def _warmup_length(num_steps: int, warmup_steps: int, warmup_ratio: float, lr_decay_ratio: float) -> int:
    """Validate the shared schedule arguments and return the warmup length in steps."""
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps <= 0:
        raise ValueError(f"stage.num_steps must be a positive integer, got {num_steps!r}")
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
        raise ValueError(f"stage.warmup_steps must be an integer, got {warmup_steps!r}")
    if not 0 <= warmup_steps < num_steps:
        raise ValueError(f"stage.warmup_steps must be in [0, stage.num_steps={num_steps}), got {warmup_steps}")
    if not 0.0 <= warmup_ratio < 1.0:
        raise ValueError(f"stage.warmup_ratio must be in [0, 1), got {warmup_ratio!r}")
    if not 0.0 <= lr_decay_ratio <= 1.0:
        raise ValueError(f"stage.lr_decay_ratio must be in [0, 1], got {lr_decay_ratio!r}")
    if warmup_steps > 0:
        return warmup_steps
    w = round(warmup_ratio * num_steps)
    if w >= num_steps:
        raise ValueError(
            f"stage.warmup_ratio={warmup_ratio} gives {w} warmup steps, "
            f"which leaves none of stage.num_steps={num_steps}"
        )
    return w


def _schedule(
    optimizer: torch.optim.Optimizer,
    w: int,
    anchor: int,
    span: int,
    end: float,
    shape: Callable[[float], float],
) -> LambdaLR:
    """Warmup over ``w`` steps, 1.0 up to ``anchor``, then ``shape(p)`` as ``p`` reaches 1 over ``span``."""

    def lr_lambda(i: int) -> float:
        if i < w:
            return (i + 1) / w
        p = (i - anchor) / span
        # The endpoints are returned verbatim so that 1.0 and ``end`` hold exactly, not up to rounding.
        if p <= 0.0:
            return 1.0
        if p >= 1.0:
            return end
        return shape(p)

    return LambdaLR(optimizer, lr_lambda)


def _decay_after_warmup(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int,
    warmup_ratio: float,
    end: float,
    lr_decay_ratio: float,
    shape: Callable[[float], float],
) -> LambdaLR:
    """Warmup, then ``shape`` from 1.0 at step index ``w`` to ``end`` at the last step."""
    w = _warmup_length(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
    return _schedule(optimizer, w, w, max(1, num_steps - 1 - w), end, shape)


def _linear_shape(end: float) -> Callable[[float], float]:
    return lambda p: end + (1.0 - end) * (1.0 - p)


def _cosine_shape(end: float) -> Callable[[float], float]:
    return lambda p: end + (1.0 - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def _sqrt_shape(end: float) -> Callable[[float], float]:
    return lambda p: end + (1.0 - end) * (1.0 - math.sqrt(p))


def constant(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Flat multiplier 1.0 with no warmup; the shared arguments are validated and otherwise ignored."""
    _warmup_length(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
    return _schedule(optimizer, 0, num_steps, 1, 1.0, lambda p: 1.0)


def linear_warmup(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then a constant 1.0."""
    w = _warmup_length(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
    return _schedule(optimizer, w, num_steps, 1, 1.0, lambda p: 1.0)


def linear(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then linear decay to ``lr_decay_ratio`` at the last step."""
    return _decay_after_warmup(
        optimizer,
        num_steps,
        warmup_steps,
        warmup_ratio,
        lr_decay_ratio,
        lr_decay_ratio,
        _linear_shape(lr_decay_ratio),
    )


def linear_to_zero(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then linear decay to 0 at the last step whatever ``lr_decay_ratio`` says."""
    return _decay_after_warmup(
        optimizer, num_steps, warmup_steps, warmup_ratio, 0.0, lr_decay_ratio, _linear_shape(0.0)
    )


def cosine(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then half-cosine decay to ``lr_decay_ratio`` at the last step."""
    return _decay_after_warmup(
        optimizer,
        num_steps,
        warmup_steps,
        warmup_ratio,
        lr_decay_ratio,
        lr_decay_ratio,
        _cosine_shape(lr_decay_ratio),
    )


def exponential(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then geometric decay reaching ``lr_decay_ratio`` (> 0) at the last step."""
    if not lr_decay_ratio > 0.0:
        raise ValueError(f"stage.lr_decay_ratio must be > 0 for an exponential schedule, got {lr_decay_ratio!r}")
    end = lr_decay_ratio
    return _decay_after_warmup(optimizer, num_steps, warmup_steps, warmup_ratio, end, lr_decay_ratio, lambda p: end**p)


def wsd(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
    decay_fraction: float = 0.2,
    decay_shape: str = "linear",
) -> LambdaLR:
    """Warmup-stable-decay: warmup, 1.0, then decay to ``lr_decay_ratio`` over the last ``decay_fraction``."""
    w = _warmup_length(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
    if not 0.0 < decay_fraction <= 1.0:
        raise ValueError(f"scheduler.decay_fraction must be in (0, 1], got {decay_fraction!r}")
    shapes = {"linear": _linear_shape, "cosine": _cosine_shape, "sqrt": _sqrt_shape}
    if decay_shape not in shapes:
        raise ValueError(f"scheduler.decay_shape must be one of {list(shapes)}, got {decay_shape!r}")
    d = max(1, round(decay_fraction * num_steps))
    if num_steps - d < w:
        raise ValueError(
            f"scheduler.decay_fraction={decay_fraction} decays over the last {d} of stage.num_steps="
            f"{num_steps} steps, which overlaps the {w} warmup steps; decay must start after warmup"
        )
    return _schedule(optimizer, w, num_steps - 1 - d, d, lr_decay_ratio, shapes[decay_shape](lr_decay_ratio))


def multipliers(scheduler: LambdaLR, steps: list[int]) -> list[float]:
    """The LR multiplier each 1-based step in ``steps`` trains with, read off the lambda without stepping."""
    fn = scheduler.lr_lambdas[0]
    out = []
    for s in steps:
        if s < 1:
            raise ValueError(f"steps are 1-based, got {s}")
        out.append(float(fn(s - 1)))
    return out
