"""One-line texts every command and log line shares: an error's first line, a loss for a table."""

from __future__ import annotations

import math


def first_line(error: BaseException, limit: int = 500) -> str:
    """The first line of an error's message (its type name when empty), at most `limit` characters."""
    lines = str(error).strip().splitlines()
    return lines[0][:limit] if lines else type(error).__name__


def fmt_loss(value, missing: str = "-") -> str:
    """A loss with four decimals; `missing` for None, NaN or anything not a finite number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return missing
    return f"{value:.4f}"
