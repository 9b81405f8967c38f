"""The end-to-end cases of tests/unit/test_lr_find.py: those that start a process or run a training
job."""

import yaml

from ..conftest import TINY, compose_train, run_train


def test_lr_find_true_combines_with_its_keys_on_the_command_line(tmp_path):
    from exp.config import expand_shorthand, validate

    assert expand_shorthand("lr_find=True") == "lr_find.enabled=true" and expand_shorthand("lr_find=x") == "lr_find=x"
    overrides = [expand_shorthand(o) for o in ("lr_find=true", "lr_find.num_steps=40", "lr_find.min_lr=1e-5")]
    settings = validate(compose_train(*TINY, *overrides, run_dir=tmp_path / "run")).run.lr_find
    assert settings.enabled and settings.num_steps == 40 and settings.min_lr == 1e-5
    proc = run_train(*TINY, "lr_find=true", "lr_find.num_steps=40", "--cfg", "job", cwd=tmp_path)  # as typed
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = yaml.safe_load(proc.stdout)["lr_find"]
    assert found["enabled"] is True and found["num_steps"] == 40
