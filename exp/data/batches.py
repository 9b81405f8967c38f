"""Train samplers' shared base, and batches from token arrays: random windows and fixed evaluation windows."""

from __future__ import annotations

import copy

import numpy as np
import torch

from .protocol import Batch, DataError

GLOBAL = "global"  # a sampler state's scope: a position in the stream all ranks share (see Sampler)
BLOCK = 4096  # window starts drawn per seeded block of a WindowSampler's stream


def _check_fits(tokens: np.ndarray, seq_len: int) -> None:
    if seq_len <= 0:
        raise ValueError(f"seq_len must be > 0, got {seq_len}")
    if len(tokens) < seq_len + 1:
        raise ValueError(f"token array has {len(tokens)} tokens; one window of seq_len={seq_len} needs {seq_len + 1}")


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> Batch:
    # (B, seq_len + 1) windows in one fancy-index gather; x and y are its two overlapping views
    win = torch.from_numpy(np.asarray(tokens[starts[:, None] + np.arange(seq_len + 1)]).astype(np.int64))
    return win[:, :-1].contiguous(), win[:, 1:].contiguous()


class Sampler:
    """Base of the train samplers: argument checks, iteration, and a JSON state of integer counters.

    `counters` are the position that load_state_dict restores; `fixed` keys must match between the saved
    sampler and this one (they shape the stream); `kind` names the sampler in the error for a state that
    lacks keys of this sampler's own (another kind of sampler's: a checkpoint trained on other data).

    The stream is one seeded sequence of samples that all ranks share: `position` counts the samples all ranks
    together have drawn, and each micro-batch of world_size * batch_size samples from there is shared out in rank
    order. The state (scope "global") names no rank, so it loads into any rank of any number of ranks, with any
    batch size, and the stream continues from the samples consumed. An older checkpoint's state (per rank, no
    scope) loads only into as many ranks as saved it.
    """

    kind = "a sampler"
    fixed: tuple[str, ...] = ("seed",)
    counters: tuple[str, ...] = ("position", "num_batches")  # num_batches: micro-batches drawn by each rank

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.position = self.num_batches = 0

    def __iter__(self) -> Sampler:
        return self

    def take_share(self) -> int:
        """The stream position of this rank's next micro-batch; the global position moves past all ranks' shares."""
        first = self.position + self.rank * self.batch_size
        self.position += self.batch_size * self.world_size
        self.num_batches += 1
        return first

    def state_dict(self) -> dict:
        """JSON-serialisable position in the shared stream: its scope, the seed and the counters."""
        keys = dict.fromkeys(("seed", *self.fixed, *self.counters))
        return {"scope": GLOBAL, **{k: int(getattr(self, k)) for k in keys}}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of a sampler that agrees on the `fixed` keys, saved by any number of ranks."""
        if not self.state_dict().keys() - {"scope"} <= state.keys():
            raise ValueError(f"sampler state is not {self.kind}'s (the checkpoint was trained on other data)")
        check_scope(state, self.world_size)
        if any(state[k] != getattr(self, k) for k in self.fixed):
            saved = ", ".join(f"{k} {state[k]}" for k in self.fixed)
            mine = ", ".join(f"{k} {getattr(self, k)}" for k in self.fixed)
            raise ValueError(f"sampler state has {saved}; this sampler has {mine}")
        for k in self.counters:
            setattr(self, k, int(state[k]))


def check_scope(state: dict, world_size: int) -> None:
    """An older checkpoint's state (per rank: no global scope) loads only into as many ranks as saved it."""
    if state.get("scope") != GLOBAL and state.get("world_size", world_size) != world_size:
        raise ValueError(
            f"sampler state is an older checkpoint's, saved by {state['world_size']} ranks (positions per rank); "
            f"this run has {world_size}: resume it with {state['world_size']} ranks"
        )


