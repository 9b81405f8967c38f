"""The end-to-end cases of tests/unit/test_generate.py: those that start a process or run a training
job."""

import subprocess
import sys

import pytest
import torch
from omegaconf import OmegaConf

from exp import export, generate, schedules
from exp.checkpoint import save_checkpoint

from ..unit.test_export import ENV
from ..unit.test_generate import MODEL, successor_model  # noqa: F401


def test_cli_stops_at_end_of_text_and_at_repeated_stop_strings(tmp_path, capsys):
    model = successor_model()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    cfg = OmegaConf.to_yaml(OmegaConf.create({"model": {"_target_": "exp.model.GPT", **MODEL}}))
    path = save_checkpoint(
        tmp_path / "ckpts",
        1,
        model=model,
        optimizer=opt,
        scheduler=schedules.cosine(opt, 10),
        trainer_state={"step": 1},
        config_yaml=cfg,
    )
    out = export.export_checkpoint(path, tmp_path / "exported")
    greedy = ["--prompt", "a", "--temperature", "0", "--max-new-tokens", "30"]

    assert generate.main([str(path), *greedy]) == 0
    assert capsys.readouterr().out == "abécd\n"
    assert generate.main([str(path), *greedy, "--ignore-eot", "--max-new-tokens", "8"]) == 0
    assert capsys.readouterr().out == "abécd<|endoftext|>ab\n"
    with pytest.raises(SystemExit) as e:
        generate.main([str(path), *greedy, "--stop", ""])
    assert e.value.code == 2 and "--stop needs a non-empty string" in capsys.readouterr().err

    r = subprocess.run(
        [sys.executable, "-m", "exp.generate", str(out), *greedy, "--stop", "zz", "--stop", "éc", "--ignore-eot"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == "ab\n"
