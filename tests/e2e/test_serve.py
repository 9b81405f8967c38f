"""The job service's routes on a real app (FastAPI's TestClient) over real run directories: configs validated as
train.py validates them, the target allowlist, tokens, bad input (never a 5xx), checkpoints and metrics of a run
started from the command line."""

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from exp.errors import ConfigError  # noqa: E402
from exp.serve import Settings, create_app  # noqa: E402
from exp.serve.routes.jobs import merge_overrides  # noqa: E402

from ..conftest import ROOT, TINY, run_train  # noqa: E402

CLI_RUN = [*TINY, "stage.num_steps=6", "checkpoint.every_n_steps=2", "checkpoint.keep_last=0"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, corpus_cache):
    """A runs directory holding one finished run started from the command line (discovered by the service)."""
    runs = tmp_path_factory.mktemp("serve") / "runs"
    proc = run_train(*CLI_RUN, f"hydra.run.dir={runs / 'cli' / 'one'}", cwd=runs.parent)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return runs


# what a browser on the default bind sends (Host: 127.0.0.1); TestClient's own "testserver" is refused
LOCAL = "http://127.0.0.1"


@pytest.fixture(scope="module")
def client(runs):
    with TestClient(create_app(Settings(runs_dir=runs)), base_url=LOCAL) as c:
        yield c


@pytest.fixture(scope="module")
def cli_job(client, runs):
    jobs = client.get("/api/training/jobs").json()
    (job,) = [j for j in jobs if j["run_dir"] == str((runs / "cli" / "one").resolve())]
    return job


def test_config_is_validated_and_stored(client):
    body = {"name": "tiny", "overrides": [*TINY, "stage.num_steps=5"]}
    created = client.post("/api/training/configs", json=body)
    assert created.status_code == 201, created.text
    config_id = created.json()["id"]
    assert client.get(f"/api/training/configs/{config_id}").json()["overrides"] == body["overrides"]
    assert config_id in [c["id"] for c in client.get("/api/training/configs").json()]
    assert client.delete(f"/api/training/configs/{config_id}").status_code == 200
    assert client.get(f"/api/training/configs/{config_id}").status_code == 404
    assert client.delete(f"/api/training/configs/{config_id}").status_code == 404


@pytest.mark.parametrize(
    "override",
    [
        "stage.warmup_steps=300",  # exp's validation
        "+optimizer.lrr=0.1",
        "optimizer.betas=[0.9]",
        "stage.learning_rat=0.1",  # Hydra's own: an unknown key, an unknown group option, a bad override
        "optimizer=nope",
        "seed=[1",
    ],
)
def test_bad_config_gets_the_cli_line(client, tmp_path, override):
    """The service answers with the very line train.py prints, and train.py prints only that line (exit 2),
    Hydra's own compose errors included."""
    proc = run_train(*TINY, override, f"hydra.run.dir={tmp_path / 'r'}", cwd=tmp_path)
    assert proc.returncode == 2
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    cli_line = proc.stderr.strip()
    assert cli_line.startswith("config error: ")
    r = client.post("/api/training/configs", json={"name": "bad", "overrides": [*TINY, override]})
    assert r.status_code == 422 and r.json()["detail"] == cli_line


def test_unknown_key_or_option_is_422_naming_it(client):
    r = client.post("/api/training/configs", json={"name": "bad", "overrides": ["stage.nope=1"]})
    assert r.status_code == 422 and "stage.nope" in r.json()["detail"]
    r = client.post("/api/training/configs", json={"name": "bad", "overrides": ["optimizer=nope"]})
    assert r.status_code == 422 and "optimizer/nope" in r.json()["detail"]
    options = sorted(p.stem for p in (ROOT / "conf" / "optimizer").glob("*.yaml"))
    assert r.json()["detail"].endswith(f"(available: {', '.join(options)})") and "\n" not in r.json()["detail"]
    r = client.post("/api/training/jobs/start", json={"overrides": ["stage.num_steps=abc"]})
    assert r.status_code == 422 and r.json()["detail"].startswith("config error: stage.num_steps")