def fixed_subset(n: int, max_examples: int | None) -> np.ndarray:
    """Sorted indices of a fixed pseudo-random subset of at most max_examples of n (data.max_examples): the
    same for every run and seed, so quick runs compare on the same data."""
    if max_examples is None or n <= max_examples:
        return np.arange(n)
    return np.sort(np.random.default_rng(0).choice(n, max_examples, replace=False))


def check_max_examples(max_examples) -> int | None:
    """data.max_examples: a positive count or None."""
    if max_examples is None:
        return None
    if isinstance(max_examples, bool) or int(max_examples) <= 0:
        raise DataError(f"data.max_examples must be > 0 or null, got {max_examples}")
    return int(max_examples)


class SeededBlocks:
    """An endless stream of seeded draws, read at any position: draw k comes from block k // BLOCK, whose generator is
    seeded by `key` and the block's index, so any rank finds any draw without making the ones before it."""

    dtype = np.int64

    def __init__(self, key: tuple[int, ...]):
        self.key = tuple(key)
        self._block: tuple[int, np.ndarray] | None = None  # (index, its draws)

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        """One block's BLOCK draws."""
        raise NotImplementedError

    def block(self, index: int) -> np.ndarray:
        """The draws of one block of the stream."""
        if self._block is None or self._block[0] != index:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self.key, index])))
            self._block = index, self.draw(rng)
        return self._block[1]

    def values(self, first: int, n: int) -> np.ndarray:
        """Draws first .. first + n - 1 of the stream."""
        out = np.empty(n, dtype=self.dtype)
        done = 0
        while done < n:
            index, offset = divmod(first + done, BLOCK)
            part = self.block(index)[offset : offset + n - done]
            out[done : done + len(part)] = part
            done += len(part)
        return out


class RandomWindows(SeededBlocks):
    """Window starts drawn with replacement from [0, max_start] (SeededBlocks)."""

    def __init__(self, max_start: int, key: tuple[int, ...]):
        super().__init__(key)
        self.max_start = max_start

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.integers(0, self.max_start, size=BLOCK, endpoint=True)

    def starts(self, first: int, n: int) -> np.ndarray:
        """Start offsets of windows first .. first + n - 1 of the stream."""
        return self.values(first, n)


class Uniforms(SeededBlocks):
    """Uniform draws in [0, 1) (SeededBlocks): a mixture's choices of source."""

    dtype = np.float64

    def draw(self, rng: np.random.Generator) -> np.ndarray:
        return rng.random(BLOCK)


class PermutedWindows:
    """The non-overlapping windows of a token array (window i starts at i * seq_len; its last target is the next
    window's first input), each once per epoch, in a permutation seeded by `key` and the epoch: window k of the
    stream is window perm(k // num_windows)[k % num_windows]."""

    def __init__(self, num_tokens: int, seq_len: int, key: tuple[int, ...]):
        self.num_windows, self.seq_len, self.key = max(1, (num_tokens - 1) // seq_len), seq_len, tuple(key)
        self._perm: tuple[int, np.ndarray] | None = None  # (epoch, its permutation)

    def permutation(self, epoch: int) -> np.ndarray:
        """The window order of one epoch."""
        if self._perm is None or self._perm[0] != epoch:
            rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([*self.key, epoch])))
            self._perm = epoch, rng.permutation(self.num_windows)
        return self._perm[1]

    def starts(self, first: int, n: int) -> np.ndarray:
        """Start offsets of windows first .. first + n - 1 of the stream, running on into the next epochs."""
        epochs, index = np.divmod(np.arange(first, first + n, dtype=np.int64), self.num_windows)
        out = np.empty(n, dtype=np.int64)
        for epoch in np.unique(epochs):
            chosen = epochs == epoch
            out[chosen] = self.permutation(int(epoch))[index[chosen]] * self.seq_len
        return out


ORDERS = ("random", "permutation")  # data.order


def check_order(order: str) -> str:
    """data.order: random windows with replacement, or every window once per epoch in a seeded permutation."""
    if order not in ORDERS:
        raise DataError(f"data.order={order} must be one of {', '.join(ORDERS)}")
    return order


