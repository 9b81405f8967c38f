"""exp's Optuna sweeper: the search space, bad settings, the pruning callback; then real studies on local
subprocesses and SLURM: asynchrony, a pruned trial in all four places, a failing trial, a killed launcher resumed,
and the report."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from exp.events import TrainState
from exp.sweep.optuna import search_space
from exp.sweep.pruning import OptunaPruning

from ..conftest import ROOT, TINY, run_train

SWEEP = ["-cd", str(ROOT / "sweeps"), "-cn", "optuna"]
TRIAL = [o for o in TINY if not o.startswith(("tracking=", "stage.num_steps="))]
SLEEP = "+callbacks.slow={_target_:tests.hooks.SleepEachStep,seconds:%s}"


def study_of(sweep_dir, name="exp-lr-wd"):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir}/optuna.db")


def resume(sweep_dir, env, timeout: float) -> subprocess.CompletedProcess:
    """`python -m exp.sweep resume DIR`, as a user runs it after the launching process died."""
    command = [sys.executable, "-m", "exp.sweep", "resume", str(sweep_dir)]
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def kill_launcher_when(launcher, sweep_dir, ready, timeout: float, what: str) -> None:
    """SIGKILL the launching process (and the jobs in its session) once `ready(trials)` holds for sweep.json."""
    deadline = time.time() + timeout
    try:
        while time.time() < deadline:
            time.sleep(0.3)
            if (sweep_dir / "sweep.json").exists() and ready(trials(sweep_dir)):
                return
        pytest.fail(f"the study never had {what}")
    finally:
        os.killpg(launcher.pid, signal.SIGKILL)
        launcher.wait()


def trials(sweep_dir) -> dict:
    return json.loads((sweep_dir / "sweep.json").read_text())["trials"]


# --- fast ---------------------------------------------------------------------------------------------


def test_search_space_is_written_as_today(tmp_path):
    params = {
        "stage.learning_rate": "tag(log, interval(1e-4, 3e-2))",
        "stage.weight_decay": "interval(0.0, 0.2)",
        "stage.warmup_ratio": "choice(0.0, 0.05, 0.1)",
        "model.n_layer": "int(interval(1, 4))",
    }
    space, fixed = search_space(params, ["scheduler=cosine,wsd", "stage.num_steps=50"], tmp_path / "s")
    assert space["stage.learning_rate"] == FloatDistribution(1e-4, 3e-2, log=True)
    assert space["stage.weight_decay"] == FloatDistribution(0.0, 0.2)
    assert space["stage.warmup_ratio"] == CategoricalDistribution([0.0, 0.05, 0.1])
    assert space["model.n_layer"] == IntDistribution(1, 4)
    assert space["scheduler"] == CategoricalDistribution(["cosine", "wsd"])
    assert fixed == ["stage.num_steps=50"]


@pytest.mark.parametrize(
    "override,line",
    [
        ("hydra.sweeper.pruner=medain", "config error: hydra.sweeper.pruner=medain: unknown pruner 'medain'"),
        (
            "hydra.sweeper.params={stage.weight_decay:'interval(0.0)'}",
            "config error: hydra.sweeper.params.stage.weight_decay",
        ),
        ("+hydra.sweeper.n_jobs=2", "config error: hydra.sweeper.n_jobs: unknown key"),
        ("hydra.sweeper.sampler.name=grid", "config error: hydra.sweeper.sampler: grid needs choices"),
        ("+stage.num_stepz=3", "stage.num_stepz"),
        ("hydra.sweeper.storage=nosuchdb://x", "config error: hydra.sweeper.storage=nosuchdb://x"),
        (
            "hydra.sweeper.objective=eval/arc_easy/acc",
            "config error: hydra.sweeper.objective=eval/arc_easy/acc: the trials do not evaluate tasks",
        ),
        ("hydra.sweeper.objective=val/los", "config error: hydra.sweeper.objective=val/los: never logged by a run"),
        ("hydra.sweeper.direction=[minimize,maximize]", "config error: hydra.sweeper.direction=[minimize, maximize]"),
        (
            "hydra.sweeper.objective=[val/loss,val/accuracy]",  # sweeps/optuna.yaml prunes with the median pruner
            "config error: hydra.sweeper.pruner=median: Optuna prunes single-objective studies only",
        ),
    ],
)
def test_bad_settings_end_with_one_line_and_exit_2_writing_nothing(tmp_path, override, line):
    sweep = tmp_path / "sweep"
    proc = run_train(*SWEEP, *TRIAL, "tracking=none", override, f"hydra.sweep.dir={sweep}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    out = (proc.stdout + proc.stderr).strip().splitlines()
    assert any(o.startswith(line) or (line in o and o.startswith("config error")) for o in out), out[-5:]
    assert not sweep.exists()


def test_the_sweep_files_run_trials_side_by_side_as_the_readme_says(tmp_path):
    import yaml

    def hydra_of(name, *overrides):
        proc = run_train("-cd", str(ROOT / "sweeps"), "-cn", name, *overrides, "--cfg", "hydra", cwd=tmp_path)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        return yaml.safe_load(proc.stdout)["hydra"]

    local = hydra_of("optuna")  # docs/sweeps.md: "2 in flight"
    assert local["launcher"]["_target_"].endswith("exp_launcher.LocalLauncher") and local["sweeper"]["parallelism"] == 2
    assert hydra_of("optuna_slurm")["launcher"]["_target_"].endswith("exp_launcher.SlurmLauncher")


def median_pruned_study(tmp_path, direction: str, completed: float):
    """(storage, study, a new trial) of a study with the median pruner and one trial completed at `completed`, having
    reported it at step 2."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    pruner = optuna.pruners.MedianPruner(1, 0)
    study = optuna.create_study(study_name="s", storage=storage, direction=direction, pruner=pruner)
    study.set_user_attr("pruner", "median")
    study.set_user_attr("pruner_args", {"n_startup_trials": 1, "n_warmup_steps": 0})
    good = study.ask()
    good.report(completed, 2)
    study.tell(good, completed)
    return storage, study, study.ask()


