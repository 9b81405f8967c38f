"""The SFT data group targets: SFTData (the DataSource base), SFTJsonl (your records), SFTPyStdlib (the default)."""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from exp.losses import IGNORE_INDEX
from exp.text import first_line

from ..batches import check_max_examples, fixed_subset
from ..cache import check_cache_dir
from ..corpus import check_val_fraction, holdout, split_value
from ..protocol import Batch, DataError
from ..tokenizer import VOCAB_SIZE, ByteTokenizer, check_byte_vocab
from .examples import Examples, ExampleSampler, fit_examples, make_batch, pack_rows
from .formats import FORMATS
from .sources import SFTDataError, load_conversations, read_jsonl, read_records
from .stdlib import pystdlib_sft
from .template import Turn, encode_arrays

_CHECKED: set[tuple] = set()  # SFTData._check_key() of data that passed check() in this process


class SFTData:
    """Base: (train, val) conversations as (x, y) batches of seq_len, with the pretraining data interface.

    An example (or a packed row) holds at most seq_len + 1 tokens: seq_len inputs plus the final target,
    as in the pretraining windows. Longer examples are truncated; ones left with no target are dropped.
    """

    name = "sft"

    def __init__(
        self,
        seq_len: int,
        packing: bool,
        vocab_size: int,
        tokenizer: str | None = None,
        max_examples: int | None = None,
        document_mask: bool | None = None,
    ):
        self.max_examples = check_max_examples(max_examples)  # a fixed subset of each split, for quick runs
        self.tokenizer_path = None if tokenizer in (None, "bytes") else str(tokenizer)
        self._tok = None
        if self.tokenizer_path is None:
            self.vocab_size = check_byte_vocab(vocab_size)
        else:
            self.vocab_size = int(vocab_size)
            if self.vocab_size != self.tokenizer().vocab_size:
                raise DataError(
                    f"data.vocab_size={vocab_size} but data.tokenizer={self.tokenizer_path} has "
                    f"{self.tokenizer().vocab_size} tokens (chat tokens included): leave data.vocab_size unset"
                )
        if int(seq_len) <= 0:
            raise ValueError(f"data.seq_len must be > 0, got {seq_len}")
        self.seq_len, self.packing = int(seq_len), bool(packing)
        # examples packed in a row attend only to themselves (each ends in <|endoftext|>): on by default when packing
        self.document_mask = self.packing if document_mask is None else bool(document_mask)
        self._data: tuple[Examples, Examples] | None = None
        self._counts: dict[str, dict] | None = None

    def __getstate__(self) -> dict:
        # pickled into launcher jobs: ship the config, not the loaded examples or tokenizer
        return {**self.__dict__, "_data": None, "_counts": None, "_tok": None}

    def tokenizer(self):
        """The run's tokenizer: bytes, or data.tokenizer's tokenizer.json with the chat tokens added."""
        if self._tok is None:
            if self.tokenizer_path is None:
                self._tok = ByteTokenizer()
            else:
                from ..bpe import open_tokenizer

                try:
                    self._tok = open_tokenizer(self.tokenizer_path).with_chat_tokens()
                except (OSError, ValueError, ImportError) as e:
                    raise DataError(f"data.tokenizer={self.tokenizer_path}: {first_line(e)}") from None
        return self._tok

    def _encode(self, turns):
        return encode_arrays(turns, self.tokenizer())

    @property
    def row_len(self) -> int:
        return self.seq_len + 1

    def check(self) -> None:
        """Sources exist, every record parses, each split keeps an example at seq_len; raises DataError.

        This reads and tokenizes the data (a fraction of a second for the stdlib set): bad records and
        a seq_len that drops everything are found in validation, before a run (or a pipeline) starts.
        """
        self.check_sources()
        key = self._check_key()
        if key not in _CHECKED:  # a sweep validates every point, and a run validates again: read once
            self.examples()
            _CHECKED.add(key)

    def check_sources(self) -> None:
        """Cheap checks that the sources can be read at all; raises DataError naming the config key."""

    def source(self, split: str) -> str:
        """Where a split's records come from, as the config key and value, for error messages."""
        return f"data ({split})"

    def conversations(self) -> tuple[list[list[Turn]], list[list[Turn]]]:
        """(train, val) conversations, read from the sources."""
        raise NotImplementedError

    def examples(self) -> tuple[Examples, Examples]:
        """(train, val) tokenized examples, read on first use."""
        if self._data is None:
            self.check_sources()
            splits, counts = [], {}
            for split, convs in zip(("train", "val"), self.conversations(), strict=True):
                convs = [convs[i] for i in fixed_subset(len(convs), self.max_examples)]
                ex, counts[split] = fit_examples(map(self._encode, convs), self.row_len, self.tokenizer().PAD)
                if not len(ex):
                    raise DataError(self._all_dropped(split, convs))
                splits.append(ex)
            self._data, self._counts = tuple(splits), counts
        return self._data

    def _all_dropped(self, split: str, convs: list[list[Turn]]) -> str:
        """The error for a split whose every example lost its targets to the seq_len cut."""
        if not convs:
            return f"{self.source(split)}: no {split} records"
        # the first target sits at the first label after position 0; seq_len must reach it (x = ids[:-1])
        needed = min(int(np.flatnonzero(y[1:] != IGNORE_INDEX)[0]) + 1 for _, y in map(self._encode, convs))
        return (
            f"{self.source(split)}: all {len(convs)} {split} examples were dropped at data.seq_len={self.seq_len} "
            f"(their prompts alone fill the window; the shortest needs seq_len >= {needed}): use a larger model.seq_len"
        )

    def _check_key(self) -> tuple:
        """What a passed check() depends on: the settings, and the size and mtime of local source files."""
        settings = sorted((k, repr(v)) for k, v in vars(self).items() if not k.startswith("_") and k != "set_dir")
        return (type(self).__name__, *settings, self.tokenizer().fingerprint, *self._source_files())

    def _source_files(self) -> list[tuple]:
        return []

    def epoch_size(self) -> int:
        """Training rows in one pass over the examples (stage.num_epochs): one per example, fewer when packed."""
        train = self.examples()[0]
        return len(pack_rows(train.lengths, range(len(train)), self.row_len, self.packing))

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> ExampleSampler:
        """Shuffled training batches for this rank."""
        return ExampleSampler(self.examples()[0], self.row_len, batch_size, seed, rank, world_size, self.packing)

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """Fixed validation batches: rows evenly spaced over the val set, the same every call and run."""
        if batch_size <= 0 or num_batches <= 0:
            raise ValueError(f"batch_size and num_batches must be > 0, got {batch_size} and {num_batches}")
        val = self.examples()[1]
        rows = pack_rows(val.lengths, range(len(val)), self.row_len, self.packing)
        num_batches = max(1, min(num_batches, len(rows) // batch_size))
        picks = np.linspace(0, len(rows) - 1, num_batches * batch_size).round().astype(np.int64)
        return [make_batch(val, [rows[i] for i in p], self.row_len) for p in picks.reshape(num_batches, batch_size)]

    def stats(self) -> dict:
        """Example, truncation and token counts over train + val; completion_ratio = label / non-pad tokens."""
        train, _ = self.examples()
        c = {k: sum(s[k] for s in self._counts.values()) for k in self._counts["train"]}
        rows = len(pack_rows(train.lengths, range(len(train)), self.row_len, self.packing))
        return {
            **c,
            "num_train_examples": self._counts["train"]["num_examples"],
            "num_val_examples": self._counts["val"]["num_examples"],
            "completion_ratio": c["num_label_tokens"] / max(c["num_tokens"], 1),
            "fill_ratio": len(train.tokens) / (rows * self.row_len),  # non-pad share of the train rows
        }

    def describe(self) -> dict:
        """Small dict for logging; counts once the data is loaded."""
        out = {"name": self.name, "seq_len": self.seq_len, "vocab_size": self.vocab_size, "packing": self.packing}
        out["document_mask"] = self.document_mask
        if self.tokenizer_path is not None:
            out["tokenizer"] = self.tokenizer_path
        return {**out, **self.stats()} if self._data is not None else out


class SFTJsonl(SFTData):
    """Chat records from a JSONL file or `hf:NAME`, in the messages / conversations / prompt-response / fields form.

    seq_len is the max length: x and y are (B, seq_len). Validation comes from val_path, else from
    val_split of an hf: path, else a val_fraction of the records held out by a hash of their content.
    """

    name = "sft_jsonl"

    def __init__(
        self,
        path: str,
        seq_len: int,
        format: str = "auto",
        fields: Sequence[str] | str | None = None,
        packing: bool = False,
        val_path: str | None = None,
        val_fraction: float = 0.05,
        split: str = "train",
        val_split: str | None = None,
        vocab_size: int = VOCAB_SIZE,
        tokenizer: str | None = None,
        max_examples: int | None = None,
        document_mask: bool | None = None,
    ):
        super().__init__(seq_len, packing, vocab_size, tokenizer, max_examples, document_mask)
        if format not in FORMATS:
            raise DataError(f"data.format={format} must be one of {', '.join(FORMATS)}")
        if isinstance(fields, str):
            fields = [f.strip() for f in fields.split(",") if f.strip()]
        self.fields = None if fields is None else [str(f) for f in fields]
        if format == "fields" and not self.fields:
            raise DataError("data.fields must list the record fields when data.format=fields (the last is the answer)")
        if self.fields and format not in ("auto", "fields"):
            raise DataError(f"data.fields is only used with data.format=fields or auto, not {format}")
        self.path, self.format, self.split = str(path), str(format), str(split)
        self.val_path = None if val_path is None else str(val_path)
        self.val_split = None if val_split is None else str(val_split)
        self.val_fraction = check_val_fraction(val_fraction)

    def check_sources(self) -> None:
        """Files exist (or `datasets` is installed for hf: sources)."""
        for key, source in (("data.path", self.path), ("data.val_path", self.val_path)):
            if source is None:
                continue
            if source.startswith("hf:"):
                if importlib.util.find_spec("datasets") is None:
                    raise DataError(
                        f"{key}={source} needs the Hugging Face `datasets` package, "
                        "which is not installed (pip install -e '.[hf]')"
                    )
                continue
            p = Path(source).expanduser()
            if not p.exists():
                raise DataError(f"{key}={p} does not exist")
            if not p.is_file():
                raise DataError(f"{key}={p} is not a file (a JSONL file, or hf:NAME for a Hugging Face dataset)")

    def source(self, split: str) -> str:
        """data.path or data.val_path, with the hf split or held-out share that val is."""
        if split == "train":
            return f"data.path={self.path}" + (f" (split {self.split})" if self.path.startswith("hf:") else "")
        if self.val_path is not None:
            return f"data.val_path={self.val_path}" + (
                f" (split {self.val_split or 'validation'})" if self.val_path.startswith("hf:") else ""
            )
        if self.path.startswith("hf:") and self.val_split is not None:
            return f"data.path={self.path} (split {self.val_split})"
        return f"data.path={self.path} (held-out records)"

    def conversations(self) -> tuple[list[list[Turn]], list[list[Turn]]]:
        """(train, val) conversations from the configured sources."""
        read = lambda source, split: load_conversations(read_records(source, split), self.format, self.fields)
        train, val = self.splits(read)
        return [t for _, _, t in train], [t for _, _, t in val]

    def splits(self, read) -> tuple[list, list]:
        """(train, val) of `read(source, split)`'s (location, record, parsed) items: data.path's, and validation from
        val_path, else from val_split of an hf: path, else val_fraction of the records held out by their content."""

        def load(key: str, source: str, split: str) -> list:
            try:
                return read(source, split)
            except SFTDataError as e:  # `file:line: what`, led by the key that names the file
                raise SFTDataError(f"{key}={e}") from None

        train = load("data.path", self.path, self.split)
        if self.val_path is not None:
            return train, load("data.val_path", self.val_path, self.val_split or "validation")
        if self.path.startswith("hf:") and self.val_split is not None:
            return train, load("data.path", self.path, self.val_split)
        keys = [split_value(json.dumps(r, sort_keys=True, default=str)) for _, r, _ in train]
        try:
            train_idx, val_idx = holdout(keys, self.val_fraction)
        except ValueError as e:
            raise DataError(f"data.path={self.path}: {e}; set data.val_path") from None
        return [train[i] for i in train_idx], [train[i] for i in val_idx]

    def _source_files(self) -> list[tuple]:
        local = [Path(s).expanduser().resolve() for s in (self.path, self.val_path) if s and not s.startswith("hf:")]
        return [(str(p), st.st_size, st.st_mtime_ns) for p in local for st in [p.stat()]]

    def describe(self) -> dict:
        """Base description plus sources and format."""
        return {**super().describe(), "path": self.path, "val_path": self.val_path, "format": self.format}


class SFTPyStdlib(SFTData):
    """Documented stdlib functions as prompt (signature + docstring) -> completion (body) pairs, cached.

    seq_len is the max length: x and y are (B, seq_len). max_examples keeps a fixed pseudo-random subset
    of at most that many examples per split, for quick runs; root replaces the stdlib (tests).
    """

    name = "sft_pystdlib"

    def __init__(
        self,
        seq_len: int,
        cache_dir: str = "~/.cache/exp",
        packing: bool = False,
        val_fraction: float = 0.05,
        max_examples: int | None = None,
        root: str | None = None,
        vocab_size: int = VOCAB_SIZE,
        tokenizer: str | None = None,
        document_mask: bool | None = None,
    ):
        super().__init__(seq_len, packing, vocab_size, tokenizer, max_examples, document_mask)
        self.cache_dir, self.val_fraction = str(cache_dir), check_val_fraction(val_fraction)
        self.root = None if root is None else str(root)
        self.set_dir: Path | None = None

    def check_sources(self) -> None:
        """cache_dir must not be an existing non-directory; root, if given, must be a directory."""
        check_cache_dir(self.cache_dir)
        if self.root is not None and not Path(self.root).is_dir():
            raise DataError(f"data.root={self.root} is not a directory")

    def source(self, split: str) -> str:
        """The cached set's file for the split."""
        where = self.set_dir / f"{split}.jsonl" if self.set_dir is not None else self.cache_dir
        return f"the stdlib SFT set ({where})"

    def conversations(self) -> tuple[list[list[Turn]], list[list[Turn]]]:
        """(train, val) pairs from the cached set, built on first use (a few seconds)."""
        self.set_dir = pystdlib_sft(self.cache_dir, self.val_fraction, root=self.root)
        out = []
        for split in ("train", "val"):
            out.append([t for _, _, t in load_conversations(read_jsonl(self.set_dir / f"{split}.jsonl"))])
        return out[0], out[1]

    def describe(self) -> dict:
        """Base description plus the cache location."""
        out = {**super().describe(), "cache_dir": self.cache_dir, "max_examples": self.max_examples}
        return {**out, "set_dir": str(self.set_dir)} if self.set_dir is not None else out
