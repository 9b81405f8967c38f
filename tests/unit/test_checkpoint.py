"""Checkpoint folders: exact round trips, integrity checks, atomic saves under crashes, rotation and the run lock."""

import json
import math
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from exp import checkpoint as ckpt
from exp import optim, schedules
from exp.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    list_checkpoints,
    load_checkpoint,
    read_trainer_state,
    rotate_checkpoints,
    save_checkpoint,
    verify_checkpoint,
)
from exp.model import GPT

CONFIG = "model:\n  d_model: 32\n"
STATE = {
    "step": 3,
    "tokens_seen": 96,
    "best_val_loss": math.inf,
    "sampler": {"num_batches": 3, "bit_generator": {"state": {"state": 2**100 + 7, "inc": 3}}},
    "mlflow_run_id": "0123abcd",
}


def make(seed=0, **model_kw):
    """Tiny GPT, AdamW over exp.optim's two groups, and a cosine schedule, from a fixed seed."""
    torch.manual_seed(seed)
    model = GPT(**{**dict(vocab_size=264, seq_len=16, n_layer=2, n_head=2, d_model=32), **model_kw})
    opt = torch.optim.AdamW(optim.param_groups(model, 0.1), lr=1e-2)
    return model, opt, schedules.cosine(opt, num_steps=20, warmup_steps=2)


def batches(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 264, (4, 17), generator=g) for _ in range(n)]


def train(model, opt, sched, data, scaler=None, inf_at=None):
    """One optimizer step per batch; inf_at puts an inf into the gradients of that step."""
    losses = []
    for i, b in enumerate(data):
        opt.zero_grad(set_to_none=True)
        loss = model(b[:, :-1], b[:, 1:].contiguous())[1]
        (scaler.scale(loss) if scaler else loss).backward()
        if i == inf_at:
            model.tok_emb.weight.grad[0, 0] = math.inf
        if scaler:
            scaler.step(opt)
            scaler.update()
        else:
            opt.step()
        sched.step()
        losses.append(loss.item())
    return losses


def save(root, step, model, opt, sched, **kw):
    kw = {"trainer_state": {"step": step}, "config_yaml": CONFIG, **kw}
    return save_checkpoint(root, step, model=model, optimizer=opt, scheduler=sched, **kw)


def draws():
    return random.random(), float(np.random.rand()), torch.rand(3).tolist()


def refuse_constant(name):
    raise ValueError(f"{name} is not JSON")  # Python writes NaN/Infinity unless told not to


def flip_byte(file: Path, offset_in_data=10):
    data = bytearray(file.read_bytes())
    header = int.from_bytes(data[:8], "little")  # safetensors: u64 header length, JSON header, tensor bytes
    data[8 + header + offset_in_data] ^= 0xFF
    file.write_bytes(bytes(data))


def test_round_trip_restores_model_optimizer_scheduler_rng_and_training(tmp_path):
    model, opt, sched = make()
    data = batches(6)
    train(model, opt, sched, data[:3])
    path = save(tmp_path, 3, model, opt, sched, trainer_state=STATE)
    after_save = draws()

    model2, opt2, sched2 = make(seed=1)
    state = load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2)
    assert draws() == after_save  # RNG states came back to where save_checkpoint captured them
    assert state == STATE and read_trainer_state(path) == STATE
    assert model2.lm_head.weight is model2.tok_emb.weight
    sd, sd2 = model.state_dict(), model2.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    o, o2 = opt.state_dict(), opt2.state_dict()
    assert o["param_groups"] == o2["param_groups"]  # betas stay a tuple, lr and initial_lr exact
    assert o["state"].keys() == o2["state"].keys()
    for i, s in o["state"].items():
        assert s.keys() == o2["state"][i].keys()
        for k, v in s.items():
            assert v.dtype == o2["state"][i][k].dtype and torch.equal(v, o2["state"][i][k]), (i, k)
    assert o2["state"][0]["step"].ndim == 0  # Adam's step stays a 0-d tensor
    assert sched.state_dict() == sched2.state_dict()

    assert train(model, opt, sched, data[3:]) == train(model2, opt2, sched2, data[3:])
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), model2.parameters(), strict=True))


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler")  # the skipped inf step
def test_grad_scaler_round_trip(tmp_path):
    model, opt, sched = make()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    train(model, opt, sched, batches(4), scaler=scaler, inf_at=0)  # backoff, growth, then one more good step
    state = scaler.state_dict()
    assert state["scale"] == 2.0**10 and state["_growth_tracker"] == 1
    path = save(tmp_path, 4, model, opt, sched, scaler=scaler)

    model2, opt2, sched2 = make(seed=1)
    scaler2 = torch.amp.GradScaler("cpu")
    load_checkpoint(path, model=model2, optimizer=opt2, scheduler=sched2, scaler=scaler2)
    assert scaler2.state_dict() == state
    data = batches(3, seed=2)
    assert train(model, opt, sched, data, scaler) == train(model2, opt2, sched2, data, scaler2)
    assert scaler.state_dict() == scaler2.state_dict()


