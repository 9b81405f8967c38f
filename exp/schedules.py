"""Learning-rate schedules (`conf/scheduler`), and resuming with changed optimizer or schedule settings;
conventions are spelled out below.

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

``constant`` (and its alias ``linear_warmup``) warms up like the others, then holds 1.0.

Every schedule is a ``Schedule`` (a ``LambdaLR`` over a plain closure), so its ``state_dict()`` holds
only counters, learning rates and the restart point: it is JSON-serialisable and restores through
``load_state_dict``.

Resuming with changed hyperparameters (``resume.allow_config_change=true``, ``resume_with_changes``):
a changed ``lr`` scales the base learning rates by new/old (a rollback's reduction is kept); weight
decay, betas, eps, momentum and the like take the new config's values; a changed schedule (more
``num_steps``, another decay ratio or scheduler) continues from the multiplier the next step would
have had: decaying schedules (linear, linear_to_zero, cosine, exponential) decay from there to their
end over the steps left; ``wsd`` holds it (its stable phase extends) until its decay window, then
decays; ``constant`` holds it. Inside warmup the new schedule applies as it is.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch.optim.lr_scheduler import LambdaLR

__all__ = [
    "constant",
    "linear_warmup",
    "linear",
    "linear_to_zero",
    "cosine",
    "exponential",
    "wsd",
    "multipliers",
    "resume_with_changes",
]


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


Decay = Callable[[float, float, float], float]  # (start, end, p) -> multiplier, start at p=0 and end at p=1


class Schedule(LambdaLR):
    """Warmup over ``warmup`` steps, 1.0 up to ``anchor``, then ``decay`` from 1.0 to ``end`` by the last step.

    ``restart`` = (step index, multiplier) re-anchors the schedule where a resumed run changed it: from that
    step on it continues from that multiplier (held until ``anchor``, then decayed to ``end`` over the steps
    left), so a longer run or another schedule never jumps. It is saved in ``state_dict``.
    """

    def __init__(self, optimizer, num_steps: int, warmup: int, anchor: int, end: float, decay: Decay | None):
        self.num_steps, self.warmup, self.anchor, self.end, self.decay = num_steps, warmup, anchor, end, decay
        self.restart: tuple[int, float] | None = None
        # a plain lambda, so LambdaLR.state_dict stores None for it and scheduler.json stays JSON
        super().__init__(optimizer, lambda i: self.multiplier(i))

    def multiplier(self, i: int) -> float:
        """The LR multiplier of step index ``i`` (0 before the first step)."""
        if self.restart is not None and i >= self.restart[0]:
            return self._decayed(max(self.anchor, self.restart[0]), self.restart[1], i)
        if i < self.warmup:
            return (i + 1) / self.warmup
        return self._decayed(self.anchor, 1.0, i)

    def _decayed(self, start: int, level: float, i: int) -> float:
        if self.decay is None or i <= start:
            return level
        p = (i - start) / max(1, self.num_steps - 1 - start)
        # The endpoints are returned verbatim so that 1.0 and ``end`` hold exactly, not up to rounding.
        return self.end if p >= 1.0 else self.decay(level, self.end, p)

    def continue_from(self, step: int, level: float) -> bool:
        """Re-anchor at ``step`` (its first untrained index) to run on from ``level``; False inside warmup."""
        if step < self.warmup:
            return False
        self.restart = (step, level)
        return True

    _SHAPE = ("num_steps", "warmup", "anchor", "end", "decay")  # from the config, never from a checkpoint

    def state_dict(self) -> dict:
        state = {k: v for k, v in super().state_dict().items() if k not in self._SHAPE}
        return state | {"restart": list(self.restart) if self.restart else None}

    def load_state_dict(self, state_dict: dict) -> None:
        state = {k: v for k, v in state_dict.items() if k not in self._SHAPE}
        restart = state.pop("restart", None)
        super().load_state_dict(state)
        self.restart = (int(restart[0]), float(restart[1])) if restart else None


def _decay_after_warmup(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int,
    warmup_ratio: float,
    end: float,
    lr_decay_ratio: float,
    decay: Decay,
) -> Schedule:
    """Warmup, then ``decay`` from 1.0 at step index ``w`` to ``end`` at the last step."""
    w = _warmup_length(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
    return Schedule(optimizer, num_steps, w, w, end, decay)


def _linear(start: float, end: float, p: float) -> float:
    return end + (start - end) * (1.0 - p)


def _cosine(start: float, end: float, p: float) -> float:
    return end + (start - end) * 0.5 * (1.0 + math.cos(math.pi * p))


def _sqrt(start: float, end: float, p: float) -> float:
    return end + (start - end) * (1.0 - math.sqrt(p))


def _geometric(start: float, end: float, p: float) -> float:
    return start * (end / start) ** p


def constant(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup (``warmup_steps`` or ``warmup_ratio``), then a flat 1.0; ``lr_decay_ratio`` is unused."""
    w = _warmup_length(num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)
    return Schedule(optimizer, num_steps, w, num_steps, 1.0, None)


