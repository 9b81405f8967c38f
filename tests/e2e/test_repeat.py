"""`python -m exp.repeat RUN_DIR [OVERRIDES...]`: a run's overrides, then new ones, through train.py's Hydra app."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from hydra.errors import ConfigCompositionException

from exp.repeat import Recorded, merge, plan

from ..conftest import ROOT, TINY, compose_train, run_train

# The options conf/config.yaml selects, as a run's .hydra/hydra.yaml records them under runtime.choices.
CHOICES = {
    "model": "gpt_tiny",
    "optimizer": "adamw",
    "scheduler": "cosine",
    "data": "pystdlib",
    "stage": "pretrain",
    "hardware": "auto",
    "tracking": "mlflow",
    "checkpoint": "default",
    "pipeline": None,
    "hydra/launcher": "exp_basic",
}


def run_repeat(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """exp.repeat in a subprocess, as a user runs it."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "exp.repeat", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def recorded_run(path: Path, overrides: list[str], hydra: dict | None = None) -> Path:
    """A run directory as train.py leaves it, reduced to what exp.repeat reads: .hydra/overrides.yaml (+ hydra.yaml)."""
    (path / ".hydra").mkdir(parents=True)
    (path / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    if hydra is not None:
        (path / ".hydra" / "hydra.yaml").write_text(yaml.safe_dump({"hydra": hydra}))
    return path


def new_run_dirs(root: Path, *old: Path) -> list[Path]:
    return [p.parent for p in root.rglob(".hydra") if p.parent not in old]


# --- the overrides: recorded, then new, normalised so Hydra accepts them and the new ones win -----------------


@pytest.mark.parametrize(
    "recorded,choices,new,expect,left_out",
    [
        # a key the run added with +, added again: Hydra refuses "+a=1 +a=2" ("An item is already at")
        (
            ["+callbacks.x._target_=exp.loop.Callback"],
            {},
            ["+callbacks.x._target_=exp.callbacks.FirstStepClock"],
            {"callbacks.x._target_": "exp.callbacks.FirstStepClock"},
            [],
        ),
        # ... set without +: with the run's addition gone, it is force-added
        (
            ["+callbacks.x._target_=exp.loop.Callback", "+callbacks.x.k=1"],
            {},
            ["callbacks.x._target_=exp.callbacks.FirstStepClock"],
            {"callbacks.x._target_": "exp.callbacks.FirstStepClock", "callbacks.x.k": 1},
            [],
        ),
        # a key of the base config set by the run, then added: Hydra refuses + on an existing key
        (["stage.num_steps=2"], {}, ["+stage.num_steps=3"], {"stage.num_steps": 3}, []),
        # a key the run deleted, set again
        (["~stage.eval_at_start"], {}, ["stage.eval_at_start=true"], {"stage.eval_at_start": True}, []),
        # something the run added, deleted
        (["+callbacks.x._target_=exp.loop.Callback"], {}, ["~callbacks.x"], {"callbacks": {}}, []),
        # a group switched: the old option's keys the new one lacks are left out (none.yaml has no uri)
        (
            ["tracking.uri=sqlite:///x.db", "tracking.artifact_location=/tmp/a", "stage.num_steps=2"],
            {},
            ["tracking=none", "stage.num_steps=10"],
            {"tracking._target_": "exp.tracking.NullTracker", "stage.num_steps": 10},
            ["tracking.uri=sqlite:///x.db", "tracking.artifact_location=/tmp/a"],
        ),
        # ... and those it has stay
        (
            ["optimizer=sgd", "optimizer.momentum=0.8", "+optimizer.nesterov=true", "optimizer.lr=0.1"],
            {"optimizer": "sgd"},
            ["optimizer=adam"],
            {"optimizer._target_": "torch.optim.Adam", "optimizer.lr": 0.1},
            ["optimizer.momentum=0.8", "+optimizer.nesterov=true"],
        ),
        (
            ["stage.num_steps=2"],
            {},
            ["stage=sft"],
            {"stage._target_": "exp.stages.SFT", "stage.num_steps": 2},
            [],
        ),
        # the same option again is no switch; the later value wins
        (
            ["optimizer=sgd", "optimizer.lr=0.1"],
            {"optimizer": "sgd"},
            ["optimizer=sgd", "optimizer.lr=0.2"],
            {"optimizer._target_": "torch.optim.SGD", "optimizer.lr": 0.2},
            [],
        ),
        # train.py's resume=PATH shorthand meets the run's resume.path
        (["resume.path=null"], {}, ["resume=auto"], {"resume.path": "auto"}, []),
    ],
)
def test_merge_composes_and_the_new_value_wins(tmp_path, recorded, choices, new, expect, left_out):
    base, added, dropped = merge(Recorded(run_dir=tmp_path, overrides=recorded, choices={**CHOICES, **choices}), new)
    cfg = compose_train(*base, *added, run_dir=tmp_path / "run")
    for key, value in expect.items():
        node = cfg
        for part in key.split("."):
            node = node[part]
        assert node == value, (key, base, added)
    assert [line for line, _ in dropped] == left_out


def test_a_plain_concatenation_is_what_hydra_refuses(tmp_path):
    """Why merge normalises: the run's `+key=...` followed by the user's makes Hydra fail."""
    with pytest.raises(ConfigCompositionException, match="already at"):
        compose_train("+callbacks.x._target_=a", "+callbacks.x._target_=b", run_dir=tmp_path / "run")


def test_plan_leaves_out_the_run_dir_and_the_sweep_and_keeps_the_sweep_config(tmp_path):
    """A sweep trial: its point's overrides (with the sweep's MLflow parent), Hydra's sweep settings, sweeps/grid."""
    run = recorded_run(
        tmp_path / "sweep" / "1",
        ["stage.learning_rate=0.001", "optimizer=sgd", "tracking.parent_run_id=abc123"],
        hydra={
            "overrides": {
                "hydra": ["hydra.sweep.dir=/x/sweep", "hydra.mode=MULTIRUN", "hydra.sweeper.params={a:1}"],
                "task": [],
            },
            "job": {"config_name": "grid"},
            "runtime": {
                "choices": {**CHOICES, "optimizer": "sgd"},
                "config_sources": [
                    {"path": str(ROOT / "conf"), "schema": "file", "provider": "main"},
                    {"path": str(ROOT / "sweeps"), "schema": "file", "provider": "command-line"},
                ],
            },
        },
    )
    p = plan(run, ["stage.num_steps=3"])
    assert p.argv == [
        "--config-dir",
        str(ROOT / "sweeps"),
        "--config-name",
        "grid",
        "stage.learning_rate=0.001",
        "optimizer=sgd",
        "hydra.mode=RUN",  # grid.yaml sets MULTIRUN: a repeat is one run
        "stage.num_steps=3",
    ]
    assert [line for line, _ in p.dropped] == [
        "tracking.parent_run_id=abc123",
        "hydra.sweep.dir=/x/sweep",
        "hydra.sweeper.params={a:1}",
    ]
    assert plan(run / ".hydra", ["-m", "optimizer=adam,sgd"]).argv[4:] == [
        "-m",
        "stage.learning_rate=0.001",
        "hydra.sweeper.params=null",
        "optimizer=adam,sgd",
    ]


# --- the command: one line and exit 2 for what cannot run; nothing written --------------------------------------


@pytest.mark.parametrize(
    "make,needle",
    [
        (lambda p: p / "nowhere", "no such run directory"),
        (lambda p: (p / "plain").mkdir() or p / "plain", "has no .hydra/overrides.yaml"),
        (lambda p: (p / "sw").mkdir() or (p / "sw" / "multirun.yaml").touch() or p / "sw", "is a sweep directory"),
    ],
)
def test_not_a_run_directory_exits_2_with_one_line(tmp_path, make, needle):
    proc = run_repeat(str(make(tmp_path)), "stage.num_steps=3", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: ") and needle in lines[0], proc.stderr
    assert not new_run_dirs(tmp_path)


@pytest.mark.parametrize(
    "bad,needle",
    [
        (["+optimizer.lrr=0.1"], "config error: optimizer.lrr: not a parameter"),  # exp.config's validation
        (["stage.warmup_steps=4"], "config error: stage.warmup_steps=4"),
        (["optimizer=foo"], "optimizer/foo"),  # Hydra's own composition error, exit 2 as train.py's
        (["-cn", "other"], "config error: -cn:"),  # the repeat composes the run's own config
    ],
)
def test_bad_override_exits_2_and_leaves_no_run_dir(tmp_path, bad, needle):
    run = recorded_run(tmp_path / "old", [*TINY, "stage.num_steps=4"])
    proc = run_repeat(str(run), *bad, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert needle in lines[0], proc.stderr
    if lines[0].startswith("config error: "):
        assert len(lines) == 1, proc.stderr
    assert not new_run_dirs(tmp_path, run)


def test_cfg_job_prints_the_recorded_plus_new_config(tmp_path):
    """train.py's flags pass through; the config is the run's overrides with the new ones, group switch included."""
    small = [o for o in TINY if not o.startswith("tracking")]
    run = recorded_run(tmp_path / "old", [*small, "tracking=mlflow", "tracking.uri=sqlite:///old.db"])
    proc = run_repeat(str(run), "--cfg", "job", "tracking=none", "optimizer=sgd", "stage.num_steps=7", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)  # nothing else on stdout: --cfg prints the config only
    assert cfg["tracking"] == {"_target_": "exp.tracking.NullTracker", "_partial_": True}
    assert cfg["optimizer"]["_target_"] == "torch.optim.SGD"
    assert cfg["stage"]["num_steps"] == 7 and cfg["model"]["n_layer"] == 2 and cfg["model"]["d_model"] == 64
    assert not new_run_dirs(tmp_path, run)


# --- real runs ------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_repeat_a_tracked_run_untracked_and_longer(tmp_path):
    """The run was tracked in a SQLite store with an extra callback; the repeat switches tracking off, trains
    longer, replaces the callback (a second `+` of the same key), and goes to a new run dir of its own."""
    old = tmp_path / "old"
    recorded = [
        *(o for o in TINY if not o.startswith(("tracking", "stage.num_steps"))),
        "tracking=mlflow",
        f"tracking.uri=sqlite:///{tmp_path / 'mlflow.db'}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        "stage.num_steps=2",
        "+callbacks.extra._target_=exp.loop.Callback",
    ]
    proc = run_train(*recorded, f"hydra.run.dir={old}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert yaml.safe_load((old / ".hydra" / "overrides.yaml").read_text()) == recorded

    new = ["tracking=none", "stage.num_steps=3", "+callbacks.extra._target_=exp.callbacks.FirstStepClock"]
    proc = run_repeat(str(old), *new, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert (
        f"repeating {old.resolve()}: " in out and "with: " + " ".join(new).replace("+callbacks", "++callbacks") in out
    )
    assert f"left out: hydra.run.dir={old}" in out and "left out: tracking.uri=sqlite:///" in out

    (run_dir,) = new_run_dirs(tmp_path, old)
    assert run_dir.parent.parent == tmp_path / "runs"  # conf's default: runs/<date>/<time>_<name>, from the cwd
    kept = [o for o in recorded if not o.startswith(("tracking", "stage.num_steps", "+callbacks"))]
    assert yaml.safe_load((run_dir / ".hydra" / "overrides.yaml").read_text()) == [
        *kept,
        "tracking=none",
        "stage.num_steps=3",
        "++callbacks.extra._target_=exp.callbacks.FirstStepClock",
    ]
    cfg = yaml.safe_load((run_dir / ".hydra" / "config.yaml").read_text())
    assert cfg["tracking"]["_target_"] == "exp.tracking.NullTracker"
    assert cfg["stage"]["num_steps"] == 3 and cfg["stage"]["batch_size_per_gpu"] == 4
    assert cfg["model"]["n_layer"] == 2 and cfg["model"]["d_model"] == 64 and cfg["hardware"]["device"] == "cpu"
    assert cfg["callbacks"] == {"extra": {"_target_": "exp.callbacks.FirstStepClock"}}
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED" and summary["step"] == 3 and summary.get("mlflow_run_id") is None
    assert json.loads((old / "summary.json").read_text())["step"] == 2  # the repeated run is left as it was


@pytest.mark.slow
def test_repeat_a_trial_of_a_sweep_config(tmp_path):
    """A trial of `-cd sweeps -cn grid` (a config that sets hydra.mode=MULTIRUN) is repeated as one run of
    sweeps/grid.yaml with that trial's point, into the hydra.run.dir given."""
    sweep = tmp_path / "sweep"
    proc = run_train(
        "-cd", str(ROOT / "sweeps"), "-cn", "grid", *TINY, "hydra.sweeper.params=null",
        "stage.weight_decay=0.0,0.2", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    trial = sweep / "1"
    assert "stage.weight_decay=0.2" in yaml.safe_load((trial / ".hydra" / "overrides.yaml").read_text())

    again = tmp_path / "again"
    proc = run_repeat(str(trial), "stage.num_steps=2", f"hydra.run.dir={again}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"left out: hydra.sweep.dir={sweep}" in proc.stdout
    cfg = yaml.safe_load((again / ".hydra" / "config.yaml").read_text())
    assert cfg["stage"]["weight_decay"] == 0.2 and cfg["stage"]["num_steps"] == 2
    assert json.loads((again / "summary.json").read_text())["step"] == 2
    assert not (again / "multirun.yaml").exists() and sorted(p.name for p in sweep.iterdir() if p.is_dir()) == [
        "0",
        "1",
    ]
