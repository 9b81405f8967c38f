"""Where records come from: JSONL files and Hugging Face datasets (`hf:NAME`), each record with its location."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .. import hf
from ..protocol import DataError
from .formats import parse_record
from .template import Turn


class SFTDataError(DataError):
    """A record that cannot be used; the message starts with its `file:line`."""


def read_jsonl(path: str | Path) -> Iterator[tuple[str, object]]:
    """(`file:line`, parsed JSON) per non-blank line; SFTDataError for a line that is not JSON."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                yield f"{path}:{lineno}", json.loads(raw)
            except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
                msg = e.msg if isinstance(e, json.JSONDecodeError) else "not UTF-8"
                raise SFTDataError(f"{path}:{lineno}: not valid JSON ({msg})") from None


def read_hf(name: str, split: str) -> Iterator[tuple[str, object]]:
    """(`hf:NAME[split]:row`, record) from a Hugging Face dataset (any source exp.data.hf reads); needs `datasets`."""
    try:
        yield from hf.records(f"hf:{name}", split)
    except hf.HFSourceError as e:  # already led by the source
        raise SFTDataError(str(e)) from None


def read_records(source: str, split: str = "train") -> Iterator[tuple[str, object]]:
    """Records from a JSONL file or `hf:NAME` (that dataset's split)."""
    return read_hf(source[3:], split) if source.startswith("hf:") else read_jsonl(Path(source).expanduser())


def load_conversations(
    records: Iterable[tuple[str, object]], format: str = "auto", fields: Sequence[str] | None = None
) -> list[tuple[str, object, list[Turn]]]:
    """(location, record, turns) per record; SFTDataError names the location of the first bad one."""
    out = []
    for where, record in records:
        try:
            out.append((where, record, parse_record(record, format, fields)))
        except ValueError as e:
            raise SFTDataError(f"{where}: {e}") from None
    return out