class PermutationSampler(Sampler):
    """Every non-overlapping (x, y) window of a token memmap once per epoch, in a new seeded permutation each epoch
    (data.order=permutation): stage.num_epochs are true passes and progress/epoch is exact. The stream position is
    the state, so a resume continues mid-epoch with the very next window, at any number of ranks."""

    kind = "a token-permutation sampler"
    fixed = ("seed", "num_windows")

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        _check_fits(tokens, seq_len)
        super().__init__(batch_size, seed, rank, world_size)
        self.tokens, self.seq_len = tokens, seq_len
        self.order = PermutedWindows(len(tokens), seq_len, (seed,))
        self.num_windows = self.order.num_windows

    @property
    def epoch(self) -> float:
        """Passes over the windows so far (all ranks together)."""
        return self.position / self.num_windows

    def __next__(self) -> Batch:
        return _gather(self.tokens, self.order.starts(self.take_share(), self.batch_size), self.seq_len)


class WindowSampler(Sampler):
    """Random (x, y) windows from a token memmap (data.order=random): window p of one seeded stream starts at a
    position drawn from block p // BLOCK's generator, so any rank finds any window without drawing the ones before
    it."""

    kind = "a token-window sampler"

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        _check_fits(tokens, seq_len)
        super().__init__(batch_size, seed, rank, world_size)
        self.tokens, self.seq_len = tokens, seq_len
        self.max_start = len(tokens) - seq_len - 1  # inclusive: the last window ends on the last token
        self.order = RandomWindows(self.max_start, (seed,))
        self._legacy: np.random.Generator | None = None  # an older checkpoint's generator, drawn as it was

    def starts(self, first: int, n: int) -> np.ndarray:
        """Start offsets of windows first .. first + n - 1 of the stream."""
        return self.order.starts(first, n)

    def __next__(self) -> Batch:
        if self._legacy is not None:
            return self._legacy_next()
        return _gather(self.tokens, self.starts(self.take_share(), self.batch_size), self.seq_len)

    def state_dict(self) -> dict:
        """The stream position (an older checkpoint's generator state while resumed from one)."""
        if self._legacy is not None:
            return {**self._legacy_counters(), "bit_generator": copy.deepcopy(self._legacy.bit_generator.state)}
        return super().state_dict()

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of any rank of any number of ranks; an older checkpoint's generator state
        (each global batch drawn in sequence) continues as it was drawn, with as many ranks as saved it."""
        if "bit_generator" not in state:
            super().load_state_dict(state)
            return
        if not {"seed", "num_batches"} <= state.keys():
            raise ValueError(f"sampler state is not {self.kind}'s (the checkpoint was trained on other data)")
        check_scope(state, self.world_size)
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state has seed {state['seed']}; this sampler has seed {self.seed}")
        self._legacy = np.random.Generator(np.random.PCG64())
        self._legacy.bit_generator.state = copy.deepcopy(state["bit_generator"])
        self.num_batches = int(state["num_batches"])

    def _legacy_counters(self) -> dict:
        return {"seed": self.seed, "rank": self.rank, "world_size": self.world_size, "num_batches": self.num_batches}

    def _legacy_next(self) -> Batch:
        """The older stream: every rank draws the whole global batch in sequence and keeps its slice."""
        starts = self._legacy.integers(0, self.max_start, size=self.batch_size * self.world_size, endpoint=True)
        mine = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.num_batches += 1
        return _gather(self.tokens, mine, self.seq_len)


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list[Batch]:
    """The same windows every call, evenly spaced over the whole array; fewer batches if it is small."""
    _check_fits(tokens, seq_len)
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be > 0, got {batch_size} and {num_batches}")
    # as many batches as non-overlapping windows allow, but always at least one
    num_batches = max(1, min(num_batches, (len(tokens) - 1) // seq_len // batch_size))
    starts = np.linspace(0, len(tokens) - seq_len - 1, num_batches * batch_size).round().astype(np.int64)
    return [_gather(tokens, s, seq_len) for s in starts.reshape(num_batches, batch_size)]
