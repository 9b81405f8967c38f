"""Examples and batches: truncation to a row, packing, padded (x, y) batches, and the resumable example sampler."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from exp.losses import IGNORE_INDEX

from ..batches import GLOBAL, Sampler, check_scope
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
    """Batches of whole examples, reshuffled each epoch; state saves/restores.

    Every epoch's rows come from one seeded permutation of all examples (packed in that order): the stream all ranks
    share, each taking its slice of every micro-batch of world_size * batch_size rows, so N ranks of batch B see
    what one process of batch N*B sees and the state (epoch, index: the next row) fits any number of ranks. An older
    checkpoint's state (ranks took every world_size-th example and packed their own rows) continues that way, with
    as many ranks as saved it.
    """

    kind = "an SFT sampler"
    counters = ("epoch", "index", "num_batches")  # index: the next row of this epoch's rows

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
        self._per_rank = False  # an older checkpoint's stream: this rank's shard of the examples

    def rows_for(self, epoch: int) -> list[list[int]]:
        """The rows of an epoch (with an older checkpoint's state, this rank's rows: every world_size-th example)."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        if self._per_rank:
            perm = perm[self.rank :: self.world_size]
        return pack_rows(self.examples.lengths, perm, self.row_len, self.packing)

    def _walk(self, n: int) -> list[list[int]]:
        """The next n rows of the stream, running on into the next epoch."""
        picked: list[list[int]] = []
        while len(picked) < n:
            if self._rows is None:
                self._rows = self.rows_for(self.epoch)
            if self.index >= len(self._rows):
                self.epoch, self.index, self._rows = self.epoch + 1, 0, None
                continue
            take = self._rows[self.index : self.index + n - len(picked)]
            picked += take
            self.index += len(take)
        return picked

    def __next__(self) -> Batch:
        before, after = self.rank, self.world_size - self.rank - 1
        if self._per_rank:
            before = after = 0
        self._walk(before * self.batch_size)
        picked = self._walk(self.batch_size)
        self._walk(after * self.batch_size)  # the stream stands where every rank's share was taken
        self.num_batches += 1
        return self.batch(picked)

    def batch(self, rows: list[list[int]]) -> Batch:
        """The (x, y) batch of these rows."""
        return make_batch(self.examples, rows, self.row_len)

    def state_dict(self) -> dict:
        """The stream's epoch and next row (an older checkpoint's per-rank form while resumed from one)."""
        if self._per_rank:
            keys = ("seed", "rank", "world_size", *self.counters)
            return {k: int(getattr(self, k)) for k in keys}
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of any rank of any number of ranks. An older checkpoint's state of several ranks
        (rank 0's alone was saved) has every rank walk its own rows as far as rank 0 went, with as many ranks."""
        self._rows = None
        if state.get("scope") == GLOBAL or state.get("world_size", 1) == 1:  # one rank's rows were all the rows
            super().load_state_dict(state)
            return
        check_scope(state, self.world_size)
        if not {"seed", "epoch", "index", "num_batches"} <= state.keys() or state["seed"] != self.seed:
            raise ValueError(f"sampler state is not that of {self.kind} with seed {self.seed}")
        self._per_rank = True
        self.epoch = self.index = 0
        self._walk(int(state["num_batches"]) * self.batch_size)  # every rank drew as many rows of its own
        self.num_batches = int(state["num_batches"])