def test_target_outside_the_allowlist_is_refused_before_import(client, tmp_path, monkeypatch):
    marker = tmp_path / "imported"
    (tmp_path / "serve_probe_pkg.py").write_text(
        f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\nclass Model: pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for override in (
        "model._target_=serve_probe_pkg.Model",
        "+callbacks.x={_target_: serve_probe_pkg.Model}",
        "optimizer._target_=builtins.open",
    ):
        r = client.post("/api/training/configs", json={"name": "evil", "overrides": [override]})
        assert r.status_code == 422, r.text
        assert "is not allowed over HTTP" in r.json()["detail"]
    assert not marker.exists() and "serve_probe_pkg" not in sys.modules


def test_operator_allows_a_prefix(runs):
    from exp.serve.configs import check_targets, target_allowed

    assert target_allowed("torch.optim.SGD") and target_allowed("exp.model.GPT")
    assert not target_allowed("torch.load") and not target_allowed("exponent.x")
    assert not target_allowed("exp.config.os.makedirs") and not target_allowed("exp.rundir.write_json")
    assert target_allowed("tests.unit.test_extend_model.TinyLM", ("tests.",))
    check_targets({"model": {"_target_": "tests.unit.test_extend_model.TinyLM"}}, ("tests",))
    with pytest.raises(ConfigError, match="cannot be imported"):
        check_targets({"model": {"_target_": "my_pkg.models.LM"}}, ("my_pkg",))


def test_service_owned_keys_are_refused(client):
    owned = ("hydra.run.dir=/tmp/x", "run_dir=/tmp/x", "resume.path=/", "hydra/launcher=exp_slurm", "tracking.run_id=x")
    for override in owned:
        r = client.post("/api/training/jobs/start", json={"overrides": [override]})
        assert r.status_code == 422 and "set by the service" in r.json()["detail"], (override, r.text)
    r = client.post("/api/training/jobs/start", json={"overrides": ["--cfg"]})
    assert r.status_code == 422 and "command-line flags are not accepted" in r.json()["detail"]


def test_cli_run_is_discovered_with_its_record(client, cli_job):
    assert cli_job["status"] == "FINISHED" and cli_job["source"] == "cli"
    assert cli_job["step"] == 6 and cli_job["num_steps"] == 6
    assert "train/loss" in cli_job["metrics"]
    finished = client.get("/api/training/jobs", params={"status": "finished"}).json()
    assert cli_job["job_id"] in [j["job_id"] for j in finished]
    assert client.get("/api/training/jobs", params={"status": "RUNNING"}).json() == []
    logs = client.get(f"/api/training/jobs/{cli_job['job_id']}/logs", params={"tail_bytes": 4000}).json()
    assert "finished: step 6" in logs["text"]


def test_metrics_latest_history_and_throughput(client, cli_job, runs):
    from exp.rundir import read_metrics

    rows = read_metrics(runs / "cli" / "one" / "metrics.jsonl")
    job = cli_job["job_id"]
    latest = client.get(f"/api/training/jobs/{job}/metrics").json()["metrics"]
    assert latest["train/loss"] == {"value": [r for r in rows if "train/loss" in r][-1]["train/loss"], "step": 6}
    page = client.get(
        f"/api/training/jobs/{job}/metrics/history", params={"key": "train/loss", "min_step": 3, "limit": 1}
    ).json()
    assert page["total"] == 2 and page["rows"] == [{"step": 4, "train/loss": rows[2]["train/loss"]}]
    assert page["next_offset"] == 1
    throughput = client.get(f"/api/training/jobs/{job}/throughput").json()
    assert throughput["summary_tokens_per_s"] > 0 and len(throughput["history"]) == 3


def test_checkpoints_listed_and_downloaded_with_checksums(client, cli_job, runs):
    listed = client.get(f"/api/training/jobs/{cli_job['job_id']}/checkpoints").json()
    assert [c["step"] for c in listed] == [2, 4, 6]
    assert sum(c["best"] for c in listed) == 1
    newest = listed[-1]
    r = client.get(f"/api/training/checkpoints/{newest['id']}/download")
    manifest_bytes = (runs / "cli" / "one" / "checkpoints" / "step_00000006" / "manifest.json").read_bytes()
    assert r.headers["x-manifest-sha256"] == hashlib.sha256(manifest_bytes).hexdigest()
    assert r.status_code == 200 and int(r.headers["content-length"]) == len(r.content)
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tar:
        members = {m.name.split("/", 1)[1]: tar.extractfile(m).read() for m in tar.getmembers()}
    manifest = json.loads(members.pop("manifest.json"))
    assert set(members) == set(manifest["files"])
    for name, data in members.items():
        assert hashlib.sha256(data).hexdigest() == manifest["files"][name]["sha256"] == newest["files"][name]["sha256"]
    one = client.get(f"/api/training/checkpoints/{newest['id']}/download", params={"file": "model.safetensors"})
    assert hashlib.sha256(one.content).hexdigest() == one.headers["x-checksum-sha256"]


def test_bad_ids_and_paths_are_4xx(client, cli_job):
    job = cli_job["job_id"]
    assert client.get("/api/training/jobs/nope/status").status_code == 404
    assert client.get("/api/training/jobs/..%2F..%2Fetc/status").status_code in (404, 422)
    assert client.get(f"/api/training/checkpoints/{job}-999/download").status_code == 404
    assert client.get("/api/training/checkpoints/nope-1/download").status_code == 404
    for name in ("../../summary.json", "/etc/passwd", "trainer_state.json/../../.hydra/config.yaml"):
        r = client.get(f"/api/training/checkpoints/{job}-6/download", params={"file": name})
        assert r.status_code == 404, name
    assert client.get("/static/../app.py").status_code == 404
    assert client.post("/api/training/jobs/start", json={"config_id": "nope"}).status_code == 404
    assert client.post("/api/training/jobs/start", json={"overrides": "x", "launcher": "ssh"}).status_code == 422
    assert client.post("/api/training/jobs/start", json={"unknown": 1}).status_code == 422
    broken = client.post("/api/training/jobs/start", content=b"{not", headers={"content-type": "application/json"})
    assert broken.status_code == 422
    assert client.post(f"/api/training/jobs/{job}/resume", json={"step": 5}).status_code == 404


def test_finished_job_refuses_stop_and_save(client, cli_job):
    for action in ("stop", "checkpoint"):
        r = client.post(f"/api/training/jobs/{cli_job['job_id']}/{action}")
        assert r.status_code == 409 and "FINISHED" in r.json()["detail"]


def test_oversized_body_is_refused(client):
    r = client.post("/api/training/configs", json={"name": "big", "overrides": ["x=" + "1" * 100_000]})
    assert r.status_code == 413
    r = client.post("/api/training/configs", json={"name": "many", "overrides": ["seed=1"] * 65})
    assert r.status_code == 422
    # no Content-Length (chunked): counted as it arrives; a small one still reaches the route whole
    big = json.dumps({"name": "big", "overrides": ["x=" + "1" * 900] * 100}).encode()
    headers = {"content-type": "application/json"}
    r = client.post(
        "/api/training/configs", content=(big[i : i + 4096] for i in range(0, len(big), 4096)), headers=headers
    )
    assert r.status_code == 413 and r.json()["detail"] == "request body over 65536 bytes"
    small = json.dumps({"name": "chunked", "overrides": ["seed=3"]}).encode()
    r = client.post(
        "/api/training/configs", content=(small[i : i + 7] for i in range(0, len(small), 7)), headers=headers
    )
    assert r.status_code == 201 and r.json()["overrides"] == ["seed=3"], r.text


def test_token_is_required_everywhere_but_health(runs):
    with TestClient(create_app(Settings(runs_dir=runs, token="s3cret")), base_url=LOCAL) as c:
        assert c.get("/api/health").status_code == 200
        for path in ("/", "/api/training/jobs", "/api/training/configs", "/openapi.json", "/static/app.js"):
            assert c.get(path).status_code == 401, path
            assert c.get(path, headers={"Authorization": "Bearer wrong"}).status_code == 401
            assert c.get(path, headers={"Authorization": "Bearer s3cret"}).status_code == 200, path
        assert c.get("/api/training/jobs", params={"token": "s3cret"}).status_code == 200


def test_dashboard_and_schema_are_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "static/app.js" in page.text and "http" not in page.text.split("<body>")[1]
    assert client.get("/static/app.js").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    for path in (
        "/api/training/configs",
        "/api/training/jobs/start",
        "/api/training/jobs/{job_id}/status",
        "/api/training/jobs/{job_id}/metrics/stream",
        "/api/training/checkpoints/{checkpoint_id}/download",
        "/api/training/sweeps/{sweep_id}/rerun-failed",
    ):
        assert path in paths
    groups = client.get("/api/options").json()["groups"]
    assert "gpt_tiny" in groups["model"] and "cosine" in groups["scheduler"]


def test_merge_overrides_replaces_same_key():
    assert merge_overrides(["a=1", "b=2", "+c=3"], ["b=5", "c=4"]) == ["a=1", "b=5", "c=4"]


def test_import_without_fastapi_says_what_to_install():
    code = "import sys; sys.modules['fastapi'] = None\ntry:\n import exp.serve\nexcept ImportError as e: print(e)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    assert out == "exp.serve needs FastAPI and uvicorn (fastapi is missing): pip install -e '.[serve]'"


def test_other_address_without_token_is_refused():
    proc = subprocess.run(
        [sys.executable, "-m", "exp.serve", "--host", "0.0.0.0", "--port", "1"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)},
    )
    assert proc.returncode == 2 and "set a bearer token" in proc.stderr and len(proc.stderr.splitlines()) == 1


