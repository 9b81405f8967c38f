"""data=mixture: several token sources drawn by weight, each validated on its own.

    python train.py data=mixture data.sources.code.weight=0.3 \
        +data.sources.web.path=data/web +data.sources.web.weight=0.7

A source's `path` is a prepared folder (train.bin, val.bin, meta.json: python -m exp.data.prepare), a train token file
with `val_path`, `pystdlib` (the built-in stdlib corpus), or anything prepare reads (a text file, a folder of them,
JSONL, hf:...), tokenized once with the byte tokenizer into data.cache_dir. All sources share one tokenizer.

The stream: sample p of the one stream all ranks share comes from the source a seeded uniform draw picks under the
weights in force at p (data.schedule); a source's k-th sample is window k of its own order (data.order: each window
once per epoch in a seeded permutation, or random windows). The state is the stream position and the samples each
source gave, so a resume continues bit-exactly at any number of ranks, and N ranks of batch B draw what one process
of batch N*B draws. A schedule's `at` is a fraction of the run's samples (stage.num_steps x the global batch): after
a resume with another global batch, its phases begin at the same sample, not the same step.

Validation: stage.num_eval_batches of fixed windows from each source's val split: val/loss/<source>, and val/loss
the mixture's weighted mean of them (under data.sources' weights, so it stays comparable along a schedule).
"""

from __future__ import annotations

import hashlib
import subprocess
import sys
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from exp.resolvers import data_vocab
from exp.text import first_line

from .batches import PermutedWindows, RandomWindows, Sampler, Uniforms, check_order, eval_batches
from .cache import cached, check_cache_dir
from .corpus import check_val_fraction, is_complete
from .hf import is_hf
from .protocol import Batch, DataError
from .tokenizer import VOCAB_SIZE
from .tokens import Memmap, PyStdlib, TokenData

BUILTIN = "pystdlib"  # a source path naming the built-in stdlib corpus
PREPARE_VERSION = 1  # of the cached folders prepared from raw sources


@dataclass
class ValSets:
    """Validation batches of each source and the weights their losses are averaged with (exp.loop.evaluate)."""

    sets: dict[str, list[Batch]]
    weights: dict[str, float]

    def map(self, fn) -> ValSets:
        """The same sets with fn applied to every batch (moving them to a device)."""
        return ValSets({name: [fn(b) for b in batches] for name, batches in self.sets.items()}, self.weights)


def normalised(weights: Mapping[str, float], where: str) -> dict[str, float]:
    """Weights scaled to sum to 1; negative or all-zero weights are refused naming `where`."""
    for name, w in weights.items():
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not np.isfinite(w) or w < 0:
            raise DataError(f"{where}.{name}.weight={w!r} must be a number >= 0")
    total = float(sum(weights.values()))
    if total <= 0:
        raise DataError(f"{where}: the weights are all zero; at least one source needs a weight > 0")
    return {name: round(float(w) / total, 12) for name, w in weights.items()}  # 0.1, not 0.09999999999999999


def _renamed(error: Exception, name: str) -> DataError:
    # a source is checked by exp.data.Memmap, whose messages name data.path / data.val_path: name the source's keys
    msg = first_line(error)
    for key in ("data.val_path", "data.path", "data.dtype"):
        msg = msg.replace(key, f"data.sources.{name}.{key[5:]}")
    return DataError(msg)


