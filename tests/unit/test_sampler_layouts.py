"""Train samplers at any number of ranks: every rank takes its share of one global stream, a state names no rank,
and a run resumed with other ranks or another batch continues the stream from the samples consumed; older
checkpoints' per-rank states go on as they were drawn, with as many ranks. And the layout rule a resume follows:
a kept global batch goes on, another needs resume.allow_config_change, a per-rank state needs as many ranks."""

import json

import numpy as np
import pytest
import torch

from exp.checkpoint.layout import Layout, check_layout, describe, saved_layout
from exp.data.batches import PermutationSampler, WindowSampler
from exp.data.mixture import MixtureSampler
from exp.data.sft.examples import ExampleSampler, fit_examples, make_batch, pack_rows
from exp.data.torch_dataset import ItemSampler
from exp.errors import ConfigError, ResumeError

TOKENS = np.random.default_rng(0).integers(0, 256, 3000).astype(np.uint16)
SOURCES = {"a": TOKENS, "b": TOKENS[::-1].copy(), "c": TOKENS[:700]}
PHASES = [(0, {"a": 0.2, "b": 0.5, "c": 0.3}), (40, {"a": 0.7, "b": 0.0, "c": 0.3})]  # the weights change mid-run


def sft_examples():
    """40 examples of 3..20 ids whose first id is a prompt (no target)."""
    rng = np.random.default_rng(1)
    encoded = []
    for n in rng.integers(3, 21, 40):
        ids = rng.integers(0, 200, n).astype(np.int32)
        encoded.append((ids, np.where(np.arange(n) == 0, -100, ids).astype(np.int32)))
    return fit_examples(encoded, row_len=24)[0]


EXAMPLES = sft_examples()


def item(i: int) -> np.ndarray:
    return (np.arange(i % 13 + 2) + 3 * i) % 97


MAKERS = {
    "windows": lambda b, r, w: WindowSampler(TOKENS, 16, b, seed=5, rank=r, world_size=w),
    "permutation": lambda b, r, w: PermutationSampler(TOKENS, 16, b, seed=5, rank=r, world_size=w),
    "mixture": lambda b, r, w: MixtureSampler(SOURCES, PHASES, 16, "permutation", b, seed=5, rank=r, world_size=w),
    "mixture_random": lambda b, r, w: MixtureSampler(SOURCES, PHASES, 16, "random", b, seed=5, rank=r, world_size=w),
    "sft": lambda b, r, w: ExampleSampler(EXAMPLES, 24, b, seed=5, rank=r, world_size=w),
    "sft_packed": lambda b, r, w: ExampleSampler(EXAMPLES, 24, b, seed=5, rank=r, world_size=w, packing=True),
    "items": lambda b, r, w: ItemSampler(item, np.arange(0, 60, 2), 8, b, seed=5, rank=r, world_size=w),
}


def rows(batch) -> list[tuple]:
    x, y = batch
    return [tuple(a.tolist() + b.tolist()) for a, b in zip(x, y, strict=True)]


def run_layouts(make, layouts) -> tuple[list[tuple], list[dict]]:
    """Rows drawn, in stream order (micro-batch, then rank), through (world_size, batch_size, num_micro) phases, each
    resumed from rank 0's JSON state of the one before; and every rank's state at each hand-over."""
    drawn, states, state = [], [], None
    for world, batch, num_micro in layouts:
        ranks = [make(batch, r, world) for r in range(world)]
        for s in ranks:
            if state is not None:
                s.load_state_dict(state)
        for _ in range(num_micro):
            for s in ranks:
                drawn += rows(next(s))
        states.append([s.state_dict() for s in ranks])
        state = json.loads(json.dumps(states[-1][0]))
    return drawn, states


@pytest.mark.parametrize("kind", MAKERS)
def test_any_layout_continues_one_global_stream(kind):
    make = MAKERS[kind]
    # 2 x 4 -> 1 x 8 -> 4 x 2 keep the global batch; 3 x 3 changes it: the stream goes on from the rows consumed
    layouts = [(2, 4, 3), (1, 8, 2), (4, 2, 3), (3, 3, 4)]
    drawn, states = run_layouts(make, layouts)
    one = make(1, 0, 1)
    assert drawn == [r for _ in range(len(drawn)) for r in rows(next(one))]  # a single process, one row at a time
    for per_rank in states:
        assert all(s == per_rank[0] for s in per_rank)  # one state for all ranks: nothing rank-specific in it
        assert per_rank[0]["scope"] == "global" and not {"rank", "world_size"} & per_rank[0].keys()
    assert len(set(drawn[:24])) > 12  # the comparison has teeth: the rows differ


