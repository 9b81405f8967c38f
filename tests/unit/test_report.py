"""exp.report and exp.sweep on hand-built sweep dirs, and one real tiny sweep with a failed trial rerun."""

import json

import pytest
import yaml

from exp.sweep import cli as sweep
from exp.sweep import report
from exp.sweep.report import rank, sweep_trials

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SHARED = ["model.n_layer=1", "stage.num_steps=20"]
# num -> (varying overrides, status, final val loss); 2 failed, 3 was killed before writing a summary (KILLED: it
# started, and nothing holds its run dir's lock)
GRID = {
    0: (["optimizer=adamw", "stage.learning_rate=0.001"], "FINISHED", 3.5),
    1: (["optimizer=adamw", "stage.learning_rate=0.01"], "FINISHED", 2.9),
    2: (["optimizer=sgd", "stage.learning_rate=0.001"], "FAILED", None),
    3: (["optimizer=sgd", "stage.learning_rate=0.01"], "KILLED", None),
    4: (["optimizer=sgd", "stage.learning_rate=0.1"], "FINISHED", 3.1),
}
ERROR = "TrainingFailed: loss at step 3 (loss=nan)\nTraceback (most recent call last): ..."


def write_run(run_dir, overrides, status, val_loss, steps=(10, 20)):
    """A run dir as train.py leaves it: .hydra/overrides.yaml, metrics.jsonl and (unless killed) summary.json."""
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    rows = []
    for i, step in enumerate(steps):
        rows.append({"step": step, "train/loss": 6.0 - i, "train/lr": 1e-3, "perf/tokens_per_s": 1000.0})
        if val_loss is not None:
            rows.append({"step": step, "val/loss": val_loss + (len(steps) - 1 - i) * 0.5})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status == "FINISHED":
        summary = {"status": status, "train_loss": 5.0, "val_loss": val_loss, "best_val_loss": val_loss}
        summary |= {"tokens_per_s": 1234.0, "step": 20, "num_steps": 20, "mlflow_run_id": "abc", "slurm_job_id": "77"}
    elif status == "FAILED":
        summary = {"status": status, "error": ERROR, "val_loss": None, "step": 2, "num_steps": 20}
    else:
        return
    (run_dir / "summary.json").write_text(json.dumps(summary))


@pytest.fixture
def grid_sweep(tmp_path):
    """A grid sweep launched through exp's launcher: sweep.json and numbered run dirs."""
    sweep_dir = tmp_path / "grid"
    trials = {}
    for num, (varying, status, val) in GRID.items():
        write_run(sweep_dir / str(num), SHARED + varying, status, val)
        trials[str(num)] = {
            "num": num,
            "overrides": SHARED + varying,
            "run_dir": str(sweep_dir / str(num)),
            "status": "PENDING",
        }
    manifest = {"sweep_dir": str(sweep_dir), "launcher": "hydra_plugins.exp_launcher.BasicLauncher", "trials": trials}
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    return sweep_dir


@pytest.fixture
def optuna_sweep(tmp_path):
    """An Optuna sweep without exp's manifest: optimization_results.yaml and numbered run dirs."""
    sweep_dir = tmp_path / "optuna"
    points = [(1e-4, 0.1, 4.0), (3e-3, 0.0, 3.0), (2e-2, 0.2, 3.4)]
    for num, (lr, wd, val) in enumerate(points):
        write_run(sweep_dir / str(num), [f"stage.learning_rate={lr}", f"stage.weight_decay={wd}"], "FINISHED", val)
    (sweep_dir / "optimization_results.yaml").write_text("name: optuna\nbest_value: 3.0\n")
    return sweep_dir


def table_rows(out: str) -> list[list[str]]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("rank"))
    return [line.split() for line in lines[start : start + len(GRID) + 1]]


def test_ranks_by_val_loss_with_only_the_varying_overrides(grid_sweep, capsys):
    assert report.main([str(grid_sweep)]) == 0
    header, *rows = table_rows(capsys.readouterr().out)
    assert header[:4] == ["rank", "trial", "optimizer", "stage.learning_rate"]
    assert "model.n_layer" not in header and "stage.num_steps" not in header
    assert [r[1] for r in rows] == ["1", "4", "0", "2", "3"]
    assert [r[0] for r in rows[:3]] == ["1", "2", "3"]
    assert rows[0][2:4] == ["adamw", "0.01"] and rows[1][2:4] == ["sgd", "0.1"]
    assert rows[0][4:9] == ["5.0000", "2.9000", "2.9000", "1,234", "FINISHED"]


