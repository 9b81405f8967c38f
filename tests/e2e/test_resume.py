"""A run stopped at step k and resumed ends bit-identical to the uninterrupted run, and the comparison has teeth."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import exp.checkpoint.format
import exp.job
from exp.data.batches import PermutationSampler
from exp.rundir import read_metrics
from exp.serve import control

from ..conftest import TINY, compose_train

NUM_STEPS = 12
BASE = [
    *TINY,
    f"stage.num_steps={NUM_STEPS}",
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=4",
    "checkpoint.every_n_steps=4",
    "checkpoint.keep_last=0",
    "model.dropout=0.1",
    "+callbacks.rng._target_=tests.hooks.GlobalRngUser",
]


def train(run_dir, *overrides):
    """train.py's job in this process; a stop by signal or interrupt is part of the scenario, not a failure."""
    try:
        return exp.job.run_job(compose_train(*BASE, *overrides, run_dir=run_dir))
    except (SystemExit, KeyboardInterrupt):
        return None


def final_state(run_dir) -> dict:
    folder = run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}"
    trainer = json.loads((folder / "trainer_state.json").read_text())
    for key in ("train_seconds", "warmup_seconds", "warmup_tokens"):  # wall-clock time and per-process first
        trainer["state"].pop(key)  # steps: the only things allowed to differ
    state = {
        "model": load_file(folder / "model.safetensors"),
        "optimizer": load_file(folder / "optimizer.safetensors"),
        "trainer": trainer,
    }
    for name in ("optimizer.json", "scheduler.json", "scaler.json"):
        if (folder / name).exists():
            state[name] = json.loads((folder / name).read_text())
    return state


def trajectory(run_dir) -> list:
    keys = ("train/loss", "train/grad_norm", "train/lr", "val/loss")
    return [(m["step"], k, m[k]) for m in read_metrics(run_dir / "metrics.jsonl") for k in keys if k in m]


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for group in ("model", "optimizer"):
        assert a[group].keys() == b[group].keys()
        for name in a[group]:
            assert torch.equal(a[group][name], b[group][name]), f"{group} tensor {name} differs"
    for name in a:
        if name not in ("model", "optimizer"):
            assert a[name] == b[name], f"{name} differs"


def differs(a: dict, b: dict) -> bool:
    try:
        assert_same(a, b)
    except AssertionError:
        return True
    return False