def test_disabled_scaler_saves_empty_state_and_loads(tmp_path):
    model, opt, sched = make()
    path = save(tmp_path, 1, model, opt, sched, scaler=torch.amp.GradScaler("cpu", enabled=False))
    assert json.loads((path / "scaler.json").read_text()) == {}
    fresh = torch.amp.GradScaler("cpu")
    load_checkpoint(path, model=make()[0], scaler=fresh)
    assert fresh.state_dict() == torch.amp.GradScaler("cpu").state_dict()


def test_nothing_is_pickled_and_all_json_is_strict(tmp_path):
    model, opt, sched = make()
    train(model, opt, sched, batches(2))
    path = save(tmp_path, 2, model, opt, sched, trainer_state=STATE, scaler=torch.amp.GradScaler("cpu"))
    names = {p.name for p in path.iterdir()}
    assert names == {*ckpt.REQUIRED_FILES, "scaler.json", "manifest.json"}
    for file in path.iterdir():
        head = file.read_bytes()[:4]
        assert not head.startswith(b"\x80") and head != b"PK\x03\x04", file  # pickle protocol 2+ / torch.save zip
        if file.suffix == ".json":
            json.loads(file.read_text(), parse_constant=refuse_constant)
        elif file.suffix == ".safetensors":
            with safe_open(file, "pt") as f:
                assert f.metadata()["step"] == "2" and len(list(f.keys())) > 0
    assert (path / "config.yaml").read_text() == CONFIG
    assert "state.0.step" in load_file(path / "optimizer.safetensors")


def test_manifest_catches_flipped_byte_truncation_and_missing_files(tmp_path):
    model, opt, sched = make()
    path = save(tmp_path, 1, model, opt, sched)
    manifest = verify_checkpoint(path)
    assert manifest["step"] == 1 and manifest["format_version"] == ckpt.FORMAT_VERSION
    assert set(manifest["files"]) == {p.name for p in path.iterdir()} - {"manifest.json"}

    flip_byte(path / "model.safetensors")
    load_file(path / "model.safetensors")  # safetensors itself loads the damaged file without complaint
    with pytest.raises(CheckpointError, match=r"model\.safetensors.*SHA-256"):
        verify_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_checkpoint(path, model=make()[0])

    path = save(tmp_path, 2, model, opt, sched)
    with open(path / "optimizer.safetensors", "r+b") as f:
        f.truncate(100)
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors has 100 bytes"):
        verify_checkpoint(path)

    path = save(tmp_path, 3, model, opt, sched)
    (path / "scheduler.json").unlink()
    with pytest.raises(CheckpointError, match=r"scheduler\.json is missing"):
        verify_checkpoint(path)
    manifest = json.loads((path / "manifest.json").read_text())
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": {"../x": {"size": 1, "sha256": ""}}}))
    with pytest.raises(CheckpointError, match=r"manifest\.json: does not list model\.safetensors"):
        verify_checkpoint(path)
    (path / "manifest.json").write_text(json.dumps({**manifest, "files": {"../x": {}, **manifest["files"]}}))
    with pytest.raises(CheckpointError, match=r"manifest\.json: malformed entry '\.\./x'"):
        verify_checkpoint(path)
    del manifest["files"]["scheduler.json"]  # a manifest that simply stops listing the lost file
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match=r"manifest\.json: does not list scheduler\.json"):
        verify_checkpoint(path)
    (path / "manifest.json").unlink()
    with pytest.raises(CheckpointError, match=r"manifest\.json is missing"):
        verify_checkpoint(path)