def test_failed_and_unfinished_trials_come_last_with_their_error(grid_sweep, capsys):
    report.main([str(grid_sweep)])
    out = capsys.readouterr().out
    lines = [line for line in out.splitlines() if line.split()[:1] in (["1"], ["2"], ["3"], ["-"])]
    assert [line.split()[0] for line in lines] == ["1", "2", "3", "-", "-"]
    assert lines[3].endswith("FAILED: TrainingFailed: loss at step 3 (loss=nan)")  # the first line only
    assert "Traceback" not in out
    assert lines[4].split()[1] == "3" and "KILLED: its trainer was killed without writing summary.json" in lines[4]
    # a failed trial without a summary train loss falls back to its last logged one
    assert lines[3].split()[4] == "5.0000"


def test_writes_a_png_with_the_curves(grid_sweep, tmp_path, capsys):
    assert report.main([str(grid_sweep)]) == 0
    png = grid_sweep / "report.png"
    assert png.read_bytes()[:8] == PNG_MAGIC and png.stat().st_size > 10_000
    assert capsys.readouterr().out.rstrip().endswith(f"report: {png}")
    other = tmp_path / "plots" / "grid.png"
    assert report.main([str(grid_sweep), "--out", str(other)]) == 0
    assert other.read_bytes()[:8] == PNG_MAGIC


def test_optuna_sweep_gets_one_panel_per_searched_parameter(optuna_sweep, grid_sweep, capsys):
    trials, is_optuna = report.sweep_trials(optuna_sweep)
    assert is_optuna
    keys = report.varying_keys(trials)
    drawn = report.report_trials(trials, keys, optuna_sweep / "report.png", is_optuna, "optuna")
    assert drawn == ["val/loss", "stage.learning_rate", "stage.weight_decay"]
    assert table_rows(capsys.readouterr().out)[1][1] == "1"  # lr 3e-3 has the lowest loss
    # a grid with a categorical choice is not a parameter search: curves only
    trials, is_optuna = report.sweep_trials(grid_sweep)
    assert not is_optuna
    assert report.report_trials(trials, report.varying_keys(trials), grid_sweep / "r.png", False, "grid") == [
        "val/loss"
    ]


def test_run_dir_prints_its_summary_and_plots_it(grid_sweep, capsys):
    assert report.main([str(grid_sweep / "1")]) == 0
    out = capsys.readouterr().out
    assert "val_loss" in out and "2.9" in out
    assert (grid_sweep / "1" / "metrics.png").read_bytes()[:8] == PNG_MAGIC


def test_mlflow_experiment_is_ranked_from_run_params(tmp_path, capsys):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri)
    experiment = client.create_experiment("lm", artifact_location=(tmp_path / "art").as_uri())
    for lr, losses in (("0.001", [4.0, 3.5]), ("0.01", [3.5, 3.0]), ("0.1", [5.0, 6.0])):
        run = client.create_run(experiment, run_name="gpt_tiny-pretrain")
        # optimizer.lr is stage.learning_rate read through an interpolation: one column for both
        for key, value in {"stage.learning_rate": lr, "optimizer.lr": lr, "run_dir": f"/r/{lr}", "seed": "0"}.items():
            client.log_param(run.info.run_id, key, value)
        for step, loss in zip((10, 20), losses, strict=True):
            client.log_metric(run.info.run_id, "val/loss", loss, step=step)
        client.set_terminated(run.info.run_id, "FINISHED")
    client.create_run(experiment, tags={"kind": "sweep"})  # a sweep's parent run is no trial
    out_png = tmp_path / "lm.png"
    assert report.main(["lm", "--tracking-uri", uri, "--out", str(out_png)]) == 0
    header, *rows = table_rows(capsys.readouterr().out)[:4]
    assert header[2:4] == ["optimizer.lr", "train"]
    assert [r[2] for r in rows] == ["0.01", "0.001", "0.1"]
    assert [r[4] for r in rows] == ["3.0000", "3.5000", "6.0000"]  # final val loss; best val next to it
    assert rows[2][5] == "5.0000"
    assert out_png.read_bytes()[:8] == PNG_MAGIC


