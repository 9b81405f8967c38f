"""What a run asks of its data: the DataSource protocol every `data` target follows, and DataError.

exp.config builds the `data` node and calls check() while validating (before anything is written);
exp.run then asks for one train sampler and a fixed list of validation batches, and logs describe()
(and stats(), where the data has them) once. Checkpoints store the sampler's state_dict(), and a resumed
run hands it back to load_state_dict(), so the batches after a resume are the ones the uninterrupted run
would have drawn. A plain map-style torch Dataset of token sequences fits through exp.data.TorchDataset.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol, runtime_checkable

import torch

# x: (batch, seq_len) int64 input ids; y: (batch, seq_len) int64 targets, exp.losses.IGNORE_INDEX (-100)
# where a position has none (padding, prompts): the stages' losses skip those positions
Batch = tuple[torch.Tensor, torch.Tensor]


class DataError(ValueError):
    """A data config that cannot work; the message names the config key and path."""


@runtime_checkable
class TrainSampler(Protocol):
    """An endless iterator of training batches whose position saves and restores exactly.

    state_dict() is JSON-serialisable and goes into every checkpoint (rank 0's); load_state_dict() on a sampler
    built with the same arguments continues with the very batch the saved one would have drawn next. A state with
    "scope": "global" says it is a position in one stream all ranks share (exp.data.batches.Sampler), so any rank of
    any number of ranks, with any batch size, continues from it: a run may then resume at another world size.
    Without it, the state is taken as one rank's, and a checkpoint resumes only with as many ranks as saved it.
    """

    def __iter__(self) -> Iterator[Batch]: ...

    def __next__(self) -> Batch: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


@runtime_checkable
class DataSource(Protocol):
    """The `data` group's interface: what exp.config and exp.run call on the object `data._target_` builds.

    Constructors take `seq_len` and `vocab_size` (model configs interpolate ${data.seq_len} and
    ${data.vocab_size} from them, and a run reads them back) and stay cheap: no file is opened before
    check(). Optionally, `document_mask: bool` says the rows pack several documents, each ending in the
    tokenizer's end-of-text token, that must not attend to one another (document_token; data.document_mask),
    and `stats() -> dict` adds counts (examples, truncation) to the log and summary.json, and
    `tokenizer()` returns the tokenizer that made the ids (exp.data.tokenizer: ByteTokenizer or HFTokenizer) or
    None: the run's sample, checkpoints and exports use it; without one the run has no end-of-run sample.
    """

    seq_len: int
    vocab_size: int

    def check(self) -> None:
        """Validate cheaply, before a run starts; raise DataError whose message begins with the config key."""

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> TrainSampler:
        """This rank's training batches of (batch_size, seq_len), drawn from `seed`."""

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """Fixed validation batches: the same on every call, in every run (at most num_batches of them)."""

    def describe(self) -> dict:
        """A small dict of plain values for the log and summary.json."""


MEMBERS = ("seq_len", "vocab_size", "check", "train_sampler", "val_batches", "describe")  # of DataSource


def check_data_source(data: object) -> None:
    """DataError naming the DataSource members `data` lacks; a plain Dataset is told how to adapt it."""
    missing = [name for name in MEMBERS if not hasattr(data, name)]
    if missing:
        kind = f"{type(data).__module__}.{type(data).__qualname__}"
        hint = (
            ": a map-style torch Dataset of token sequences goes in data=torch_dataset +data.dataset._target_=" + kind
            if hasattr(data, "__getitem__")
            else ""
        )
        raise DataError(f"data._target_: {kind} lacks {', '.join(missing)} of exp.data.DataSource{hint}")


def document_token(data: object) -> int | None:
    """The end-of-text id that ends each document in the data's rows when its document_mask is on, else None."""
    if not getattr(data, "document_mask", False):
        return None
    tokenizer = data.tokenizer() if hasattr(data, "tokenizer") else None
    if tokenizer is None:
        raise DataError(
            "data.document_mask=true needs the data's tokenizer for its end-of-text token, and this data has none "
            "(a token file without tokenizer.json and not of bytes)"
        )
    return int(tokenizer.EOT)
