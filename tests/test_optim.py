"""Parameter grouping, optimizer construction and LR schedule values, checked on real optimizers."""

import json
import math
import re
import types
from functools import partial

import pytest
import torch
from torch import nn

from exp import optim

BASE_LR = 0.5
SCHEDULES = ["constant", "linear_warmup", "linear", "linear_to_zero", "cosine", "exponential", "wsd"]


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


def _sched(name, num_steps, **kw):
    """A scheduler named ``name`` over a one-parameter SGD optimizer with lr BASE_LR."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    return opt, getattr(optim, name)(opt, num_steps, **kw)


def _lrs(name, num_steps, n, **kw):
    """The optimizer's lr for steps 1..n, read off a real optimizer as the scheduler advances."""
    opt, sched = _sched(name, num_steps, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


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


# --- schedule values ------------------------------------------------------------------------------

N, W, R = 21, 4, 0.1  # decay spans indices 4..20, so index 12 is its midpoint
MID = W + (N - 1 - W) // 2

# Expected multipliers at step indices 0, W-1, W, MID, N-1 and well past the end.
BOUNDARY = {
    "constant": [1 / W, 1.0, 1.0, 1.0, 1.0, 1.0],
    "linear_warmup": [1 / W, 1.0, 1.0, 1.0, 1.0, 1.0],
    "linear": [1 / W, 1.0, 1.0, (1 + R) / 2, R, R],
    "linear_to_zero": [1 / W, 1.0, 1.0, 0.5, 0.0, 0.0],
    "cosine": [1 / W, 1.0, 1.0, (1 + R) / 2, R, R],
    "exponential": [1 / W, 1.0, 1.0, math.sqrt(R), R, R],
}
INDICES = [0, W - 1, W, MID, N - 1, N + 10]


@pytest.mark.parametrize("name", sorted(BOUNDARY))
def test_schedule_boundaries(name):
    _, sched = _sched(name, N, warmup_steps=W, lr_decay_ratio=R)
    got = optim.multipliers(sched, [i + 1 for i in INDICES])
    assert got == pytest.approx(BOUNDARY[name], rel=1e-12, abs=1e-15)
    # Exactness at the ends is part of the contract, not just closeness.
    assert got[1] == 1.0 and got[2] == 1.0
    assert got[4] == BOUNDARY[name][4] and got[5] == BOUNDARY[name][5]

    lrs = _lrs(name, N, N + 11, warmup_steps=W, lr_decay_ratio=R)
    assert [lrs[i] for i in INDICES] == pytest.approx([BASE_LR * m for m in BOUNDARY[name]], rel=1e-12)


@pytest.mark.parametrize(
    ("name", "closed_form"),
    [
        ("linear", lambda p: R + (1 - R) * (1 - p)),
        ("linear_to_zero", lambda p: 1 - p),
        ("cosine", lambda p: R + (1 - R) * 0.5 * (1 + math.cos(math.pi * p))),
        ("exponential", lambda p: R**p),
    ],
)
def test_decay_matches_closed_form_everywhere(name, closed_form):
    lrs = _lrs(name, N, N, warmup_steps=W, lr_decay_ratio=R)
    expected = [BASE_LR * (i + 1) / W for i in range(W)]
    expected += [BASE_LR * closed_form((i - W) / (N - 1 - W)) for i in range(W, N)]
    assert lrs == pytest.approx(expected, rel=1e-12, abs=1e-15)


def test_no_warmup_starts_at_full_lr():
    _, sched = _sched("cosine", 10, lr_decay_ratio=0.0)
    assert optim.multipliers(sched, [1, 10]) == [1.0, 0.0]


def test_warmup_ratio_used_when_warmup_steps_is_zero():
    _, sched = _sched("cosine", 100, warmup_ratio=0.1)
    assert optim.multipliers(sched, [1, 9, 10, 11]) == pytest.approx([0.1, 0.9, 1.0, 1.0])
    assert optim.multipliers(sched, [12])[0] < 1.0


def test_warmup_steps_win_over_warmup_ratio():
    _, sched = _sched("linear", 100, warmup_steps=3, warmup_ratio=0.5)
    assert optim.multipliers(sched, [1, 2, 3, 4]) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert optim.multipliers(sched, [5])[0] < 1.0


# --- wsd ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("shape", "mid"),
    [
        ("linear", (1 + R) / 2),
        ("cosine", (1 + R) / 2),
        ("sqrt", R + (1 - R) * (1 - math.sqrt(0.5))),
    ],
)
def test_wsd_stable_then_decay(shape, mid):
    n, w = 20, 3
    kw = dict(warmup_steps=w, lr_decay_ratio=R, decay_fraction=0.2, decay_shape=shape)
    lrs = _lrs("wsd", n, n + 5, **kw)
    mult = [lr / BASE_LR for lr in lrs]
    d = 4  # 0.2 * 20 steps decay: indices 16..19
    assert mult[:w] == pytest.approx([(i + 1) / w for i in range(w)])
    assert mult[w : n - d] == [1.0] * (n - w - d)
    assert all(m < 1.0 for m in mult[n - d : n])
    assert all(a > b for a, b in zip(mult[n - d - 1 : n - 1], mult[n - d : n], strict=True))
    assert mult[n - d + 1] == pytest.approx(mid)  # p = 2/4
    assert mult[n - 1] == pytest.approx(R) and mult[n:] == pytest.approx([R] * 5)
    _, sched = _sched("wsd", n, **kw)
    assert optim.multipliers(sched, [n, n + 100]) == [R, R]


