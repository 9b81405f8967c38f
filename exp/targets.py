"""What a `_target_` from elsewhere may name: checked by the object it locates to, never by its spelling.

Hydra follows module attributes when it locates a target, so `exp.config.os.makedirs` is `os.makedirs` and
`exp.rundir.write_json` a helper no config should call: a prefix of the dotted string says nothing. A target is
allowed when it locates to one of exp's own buildable targets (EXP_TARGETS, by identity), or to a class or
function *defined* (its `__module__` and `__qualname__`) in a package the user declared (`--allow-target my_pkg`,
`EXP_ALLOWED_TARGETS`), or that is the very object a declared name locates to (`my_pkg.models.MyLM`). Only
modules named by an allowed root are ever imported to find out; nothing is built or called.

Configs from elsewhere pass through here: the job service's (exp.serve.configs), a job the service started
(EXP_TARGET_ALLOWLIST), checkpoints, exports and teachers (exp.checkpoint.weights).
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass
from functools import cache

EXP_PACKAGE = "exp"
# Every target exp's own configs (conf/) and callbacks name: the only exp objects a config from elsewhere builds.
# tests/unit/test_targets.py checks each conf/ _target_ is here.
EXP_TARGETS = (
    "exp.model.GPT",
    "exp.model.HFCausalLM",
    "exp.schedules.constant",
    "exp.schedules.linear_warmup",
    "exp.schedules.linear",
    "exp.schedules.linear_to_zero",
    "exp.schedules.cosine",
    "exp.schedules.exponential",
    "exp.schedules.wsd",
    "exp.data.PyStdlib",
    "exp.data.Memmap",
    "exp.data.Mixture",
    "exp.data.TorchDataset",
    "exp.data.sft.SFTPyStdlib",
    "exp.data.sft.SFTJsonl",
    "exp.data.preference.PreferencePyStdlib",
    "exp.data.preference.PreferenceJsonl",
    "exp.stages.Pretrain",
    "exp.stages.Midtrain",
    "exp.stages.Distill",
    "exp.stages.SFT",
    "exp.stages.DPO",
    "exp.hardware.Hardware",
    "exp.tracking.MlflowTracker",
    "exp.tracking.NullTracker",
    "exp.checkpoint.Checkpointer",
    "exp.callbacks.FirstStepClock",
    "exp.callbacks.ProgressBar",
    "exp.faults.EarlyStopping",
    "exp.sweep.pruning.OptunaPruning",
)
# Packages every class and function of which configs may build: torch's optimizers (and their schedulers).
TRUSTED_PACKAGES = ("torch.optim",)
_DOTTED = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


class TargetRefused(ValueError):
    """A `_target_` that is not allowed, or cannot be located; the message says which and why."""


def declared(entries) -> tuple[str, ...]:
    """Cleaned declared names (`my_pkg.` and `my_pkg` alike), without what is always allowed; `exp` itself means
    EXP_TARGETS, not the whole package."""
    names = (str(e).strip().rstrip(".") for e in entries)
    return tuple(dict.fromkeys(n for n in names if n and n not in (EXP_PACKAGE, *TRUSTED_PACKAGES)))


def _under(name: str, root: str) -> bool:
    return name == root or name.startswith(root + ".")


@dataclass(frozen=True)
class Allowlist:
    """exp's targets, torch.optim, and the packages or objects the user declared (`declared`)."""

    extra: tuple[str, ...] = ()

    @classmethod
    def of(cls, entries=()) -> Allowlist:
        return cls(declared(entries))

    @property
    def roots(self) -> tuple[str, ...]:
        """What a target's spelling must start with before anything is imported to locate it."""
        return (EXP_PACKAGE, *TRUSTED_PACKAGES, *self.extra)

    def describe(self) -> str:
        return ", ".join(("exp's own targets", *TRUSTED_PACKAGES, *self.extra))

    def locate(self, target) -> object:
        """The class or function `target` names, if allowed; TargetRefused (one line) otherwise."""
        if not isinstance(target, str) or not _DOTTED.match(target):
            raise TargetRefused(f"{target!r} is not a dotted name of a class or function")
        if not any(_under(target, root) for root in self.roots):
            raise TargetRefused(f"{target!r} is outside the allowed packages")  # nothing imported
        obj = _locate(target)
        if not (inspect.isclass(obj) or inspect.isfunction(obj)):
            raise TargetRefused(f"{target!r} is a {type(obj).__name__}, not a class or function")
        if not self._allows(obj):
            raise TargetRefused(f"{target!r} is {_defined(obj)}, which is not an allowed target")
        return obj

    def _allows(self, obj) -> bool:
        if obj in _exp_objects(obj.__name__):
            return True
        defined = _defined(obj)
        if "<" in defined:  # a class or function made inside a function: no stable home
            return False
        if any(_under(defined, p) for p in (*TRUSTED_PACKAGES, *self.extra)):
            return True
        return any(obj is _declared_object(name) for name in self.extra)  # my_pkg.MyLM re-exported from a module

    def refusal(self, target) -> str | None:
        """Why `target` is refused, or None when it is allowed."""
        try:
            self.locate(target)
        except TargetRefused as e:
            return str(e)
        return None

    def first_refused(self, node, where: str = "") -> tuple[str, object, str] | None:
        """The first `_target_` of a plain container (dicts and lists, at any depth) that is refused: its dotted
        key, its value and why."""
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and (why := self.refusal(value)):
                    return f"{where}{key}", value, why
                found = self.first_refused(value, f"{where}{key}.")
                if found:
                    return found
        elif isinstance(node, list):
            for i, value in enumerate(node):
                found = self.first_refused(value, f"{where}{i}.")
                if found:
                    return found
        return None


def _defined(obj) -> str:
    """Where an object was defined: its module and qualified name."""
    return f"{getattr(obj, '__module__', None)}.{getattr(obj, '__qualname__', '?')}"


def _locate(target: str) -> object:
    # Hydra's own lookup, so a target resolves here exactly as instantiate() will resolve it (its public
    # get_object logs every miss at ERROR level: a refused target is not an error of the service's)
    from hydra._internal.utils import _locate as locate

    try:
        return locate(target)
    except Exception as e:  # Hydra wraps import errors of every kind
        raise TargetRefused(f"{target!r} cannot be imported: {str(e).splitlines()[0] if str(e) else e}") from None


@cache
def _exp_objects(name: str) -> tuple:
    """exp's own targets whose last part is `name` (only those are imported to compare)."""
    return tuple(_locate(t) for t in EXP_TARGETS if t.rpartition(".")[2] == name)


@cache
def _declared_object(name: str) -> object | None:
    try:
        return _locate(name)
    except TargetRefused:
        return None
