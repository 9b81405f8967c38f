"""Record formats: messages, ShareGPT conversations, prompt/response (or completion), and named fields."""

from __future__ import annotations

from collections.abc import Sequence

from .template import ROLE_IDS, Turn

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("auto", "messages", "conversations", "prompt_response", "fields")


def _turn(role: object, content: object, what: str) -> Turn:
    if role not in ROLE_IDS:
        raise ValueError(f"{what}: role {role!r} is not one of {', '.join(ROLE_IDS)}")
    if not isinstance(content, str):
        raise ValueError(f"{what}: content is {type(content).__name__}, not a string")
    return {"role": role, "content": content}


def _turn_list(record: dict, key: str, role_key: str, content_key: str, roles: dict | None) -> list[Turn]:
    items = record[key]
    if not isinstance(items, list):
        raise ValueError(f"{key!r} is {type(items).__name__}, not a list")
    turns = []
    for i, item in enumerate(items):
        if not isinstance(item, dict) or role_key not in item or content_key not in item:
            raise ValueError(f"{key}[{i}] must be an object with {role_key!r} and {content_key!r}")
        role = item[role_key]
        role = roles.get(role, role) if roles is not None and isinstance(role, str) else role
        turns.append(_turn(role, item[content_key], f"{key}[{i}]"))
    return turns


def _prompt_response(record: dict, fields: Sequence[str] | None) -> list[Turn]:
    answer = "response" if "response" in record else "completion"
    return [_turn("user", record["prompt"], "'prompt'"), _turn("assistant", record.get(answer), repr(answer))]


def _fields(record: dict, fields: Sequence[str] | None) -> list[Turn]:
    missing = [f for f in fields if f not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (keys: {', '.join(sorted(record))})")
    for f in fields:
        if record[f] is not None and not isinstance(record[f], str):
            raise ValueError(f"field {f!r} is {type(record[f]).__name__}, not a string")
    *prompt, answer = fields
    turns = [_turn("user", "\n\n".join(record[f] for f in prompt if record[f]), "prompt")] if prompt else []
    return [*turns, _turn("assistant", record[answer] or "", repr(answer))]


PARSERS = {
    "messages": lambda r, f: _turn_list(r, "messages", "role", "content", None),
    "conversations": lambda r, f: _turn_list(r, "conversations", "from", "value", SHAREGPT_ROLES),
    "prompt_response": _prompt_response,
    "fields": _fields,
}


def _has_keys(record: dict, fmt: str, fields: Sequence[str] | None) -> bool:
    if fmt == "prompt_response":
        return "prompt" in record and ("response" in record or "completion" in record)
    return all(k in record for k in fields) if fmt == "fields" else fmt in record


def detect_format(record: dict, fields: Sequence[str] | None = None) -> str:
    """The format a record is in, by its keys; configured fields win when all are present."""
    for fmt in ("fields", *FORMATS[1:4]) if fields else FORMATS[1:4]:
        if _has_keys(record, fmt, fields):
            return fmt
    expected = "messages, conversations, prompt+response, prompt+completion" + (
        f" or fields {list(fields)}" if fields else " (or set data.fields)"
    )
    raise ValueError(f"no recognisable format in keys [{', '.join(map(str, sorted(record)))}]; expected {expected}")


def parse_record(record: object, format: str = "auto", fields: Sequence[str] | None = None) -> list[Turn]:
    """A record in any supported format as turns; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    fmt = detect_format(record, fields) if format == "auto" else format
    if fmt != "fields" and not _has_keys(record, fmt, fields):
        raise ValueError(f"not in format {fmt} (keys: [{', '.join(map(str, sorted(record)))}])")
    turns = PARSERS[fmt](record, fields)
    if not any(t["role"] == "assistant" for t in turns):
        raise ValueError("no assistant turn, so nothing to learn")
    return turns
