"""A sweep's Optuna study over real HTTP (`python -m exp.serve` on a free loopback port): each parameter's importance,
the Pareto front of a multi-objective study, and what the service refuses to read (a grid has no study, an unknown
sweep, a study file that is a symlink). Nothing trains: the sweep folders and their real Optuna studies are written
by the test as exp's sweeper leaves them (sweep.json's study block, optuna.db beside the numbered run dirs)."""

import json
import math
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
optuna = pytest.importorskip("optuna")

from .test_serve_e2e import Service  # noqa: E402

PARAMS = {
    "stage.learning_rate": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True),
    "model.n_layer": optuna.distributions.IntDistribution(1, 4),
    "optimizer": optuna.distributions.CategoricalDistribution(["adamw", "sgd"]),
}


def objectives_of(params: dict) -> tuple[float, float]:
    """val/loss: mostly the learning rate's distance from 3e-3 (a little the depth); step time: the depth's."""
    loss = 2.0 + 4 * abs(math.log10(params["stage.learning_rate"] / 3e-3)) + 0.01 * params["model.n_layer"]
    return loss, 10.0 * params["model.n_layer"] + (1.0 if params["optimizer"] == "sgd" else 0.0)


def write_optuna_sweep(sweep_dir: Path, num_trials: int, multi: bool = False, seed: int = 0) -> optuna.Study:
    """A finished Optuna sweep as exp's sweeper leaves it: a study in <sweep>/optuna.db whose trials drew from
    PARAMS, each trial's run directory (overrides, summary, train/loss curve) and sweep.json naming the study."""
    sweep_dir.mkdir(parents=True)
    storage = f"sqlite:///{sweep_dir.resolve() / 'optuna.db'}"
    names = ["val/loss", "perf/step_ms"] if multi else ["val/loss"]
    directions = ["minimize"] * len(names)
    study = optuna.create_study(
        storage=storage, study_name="exp", directions=directions, sampler=optuna.samplers.RandomSampler(seed=seed)
    )
    study.set_user_attr("objectives", names)
    trials = {}
    for _ in range(num_trials):
        trial = study.ask(PARAMS)
        loss, step_ms = objectives_of(trial.params)
        study.tell(trial, [loss, step_ms] if multi else loss)
        run_dir = sweep_dir / str(trial.number)
        overrides = [f"{k}={v}" for k, v in trial.params.items()]
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text("".join(f"- {o}\n" for o in overrides))
        (run_dir / ".hydra" / "config.yaml").write_text("run_name: gpt_tiny-pretrain\nstage: {num_steps: 100}\n")
        summary = {"status": "FINISHED", "step": 100, "num_steps": 100, "val_loss": loss}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        rows = [{"step": s, "train/loss": loss + 3 - s / 50, "perf/step_ms": step_ms} for s in range(10, 101, 10)]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        trials[str(trial.number)] = {
            "num": trial.number,
            "overrides": overrides,
            "run_dir": str(run_dir.resolve()),
            "status": "FINISHED",
            "val_loss": loss,
        }
    manifest = {
        "sweep_dir": str(sweep_dir.resolve()),
        "launcher": "exp_basic",
        "trials": trials,
        "study": {
            "storage": storage,
            "study_name": "exp",
            "objective": names,
            "direction": directions if multi else directions[0],
            "pruner": "none",
        },
    }
    (sweep_dir / "sweep.json").write_text(json.dumps(manifest))
    return study


def sweep_id_of(service: Service, sweep_dir: Path) -> str:
    found = [
        s["sweep_id"] for s in service.client.get("/api/training/sweeps").json() if s["sweep_dir"] == str(sweep_dir)
    ]
    assert len(found) == 1, found
    return found[0]


