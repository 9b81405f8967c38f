"""The dashboard in a real browser: headless Chromium (Debian's package), driven over the DevTools protocol on a
pipe, starts a short run from the form, watches its loss curve grow, presses Stop and sees the job KILLED with a
checkpoint. Screenshots go to $EXP_TEST_ARTIFACTS (else the test's tmp dir)."""

import base64
import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from .test_serve_e2e import JOB, Service  # noqa: E402
from .test_serve_study import PARAMS, write_optuna_sweep  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(shutil.which("chromium") is None, reason="no chromium on PATH (apt-get install chromium)"),
]


class Browser:
    """Chromium with --remote-debugging-pipe: DevTools commands as NUL-terminated JSON on fds 3 (in) and 4 (out)."""

    def __init__(self, width: int = 1280, height: int = 960):
        to_chrome_r, self._to_chrome = os.pipe()
        self._from_chrome, from_chrome_w = os.pipe()

        def pipes():  # runs in the child before exec: the pipe ends become its fds 3 and 4
            os.dup2(to_chrome_r, 3)
            os.dup2(from_chrome_w, 4)

        self.proc = subprocess.Popen(
            [
                "chromium",
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--remote-debugging-pipe",
                f"--window-size={width},{height}",
                "about:blank",
            ],
            preexec_fn=pipes,
            close_fds=False,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        os.close(to_chrome_r)
        os.close(from_chrome_w)
        self._buffer, self._next_id, self.session = b"", 0, None

    def send(self, method: str, params: dict | None = None, timeout: float = 30) -> dict:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params or {}}
        if self.session and not method.startswith("Target."):
            message["sessionId"] = self.session
        os.write(self._to_chrome, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            while b"\0" not in self._buffer:
                chunk = os.read(self._from_chrome, 1 << 20)
                assert chunk, "chromium closed its DevTools pipe"
                self._buffer += chunk
            raw, self._buffer = self._buffer.split(b"\0", 1)
            reply = json.loads(raw)
            if reply.get("id") == self._next_id:
                assert "error" not in reply, reply["error"]
                return reply.get("result", {})
        raise AssertionError(f"no answer to {method}")

    def open(self, url: str) -> None:
        target = self.send("Target.createTarget", {"url": url})["targetId"]
        self.session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]

    def js(self, expression: str):
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True, "awaitPromise": True})
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def wait_for(self, expression: str, what: str, timeout: float = 90):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            value = self.js(expression)
            if value:
                return value
            time.sleep(0.3)
        section = self.js("document.getElementById('job-section').innerText")
        raise AssertionError(f"timed out waiting for {what}: {section[:3000]}")

    def click(self, selector: str) -> None:
        """A real mouse click (press and release) at the middle of the element, scrolled into view first."""
        box = self.js(
            f"(() => {{ const e = document.querySelector({json.dumps(selector)});"
            " e.scrollIntoView({block: 'center'}); const r = e.getBoundingClientRect();"
            " return [r.x + r.width / 2, r.y + r.height / 2]; })()"
        )
        for kind in ("mousePressed", "mouseReleased"):
            self.send(
                "Input.dispatchMouseEvent", {"type": kind, "x": box[0], "y": box[1], "button": "left", "clickCount": 1}
            )

    def press_enter(self) -> None:
        """Enter pressed and released on the focused element, as a keyboard does."""
        for kind in ("keyDown", "keyUp"):
            key = {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13}
            self.send("Input.dispatchKeyEvent", {**key, "text": "\r"} if kind == "keyDown" else key)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=5)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._to_chrome)
        os.close(self._from_chrome)


TOKEN = "browser-test-token"  # the page is opened as /?token=...: its session cookie carries it from there


def open_with_token(browser: Browser, service: Service) -> None:
    """Open the dashboard as an operator does with a token set, and see the address lose it."""
    browser.open(f"{service.url}/?token={TOKEN}")
    browser.wait_for(f"location.href === {json.dumps(service.url + '/')}", "the redirect to the bare address")


