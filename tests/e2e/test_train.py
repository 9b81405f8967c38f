"""train.py end to end, as a user runs it: falling loss, summary, MLflow record, dry run, sweeps, bad input."""

import json

import pytest
import yaml

from exp.rundir import read_metrics

from ..conftest import TINY, run_train

SMALL = [o for o in TINY if not o.startswith(("stage.num_steps", "stage.log_every", "stage.eval_every", "tracking"))]


def test_thirty_steps_loss_falls_and_run_is_recorded(tmp_path):
    run_dir = tmp_path / "run"
    db = tmp_path / "mlflow.db"
    proc = run_train(
        *SMALL,
        "stage.num_steps=30",
        "stage.log_every_n_steps=5",
        "stage.eval_every_n_steps=15",
        "stage.batch_size_per_gpu=8",
        "stage.learning_rate=1e-2",
        "hardware.peak_flops=1e11",  # a CPU has no datasheet figure: MFU against the one given
        "tracking.system_metrics_interval=0.2",  # MLflow's system metrics (on by default), often enough for 30 steps
        f"tracking.uri=sqlite:///{db}",
        f"tracking.artifact_location={tmp_path / 'artifacts'}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    logged = [m["train/loss"] for m in read_metrics(run_dir / "metrics.jsonl") if "train/loss" in m]
    assert len(logged) == 6
    assert logged[-1] < logged[0] - 0.5, logged
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 30 and summary["tokens_seen"] == 30 * 8 * 32
    assert summary["val_loss"] < 5.0 and summary["tokens_per_s"] > 0
    assert summary["sample"] and "sample:" in proc.stderr + proc.stdout
    assert (run_dir / ".hydra" / "config.yaml").is_file() and (run_dir / "train.log").stat().st_size > 0

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["optimizer.lr"] == "0.01" and run.data.params["stage.num_steps"] == "30"
    assert run.data.tags["run_dir"] == str(run_dir.resolve())
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert [m.step for m in history] == [5, 10, 15, 20, 25, 30]
    assert [m.value for m in history] == pytest.approx(logged)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "metrics.jsonl", "hydra"} <= artifacts

    # MFU (exp.perf): FLOPs per token x tokens/s over the peak, in every place the run reports
    from exp.model import GPT

    model = GPT(vocab_size=264, seq_len=32, n_layer=2, n_head=4, d_model=64)
    flops = 6 * sum(p.numel() for p in model.parameters()) + 12 * 2 * 64 * 32  # nanoGPT's estimate_mfu
    assert summary["flops_per_token"] == flops and summary["peak_flops"] == 1e11
    assert summary["mfu"] == pytest.approx(flops * summary["tokens_per_s"] / 1e11)
    rows = [m for m in read_metrics(run_dir / "metrics.jsonl") if "perf/mfu" in m]
    assert len(rows) == 6 and all(m["perf/mfu"] == pytest.approx(flops * m["perf/tokens_per_s"] / 1e11) for m in rows)
    assert client.get_metric_history(run.info.run_id, "perf/mfu")[-1].value == pytest.approx(rows[-1]["perf/mfu"])
    assert f"| mfu {100 * rows[-1]['perf/mfu']:.1f}%" in (run_dir / "train.log").read_text()

    # MLflow's own system metrics beside the run, and the experiment opens in MLflow's model-training view
    cpu = client.get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(cpu) >= 2 and [m.step for m in cpu] == list(range(len(cpu))), cpu
    assert all(0 <= m.value <= 100 for m in cpu)
    assert "system/system_memory_usage_megabytes" in run.data.metrics
    marker = json.loads((run_dir / "mlflow_run.json").read_text())  # the dashboard's link to the MLflow UI needs it
    assert marker["run_id"] == run.info.run_id and marker["experiment_id"] == run.info.experiment_id
    experiment = client.get_experiment(run.info.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"


@pytest.mark.parametrize(
    "overrides,needle",
    [
        (["optimizer=foo"], "optimizer/foo"),
        (["+optimizer.lrr=0.1"], "optimizer.lrr"),
        (["stage.warmup_steps=4"], "stage.warmup_steps"),
        (["data=memmap", "data.path=/does/not/exist"], "data.path=/does/not/exist"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, overrides, needle):
    run_dir = tmp_path / "run"
    proc = run_train(*TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    first = proc.stderr.strip().splitlines()[0]
    assert needle in first, proc.stderr
    assert not run_dir.exists()


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *TINY, "dry_run=true", "stage.gradient_accumulation_steps=3", f"hydra.run.dir={run_dir}", cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = proc.stdout
    assert "tokens per step   384 " in out  # 4 x 3 x 1 x 32
    assert "total tokens      1,536" in out
    for word in ("parameters", "training FLOPs", "memory estimate", "learning rate"):
        assert word in out
    assert not run_dir.exists()


def test_cfg_job_resolve_prints_the_run_dir_and_vocabulary_the_run_would_use(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(*TINY, f"hydra.run.dir={run_dir}", "--cfg", "job", "--resolve", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["run_dir"] == str(run_dir) and cfg["checkpoint"]["dir"] == f"{run_dir}/checkpoints"
    assert cfg["model"]["vocab_size"] == 264
    proc = run_train(*TINY, "--cfg", "job", "--resolve", cwd=tmp_path)  # the default: runs/<date>/<time>_<name>
    assert yaml.safe_load(proc.stdout)["run_dir"].startswith(f"{tmp_path}/runs/")
    assert not run_dir.exists() and not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_multirun_runs_every_point_locally(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *TINY, "optimizer=adamw,sgd", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 2
    configs = [(p.parent / ".hydra" / "overrides.yaml").read_text() for p in summaries]
    assert any("optimizer=adamw" in c for c in configs) and any("optimizer=sgd" in c for c in configs)


def test_prepared_user_data_trains_through_memmap(tmp_path):
    from exp.data import prepare

    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(6):
        (docs / f"doc{i}.txt").write_text(f"document {i}: " + "the quick brown fox jumps over the lazy dog. " * 40)
    assert prepare.main([str(docs), "--out", str(tmp_path / "tokens")]) == 0
    run_dir = tmp_path / "run"
    proc = run_train(*TINY, "data=memmap", f"data.path={tmp_path / 'tokens'}", f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 4 and summary["val_loss"] > 0


@pytest.mark.slow
def test_compiled_model_trains(tmp_path):
    run_dir = tmp_path / "run"
    proc = run_train(
        *TINY, "hardware.compile=true", "stage.num_steps=6", f"hydra.run.dir={run_dir}", cwd=tmp_path, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["step"] == 6
    # throughput is the steady state's; the first step's compilation is reported apart
    overall = summary["tokens_seen"] / summary["train_seconds"]
    assert summary["tokens_per_s"] > 10 * overall
    assert summary["compile_seconds"] > 0.5 * summary["first_step_seconds"] > 1.0
    assert f"compile {summary['compile_seconds']:.1f} s" in proc.stdout


def test_slurm_launch_without_sbatch_says_what_to_use_instead(tmp_path):
    import os
    import subprocess
    import sys

    from ..conftest import ROOT

    env = {**os.environ, "PATH": "/nonexistent", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "train.py"),
            "-m",
            *TINY,
            "hardware=slurm_cpu",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "needs Slurm's sbatch" in proc.stdout and "exp_local" in proc.stdout
    assert not (tmp_path / "sweep").exists()


@pytest.mark.parametrize("sweep", ["grid", "optuna"])
def test_sweep_files_compose(tmp_path, sweep):
    from ..conftest import ROOT

    proc = run_train("-cd", str(ROOT / "sweeps"), "-cn", sweep, "--cfg", "hydra", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "mode: MULTIRUN" in proc.stdout and "params:" in proc.stdout


def test_multirun_with_one_bad_point_launches_nothing(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train("-m", *TINY, "optimizer.lr=1e-3,abc", f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2
    assert "sweep point #1" in proc.stdout and "optimizer.lr='abc'" in proc.stdout
    assert not sweep.exists()


def test_profile_steps_write_a_trace_the_top_operators_and_mlflow_artifacts(tmp_path):
    run_dir, db = tmp_path / "run", tmp_path / "mlflow.db"
    proc = run_train(
        *SMALL,
        "stage.num_steps=6",
        "profile.steps=[3,4]",
        f"tracking.uri=sqlite:///{db}",
        f"hydra.run.dir={run_dir}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    folder = run_dir / "profile" / "steps_3-4"
    trace = json.loads((folder / "trace.json").read_text())
    steps = {e["name"] for e in trace["traceEvents"] if e.get("name", "").startswith("ProfilerStep#")}
    assert len(steps) == 2  # the two active steps, the warm-up step before them left out
    table = (folder / "ops.txt").read_text()
    assert "Self CPU" in table and "aten::mm" in table
    assert "profile of steps 3-4" in (run_dir / "train.log").read_text()
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{db}")
    run_id = json.loads((run_dir / "summary.json").read_text())["mlflow_run_id"]
    logged = {a.path for a in client.list_artifacts(run_id, "profile/steps_3-4")}
    assert logged == {"profile/steps_3-4/trace.json", "profile/steps_3-4/ops.txt"}


def test_the_gpu_tiers_run_helpers_on_cpu(tmp_path):
    """tests/gpu/helpers.py's run and losses, on CPU: what the GPU tier runs but the device."""
    from ..gpu import helpers

    summary = helpers.run(tmp_path / "run", *helpers.device_overrides("cpu"), "stage.num_steps=4")
    assert summary["status"] == "FINISHED" and len(helpers.losses(tmp_path / "run")) == 2
