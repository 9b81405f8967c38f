"""Optimizer construction: parameter groups (no weight decay on norms and biases, per-group rules), freezing,
fused kernels where they exist, and the settings a freshly built optimizer was configured with. The learning-rate
schedules are in exp.schedules."""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

# optimizer keys that follow the stage's recipe (`lr: ${stage.learning_rate}`): one value, recorded once
# (exp.config links them; a checkpoint from before the link compares them as one)
STAGE_LINKS = {"lr": "learning_rate", "weight_decay": "weight_decay"}

__all__ = [
    "GroupRule",
    "group_rules",
    "freeze",
    "param_groups",
    "build_optimizer",
    "hyperparameters",
]


@dataclass(frozen=True)
class GroupRule:
    """optimizer.param_groups entry: parameters whose name `match`es (re.search) train at lr * lr_mult, with
    their own weight_decay if given (else matrices decay and vectors do not, as everywhere)."""

    match: str
    lr_mult: float = 1.0
    weight_decay: float | None = None


def group_rules(rules, key: str = "optimizer.param_groups") -> list[GroupRule]:
    """The rules of a config list, checked; ValueError naming the entry."""
    out = []
    for i, rule in enumerate(rules or ()):
        where = f"{key}[{i}]"
        if not isinstance(rule, Mapping):
            raise ValueError(f"{where}={rule!r} must be a mapping like {{match: REGEX, lr_mult: 0.1}}")
        unknown = set(rule) - {"match", "lr_mult", "weight_decay"}
        if unknown:
            raise ValueError(f"{where}.{sorted(unknown)[0]}: unknown key (known: match, lr_mult, weight_decay)")
        if not isinstance(rule.get("match"), str):
            raise ValueError(f"{where}.match is required: a regular expression over parameter names")
        _compile(rule["match"], f"{where}.match")
        mult, wd = rule.get("lr_mult", 1.0), rule.get("weight_decay")
        if isinstance(mult, bool) or not isinstance(mult, (int, float)) or mult < 0:
            raise ValueError(f"{where}.lr_mult={mult!r} must be a number >= 0")
        if wd is not None and (isinstance(wd, bool) or not isinstance(wd, (int, float)) or wd < 0):
            raise ValueError(f"{where}.weight_decay={wd!r} must be a number >= 0")
        out.append(GroupRule(rule["match"], float(mult), None if wd is None else float(wd)))
    return out


def _compile(pattern: str, where: str) -> re.Pattern:
    try:
        return re.compile(pattern)
    except re.error as e:
        raise ValueError(f"{where}={pattern!r} is not a regular expression ({e})") from None


def freeze(model: nn.Module, patterns, key: str = "model.freeze") -> int:
    """Stop the parameters whose names match one of `patterns` (re.search) from training; returns how many
    tensors were frozen. A pattern that matches nothing is a ValueError naming it."""
    compiled = [(i, _compile(p, f"{key}[{i}]")) for i, p in enumerate(patterns or ())]
    frozen = 0
    hits = dict.fromkeys(range(len(compiled)), 0)
    for name, p in model.named_parameters():
        matched = [i for i, rx in compiled if rx.search(name)]
        for i in matched:
            hits[i] += 1
        if matched:
            p.requires_grad_(False)
            frozen += 1
    for i, n in hits.items():
        if n == 0:
            raise ValueError(f"{key}[{i}]={compiled[i][1].pattern!r} matches no parameter of the model")
    return frozen


def param_groups(model: nn.Module, weight_decay: float, rules: list[GroupRule] = ()) -> list[dict]:
    """Trainable parameters in groups: each rule's (the first rule whose `match` finds the name), then the rest;
    within a group without its own weight_decay, matrices (ndim >= 2) decay and vectors do not. A group carries
    its `lr_mult` (build_optimizer scales its lr) and a `name`; a rule that matches nothing is a ValueError."""
    compiled = [_compile(r.match, f"optimizer.param_groups[{i}].match") for i, r in enumerate(rules)]
    members: list[list[nn.Parameter]] = [[] for _ in range(len(rules) + 1)]
    # model.named_parameters() yields a tied parameter once, so each lands in exactly one group.
    for name, p in model.named_parameters():
        if p.requires_grad:
            members[next((i for i, rx in enumerate(compiled) if rx.search(name)), len(rules))].append(p)
    groups = []
    for i, params in enumerate(members):
        rule = rules[i] if i < len(rules) else GroupRule(match="", lr_mult=1.0)
        prefix = f"param_groups[{i}]:" if i < len(rules) else ""
        if i < len(rules) and not params:
            raise ValueError(f"optimizer.param_groups[{i}].match={rule.match!r} matches no trainable parameter")
        if rule.weight_decay is not None:
            groups.append({"params": params, "weight_decay": rule.weight_decay, "name": f"{prefix}all"})
        else:
            decay, no_decay = [p for p in params if p.ndim >= 2], [p for p in params if p.ndim < 2]
            groups.append({"params": decay, "weight_decay": weight_decay, "name": f"{prefix}decay"})
            groups.append({"params": no_decay, "weight_decay": 0.0, "name": f"{prefix}no_decay"})
        for g in groups[-2 if rule.weight_decay is None else -1 :]:
            g["lr_mult"] = rule.lr_mult
    # torch rejects a group with no parameters.
    return [g for g in groups if g["params"]]


def build_optimizer(
    make_optimizer: Callable[..., torch.optim.Optimizer],
    model: nn.Module,
    device: torch.device,
    weight_decay: float | None = None,
    rules: list[GroupRule] = (),
) -> torch.optim.Optimizer:
    """Build the optimizer from a partial over ``param_groups``, asking for fused kernels on CUDA; each group's
    lr is the optimizer's times its ``lr_mult`` (optimizer.param_groups rules), so the schedule scales them all.

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
    optimizer = make_optimizer(param_groups(model, weight_decay, rules), **extra)
    for group in optimizer.param_groups if rules else ():
        group["lr"] = group["lr"] * group["lr_mult"]
    return optimizer


def hyperparameters(optimizer: torch.optim.Optimizer) -> list[dict]:
    """Each param group's settings without its parameters: what a freshly built optimizer was configured with."""
    return [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
