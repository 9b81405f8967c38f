"""The learning-rate schedules (exp.schedules): boundary values, closed forms, warmup, wsd, resuming through JSON
state, argument validation."""

import json
import math
import re
import types

import pytest
import torch
from torch import nn

from exp import schedules

BASE_LR = 0.5
SCHEDULES = ["constant", "linear_warmup", "linear", "linear_to_zero", "cosine", "exponential", "wsd"]


def _sched(name, num_steps, **kw):
    """A scheduler named ``name`` over a one-parameter SGD optimizer with lr BASE_LR."""
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(2))], lr=BASE_LR)
    return opt, getattr(schedules, name)(opt, num_steps, **kw)


def _lrs(name, num_steps, n, **kw):
    """The optimizer's lr for steps 1..n, read off a real optimizer as the scheduler advances."""
    opt, sched = _sched(name, num_steps, **kw)
    out = []
    for _ in range(n):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


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
    got = schedules.multipliers(sched, [i + 1 for i in INDICES])
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
    assert schedules.multipliers(sched, [1, 10]) == [1.0, 0.0]


def test_warmup_ratio_used_when_warmup_steps_is_zero():
    _, sched = _sched("cosine", 100, warmup_ratio=0.1)
    assert schedules.multipliers(sched, [1, 9, 10, 11]) == pytest.approx([0.1, 0.9, 1.0, 1.0])
    assert schedules.multipliers(sched, [12])[0] < 1.0


def test_warmup_steps_win_over_warmup_ratio():
    _, sched = _sched("linear", 100, warmup_steps=3, warmup_ratio=0.5)
    assert schedules.multipliers(sched, [1, 2, 3, 4]) == pytest.approx([1 / 3, 2 / 3, 1.0, 1.0])
    assert schedules.multipliers(sched, [5])[0] < 1.0


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
    assert schedules.multipliers(sched, [n, n + 100]) == [R, R]


@pytest.mark.parametrize(("fraction", "decaying"), [(0.18, 4), (0.01, 1), (0.5, 10)])
def test_wsd_decay_length_rounds_fraction_of_num_steps(fraction, decaying):
    _, sched = _sched("wsd", 20, warmup_steps=2, lr_decay_ratio=0.0, decay_fraction=fraction)
    got = schedules.multipliers(sched, list(range(3, 21)))
    assert sum(m < 1.0 for m in got) == decaying
    assert got[-1] == 0.0


def test_wsd_full_decay_without_warmup():
    _, sched = _sched("wsd", 10, lr_decay_ratio=0.0, decay_fraction=1.0)
    got = schedules.multipliers(sched, list(range(1, 11)))
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
        getattr(schedules, name)(opt, num_steps, **kw)


def test_multipliers_are_one_based_and_do_not_step():
    opt, sched = _sched("linear", 10, warmup_steps=2)
    assert schedules.multipliers(sched, [1, 2, 3]) == [0.5, 1.0, 1.0]
    assert sched.last_epoch == 0 and opt.param_groups[0]["lr"] == BASE_LR * 0.5
    with pytest.raises(ValueError, match="1-based"):
        schedules.multipliers(sched, [0])