@pytest.mark.parametrize("kind", MAKERS)
def test_ranks_of_a_micro_batch_take_disjoint_slices(kind):
    make = MAKERS[kind]
    whole = rows(next(make(6, 0, 1)))
    assert [r for rank in range(3) for r in rows(next(make(2, rank, 3)))] == whole
    a, b = make(2, 0, 3), make(2, 1, 3)
    assert rows(next(a)) != rows(next(b))


def test_seed_mismatch_and_another_samplers_state_are_refused():
    s = MAKERS["windows"](4, 0, 1)
    with pytest.raises(ValueError, match="sampler state has seed 6; this sampler has seed 5"):
        s.load_state_dict({**s.state_dict(), "seed": 6})
    with pytest.raises(ValueError, match="not an SFT sampler's"):
        MAKERS["sft"](4, 0, 1).load_state_dict(s.state_dict())


# older checkpoints: rank 0's per-rank state (seed, rank, world_size and the counters)


def old_windows(batch: int, world: int, num_batches: int):
    """The earlier WindowSampler: each global batch drawn in sequence from one generator."""
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([5])))
    for _ in range(num_batches):
        rng.integers(0, len(TOKENS) - 17, size=batch * world, endpoint=True)
    state = {"seed": 5, "rank": 0, "world_size": world, "num_batches": num_batches}
    return {**state, "bit_generator": rng.bit_generator.state}, rng


def test_an_older_window_state_continues_as_drawn_with_as_many_ranks():
    state, rng = old_windows(batch=4, world=2, num_batches=3)
    state = json.loads(json.dumps(state))
    ranks = [MAKERS["windows"](4, r, 2) for r in range(2)]
    for s in ranks:
        s.load_state_dict(state)
    starts = rng.integers(0, len(TOKENS) - 17, size=8, endpoint=True)
    for r, s in enumerate(ranks):
        x, _ = next(s)
        assert x[:, 0].tolist() == TOKENS[starts[4 * r : 4 * r + 4]].tolist()
    saved = ranks[0].state_dict()
    assert saved["world_size"] == 2 and saved["num_batches"] == 4 and "bit_generator" in saved
    with pytest.raises(ValueError, match="older checkpoint's, saved by 2 ranks .*: resume it with 2 ranks"):
        MAKERS["windows"](8, 0, 1).load_state_dict(state)


def old_sft_rows(rank: int, world: int, epoch: int) -> list[list[int]]:
    """The earlier ExampleSampler's rows of one rank: every world-th example of the epoch's permutation, packed."""
    perm = np.random.default_rng([5, epoch]).permutation(len(EXAMPLES))
    return pack_rows(EXAMPLES.lengths, perm[rank::world], 24, True)


def test_an_older_sft_state_of_two_ranks_resumes_every_rank_where_it_was():
    # rank 0's state after 9 batches of 3 rows: more than an epoch of its own rows
    per_rank = {r: [row for e in range(4) for row in old_sft_rows(r, 2, e)] for r in range(2)}
    count = len(old_sft_rows(0, 2, 0))
    assert 9 * 3 > count
    state = {"seed": 5, "rank": 0, "world_size": 2, "epoch": 1, "index": 27 - count, "num_batches": 9}
    for r in range(2):
        s = MAKERS["sft_packed"](3, r, 2)
        s.load_state_dict(json.loads(json.dumps(state)))
        want = make_batch(EXAMPLES, per_rank[r][27:30], 24)
        assert all(torch.equal(a, b) for a, b in zip(next(s), want, strict=True))
        assert s.state_dict()["world_size"] == 2 and s.state_dict()["num_batches"] == 10
    with pytest.raises(ValueError, match="saved by 2 ranks .*: resume it with 2 ranks"):
        MAKERS["sft_packed"](6, 0, 1).load_state_dict(state)