@pytest.fixture(scope="module")
def straight(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight")
    train(run_dir)
    return run_dir


@pytest.mark.parametrize(
    "k,stop",
    [
        (2, "InterruptAt"),  # killed before the first checkpoint: nothing to resume, a fresh start
        (4, "SignalAt"),  # on a checkpoint step
        (6, "SignalAt"),  # between two checkpoints: the signal saves one now
        (NUM_STEPS, None),  # after the end: resuming a finished run changes nothing
    ],
)
def test_resumed_run_is_bit_identical(straight, tmp_path, k, stop):
    run_dir = tmp_path / "run"
    if stop:
        train(run_dir, f"+callbacks.stop._target_=tests.hooks.{stop}", f"+callbacks.stop.step={k}")
        summary = json.loads((run_dir / "summary.json").read_text())  # an interrupt at once writes its ending too
        assert (summary["status"], summary["step"]) == ("KILLED", k)
    else:
        shutil.copytree(straight, run_dir)
    train(run_dir, "resume=auto")
    assert trajectory(run_dir) == trajectory(straight)
    assert_same(final_state(run_dir), final_state(straight))


def test_a_resume_from_an_earlier_checkpoint_starts_a_branch_that_auto_resume_follows(straight, tmp_path):
    run_dir, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    shutil.copytree(straight, run_dir)  # finished at 12, checkpoints 4, 8, 12
    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6"]
    train(run_dir, f"resume={ckpts / 'step_00000004'}", "checkpoint.keep_last=2", *stop)
    aside = ckpts / "abandoned" / "001_after_step_00000004"
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000008", "step_00000012"]
    assert [p.name for p in exp.checkpoint.list_checkpoints(ckpts)] == ["step_00000004", "step_00000006"]
    assert {m["step"] for m in read_metrics(aside / "metrics.jsonl")} == set(range(5, NUM_STEPS + 1))
    (entry,) = json.loads((run_dir / "branches.json").read_text())
    assert entry["step"] == 4 and entry["abandoned"] == "checkpoints/abandoned/001_after_step_00000004"
    assert entry["checkpoints"] == ["step_00000008", "step_00000012"]
    # the job service marks the best checkpoint from the newest one while summary.json is a previous ending's
    shutil.copy(straight / "summary.json", run_dir / "summary.json")  # best: step 12, set aside
    listed = control.checkpoints(run_dir, json.loads((run_dir / "summary.json").read_text()))
    assert [(c["step"], c["best"]) for c in listed] == [(4, True), (6, False)]

    train(run_dir, "resume=auto", "checkpoint.keep_last=2")  # continues the branch from 6, not the stale 12
    assert trajectory(run_dir) == trajectory(straight)  # one line per step and kind: the branch's
    assert_same(final_state(run_dir), final_state(straight))
    out = json.loads((run_dir / "summary.json").read_text())
    vals = {m["step"]: m["val/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "val/loss" in m}
    assert out["status"] == "FINISHED" and out["step"] == NUM_STEPS
    assert out["best_checkpoint"] == str((ckpts / f"step_{min(vals, key=vals.get):08d}").resolve())
    live = [p.name for p in exp.checkpoint.list_checkpoints(ckpts)]
    assert live[-2:] == ["step_00000008", "step_00000012"] and len(live) <= 3  # keep_last=2 and the best
    assert sorted(p.name for p in aside.iterdir()) == ["metrics.jsonl", "step_00000008", "step_00000012"]


def _keep_one_generator(get, set_):
    """restore_rng as it is, except that one generator keeps the state it had."""
    original = exp.checkpoint.format.restore_rng

    def restore(state):
        kept = get()
        original(state)
        set_(kept)

    return restore


UNRESTORED = {
    "python_rng": lambda mp: mp.setattr(
        exp.checkpoint.format, "restore_rng", _keep_one_generator(random.getstate, random.setstate)
    ),
    "numpy_rng": lambda mp: mp.setattr(
        exp.checkpoint.format, "restore_rng", _keep_one_generator(np.random.get_state, np.random.set_state)
    ),
    "torch_rng": lambda mp: mp.setattr(
        exp.checkpoint.format, "restore_rng", _keep_one_generator(torch.get_rng_state, torch.set_rng_state)
    ),
    "scheduler": lambda mp: mp.setattr(torch.optim.lr_scheduler.LambdaLR, "load_state_dict", lambda s, d: None),
    "optimizer": lambda mp: mp.setattr(torch.optim.Optimizer, "load_state_dict", lambda s, d: None),
    "data_sampler": lambda mp: mp.setattr(PermutationSampler, "load_state_dict", lambda s, d: None),
    "grad_scaler": lambda mp: mp.setattr(torch.amp.GradScaler, "load_state_dict", lambda s, d: None),
}


@pytest.fixture(scope="module")
def straight_fp16(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight_fp16")
    train(run_dir, "stage.dtype=float16")
    return run_dir


@pytest.mark.parametrize("piece", [None, *UNRESTORED])
def test_resume_comparison_fails_when_any_piece_of_state_is_not_restored(straight_fp16, tmp_path, monkeypatch, piece):
    run_dir = tmp_path / "run"
    train(run_dir, "stage.dtype=float16", "+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6")
    if piece:
        UNRESTORED[piece](monkeypatch)
    train(run_dir, "stage.dtype=float16", "resume=auto")
    monkeypatch.undo()
    assert final_state(straight_fp16)["scaler.json"]["_growth_tracker"] == NUM_STEPS  # the scaler really ran
    assert differs(final_state(run_dir), final_state(straight_fp16)) == (piece is not None)


def test_a_checkpoint_naming_a_schedule_at_its_old_place_resumes_bit_identically(straight, tmp_path):
    """Schedules moved from exp.optim to exp.schedules: a checkpoint saved before (its config.yaml says
    exp.optim.cosine) is the same config, and continues exactly."""
    run_dir = tmp_path / "run"
    train(run_dir, "+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6")
    folder = run_dir / "checkpoints" / "step_00000006"
    config = folder / "config.yaml"
    text = config.read_text()
    assert "_target_: exp.schedules.cosine" in text
    config.write_text(text.replace("_target_: exp.schedules.cosine", "_target_: exp.optim.cosine"))
    manifest = json.loads((folder / "manifest.json").read_text())
    entry = manifest["files"]["config.yaml"]
    entry["size"], entry["sha256"] = config.stat().st_size, exp.checkpoint.format._sha256(config)
    (folder / "manifest.json").write_text(json.dumps(manifest))
    train(run_dir)  # resume=auto, nothing changed: not refused
    assert not (run_dir / "config_changes.json").exists()
    assert_same(final_state(run_dir), final_state(straight))
    assert trajectory(run_dir) == trajectory(straight)
