"""docs/extending.md's "Stage" example, run as a user would: a Pretrain subclass with its own train_step,
selected by `_target_`, with its own config key, logged metric and validation."""

import json
from dataclasses import dataclass

import torch

from exp.losses import lm_loss
from exp.model.protocol import logits_of
from exp.rundir import read_metrics
from exp.stages import Pretrain

from ..conftest import TINY, run_train


@dataclass(kw_only=True)
class ZLossPretrain(Pretrain):
    """Next-token cross-entropy plus z_loss * mean(logsumexp(logits)^2), which keeps the logits from drifting."""

    z_loss: float = 1e-4

    def __post_init__(self):
        super().__post_init__()
        if self.z_loss < 0:
            raise ValueError(f"stage.z_loss={self.z_loss} must be >= 0")

    def train_step(self, model, batch, diagnostics: bool = True) -> dict[str, torch.Tensor]:
        x, y = batch
        logits = logits_of(model(x))
        out = lm_loss(logits, y, accuracy=diagnostics)
        z = logits.float().logsumexp(-1).pow(2).mean()
        return {**out, "loss": out["loss"] + self.z_loss * z, "z": z.detach()}  # "z": logged as train/z


def test_a_stage_of_ones_own_trains_logs_its_metric_and_validates_its_key(tmp_path):
    mine = ["stage._target_=tests.e2e.test_extend_stage.ZLossPretrain", "+stage.z_loss=1e-3"]
    proc = run_train(*TINY, *mine, f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [m for m in read_metrics(tmp_path / "run" / "metrics.jsonl") if "train/z" in m]
    assert logged and all(m["train/z"] > 0 for m in logged)
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "FINISHED"
    bad = run_train(*TINY, *mine[:1], "+stage.z_loss=-1", f"hydra.run.dir={tmp_path / 'bad'}", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip() == "config error: stage.z_loss=-1.0 must be >= 0"
    assert not (tmp_path / "bad").exists()
