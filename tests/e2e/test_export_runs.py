"""The end-to-end cases of tests/unit/test_export.py: those that start a process or run a training
job."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from exp import export, generate
from exp.checkpoint import CheckpointError

from ..unit.test_export import ENV, config_yaml, write_checkpoint  # noqa: F401


def test_disallowed_target_is_refused_without_being_called(tmp_path):
    marker = tmp_path / "pwned"
    evil = {"_target_": "os.system", "command": f"touch {marker}"}
    path, _ = write_checkpoint(tmp_path / "ckpts", 1, text=config_yaml(model=evil))
    r = subprocess.run(
        [sys.executable, "-m", "exp.export", str(path), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=ENV,
        cwd=tmp_path,
    )
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert "model _target_ 'os.system' is not allowed (allowed: exp.model.GPT, exp.model.HFCausalLM)" in r.stderr
    assert not marker.exists() and not (tmp_path / "out").exists()

    # An export folder is data too: a tampered config.yaml there is refused the same way.
    good, _ = write_checkpoint(tmp_path / "ckpts", 2)
    export.export_checkpoint(good, tmp_path / "exported")
    (tmp_path / "exported" / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(evil)))
    with pytest.raises(CheckpointError, match="'os.system' is not allowed"):
        export.load_model_for_inference(tmp_path / "exported")
    assert not marker.exists()


def test_generate_prints_prompt_continuation_deterministically(tmp_path, capsys):
    path, _ = write_checkpoint(tmp_path / "ckpts", 1)
    opts = ["--prompt", "def ", "--max-new-tokens", "24", "--temperature", "1.0"]
    outputs = []
    for seed in ("0", "0", "1"):
        assert generate.main([str(path), *opts, "--seed", seed]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0].startswith("def ") and len(outputs[0]) > len("def \n")
    assert outputs[0] == outputs[1] != outputs[2]

    export.export_checkpoint(path, tmp_path / "exported")
    r = subprocess.run(
        [sys.executable, "-m", "exp.generate", str(tmp_path / "exported"), *opts, "--seed", "0"],
        capture_output=True,
        text=True,
        env=ENV,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout == outputs[0]  # same weights from the export folder, same seed, fresh process
