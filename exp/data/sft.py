"""Supervised fine-tuning data: chat template with assistant-only labels, record formats, sources, batching."""

from __future__ import annotations

import ast
import fcntl
import gc
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import sysconfig
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exp.losses import IGNORE_INDEX
from exp.rundir import publish_dir

from . import DataError
from .corpus import split_value, stdlib_fingerprint, stdlib_sources
from .tokenizer import EOT, PAD, VOCAB_SIZE, ByteTokenizer

log = logging.getLogger(__name__)

Batch = tuple[torch.Tensor, torch.Tensor]
Turn = dict  # {"role": "system" | "user" | "assistant", "content": str}

ROLE_IDS = {role: ByteTokenizer.specials[f"<|{role}|>"] for role in ("system", "user", "assistant")}
END = ByteTokenizer.specials["<|end|>"]
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
FORMATS = ("auto", "messages", "conversations", "prompt_response", "fields")
SFT_FORMAT_VERSION = 1
MAX_BODY_LINES = 40  # stdlib pairs: function bodies of 1..40 lines after the docstring


class SFTDataError(DataError):
    """A record that cannot be used; the message starts with its `file:line`."""


# chat template


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


# record formats


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


# sources


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
    """(`hf:NAME[split]:row`, record) from a Hugging Face dataset; needs `datasets` installed."""
    try:
        import datasets
    except ImportError:
        raise SFTDataError(
            f"hf:{name} needs the Hugging Face `datasets` package, which is not installed (pip install datasets)"
        ) from None
    for i, record in enumerate(datasets.load_dataset(name, split=split)):
        yield f"hf:{name}[{split}]:{i}", dict(record)


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


# examples and batches


@dataclass
class Examples:
    """Tokenized examples stored back to back, each at most one row long."""

    tokens: np.ndarray  # (N,) int16
    labels: np.ndarray  # (N,) int16, -100 where not a target
    offsets: np.ndarray  # (n + 1,) int64: example i is [offsets[i], offsets[i + 1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)


def fit_examples(encoded: Iterable[tuple[np.ndarray, np.ndarray]], row_len: int) -> tuple[Examples, dict]:
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
    cat = lambda parts: np.concatenate(parts) if parts else np.zeros(0, dtype=np.int16)
    ex = Examples(cat(ids), cat(labels), offsets)
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
    ids = np.full((len(rows), row_len), PAD, dtype=np.int64)
    labels = np.full((len(rows), row_len), IGNORE_INDEX, dtype=np.int64)
    for b, row in enumerate(rows):
        pos = 0
        for i in row:
            s, e = ex.offsets[i], ex.offsets[i + 1]
            ids[b, pos : pos + e - s] = ex.tokens[s:e]
            labels[b, pos : pos + e - s] = ex.labels[s:e]
            pos += e - s
    return torch.from_numpy(ids[:, :-1].copy()), torch.from_numpy(labels[:, 1:].copy())