def train_points(browser: Browser) -> int:
    text = browser.js("document.getElementById('points').textContent") or ""
    return int(text.split()[0]) if text else 0


def test_dashboard_start_watch_stop(tmp_path, corpus_cache):
    shots = Path(os.environ.get("EXP_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    service = Service(tmp_path / "runs", "--max-body-bytes", "65536", token=TOKEN).start()
    browser = Browser()
    try:
        open_with_token(browser, service)
        browser.wait_for("document.querySelectorAll('#group-selects select').length >= 6", "the group options")
        options = browser.js("[...document.getElementById('group-model').options].map(o => o.value)")
        assert "gpt_tiny" in options
        browser.js("document.getElementById('group-model').value = 'gpt_tiny'")
        lines = [o for o in JOB if not o.startswith(("model=", "stage.eval_every"))]
        lines += ["stage.num_steps=100000", "stage.eval_every_n_steps=20"]
        browser.js(f"document.getElementById('overrides').value = {json.dumps(chr(10).join(lines))}")
        browser.click("#start-button")
        job_id = browser.wait_for(
            "!document.getElementById('job-section').hidden && document.getElementById('job-id').textContent",
            "the new job to be shown",
        )
        assert browser.js("document.getElementById('start-error').textContent") == ""
        browser.wait_for("document.getElementById('job-status').textContent === 'RUNNING'", "RUNNING")
        browser.wait_for("parseInt(document.getElementById('points').textContent) >= 3", "3 points on the curve")
        first = train_points(browser)
        browser.wait_for(f"parseInt(document.getElementById('points').textContent) >= {first + 3}", "the curve to grow")
        assert train_points(browser) >= first + 3
        speed = "document.getElementById('job-perf').textContent"
        browser.wait_for(f"{speed}.includes('tok/s') && {speed}.includes('TFLOP/s per device')", "the job's speed")
        browser.screenshot(shots / "dashboard-running.png")

        browser.click("#stop-button")
        browser.wait_for("document.getElementById('job-status').textContent === 'KILLED'", "KILLED", timeout=60)
        status = service.status(job_id)
        assert status["status"] == "KILLED"
        last_row = "document.querySelector('#checkpoints tbody tr:last-child')"
        browser.wait_for(f"{last_row} && {last_row}.dataset.step === '{status['step']}'", "the stop's checkpoint row")
        link = browser.js(f"{last_row}.querySelector('a').getAttribute('href')")
        assert link == f"/api/training/checkpoints/{job_id}-{status['step']}/download"
        assert browser.js(f"fetch({json.dumps(link)}).then(r => r.status)") == 200  # the cookie, no token in it
        row_status = f"document.querySelector('#jobs tr[data-job={job_id}] .status').textContent"
        browser.wait_for(f"{row_status} === 'KILLED'", "KILLED in the jobs table")
        assert browser.js("document.getElementById('points').textContent").split()[3] != "0"  # val points too
        assert browser.js("document.getElementById('resume-button').disabled") is False
        shot = browser.screenshot(shots / "dashboard.png")
        assert shot.stat().st_size > 10_000

        # resume from the first checkpoint row, see it train again, and stop it again
        first_step = int(browser.js("document.querySelector('#checkpoints tbody tr').dataset.step"))
        assert first_step < status["step"]
        browser.click("#checkpoints tbody tr:first-child button")
        browser.wait_for("document.getElementById('job-status').textContent === 'RUNNING'", "RUNNING again")
        resumed = f"resumed from {status['run_dir']}/checkpoints/step_{first_step:08d}"
        service.wait(job_id, lambda s: resumed in service.logs(job_id), timeout=60)
        browser.wait_for("!document.getElementById('stop-button').disabled", "Stop enabled")
        browser.click("#stop-button")
        browser.wait_for("document.getElementById('job-status').textContent === 'KILLED'", "KILLED again", timeout=60)
    finally:
        browser.close()
        service.kill_jobs()
        service.kill()


def test_dashboard_sweep_trials_and_start_form(tmp_path):
    """A sweep's trials (a pruned one among them) in the page, and the sweep form refusing a search without a
    search space with the service's line. Nothing trains here: the sweep directory is written by the test."""
    shots = Path(os.environ.get("EXP_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    sweep = tmp_path / "runs" / "multirun" / "2026-12-01" / "10-00-00"
    for num, (status, loss) in enumerate((("FINISHED", 2.31), ("PRUNED", 2.95), ("FINISHED", 2.12))):
        run_dir = sweep / str(num)
        (run_dir / ".hydra").mkdir(parents=True)
        (run_dir / ".hydra" / "overrides.yaml").write_text(f"- model=gpt_tiny\n- stage.learning_rate=0.00{num + 1}\n")
        summary = {"status": status, "step": 40 if status == "PRUNED" else 100, "num_steps": 100, "val_loss": loss}
        (run_dir / "summary.json").write_text(json.dumps(summary))
        steps = range(10, summary["step"] + 1, 10)
        rows = [json.dumps({"step": s, "train/loss": 5 - s / 50}) + "\n" for s in steps]
        (run_dir / "metrics.jsonl").write_text("".join(rows))
    (sweep / "multirun.yaml").write_text("hydra: {}\n")
    service = Service(tmp_path / "runs", token=TOKEN).start()
    browser = Browser()
    try:
        open_with_token(browser, service)
        row = "document.querySelector('#sweeps tbody tr')"
        browser.wait_for(f"{row} && {row}.textContent.includes('PRUNED 1')", "the sweep with its counts")
        browser.click("#sweeps tbody tr td")
        browser.wait_for("document.querySelectorAll('#trials tbody tr').length === 3", "the trials")
        cells = browser.js(
            "[...document.querySelectorAll('#trials tbody tr')]"
            ".map(r => [...r.cells].slice(0, 5).map(c => c.textContent))"
        )
        assert cells == [
            ["0", "FINISHED", "stage.learning_rate=0.001", "2.3100", "100/100"],
            ["1", "PRUNED", "stage.learning_rate=0.002", "2.9500", "40/100"],
            ["2 ★", "FINISHED", "stage.learning_rate=0.003", "2.1200", "100/100"],  # the best
        ]
        # as pictures: a parallel-coordinates line per finished trial (the pruned one has none), the best darkest;
        # val loss against the learning rate, one point per finished trial
        lines = "[...document.querySelectorAll('#sweep-parallel polyline')]"
        browser.wait_for(f"{lines}.length === 2", "a line per finished trial")
        assert browser.js(f"{lines}.map(l => l.dataset.trial)") == ["0", "2"]
        shades = browser.js(f"{lines}.map(l => l.getAttribute('stroke'))")
        assert shades[1] != shades[0] and "25%" in shades[1]  # trial 2 is the best: the darkest
        axes = browser.js("[...document.querySelectorAll('#sweep-parallel text')].map(t => t.textContent)")
        assert "stage.learning_rate" in axes and "val loss" in axes
        scatter = "window.expSweepCharts()[0]"
        assert browser.js(f"{scatter}.series[0].label") == "stage.learning_rate"
        assert browser.js(f"{scatter}.data") == [[0.001, 0.003], [2.31, 2.12]]
        curves = "window.expSweepCharts().at(-1)"  # each trial's train/loss, the pruned one to its step 40
        browser.wait_for(f"{curves} && {curves}.series.length === 4", "the trials' curves")
        assert browser.js(f"{curves}.series.map(s => s.label)") == ["step", "#0", "#1", "#2"]
        assert browser.js(f"{curves}.data[2].filter(y => y != null).length") == 4
        browser.js("document.getElementById('trials').scrollIntoView()")
        browser.screenshot(shots / "dashboard-sweep-pictures.png")
        browser.js("document.getElementById('sweep-start').open = true")
        browser.js("document.getElementById('sweep-kind').value = 'optuna'")
        browser.js("document.getElementById('sweep-kind').dispatchEvent(new Event('change'))")
        assert browser.js("document.querySelector('#sweep-form label.optuna').hidden") is False
        browser.js("document.getElementById('sweep-overrides').value = 'model=gpt_tiny\\nseed=1'")
        browser.click("#sweep-button")
        error = browser.wait_for("document.getElementById('sweep-error').textContent", "the refusal")
        assert error == (
            "422: config error: an Optuna search needs a search space: KEY=interval(a, b), tag(log, interval(a, b)), "
            "choice(a, b), range(a, b) or a,b"
        )
        assert sorted(p.name for p in (tmp_path / "runs" / "multirun").iterdir()) == ["2026-12-01"]
        browser.screenshot(shots / "dashboard-sweeps.png")
    finally:
        browser.close()
        service.kill()


def test_dashboard_shows_downstream_scores_and_evaluates_now(tmp_path, corpus_cache):
    """A run that evaluated exp_stdlib_ppl in its loop: its scores by step in the job's table; "Evaluate now" scores
    the newest checkpoint again in a process of its own."""
    from ..conftest import TINY, run_train

    shots = Path(os.environ.get("EXP_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    run_dir = tmp_path / "runs" / "cli" / "evaluated"
    overrides = ["eval=lm_eval", "eval.tasks=[exp_stdlib_ppl]", "eval.limit=3", "eval.every_n_steps=2"]
    done = run_train(*TINY, *overrides, f"hydra.run.dir={run_dir}", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    service = Service(tmp_path / "runs", token=TOKEN).start()
    browser = Browser()
    try:
        open_with_token(browser, service)
        browser.wait_for("!!document.querySelector('#jobs tbody tr')", "the run in the jobs table")
        browser.click("#jobs tbody tr td")
        rows = "[...document.querySelectorAll('#evaluations tbody tr')]"
        browser.wait_for(f"{rows}.length === 2 && {rows}[0].dataset.step === '2'", "the scores of steps 2 and 4")
        cells = browser.js(f"{rows}.map(r => [...r.cells].map(c => c.textContent))")
        assert [c[:2] for c in cells] == [["2", "exp_stdlib_ppl"], ["4", "exp_stdlib_ppl"]]
        assert "bits_per_byte" in cells[1][2] and "byte_perplexity" in cells[1][2]
        browser.screenshot(shots / "dashboard-evaluations.png")
        before = (run_dir / "eval" / "step_00000004.json").stat().st_mtime_ns
        browser.click("#evaluate-button")
        browser.wait_for("document.getElementById('evaluate-button').disabled", "the evaluation to start")
        browser.wait_for("!document.getElementById('evaluate-button').disabled", "the evaluation to end", timeout=180)
        assert (run_dir / "eval" / "step_00000004.json").stat().st_mtime_ns > before
        assert "exp_stdlib_ppl" in next((tmp_path / "runs" / ".serve" / "logs").glob("*-evaluate.log")).read_text()
    finally:
        browser.close()
        service.kill()


def test_dashboard_charts_every_metric_zooms_logs_and_has_an_address(tmp_path, corpus_cache):
    """A running job named at its start, opened by its address (/#/jobs/ID): its row shows the name, start and
    duration; its page the overrides and the resolved config, one chart per metric it logs (at least five, in
    groups) that grow as it trains; a drag zooms a chart, the log-scale switch changes the y scale, the x axis goes
    to tokens; every request the page made stayed on the service (uPlot is vendored)."""
    shots = Path(os.environ.get("EXP_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    service = Service(tmp_path / "runs", token=TOKEN).start()
    browser = Browser()
    try:
        lines = [o for o in JOB if not o.startswith("stage.eval_every")]
        body = {"overrides": [*lines, "stage.num_steps=100000", "stage.eval_every_n_steps=10"], "run_name": "probe-1"}
        started = service.client.post("/api/training/jobs/start", json=body)
        assert started.status_code == 201, started.text
        job_id = started.json()["job_id"]
        refused = service.client.post("/api/training/jobs/start", json={**body, "run_name": "../x"})
        assert refused.status_code == 422 and "run_name" in refused.text
        service.wait(job_id, lambda s: s["status"] == "RUNNING" and s["step"] >= 10)

        open_with_token(browser, service)
        browser.js(f"location.hash = '#/jobs/{job_id}'")
        browser.wait_for(f"document.getElementById('job-id').textContent === '{job_id}'", "the job from its address")
        charts = "Object.keys(window.expCharts())"
        names = browser.wait_for(f"{charts}.length >= 5 && {charts}", "five charts")
        assert {"loss", "train/lr", "train/grad_norm", "perf/tokens_per_s"} <= set(names), names
        groups = browser.js("[...document.querySelectorAll('#charts [data-group]')].map(g => g.dataset.group)")
        assert groups[:3] == ["loss", "optimisation", "throughput"], groups
        loss = "window.expCharts()['loss']"
        assert browser.js(f"{loss}.series.map(s => s.label)") == ["step", "train/loss", "val/loss"]
        first = browser.js(f"{loss}.data[0].length")
        browser.wait_for(f"{loss}.data[0].length >= {first + 3}", "the loss chart to grow")

        row = f"document.querySelector('#jobs tr[data-job={job_id}]')"
        browser.wait_for(f"{row} && {row}.cells[0].textContent.startsWith('probe-1')", "the run's name in its row")
        assert browser.js(f"{row}.cells[7].textContent").endswith(("s", "min"))  # its duration so far
        config = "document.getElementById('job-config-text').textContent"
        browser.wait_for(f"{config}.includes('run_name: probe-1')", "the resolved config")
        assert "stage.num_steps=100000" in browser.js("document.getElementById('job-overrides').textContent")

        # zoom: a drag across the middle of the loss chart narrows its x range
        span = f"({loss}.scales.x.max - {loss}.scales.x.min)"
        before = browser.js(span)
        rect = f"{loss}.over.getBoundingClientRect()"
        box = browser.js(f"(() => {{ const r = {rect}; return [r.x, r.y, r.width, r.height]; }})()")
        y = box[1] + box[3] / 2
        for kind, x in (("mousePressed", 0.3), ("mouseMoved", 0.5), ("mouseReleased", 0.6)):
            params = {"type": kind, "x": box[0] + x * box[2], "y": y, "button": "left", "clickCount": 1}
            browser.send("Input.dispatchMouseEvent", params)
        after = browser.wait_for(f"{span} < {before} * 0.6 && {span}", "the zoom")
        assert after < before * 0.6
        browser.screenshot(shots / "dashboard-charts-zoomed.png")

        browser.click("#chart-log")  # log scale: the y scale of every chart becomes logarithmic
        browser.wait_for(f"{loss}.scales.y.distr === 3", "the log scale")
        browser.js("document.getElementById('chart-x').value = 'tokens'")
        browser.js("document.getElementById('chart-x').dispatchEvent(new Event('input'))")
        tokens = browser.wait_for(f"{loss}.series[0].label === 'tokens' && {loss}.data[0]", "tokens on the x axis")
        assert tokens[0] > 0 and tokens == sorted(tokens)
        browser.screenshot(shots / "dashboard-charts.png")

        # the page asked nothing of anyone but the service
        urls = browser.js("performance.getEntriesByType('resource').map(e => e.name)")
        assert urls and all(u.startswith(service.url + "/") for u in urls), urls
        assert any(u.endswith("/static/vendor/uplot/uPlot.iife.min.js") for u in urls)
    finally:
        browser.close()
        service.kill_jobs()
        service.kill()


def test_dashboard_saves_a_config_starts_it_and_overlays_two_jobs(tmp_path, corpus_cache):
    """A config saved from the page (a bad one refused with the service's line, nothing saved) starts a job from its
    row; with a second job, both picked for comparison overlay their loss curves, and the table of their
    differences names the override that differs."""
    shots = Path(os.environ.get("EXP_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    service = Service(tmp_path / "runs", token=TOKEN).start()
    browser = Browser()
    short = [o for o in JOB if not o.startswith("stage.eval_every")] + [
        "stage.num_steps=30",
        "stage.eval_every_n_steps=10",
    ]
    try:
        open_with_token(browser, service)
        browser.wait_for("document.querySelectorAll('#group-selects select').length >= 6", "the page's script")
        browser.js("document.getElementById('config-edit').open = true")
        browser.js("document.getElementById('config-name').value = 'broken'")
        browser.js("document.getElementById('config-overrides').value = 'optimizer=nope'")
        browser.click("#config-save")
        error = browser.wait_for("document.getElementById('config-error').textContent", "the refusal")
        assert error.startswith("422: ") and "optimizer" in error and "\n" not in error
        assert service.client.get("/api/training/configs").json() == []

        browser.js("document.getElementById('config-name').value = 'tiny lr 1e-3'")
        overrides = json.dumps("\n".join([*short, "stage.learning_rate=1e-3"]))
        browser.js(f"document.getElementById('config-overrides').value = {overrides}")
        browser.click("#config-save")
        browser.wait_for("document.querySelectorAll('#configs tbody tr').length === 1", "the saved config's row")
        assert browser.js("document.getElementById('config-error').textContent") == ""
        browser.click("#configs tbody tr .start-config")
        first = browser.wait_for("(location.hash.match(/^#\\/jobs\\/(\\w+)$/) || [])[1]", "the started job's page")
        assert service.status(first)["config_id"] == service.client.get("/api/training/configs").json()[0]["id"]
        config_cell = f"document.querySelector('#jobs tr[data-job={first}]')?.cells[1].textContent"
        browser.wait_for(f"{config_cell} === 'tiny lr 1e-3'", "the config's name in the job's row")

        second = service.start_job([*short, "stage.learning_rate=3e-3"])
        for job_id in (first, second):
            service.wait(job_id, lambda s: s["status"] == "FINISHED", timeout=180)
        for job_id in (first, second):
            browser.wait_for(f"!!document.querySelector('#jobs tr[data-job={job_id}] input.compare')", "the rows")
            browser.click(f"#jobs tr[data-job={job_id}] input.compare")
        browser.wait_for("!document.getElementById('compare-section').hidden", "the comparison")
        chart = "window.expCompare()"
        browser.wait_for(f"{chart} && {chart}.series.length === 3", "two curves in one chart")
        curves = browser.js(f"{chart}.data.slice(1).map(ys => ys.filter(y => y != null).length)")
        assert curves == [6, 6], curves  # 30 steps logged every 5 (JOB), each job's own
        assert browser.js(f"{chart}.data[1]") != browser.js(f"{chart}.data[2]")
        differ = browser.js("[...document.querySelectorAll('#compare-diff tbody tr')].map(r => r.dataset.key)")
        assert differ == ["stage.learning_rate"], differ
        browser.screenshot(shots / "dashboard-compare.png")
    finally:
        browser.close()
        service.kill_jobs()
        service.kill()


def test_dashboard_sweep_filter_study_pictures_keyboard_and_width(tmp_path):
    """At 1280x800: the jobs table fits the window (a long run name ends in an ellipsis, whole in its title), the
    sweep filter shows one sweep's trials (or the jobs outside sweeps), a sort header sorts from the keyboard, every
    control has a name; a multi-objective Optuna sweep's page has a bar per parameter for each objective and its
    Pareto front with the study's best trials; a single-objective one has no front. Nothing trains: the sweeps and
    their real Optuna studies are written by the test."""
    shots = Path(os.environ.get("EXP_TEST_ARTIFACTS") or tmp_path)
    shots.mkdir(parents=True, exist_ok=True)
    runs = (tmp_path / "runs").resolve()
    write_optuna_sweep(runs / "multirun" / "2026-12-01" / "lr-search", 12)
    multi = write_optuna_sweep(runs / "multirun" / "2026-12-02" / "loss-vs-speed", 20, multi=True)
    long_name = "gpt_tiny-pretrain-with-a-run-name-far-longer-than-its-column-would-show"
    run_dir = runs / "cli" / "long"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / ".hydra" / "config.yaml").write_text(f"run_name: {long_name}\nstage: {{num_steps: 100}}\n")
    (run_dir / "summary.json").write_text(json.dumps({"status": "FINISHED", "step": 100, "num_steps": 100}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"step": 100, "train/loss": 3.25, "val/loss": 3.5}) + "\n")
    service = Service(runs, token=TOKEN).start()
    browser = Browser(1280, 800)
    try:
        sweeps = {Path(s["sweep_dir"]).name: s["sweep_id"] for s in service.client.get("/api/training/sweeps").json()}
        trials = service.client.get("/api/training/jobs", params={"sweep": sweeps["loss-vs-speed"]}).json()
        assert len(trials) == 20
        open_with_token(browser, service)
        assert browser.js("window.innerWidth") == 1280
        rows = "[...document.querySelectorAll('#jobs tbody tr')]"
        browser.wait_for(f"{rows}.length === 33", "every job and trial in the table")
        choices = "[...document.getElementById('jobs-sweep').options].map(o => o.value)"
        browser.wait_for(f"{choices}.length === 4", "the sweeps in the filter")
        assert sorted(browser.js(choices)) == sorted(["", "none", *sweeps.values()])

        # one sweep's trials, then the jobs outside sweeps, combined with the status filter
        def pick(value: str) -> None:
            browser.js(f"document.getElementById('jobs-sweep').value = {json.dumps(value)}")
            browser.js("document.getElementById('jobs-sweep').dispatchEvent(new Event('change'))")

        pick(sweeps["loss-vs-speed"])
        shown = browser.js(f"{rows}.map(r => r.dataset.job)")
        assert sorted(shown) == sorted(t["job_id"] for t in trials)
        names = browser.js(f"{rows}.map(r => r.cells[0].textContent)")
        assert sorted(names) == sorted(f"#{n} gpt_tiny-pretrain" for n in range(20))  # each trial by its number
        browser.js("document.getElementById('jobs-section').scrollIntoView()")
        browser.screenshot(shots / "dashboard-jobs-by-sweep.png")
        pick("none")
        assert browser.js(f"{rows}.map(r => r.cells[0].textContent)") == [long_name]
        browser.js("document.getElementById('jobs-status').value = 'RUNNING'")
        browser.js("document.getElementById('jobs-status').dispatchEvent(new Event('change'))")
        assert browser.js(f"{rows}.length") == 0
        browser.js("document.getElementById('jobs-status').value = ''")
        pick("")
        assert browser.js(f"{rows}.length") == 33

        # the table fits the window; the long name is cut with an ellipsis and whole in its title
        assert browser.js("document.documentElement.scrollWidth") <= 1280
        width = "[document.getElementById('jobs').scrollWidth, document.getElementById('jobs-section').clientWidth]"
        table, section = browser.js(width)
        assert table <= section, (table, section)
        [alone] = service.client.get("/api/training/jobs", params={"sweep": "none"}).json()
        link = f"document.querySelector('#jobs a[href=\"#/jobs/{alone['job_id']}\"]')"
        assert browser.js(f"{link}.title").startswith(long_name)
        assert browser.js(f"{link}.scrollWidth > {link}.clientWidth")  # cut: an ellipsis shows where
        assert browser.js(f"getComputedStyle({link}).textOverflow") == "ellipsis"

        # sort from the keyboard: focus the "loss" header's button, Enter sorts ascending, Enter again descending
        pick(sweeps["loss-vs-speed"])
        button = "document.querySelector('#jobs th[data-sort=loss] button')"
        browser.js(f"{button}.focus()")
        assert browser.js(f"document.activeElement === {button}")
        losses = f"{rows}.map(r => parseFloat(r.cells[4].textContent))"
        browser.press_enter()
        assert browser.js("document.querySelector('#jobs th[data-sort=loss]').getAttribute('aria-sort')") == "ascending"
        ascending = browser.js(losses)
        assert ascending == sorted(ascending) and len(set(ascending)) > 1
        browser.press_enter()
        assert (
            browser.js("document.querySelector('#jobs th[data-sort=loss]').getAttribute('aria-sort')") == "descending"
        )
        assert browser.js(losses) == sorted(ascending, reverse=True)
        assert browser.js("document.querySelector('#jobs th[data-sort=created]').getAttribute('aria-sort')") == "none"
        # every row is reached by a link (Tab), every control has a name
        assert browser.js(f"{rows}.every(r => r.querySelector('a[href^=\"#/jobs/\"]'))")
        unnamed = browser.js(
            "[...document.querySelectorAll('button, select, input, textarea')].filter(e => !(e.labels?.length ||"
            " e.getAttribute('aria-label') || e.textContent.trim())).map(e => e.outerHTML.slice(0, 80))"
        )
        assert unnamed == []

        # the multi-objective sweep's page: a bar per parameter for each objective, and its Pareto front
        browser.js(f"location.hash = '#/sweeps/{sweeps['loss-vs-speed']}'")
        charts = "[...document.querySelectorAll('#sweep-importances svg')]"
        browser.wait_for(f"{charts}.length === 2", "importances for both objectives")
        assert browser.js(f"{charts}.map(s => s.dataset.objective)") == ["val/loss", "perf/step_ms"]
        bars = browser.js(f"{charts}.map(s => [...s.querySelectorAll('rect.importance')].map(r => r.dataset.param))")
        assert [sorted(b) for b in bars] == [sorted(PARAMS)] * 2
        assert bars[0][0] == "stage.learning_rate" and bars[1][0] == "model.n_layer"  # the longest bar first
        widths = browser.js(f"[...{charts}[0].querySelectorAll('rect')].map(r => r.getBoundingClientRect().width)")
        assert widths[0] > 10 * widths[1] > 0  # drawn to scale: 0.99 against 0.004
        front = "window.expPareto()"
        browser.wait_for(f"{front} && {front}.data[0].length === 20", "the Pareto front")
        on_front = browser.js(f"{front}.trials.filter((n, i) => {front}.data[2][i] != null)")
        assert sorted(on_front) == sorted(t.number for t in multi.best_trials) and len(on_front) > 1
        assert browser.js(f"{front}.data[1].filter(y => y != null).length") == 20 - len(on_front)
        assert browser.js(f"{front}.series.map(s => s.label)") == ["val/loss", "trial", "Pareto front"]
        browser.js("document.getElementById('sweep-study').scrollIntoView()")
        browser.screenshot(shots / "dashboard-sweep-study.png")
        section = "document.getElementById('sweeps-section')"  # its 20 trials' table fits: no sideways scroll
        assert browser.js(f"{section}.scrollWidth <= {section}.clientWidth"), browser.js(f"{section}.scrollWidth")

        # a single-objective sweep: its importances, no front
        browser.js(f"location.hash = '#/sweeps/{sweeps['lr-search']}'")
        browser.wait_for(
            f"{charts}.length === 1 && {charts}[0].dataset.objective === 'val/loss' && !window.expPareto()",
            "the single objective's importances",
        )
        assert browser.js("document.getElementById('sweep-pareto-box').hidden") is True
    finally:
        browser.close()
        service.kill()