@pytest.mark.parametrize(("fraction", "decaying"), [(0.18, 4), (0.01, 1), (0.5, 10)])
def test_wsd_decay_length_rounds_fraction_of_num_steps(fraction, decaying):
    _, sched = _sched("wsd", 20, warmup_steps=2, lr_decay_ratio=0.0, decay_fraction=fraction)
    got = optim.multipliers(sched, list(range(3, 21)))
    assert sum(m < 1.0 for m in got) == decaying
    assert got[-1] == 0.0


def test_wsd_full_decay_without_warmup():
    _, sched = _sched("wsd", 10, lr_decay_ratio=0.0, decay_fraction=1.0)
    got = optim.multipliers(sched, list(range(1, 11)))
    assert got == pytest.approx([1 - (i + 1) / 10 for i in range(10)])


# --- resumability ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", SCHEDULES)
def test_resume_through_json_state_dict(name):
    kw = dict(warmup_steps=3, lr_decay_ratio=0.1)
    opt_a, sched_a = _sched(name, 20, **kw)
    assert all(isinstance(fn, types.FunctionType) for fn in sched_a.lr_lambdas)
    for _ in range(7):
        opt_a.step()
        sched_a.step()
    state = json.loads(json.dumps(sched_a.state_dict()))
    assert state["lr_lambdas"] == [None]
    assert state["last_epoch"] == 7

    opt_b, sched_b = _sched(name, 20, **kw)
    sched_b.load_state_dict(state)
    assert sched_b.get_last_lr() == sched_a.get_last_lr()
    for _ in range(20):
        opt_a.step()
        sched_a.step()
        opt_b.step()
        sched_b.step()
        assert opt_b.param_groups[0]["lr"] == opt_a.param_groups[0]["lr"]


# --- validation -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "num_steps", "kw", "key"),
    [
        ("cosine", 0, {}, "stage.num_steps"),
        ("constant", -3, {}, "stage.num_steps"),
        ("cosine", 10.0, {}, "stage.num_steps"),
        ("cosine", 10, {"warmup_steps": 10}, "stage.warmup_steps"),
        ("linear", 10, {"warmup_steps": -1}, "stage.warmup_steps"),
        ("cosine", 10, {"warmup_ratio": 1.0}, "stage.warmup_ratio"),
        ("cosine", 10, {"warmup_ratio": -0.1}, "stage.warmup_ratio"),
        ("cosine", 10, {"warmup_ratio": 0.99}, "stage.warmup_ratio"),
        ("cosine", 10, {"lr_decay_ratio": 1.5}, "stage.lr_decay_ratio"),
        ("linear", 10, {"lr_decay_ratio": -0.1}, "stage.lr_decay_ratio"),
        ("exponential", 10, {"lr_decay_ratio": 0.0}, "stage.lr_decay_ratio"),
        ("wsd", 10, {"decay_fraction": 0.0}, "scheduler.decay_fraction"),
        ("wsd", 10, {"decay_fraction": 1.5}, "scheduler.decay_fraction"),
        ("wsd", 10, {"warmup_steps": 5, "decay_fraction": 0.6}, "scheduler.decay_fraction"),
        ("wsd", 10, {"decay_shape": "exp"}, "scheduler.decay_shape"),
    ],
)
def test_invalid_args_name_the_key(name, num_steps, kw, key):
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ValueError, match=re.escape(key)):
        getattr(optim, name)(opt, num_steps, **kw)


def test_multipliers_are_one_based_and_do_not_step():
    opt, sched = _sched("linear", 10, warmup_steps=2)
    assert optim.multipliers(sched, [1, 2, 3]) == [0.5, 1.0, 1.0]
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == BASE_LR * 0.5
    with pytest.raises(ValueError, match="1-based"):
        optim.multipliers(sched, [0])