class ExampleSampler:
    """Batches of whole examples, reshuffled each epoch; ranks take disjoint shards; state saves/restores."""

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
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if len(examples) < world_size:
            raise ValueError(f"{len(examples)} train examples cannot be shared by {world_size} ranks")
        self.examples, self.row_len, self.batch_size, self.packing = examples, row_len, batch_size, packing
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.epoch = self.index = self.num_batches = 0  # index: next row of this epoch's rows
        self._rows: list[list[int]] | None = None

    def rows_for(self, epoch: int) -> list[list[int]]:
        """This rank's rows in an epoch: every world_size-th example of one shared permutation."""
        perm = np.random.default_rng([self.seed, epoch]).permutation(len(self.examples))
        return pack_rows(self.examples.lengths, perm[self.rank :: self.world_size], self.row_len, self.packing)

    def __iter__(self) -> ExampleSampler:
        return self

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

    def state_dict(self) -> dict:
        """JSON-serialisable position: epoch, row within it, counters."""
        keys = ("seed", "rank", "world_size", "epoch", "index", "num_batches")
        return {k: int(getattr(self, k)) for k in keys}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict(); refuses another rank's or world size's state (shards would overlap)."""
        if "epoch" not in state:
            raise ValueError("sampler state is not an SFT sampler's (the checkpoint was trained on other data)")
        if (state["rank"], state["world_size"]) != (self.rank, self.world_size):
            raise ValueError(
                f"sampler state is for rank {state['rank']} of {state['world_size']}, "
                f"this sampler is rank {self.rank} of {self.world_size}"
            )
        self.seed, self.epoch, self.index = int(state["seed"]), int(state["epoch"]), int(state["index"])
        self.num_batches, self._rows = int(state["num_batches"]), None


# data group targets


def _holdout(items: list, key: Sequence[float], fraction: float) -> tuple[list, list]:
    """(train, val) by key < fraction; each side keeps at least one item (smallest keys move to val)."""
    if len(items) < 2:
        raise ValueError(f"need at least 2 records to hold out validation ones, got {len(items)}")
    val_idx = {i for i, k in enumerate(key) if k < fraction}
    order = sorted(range(len(items)), key=lambda i: key[i])
    if not val_idx:
        val_idx = {order[0]}
    if len(val_idx) == len(items):
        val_idx.discard(order[-1])
    return [x for i, x in enumerate(items) if i not in val_idx], [x for i, x in enumerate(items) if i in val_idx]


_CHECKED: set[tuple] = set()  # SFTData._check_key() of data that passed check() in this process


class SFTData:
    """Base: (train, val) conversations as (x, y) batches of seq_len, with the pretraining data interface.

    An example (or a packed row) holds at most seq_len + 1 tokens: seq_len inputs plus the final target,
    as in the pretraining windows. Longer examples are truncated; ones left with no target are dropped.
    """

    name = "sft"

    def __init__(self, seq_len: int, packing: bool, vocab_size: int):
        if int(vocab_size) != VOCAB_SIZE:  # the key exists so model configs can interpolate ${data.vocab_size}
            raise ValueError(f"data.vocab_size={vocab_size} must be {VOCAB_SIZE}, the byte tokenizer's size")
        if int(seq_len) <= 0:
            raise ValueError(f"data.seq_len must be > 0, got {seq_len}")
        self.seq_len, self.vocab_size, self.packing = int(seq_len), VOCAB_SIZE, bool(packing)
        self._data: tuple[Examples, Examples] | None = None
        self._counts: dict[str, dict] | None = None

    def __getstate__(self) -> dict:
        # pickled into launcher jobs: ship the config, not the loaded examples
        return {**self.__dict__, "_data": None, "_counts": None}

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
                ex, counts[split] = fit_examples(map(encode_arrays, convs), self.row_len)
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
        needed = min(int(np.flatnonzero(y[1:] != IGNORE_INDEX)[0]) + 1 for _, y in map(encode_arrays, convs))
        return (
            f"{self.source(split)}: all {len(convs)} {split} examples were dropped at data.seq_len={self.seq_len} "
            f"(their prompts alone fill the window; the shortest needs seq_len >= {needed}): use a larger model.seq_len"
        )

    def _check_key(self) -> tuple:
        """What a passed check() depends on: the settings, and the size and mtime of local source files."""
        settings = sorted((k, repr(v)) for k, v in vars(self).items() if not k.startswith("_") and k != "set_dir")
        return (type(self).__name__, *settings, *self._source_files())

    def _source_files(self) -> list[tuple]:
        return []

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
    ):
        super().__init__(seq_len, packing, vocab_size)
        if format not in FORMATS:
            raise DataError(f"data.format={format} must be one of {', '.join(FORMATS)}")
        if isinstance(fields, str):
            fields = [f.strip() for f in fields.split(",") if f.strip()]
        self.fields = None if fields is None else [str(f) for f in fields]
        if format == "fields" and not self.fields:
            raise DataError("data.fields must list the record fields when data.format=fields (the last is the answer)")
        if self.fields and format not in ("auto", "fields"):
            raise DataError(f"data.fields is only used with data.format=fields or auto, not {format}")
        if not 0.0 < float(val_fraction) < 0.5:
            raise DataError(f"data.val_fraction must be in (0, 0.5), got {val_fraction}")
        self.path, self.format, self.split = str(path), str(format), str(split)
        self.val_path = None if val_path is None else str(val_path)
        self.val_split = None if val_split is None else str(val_split)
        self.val_fraction = float(val_fraction)

    def check_sources(self) -> None:
        """Files exist (or `datasets` is installed for hf: sources)."""
        for key, source in (("data.path", self.path), ("data.val_path", self.val_path)):
            if source is None:
                continue
            if source.startswith("hf:"):
                if importlib.util.find_spec("datasets") is None:
                    raise DataError(
                        f"{key}={source} needs the Hugging Face `datasets` package, "
                        "which is not installed (pip install datasets)"
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

        def load(key: str, source: str, split: str) -> list:
            try:
                return load_conversations(read_records(source, split), self.format, self.fields)
            except SFTDataError as e:  # `file:line: what`, led by the key that names the file
                raise SFTDataError(f"{key}={e}") from None

        train = load("data.path", self.path, self.split)
        if self.val_path is not None:
            val = load("data.val_path", self.val_path, self.val_split or "validation")
        elif self.path.startswith("hf:") and self.val_split is not None:
            val = load("data.path", self.path, self.val_split)
        else:
            keys = [split_value(json.dumps(r, sort_keys=True, default=str)) for _, r, _ in train]
            try:
                train, val = _holdout(train, keys, self.val_fraction)
            except ValueError as e:
                raise DataError(f"data.path={self.path}: {e}; set data.val_path") from None
        return [t for _, _, t in train], [t for _, _, t in val]

    def _source_files(self) -> list[tuple]:
        local = [Path(s).expanduser().resolve() for s in (self.path, self.val_path) if s and not s.startswith("hf:")]
        return [(str(p), st.st_size, st.st_mtime_ns) for p in local for st in [p.stat()]]

    def describe(self) -> dict:
        """Base description plus sources and format."""
        return {**super().describe(), "path": self.path, "val_path": self.val_path, "format": self.format}


# the embedded default set: documented functions of the Python standard library


def _dedent(line: str, indent: int) -> str:
    # at most `indent` leading whitespace characters, so less-indented string contents stay intact
    return line[min(indent, len(line) - len(line.lstrip(" \t"))) :]


def function_pairs(source: str, max_body_lines: int = MAX_BODY_LINES) -> list[dict]:
    """{"prompt", "completion", "line"} per documented top-level function or method of a top-level class.

    prompt is the decorators, `def` line(s) and docstring; completion is the rest of the body (1 to
    max_body_lines lines); both lose the def's indentation, so prompt + completion is its dedented source.
    """
    source = source.replace("\r\n", "\n").replace("\r", "\n")
    tree = ast.parse(source)
    lines = source.split("\n")  # not splitlines(): form feeds and the like do not end lines for ast
    funcs = (ast.FunctionDef, ast.AsyncFunctionDef)
    nodes = [n for n in tree.body if isinstance(n, funcs)]
    nodes += [m for c in tree.body if isinstance(c, ast.ClassDef) for m in c.body if isinstance(m, funcs)]
    pairs = []
    for fn in sorted(nodes, key=lambda n: n.lineno):
        if len(fn.body) < 2 or ast.get_docstring(fn, clean=False) is None:
            continue
        doc, first = fn.body[0], fn.body[1]
        first_line = min([first.lineno, *(d.lineno for d in getattr(first, "decorator_list", []))])
        num_body = fn.end_lineno - doc.end_lineno
        if first_line <= doc.end_lineno or not 1 <= num_body <= max_body_lines:
            continue  # a statement on the docstring's line, or a body too long
        start = min([fn.lineno, *(d.lineno for d in fn.decorator_list)]) - 1
        text = lambda part, indent=fn.col_offset: "".join(_dedent(line, indent) + "\n" for line in part)
        pairs.append(
            {
                "prompt": text(lines[start : doc.end_lineno]),
                "completion": text(lines[doc.end_lineno : fn.end_lineno]),
                "line": fn.lineno,
            }
        )
    return pairs


def _write_jsonl(path: Path, records: Iterable[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def pystdlib_sft(cache_dir: str | Path, val_fraction: float = 0.05, *, root: str | Path | None = None) -> Path:
    """Directory with train.jsonl/val.jsonl/meta.json of stdlib function pairs, built once per fingerprint.

    Split by file (a hash of its relative path), so validation functions come from files never trained on.
    """
    cache_dir = Path(cache_dir).expanduser()
    root = Path(root if root is not None else sysconfig.get_paths()["stdlib"])
    cache_dir.mkdir(parents=True, exist_ok=True)
    with open(cache_dir / "sft-pystdlib.lock", "a") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)  # concurrent jobs wait, then find the finished set
        sources = stdlib_sources(root)
        if not sources:
            raise FileNotFoundError(f"no .py sources under {root}")
        base = stdlib_fingerprint(sources, root, val_fraction)
        fingerprint = hashlib.sha256(f"sft{SFT_FORMAT_VERSION}\n{MAX_BODY_LINES}\n{base}".encode()).hexdigest()
        out = cache_dir / f"sft-pystdlib-{fingerprint[:16]}"
        if (out / "meta.json").is_file():  # written last, inside the directory that is renamed into place
            return out
        for stale in cache_dir.glob(f"{out.name}.tmp-*"):  # of crashed builders; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if out.exists():
            shutil.rmtree(out)
        started = time.perf_counter()
        by_file, skipped = [], 0
        gc_was_enabled = gc.isenabled()
        gc.disable()  # ASTs are millions of small objects freed by refcounting; cycle scans would double the time
        try:
            for p in sources:
                rel = p.relative_to(root).as_posix()
                try:
                    pairs = function_pairs(p.read_bytes().decode("utf-8"))
                except (SyntaxError, ValueError):  # not UTF-8, or not this Python's syntax
                    skipped += 1
                    continue
                if pairs:
                    by_file.append([{**pr, "source": f"{rel}:{pr.pop('line')}"} for pr in pairs])
        finally:
            if gc_was_enabled:
                gc.enable()
        keys = [split_value(f[0]["source"].rsplit(":", 1)[0]) for f in by_file]
        train, val = _holdout(by_file, keys, val_fraction)
        train, val = [p for f in train for p in f], [p for f in val for p in f]
        # template tokens: role + end per turn, plus endoftext
        tokens = lambda ps: sum(len(p["prompt"].encode()) + len(p["completion"].encode()) + 5 for p in ps)
        meta = {
            "format_version": SFT_FORMAT_VERSION,
            "root": str(root),
            "num_files": len(by_file),
            "num_skipped_files": skipped,
            "num_train_pairs": len(train),
            "num_val_pairs": len(val),
            "num_train_tokens": tokens(train),
            "num_val_tokens": tokens(val),
            "val_fraction": val_fraction,
            "build_seconds": round(time.perf_counter() - started, 2),
            "sources": fingerprint,
        }
        tmp = out.with_name(f"{out.name}.tmp-{os.getpid()}")
        tmp.mkdir()
        try:
            _write_jsonl(tmp / "train.jsonl", train)
            _write_jsonl(tmp / "val.jsonl", val)
            _write_jsonl(tmp / "meta.json", [meta])
            publish_dir(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        log.info(
            f"built the stdlib SFT set: {len(train) + len(val):,} pairs from {len(by_file)} files, "
            f"{meta['num_train_tokens'] + meta['num_val_tokens']:,} tokens, in {meta['build_seconds']}s -> {out}"
        )
        return out


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
    ):
        super().__init__(seq_len, packing, vocab_size)
        if not 0.0 < float(val_fraction) < 0.5:
            raise DataError(f"data.val_fraction must be in (0, 0.5), got {val_fraction}")
        if max_examples is not None and int(max_examples) <= 0:
            raise DataError(f"data.max_examples must be > 0 or null, got {max_examples}")
        self.cache_dir, self.val_fraction = str(cache_dir), float(val_fraction)
        self.max_examples = None if max_examples is None else int(max_examples)
        self.root = None if root is None else str(root)
        self.set_dir: Path | None = None

    def check_sources(self) -> None:
        """cache_dir must not be an existing non-directory; root, if given, must be a directory."""
        p = Path(self.cache_dir).expanduser()
        if p.exists() and not p.is_dir():
            raise DataError(f"data.cache_dir={p} exists and is not a directory")
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
            convs = [t for _, _, t in load_conversations(read_jsonl(self.set_dir / f"{split}.jsonl"))]
            if self.max_examples is not None and len(convs) > self.max_examples:
                keep = np.sort(np.random.default_rng(0).choice(len(convs), self.max_examples, replace=False))
                convs = [convs[i] for i in keep]
            out.append(convs)
        return out[0], out[1]

    def describe(self) -> dict:
        """Base description plus the cache location."""
        out = {**super().describe(), "cache_dir": self.cache_dir, "max_examples": self.max_examples}
        return {**out, "set_dir": str(self.set_dir)} if self.set_dir is not None else out