@pytest.mark.parametrize(
    "target,needle",
    [("missing", "no such directory"), ("plain", "neither a sweep directory"), ("empty", "no trials")],
)
def test_bad_targets_exit_2_with_one_line(tmp_path, capsys, target, needle):
    (tmp_path / "plain").mkdir()
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "sweep.json").write_text(json.dumps({"sweep_dir": "x", "trials": {}}))
    uri = f"sqlite:///{tmp_path / 'none.db'}"
    assert report.main([str(tmp_path / target), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and needle in err and err.count("\n") == 1
    assert not (tmp_path / "none.db").exists()  # a typo does not create an MLflow store
    command = "status" if target != "plain" else "resume"
    assert sweep.main([command, str(tmp_path / target)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1


def test_status_refreshes_the_manifest_and_counts(grid_sweep, capsys):
    assert sweep.main(["status", str(grid_sweep)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == "5 trials: 1 FAILED, 3 FINISHED, 1 KILLED"
    row = lines[2].split()
    assert row[:6] == ["1", "FINISHED", "2.9000", str(grid_sweep / "1"), "77", "abc"]
    assert lines[3].split()[1] == "FAILED" and "TrainingFailed" in lines[3]
    manifest = json.loads((grid_sweep / "sweep.json").read_text())
    assert [t["status"] for t in manifest["trials"].values()] == [
        "FINISHED",
        "FINISHED",
        "FAILED",
        "KILLED",
        "FINISHED",
    ]


def test_resume_dry_run_lists_exactly_the_unfinished_trials(grid_sweep, capsys):
    assert sweep.main(["resume", str(grid_sweep), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    trials = [line for line in lines if line.startswith("trial ")]
    assert trials == [f"trial 2 (FAILED) -> {grid_sweep / '2'}", f"trial 3 (KILLED) -> {grid_sweep / '3'}"]
    commands = [line for line in lines if line.startswith("  cd ")]
    assert len(commands) == 2
    assert "train.py -m" in commands[1] and f"hydra.sweep.subdir={grid_sweep / '3'}" in commands[1]
    assert "optimizer=sgd stage.learning_rate=0.01" in commands[1]
    assert not (grid_sweep / ".relaunch").exists()
    assert "relaunches" not in json.loads((grid_sweep / "sweep.json").read_text())
    assert sweep.main(["rerun-failed", str(grid_sweep), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.startswith("trial ")] == [  # a killed trial is rerun too
        f"trial 2 (FAILED) -> {grid_sweep / '2'}",
        f"trial 3 (KILLED) -> {grid_sweep / '3'}",
    ]


def test_a_study_with_a_downstream_objective_ranks_by_it_in_its_direction(tmp_path, capsys):
    sweep_dir = tmp_path / "study"
    trials = {}
    for num, (val, acc) in enumerate([(2.0, 0.30), (3.0, 0.45), (2.5, 0.40)]):
        run_dir = sweep_dir / str(num)
        write_run(run_dir, [f"stage.learning_rate=0.00{num + 1}"], "FINISHED", val)
        with (run_dir / "metrics.jsonl").open("a") as f:
            f.write(json.dumps({"step": 20, "eval/exp_stdlib_mc/acc": acc}) + "\n")
        trials[str(num)] = {"num": num, "overrides": [f"stage.learning_rate=0.00{num + 1}"], "run_dir": str(run_dir)}
    study = {"objective": ["eval/exp_stdlib_mc/acc"], "direction": "maximize"}
    manifest = {"sweep_dir": str(sweep_dir), "launcher": "x", "trials": trials, "study": study}
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    found, optuna = sweep_trials(sweep_dir)
    assert optuna and [t.num for t in rank(found)] == ["1", "2", "0"]  # by accuracy, highest first
    study["direction"] = "minimize"
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    assert [t.num for t in rank(sweep_trials(sweep_dir)[0])] == ["0", "2", "1"]
    study["objective"] = ["val/loss"]
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    assert [t.num for t in rank(sweep_trials(sweep_dir)[0])] == ["0", "2", "1"]  # val loss, as always
