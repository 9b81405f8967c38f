"""The data-parallel layout a checkpoint was trained with (ranks x stage.batch_size_per_gpu x
stage.gradient_accumulation_steps: the global batch), and the rule for resuming it with another.

The samplers' states are positions in one stream all ranks share (exp.data.batches.Sampler), and sharded checkpoints
reshard on load, so a run resumes at any number of ranks. The global batch kept, it trains on exactly what the
saved layout would have; changed (resume.allow_config_change=true), the stream continues from the samples consumed
with the new global batch, recorded in config_changes.json with the other changed keys.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

from exp.errors import ConfigError, ResumeError

# Config keys that say how a global batch is split, not what is trained: a resume that keeps the global batch may
# change them without resume.allow_config_change
LAYOUT_KEYS = ("stage.batch_size_per_gpu", "stage.gradient_accumulation_steps", "hardware.distributed")


@dataclass(frozen=True)
class Layout:
    """How one optimizer step's samples are drawn: ranks x batch per rank x micro-batches, and the strategy that
    shares the model (none, ddp, fsdp: as run, so one rank is none)."""

    world_size: int
    batch_size_per_gpu: int
    gradient_accumulation_steps: int = 1
    strategy: str = "none"

    @property
    def global_batch(self) -> int:
        return self.world_size * self.batch_size_per_gpu * self.gradient_accumulation_steps

    def __str__(self) -> str:
        ranks = f"{self.world_size} rank{'s' if self.world_size > 1 else ''}"
        return f"{ranks} x {self.batch_size_per_gpu} x {self.gradient_accumulation_steps} accumulation"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def layout_of(stage, dist) -> Layout:
    """A run's layout from its stage (config node or StageConfig) and its exp.dist.Dist."""
    strategy = dist.strategy if dist.enabled else "none"
    return Layout(dist.world_size, int(stage.batch_size_per_gpu), int(stage.gradient_accumulation_steps), strategy)


def saved_layout(trainer_state: dict, saved_cfg: dict) -> Layout:
    """trainer_state.json's layout; an older checkpoint's from its sampler state's world size and its config."""
    stage, hardware = saved_cfg.get("stage") or {}, saved_cfg.get("hardware") or {}
    saved = trainer_state.get("layout")
    if not isinstance(saved, dict):
        world = (trainer_state.get("sampler") or {}).get("world_size", 1)
        saved = {"world_size": world, "strategy": hardware.get("distributed", "none") if world > 1 else "none"}
        saved |= {k: stage.get(k, 1) for k in ("batch_size_per_gpu", "gradient_accumulation_steps")}
    counts = {k: int(saved[k]) for k in ("world_size", "batch_size_per_gpu", "gradient_accumulation_steps")}
    return Layout(**counts, strategy=str(saved.get("strategy", "none")))


def per_rank_state(sampler_state) -> bool:
    """Whether a sampler state may be one rank's own position (older checkpoints, data whose sampler does not say
    its state is the shared stream's), which fits only as many ranks as saved it."""
    return not (isinstance(sampler_state, dict) and sampler_state.get("scope") == "global")


def check_layout(path: Path, saved: Layout, current: Layout, sampler_state, allowed: bool) -> dict:
    """The layout changes to record ({key: (old, new)}; none for the same layout). A per-rank sampler state at
    another number of ranks raises ResumeError; another global batch without `allowed` raises ConfigError."""
    if saved == current:
        return {}
    if per_rank_state(sampler_state) and saved.world_size != current.world_size:
        raise ResumeError(
            f"cannot resume {path} with {current.world_size} rank(s): its data sampler's position is per rank "
            f"(an older checkpoint, or data whose sampler keeps one); resume it with {saved.world_size}"
        )
    if saved.global_batch != current.global_batch and not allowed:
        raise ConfigError(
            f"resuming {path} with a global batch of {current.global_batch} ({current}); it trained with "
            f"{saved.global_batch} ({saved}): keep ranks x stage.batch_size_per_gpu x "
            f"stage.gradient_accumulation_steps = {saved.global_batch}, or set resume.allow_config_change=true to go "
            "on with the new global batch from the samples consumed"
        )
    keys = {
        "world_size": "world_size",
        "strategy": "strategy",
        **{f"stage.{k}": k for k in ("batch_size_per_gpu", "gradient_accumulation_steps")},
    }
    changes = {key: (getattr(saved, f), getattr(current, f)) for key, f in keys.items()}
    changes = {k: v for k, v in changes.items() if v[0] != v[1]}
    return {**changes, "global_batch": (saved.global_batch, current.global_batch)}


def describe(changes: dict) -> str:
    """The layout changes for the resume line: the ranks and batches, and what became of the global batch."""
    if not changes:
        return ""
    moved = ", ".join(f"{k} {old} -> {new}" for k, (old, new) in changes.items() if k != "global_batch")
    old, new = changes["global_batch"]
    if old == new:
        return f"{moved} (global batch {old} kept)"
    return f"{moved}; global batch {old} -> {new}: the data continues from the samples consumed"


def is_sharded(path: Path) -> bool:
    """Whether a checkpoint's manifest marks it sharded (DCP shards); read without importing DCP."""
    try:
        return json.loads((Path(path) / "manifest.json").read_text()).get("sharded") is True
    except (OSError, ValueError, AttributeError):
        return False