def test_latest_valid_skips_corrupt_newest_and_is_read_only(tmp_path):
    model, opt, sched = make()
    first = save(tmp_path, 1, model, opt, sched)
    newest = save(tmp_path, 2, model, opt, sched)
    flip_byte(newest / "model.safetensors")
    before = sorted(p.name for p in tmp_path.rglob("*"))
    warnings = []
    assert latest_valid_checkpoint(tmp_path, warn=warnings.append) == first
    assert len(warnings) == 1
    assert warnings[0].startswith(f"checkpoint {newest} is unusable (") and "model.safetensors" in warnings[0]
    assert warnings[0].endswith(f"; falling back to {first}")
    assert sorted(p.name for p in tmp_path.rglob("*")) == before

    (first / "manifest.json").unlink()
    warnings.clear()
    assert latest_valid_checkpoint(tmp_path, warn=warnings.append) is None and len(warnings) == 2
    assert latest_valid_checkpoint(tmp_path / "absent", warn=warnings.append) is None


def test_failure_before_rename_leaves_previous_checkpoint_and_no_partial(tmp_path):
    model, opt, sched = make()
    first = save(tmp_path, 1, model, opt, sched)
    seen = []

    def fail(tmp):
        seen.append(tmp.name)
        verify_checkpoint(tmp)  # the temp folder is complete and manifested before it is renamed
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError, match="disk gone"):
        save(tmp_path, 2, model, opt, sched, before_rename=fail)
    assert seen == [f".step_00000002.tmp-{os.getpid()}"]
    assert list_checkpoints(tmp_path) == [first] and [p.name for p in tmp_path.iterdir()] == [first.name]
    verify_checkpoint(first)

    # Replacing an existing step that fails midway keeps the old folder untouched.
    with pytest.raises(RuntimeError):
        save(tmp_path, 1, model, opt, sched, trainer_state={"step": 1, "tag": "new"}, before_rename=fail)
    assert read_trainer_state(first) == {"step": 1}
    verify_checkpoint(first)


def test_saving_same_step_twice_replaces_it(tmp_path):
    model, opt, sched = make()
    save(tmp_path, 5, model, opt, sched, trainer_state={"tag": "old"})
    with torch.no_grad():
        model.norm.weight.add_(1.0)
    path = save(tmp_path, 5, model, opt, sched, trainer_state={"tag": "new"})
    assert [p.name for p in tmp_path.iterdir()] == ["step_00000005"]  # no temp or trash folders left
    verify_checkpoint(path)
    fresh = make(seed=1)[0]
    assert load_checkpoint(path, model=fresh) == {"tag": "new"}
    assert torch.equal(fresh.norm.weight, model.norm.weight)


def test_save_fsyncs_every_file_and_the_parent_after_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_rename = os.fsync, os.rename
    monkeypatch.setattr(
        os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))), real_fsync(fd))
    )
    monkeypatch.setattr(os, "rename", lambda a, b: (events.append(("rename", str(b))), real_rename(a, b)))
    model, opt, sched = make()
    path = save(tmp_path / "ckpts", 1, model, opt, sched)
    tmp = str(tmp_path / "ckpts" / f".step_00000001.tmp-{os.getpid()}")
    rename = events.index(("rename", str(path)))
    synced_before = {p for kind, p in events[:rename] if kind == "fsync"}
    assert {f"{tmp}/{p.name}" for p in path.iterdir()} | {tmp} <= synced_before
    assert ("fsync", str(tmp_path / "ckpts")) in events[rename:]


def test_rotation_keeps_newest_and_protected(tmp_path):
    model, opt, sched = make()
    paths = [save(tmp_path, s, model, opt, sched) for s in range(1, 6)]
    (tmp_path / ".step_00000009.tmp-123").mkdir()
    (tmp_path / "step_00000010.tmp").mkdir()
    (tmp_path / "step_00000011").write_text("not a folder")
    assert list_checkpoints(tmp_path) == paths
    assert rotate_checkpoints(tmp_path, keep_last=0) == [] and list_checkpoints(tmp_path) == paths
    assert rotate_checkpoints(tmp_path, keep_last=2, protect={paths[1]}) == [paths[0], paths[2]]
    assert list_checkpoints(tmp_path) == [paths[1], paths[3], paths[4]]
    assert not any(p.name.startswith(".step_00000001") for p in tmp_path.iterdir())
    assert rotate_checkpoints(tmp_path, keep_last=1) == [paths[1], paths[3]]
    assert list_checkpoints(tmp_path) == [paths[4]]


