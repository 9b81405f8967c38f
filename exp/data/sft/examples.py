"""Examples and batches: truncation to a row, packing, padded (x, y) batches, and the resumable example sampler."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from exp.losses import IGNORE_INDEX

from ..batches import Sampler
from ..protocol import Batch
from ..tokenizer import PAD


@dataclass
class Examples:
    """Tokenized examples stored back to back, each at most one row long."""

    tokens: np.ndarray  # (N,) int32
    labels: np.ndarray  # (N,) int32, -100 where not a target
    offsets: np.ndarray  # (n + 1,) int64: example i is [offsets[i], offsets[i + 1])
    pad: int = PAD  # the tokenizer's <|pad|> id, which fills the rest of a row

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def fit_examples(
    encoded: Iterable[tuple[np.ndarray, np.ndarray]], row_len: int, pad: int = PAD
) -> tuple[Examples, dict]:
    """Cut examples to row_len tokens, dropping those left without a target; returns them and the counts."""
    ids, labels = [], []
    counts = {"num_examples": 0, "num_dropped": 0, "num_truncated": 0, "num_truncated_tokens": 0}
    for x, y in encoded:
        cut = len(x) - row_len
        x, y = x[:row_len], y[:row_len]
        if not (y[1:] != IGNORE_INDEX).any():  # y[0] is never a target: x = ids[:-1] pairs with labels[1:]
            counts["num_dropped"] += 1
            continue
        if cut > 0:
            counts["num_truncated"] += 1
            counts["num_truncated_tokens"] += cut
        ids.append(x)
        labels.append(y)
    counts["num_examples"] = len(ids)
    offsets = np.zeros(len(ids) + 1, dtype=np.int64)
    np.cumsum([len(x) for x in ids], out=offsets[1:])
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    ex = Examples(cat(ids), cat(labels), offsets, pad)
    counts["num_tokens"] = len(ex.tokens)
    counts["num_label_tokens"] = int((ex.labels != IGNORE_INDEX).sum())
    return ex, counts


def pack_rows(lengths: np.ndarray, order: Iterable[int], row_len: int, packing: bool = True) -> list[list[int]]:
    """Example indices per row: with packing, whole examples in order until the next does not fit; else one each."""
    if not packing:
        return [[int(i)] for i in order]
    rows, row, used = [], [], 0
    for i in order:
        n = int(lengths[i])
        if row and used + n > row_len:
            rows.append(row)
            row, used = [], 0
        row.append(int(i))
        used += n
    return rows + [row] if row else rows


def make_batch(ex: Examples, rows: Sequence[Sequence[int]], row_len: int) -> Batch:
    """(x, y) int64 (B, row_len - 1): the rows' examples back to back, padded with <|pad|> and -100."""
    ids = np.full((len(rows), row_len), ex.pad, dtype=np.int64)
    labels = np.full((len(rows), row_len), IGNORE_INDEX, dtype=np.int64)
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            s, e = ex.offsets[i], ex.offsets[i + 1]
            ids[b, pos : pos + e - s] = ex.tokens[s:e]
            labels[b, pos : pos + e - s] = ex.labels[s:e]
            pos += e - s
    return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(labels[:, 1:].copy())


class ExampleSampler(Sampler):
    """Batches of whole examples, reshuffled each epoch; ranks take disjoint shards; state saves/restores.

    The state is per rank (its shard's position): it loads only into the same rank of as many ranks.
    """

    kind = "an SFT sampler"
    fixed = ("rank", "world_size")
    counters = ("seed", "epoch", "index", "num_batches")  # index: next row of this epoch's rows

    def __init__(
        self,
        examples: Examples,
        row_len: int,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
        packing: bool = False,
    ):
        super().__init__(batch_size, seed, rank, world_size)
        if len(examples) < world_size:
            raise ValueError(f"{len(examples)} train examples cannot be shared by {world_size} ranks")
        self.examples, self.row_len, self.packing = examples, row_len, packing
        self.epoch = self.index = 0
        self._rows: list[list[int]] | None = None

    def rows_for(self, epoch: int) -> list[list[int]]:
        """This rank's rows in an epoch: every world_size-th example of one shared permutation."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return pack_rows(self.examples.lengths, perm[self.rank :: self.world_size], self.row_len, self.packing)

    def __next__(self) -> Batch:
        picked: list[list[int]] = []
        while len(picked) < self.batch_size:  # a batch may run on into the next epoch
            if self._rows is None:
                self._rows = self.rows_for(self.epoch)
            if self.index >= len(self._rows):
                self.epoch, self.index, self._rows = self.epoch + 1, 0, None
                continue
            take = self._rows[self.index : self.index + self.batch_size - len(picked)]
            picked += take
            self.index += len(take)
        self.num_batches += 1
        return make_batch(self.examples, picked, self.row_len)

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of the same rank of as many ranks (another's shard would overlap)."""
        super().load_state_dict(state)
        self._rows = None
