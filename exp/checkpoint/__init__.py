"""Checkpoints, in one package: the format (format.py: safetensors + JSON + manifest, verify, rotate), sharded
DCP checkpoints (sharded.py, imported when used: torch.distributed.checkpoint is slow to import), weights for
inference, init_from and teachers (weights.py), and the Checkpointer a run saves, resumes and rolls back with
(checkpointer.py)."""

from exp.checkpoint.checkpointer import Checkpointer, ResumePoint, find_resume
from exp.checkpoint.format import (
    FORMAT_VERSION,
    MANIFEST,
    REQUIRED_FILES,
    CheckpointError,
    checkpoint_name,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    load_model_weights,
    read_trainer_state,
    restore_rng,
    rotate_checkpoints,
    save_checkpoint,
    take_snapshot,
    unwrap,
    verify_checkpoint,
    write_snapshot,
)
from exp.checkpoint.weights import (
    ALLOWED_TARGETS,
    build_model,
    check_tokenizer,
    find_checkpoint,
    load_model_for_inference,
    locate_model,
    read_model_config,
    saved_tokenizer,
    tokenizer_entry,
)

__all__ = [
    "ALLOWED_TARGETS",
    "FORMAT_VERSION",
    "MANIFEST",
    "REQUIRED_FILES",
    "CheckpointError",
    "Checkpointer",
    "ResumePoint",
    "find_resume",
    "build_model",
    "check_tokenizer",
    "saved_tokenizer",
    "tokenizer_entry",
    "checkpoint_name",
    "find_checkpoint",
    "latest_valid_checkpoint",
    "list_checkpoints",
    "load_checkpoint",
    "load_model_for_inference",
    "load_model_weights",
    "locate_model",
    "read_model_config",
    "read_trainer_state",
    "restore_rng",
    "rotate_checkpoints",
    "save_checkpoint",
    "take_snapshot",
    "unwrap",
    "verify_checkpoint",
    "write_snapshot",
]
