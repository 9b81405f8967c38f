"""Adapters on a model's linear layers (LoRA through peft): the `model.adapter` config, injection onto a frozen
base, the base's fingerprint, the adapter's own tensors, and merging them back into plain weights.

peft is an optional extra (`pip install 'exp[lora]'`), imported only when a model has an adapter. The adapter is
injected in place (peft.inject_adapter_in_model): the model keeps its class and forward, each targeted nn.Linear
becomes peft's lora.Linear (`base_layer` plus `lora_A`/`lora_B`), and only those adapters train.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, fields

import torch
from torch import nn

KINDS = ("lora",)
ADAPTER_NAME = "default"  # peft's name of the one adapter; left out of the names exp saves, as peft's own files do
DEFAULT_TARGET = "(qkv|proj|gate|up|down|c_attn|c_fc)$"  # attention and MLP (exp's GPT, Llama, GPT-2), not the head
PEFT_MISSING = "LoRA needs the peft package, which is not installed: pip install 'exp[lora]' (or peft>=0.11)"
# model.safetensors metadata of an adapter checkpoint (exp.checkpoint.format)
META_KIND, META_FINGERPRINT, META_BASE = "adapter", "base_fingerprint", "base"


@dataclass(kw_only=True)
class AdapterConfig:
    """The `model.adapter` node: a LoRA of rank r on each nn.Linear whose name `target` finds (re.search), its
    update B @ A scaled by alpha / r, dropout on the adapter's input."""

    kind: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target: str = DEFAULT_TARGET

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"model.adapter.kind={self.kind!r} must be one of {', '.join(KINDS)}")
        if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"model.adapter.r={self.r!r} must be an integer >= 1 (the rank)")
        if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
            raise ValueError(
                f"model.adapter.alpha={self.alpha!r} must be a number > 0 (the update is scaled by alpha/r)"
            )
        if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
            raise ValueError(f"model.adapter.dropout={self.dropout!r} must be in [0, 1)")
        if not isinstance(self.target, str) or not self.target:
            raise ValueError(f"model.adapter.target={self.target!r} must be a regular expression over layer names")
        try:
            re.compile(self.target)
        except re.error as e:
            raise ValueError(f"model.adapter.target={self.target!r} is not a regular expression ({e})") from None

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def adapter_config(node) -> AdapterConfig | None:
    """The AdapterConfig of a model config's `adapter` value (a mapping, or None: no adapter); ValueError naming
    the key otherwise."""
    if node is None:
        return None
    if not isinstance(node, dict):
        raise ValueError(f"model.adapter={node!r} must be a mapping like {{kind: lora, r: 8}} or null")
    known = {f.name for f in fields(AdapterConfig)}
    unknown = sorted(set(node) - known)
    if unknown:
        raise ValueError(f"model.adapter.{unknown[0]}: unknown key (known: {', '.join(sorted(known))})")
    return AdapterConfig(**node)


def require_peft(what: str = "model.adapter"):
    """The peft module; ValueError (`what` needs it, and what to install) when it is missing."""
    try:
        import peft
    except ImportError:
        raise ValueError(f"{what}: {PEFT_MISSING}") from None
    return peft


def _is_linear(module: nn.Module) -> bool:
    """nn.Linear, or transformers' Conv1D (GPT-2's linear layers, weight transposed), which peft adapts too."""
    kind = type(module)
    return isinstance(module, nn.Linear) or (kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers."))


def targets(model: nn.Module, adapter: AdapterConfig) -> list[str]:
    """Names of the linear layers the adapter goes on; ValueError naming the key when there are none, or when
    one's weight is shared with another parameter (a tied output head: merging would change the embedding too)."""
    linear = [name for name, m in model.named_modules() if _is_linear(m)]
    kind = type(model).__qualname__
    if not linear:
        raise ValueError(f"model.adapter: LoRA goes on linear layers (nn.Linear), and {kind} has none")
    rx = re.compile(adapter.target)
    found = [name for name in linear if rx.search(name)]
    if not found:
        shown = ", ".join(linear[:8]) + (f" and {len(linear) - 8} more" if len(linear) > 8 else "")
        raise ValueError(
            f"model.adapter.target={adapter.target!r} matches no linear layer of {kind} (they are: {shown})"
        )
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name)
    modules = dict(model.named_modules())
    for name in found:
        shared = [n for n in owners[id(modules[name].weight)] if n != f"{name}.weight"]
        if shared:
            raise ValueError(
                f"model.adapter.target={adapter.target!r} matches {name}, whose weight is tied to {shared[0]}: "
                "a LoRA there would change both once merged; leave it out of the target (or model.tie_embeddings=false)"
            )
    return found