def _fingerprint(path: Path) -> str:
    """What a prepared copy of a raw source depends on: its files' names, sizes and times."""
    h = hashlib.sha256(f"{PREPARE_VERSION}\n{path.resolve()}\n".encode())
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        st = p.stat()
        h.update(f"{p}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def _prepare(spec: str, cache_dir: str, val_fraction: float, name: str) -> Path:
    """A raw source (text, folder, JSONL, hf:...) tokenized into the cache by `python -m exp.data.prepare`, once: the
    command-line tool in its own process (a run imports no command-line tool), its error line kept."""
    key = f"hf\n{spec}" if is_hf(spec) else _fingerprint(Path(spec).expanduser())
    fingerprint = hashlib.sha256(f"{key}\n{val_fraction!r}".encode()).hexdigest()

    def build(tmp: Path) -> None:
        args = [spec, "--out", str(tmp / "prepared"), "--val-fraction", str(val_fraction), "--quiet"]
        proc = subprocess.run([sys.executable, "-m", "exp.data.prepare", *args], capture_output=True, text=True)
        if proc.returncode != 0:
            lines = proc.stderr.strip().splitlines()
            said = lines[-1].removeprefix("error: ") if lines else f"exit {proc.returncode}"
            raise DataError(f"data.sources.{name}.path={spec}: {said}")
        for f in (tmp / "prepared").iterdir():
            f.rename(tmp / f.name)
        (tmp / "prepared").rmdir()

    return cached(cache_dir, "mixture-source", fingerprint, build, complete=is_complete)


class MixtureSampler(Sampler):
    """Batches drawn from several token arrays by weight (see the module's docstring)."""

    kind = "a mixture sampler"
    counters = ("position", "num_batches")

    def __init__(
        self,
        sources: Mapping[str, np.ndarray],
        phases: list[tuple[int, dict[str, float]]],
        seq_len: int,
        order: str,
        batch_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ):
        super().__init__(batch_size, seed, rank, world_size)
        self.names, self.tokens, self.seq_len = list(sources), list(sources.values()), seq_len
        # each source's own window order, keyed by its name: adding or reordering sources leaves the others' streams
        keys = [(seed, zlib.crc32(name.encode())) for name in self.names]
        if order == "permutation":
            self.orders = [PermutedWindows(len(t), seq_len, k) for t, k in zip(self.tokens, keys, strict=True)]
        else:
            self.orders = [RandomWindows(len(t) - seq_len - 1, k) for t, k in zip(self.tokens, keys, strict=True)]
        # phases: (first sample, weights) in order; the draws compare a uniform number with the cumulative weights
        self.phases = [(start, np.cumsum([w.get(n, 0.0) for n in self.names])) for start, w in phases]
        self.counts = dict.fromkeys(self.names, 0)  # samples each source has given (all ranks together)
        self.draws = Uniforms((seed,))  # sample p's uniform draw, at any p

    def choose(self, first: int, n: int) -> np.ndarray:
        """The source index of samples first .. first + n - 1 of the stream."""
        positions = np.arange(first, first + n)
        u = self.draws.values(first, n)
        out = np.empty(n, dtype=np.int64)
        for i, (start, cum) in enumerate(self.phases):
            end = self.phases[i + 1][0] if i + 1 < len(self.phases) else None
            here = (positions >= start) & (positions < end if end is not None else True)
            out[here] = np.minimum(np.searchsorted(cum, u[here] * cum[-1], side="right"), len(cum) - 1)
        return out

    def weights_at(self, position: int) -> dict[str, float]:
        """The normalised weights in force at a stream position."""
        cum = next(c for start, c in reversed(self.phases) if position >= start)
        return dict(zip(self.names, np.diff(cum, prepend=0.0) / cum[-1], strict=True))

    def __next__(self) -> Batch:
        first, total = self.position, self.batch_size * self.world_size
        mine = self.take_share() - first  # this rank's offset in the micro-batch all ranks share
        chosen = self.choose(first, total)
        index = np.empty(total, dtype=np.int64)  # each sample's place in its source's stream
        for s, name in enumerate(self.names):
            picked = chosen == s
            index[picked] = self.counts[name] + np.arange(int(picked.sum()))
            self.counts[name] += int(picked.sum())
        chosen, index = chosen[mine : mine + self.batch_size], index[mine : mine + self.batch_size]
        window = np.empty((self.batch_size, self.seq_len + 1), dtype=np.int64)
        for s in np.unique(chosen):
            rows = np.flatnonzero(chosen == s)  # consecutive in the source's stream: indices are given in order
            starts = self.orders[s].starts(int(index[rows[0]]), len(rows))
            window[rows] = self.tokens[s][starts[:, None] + np.arange(self.seq_len + 1)]
        win = torch.from_numpy(window)
        return win[:, :-1].contiguous(), win[:, 1:].contiguous()

    def metrics(self) -> dict[str, float]:
        """data/tokens/<source> (inputs all ranks drew from it) and data/weight/<source> (in force now)."""
        out = {f"data/tokens/{n}": float(c * self.seq_len) for n, c in self.counts.items()}
        return out | {f"data/weight/{n}": w for n, w in self.weights_at(self.position).items()}

    def state_dict(self) -> dict:
        """The stream position and each source's count."""
        return {**super().state_dict(), "counts": dict(self.counts)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of a mixture sampler over the same sources, saved by any number of ranks."""
        if not isinstance(state.get("counts"), dict):
            raise ValueError(f"sampler state is not {self.kind}'s (the checkpoint was trained on other data)")
        if sorted(state["counts"]) != sorted(self.names):
            raise ValueError(
                f"sampler state is of a mixture of {', '.join(sorted(state['counts']))}; "
                f"this one mixes {', '.join(sorted(self.names))}"
            )
        super().load_state_dict(state)
        self.counts = {name: int(state["counts"][name]) for name in self.names}


class Mixture:
    """data=mixture: token sources drawn by weight, each validated on its own (see the module's docstring)."""

    name = "mixture"

    def __init__(
        self,
        sources: Mapping[str, Mapping],
        seq_len: int,
        vocab_size: int = VOCAB_SIZE,
        order: str = "permutation",
        schedule: list | None = None,
        document_mask: bool = False,
        cache_dir: str = "~/.cache/exp",
        val_fraction: float = 0.01,
    ):
        if int(seq_len) <= 0:
            raise ValueError(f"data.seq_len must be > 0, got {seq_len}")
        self.seq_len, self.vocab_size = int(seq_len), int(vocab_size)
        self.order, self.document_mask = check_order(order), bool(document_mask)
        self.cache_dir, self.val_fraction = str(cache_dir), check_val_fraction(val_fraction)
        if not isinstance(sources, Mapping) or not sources:
            raise DataError("data.sources: none given; name at least one, e.g. +data.sources.web.path=data/web")
        self.specs: dict[str, dict] = {}
        for name, spec in sources.items():
            if not isinstance(spec, Mapping) or spec.get("path") in (None, ""):
                raise DataError(f"data.sources.{name}.path is missing: a prepared folder, token file or text")
            unknown = set(spec) - {"path", "weight", "val_path", "dtype"}
            if unknown:
                keys = ", ".join(sorted(unknown))
                raise DataError(f"data.sources.{name}: unknown keys {keys} (path, weight, val_path, dtype)")
            self.specs[str(name)] = {"weight": 1.0, "val_path": None, "dtype": "uint16", **spec}
        self.weights = normalised({n: s["weight"] for n, s in self.specs.items()}, "data.sources")
        self.schedule = self._check_schedule(schedule)
        self.total_samples: int | None = None  # the run's samples (exp.run): where the schedule's phases begin
        self._parts: dict[str, TokenData] | None = None

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_parts": None}  # pickled into launcher jobs: the config, not open memmaps

    def _check_schedule(self, schedule) -> list[tuple[float, dict[str, float]]]:
        if schedule is None:
            return []
        if isinstance(schedule, str) or not isinstance(schedule, Sequence):
            raise DataError(f"data.schedule={schedule!r} must be a list of {{at: FRACTION, weights: {{SOURCE: W}}}}")
        phases, weights, last = [], {n: s["weight"] for n, s in self.specs.items()}, 0.0
        for i, phase in enumerate(schedule):
            where = f"data.schedule[{i}]"
            if not isinstance(phase, Mapping) or set(phase) != {"at", "weights"}:
                raise DataError(f"{where} must be {{at: FRACTION, weights: {{SOURCE: W}}}}, got {phase!r}")
            at = phase["at"]
            if isinstance(at, bool) or not isinstance(at, (int, float)) or not last < at < 1:
                raise DataError(f"{where}.at={at!r} must be in ({last}, 1): fractions of training, increasing")
            new = dict(phase["weights"] or {})
            unknown = set(new) - set(self.specs)
            if unknown:
                raise DataError(f"{where}.weights names {', '.join(sorted(unknown))}, not in data.sources")
            weights = {**weights, **new}  # the sources it does not name keep their weight
            phases.append((float(at), normalised(weights, f"{where}.weights")))
            last = at
        return phases

    def check(self) -> None:
        """Every source exists and is valid token data, raw ones prepared once into the cache; one tokenizer."""
        check_cache_dir(self.cache_dir)
        parts = self.parts()
        seen = {}
        for name, part in parts.items():
            try:
                part.check()
                tokenizer = part.tokenizer()
            except DataError as e:
                raise _renamed(e, name) from None
            if part.vocab_size > self.vocab_size:
                raise DataError(
                    f"data.vocab_size={self.vocab_size} is smaller than data.sources.{name}'s {part.vocab_size} tokens"
                )
            kind = "unknown (token files without tokenizer.json)" if tokenizer is None else _describe(tokenizer)
            seen[name] = (None if tokenizer is None else tokenizer.fingerprint, kind)
        first, (fingerprint, kind) = next(iter(seen.items()))
        for name, (other, other_kind) in seen.items():
            if other != fingerprint:
                raise DataError(
                    f"data.sources.{name} is tokenized with {other_kind}, data.sources.{first} with {kind}: "
                    "a mixture's sources must share one tokenizer"
                )

    def parts(self) -> dict[str, TokenData]:
        """Each source as token data (Memmap or PyStdlib), raw ones prepared into the cache on first use."""
        if self._parts is None:
            parts = {}
            for name, spec in self.specs.items():
                try:
                    parts[name] = self._part(name, spec)
                except (DataError, ValueError) as e:
                    raise _renamed(e, name) from None
            self._parts = parts
        return self._parts

    def _part(self, name: str, spec: dict) -> TokenData:
        """A source as token data of its own vocabulary (a folder's meta.json's), so its tokenizer is its own."""
        path = str(spec["path"])
        if path == BUILTIN:
            return PyStdlib(self.seq_len, cache_dir=self.cache_dir)
        local = Path(path).expanduser()
        if not is_hf(path) and not local.exists():
            raise DataError(f"data.sources.{name}.path={local} does not exist")
        if spec["val_path"] is not None or local.is_file() and local.suffix == ".bin":  # token files: ids unknown
            return Memmap(path, self.seq_len, self.vocab_size, val_path=spec["val_path"], dtype=spec["dtype"])
        if not (local.is_dir() and (local / "train.bin").is_file()):  # not prepared yet: text, JSONL, hf:...
            local = _prepare(path, self.cache_dir, self.val_fraction, name)
        return Memmap(str(local), self.seq_len, data_vocab(local), dtype=spec["dtype"])

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        """The (train, val) token memmaps of the heaviest source (the end-of-run sample's prompt comes from it)."""
        return self.source_arrays()[max(self.weights, key=self.weights.get)]

    def source_arrays(self) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        """{source: (train, val) token memmaps}."""
        out = {}
        for name, part in self.parts().items():
            try:
                out[name] = part.arrays()
            except DataError as e:
                raise _renamed(e, name) from None
        return out

    def epoch_size(self) -> int:
        """Samples in one pass over every source's windows (stage.num_epochs)."""
        return sum(max(1, (len(train) - 1) // self.seq_len) for train, _ in self.source_arrays().values())

    def phases(self) -> list[tuple[int, dict[str, float]]]:
        """(first sample, weights) of each phase of the schedule, in samples of the run."""
        if self.schedule and self.total_samples is None:
            raise DataError("data.schedule needs the run's length: the run sets data.total_samples")
        return [(0, self.weights)] + [(int(at * self.total_samples), w) for at, w in self.schedule]

    def train_sampler(self, batch_size: int, seed: int, rank: int = 0, world_size: int = 1) -> MixtureSampler:
        """This rank's share of the mixture's stream."""
        sources = {name: train for name, (train, _) in self.source_arrays().items()}
        return MixtureSampler(sources, self.phases(), self.seq_len, self.order, batch_size, seed, rank, world_size)

    def val_batches(self, batch_size: int, num_batches: int) -> ValSets:
        """Fixed validation windows of each source, and the weights the mixture's val/loss averages them with."""
        arrays = self.source_arrays()
        sets = {name: eval_batches(val, self.seq_len, batch_size, num_batches) for name, (_, val) in arrays.items()}
        return ValSets(sets, self.weights)

    def tokenizer(self):
        """The sources' one tokenizer (check() made sure they share it)."""
        return next(iter(self.parts().values())).tokenizer()

    def describe(self) -> dict:
        """Small dict for logging: the sources, their normalised weights and the schedule."""
        out = {"name": self.name, "seq_len": self.seq_len, "vocab_size": self.vocab_size, "order": self.order}
        out["sources"] = {name: str(spec["path"]) for name, spec in self.specs.items()}
        out["weights"] = self.weights
        if self.schedule:
            out["schedule"] = [{"at": at, "weights": w} for at, w in self.schedule]
        if self.document_mask:
            out["document_mask"] = True
        opened = {name: p.describe().get("train_tokens") for name, p in (self._parts or {}).items()}
        if opened and None not in opened.values():
            out["train_tokens"] = opened
        return out


def _describe(tokenizer) -> str:
    if tokenizer.fingerprint == "bytes":
        return "bytes"
    return f"a tokenizer of {tokenizer.vocab_size} tokens ({tokenizer.fingerprint[:19]})"