def test_pruning_callback_reports_and_stops_a_bad_trial(tmp_path):
    storage, study, bad = median_pruned_study(tmp_path, "minimize", 3.0)
    callback = OptunaPruning(storage=storage, study_name="s", trial_number=bad.number)
    callback.on_train_start(TrainState())
    callback.on_eval_end(TrainState(step=2), {"val/loss": 5.0})
    assert callback.should_stop and callback.stop_status == "PRUNED" and "median" in callback.stop_reason
    assert study.trials[bad.number].intermediate_values == {2: 5.0}


def test_pruning_follows_a_downstream_objective(tmp_path):
    storage, study, bad = median_pruned_study(tmp_path, "maximize", 0.6)
    callback = OptunaPruning(storage, "s", bad.number, metric="eval/exp_stdlib_mc/acc")
    callback.on_train_start(TrainState())
    callback.on_eval_end(TrainState(step=2), {"val/loss": 0.1})  # not the objective: nothing reported
    assert study.trials[bad.number].intermediate_values == {} and not callback.should_stop
    callback.on_task_eval(TrainState(step=2), {"eval/exp_stdlib_mc/acc": 0.3})  # worse than the median: maximising
    assert study.trials[bad.number].intermediate_values == {2: 0.3}
    assert callback.should_stop and "eval/exp_stdlib_mc/acc 0.3000" in callback.stop_reason


# --- a study on local subprocesses ---------------------------------------------------------------------

# points enqueued in order (the sampler's are not predictable): a long trial; one that raises at its first step (lr
# above RaiseAboveLr's limit) and so ends first; a short one, asked the moment the failed one ends while the long
# one still runs; one that cannot learn at lr 1e-6, pruned at its first evaluation (worse than a completed trial);
# and one stopped by a SIGTERM after its first step (SignalAtLr) while the study goes on
POINTS = [
    {"stage.learning_rate": 1e-2, "stage.num_steps": 80},
    {"stage.learning_rate": 0.5, "stage.num_steps": 4},
    {"stage.learning_rate": 1e-2, "stage.num_steps": 4},
    {"stage.learning_rate": 1e-6, "stage.num_steps": 8},
    {"stage.learning_rate": 0.05, "stage.num_steps": 4},
]


