"""The chat template: `<|role|>` content `<|end|>` per turn, then `<|endoftext|>`; labels on assistant tokens only."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from exp.losses import IGNORE_INDEX

from ..tokenizer import EOT, ByteTokenizer

Turn = dict  # {"role": "system" | "user" | "assistant", "content": str}

ROLE_IDS = {role: ByteTokenizer.specials[f"<|{role}|>"] for role in ("system", "user", "assistant")}
END = ByteTokenizer.specials["<|end|>"]


def encode_arrays(turns: Sequence[Turn]) -> tuple[np.ndarray, np.ndarray]:
    """(ids, labels) int16 arrays of a conversation; see encode_chat."""
    ids, labels = [], []
    for turn in turns:
        body = np.frombuffer(turn["content"].encode("utf-8"), dtype=np.uint8)
        seg = np.empty(len(body) + 2, dtype=np.int16)  # <|role|> content <|end|>
        seg[0], seg[1:-1], seg[-1] = ROLE_IDS[turn["role"]], body, END
        lab = seg.copy() if turn["role"] == "assistant" else np.full_like(seg, IGNORE_INDEX)
        lab[0] = IGNORE_INDEX
        ids.append(seg)
        labels.append(lab)
    ids.append(np.array([EOT], dtype=np.int16))
    labels.append(np.array([IGNORE_INDEX], dtype=np.int16))
    return np.concatenate(ids), np.concatenate(labels)


def encode_chat(turns: Sequence[Turn]) -> tuple[list[int], list[int]]:
    """(input_ids, labels): `<|role|>` content `<|end|>` per turn, then `<|endoftext|>`.

    Labels are the ids of assistant content and its `<|end|>`, -100 elsewhere, at the token's own
    position: training pairs x = ids[:-1] with y = labels[1:].
    """
    ids, labels = encode_arrays(turns)
    return ids.tolist(), labels.tolist()