def linear_warmup(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then a constant 1.0 (the same as ``constant``; kept as the name says what it does)."""
    return constant(optimizer, num_steps, warmup_steps, warmup_ratio, lr_decay_ratio)


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
        _linear,
    )


def linear_to_zero(
    optimizer: torch.optim.Optimizer,
    num_steps: int,
    warmup_steps: int = 0,
    warmup_ratio: float = 0.0,
    lr_decay_ratio: float = 0.0,
) -> LambdaLR:
    """Linear warmup, then linear decay to 0 at the last step whatever ``lr_decay_ratio`` says."""
    return _decay_after_warmup(optimizer, num_steps, warmup_steps, warmup_ratio, 0.0, lr_decay_ratio, _linear)


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
        _cosine,
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
    return _decay_after_warmup(
        optimizer, num_steps, warmup_steps, warmup_ratio, lr_decay_ratio, lr_decay_ratio, _geometric
    )


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
    shapes = {"linear": _linear, "cosine": _cosine, "sqrt": _sqrt}
    if decay_shape not in shapes:
        raise ValueError(f"scheduler.decay_shape must be one of {list(shapes)}, got {decay_shape!r}")
    d = max(1, round(decay_fraction * num_steps))
    if num_steps - d < w:
        raise ValueError(
            f"scheduler.decay_fraction={decay_fraction} decays over the last {d} of stage.num_steps="
            f"{num_steps} steps, which overlaps the {w} warmup steps; decay must start after warmup"
        )
    return Schedule(optimizer, num_steps, w, num_steps - 1 - d, lr_decay_ratio, shapes[decay_shape])


def multipliers(scheduler: LambdaLR, steps: list[int]) -> list[float]:
    """The LR multiplier each 1-based step in ``steps`` trains with, read off the lambda without stepping."""
    fn = scheduler.lr_lambdas[0]
    out = []
    for s in steps:
        if s < 1:
            raise ValueError(f"steps are 1-based, got {s}")
        out.append(float(fn(s - 1)))
    return out


def resume_with_changes(
    optimizer: torch.optim.Optimizer,
    scheduler: LambdaLR,
    configured: list[dict],
    saved: dict,
    current: dict,
    step: int,
) -> tuple[float, float]:
    """Make the config's optimizer and schedule settings win over a restored checkpoint's (see the module doc).

    ``configured`` is ``hyperparameters(optimizer)`` taken before the checkpoint was loaded; ``saved`` and
    ``current`` are the checkpoint's and this run's resolved ``optimizer`` and ``scheduler`` config nodes;
    ``step`` is the number of steps already trained. Returns the next step's learning rate before and after.
    """
    lr_before = optimizer.param_groups[0]["lr"]
    base_lrs = getattr(scheduler, "base_lrs", None)  # SequentialLR, ReduceLROnPlateau, ... have none
    level = lr_before / base_lrs[0] if base_lrs and base_lrs[0] else 1.0  # the saved schedule's multiplier
    old, new = saved.get("optimizer", {}), current.get("optimizer", {})
    for key in sorted(set(old) | set(new)):
        if key.startswith("_") or old.get(key) == new.get(key):
            continue
        if key == "lr":
            ratio = float(new["lr"]) / float(old["lr"])  # a rollback's reduction, already in base_lrs, stays
            if base_lrs is not None:
                scheduler.base_lrs = [lr * ratio for lr in base_lrs]
            for group in optimizer.param_groups:
                group["initial_lr"] = group.get("initial_lr", group["lr"]) * ratio
            continue
        for group, fresh in zip(optimizer.param_groups, configured, strict=True):
            if key in fresh:  # per-group values (no weight decay on norms) come from the fresh groups
                group[key] = fresh[key]
    if isinstance(scheduler, Schedule) and saved.get("scheduler") != current.get("scheduler"):
        scheduler.restart = None  # a restart point belongs to the schedule it was made for
        if not math.isclose(scheduler.multiplier(step), level, rel_tol=1e-9, abs_tol=1e-15):
            scheduler.continue_from(step, level)
    if isinstance(scheduler, LambdaLR):  # the next step's lr, as the scheduler would have set it
        for group, base, fn in zip(optimizer.param_groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
            group["lr"] = base * fn(step)
        scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    elif "lr" in old and old.get("lr") != new.get("lr"):  # another scheduler: scale what it set
        for group in optimizer.param_groups:
            group["lr"] *= float(new["lr"]) / float(old["lr"])
    return lr_before, optimizer.param_groups[0]["lr"]