def test_step_numbers_sort_numerically_past_eight_digits(tmp_path):
    for step in (99_999_999, 100_000_000, 5):
        (tmp_path / ckpt.checkpoint_name(step)).mkdir()
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_00000005", "step_99999999", "step_100000000"]


def test_shape_and_key_mismatches_name_the_tensor(tmp_path):
    model, opt, sched = make()
    path = save(tmp_path, 1, model, opt, sched)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, model=make(d_model=64)[0])
    assert str(path / "model.safetensors") in str(e.value)
    assert "tensor blocks.0.attn.qkv.weight has shape [96, 32] in the checkpoint but [192, 64] in the model" in str(
        e.value
    )
    with pytest.raises(CheckpointError, match=r"model's tensor blocks\.2\.attn\.qkv\.weight is missing"):
        load_checkpoint(path, model=make(n_layer=3)[0])
    with pytest.raises(CheckpointError, match=r"checkpoint's tensor blocks\.1\.attn\.qkv\.weight does not exist"):
        load_checkpoint(path, model=make(n_layer=1)[0])
    with pytest.raises(CheckpointError, match=r"optimizer\.json: does not fit this optimizer"):
        load_checkpoint(path, model=make()[0], optimizer=torch.optim.AdamW(make()[0].parameters()))


def test_loose_shapes_skip_mismatched_tensors_only(tmp_path):
    model, opt, sched = make()
    path = save(tmp_path, 1, model, opt, sched)
    other, other_opt, _ = make(seed=1, vocab_size=300)
    emb = other.tok_emb.weight.detach().clone()
    load_checkpoint(path, model=other, strict_shapes=False)
    assert torch.equal(other.tok_emb.weight, emb) and other.lm_head.weight is other.tok_emb.weight
    assert torch.equal(other.blocks[1].mlp.down.weight, model.blocks[1].mlp.down.weight)
    with pytest.raises(CheckpointError, match="tok_emb.weight, lm_head.weight were skipped"):
        load_checkpoint(path, model=other, optimizer=other_opt, strict_shapes=False)


def test_missing_checkpoint_and_reserved_state_key(tmp_path):
    with pytest.raises(CheckpointError, match=f"checkpoint {tmp_path / 'nope'} does not exist"):
        load_checkpoint(tmp_path / "nope", model=make()[0])
    model, opt, sched = make()
    with pytest.raises(CheckpointError, match="reserved"):
        save(tmp_path, 1, model, opt, sched, trainer_state={"rng": 1})
    with pytest.raises(CheckpointError, match=r"trainer_state\.json: .*object at when"):
        save(tmp_path, 1, model, opt, sched, trainer_state={"when": object()})
    assert list(tmp_path.iterdir()) == []


def test_unwrap_strips_compile_and_data_parallel():
    model = make()[0]
    wrapped = torch.nn.DataParallel(torch.compile(model))
    assert ckpt.unwrap(wrapped) is model and ckpt.unwrap(model) is model


def test_keys_added_since_an_older_checkpoint_compare_as_what_it_trained_with(tmp_path):
    """A checkpoint saved before data.document_mask, data.order and the eval group resumes under today's defaults; a
    value other than what it trained with is a change."""
    from omegaconf import OmegaConf

    from exp.checkpoint.checkpointer import check_config_change
    from exp.errors import ConfigError

    old = {"data": {"_target_": "exp.data.PyStdlib", "seq_len": 32}, "stage": {"num_steps": 4}}
    saved = tmp_path / "config.yaml"
    saved.write_text(OmegaConf.to_yaml(OmegaConf.create(old)))
    today = {**old, "data": {**old["data"], "document_mask": False, "order": "random"}, "eval": {"tasks": []}}
    assert check_config_change(saved, OmegaConf.create(today), allowed=False)[2] == {}
    masked = {**today, "data": {**today["data"], "document_mask": True}}
    with pytest.raises(ConfigError, match=r"data\.document_mask \(False -> True\)"):
        check_config_change(saved, OmegaConf.create(masked), allowed=False)