def test_importances_and_pareto_front_of_a_sweeps_study(tmp_path):
    runs = (tmp_path / "runs").resolve()
    single = write_optuna_sweep(runs / "multirun" / "single", 12)
    multi = write_optuna_sweep(runs / "multirun" / "multi", 20, multi=True)
    write_optuna_sweep(runs / "multirun" / "young", 1)  # one finished trial: no importances yet
    grid = runs / "multirun" / "grid"  # a grid: numbered run dirs and multirun.yaml, no study
    (grid / "0" / ".hydra").mkdir(parents=True)
    (grid / "0" / "summary.json").write_text(json.dumps({"status": "FINISHED", "val_loss": 2.5}))
    (grid / "multirun.yaml").write_text("hydra: {}\n")
    write_optuna_sweep(runs / "multirun" / "linked", 3)  # its study file swapped for a symlink outside
    outside = tmp_path / "outside.db"
    write_optuna_sweep(tmp_path / "elsewhere", 6, seed=2)
    (tmp_path / "elsewhere" / "optuna.db").rename(outside)
    (runs / "multirun" / "linked" / "optuna.db").unlink()
    (runs / "multirun" / "linked" / "optuna.db").symlink_to(outside)
    untouched = outside.read_bytes()

    service = Service(runs).start()
    try:
        ids = {name: sweep_id_of(service, runs / "multirun" / name) for name in ("single", "multi", "young", "grid")}
        ids["linked"] = sweep_id_of(service, runs / "multirun" / "linked")

        r = service.client.get(f"/api/training/sweeps/{ids['single']}/importances")
        assert r.status_code == 200, r.text
        answer = r.json()
        assert answer["evaluator"] == "PedAnovaImportanceEvaluator" and answer["num_complete"] == 12
        assert answer["message"] is None
        [objective] = answer["objectives"]
        assert objective["name"] == "val/loss" and objective["direction"] == "minimize"
        found = objective["importances"]
        assert set(found) == set(PARAMS) and math.isclose(sum(found.values()), 1.0, rel_tol=1e-6)
        assert max(found, key=found.get) == "stage.learning_rate"  # the loss is mostly the learning rate's
        expected = optuna.importance.get_param_importances(
            single, evaluator=optuna.importance.PedAnovaImportanceEvaluator(), target=lambda t: t.values[0]
        )
        assert found == pytest.approx(dict(expected))  # Optuna's own answer on the sweep's study

        r = service.client.get(f"/api/training/sweeps/{ids['multi']}/importances")
        assert [o["name"] for o in r.json()["objectives"]] == ["val/loss", "perf/step_ms"]
        step_ms = r.json()["objectives"][1]["importances"]
        assert max(step_ms, key=step_ms.get) == "model.n_layer"  # the step time is the depth's

        young = service.client.get(f"/api/training/sweeps/{ids['young']}/importances").json()
        assert young["objectives"] == [] and young["message"] == "1 finished trial: importances need at least 2"

        # the Pareto front: every finished trial's two objectives, the study's best trials marked
        front = service.client.get(f"/api/training/sweeps/{ids['multi']}/pareto").json()
        assert front["multi_objective"] is True and front["objectives"] == ["val/loss", "perf/step_ms"]
        assert len(front["trials"]) == 20
        assert sorted(t["num"] for t in front["trials"] if t["front"]) == sorted(t.number for t in multi.best_trials)
        assert 1 < len(multi.best_trials) < 20
        by_num = {t["num"]: t["values"] for t in front["trials"]}
        assert all(by_num[t.number] == pytest.approx(t.values) for t in multi.trials)
        lone = service.client.get(f"/api/training/sweeps/{ids['single']}/pareto").json()
        assert lone["multi_objective"] is False and lone["trials"] == []

        # refused, with one line: a grid has no study, an unknown sweep, a symlinked study file (never followed)
        for sweep_id, status, line in (
            (ids["grid"], 404, "is not an Optuna study"),
            ("s0000nosuchsweep", 404, "no sweep s0000nosuchsweep"),
            (ids["linked"], 404, "optuna.db is a symlink or not a regular file: not served"),
        ):
            for what in ("importances", "pareto"):
                r = service.client.get(f"/api/training/sweeps/{sweep_id}/{what}")
                assert r.status_code == status and line in r.json()["detail"], (what, r.text)
                assert "\n" not in r.json()["detail"]
        r = service.client.get("/api/training/sweeps/..%2F..%2Fetc/importances")
        assert r.status_code == 404
        assert outside.read_bytes() == untouched
    finally:
        service.kill()