@pytest.fixture(scope="module")
def local_study(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("optuna_local")
    sweep, store = tmp / "sweep", f"sqlite:///{tmp}/mlflow.db"
    sweep.mkdir()
    study = optuna.create_study(study_name="exp-lr-wd", storage=f"sqlite:///{sweep}/optuna.db")
    for point in POINTS:
        study.enqueue_trial({"stage.weight_decay": 0.1, "stage.warmup_ratio": 0.0, **point})
    started = time.time()
    proc = run_train(
        *SWEEP,
        *TRIAL,
        "hydra/launcher=exp_local",
        "stage.learning_rate=tag(log, interval(1e-6, 1.0))",
        "stage.num_steps=choice(4, 8, 80)",
        SLEEP % 0.25,  # 80 steps: 20 s, while the others run
        "+callbacks.fail={_target_:tests.hooks.RaiseAboveLr,max_lr:0.1}",
        "+callbacks.term={_target_:tests.hooks.SignalAtLr,lr:0.05,step:1}",
        "hydra.sweeper.n_trials=5",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.pruner_args.n_startup_trials=1",
        "hydra.sweeper.pruner_args.n_warmup_steps=0",
        "hydra.sweeper.poll_interval_s=0.2",
        f"tracking.uri={store}",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp,
        timeout=400,
    )
    return {"sweep": sweep, "proc": proc, "store": store, "tmp": tmp, "seconds": time.time() - started}


@pytest.mark.slow
def test_local_study_runs_n_trials_and_exits_1_for_its_failed_one(local_study):
    proc, sweep = local_study["proc"], local_study["sweep"]
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = f"2 of 5 trials did not finish (1 FAILED, 1 KILLED): python -m exp.sweep status {sweep}"
    assert proc.stderr.strip().splitlines()[-1] == said
    states = [t.state for t in study_of(sweep).trials]
    assert states == [TrialState.COMPLETE, TrialState.FAIL, TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL]
    assert sorted(trials(sweep), key=int) == ["0", "1", "2", "3", "4"]
    assert sorted(p.name for p in sweep.iterdir() if p.name.isdigit()) == ["0", "1", "2", "3", "4"]


@pytest.mark.slow
def test_a_trial_is_asked_the_moment_one_ends_while_the_long_one_runs(local_study):
    by_num = trials(local_study["sweep"])
    long, first_ended, next_one = by_num["0"], by_num["1"], by_num["2"]
    assert first_ended["ended"] <= next_one["started"] < long["ended"]  # no slot waited for the slowest trial
    assert next_one["started"] - first_ended["ended"] < 5


@pytest.mark.slow
def test_pruned_trial_stops_with_a_checkpoint_and_is_pruned_everywhere(local_study):
    from mlflow.tracking import MlflowClient

    sweep = local_study["sweep"]
    trial = study_of(sweep).trials[3]
    assert trial.state == TrialState.PRUNED and list(trial.intermediate_values) == [2]
    entry = trials(sweep)["3"]
    assert entry["status"] == "PRUNED" and entry["step"] == 2 and entry["num_steps"] == 8
    summary = json.loads((sweep / "3" / "summary.json").read_text())
    assert summary["status"] == "PRUNED" and "pruned at step 2 by the median pruner" in summary["stop_reason"]
    assert summary["checkpoint"].endswith("step_00000002") and os.path.isdir(summary["checkpoint"])
    run = MlflowClient(tracking_uri=local_study["store"]).get_run(entry["mlflow_run_id"])
    assert run.info.status == "KILLED" and run.data.tags["status"] == "PRUNED"
    out = subprocess.run(
        [sys.executable, "-m", "exp.sweep", "status", str(sweep)], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert any(line.split()[:2] == ["3", "PRUNED"] for line in out.splitlines()), out
    assert "1 PRUNED" in out.splitlines()[-1]


@pytest.mark.slow
def test_failing_trial_is_fail_and_failed_and_the_search_goes_on(local_study):
    sweep = local_study["sweep"]
    assert study_of(sweep).trials[1].state == TrialState.FAIL
    entry = trials(sweep)["1"]
    assert entry["status"] == "FAILED" and "above 0.1" in entry["error"]
    assert json.loads((sweep / "1" / "summary.json").read_text())["status"] == "FAILED"
    after = trials(sweep)["2"]
    assert after["started"] >= entry["ended"] and after["status"] == "FINISHED"  # asked after the failure


@pytest.mark.slow
def test_a_trial_stopped_by_a_signal_is_killed_everywhere_and_the_search_goes_on(local_study):
    from mlflow.tracking import MlflowClient

    sweep = local_study["sweep"]
    trial = study_of(sweep).trials[4]  # Optuna has no KILLED: FAIL, with exp's status as a user attribute
    assert trial.state == TrialState.FAIL and trial.user_attrs["status"] == "KILLED"
    entry = trials(sweep)["4"]
    assert entry["status"] == "KILLED" and "ended" in entry
    summary = json.loads((sweep / "4" / "summary.json").read_text())
    assert summary["status"] == "KILLED" and summary["checkpoint"].endswith("step_00000001")
    assert MlflowClient(tracking_uri=local_study["store"]).get_run(entry["mlflow_run_id"]).info.status == "KILLED"
    out = subprocess.run(
        [sys.executable, "-m", "exp.sweep", "status", str(sweep)], capture_output=True, text=True, cwd=ROOT
    ).stdout
    assert any(line.split()[:2] == ["4", "KILLED"] for line in out.splitlines()), out
    assert [t.user_attrs["status"] for t in study_of(sweep).trials] == [e["status"] for e in trials(sweep).values()]


@pytest.mark.slow
def test_the_sweeps_mlflow_run_has_the_best_trial_and_each_trial_one_run_named_by_its_point(local_study):
    from mlflow.tracking import MlflowClient

    client, sweep = MlflowClient(tracking_uri=local_study["store"]), local_study["sweep"]
    study = study_of(sweep)
    parent = client.get_run(json.loads((sweep / "sweep.json").read_text())["mlflow_parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.metrics["best_val_loss"] == pytest.approx(study.best_value)
    assert parent.data.tags["best_trial"] == str(study.best_trial.number)
    assert {k: parent.data.tags[f"best.{k}"] for k in study.best_params} == {
        k: str(v) for k, v in study.best_params.items()
    }
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    names = sorted(r.info.run_name for r in children)
    assert len(names) == 5 and [n.split()[0] for n in names] == ["#0", "#1", "#2", "#3", "#4"]
    assert "stage.learning_rate=0.05" in names[4] and "stage.num_steps=4" in names[4]
    assert all(r.info.status != "RUNNING" for r in children)


@pytest.mark.slow
def test_report_shows_the_pruned_trial_and_writes_optunas_plots(local_study):
    sweep = local_study["sweep"]
    proc = subprocess.run(
        [sys.executable, "-m", "exp.report", str(sweep)], capture_output=True, text=True, cwd=local_study["tmp"]
    )
    assert proc.returncode == 0, proc.stderr
    assert "1 PRUNED" in proc.stdout.splitlines()[0]
    for name in ("report.png", "optuna_history.png", "optuna_parallel.png", "optuna_importances.png"):
        assert (sweep / name).stat().st_size > 10_000, name


@pytest.mark.slow
def test_max_failure_rate_stops_the_search_in_process(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        *SWEEP,
        *TRIAL,
        "hydra/launcher=exp_basic",  # in this process (sweeps/optuna.yaml runs trials as subprocesses)
        "tracking=none",
        "stage.num_steps=4",
        "+callbacks.fail={_target_:tests.hooks.RaiseAboveLr,max_lr:0.0}",  # every trial raises
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.max_failure_rate=0.25",  # more than 1 of 4 FAILED stops it
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = "stopping the sweep: 2 of 2 trials FAILED, more than hydra.sweeper.max_failure_rate=0.25 of n_trials=4"
    assert said in proc.stdout.splitlines()
    assert proc.stderr.strip().splitlines()[-1] == f"2 of 2 trials FAILED: python -m exp.sweep status {sweep}"
    assert [t.state for t in study_of(sweep).trials] == [TrialState.FAIL, TrialState.FAIL]


# --- a killed launcher, resumed ------------------------------------------------------------------------


@pytest.mark.slow
def test_killed_launcher_resumed_ends_with_exactly_n_trials(tmp_path):
    sweep = tmp_path / "sweep"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *SWEEP,
        *TRIAL,
        "tracking=none",
        "hydra/launcher=exp_local",
        "stage.num_steps=12",
        SLEEP % 0.3,
        "hydra.sweeper.n_trials=4",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.pruner=none",
        "hydra.sweeper.poll_interval_s=0.2",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL)

    def ended_and_checkpointed(by_num: dict) -> bool:  # a trial ended, another wrote a checkpoint and runs on
        mid_run = [
            t
            for t in by_num.values()
            if "ended" not in t
            and list((sweep / str(t["num"]) / "checkpoints").glob("step_*"))
            and not (sweep / str(t["num"]) / "summary.json").exists()
        ]
        return any("ended" in t for t in by_num.values()) and bool(mid_run)

    kill_launcher_when(launcher, sweep, ended_and_checkpointed, 240, "an ended trial and one with a checkpoint")
    killed = [t["num"] for t in trials(sweep).values() if "ended" not in t]
    assert killed and any(t.state == TrialState.RUNNING for t in study_of(sweep).trials)
    unfinished = [n for n in killed if not (sweep / str(n) / "summary.json").exists()]
    # a trial killed before its first checkpoint starts again from scratch; one with a checkpoint resumes from it
    checkpointed = [n for n in unfinished if list((sweep / str(n) / "checkpoints").glob("step_*"))]
    assert checkpointed
    proc = resume(sweep, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    numbers = [t.number for t in study_of(sweep).trials]
    assert numbers == [0, 1, 2, 3]  # exactly n_trials, no duplicate numbers
    assert all(t.state == TrialState.COMPLETE for t in study_of(sweep).trials)
    assert sorted(trials(sweep), key=int) == ["0", "1", "2", "3"]
    assert all(t["status"] == "FINISHED" for t in trials(sweep).values())
    for num in checkpointed:  # rerun in its run dir from the checkpoint it had, and said so
        assert "resumed from" in (sweep / str(num) / "train.log").read_text()
        said = f"trial #{num}: was in flight; rerunning it in {sweep / str(num)} from its checkpoint step_"
        assert said in proc.stdout


@pytest.mark.slow
def test_ctrl_c_on_a_parallel_local_study_saves_its_trials_and_the_resume_continues_them(tmp_path):
    """SIGINT to the study's process group, as a terminal's Ctrl-C: each trial in flight gets one SIGINT (submitit's
    controller sends no second one, nor SIGKILL), saves and ends KILLED in every record; no traceback; the resume
    continues both from their checkpoints in their own MLflow runs."""
    from mlflow.tracking import MlflowClient

    sweep, store = tmp_path / "sweep", f"sqlite:///{tmp_path}/mlflow.db"
    command = [
        sys.executable,
        str(ROOT / "train.py"),
        *SWEEP,
        *TRIAL,
        f"tracking.uri={store}",
        "hydra/launcher=exp_local",
        "stage.num_steps=200",
        f"+callbacks.slow={{_target_:tests.hooks.SleepEachStep,seconds:0.25,until:'{tmp_path / 'fast'}'}}",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.pruner=none",
        "hydra.sweeper.poll_interval_s=0.2",
        f"hydra.sweep.dir={sweep}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    launcher = subprocess.Popen(
        command,
        cwd=tmp_path,
        env=env,
        start_new_session=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # a background job's children ignore it
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    deadline = time.time() + 240
    started = ("metrics.jsonl", "mlflow_run.json")  # both are training, with their MLflow runs
    while not all((sweep / n / f).exists() for n in "01" for f in started):
        assert time.time() < deadline and launcher.poll() is None, "the trials never started training"
        time.sleep(0.2)
    os.killpg(launcher.pid, signal.SIGINT)
    (tmp_path / "fast").touch()  # the resumed trials need not wait
    out = launcher.communicate(timeout=120)[0]
    assert launcher.returncode == 130, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    said = "interrupted: 2 trial(s) in flight stopped KILLED (2 with a checkpoint); continue with: "
    assert out.strip().splitlines()[-1] == said + f"python -m exp.sweep resume {sweep}"
    client = MlflowClient(tracking_uri=store)
    runs = {}
    for num, entry in trials(sweep).items():
        summary = json.loads((sweep / num / "summary.json").read_text())
        assert entry["status"] == summary["status"] == "KILLED" and "SIGINT" in summary["stop_reason"]
        assert os.path.isdir(summary["checkpoint"])
        assert client.get_run(entry["mlflow_run_id"]).info.status == "KILLED"
        runs[num] = entry["mlflow_run_id"]
    # in flight in the study (so that the resume continues them), with exp's status beside it
    assert [(t.state, t.user_attrs["status"]) for t in study_of(sweep).trials] == [(TrialState.RUNNING, "KILLED")] * 2
    command = [sys.executable, "-m", "exp.sweep", "status", str(sweep)]
    status = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    assert status.stdout.splitlines()[-1] == "2 trials: 2 KILLED"

    proc = resume(sweep, env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for num in "01":
        assert f"trial #{num}: was in flight; rerunning it in {sweep / num} from its checkpoint step_" in proc.stdout
        assert "resumed from" in (sweep / num / "train.log").read_text()
    assert all(t["status"] == "FINISHED" for t in trials(sweep).values())
    assert {n: t["mlflow_run_id"] for n, t in trials(sweep).items()} == runs  # continued, not a second run
    assert all(client.get_run(r).info.status == "FINISHED" for r in runs.values())


# --- SLURM --------------------------------------------------------------------------------------------

needs_slurm = pytest.mark.skipif(shutil.which("sbatch") is None, reason="no sbatch: run scripts/slurm-local.sh")


def slurm_sweep(sweep, hardware: str, *overrides: str) -> list[str]:
    return [
        sys.executable,
        str(ROOT / "train.py"),
        *SWEEP,
        *[o for o in TRIAL if not o.startswith("hardware=")],
        f"hardware={hardware}",
        "hydra/launcher=exp_slurm",  # sweeps/optuna.yaml picks exp_local over what hardware picks
        "hardware.device=cpu",
        "hardware.dtype=float32",
        "hardware.num_threads=1",
        "hydra.launcher.timeout_min=30",
        "hydra.launcher.mem_gb=1",
        "tracking=none",
        "hydra.sweeper.pruner_args.n_startup_trials=1",
        "hydra.sweeper.pruner_args.n_warmup_steps=0",
        f"hydra.sweep.dir={sweep}",
        *overrides,
    ]


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_study_on_slurm_survives_its_launcher(tmp_path):
    """Each trial is its own SLURM job; the launcher is killed while a job runs, and the resumed study waits for
    that job (it is not run twice) and ends with exactly n_trials."""
    sweep = tmp_path / "sweep"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    command = slurm_sweep(
        sweep,
        "slurm_cpu",
        "stage.num_steps=12",
        SLEEP % 1.0,
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.storage=journal",
    )
    launcher = subprocess.Popen(command, cwd=tmp_path, env=env, start_new_session=True, stdout=subprocess.DEVNULL)

    def ended_and_submitted(by_num: dict) -> bool:  # a trial ended while the next one's job was submitted
        return any("ended" in t for t in by_num.values()) and any(
            "ended" not in t and t.get("job_id") for t in by_num.values()
        )

    kill_launcher_when(launcher, sweep, ended_and_submitted, 300, "a trial that ended while another one's job ran")
    waiting = [t["num"] for t in trials(sweep).values() if "ended" not in t]
    proc = resume(sweep, env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert any(f"trial #{n}: was in flight; waiting for its job" in proc.stdout for n in waiting), proc.stdout[-2000:]
    storage = optuna.storages.JournalStorage(JournalFileBackend(str(sweep / "optuna.journal")))
    study = optuna.load_study(study_name="exp-lr-wd", storage=storage)
    assert [t.number for t in study.trials] == [0, 1, 2]
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in study.trials)
    by_num = trials(sweep)
    assert len({t["slurm_job_id"] for t in by_num.values()}) == 3  # one job per trial, not an array
    for n in waiting:  # waited for, not run again
        assert (sweep / str(n) / "train.log").read_text().count("run dir ") == 1


@pytest.mark.slow
@pytest.mark.slurm
@needs_slurm
def test_ddp_trials_on_slurm_are_one_two_task_job_each(tmp_path):
    """hardware=slurm_ddp: each trial one two-task DDP job that reports its evaluations to the study."""
    sweep = tmp_path / "sweep"
    command = slurm_sweep(
        sweep,
        "slurm_ddp",
        "stage.num_steps=6",
        "hydra.sweeper.n_trials=2",
        "hydra.sweeper.parallelism=1",  # a two-task trial takes both of the node's CPUs
        "hydra.sweeper.pruner=none",
    )
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = study_of(sweep)
    assert [t.state for t in study.trials] == [TrialState.COMPLETE, TrialState.COMPLETE]
    assert all(sorted(t.intermediate_values) == [2, 4, 6] for t in study.trials)
    for t in trials(sweep).values():
        assert t["status"] == "FINISHED"
        assert len(list((sweep / ".submitit" / t["job_id"]).glob("*_result.pkl"))) == 2  # two tasks


# --- what the study optimises ------------------------------------------------------------------------------

EVAL = ["eval=lm_eval", "eval.limit=16", "model.seq_len=128", "hydra/launcher=exp_basic", "tracking=none"]


def test_a_two_objective_study_ends_with_its_pareto_front_in_the_results_and_the_report(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        *SWEEP, *TRIAL, *EVAL, "stage.num_steps=4",
        "hydra.sweeper.objective=[val/loss,eval/exp_stdlib_mc/acc_norm]", "hydra.sweeper.direction=[minimize,maximize]",
        "hydra.sweeper.pruner=none", "hydra.sweeper.n_trials=3", f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    study = study_of(sweep)
    assert [d.name for d in study.directions] == ["MINIMIZE", "MAXIMIZE"]
    done = [t for t in study.trials if t.state == TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:  # each value is the trial's own last logged one
        rows = [json.loads(line) for line in (sweep / str(t.number) / "metrics.jsonl").read_text().splitlines()]
        assert t.values == [
            [r["val/loss"] for r in rows if "val/loss" in r][-1],
            [r["eval/exp_stdlib_mc/acc_norm"] for r in rows if "eval/exp_stdlib_mc/acc_norm" in r][-1],
        ]
    results = json.loads((sweep / "optimization_results.yaml").read_text())
    assert sorted(p["trial"] for p in results["pareto_front"]) == sorted(t.number for t in study.best_trials)
    report = subprocess.run(
        [sys.executable, "-m", "exp.report", str(sweep)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert report.returncode == 0, report.stderr[-2000:]
    assert "objective: minimize val/loss, maximize eval/exp_stdlib_mc/acc_norm" in report.stdout
    assert f"Pareto front ({len(study.best_trials)} trials):" in report.stdout
    header = next(line for line in report.stdout.splitlines() if line.startswith("rank"))
    assert "exp_stdlib_mc/acc_norm" in header and "exp_stdlib_mc/acc " in header + " "  # the scores, per trial
    assert (sweep / "optuna_pareto.png").stat().st_size > 10_000


def test_a_trial_that_never_logs_the_objective_fails_with_the_metric_named(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_train(
        *SWEEP, *TRIAL, *EVAL, "stage.num_steps=2", "hydra.sweeper.objective=eval/exp_stdlib_mc/accuracy",
        "hydra.sweeper.direction=maximize", "hydra.sweeper.n_trials=1", "hydra.sweeper.max_failure_rate=1.0",
        f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert proc.returncode == 1, proc.stderr[-3000:]
    said = "objective eval/exp_stdlib_mc/accuracy was never logged (the run logged eval/exp_stdlib_mc/acc, "
    assert said in proc.stdout + proc.stderr
    assert [t.state for t in study_of(sweep).trials] == [TrialState.FAIL]
    (entry,) = trials(sweep).values()
    assert entry["status"] == "FAILED" and entry["error"].startswith("objective eval/exp_stdlib_mc/accuracy")
