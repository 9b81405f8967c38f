"""The errors exp reports as one line and an exit status instead of a traceback (exp.job maps them)."""

from __future__ import annotations


class ExpError(Exception):
    """An error with a one-line message and the exit status a command ends with."""

    exit_code = 1
    prefix = "error"

    def line(self) -> str:
        return f"{self.prefix}: {self}" if self.prefix else str(self)


class ConfigError(ExpError, ValueError):
    """A config value is wrong; the message names the key. Found before anything is written."""

    exit_code = 2
    prefix = "config error"


class ResumeError(ExpError):
    """The checkpoint a run should continue from cannot be used; the message names it."""

    exit_code = 2


class TrainingFailed(ExpError, RuntimeError):
    """Training cannot go on; the message says why and what to change."""


class DiskFull(TrainingFailed):
    """A checkpoint did not fit on its disk; the message names the directory and the space it needs."""


class Stopped(ExpError):
    """A signal stopped the run after its step and a checkpoint: exit 128 + the signal's number."""

    prefix = ""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.exit_code = 128 + signum


class CheckpointError(RuntimeError):
    """A checkpoint is missing, corrupt, incompatible with the model, or its run directory is locked."""