def test_sweep_dirs_are_listed_with_trials(client, runs):
    sweep = runs / "multirun" / "day" / "time"
    for num, status in ((0, "FINISHED"), (1, "PRUNED")):
        run_dir = sweep / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- seed={num}\n")
        summary = {"status": status, "step": 3, "num_steps": 3, "val_loss": 3.0 - num}
        (run_dir / "summary.json").write_text(json.dumps(summary))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    listed = client.get("/api/training/sweeps").json()
    (found,) = [s for s in listed if s["sweep_dir"] == str(sweep)]
    assert found["counts"] == {"FINISHED": 1, "PRUNED": 1}
    view = client.get(f"/api/training/sweeps/{found['sweep_id']}").json()
    assert view["best"] == 0  # the pruned trial is no candidate
    trials = view["trials"]
    assert [(t["num"], t["status"], t["overrides"]) for t in trials] == [
        (0, "FINISHED", ["seed=0"]),
        (1, "PRUNED", ["seed=1"]),
    ]
    assert client.get("/api/training/sweeps/snope").status_code == 404
    assert Path(sweep).is_dir()


@pytest.mark.parametrize(
    "overrides, search, message",
    [
        (["seed=1"], {}, "config error: an Optuna search needs a search space: KEY=interval(a, b)"),
        (["stage.learning_rat=interval(1e-4, 1e-2)"], {}, "config error: Could not override 'stage.learning_rat'."),
        (["stage.learning_rate=interval(1e-4, 1e-2)"], {"sampler": "grid"}, "config error: sampler grid needs choices"),
        (["stage.warmup_steps=int(interval(9, 12))"], {}, "config error: stage.warmup_steps=9 must be in [0, stage"),
    ],
)
def test_bad_optuna_search_is_refused_before_launch(client, runs, overrides, search, message):
    """The search is refused with the CLI's line (a point of its space is composed and validated) and nothing
    is written under the runs directory's sweeps."""
    before = sorted((runs / "multirun").rglob("*")) if (runs / "multirun").exists() else []
    r = client.post("/api/training/sweeps/start", json={"overrides": [*TINY, *overrides], "search": search})
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(message), r.json()["detail"]
    assert (sorted((runs / "multirun").rglob("*")) if (runs / "multirun").exists() else []) == before
    bad = client.post("/api/training/sweeps/start", json={"overrides": TINY, "search": {"n_trials": 0}})
    assert bad.status_code == 422


