"""Stage losses against hand-computed values, and the distillation teacher staying frozen and outside the student."""

import dataclasses
import json
import math

import pytest
import torch
from safetensors.torch import load_file

import exp.run
from exp.config import ConfigError, validate
from exp.losses import kd_loss
from exp.stages import Distill

from ..conftest import TINY, compose_train, make_export


@pytest.mark.parametrize("alpha", [0.0, 0.5, 1.0])
def test_kd_loss_by_hand_at_temperature_2(alpha):
    student = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]])  # (B=1, T=2, V=2)
    teacher = torch.tensor([[[math.log(3.0), 0.0], [0.0, 1.0]]])
    targets = torch.tensor([[0, 1]])
    temp = 2.0

    def softmax(row):
        e = [math.exp(v / temp) for v in row]
        return [v / sum(e) for v in e]

    kls = []
    for s_row, t_row in zip(student[0].tolist(), teacher[0].tolist(), strict=True):
        p_s, p_t = softmax(s_row), softmax(t_row)
        kls.append(sum(t * math.log(t / s) for t, s in zip(p_t, p_s, strict=True)))
    kd = temp**2 * sum(kls) / 2
    ce = (math.log(2.0) + (math.log(math.exp(1) + math.exp(-1)) + 1.0)) / 2  # -log p(target) at T=1
    out = kd_loss(student, teacher, targets, temperature=temp, alpha=alpha)
    assert out["kd_loss"].item() == pytest.approx(kd, rel=1e-5)
    assert out["ce_loss"].item() == pytest.approx(ce, rel=1e-5)
    assert out["loss"].item() == pytest.approx(alpha * kd + (1 - alpha) * ce, rel=1e-5)
    assert out["teacher_agreement"].item() == pytest.approx(0.5)  # argmax agrees on the first token only


def test_kd_loss_ignores_masked_positions():
    student, teacher = torch.randn(1, 3, 5), torch.randn(1, 3, 5)
    full = kd_loss(student[:, :2], teacher[:, :2], torch.tensor([[1, 2]]), 2.0, 0.5)
    masked = kd_loss(student, teacher, torch.tensor([[1, 2, -100]]), 2.0, 0.5)
    assert masked["loss"].item() == pytest.approx(full["loss"].item(), rel=1e-6)


MID = [
    *TINY,
    "stage=midtrain",
    "stage.num_steps=6",
    "stage.log_every_n_steps=2",
    "stage.eval_every_n_steps=3",
    "checkpoint.every_n_steps=3",
]


def test_midtrain_teacher_is_frozen_and_absent_from_the_student(tmp_path):
    teacher_dir = make_export(tmp_path / "teacher", d_model=96, n_layer=2)
    before = load_file(teacher_dir / "model.safetensors")
    run_dir = tmp_path / "run"
    exp.run.train(compose_train(*MID, f"stage.teacher.path={teacher_dir}", run_dir=run_dir))
    after = load_file(teacher_dir / "model.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED"
    ckpt = run_dir / "checkpoints" / "step_00000006"
    student = load_file(ckpt / "model.safetensors")
    assert student["norm.weight"].shape == (64,)  # the student's width, not the teacher's 96
    assert not any("teacher" in k for k in student)
    optimizer_tensors = load_file(ckpt / "optimizer.safetensors")
    num_student_params = len(student)  # the tied embedding/head is stored once
    assert len({k.split(".")[1] for k in optimizer_tensors}) == num_student_params
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    logged = [r for r in rows if "train/kd_loss" in r]
    for key in ("train/kd_loss", "train/ce_loss", "train/student_accuracy", "train/teacher_agreement"):
        assert math.isfinite(logged[-1][key]), key


def test_distill_and_midtrain_select_the_same_stage(tmp_path):
    teacher = f"stage.teacher.path={make_export(tmp_path / 'teacher')}"
    names = ("distill", "midtrain")
    cfgs = {name: compose_train(*TINY, f"stage={name}", teacher, run_dir=tmp_path / name) for name in names}
    distill, midtrain = (validate(cfgs[name]).stage for name in names)
    assert type(distill) is type(midtrain) is Distill
    assert (distill.name, midtrain.name) == ("distill", "midtrain")  # the run name and metrics say which was asked
    assert dataclasses.replace(midtrain, name="distill") == distill
    # checkpoints of stage=midtrain runs saved this target: resuming them compares it with the composed one
    assert cfgs["midtrain"].stage._target_ == "exp.stages.Midtrain"


def test_midtrain_bad_teachers_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="stage.teacher.path"):
        validate(compose_train(*MID, run_dir=tmp_path / "a"))
    with pytest.raises(ConfigError, match="stage.teacher.path=/nope"):
        validate(compose_train(*MID, "stage.teacher.path=/nope", run_dir=tmp_path / "b"))
    other_vocab = make_export(tmp_path / "t300", vocab_size=300)
    with pytest.raises(ConfigError, match="vocab_size 300 differs from the student's 264"):
        validate(compose_train(*MID, f"stage.teacher.path={other_vocab}", run_dir=tmp_path / "c"))


def test_init_from_loads_the_weights_before_training(tmp_path):
    source = make_export(tmp_path / "init")
    cfg = compose_train(
        *TINY,
        f"stage.init_from={source}",
        "stage.learning_rate=1e-9",
        "stage.num_steps=1",
        "checkpoint.every_n_steps=0",
        run_dir=tmp_path / "run",
    )
    exp.run.train(cfg)
    saved = load_file(tmp_path / "run" / "checkpoints" / "step_00000001" / "model.safetensors")
    start = load_file(source / "model.safetensors")
    assert torch.allclose(saved["blocks.0.mlp.up.weight"], start["blocks.0.mlp.up.weight"], atol=1e-6)
