"""Export and generation from checkpoints: identical logits, run-dir resolution, the target allowlist, the CLIs."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from exp import export, generate, schedules
from exp.checkpoint import save_checkpoint
from exp.model import GPT

from ..conftest import ROOT

MODEL = dict(_target_="exp.model.GPT", vocab_size="${data.vocab_size}", seq_len=16, n_layer=2, n_head=2, d_model=32)
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def config_yaml(model=MODEL, vocab_size=264) -> str:
    """A composed-config stand-in whose model node interpolates the data node, as conf/model/*.yaml do."""
    return OmegaConf.to_yaml(OmegaConf.create({"data": {"vocab_size": vocab_size}, "model": model, "seed": 0}))


def write_checkpoint(root, step, seed=0, text=None, vocab_size=264):
    torch.manual_seed(seed)
    model = GPT(vocab_size=vocab_size, seq_len=16, n_layer=2, n_head=2, d_model=32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    path = save_checkpoint(
        root,
        step,
        model=model,
        optimizer=opt,
        scheduler=schedules.cosine(opt, 10),
        trainer_state={"step": step},
        config_yaml=text or config_yaml(vocab_size=vocab_size),
    )
    return path, model


def logits(model):
    x = torch.arange(32).reshape(2, 16) * 7 % 264
    with torch.no_grad():
        return model.eval()(x)[0]


def test_export_gives_identical_logits(tmp_path, capsys):
    path, model = write_checkpoint(tmp_path / "ckpts", 7)
    out = tmp_path / "export"
    assert export.main([str(path), str(out)]) == 0
    assert "exported step 7" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "export.json", "model.safetensors"]
    info = json.loads((out / "export.json").read_text())
    byte_tokens = {"kind": "bytes", "fingerprint": "bytes", "vocab_size": 264}  # no tokenizer.json to carry
    expected = {"source": str(path.resolve()), "step": 7, "num_params": model.num_params(), "tokenizer": byte_tokens}
    assert info == expected
    assert OmegaConf.to_container(OmegaConf.load(out / "config.yaml")) == {**MODEL, "vocab_size": 264}
    assert not any(k.startswith("state.") for k in load_file(out / "model.safetensors"))  # weights only

    for source in (out, path):
        loaded, cfg = export.load_model_for_inference(source)
        assert cfg["vocab_size"] == 264 and not loaded.training
        assert loaded.lm_head.weight is loaded.tok_emb.weight
        assert torch.equal(logits(loaded), logits(model))


def test_export_of_run_dir_picks_newest_valid_checkpoint(tmp_path, capsys):
    root = tmp_path / "run" / "checkpoints"
    write_checkpoint(root, 1, seed=1)
    _, expected = write_checkpoint(root, 2, seed=2)
    corrupt, _ = write_checkpoint(root, 3, seed=3)
    (corrupt / "trainer_state.json").write_text("{}")
    assert export.main([str(tmp_path / "run"), str(tmp_path / "out")]) == 0
    assert json.loads((tmp_path / "out" / "export.json").read_text())["step"] == 2
    assert f"checkpoint {corrupt} is unusable" in capsys.readouterr().err
    loaded, _ = export.load_model_for_inference(tmp_path / "run")
    assert torch.equal(logits(loaded), logits(expected))


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("not_a_checkpoint", "is neither a checkpoint folder"),
        ("corrupt", "model.safetensors does not match its SHA-256"),
        ("unresolvable", "cannot read the model config"),
        ("bad_kwargs", "cannot build exp.model.GPT"),
        ("empty_run_dir", "has no valid checkpoint"),
    ],
)
def test_export_errors_are_one_line_with_exit_2(tmp_path, capsys, case, expected):
    target = tmp_path / "thing"
    if case == "not_a_checkpoint":
        target.mkdir()
    elif case == "corrupt":
        target, _ = write_checkpoint(tmp_path, 1)
        with open(target / "model.safetensors", "r+b") as f:
            f.seek(-1, os.SEEK_END)
            f.write(b"\x00")
    elif case == "unresolvable":
        text = OmegaConf.to_yaml(OmegaConf.create({"model": MODEL}))  # ${data.vocab_size} has nothing to point at
        target, _ = write_checkpoint(tmp_path, 1, text=text)
    elif case == "bad_kwargs":
        target, _ = write_checkpoint(tmp_path, 1, text=config_yaml(model={**MODEL, "n_heads": 2}))
    elif case == "empty_run_dir":
        (target / "checkpoints").mkdir(parents=True)
    assert export.main([str(target), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and expected in err


def test_generate_refuses_other_vocabularies(tmp_path, capsys):
    path, _ = write_checkpoint(tmp_path / "ckpts", 1, vocab_size=300)
    assert generate.main([str(path), "--prompt", "x"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "vocab_size=300" in err and "264" in err
