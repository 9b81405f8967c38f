"""The end-to-end cases of tests/unit/test_extend_model.py: those that start a process or run a training
job."""

import json
import subprocess
import sys

from ..conftest import TINY, run_train
from ..unit.test_export import ENV
from ..unit.test_extend_model import V  # noqa: F401


def cli(module: str, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in ENV.items() if k != "EXP_ALLOWED_TARGETS"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env, timeout=120)


def test_a_user_model_trains_plans_exports_and_generates(tmp_path):
    model = ["model=custom", "model._target_=tests.unit.test_extend_model.TinyLM", "model.seq_len=32"]
    overrides = [*(o for o in TINY if not o.startswith("model")), *model]
    run = tmp_path / "run"
    r = run_train(*overrides, f"hydra.run.dir={run}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["num_params"] == V * 32 + 32 * V + V
    assert isinstance(summary["sample"], str)  # sampled through the protocol's generic loop

    r = run_train(*overrides, "dry_run=true", f"hydra.run.dir={tmp_path / 'plan'}", cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"parameters        {summary['num_params']:,}" in r.stdout and "training FLOPs" in r.stdout

    out = tmp_path / "exported"
    for args in (["exp.export", str(run), str(out)], ["exp.generate", str(run), "--prompt", "def "]):
        r = cli(*args)
        assert r.returncode == 2 and r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert "model _target_ 'tests.unit.test_extend_model.TinyLM' is not allowed" in r.stderr
        assert "--allow-target tests.unit.test_extend_model." in r.stderr and "EXP_ALLOWED_TARGETS=" in r.stderr
    assert not out.exists()

    r = cli("exp.export", str(run), str(out), "--allow-target", "tests.")
    assert r.returncode == 0, r.stderr
    assert f"({summary['num_params']:,} parameters)" in r.stdout
    r = cli("exp.generate", str(out), "--allow-target", "tests.", "--prompt", "def ", "--max-new-tokens", "8")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("def ")
