"""The end-to-end cases of tests/unit/test_bpe.py: those that start a process or run a training
job."""

import json
import os
import subprocess
import sys

from ..conftest import ROOT, TINY, run_train
from ..unit.test_bpe import bpe_dir  # noqa: F401


def test_train_runs_on_bpe_tokens(bpe_dir, tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *TINY,
        "data=memmap",
        f"data.path={bpe_dir}",
        "stage.num_steps=2",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 2 and summary["val_loss"] > 0


def test_bpe_without_tokenizers_installed_says_which_extra(corpus, tmp_path):
    out = tmp_path / "out"
    code = (
        "import sys; sys.modules['tokenizers'] = None; from exp.data.prepare import main; "
        f"raise SystemExit(main([{str(corpus)!r}, '--out', {str(out)!r}, '--tokenizer', 'bpe']))"
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install -e '.[hf]'" in lines[0], proc.stderr
    assert not out.exists()
