"""Preference pairs for `stage=dpo`: a prompt with a chosen and a rejected response, as paired (x, y) batches.

Records (JSONL or `hf:NAME`), detected by their fields:
- prompt_chosen_rejected: `prompt` (a string, or a list of {role, content} turns), `chosen` and `rejected` strings
  (the assistant's two answers);
- messages: `chosen` and `rejected` as whole conversations ({role, content} lists, as UltraFeedback-binarized and
  Anthropic HH are published): the turns they share are the prompt, the rest are the two responses (a `prompt`
  string or turn list, when given, comes first unless the lists already start with the user's turn).
Both sides are encoded with the chat template (exp.data.sft.template): labels on the responses' tokens only.
A batch of B pairs is (x, y) of 2B rows, the B chosen conversations then the B rejected ones in the same order
(TRL's layout), so the loop, samplers and checkpoints treat it as any batch.

Truncation is SFT's: each side is cut to the row (seq_len + 1 tokens), so the prompt is kept and the responses lose
their ends; a pair whose prompt fills the window (either side left without a target) is dropped, and one whose two
sides are the same after the cut teaches nothing and is dropped too; both are counted (the dry run prints them).
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterable

import numpy as np
import torch

from exp.losses import IGNORE_INDEX

from .batches import fixed_subset
from .protocol import Batch, DataError
from .sft.datasets import SFTData, SFTJsonl, SFTPyStdlib
from .sft.examples import Examples, ExampleSampler, fit_examples, make_batch
from .sft.formats import _turn, _turn_list
from .sft.sources import SFTDataError, read_jsonl, read_records
from .sft.template import Turn

PAIR_FORMATS = ("auto", "prompt_chosen_rejected", "messages")
Pair = tuple[list[Turn], list[Turn], list[Turn]]  # (prompt turns, chosen response turns, rejected response turns)


def _response(value: object, key: str) -> list[Turn]:
    if not isinstance(value, str):
        raise ValueError(f"{key!r} is {type(value).__name__}, not a string (or use the messages format: turn lists)")
    return [_turn("assistant", value, repr(key))]


def _prompt(record: dict) -> list[Turn]:
    prompt = record["prompt"]
    if isinstance(prompt, str):
        return [_turn("user", prompt, "'prompt'")]
    if isinstance(prompt, list):
        return _turn_list(record, "prompt", "role", "content", None)
    raise ValueError(f"'prompt' is {type(prompt).__name__}, not a string or a list of turns")


def _split_conversations(chosen: list[Turn], rejected: list[Turn]) -> Pair:
    """The shared leading turns are the prompt; what follows in each is its response."""
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    if k == 0:
        raise ValueError("'chosen' and 'rejected' share no leading turn: no prompt (give 'prompt', or the user's turn)")
    for side, turns in (("chosen", chosen), ("rejected", rejected)):
        if k < len(turns) and turns[k]["role"] != "assistant":
            raise ValueError(
                f"{side}[{k}] is a {turns[k]['role']} turn where the two conversations part: "
                "the prompt must be the same on both sides"
            )
    return chosen[:k], chosen[k:], rejected[k:]


def parse_pair(record: object, format: str = "auto") -> Pair:
    """A preference record as (prompt, chosen, rejected) turns; ValueError says what is wrong with it."""
    if not isinstance(record, dict):
        raise ValueError(f"a record must be a JSON object, got {type(record).__name__}")
    missing = [k for k in ("chosen", "rejected") if k not in record]
    if missing:
        raise ValueError(f"missing field(s) {', '.join(missing)} (keys: [{', '.join(map(str, sorted(record)))}])")
    fmt = format
    if fmt == "auto":
        fmt = "messages" if isinstance(record["chosen"], list) else "prompt_chosen_rejected"
    if fmt == "prompt_chosen_rejected":
        if "prompt" not in record:
            raise ValueError(f"missing field prompt (keys: [{', '.join(map(str, sorted(record)))}])")
        pair = _prompt(record), _response(record["chosen"], "chosen"), _response(record["rejected"], "rejected")
    else:
        chosen = _turn_list(record, "chosen", "role", "content", None)
        rejected = _turn_list(record, "rejected", "role", "content", None)
        # a prompt turn list comes first; a prompt string only where the lists lack the user's turn (UltraFeedback
        # gives it both as `prompt` and as the lists' first turn)
        if "prompt" in record and (isinstance(record["prompt"], list) or not any(t["role"] == "user" for t in chosen)):
            prompt = _prompt(record)
            chosen, rejected = prompt + chosen, prompt + rejected
        pair = _split_conversations(chosen, rejected)
    for side, turns in (("chosen", pair[1]), ("rejected", pair[2])):
        if not any(t["role"] == "assistant" and t["content"].strip() for t in turns):
            raise ValueError(f"the {side} response is empty")
    return pair


def load_pairs(records: Iterable[tuple[str, object]], format: str = "auto") -> list[tuple[str, object, Pair]]:
    """(location, record, pair) per record; SFTDataError names the location of the first bad one."""
    out = []
    for where, record in records:
        try:
            out.append((where, record, parse_pair(record, format)))
        except ValueError as e:
            raise SFTDataError(f"{where}: {e}") from None
    return out


class Pairs:
    """Encoded pairs: chosen and rejected Examples whose i-th entries are one pair."""

    def __init__(self, chosen: Examples, rejected: Examples):
        self.chosen, self.rejected = chosen, rejected

    def __len__(self) -> int:
        return len(self.chosen)


def fit_pairs(encoded: Iterable[tuple[tuple, tuple]], row_len: int, pad: int) -> tuple[Pairs, dict]:
    """Cut both sides of each pair to row_len tokens; drop pairs left without a target or with equal sides."""
    chosen, rejected = [], []
    counts = {"num_pairs": 0, "num_dropped": 0, "num_identical": 0, "num_truncated": 0, "num_truncated_tokens": 0}
    for c, r in encoded:
        cut_c, cut_r = (c[0][:row_len], c[1][:row_len]), (r[0][:row_len], r[1][:row_len])
        if not ((cut_c[1][1:] != IGNORE_INDEX).any() and (cut_r[1][1:] != IGNORE_INDEX).any()):
            counts["num_dropped"] += 1  # the prompt fills the window on a side
            continue
        if np.array_equal(cut_c[0], cut_r[0]):
            counts["num_identical"] += 1
            continue
        cut = max(len(c[0]), len(r[0])) - row_len
        if cut > 0:
            counts["num_truncated"] += 1
            counts["num_truncated_tokens"] += max(len(c[0]) - row_len, 0) + max(len(r[0]) - row_len, 0)
        chosen.append(cut_c)
        rejected.append(cut_r)
    chosen_ex, chosen_counts = fit_examples(chosen, row_len, pad)
    rejected_ex, rejected_counts = fit_examples(rejected, row_len, pad)
    counts["num_pairs"] = len(chosen_ex)
    counts["num_tokens"] = chosen_counts["num_tokens"] + rejected_counts["num_tokens"]
    counts["num_label_tokens"] = chosen_counts["num_label_tokens"] + rejected_counts["num_label_tokens"]
    return Pairs(chosen_ex, rejected_ex), counts


def pair_batch(pairs: Pairs, rows: list[list[int]], row_len: int) -> Batch:
    """(x, y) of 2B rows: the rows' chosen sides, then their rejected sides."""
    xc, yc = make_batch(pairs.chosen, rows, row_len)
    xr, yr = make_batch(pairs.rejected, rows, row_len)
    return torch.cat([xc, xr]), torch.cat([yc, yr])


