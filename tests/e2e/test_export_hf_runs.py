"""The end-to-end cases of tests/unit/test_export_hf.py: those that start a process or run a training
job."""

import subprocess
import sys

import torch

from ..unit.test_export_hf import ENV, load_hf, write_checkpoint  # noqa: F401


def test_cli_writes_the_folder_without_importing_transformers(tmp_path):
    path, _ = write_checkpoint(tmp_path / "ckpts")
    out = tmp_path / "hf"
    code = (
        "import sys; from exp import export; "
        f"rc = export.main([{str(path)!r}, {str(out)!r}, '--format', 'hf', '--dtype', 'float16']); "
        "assert 'transformers' not in sys.modules and 'tokenizers' not in sys.modules; sys.exit(rc)"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=ENV, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert load_hf(out, torch_dtype="auto").dtype == torch.float16
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary folder left
