"""The LR range test: where the answer is known, the suggestion lands in the right decade; lr_find=true writes its
plot, record and summary and no checkpoint."""

import itertools
import json

import numpy as np
import pytest
import torch
from torch import nn

import exp.run
from exp.config import LRFindConfig
from exp.errors import ConfigError
from exp.hardware import Runtime
from exp.loop import Trained
from exp.lr_find import RangeTest, run_range_test, suggest

from ..conftest import TINY, compose_train

CURVATURE = 100.0  # plain SGD on 0.5 * a * |w|^2 converges fastest near lr = 1/a and diverges past lr = 2/a


class Quadratic:
    """A stage whose loss is 0.5 * a * |w|^2 (the batch is ignored): the best learning rate is known."""

    max_grad_norm = 1e9
    gradient_accumulation_steps = 1

    def train_step(self, model, batch, diagnostics=True):
        return {"loss": 0.5 * CURVATURE * model.w.pow(2).sum()}


class Weights(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(8))


def test_the_suggestion_lands_in_the_known_decade_and_divergence_stops_the_test():
    model = Weights()
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    t = Trained(Quadratic(), model, optimizer, None, Runtime(torch.device("cpu"), torch.float32))
    batches = itertools.repeat((torch.zeros(1, 2, dtype=torch.long), torch.zeros(1, 2, dtype=torch.long)))
    result = run_range_test(t, batches, LRFindConfig(min_lr=1e-6, max_lr=10.0, num_steps=140))
    # Each step multiplies the loss by (1 - lr a)^2: with 20 steps a decade it falls fastest in absolute terms where
    # 40 lr a ~ 1 (lr ~ 2.5e-4), while it is still large; the lowest loss is where lr a passes 1..2.
    assert 1e-4 <= result.suggestion < 1e-3
    assert 1 / CURVATURE <= result.min_loss_lr <= 4 / CURVATURE
    assert "passed 4 x its lowest" in result.stopped and result.lrs[-1] < 10.0  # diverged past 2/a, then stopped
    assert 2 / CURVATURE < result.lrs[-1] < 20 / CURVATURE


def test_a_short_test_suggests_where_the_loss_falls_fastest_before_it_diverges():
    """40 steps over 5 decades: the loss falls fastest at lr 1e-2 (a noisy sigmoid in log lr), then diverges past
    6e-2. An average of 21 steps (1 / lr_find.smoothing) spans half the test and smears the divergence into the
    fall; scaled to the test, the suggestion lands within a factor 1.5 of 1e-2."""
    lrs = np.logspace(-5, 0, 40)
    x = np.log10(lrs)
    losses = 3 - 2 / (1 + np.exp(-(x + 2) / 0.25)) + np.where(x > -1.2, 30 * (x + 1.2) ** 2, 0)
    losses += np.random.default_rng(0).normal(0, 0.03, len(x))
    result = RangeTest(list(lrs), list(losses), list(losses), "diverged")
    suggest(result)  # lr_find.smoothing's default, 0.05
    assert 1e-2 / 1.5 < result.suggestion < 1e-2 * 1.5, result.method
    assert 1e-2 < result.min_loss_lr < 1e-1 and "centred average of 5 steps" in result.method


def test_lr_find_true_writes_plot_record_and_summary_but_no_checkpoint(tmp_path, capsys):
    run_dir = tmp_path / "run"
    cfg = compose_train(*TINY, "lr_find.enabled=true", "lr_find.num_steps=30", "lr_find.max_lr=10", run_dir=run_dir)
    suggested = exp.run.train(cfg)
    out = capsys.readouterr().out
    assert f"suggested stage.learning_rate={suggested:.3g}" in out
    record = json.loads((run_dir / "lr_find.json").read_text())
    assert record["suggested_learning_rate"] == suggested and len(record["lrs"]) == len(record["losses"]) <= 30
    assert record["lrs"] == sorted(record["lrs"]) and record["lrs"][0] == pytest.approx(1e-6)
    png = (run_dir / "lr_find.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 10_000
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["kind"] == "lr_find" and summary["suggested_learning_rate"] == suggested
    assert not (run_dir / "checkpoints").exists()


def test_bad_lr_find_settings_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match=r"lr_find\.min_lr=1\.0 and lr_find\.max_lr=0\.1 need 0 < min < max"):
        bad = ("lr_find.enabled=true", "lr_find.min_lr=1.0", "lr_find.max_lr=0.1")
        exp.run.train(compose_train(*TINY, *bad, run_dir=tmp_path / "run"))
    assert not (tmp_path / "run").exists()


def test_lr_find_true_is_short_for_enabled(tmp_path):
    from exp.config import validate

    assert validate(compose_train(*TINY, "lr_find=true", run_dir=tmp_path / "run")).run.lr_find.enabled
    assert not validate(compose_train(*TINY, run_dir=tmp_path / "run")).run.lr_find.enabled
