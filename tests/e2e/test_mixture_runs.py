"""data=mixture end to end: the stdlib's code and prose the test writes, trained with a weight schedule, each source's
val loss in MLflow, resumed mid-run bit-identically; an Optuna study over the mixture weight on the local launcher;
bad input exits 2 with one line and writes nothing."""

import json
import random

import mlflow
import optuna
import pytest

import exp.job
from exp.rundir import read_metrics

from ..conftest import ROOT, TINY, compose_train, run_train
from .test_resume import assert_same

NUM_STEPS = 8
WORDS = "thou art the king of all these lands and I shall not yield my sword to thee nor any man".split()


@pytest.fixture(scope="module")
def prose(tmp_path_factory):
    """A small text in verse: the second source (raw text, prepared into the cache by the mixture)."""
    rng = random.Random(0)
    path = tmp_path_factory.mktemp("prose") / "verse.txt"
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 12))).capitalize() + "." for _ in range(2000)]
    path.write_text("\n".join(lines))
    return path


def mixture(prose) -> list[str]:
    return [
        "data=mixture",  # its one source by default: code (pystdlib)
        "data.sources.code.weight=0.3",
        f"+data.sources.prose.path={prose}",
        "+data.sources.prose.weight=0.7",
    ]


def base(prose) -> list[str]:
    steps = [f"stage.num_steps={NUM_STEPS}", "stage.eval_every_n_steps=4", "checkpoint.every_n_steps=4"]
    return [*[o for o in TINY if not o.startswith("stage.num_steps")], *mixture(prose), *steps]


def train(run_dir, *overrides):
    try:
        return exp.job.run_job(compose_train(*overrides, run_dir=run_dir))
    except (SystemExit, KeyboardInterrupt):
        return None


def final_state(run_dir) -> dict:
    from safetensors.torch import load_file

    folder = run_dir / "checkpoints" / f"step_{NUM_STEPS:08d}"
    trainer = json.loads((folder / "trainer_state.json").read_text())
    for key in ("train_seconds", "warmup_seconds", "warmup_tokens"):
        trainer["state"].pop(key)
    for key in ("mlflow_tracking_uri", "mlflow_run_id"):  # the reference run is tracked, the resumed one not
        trainer.pop(key, None)
    return {
        "model": load_file(folder / "model.safetensors"),
        "optimizer": load_file(folder / "optimizer.safetensors"),
        "trainer": trainer,
    }


@pytest.fixture(scope="module")
def straight(tmp_path_factory, prose):
    """The uninterrupted run, with an annealing phase from half-way (code 0.9) and MLflow on a local store."""
    tmp = tmp_path_factory.mktemp("mixture")
    store = f"sqlite:///{tmp}/mlflow.db"
    schedule = "data.schedule=[{at: 0.5, weights: {code: 2.7, prose: 0.3}}]"
    run_dir = tmp / "straight"
    train(run_dir, *base(prose), schedule, "tracking=mlflow", f"tracking.uri={store}")
    return {"run_dir": run_dir, "store": store, "schedule": schedule, "tmp": tmp}


def test_each_source_is_validated_counted_and_recorded(straight):
    run_dir = straight["run_dir"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "FINISHED"
    assert summary["data"]["weights"] == {"code": 0.3, "prose": 0.7}  # normalised, recorded
    assert summary["data"]["schedule"] == [{"at": 0.5, "weights": {"code": 0.9, "prose": 0.1}}]
    sources = summary["sources"]
    assert set(sources["val_loss"]) == {"code", "prose"} and sources["weight"] == pytest.approx(
        {"code": 0.9, "prose": 0.1}
    )
    assert sum(sources["tokens"].values()) == NUM_STEPS * 4 * 32  # every input drawn, counted to its source
    rows = read_metrics(run_dir / "metrics.jsonl")
    val = [m for m in rows if "val/loss/code" in m][-1]
    assert val["val/loss"] == pytest.approx(0.3 * val["val/loss/code"] + 0.7 * val["val/loss/prose"])
    metrics = mlflow.MlflowClient(straight["store"]).get_run(summary["mlflow_run_id"]).data.metrics
    assert metrics["val/loss/code"] == pytest.approx(val["val/loss/code"])
    assert metrics["val/loss/prose"] == pytest.approx(val["val/loss/prose"])
    assert metrics["data/tokens/prose"] == sources["tokens"]["prose"]
    assert (run_dir / "metrics.png").stat().st_size > 0  # with a dashed val curve and a tokens panel per source


def test_a_mixture_run_resumed_mid_run_is_bit_identical(straight, prose, tmp_path):
    run_dir = tmp_path / "run"
    stop = ["+callbacks.stop._target_=tests.hooks.SignalAt", "+callbacks.stop.step=6"]
    train(run_dir, *base(prose), straight["schedule"], *stop)
    assert json.loads((run_dir / "summary.json").read_text())["step"] == 6
    train(run_dir, *base(prose), straight["schedule"], "resume=auto")
    keys = ("train/loss", "val/loss", "val/loss/code", "data/tokens/code", "data/tokens/prose")
    trajectory = lambda d: [(m["step"], k, m[k]) for m in read_metrics(d / "metrics.jsonl") for k in keys if k in m]
    assert trajectory(run_dir) == trajectory(straight["run_dir"])
    assert_same(final_state(run_dir), final_state(straight["run_dir"]))


def test_an_optuna_study_searches_the_mixture_weight(prose, tmp_path):
    sweep = tmp_path / "sweep"
    trial = [o for o in base(prose) if not o.startswith(("tracking=", "checkpoint.", "stage.num_steps"))]
    proc = run_train(
        "-cd",
        str(ROOT / "sweeps"),
        "-cn",
        "optuna",
        *trial,
        "stage.num_steps=4",
        "hydra/launcher=exp_local",
        "~hydra.sweeper.params",
        "data.sources.code.weight=interval(0.1, 0.9)",
        "hydra.sweeper.n_trials=3",
        "hydra.sweeper.parallelism=2",
        "hydra.sweeper.poll_interval_s=0.2",
        "tracking=none",
        f"hydra.sweep.dir={sweep}",
        cwd=tmp_path,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    study = optuna.load_study(study_name="exp-lr-wd", storage=f"sqlite:///{sweep}/optuna.db")
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    assert len(done) == 3
    for t in done:
        weight = t.params["data.sources.code.weight"]
        assert 0.1 <= weight <= 0.9
        summary = json.loads((sweep / str(t.number) / "summary.json").read_text())
        assert summary["data"]["weights"]["code"] == pytest.approx(weight / (weight + 0.7))  # normalised
        assert t.value == pytest.approx(summary["val_loss"])


@pytest.mark.parametrize(
    "extra, line",
    [
        (["+data.sources.web.path=/nowhere/web"], "config error: data.sources.web.path=/nowhere/web does not exist"),
        (["data.sources.code.weight=-0.5"], "config error: data.sources.code.weight=-0.5 must be a number >= 0"),
        (
            ["model=custom", "model._target_=tests.unit.test_sft_data.NoDocuments", "data.document_mask=true"],
            "config error: data.document_mask=true but model NoDocuments.forward takes no doc_ids",
        ),
    ],
)
def test_bad_mixtures_exit_2_with_one_line_and_write_nothing(prose, tmp_path, extra, line):
    run_dir = tmp_path / "run"
    tiny = [o for o in TINY if not (o.startswith("model") and "model=custom" in extra)]
    proc = run_train(*tiny, *mixture(prose), *extra, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(line), proc.stderr[-2000:]
    assert not run_dir.exists()