def test_an_older_single_process_state_resumes_at_its_place():
    s = MAKERS["sft"](5, 0, 1)
    for _ in range(11):
        next(s)
    new = s.state_dict()
    old = {"seed": 5, "rank": 0, "world_size": 1, "epoch": new["epoch"], "index": new["index"], "num_batches": 11}
    t = MAKERS["sft"](5, 0, 1)
    t.load_state_dict(old)
    assert rows(next(t)) == rows(next(s))
    items = MAKERS["items"](4, 0, 1)
    items.load_state_dict({"seed": 5, "rank": 0, "world_size": 1, "position": 12, "num_batches": 3})
    assert items.position == 12


# the layout a checkpoint trained with, and what a resume with another may do


def test_a_kept_global_batch_resumes_and_is_recorded_another_needs_the_flag():
    ddp, one = Layout(2, 4, 1, "ddp"), Layout(1, 8)
    glob = {"scope": "global", "seed": 0, "position": 64, "num_batches": 8}
    assert check_layout("ckpt", ddp, ddp, glob, allowed=False) == {}
    moved = check_layout("ckpt", ddp, one, glob, allowed=False)
    assert moved == {
        "world_size": (2, 1),
        "strategy": ("ddp", "none"),
        "stage.batch_size_per_gpu": (4, 8),
        "global_batch": (8, 8),
    }
    assert describe(moved).endswith("stage.batch_size_per_gpu 4 -> 8 (global batch 8 kept)")
    line = r"resuming ckpt with a global batch of 4 \(1 rank x 4 x 1 accumulation\); it trained with 8 \(2 ranks"
    with pytest.raises(ConfigError, match=line + ".*resume.allow_config_change=true"):
        check_layout("ckpt", ddp, Layout(1, 4), glob, allowed=False)
    grown = check_layout("ckpt", ddp, Layout(2, 4, 2, "ddp"), glob, allowed=True)
    assert grown == {"stage.gradient_accumulation_steps": (1, 2), "global_batch": (8, 16)}
    assert "global batch 8 -> 16: the data continues from the samples consumed" in describe(grown)


def test_an_older_checkpoints_layout_and_its_per_rank_state():
    old = {"seed": 0, "rank": 0, "world_size": 2, "num_batches": 3, "bit_generator": {}}
    cfg = {"stage": {"batch_size_per_gpu": 4, "gradient_accumulation_steps": 2}, "hardware": {"distributed": "fsdp"}}
    saved = saved_layout({"sampler": old}, cfg)
    assert saved == Layout(2, 4, 2, "fsdp") and saved.global_batch == 16
    assert saved_layout({"layout": saved.to_dict(), "sampler": {}}, {}) == saved
    with pytest.raises(ResumeError, match="its data sampler's position is per rank .*; resume it with 2"):
        check_layout("ckpt", saved, Layout(1, 16, 1), old, allowed=True)
    assert check_layout("ckpt", saved, Layout(2, 8, 1, "fsdp"), old, allowed=False)["global_batch"] == (16, 16)


def test_a_permutation_epoch_visits_every_window_exactly_once():
    """data.order=permutation: 187 windows of 16 (+1) tokens of 3000; two ranks of batch 5 draw the whole epoch in a
    new order each epoch, every window once, mid-micro-batch epoch ends included."""
    ranks = [PermutationSampler(TOKENS, 16, 5, seed=5, rank=r, world_size=2) for r in range(2)]
    num = ranks[0].num_windows
    assert num == (3000 - 1) // 16 == 187
    windows = [
        tuple(TOKENS[w * 16 : w * 16 + 16].tolist() + TOKENS[w * 16 + 1 : w * 16 + 17].tolist()) for w in range(num)
    ]
    seen = [row for _ in range(3 * num // 10 + 1) for s in ranks for row in rows(next(s))]
    epochs = [seen[e * num : (e + 1) * num] for e in range(3)]
    for epoch in epochs:
        assert sorted(epoch) == sorted(windows)  # each window once: a permutation of them all
    assert epochs[0] != epochs[1] != epochs[2]  # a new order each epoch
    assert ranks[0].epoch == pytest.approx(len(seen) / num)  # exact progress