def test_mlflow_run_created_ahead_of_a_job(tmp_path, caplog):
    """The run the service creates before launching a job: SCHEDULED in the store the job will write to (its
    relative path taken from the job's working directory), closed by end_run_ahead only while still SCHEDULED;
    none for tracking=none, and none (one warning) when the store is unreachable."""
    from mlflow.tracking import MlflowClient

    from exp.serve import configs
    from exp.tracking.parent import create_run_ahead, end_run_ahead

    run_dir = tmp_path / "runs" / "serve" / "j1"
    cfg, _ = configs.compose(["stage.num_steps=5"], run_dir)
    uri, run_id = create_run_ahead(cfg, run_dir, base=tmp_path)
    assert uri == f"sqlite:///{tmp_path / 'runs' / 'mlflow.db'}"
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "SCHEDULED" and run.data.tags["run_dir"] == str(run_dir)
    assert (
        client.get_experiment(run.info.experiment_id).artifact_location == (tmp_path / "runs" / "mlartifacts").as_uri()
    )
    end_run_ahead(uri, run_id, "KILLED")
    assert client.get_run(run_id).info.status == "KILLED"
    client.update_run(run_id, status="RUNNING")  # a tracker took it: the service leaves it alone
    end_run_ahead(uri, run_id, "FAILED")
    assert client.get_run(run_id).info.status == "RUNNING"

    cfg, _ = configs.compose(["tracking=none"], run_dir)
    assert create_run_ahead(cfg, run_dir, base=tmp_path) is None
    # the discard port: refused at once (the store is the operator's, so it comes as the service's own override)
    cfg, _ = configs.compose([], run_dir, service_overrides=("tracking.uri=http://127.0.0.1:9",))
    with caplog.at_level("WARNING", logger="exp"):
        assert create_run_ahead(cfg, run_dir, base=tmp_path) is None
    assert "MLflow at http://127.0.0.1:9 is unavailable" in caplog.text and "the job opens its own run" in caplog.text


