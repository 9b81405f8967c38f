"""The target allowlist checks what a `_target_` locates to, never its spelling: a module's attribute leads
nowhere, nothing outside the allowed packages is imported, and every target exp's own configs name is allowed."""

import sys

import pytest
import yaml

from exp.targets import EXP_TARGETS, Allowlist, TargetRefused

from ..conftest import CONF_DIR


def conf_targets() -> set[str]:
    """Every `_target_` the files in conf/ name (hydra's own launcher and sweeper plugins aside)."""
    found = set()

    def walk(node):
        if isinstance(node, dict):
            for key, value in node.items():
                if key == "_target_" and isinstance(value, str):
                    found.add(value)
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    for path in CONF_DIR.rglob("*.yaml"):
        walk(yaml.safe_load(path.read_text()))
    return {t for t in found if not t.startswith(("hydra_plugins.", "hydra.")) and t != "???"}  # ???: the user's


def test_every_target_of_exps_own_configs_is_allowed():
    targets = conf_targets()
    assert {"exp.model.GPT", "torch.optim.AdamW", "exp.stages.SFT"} <= targets  # the walk found conf/'s targets
    allowlist = Allowlist()
    for target in sorted(targets | set(EXP_TARGETS)):
        assert allowlist.refusal(target) is None, target


def test_the_same_object_under_another_spelling_is_allowed():
    assert Allowlist().refusal("exp.model.gpt.GPT") is None  # where GPT is defined
    assert Allowlist().refusal("torch.optim.adamw.AdamW") is None


@pytest.mark.parametrize(
    "target",
    [
        "exp.config.os.makedirs",  # Hydra follows module attributes: this is os.makedirs
        "exp.config.os.symlink",
        "exp.rundir.write_json",  # defined in exp, but no config builds it
        "exp.config.instantiate",  # hydra's instantiate, imported into exp.config
        "exp.checkpoint.weights.torch.load",
        "exp.data.Path",  # pathlib.Path, re-exported
        "exp.serve.routes.sweeps.subprocess.run",
        "exp.serve.routes.sweeps.os.system",
        "torch.optim.optimizer.torch.load",  # through a trusted package's module
        "exp.config",  # a module, not a class or function
        "exp.targets.Allowlist.locate",  # a method
        "builtins.eval",
        "os.system",
        "${oc.env:X}",
        "exp.model..GPT",
    ],
)
def test_refused_whatever_the_spelling(target):
    with pytest.raises(TargetRefused):
        Allowlist().locate(target)


def test_nothing_outside_the_allowed_packages_is_imported(tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "probe_pkg.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Model: pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    why = Allowlist().refusal("probe_pkg.Model")
    assert why == "'probe_pkg.Model' is outside the allowed packages"
    assert not marker.exists() and "probe_pkg" not in sys.modules


def test_a_declared_package_allows_what_it_defines_only(tmp_path, monkeypatch):
    pkg = tmp_path / "user_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("import os\nfrom torch import nn\nfrom user_pkg.models import LM\n")
    (pkg / "models.py").write_text(
        "from torch import nn\nclass LM(nn.Module):\n    pass\ndef make():\n    class Local: pass\n    return Local\n"
        "Made = make()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    allowlist = Allowlist.of(["user_pkg."])
    assert allowlist.refusal("user_pkg.models.LM") is None
    assert allowlist.refusal("user_pkg.LM") is None  # re-exported, but defined in the package
    assert "torch.nn.modules.module.Module" in allowlist.refusal("user_pkg.nn.Module")
    assert "not an allowed target" in allowlist.refusal("user_pkg.models.Made")  # made inside a function
    assert "is a module" in allowlist.refusal("user_pkg.os")
    only_class = Allowlist.of(["user_pkg.LM"])  # declared by the name its package exports it under
    assert only_class.refusal("user_pkg.LM") is None  # the very object the declared name locates to
    assert only_class.refusal("user_pkg.models.LM") == "'user_pkg.models.LM' is outside the allowed packages"
    assert only_class.refusal("user_pkg.models.make") is not None


def test_exp_itself_declared_means_exps_targets_not_the_package():
    assert Allowlist.of(["exp", "exp."]).extra == ()
    assert Allowlist.of(["exp"]).refusal("exp.rundir.write_json") is not None


def test_nested_targets_are_found_in_lists_and_args():
    node = {
        "callbacks": {
            "x": {"_target_": "exp.callbacks.FirstStepClock", "_args_": [{"_target_": "exp.rundir.write_json"}]}
        },
        "model": {"_target_": "exp.model.GPT"},
    }
    key, value, why = Allowlist().first_refused(node)
    assert (key, value) == ("callbacks.x._args_.0._target_", "exp.rundir.write_json") and "not an allowed" in why
    assert Allowlist().first_refused({"a": [{"b": {"_target_": "exp.model.GPT"}}]}) is None


@pytest.mark.parametrize(
    "target, needle",
    [
        ("exp.config.os.makedirs", "is os.makedirs, which is not an allowed target"),
        ("exp.rundir.write_json", "is exp.rundir.write_json, which is not an allowed target"),
    ],
)
def test_a_checkpoint_from_elsewhere_names_no_code(tmp_path, target, needle):
    """Exports, checkpoints and teachers are read through the same rule: located, never built unless allowed."""
    from exp.checkpoint import CheckpointError, load_model_for_inference

    from ..conftest import make_export

    folder = make_export(tmp_path / "export")
    probe = tmp_path / "proof-dir"
    text = (folder / "config.yaml").read_text().replace("exp.model.GPT", target)
    (folder / "config.yaml").write_text(text + f"name: {probe}\npath: {probe}\n")
    with pytest.raises(CheckpointError, match=needle):
        load_model_for_inference(folder)
    assert not probe.exists()


def test_a_saved_config_runs_no_resolver(tmp_path, monkeypatch):
    from exp.checkpoint import CheckpointError, load_model_for_inference

    from ..conftest import make_export

    monkeypatch.setenv("EXP_ATTACK_SECRET", "s3cr3t")
    folder = make_export(tmp_path / "export")
    text = (folder / "config.yaml").read_text().replace("seq_len: 32", "seq_len: ${oc.env:EXP_ATTACK_SECRET}")
    (folder / "config.yaml").write_text(text)
    with pytest.raises(CheckpointError, match="seq_len calls a resolver") as info:
        load_model_for_inference(folder)
    assert "s3cr3t" not in str(info.value)
