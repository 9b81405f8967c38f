"""Parameter grouping and optimizer construction, checked on real optimizers (schedules: test_schedules.py)."""

from functools import partial

import pytest
import torch
from torch import nn

from exp import optim


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(10, 4)
        self.lin = nn.Linear(4, 4)
        self.ln = nn.LayerNorm(4)
        self.head = nn.Linear(4, 10, bias=False)
        self.head.weight = self.emb.weight
        self.frozen = nn.Linear(4, 4)
        self.frozen.requires_grad_(False)

    def forward(self, x):
        return self.head(self.ln(self.lin(self.emb(x)) + self.frozen(self.emb(x))))


# --- param_groups ---------------------------------------------------------------------------------


def test_param_groups_split_dedupe_and_frozen():
    model = Tiny()
    groups = optim.param_groups(model, 0.1)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"decay", "no_decay"}
    assert by_name["decay"]["weight_decay"] == 0.1
    assert by_name["no_decay"]["weight_decay"] == 0.0

    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)), "a tied parameter appeared twice"
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert set(ids) == trainable
    assert not {id(p) for p in model.frozen.parameters()} & set(ids)

    assert {id(p) for p in by_name["decay"]["params"]} == {id(model.emb.weight), id(model.lin.weight)}
    assert {id(p) for p in by_name["no_decay"]["params"]} == {
        id(model.lin.bias),
        id(model.ln.weight),
        id(model.ln.bias),
    }


def test_param_groups_omits_empty_group():
    groups = optim.param_groups(nn.Linear(3, 3, bias=False), 0.1)
    assert [g["name"] for g in groups] == ["decay"]
    groups = optim.param_groups(nn.LayerNorm(3), 0.1)
    assert [g["name"] for g in groups] == ["no_decay"]


# --- build_optimizer ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make",
    [
        partial(torch.optim.AdamW, lr=1e-2, betas=[0.9, 0.95], weight_decay=0.1),
        partial(torch.optim.Adam, lr=1e-2),
        partial(torch.optim.SGD, lr=0.1, momentum=0.9),
        partial(torch.optim.RMSprop, lr=1e-2),
    ],
    ids=["adamw", "adam", "sgd", "rmsprop"],
)
def test_build_optimizer_constructs_and_steps_on_cpu(make):
    torch.manual_seed(0)
    model = Tiny()
    opt = optim.build_optimizer(make, model, torch.device("cpu"), 0.05)
    assert isinstance(opt, make.func)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups} == {"decay": 0.05, "no_decay": 0.0}
    assert not opt.defaults.get("fused")

    before = [p.detach().clone() for p in model.parameters()]
    model(torch.tensor([[1, 2, 3]])).square().mean().backward()
    opt.step()
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters(), strict=True)]
    trainable = [p.requires_grad for p in model.parameters()]
    assert changed == trainable


class _Recorder:
    """Stands in for an optimizer class to see which keywords build_optimizer adds."""

    def __init__(self, params, lr=0.1, foreach=None, fused=None):
        self.groups = list(params)
        self.foreach = foreach
        self.fused = fused


class _NoFused:
    def __init__(self, params, lr=0.1):
        self.groups = list(params)


@pytest.mark.parametrize(
    ("make", "device", "expected"),
    [
        (partial(_Recorder, lr=0.1), "cuda", True),
        (partial(_Recorder, lr=0.1, fused=None), "cuda", True),
        (partial(_Recorder, lr=0.1, fused=False), "cuda", False),
        (partial(_Recorder, lr=0.1, foreach=True), "cuda", None),
        (partial(_Recorder, lr=0.1), "cpu", None),
    ],
)
def test_build_optimizer_fused_only_on_cuda_when_unset(make, device, expected):
    opt = optim.build_optimizer(make, nn.Linear(2, 2), torch.device(device), 0.1)
    assert opt.fused is expected
    assert [g["name"] for g in opt.groups] == ["decay", "no_decay"]


def test_build_optimizer_leaves_classes_without_fused_alone():
    opt = optim.build_optimizer(partial(_NoFused, lr=0.1), nn.Linear(2, 2), torch.device("cuda"), 0.1)
    assert isinstance(opt, _NoFused)
