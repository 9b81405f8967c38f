"""The job service's trust boundary over real HTTP (`python -m exp.serve` with a token, on a free loopback port):
Host names (DNS rebinding), cross-site and non-JSON state-changing requests, the session cookie `/?token=` sets,
no /docs, and run directories with symlinks planted in them that must never serve their targets. Nothing trains:
the runs are written by the test."""

import hashlib
import json
import os
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from exp.serve import Settings, create_app  # noqa: E402
from exp.serve.guard import Refused, open_inside  # noqa: E402

from .test_serve_e2e import Service  # noqa: E402

TOKEN = "t0ken-for-tests"
SECRET = b"TOPSECRET-outside-the-run-dir"


def write(path: Path, data: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if isinstance(data, bytes) else data.encode())
    return path


def manifest(**files: bytes) -> str:
    entries = {n: {"size": len(d), "sha256": hashlib.sha256(d).hexdigest()} for n, d in files.items()}
    return json.dumps({"format_version": 1, "step": 0, "files": entries})


def cli_run(run_dir: Path) -> Path:
    """What a finished CLI run leaves that the service reads (no training)."""
    write(run_dir / ".hydra" / "config.yaml", "stage:\n  num_steps: 8\n")
    write(run_dir / ".hydra" / "overrides.yaml", "[]\n")
    write(run_dir / "summary.json", json.dumps({"status": "FINISHED", "step": 8, "num_steps": 8}))
    return run_dir


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A runs directory with two runs whose files and folders are symlinks to files outside it."""
    base = tmp_path_factory.mktemp("guard")
    outside = base / "outside"
    secret = write(outside / "secret.txt", SECRET)
    write(outside / "secret.jsonl", json.dumps({"step": 1, "train/loss": 1.0, "leak": SECRET.decode()}) + "\n")
    write(outside / "ckpt" / "manifest.json", manifest(**{"model.safetensors": SECRET}))
    write(outside / "ckpt" / "model.safetensors", SECRET)
    write(outside / "dcp" / "shard", SECRET)
    write(outside / "ckpts" / "step_00000002" / "manifest.json", manifest(**{"model.safetensors": SECRET}))
    write(outside / "ckpts" / "step_00000002" / "model.safetensors", SECRET)

    links = cli_run(base / "runs" / "cli" / "links")
    (links / "train.log").symlink_to(secret)
    (links / "metrics.jsonl").symlink_to(outside / "secret.jsonl")
    ckpts = links / "checkpoints"
    # step 2: a real folder whose manifest lists a symlinked file beside a real one
    write(ckpts / "step_00000002" / "manifest.json", manifest(**{"model.safetensors": SECRET, "config.yaml": b"ok"}))
    write(ckpts / "step_00000002" / "config.yaml", b"ok")
    (ckpts / "step_00000002" / "model.safetensors").symlink_to(secret)
    (ckpts / "step_00000004").symlink_to(outside / "ckpt")  # the checkpoint folder itself
    write(ckpts / "step_00000006" / "model.safetensors", b"x")
    (ckpts / "step_00000006" / "manifest.json").symlink_to(outside / "ckpt" / "manifest.json")
    write(ckpts / "step_00000008" / "manifest.json", manifest(**{"dcp/shard": SECRET}))
    (ckpts / "step_00000008" / "dcp").symlink_to(outside / "dcp")  # a folder on the way to a listed file

    linked_root = cli_run(base / "runs" / "cli" / "linked_root")
    (linked_root / "checkpoints").symlink_to(outside / "ckpts")

    write(outside / "secret.yaml", b"run_name: " + SECRET + b"\nstage:\n  num_steps: 8\n")
    linked_config = cli_run(base / "runs" / "cli" / "linked_config")
    (linked_config / ".hydra" / "config.yaml").unlink()
    (linked_config / ".hydra" / "config.yaml").symlink_to(outside / "secret.yaml")  # the resolved config
    return base / "runs"


@pytest.fixture(scope="module")
def service(planted):
    svc = Service(planted, "--allowed-host", "dash.example", token=TOKEN).start()
    yield svc
    svc.kill()


@pytest.fixture(scope="module")
def jobs(service, planted):
    listed = service.client.get("/api/training/jobs").json()
    return {Path(j["run_dir"]).name: j["job_id"] for j in listed}


def bare(service: Service, **kwargs) -> httpx.Client:
    """A client without the bearer token."""
    return httpx.Client(base_url=service.url, timeout=30, **kwargs)


def origin(service: Service) -> str:
    return f"http://127.0.0.1:{service.port}"


# --- Host ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("host", ["evil.example", "evil.example:8000", "127.0.0.1.evil.example", "[::2]:80"])
def test_a_foreign_host_header_is_refused(service, host):
    for path in ("/api/health", "/", "/api/training/jobs"):
        r = service.client.get(path, headers={"Host": host})
        assert r.status_code == 421, (path, r.text)
        assert host in r.json()["detail"] and "\n" not in r.json()["detail"]


@pytest.mark.parametrize("host", ["localhost", "LOCALHOST:1234", "127.0.0.1", "[::1]:8000", "dash.example:80"])
def test_loopback_names_and_allowed_hosts_are_served(service, host):
    assert service.client.get("/api/training/jobs", headers={"Host": host}).status_code == 200


# --- state-changing requests --------------------------------------------------------------------------------


def test_cross_site_posts_are_refused(service):
    before = service.client.get("/api/training/configs").json()
    body = {"name": "csrf", "overrides": ["seed=1"]}
    for headers in (
        {"Origin": "http://evil.example"},
        {"Origin": "null"},
        {"Origin": f"http://localhost:{service.port}"},  # another name for this host is another origin
        {"Origin": f"http://127.0.0.1:{service.port + 1}"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},  # a page on another port of this host
    ):
        r = service.client.post("/api/training/configs", json=body, headers=headers)
        assert r.status_code == 403, (headers, r.text)
        assert "\n" not in r.json()["detail"]
    # a form post from another site, as a browser sends it: text/plain, the session cookie along
    with bare(service) as c:
        assert c.get("/", params={"token": TOKEN}).status_code == 303  # the client keeps the cookie
        assert c.get("/api/training/configs").status_code == 200
        r = c.post(
            "/api/training/configs",
            content=json.dumps(body),
            headers={"Content-Type": "text/plain", "Origin": "http://evil.example", "Sec-Fetch-Site": "cross-site"},
        )
        assert r.status_code == 403, r.text
    assert service.client.get("/api/training/configs").json() == before


def test_a_body_that_is_not_json_is_refused(service):
    before = service.client.get("/api/training/configs").json()
    payload = json.dumps({"name": "plain", "overrides": ["seed=1"]})
    for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
        r = service.client.post("/api/training/configs", content=payload, headers={"Content-Type": content_type})
        assert r.status_code == 415 and r.json()["detail"].startswith("request body must be application/json"), r.text
    assert service.client.get("/api/training/configs").json() == before


def test_same_origin_json_posts_still_work(service, jobs):
    headers = {"Origin": origin(service), "Sec-Fetch-Site": "same-origin"}
    r = service.client.post("/api/training/configs", json={"name": "ok", "overrides": ["seed=1"]}, headers=headers)
    assert r.status_code == 201, r.text
    assert service.client.delete(f"/api/training/configs/{r.json()['id']}", headers=headers).status_code == 200
    # bodiless, as the dashboard's sweep buttons send them: the route answers (the run has ended)
    r = service.client.post(f"/api/training/jobs/{jobs['links']}/stop", headers=headers)
    assert r.status_code == 409 and "FINISHED" in r.json()["detail"]


# --- the session cookie ---------------------------------------------------------------------------------------


def test_token_in_the_url_sets_a_session_cookie(service, jobs):
    with bare(service) as c:
        r = c.get("/", params={"token": TOKEN, "x": "1"})
        assert r.status_code == 303 and r.headers["location"] == "/?x=1"
        (set_cookie,) = r.headers.get_list("set-cookie")
        name, value = set_cookie.split(";")[0].split("=", 1)
        attributes = {a.strip().lower() for a in set_cookie.split(";")[1:]}
        assert name == f"exp_session_{service.port}" and value and TOKEN not in set_cookie
        assert {"httponly", "samesite=strict", "path=/"} <= attributes and "secure" not in attributes

    routes = [
        "/",
        "/static/app.js",
        "/static/style.css",
        "/api/training/jobs",
        f"/api/training/jobs/{jobs['links']}/metrics/stream",
        f"/api/training/checkpoints/{jobs['links']}-2/download?file=config.yaml",
    ]
    with bare(service, cookies={name: value}) as c:
        for path in routes:
            assert c.get(path).status_code == 200, path
    for cookies in ({}, {name: "0" * len(value)}, {name: TOKEN}, {"exp_session_1": value}):
        with bare(service, cookies=cookies) as c:
            for path in routes:
                assert c.get(path).status_code == 401, (cookies, path)
    with bare(service) as c:
        r = c.get("/", params={"token": "wrong"})
        assert r.status_code == 401 and "set-cookie" not in r.headers


def test_session_cookie_is_secure_over_https(planted):
    with TestClient(create_app(Settings(runs_dir=planted, token=TOKEN)), base_url="https://127.0.0.1") as c:
        r = c.get("/", params={"token": TOKEN}, follow_redirects=False)
        assert r.status_code == 303 and "secure" in r.headers["set-cookie"].lower()
        assert c.get("/static/app.js").status_code == 200  # the cookie the client kept


def test_the_bound_address_and_allowed_names_are_served():
    from exp.serve.__main__ import served_hosts

    assert served_hosts("10.0.0.5", []) == ("10.0.0.5",)
    assert served_hosts("0.0.0.0", ["gpu-box"]) == ("gpu-box",)  # a wildcard names no host a client uses


def test_docs_are_not_served_offline(service):
    assert service.client.get("/docs").status_code == 404
    assert service.client.get("/redoc").status_code == 404
    assert "/api/training/jobs" in service.client.get("/openapi.json").json()["paths"]


# --- files ----------------------------------------------------------------------------------------------------


def test_symlinks_in_run_directories_are_never_followed(service, jobs):
    links, linked_root = jobs["links"], jobs["linked_root"]
    refused = [
        f"/api/training/jobs/{links}/logs",
        f"/api/training/checkpoints/{links}-2/download",  # lists a symlinked file
        f"/api/training/checkpoints/{links}-2/download?file=model.safetensors",
        f"/api/training/checkpoints/{links}-4/download",  # the folder is a symlink
        f"/api/training/checkpoints/{links}-4/download?file=model.safetensors",
        f"/api/training/checkpoints/{links}-6/download",  # its manifest is a symlink
        f"/api/training/checkpoints/{links}-8/download",  # a listed file in a symlinked folder
        f"/api/training/checkpoints/{links}-8/download?file=dcp/shard",
        f"/api/training/checkpoints/{linked_root}-2/download",  # checkpoints/ is a symlink
    ]
    for path in refused:
        r = service.client.get(path)
        assert r.status_code == 404, (path, r.status_code)
        assert SECRET not in r.content and "\n" not in r.json()["detail"], path
    answered = [
        "/api/training/jobs",
        f"/api/training/jobs/{links}/status",
        f"/api/training/jobs/{links}/metrics",
        f"/api/training/jobs/{links}/metrics/history",
        f"/api/training/jobs/{links}/metrics/stream",
        f"/api/training/jobs/{links}/throughput",
        f"/api/training/jobs/{links}/checkpoints",
        f"/api/training/jobs/{linked_root}/checkpoints",
    ]
    for path in answered:
        r = service.client.get(path)
        assert r.status_code == 200 and SECRET not in r.content, path
    linked_config = jobs["linked_config"]  # its resolved config (the job page shows it) and its run name
    shown = service.client.get(f"/api/training/jobs/{linked_config}/config")
    assert shown.status_code == 200 and shown.json()["config"] is None and SECRET not in shown.content
    status = service.client.get(f"/api/training/jobs/{linked_config}/status")
    assert status.json()["run_name"] is None and SECRET not in status.content
    assert service.client.get(f"/api/training/jobs/{links}/config").json()["config"] == "stage:\n  num_steps: 8\n"
    listed = service.client.get(f"/api/training/jobs/{links}/checkpoints").json()
    assert [c["step"] for c in listed] == [2, 8]  # the symlinked folder and manifest are not offered
    assert service.client.get(f"/api/training/jobs/{linked_root}/checkpoints").json() == []
    one = service.client.get(f"/api/training/checkpoints/{links}-2/download", params={"file": "config.yaml"})
    assert one.content == b"ok" and one.headers["x-checksum-sha256"] == hashlib.sha256(b"ok").hexdigest()


def test_open_inside_refuses_every_way_out(tmp_path):
    root = tmp_path / "run"
    write(root / "a" / "f.txt", "inside")
    write(tmp_path / "outside.txt", "outside")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")
    (root / "dir_link").symlink_to(root / "a")  # even one that points inside
    os.mkfifo(root / "fifo")
    assert open_inside(root, "a/f.txt").read() == b"inside"
    for relative in ("link.txt", "dir_link/f.txt", "../outside.txt", "a/../../outside.txt", "/etc/passwd", "fifo", "a"):
        with pytest.raises(Refused):
            open_inside(root, relative)
    with pytest.raises(FileNotFoundError):
        open_inside(root, "a/missing.txt")
