"""Train samplers' shared base, and batches from token arrays: random windows and fixed evaluation windows."""

from __future__ import annotations

import copy

import numpy as np
import torch

from .protocol import Batch, DataError


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
    """

    kind = "a sampler"
    fixed: tuple[str, ...] = ("seed", "world_size")
    counters: tuple[str, ...] = ("num_batches",)

    def __init__(self, batch_size: int, seed: int, rank: int, world_size: int):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be > 0, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        self.batch_size, self.seed, self.rank, self.world_size = batch_size, seed, rank, world_size
        self.num_batches = 0

    def __iter__(self) -> Sampler:
        return self

    def state_dict(self) -> dict:
        """JSON-serialisable position: who drew it (seed, rank, world size) and the counters."""
        return {k: int(getattr(self, k)) for k in dict.fromkeys(("seed", "rank", "world_size", *self.counters))}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of a sampler that agrees on the `fixed` keys."""
        if not self.state_dict().keys() <= state.keys():
            raise ValueError(f"sampler state is not {self.kind}'s (the checkpoint was trained on other data)")
        if any(state[k] != getattr(self, k) for k in self.fixed):
            raise ValueError(
                f"sampler state is for rank {state['rank']} of {state['world_size']} with seed {state['seed']}; "
                f"this sampler is rank {self.rank} of {self.world_size} with seed {self.seed}"
            )
        for k in self.counters:
            setattr(self, k, int(state[k]))


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


class WindowSampler(Sampler):
    """Random (x, y) windows from a token memmap, drawn from a seeded generator whose state saves/restores."""

    kind = "a token-window sampler"

    def __init__(
        self, tokens: np.ndarray, seq_len: int, batch_size: int, seed: int, rank: int = 0, world_size: int = 1
    ):
        _check_fits(tokens, seq_len)
        super().__init__(batch_size, seed, rank, world_size)
        self.tokens, self.seq_len = tokens, seq_len
        self.max_start = len(tokens) - seq_len - 1  # inclusive: the last window ends on the last token
        # every rank draws the same global batch of world_size * batch_size windows and keeps its slice: ranks
        # differ, N ranks x batch B see exactly what one process with batch N*B sees, and one state fits all ranks
        self.rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed])))

    def __next__(self) -> Batch:
        starts = self.rng.integers(0, self.max_start, size=self.batch_size * self.world_size, endpoint=True)
        starts = starts[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]
        self.num_batches += 1
        return _gather(self.tokens, starts, self.seq_len)

    def state_dict(self) -> dict:
        """Counters plus the generator's state."""
        return {**super().state_dict(), "bit_generator": copy.deepcopy(self.rng.bit_generator.state)}

    def load_state_dict(self, state: dict) -> None:
        """Resume from state_dict() of any rank; the number of ranks must match (it shapes the global batch)."""
        super().load_state_dict(state)
        self.rng.bit_generator.state = copy.deepcopy(state["bit_generator"])


def eval_batches(tokens: np.ndarray, seq_len: int, batch_size: int, num_batches: int) -> list[Batch]:
    """The same windows every call, evenly spaced over the whole array; fewer batches if it is small."""
    _check_fits(tokens, seq_len)
    if batch_size <= 0 or num_batches <= 0:
        raise ValueError(f"batch_size and num_batches must be > 0, got {batch_size} and {num_batches}")
    # as many batches as non-overlapping windows allow, but always at least one
    num_batches = max(1, min(num_batches, (len(tokens) - 1) // seq_len // batch_size))
    starts = np.linspace(0, len(tokens) - seq_len - 1, num_batches * batch_size).round().astype(np.int64)
    return [_gather(tokens, s, seq_len) for s in starts.reshape(num_batches, batch_size)]