def inject(model: nn.Module, adapter: AdapterConfig, base: str | None = None, fingerprint: str | None = None):
    """Put the adapter on `model` in place (peft.inject_adapter_in_model) and freeze everything else; `base` (where
    the base weights came from) and their `fingerprint` are recorded on the model for its checkpoints."""
    peft = require_peft()
    names = targets(model, adapter)
    config = peft.LoraConfig(
        r=adapter.r,
        lora_alpha=adapter.alpha,
        lora_dropout=adapter.dropout,
        # the exact layers found above, matched whole: peft reads a string as one regular expression (re.fullmatch)
        target_modules="|".join(re.escape(n) for n in names),
        bias="none",
        fan_in_fan_out=any(type(model.get_submodule(n)).__name__ == "Conv1D" for n in names),  # GPT-2's layers
    )
    peft.inject_adapter_in_model(config, model, adapter_name=ADAPTER_NAME)
    for name, p in model.named_parameters():
        p.requires_grad_(_is_adapter(name))
    model.exp_adapter = {"config": adapter, "base": base, "fingerprint": fingerprint, "targets": names}
    return model


def info(model: nn.Module) -> dict | None:
    """What inject recorded on the model (config, base, fingerprint, targets), or None for a plain model."""
    return getattr(model, "exp_adapter", None)


def _is_adapter(name: str) -> bool:
    return f".lora_A.{ADAPTER_NAME}." in name or f".lora_B.{ADAPTER_NAME}." in name


def fingerprint(model: nn.Module) -> str:
    """SHA-256 over the model's tensors (names, dtypes, shapes and bytes, in name order): the identity of a base."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def adapter_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft's saved names (`blocks.0.attn.qkv.lora_A.weight`: no adapter name)."""
    return {n.replace(f".{ADAPTER_NAME}.", "."): t for n, t in model.state_dict().items() if _is_adapter(n)}


def load_adapter_tensors(model: nn.Module, tensors: dict[str, torch.Tensor], source: str) -> None:
    """Copy saved adapter tensors into an adapted model; ValueError when names or shapes differ."""
    own = {n.replace(f".{ADAPTER_NAME}.", "."): (n, t) for n, t in model.state_dict(keep_vars=True).items()}
    own = {k: v for k, v in own.items() if _is_adapter(v[0])}
    missing, extra = sorted(own.keys() - tensors.keys()), sorted(tensors.keys() - own.keys())
    if missing or extra:
        what = f"lacks {missing[0]}" if missing else f"has {extra[0]}, which the model's adapter has not"
        raise ValueError(f"{source}: its adapter does not fit this model's: it {what}")
    with torch.no_grad():
        for key, (_, param) in own.items():
            if tensors[key].shape != param.shape:
                raise ValueError(
                    f"{source}: adapter tensor {key} has shape {list(tensors[key].shape)}, the model's "
                    f"{list(param.shape)} (another model.adapter.r?)"
                )
            param.copy_(tensors[key])


def merge(model: nn.Module) -> nn.Module:
    """Fold each LoRA into its base layer (W + scaling * B @ A) and put the plain nn.Linear back: the model, in
    place, is then what it would be without an adapter."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge(adapter_names=[ADAPTER_NAME])
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, module.get_base_layer())
    for attr in ("peft_config", "exp_adapter"):
        if hasattr(model, attr):
            delattr(model, attr)
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def count(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen) parameters, a tied weight once."""
    trainable = frozen = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen
