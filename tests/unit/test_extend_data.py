"""Your own data: a plain map-style torch Dataset trains through exp.data.TorchDataset, resumes exactly,
and a bad one is refused in validation with one line naming data.dataset."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import Dataset

from exp.data import DataError, DataSource, TorchDataset, TrainSampler, check_data_source
from exp.losses import IGNORE_INDEX
from exp.rundir import read_metrics

from ..conftest import TINY

SEQ_LEN = 32  # TINY's model.seq_len


class MyDataset(Dataset):
    """What a user writes: counting sequences (mod vocab_size) of 8..79 tokens, some shorter than a window."""

    def __init__(self, num_items: int = 96, vocab_size: int = 48, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.starts = rng.integers(0, vocab_size, num_items)
        self.lengths = rng.integers(8, 80, num_items)
        self.vocab_size = vocab_size

    def __len__(self):
        return len(self.starts)

    def __getitem__(self, i):
        return torch.from_numpy((self.starts[i] + np.arange(self.lengths[i])) % self.vocab_size)


class Items(Dataset):
    """Items given as they are, to test what the adapter accepts."""

    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


# what docs/extending.md shows: the adapter's config option, the user's class, its vocabulary size
USER = ["data=torch_dataset", "+data.dataset._target_=tests.unit.test_extend_data.MyDataset", "data.vocab_size=48"]
RUN = [*TINY, *USER, "stage.num_steps=6", "stage.log_every_n_steps=1"]  # each step logged: intervals match


def test_adapter_follows_the_protocol_and_makes_padded_and_cropped_windows():
    items = Items([list(range(5)), np.arange(100), torch.arange(3, dtype=torch.int32)])  # short, long, shorter
    data = TorchDataset(items, seq_len=8, vocab_size=100, val_dataset=items)
    assert isinstance(data, DataSource)
    data.check()
    sampler = data.train_sampler(batch_size=3, seed=0)
    assert isinstance(sampler, TrainSampler)
    x, y = next(sampler)  # one epoch: each item once
    assert x.shape == y.shape == (3, 8) and x.dtype == y.dtype == torch.int64
    for row_x, row_y in zip(x, y, strict=True):
        n = int((row_y != IGNORE_INDEX).sum())
        assert torch.equal(row_y[:n], row_x[:n] + 1)  # counting items: y is x shifted, a real slice of the item
        assert (row_x[n:] == 0).all() and (row_y[n:] == IGNORE_INDEX).all()  # padding after the item
    assert sorted(int((row != IGNORE_INDEX).sum()) for row in y) == [2, 4, 8]  # the long item cropped to 8 + 1
    a, b = data.val_batches(2, 4), data.val_batches(2, 4)  # fixed: the same batches every call
    assert len(a) == 1 and all(torch.equal(p, q) for (p, _), (q, _) in zip(a, b, strict=True))
    train, val = TorchDataset(items, seq_len=8, vocab_size=100).splits()  # no val_dataset: one item held out
    assert sorted([*train, *val]) == [0, 1, 2] and len(val) == 1


def test_sampler_resumes_exactly_and_ranks_split_one_global_batch():
    data = TorchDataset(MyDataset(num_items=40), SEQ_LEN, 48)
    one = data.train_sampler(batch_size=4, seed=3)
    batches = [next(one) for _ in range(25)]  # several epochs of 38 train items
    stopped = data.train_sampler(batch_size=4, seed=3)
    for _ in range(10):
        next(stopped)
    resumed = data.train_sampler(batch_size=4, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(stopped.state_dict())))  # as a checkpoint stores it
    for want in batches[10:]:
        assert all(torch.equal(p, q) for p, q in zip(next(resumed), want, strict=True))
    fresh = next(data.train_sampler(batch_size=4, seed=3))
    assert not torch.equal(fresh[0], batches[10][0])  # so the comparison above has teeth
    ranks = [data.train_sampler(batch_size=2, seed=3, rank=r, world_size=2) for r in (0, 1)]
    for want in batches[:3]:
        got = [next(s) for s in ranks]
        assert torch.equal(torch.cat([g[0] for g in got]), want[0])
    with pytest.raises(ValueError, match="seed"):
        resumed.load_state_dict({**resumed.state_dict(), "seed": 4})
    with pytest.raises(ValueError, match="not a TorchDataset sampler"):
        resumed.load_state_dict({"seed": 3, "world_size": 1, "num_batches": 0, "bit_generator": {}})


@pytest.mark.parametrize(
    "items,message",
    [
        ([], r"^data\.dataset: tests\.unit\.test_extend_data\.Items is empty"),
        ([[1, 2, 3]], r"^data\.dataset: holds 1 item, .* set data\.val_dataset"),
        ([[1, 2], "abc"], r"^data\.dataset\[1\]: is a str, not a 1-D sequence of token ids"),
        ([[1, 2], [[1, 2], [3, 4]]], r"^data\.dataset\[1\]: is a list of shape \(2, 2\)"),
        ([[1, 2], [0.5, 1.5]], r"^data\.dataset\[1\]: is a list of float64 values"),
        ([[1, 2], [7]], r"^data\.dataset\[1\]: holds 1 token id\(s\)"),
        (
            [[1, 2], [3, 60]],
            r"^data\.dataset\[1\]: holds token id 60, outside \[0, data\.vocab_size=48\) \(set data\.vocab_size=61",
        ),
        ([[1, 2], torch.tensor([1.0, 2.0])], r"^data\.dataset\[1\]: is a tensor of torch\.float32"),
    ],
)
def test_check_says_what_is_wrong_naming_data_dataset(items, message):
    with pytest.raises(DataError, match=message):
        TorchDataset(Items(items), SEQ_LEN, vocab_size=48).check()


def test_a_plain_dataset_given_as_data_is_told_to_use_the_adapter():
    check_data_source(TorchDataset(MyDataset(), SEQ_LEN, 48))
    with pytest.raises(
        DataError,
        match=r"^data\._target_: tests\.unit\.test_extend_data\.MyDataset lacks seq_len, .*describe "
        r"of exp\.data\.DataSource: .* data=torch_dataset \+data\.dataset\._target_=tests\.",
    ):
        check_data_source(MyDataset())


def test_check_refuses_a_config_node_without_target():
    with pytest.raises(DataError, match=r"^data\.dataset: is a dict, not a Dataset: give it a _target_"):
        TorchDataset({"path": "x"}, SEQ_LEN, 48).check()


def final(run_dir) -> tuple[dict, dict, list]:
    summary = json.loads((run_dir / "summary.json").read_text())
    losses = [(m["step"], m["train/loss"]) for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]
    return summary, load_file(f"{summary['checkpoint']}/model.safetensors"), losses