@pytest.mark.parametrize(
    "override",
    [
        "optimizer._target_=choice(torch.optim.AdamW, builtins.eval)",
        "optimizer._target_=torch.optim.AdamW,builtins.eval",
        "+callbacks.x._target_=choice(exp.faults.EarlyStopping, os.system)",
    ],
)
def test_every_choice_of_a_search_is_checked_against_the_allowlist(client, runs, override):
    """A value the sampler may draw later (not only the first) that names code outside the allowlist is refused
    before anything launches."""
    r = client.post("/api/training/sweeps/start", json={"overrides": [*TINY, override], "search": {}})
    assert r.status_code == 422, r.text
    assert "is not allowed over HTTP" in r.json()["detail"], r.json()["detail"]
    assert ("builtins.eval" in r.json()["detail"]) or ("os.system" in r.json()["detail"])


def test_a_job_the_service_started_checks_its_own_targets(tmp_path):
    """Defence in depth: a job launched with the service's allowlist in its environment refuses a _target_ outside
    it in validation (exit 2, one line), before importing it, whatever put it into the job's config."""
    marker = tmp_path / "imported"
    (tmp_path / "spy.py").write_text(f"open({str(marker)!r}, 'w').close()\nclass Spy: pass\n")
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": f"{ROOT}:{tmp_path}",
        "EXP_TARGET_ALLOWLIST": "exp,torch.optim",
    }
    cmd = [sys.executable, str(ROOT / "train.py"), *TINY, "+callbacks.spy._target_=spy.Spy"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines() == [
        "config error: callbacks.spy._target_='spy.Spy' is not allowed in a job the service started: 'spy.Spy' is "
        "outside the allowed packages (allowed: exp's own targets, torch.optim)"
    ]
    assert not marker.exists()


@pytest.mark.parametrize(
    "hardware, slurm, needle",
    [
        ("hardware=slurm_cpu", {"tasks_per_node": 2}, "config error: slurm: nodes x tasks_per_node = 2 processes"),
        ("hardware=slurm_ddp", {"tasks_per_node": 1}, "config error: hardware.distributed=ddp needs several"),
    ],
)
def test_slurm_task_count_must_fit_the_distributed_strategy(client, runs, hardware, slurm, needle):
    """Refused before anything is submitted (no sbatch is called: this machine's SLURM is not needed here)."""
    overrides = [o.replace("hardware=cpu", hardware) for o in TINY]
    r = client.post("/api/training/jobs/start", json={"overrides": overrides, "launcher": "slurm", "slurm": slurm})
    assert r.status_code == 422 and r.json()["detail"].startswith(needle), r.text
    assert not [j for j in client.get("/api/training/jobs").json() if j["launcher"] == "slurm"]


def test_cross_origin_resume_is_refused_and_launches_nothing(client, cli_job, runs):
    """Another site's page posting a form (text/plain: no CORS preflight) to resume a finished run is refused before
    the route runs, and so is a text/plain body from anywhere: no job is launched."""
    job = cli_job["job_id"]
    logs = runs / ".serve" / "logs"
    before = sorted(logs.iterdir()) if logs.exists() else []
    r = client.post(
        f"/api/training/jobs/{job}/resume",
        content=b"{}",
        headers={"Origin": "http://evil.example", "Content-Type": "text/plain"},
    )
    assert r.status_code == 403 and "evil.example" in r.json()["detail"], r.text
    r = client.post(f"/api/training/jobs/{job}/resume", headers={"Origin": "http://evil.example"})  # a form, no fields
    assert r.status_code == 403, r.text
    r = client.post(f"/api/training/jobs/{job}/resume", content=b"{}", headers={"Content-Type": "text/plain"})
    assert r.status_code == 415, r.text
    after = client.get(f"/api/training/jobs/{job}/status").json()
    assert after["source"] == "cli" and after["pid"] is None and after["status"] == "FINISHED"
    assert (sorted(logs.iterdir()) if logs.exists() else []) == before
    assert client.get("/api/training/jobs", headers={"Host": "evil.example"}).status_code == 421


def test_evaluate_now_scores_the_newest_checkpoint_beside_the_run(client, cli_job, runs):
    job_id = cli_job["job_id"]
    url = f"/api/training/jobs/{job_id}"
    assert client.get(f"{url}/evaluations").json() == {"job_id": job_id, "steps": [], "running": False}
    for body, status, said in [
        ({"tasks": ["no_such_task"]}, 422, "unknown task 'no_such_task'"),
        ({"tasks": ["../../etc/passwd"]}, 422, "pattern"),  # a task is a name, never a path
        ({"tasks": ["exp_stdlib_ppl"], "limit": -1}, 422, "greater than 0"),
    ]:
        r = client.post(f"{url}/evaluate", json=body)
        assert r.status_code == status and said in r.text, r.text
    r = client.post(f"{url}/evaluate", json={"tasks": ["exp_stdlib_ppl"], "limit": 3})
    assert r.status_code == 202 and r.json()["tasks"] == ["exp_stdlib_ppl"], r.text
    again = client.post(f"{url}/evaluate", json={"tasks": ["exp_stdlib_ppl"]})
    assert again.status_code == 409 and "being evaluated already" in again.text
    deadline = time.time() + 180
    while client.get(f"{url}/evaluations").json()["running"]:
        assert time.time() < deadline, (runs / ".serve" / "logs" / f"{job_id}-evaluate.log").read_text()[-2000:]
        time.sleep(0.5)
    (scored,) = client.get(f"{url}/evaluations").json()["steps"]
    assert scored["step"] == 6 and scored["tasks"]["exp_stdlib_ppl"]["bits_per_byte"] > 0
    assert client.get(f"{url}/status").json()["status"] == "FINISHED"  # the run's record is as it was


def test_planted_links_in_a_runs_eval_folder_are_not_read(client, cli_job, runs, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text(json.dumps({"results": {"stolen": {"acc,none": 0.123456}}}))
    folder = Path(cli_job["run_dir"]) / "eval"
    folder.mkdir(exist_ok=True)
    link = folder / "step_00000099.json"
    link.symlink_to(secret)
    try:
        answer = client.get(f"/api/training/jobs/{cli_job['job_id']}/evaluations")
        assert answer.status_code == 200 and "stolen" not in answer.text and "0.123456" not in answer.text
        assert 99 not in [s["step"] for s in answer.json()["steps"]]
    finally:
        link.unlink()
