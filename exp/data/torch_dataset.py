"""Your own map-style torch Dataset of token sequences as a `data` target (exp.data.TorchDataset).

    data=torch_dataset +data.dataset._target_=my_pkg.MyDataset +data.dataset.path=... data.vocab_size=N

Each item is one document: a 1-D sequence of token ids (a list, tuple, numpy array or integer tensor)
of 2 or more ids below vocab_size. Training takes the items in a seeded random order, reshuffled each
epoch (as DataLoader(shuffle=True) does), one row per item: a seeded random crop of seq_len + 1 ids from
a longer item, the whole of a shorter one. x is the row's ids but the last, y the same ids shifted by one;
a short row is padded after its end (x with 0, y with -100, which no loss counts: a causal model never
attends to the padding from earlier positions). Validation: val_dataset, else a fixed random val_fraction
of the items (the same for every seed), each as its first seq_len + 1 ids. The sampler's position is a
count of items drawn, so a resumed run continues bit-exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from exp.losses import IGNORE_INDEX
from exp.text import first_line

from .batches import Sampler, check_max_examples, fixed_subset
from .corpus import check_val_fraction, holdout
from .protocol import Batch, DataError

PAD_ID = 0  # input id of the padding after a short item; its targets are IGNORE_INDEX, so the value never matters
NUM_CHECKED_ITEMS = 16  # check() reads this many items, evenly spaced, of each dataset


def token_ids(item: object) -> np.ndarray:
    """An item as a 1-D int64 array; ValueError saying what it is instead."""
    what = type(item).__name__
    if isinstance(item, torch.Tensor):
        if item.dtype == torch.bool or item.is_floating_point() or item.is_complex():
            raise ValueError(f"is a tensor of {item.dtype}, not integer token ids")
        arr = item.detach().cpu().numpy()
    elif isinstance(item, str | bytes | Mapping):
        raise ValueError(f"is a {what}, not a 1-D sequence of token ids")
    else:
        try:
            arr = np.asarray(item)
        except (TypeError, ValueError) as e:  # ragged nested lists
            raise ValueError(f"is a {what} that is not a 1-D sequence of token ids ({first_line(e)})") from None
    if arr.ndim != 1:
        raise ValueError(
            f"is a {what} of shape {tuple(arr.shape)}, not a 1-D sequence of token ids "
            "(an item is one token sequence: x and y are cut from it)"
        )
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"is a {what} of {arr.dtype} values, not integer token ids")
    if len(arr) < 2:
        raise ValueError(f"holds {len(arr)} token id(s); an item needs 2 or more (an input and its target)")
    return arr.astype(np.int64, copy=False)


def _collate(rows: list[np.ndarray], seq_len: int) -> Batch:
    """(x, y) int64 (B, seq_len) of rows of 2..seq_len + 1 ids: x padded with PAD_ID, y with IGNORE_INDEX."""
    x = np.full((len(rows), seq_len), PAD_ID, dtype=np.int64)
    y = np.full((len(rows), seq_len), IGNORE_INDEX, dtype=np.int64)
    for b, row in enumerate(rows):
        x[b, : len(row) - 1], y[b, : len(row) - 1] = row[:-1], row[1:]
    return torch.from_numpy(x), torch.from_numpy(y)


class TorchDataset:
    """A map-style torch Dataset of token sequences (see the module docstring) as a DataSource.

    dataset / val_dataset arrive built: Hydra instantiates their `_target_` nodes first.
    """

    name = "torch_dataset"

    def __init__(
        self,
        dataset: Dataset,
        seq_len: int,
        vocab_size: int,
        val_dataset: Dataset | None = None,
        val_fraction: float = 0.05,
        max_examples: int | None = None,
    ):
        if int(seq_len) <= 0:
            raise DataError(f"data.seq_len must be > 0, got {seq_len}")
        if int(vocab_size) <= 0:
            raise DataError(f"data.vocab_size={vocab_size} must be > 0")
        self.dataset, self.val_dataset = dataset, val_dataset
        self.seq_len, self.vocab_size, self.val_fraction = (
            int(seq_len),
            int(vocab_size),
            check_val_fraction(val_fraction),
        )
        self.max_examples = check_max_examples(max_examples)  # a fixed subset of the train items, for quick runs
        self._split: tuple[np.ndarray, np.ndarray] | None = None

    def _datasets(self) -> list[tuple[str, object]]:
        given = [("data.dataset", self.dataset), ("data.val_dataset", self.val_dataset)]
        return [(key, ds) for key, ds in given if ds is not None]

    def check(self) -> None:
        """Each dataset is a non-empty map-style dataset; NUM_CHECKED_ITEMS of its items are token sequences
        with ids in [0, vocab_size); without val_dataset, there are items to hold out. Raises DataError."""
        for key, ds in self._datasets():
            num_items = self._len(key, ds)
            for i in np.unique(np.linspace(0, num_items - 1, min(num_items, NUM_CHECKED_ITEMS)).round().astype(int)):
                self._load(key, ds, int(i))
        if self.val_dataset is None and self._len("data.dataset", self.dataset) < 2:
            raise DataError("data.dataset: holds 1 item, and validation needs another: set data.val_dataset")

    @staticmethod
    def _len(key: str, ds: object) -> int:
        if isinstance(ds, str | bytes | Mapping):  # a config node without _target_, or a class name as a string
            raise DataError(
                f"{key}: is a {type(ds).__name__}, not a Dataset: give it a _target_ (+{key}._target_=my_pkg.MyDataset)"
            )
        try:
            n = len(ds)
        except TypeError:
            raise DataError(
                f"{key}: {type(ds).__name__} has no len(): a map-style Dataset needs __len__ and __getitem__"
            ) from None
        if n == 0:
            raise DataError(f"{key}: {type(ds).__module__}.{type(ds).__qualname__} is empty")
        return n

    def _load(self, key: str, ds, index: int) -> np.ndarray:
        """Item `index` as checked token ids; DataError naming the key and index."""
        try:
            item = ds[index]
        except Exception as e:
            raise DataError(f"{key}[{index}]: reading it raised {type(e).__name__}: {first_line(e)}") from None
        try:
            ids = token_ids(item)
        except ValueError as e:
            raise DataError(f"{key}[{index}]: {e}") from None
        low, high = int(ids.min()), int(ids.max())
        if low < 0 or high >= self.vocab_size:
            bad = low if low < 0 else high
            raise DataError(
                f"{key}[{index}]: holds token id {bad}, outside [0, data.vocab_size={self.vocab_size})"
                + (f" (set data.vocab_size={high + 1} or more if that is the tokenizer's size)" if low >= 0 else "")
            )
        return ids

    def splits(self) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) item indices: all of dataset and all of val_dataset, or a held-out share of dataset."""
        if self._split is None:
            n = self._len("data.dataset", self.dataset)
            if self.val_dataset is not None:
                self._split = np.arange(n), np.arange(self._len("data.val_dataset", self.val_dataset))
            else:  # seed 0, not the run's: runs with other seeds are compared on the same items
                self._split = holdout(np.random.default_rng(0).random(n), self.val_fraction)
            train, val = self._split
            self._split = train[fixed_subset(len(train), self.max_examples)], val
        return self._split

    def epoch_size(self) -> int:
        """Training items in one pass (stage.num_epochs)."""
        return len(self.splits()[0])

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> ItemSampler:
        """One row per item, in a seeded order reshuffled each epoch; ranks take slices of one global batch."""
        load = lambda i: self._load("data.dataset", self.dataset, i)
        return ItemSampler(load, self.splits()[0], self.seq_len, batch_size, seed, rank, world_size)

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """The first seq_len + 1 ids of val items evenly spaced over the val set, the same every call and run."""
        if batch_size <= 0 or num_batches <= 0:
            raise ValueError(f"batch_size and num_batches must be > 0, got {batch_size} and {num_batches}")
        key, ds = (
            ("data.val_dataset", self.val_dataset) if self.val_dataset is not None else ("data.dataset", self.dataset)
        )
        val = self.splits()[1]
        num_batches = max(1, min(num_batches, len(val) // batch_size))
        picks = val[np.linspace(0, len(val) - 1, num_batches * batch_size).round().astype(np.int64)]
        rows = [self._load(key, ds, int(i))[: self.seq_len + 1] for i in picks]
        return [_collate(rows[b : b + batch_size], self.seq_len) for b in range(0, len(rows), batch_size)]

    def tokenizer(self):
        """Byte tokens when data.vocab_size is the byte tokenizer's; else unknown (None: no end-of-run sample)."""
        from .tokenizer import VOCAB_SIZE, ByteTokenizer

        return ByteTokenizer() if self.vocab_size == VOCAB_SIZE else None

    def describe(self) -> dict:
        """Small dict for logging: the dataset classes and, once split, the item counts."""
        kind = lambda ds: f"{type(ds).__module__}.{type(ds).__qualname__}" if ds is not None else None
        out = {
            "name": self.name,
            "seq_len": self.seq_len,
            "vocab_size": self.vocab_size,
            "dataset": kind(self.dataset),
            "val_dataset": kind(self.val_dataset),
        }
        if self.val_dataset is None:
            out["val_fraction"] = self.val_fraction
        if self._split is not None:
            out.update(num_train_items=len(self._split[0]), num_val_items=len(self._split[1]))
        return out


class ItemSampler(Sampler):
    """Training batches of one row per item: all ranks walk one seeded order of the items (a new permutation
    each epoch) and each takes its slice of every global batch of world_size * batch_size items, so N ranks of
    batch B see what one process of batch N*B sees. The state is the number of items drawn, the same on all ranks.
    """

    kind = "a TorchDataset sampler"

    def __init__(
        self, load, items: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        super().__init__(batch_size, seed, rank, world_size)
        self.load, self.items, self.seq_len = load, items, seq_len
        self._order: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def item_at(self, position: int) -> int:
        """The item index drawn at a position of the global stream."""
        epoch, k = divmod(position, len(self.items))
        if self._order is None or self._order[0] != epoch:
            self._order = epoch, np.random.default_rng([self.seed, epoch]).permutation(len(self.items))
        return int(self.items[self._order[1][k]])

    def row_at(self, position: int) -> np.ndarray:
        """The item at a position, cropped to seq_len + 1 ids at a start seeded by the position."""
        ids = self.load(self.item_at(position))
        if len(ids) <= self.seq_len + 1:
            return ids
        start = np.random.default_rng([self.seed, position]).integers(0, len(ids) - self.seq_len)
        return ids[start : start + self.seq_len + 1]

    def __next__(self) -> Batch:
        first = self.take_share()
        return _collate([self.row_at(p) for p in range(first, first + self.batch_size)], self.seq_len)
