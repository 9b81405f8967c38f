"""The chat template: `<|role|>` content `<|end|>` per turn, then `<|endoftext|>`; labels on assistant tokens only.

The role and end markers are special tokens of the run's tokenizer: the byte tokenizer's ids 258..261, or a
tokenizer.json's (HFTokenizer.with_chat_tokens adds them where missing).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from exp.losses import IGNORE_INDEX

from ..tokenizer import EOT, ByteTokenizer

Turn = dict  # {"role": "system" | "user" | "assistant", "content": str}

ROLES = ("system", "user", "assistant")
ROLE_IDS = {role: ByteTokenizer.specials[f"<|{role}|>"] for role in ROLES}
END = ByteTokenizer.specials["<|end|>"]
_BYTES = ByteTokenizer()


def _body(tokenizer, text: str) -> np.ndarray:
    if isinstance(tokenizer, ByteTokenizer):  # the fast path: bytes are their ids
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)
    return np.asarray(tokenizer.encode(text), dtype=np.int32)


def chat_markers(tokenizer) -> tuple[dict[str, int], int, int]:
    """({role: id}, end id, end-of-text id) of a tokenizer."""
    if isinstance(tokenizer, ByteTokenizer):
        return ROLE_IDS, END, EOT
    return {r: tokenizer.special(r) for r in ROLES}, tokenizer.special("end"), tokenizer.EOT


def encode_arrays(turns: Sequence[Turn], tokenizer=_BYTES) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) int32 arrays of a conversation; see encode_chat."""
    roles, end, eot = chat_markers(tokenizer)
    ids, labels = [], []
    for turn in turns:
        body = _body(tokenizer, turn["content"])
        seg = np.empty(len(body) + 2, dtype=np.int32)  # <|role|> content <|end|>
        seg[0], seg[1:-1], seg[-1] = roles[turn["role"]], body, end
        lab = seg.copy() if turn["role"] == "assistant" else np.full_like(seg, IGNORE_INDEX)
        lab[0] = IGNORE_INDEX
        ids.append(seg)
        labels.append(lab)
    ids.append(np.array([eot], dtype=np.int32))
    labels.append(np.array([IGNORE_INDEX], dtype=np.int32))
    return np.concatenate(ids), np.concatenate(labels)


def encode_chat(turns: Sequence[Turn], tokenizer=_BYTES) -> tuple[list[int], list[int]]:
    """(input_ids, labels): `<|role|>` content `<|end|>` per turn, then `<|endoftext|>`.

    Labels are the ids of assistant content and its `<|end|>`, -100 elsewhere, at the token's own
    position: training pairs x = ids[:-1] with y = labels[1:].
    """
    ids, labels = encode_arrays(turns, tokenizer)
    return ids.tolist(), labels.tolist()


def chat_prompt(turns: Sequence[Turn], tokenizer=_BYTES) -> list[int]:
    """The ids that ask the model for the assistant's next turn: the turns as in training, then `<|assistant|>`
    (the reply ends at `<|end|>`)."""
    roles, end, _ = chat_markers(tokenizer)
    ids: list[int] = []
    for turn in turns:
        ids += [roles[turn["role"]], *_body(tokenizer, turn["content"]).tolist(), end]
    return ids + [roles["assistant"]]
