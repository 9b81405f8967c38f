"""Asynchronous checkpoints: a snapshot of the step written by a background thread while training goes on."""

import json
import threading
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_model

import exp.job
from exp.checkpoint import list_checkpoints, take_snapshot, verify_checkpoint, write_snapshot
from exp.model import GPT
from exp.rundir import read_metrics

from ..conftest import TINY, compose_train

BASE = [
    *TINY,
    "stage.num_steps=9",  # the final save (step 9) is not a periodic one
    "stage.log_every_n_steps=1",
    "stage.eval_every_n_steps=4",
    "checkpoint.every_n_steps=2",
    "checkpoint.keep_last=0",
]


def _objects(seed=0):
    torch.manual_seed(seed)
    model = GPT(vocab_size=64, seq_len=16, n_layer=1, n_head=2, d_model=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _step(model, opt, sched):
    x = torch.randint(0, 64, (4, 16))
    _, loss = model(x, x)
    opt.zero_grad()
    loss.backward()
    opt.step()
    sched.step()


def test_a_copied_snapshot_keeps_its_step_while_training_changes_the_tensors(tmp_path):
    model, opt, sched = _objects()
    _step(model, opt, sched)
    kw = dict(model=model, optimizer=opt, scheduler=sched, trainer_state={"step": 1}, config_yaml="a: 1\n")
    buffers = {}
    copied = take_snapshot(1, **kw, into=buffers)
    expected = write_snapshot(tmp_path / "now", take_snapshot(1, **kw))  # written at once: the state of step 1
    save_model(model, str(tmp_path / "save_model.safetensors"), metadata={"step": "1"})
    for _ in range(2):
        _step(model, opt, sched)  # what training does while a background writer works
    late = write_snapshot(tmp_path / "late", copied)
    verify_checkpoint(late)
    for name in ("model.safetensors", "optimizer.safetensors"):
        assert same_file(late / name, expected / name)
    # what safetensors' save_model writes (a tied embedding stored once, under the name it keeps)
    assert same_file(late / "model.safetensors", tmp_path / "save_model.safetensors")
    after = write_snapshot(tmp_path / "after", take_snapshot(1, **kw))
    assert not same_file(late / "model.safetensors", after / "model.safetensors")
    reused = take_snapshot(1, **kw, into=buffers)  # the next save copies into the same host memory
    first = next(iter(copied.tensors["optimizer.safetensors"].values()))
    assert next(iter(reused.tensors["optimizer.safetensors"].values())).data_ptr() == first.data_ptr()
    assert same_file(write_snapshot(tmp_path / "reused", reused) / "model.safetensors", after / "model.safetensors")


def same_file(a, b) -> bool:
    """The same tensors, bit for bit, and the same metadata (safetensors orders its header as it likes)."""
    with safe_open(str(a), "pt") as fa, safe_open(str(b), "pt") as fb:
        if fa.metadata() != fb.metadata() or set(fa.keys()) != set(fb.keys()):
            return False
        return all(torch.equal(fa.get_tensor(k), fb.get_tensor(k)) for k in fa.keys())


def run(run_dir, *overrides):
    return exp.job.run_job(compose_train(*BASE, *overrides, run_dir=run_dir))


def test_saves_are_written_behind_training_one_at_a_time_and_equal_synchronous_ones(tmp_path):
    log = tmp_path / "writes.jsonl"
    gate = [
        "+callbacks.gate._target_=tests.hooks.GateCheckpointWriter",
        "+callbacks.gate.step=2",
        "+callbacks.gate.until=3",  # the step-2 writer waits for step 3: training goes on while it writes
        f"+callbacks.gate.log={log}",
    ]
    run(tmp_path / "async", *gate)
    writes = [json.loads(line) for line in log.read_text().splitlines()]
    assert [w["step"] for w in writes] == [2, 4, 6, 8, 9]
    assert writes[0]["opened"] is True  # a save on the training thread would have waited for ever
    assert all(w["thread"] != threading.main_thread().name for w in writes[:-1])
    assert writes[-1]["thread"] == threading.main_thread().name  # the final save is synchronous
    for before, after in zip(writes, writes[1:], strict=False):
        assert after["start"] >= before["end"]  # never two in flight
    run(tmp_path / "sync", "checkpoint.async_save=false")
    a, s = tmp_path / "async" / "checkpoints", tmp_path / "sync" / "checkpoints"
    assert [p.name for p in list_checkpoints(a)] == [p.name for p in list_checkpoints(s)]
    for path in list_checkpoints(a):
        verify_checkpoint(path)
        for name in ("model.safetensors", "optimizer.safetensors"):
            assert same_file(path / name, s / path.name / name), (path.name, name)
        assert (path / "scheduler.json").read_text() == (s / path.name / "scheduler.json").read_text()
    losses = [(r["step"], r.get("train/loss")) for r in read_metrics(tmp_path / "async" / "metrics.jsonl")]
    assert losses == [(r["step"], r.get("train/loss")) for r in read_metrics(tmp_path / "sync" / "metrics.jsonl")]
    summary = {d: json.loads((tmp_path / d / "summary.json").read_text()) for d in ("async", "sync")}
    assert summary["async"]["status"] == "FINISHED" and summary["async"]["checkpoint"].endswith("step_00000009")
    assert Path(summary["async"]["best_checkpoint"]).name == Path(summary["sync"]["best_checkpoint"]).name


def test_a_resume_hashes_each_file_of_its_checkpoint_once(tmp_path, monkeypatch):
    import exp.checkpoint.format as fmt

    run(tmp_path / "run", "stage.num_steps=4")
    resumed = tmp_path / "run" / "checkpoints" / "step_00000004"
    hashed = []
    original = fmt._sha256
    monkeypatch.setattr(fmt, "_sha256", lambda path: hashed.append(path) or original(path))
    run(tmp_path / "run", "stage.num_steps=6", "resume.path=auto", "resume.allow_config_change=true")
    mine = sorted(p.name for p in hashed if p.parent == resumed)
    assert mine == sorted(json.loads((resumed / "manifest.json").read_text())["files"])  # each once