class PairSampler(ExampleSampler):
    """ExampleSampler over pairs (never packed): the same resumable stream, a pair per row."""

    kind = "a preference sampler"

    def __init__(self, pairs: Pairs, row_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        super().__init__(pairs.chosen, row_len, batch_size, seed, rank, world_size, packing=False)
        self.pairs = pairs

    def batch(self, rows: list[list[int]]) -> Batch:
        return pair_batch(self.pairs, rows, self.row_len)


class PreferenceData(SFTData):
    """Base: (train, val) preference pairs as paired batches; the SFT data interface otherwise."""

    name = "preference"
    paired = True  # batches are [chosen; rejected] rows: only stage=dpo trains them

    def __init__(self, seq_len: int, vocab_size: int, tokenizer: str | None = None, max_examples=None):
        SFTData.__init__(self, seq_len, False, vocab_size, tokenizer, max_examples, False)

    def pairs(self) -> tuple[list[Pair], list[Pair]]:
        """(train, val) pairs, read from the sources."""
        raise NotImplementedError

    def examples(self) -> tuple[Pairs, Pairs]:
        """(train, val) encoded pairs, read on first use."""
        if self._data is None:
            self.check_sources()
            splits, counts = [], {}
            for split, pairs in zip(("train", "val"), self.pairs(), strict=True):
                pairs = [pairs[i] for i in fixed_subset(len(pairs), self.max_examples)]
                encoded = ((self._encode(p + c), self._encode(p + r)) for p, c, r in pairs)
                fitted, counts[split] = fit_pairs(encoded, self.row_len, self.tokenizer().PAD)
                if not len(fitted):
                    raise DataError(self._no_pairs(split, pairs, counts[split]))
                splits.append(fitted)
            self._data, self._counts = tuple(splits), counts
        return self._data

    def _no_pairs(self, split: str, pairs: list[Pair], counts: dict) -> str:
        if not pairs:
            return f"{self.source(split)}: no {split} pairs"
        return (
            f"{self.source(split)}: all {len(pairs)} {split} pairs were dropped at data.seq_len={self.seq_len} "
            f"({counts['num_dropped']} with prompts that fill the window, {counts['num_identical']} with the same "
            "chosen and rejected tokens): use a larger model.seq_len"
        )

    def epoch_size(self) -> int:
        """Pairs in one pass (stage.num_epochs)."""
        return len(self.examples()[0])

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> PairSampler:
        """Shuffled batches of batch_size pairs (2 * batch_size rows) for this rank."""
        return PairSampler(self.examples()[0], self.row_len, batch_size, seed, rank, world_size)

    def val_batches(self, batch_size: int, num_batches: int) -> list[Batch]:
        """Fixed validation batches of pairs evenly spaced over the val set, the same every call and run."""
        if batch_size <= 0 or num_batches <= 0:
            raise ValueError(f"batch_size and num_batches must be > 0, got {batch_size} and {num_batches}")
        val = self.examples()[1]
        num_batches = max(1, min(num_batches, len(val) // batch_size))
        picks = np.linspace(0, len(val) - 1, num_batches * batch_size).round().astype(np.int64)
        return [pair_batch(val, [[int(i)] for i in p], self.row_len) for p in picks.reshape(num_batches, batch_size)]

    def stats(self) -> dict:
        """Pair, drop and truncation counts over train + val."""
        self.examples()
        c = {k: sum(s[k] for s in self._counts.values()) for k in self._counts["train"]}
        return {
            **c,
            "num_train_pairs": self._counts["train"]["num_pairs"],
            "num_val_pairs": self._counts["val"]["num_pairs"],
            "completion_ratio": c["num_label_tokens"] / max(c["num_tokens"], 1),
        }


class PreferenceJsonl(PreferenceData, SFTJsonl):
    """Preference records from a JSONL file or `hf:NAME`; validation from val_path, an hf val_split, or held out."""

    name = "preference_jsonl"

    def __init__(
        self,
        path: str,
        seq_len: int,
        format: str = "auto",
        val_path: str | None = None,
        val_fraction: float = 0.05,
        split: str = "train",
        val_split: str | None = None,
        vocab_size: int = 264,
        tokenizer: str | None = None,
        max_examples: int | None = None,
    ):
        if format not in PAIR_FORMATS:
            raise DataError(f"data.format={format} must be one of {', '.join(PAIR_FORMATS)}")
        SFTJsonl.__init__(
            self,
            path,
            seq_len,
            "auto",
            None,
            False,
            val_path,
            val_fraction,
            split,
            val_split,
            vocab_size,
            tokenizer,
            max_examples,
            False,
        )
        self.format = str(format)

    def pairs(self) -> tuple[list[Pair], list[Pair]]:
        train, val = self.splits(lambda source, split: load_pairs(read_records(source, split), self.format))
        return [p for _, _, p in train], [p for _, _, p in val]


def shuffled_lines(text: str, key: str) -> str | None:
    """text with its lines in another order that starts with another line (so the two differ from their first
    line on, inside any window that holds one), the same for the same key; None when every line is the same."""
    lines = text.split("\n")
    other = next((i for i, line in enumerate(lines) if line != lines[0]), None)
    if other is None:
        return None
    rng = random.Random(hashlib.sha256(key.encode("utf-8")).digest())
    for _ in range(8):
        order = lines[:]
        rng.shuffle(order)
        if order[0] != lines[0]:
            return "\n".join(order)
    order = lines[:]  # repeated lines kept drawing the first one: swap it with the first that differs
    order[0], order[other] = order[other], order[0]
    return "\n".join(order)


class PreferencePyStdlib(PreferenceData, SFTPyStdlib):
    """The built-in preference set, offline: the stdlib SFT set's pairs (prompt = signature + docstring), each with
    its real body chosen over the same body with its lines in a shuffled order that starts with another line
    (rejected: the same tokens, in an order that does not run). One-line bodies have no such order and are left
    out. The
    order comes from a hash of the function's source location, so the set is the same on every machine."""

    name = "preference_pystdlib"

    def __init__(
        self,
        seq_len: int,
        cache_dir: str = "~/.cache/exp",
        val_fraction: float = 0.05,
        max_examples: int | None = None,
        root: str | None = None,
        vocab_size: int = 264,
        tokenizer: str | None = None,
    ):
        SFTPyStdlib.__init__(
            self, seq_len, cache_dir, False, val_fraction, max_examples, root, vocab_size, tokenizer, False
        )

    def source(self, split: str) -> str:
        where = self.set_dir / f"{split}.jsonl" if self.set_dir is not None else self.cache_dir
        return f"the stdlib preference set ({where})"

    def pairs(self) -> tuple[list[Pair], list[Pair]]:
        from .sft.stdlib import pystdlib_sft

        self.set_dir = pystdlib_sft(self.cache_dir, self.val_fraction, root=self.root)
        out = []
        for split in ("train", "val"):
            pairs = []
            for _, record in read_jsonl(self.set_dir / f"{split}.jsonl"):
                rejected = shuffled_lines(record["completion"], record["source"])
                if rejected is not None:
                    prompt = [{"role": "user", "content": record["prompt"]}]
                    chosen = [{"role": "assistant", "content": record["completion"]}]
                    pairs.append((prompt, chosen, [{"role": "assistant", "content": rejected}]))
            out.append(pairs)
        return out[0], out[1]
