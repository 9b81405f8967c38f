"""The job service tried as an attacker on the same machine would: configs that name code through a module's
attributes, resolvers that read the environment, overrides that place a config under `hydra` or point a job at
another folder. Each is refused with a 4xx line, nothing outside the runs folder changes and nothing leaks."""

import os
import sys

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from exp.serve import Settings, create_app  # noqa: E402

from ..conftest import TINY  # noqa: E402

SECRET = "s3cr3t-value-of-the-service"
ROUTES = ("/api/training/configs", "/api/training/jobs/start", "/api/training/sweeps/start")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A service over an empty runs folder, the folder an attack would write to, and a secret in its environment."""
    base = tmp_path_factory.mktemp("attacks")
    runs, outside = base / "runs", base / "outside"
    runs.mkdir()
    outside.mkdir()
    os.environ["EXP_ATTACK_SECRET"] = SECRET
    with TestClient(create_app(Settings(runs_dir=runs)), base_url="http://127.0.0.1") as client:
        yield client, runs, outside
    del os.environ["EXP_ATTACK_SECRET"]


def snapshot(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def post_everywhere(client, overrides: list[str]) -> list:
    bodies = ({"name": "attack", "overrides": overrides}, {"overrides": overrides}, {"overrides": overrides})
    return [client.post(route, json=body) for route, body in zip(ROUTES, bodies, strict=True)]


def module_attribute_targets() -> list[str]:
    """Dangerous functions reached through the attributes of modules the allowlist trusts: os, subprocess,
    importlib, builtins, shutil and pathlib as any exp or torch.optim module imported them."""
    import exp.checkpoint.weights  # noqa: F401
    import exp.config  # noqa: F401
    import exp.serve.app  # noqa: F401
    import exp.serve.routes.sweeps  # noqa: F401

    dangerous = {
        "os": "makedirs",
        "subprocess": "run",
        "importlib": "import_module",
        "builtins": "exec",
        "shutil": "rmtree",
        "pathlib": "Path",
    }
    found = []
    for name, module in sorted(sys.modules.items()):
        if not name.startswith(("exp.", "torch.optim.")) or module is None:
            continue
        for attr, fn in dangerous.items():
            value = getattr(module, attr, None)
            if getattr(value, "__name__", None) == attr and hasattr(value, fn):
                found.append(f"{name}.{attr}.{fn}")
    return found


def test_module_attributes_lead_nowhere(world):
    client, runs, outside = world
    targets = module_attribute_targets()
    assert any(t.startswith("exp.config.os.") for t in targets) and len(targets) >= 10, targets
    before = snapshot(runs)
    for target in [*targets, "exp.rundir.write_json", "exp.config.instantiate", "exp.data.Path"]:
        probe = outside / target.replace(".", "_")
        override = f"+callbacks.x={{_target_: {target}, _args_: ['{probe}']}}"
        r = client.post("/api/training/configs", json={"name": "x", "overrides": [*TINY, override]})
        assert r.status_code == 422 and "is not allowed over HTTP" in r.json()["detail"], (target, r.text)
    assert snapshot(outside) == [] and snapshot(runs) == before


@pytest.mark.parametrize(
    "overrides",
    [
        # the reported attack: validation built the dataset, so saving the config made the folder
        [
            "data=torch_dataset",
            "data.vocab_size=264",
            "+data.dataset._target_=exp.config.os.makedirs",
            "+data.dataset.name=OUT",
        ],
        ["model._target_=exp.config.os.makedirs", "+model.name=OUT"],
        ["+callbacks.x={_target_: exp.config.os.makedirs, name: OUT, _partial_: true}"],
        ["+callbacks.x={_target_: exp.config.os.makedirs, _args_: [OUT], _convert_: all}"],
        [
            "+callbacks.x={_target_: exp.callbacks.FirstStepClock, "
            "_args_: [{_target_: exp.config.os.makedirs, name: OUT}]}"
        ],
        [
            "+callbacks.x={_target_: exp.callbacks.FirstStepClock, "
            "extra: [[{_target_: exp.config.os.makedirs, name: OUT}]]}"
        ],
        ["optimizer.param_groups=[{match: wte, _target_: exp.config.os.makedirs, name: OUT}]"],
        ["optimizer._target_=exp.optim.os.makedirs", "+optimizer.name=OUT"],
        ["scheduler._target_=exp.rundir.write_json", "+scheduler.path=OUT", "+scheduler.data={}"],
    ],
)
def test_every_placement_of_a_target_is_checked(world, overrides):
    client, runs, outside = world
    probe = outside / "proof-dir"
    overrides = [*TINY, *(o.replace("OUT", str(probe)) for o in overrides)]
    before = snapshot(runs)
    for r in post_everywhere(client, overrides):
        assert r.status_code == 422, r.text
        assert "is not allowed over HTTP" in r.json()["detail"], r.text
    assert not probe.exists() and snapshot(outside) == [] and snapshot(runs) == before


@pytest.mark.parametrize(
    "override, search",
    [
        ("optimizer._target_=torch.optim.AdamW,exp.config.os.makedirs", None),  # a grid's later value
        ("optimizer._target_=choice(torch.optim.AdamW, exp.serve.routes.sweeps.subprocess.run)", {}),  # a choice
    ],
)
def test_every_value_of_a_sweep_is_checked(world, override, search):
    client, runs, _ = world
    before = snapshot(runs)
    r = client.post("/api/training/sweeps/start", json={"overrides": [*TINY, override], "search": search})
    assert r.status_code == 422 and "is not allowed over HTTP" in r.json()["detail"], r.text
    assert snapshot(runs) == before


@pytest.mark.parametrize(
    "override",
    [
        "seed=${oc.env:EXP_ATTACK_SECRET}",
        "run_name=${oc.env:EXP_ATTACK_SECRET}",
        "stage.learning_rate=${oc.env:EXP_ATTACK_SECRET}",
        "+stage.x=${oc.decode:${oc.env:EXP_ATTACK_SECRET}}",
        "seed='${oc.env:EXP_ATTACK_SECRET}'",
        "seed=${oc.env:EXP_ATTACK_SECRET},1",
        "sample.prompt=${oc.env:EXP_ATTACK_SECRET,x}",
        "seed=${tracking.experiment}",  # a value the service's configs read from its environment
    ],
)
def test_resolvers_never_read_the_services_environment(world, override):
    client, _, _ = world
    for r in post_everywhere(client, [*TINY, override]):
        assert r.status_code == 422 and "interpolations" in r.json()["detail"], r.text
        assert SECRET not in r.text


@pytest.mark.parametrize(
    "override",
    [
        "+optimizer@hydra.callbacks.evil=sgd",
        "+tracking@hydra.job.env_set=none",
        "optimizer@_global_=sgd",
        "hydra.job.env_set.X=1",
        "++hydra.run.dir=OUT",
        "~hydra",
        "hydra/launcher=exp_slurm",
        "checkpoint.dir=OUT",
        "+checkpoint.dir=OUT",
        "checkpoint={dir: OUT, every_n_steps: 2}",
        "tracking.uri=sqlite:///OUT/mlflow.db",
        "tracking={uri: 'sqlite:///OUT/mlflow.db'}",
        "tracking.artifact_location=OUT",
        "tracking.run_id=abc",
        "data.cache_dir=OUT",
        "data={cache_dir: OUT}",
        "resume.path=OUT",
        "run_dir=OUT",
    ],
)
def test_service_owned_keys_are_refused_in_any_syntax(world, override):
    client, runs, outside = world
    override = override.replace("OUT", str(outside / "elsewhere"))
    for r in post_everywhere(client, [*TINY, override]):
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert "set by the service" in detail or "GROUP@PACKAGE" in detail, detail
    assert snapshot(outside) == []


def test_ordinary_choices_of_those_groups_still_work(world):
    client, _, _ = world
    overrides = [*TINY, "tracking=mlflow", "tracking.experiment=mine", "checkpoint=default", "checkpoint.keep_last=2"]
    r = client.post("/api/training/configs", json={"name": "ok", "overrides": overrides})
    assert r.status_code == 201, r.text


@pytest.mark.parametrize(
    "override",
    [
        "eval.include_path=TASKS",
        "eval={harness: lm_eval, include_path: TASKS, tasks: [evil]}",
        "eval.tasks=[TASKS/evil.yaml]",  # a task given as a file path is not a task name
    ],
)
def test_task_yamls_that_would_run_code_are_refused(world, override):
    client, runs, outside = world
    tasks, probe = outside / "tasks", outside / "proof-eval"
    tasks.mkdir(exist_ok=True)
    (tasks / "evil.py").write_text(f"import pathlib\npathlib.Path({str(probe)!r}).mkdir()\ndef load(**kw): ...\n")
    (tasks / "evil.yaml").write_text("task: evil\ncustom_dataset: !function evil.load\noutput_type: multiple_choice\n")
    before = snapshot(runs)
    for r in post_everywhere(client, [*TINY, "eval=lm_eval", override.replace("TASKS", str(tasks))]):
        assert r.status_code == 422, r.text
        assert "eval.include_path is not accepted over HTTP" in r.json()["detail"] or "unknown task" in r.text
    assert not probe.exists() and snapshot(runs) == before


@pytest.mark.parametrize("source", ["hf:json:OUTSIDE/secret.jsonl", "OUTSIDE/secret.txt"])
def test_a_mixture_source_to_prepare_is_refused_over_http(world, source):
    """Validation would read and tokenize a raw or hf: source in the service: only prepared token data is taken."""
    client, runs, outside = world
    (outside / "secret.txt").write_text("the service's secret\n" * 50)
    (outside / "secret.jsonl").write_text('{"text": "the service\'s secret"}\n' * 50)
    before = snapshot(runs)
    mixture = ["data=mixture", f"+data.sources.other.path={source.replace('OUTSIDE', str(outside))}"]
    for r in post_everywhere(client, [*TINY, *mixture]):
        assert r.status_code == 422, r.text
        assert "is not accepted over HTTP: a mixture's sources must be prepared token data" in r.json()["detail"]
    assert snapshot(runs) == before  # refused before validation, which would have prepared it


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["model=hf", "model.name_or_path=some-org/some-model"], "model.name_or_path=some-org/some-model is not"),
        (["stage=sft", "data=sft_jsonl", "data.path=hf:some-org/chats"], "data.path=hf:some-org/chats is not"),
        (["stage=sft", "data=sft_jsonl", "data.path=c.jsonl", "data.val_path=hf:json:x"], "data.val_path=hf:json:x"),
    ],
    ids=["hub-model", "hf-dataset", "hf-val-dataset"],
)
def test_nothing_is_downloaded_for_a_client(world, overrides, message):
    """Validation would fetch a hub model's snapshot or an hf: dataset in the service: refused before it does."""
    client, runs, _ = world
    before = snapshot(runs)
    tiny = [o for o in TINY if not o.startswith("model")] if "model=hf" in overrides else TINY
    for r in post_everywhere(client, [*tiny, *overrides]):
        assert r.status_code == 422, r.text
        detail = r.json()["detail"]
        assert message in detail and "accepted over HTTP" in detail, detail
    assert snapshot(runs) == before
