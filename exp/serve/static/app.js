// The dashboard: plain JavaScript over the job service's API (no build step, nothing fetched from elsewhere).
"use strict";

// With a token set, the session cookie that `/?token=` set carries it: no token in any address here.
const TERMINAL = ["FINISHED", "FAILED", "KILLED"];
let selected = null;      // the job shown below the table
let stream = null;        // its EventSource
let points = { train: [], val: [] };

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}) };
  if (options.body !== undefined) headers["Content-Type"] = "application/json";  // the service takes JSON only
  const response = await fetch(path, { ...options, headers });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail || body);
    throw new Error(`${response.status}: ${detail}`);
  }
  return body;
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null) continue;
    if (k === "class") node.className = v; else if (k.startsWith("on")) node.addEventListener(k.slice(2), v); else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(child ?? ""));
  return node;
}

const fmt = (x, digits = 4) => (typeof x === "number" ? x.toFixed(digits) : "");
const fmtEta = (s) => (s == null ? "" : s < 90 ? `${Math.round(s)} s` : `${Math.round(s / 60)} min`);
const fmtBytes = (n) => (n > 1 << 20 ? `${(n / (1 << 20)).toFixed(1)} MiB` : `${(n / 1024).toFixed(0)} KiB`);

// --- start form ----------------------------------------------------------------------------------------

async function loadOptions() {
  const { groups } = await api("/api/options");
  const box = document.getElementById("group-selects");
  for (const [group, options] of Object.entries(groups)) {
    const select = el("select", { id: "group-" + group, "data-group": group }, el("option", { value: "" }, "(default)"));
    for (const option of options) select.append(el("option", { value: option }, option));
    box.append(el("label", {}, group, select));
  }
}

async function startRun(event) {
  event.preventDefault();
  const error = document.getElementById("start-error");
  error.textContent = "";
  const overrides = [];
  for (const select of document.querySelectorAll("#group-selects select")) {
    if (select.value) overrides.push(`${select.dataset.group}=${select.value}`);
  }
  for (const line of document.getElementById("overrides").value.split("\n")) if (line.trim()) overrides.push(line.trim());
  const button = document.getElementById("start-button");
  button.disabled = true;
  try {
    const launcher = document.getElementById("launcher").value;
    const started = await api("/api/training/jobs/start", { method: "POST", body: JSON.stringify({ overrides, launcher }) });
    await refreshJobs();
    selectJob(started.job_id);
  } catch (e) {
    error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

// --- jobs table ----------------------------------------------------------------------------------------

async function refreshJobs() {
  let jobs;
  try {
    jobs = await api("/api/training/jobs");
    document.getElementById("service-state").textContent = `${jobs.length} jobs · updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("service-state").textContent = "service unreachable: " + e.message;
    return;
  }
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...jobs.map((job) => {
    const pct = job.num_steps ? Math.min(100, (100 * job.step) / job.num_steps) : 0;
    const row = el("tr", { class: "job" + (job.job_id === selected ? " selected" : ""), "data-job": job.job_id, onclick: () => selectJob(job.job_id) },
      el("td", {}, el("code", {}, job.job_id)),
      el("td", { class: "status " + job.status }, job.status),
      el("td", {}, el("span", { class: "bar" }, el("span", { style: `width:${pct}%` })), ` ${job.step}/${job.num_steps ?? "?"}`),
      el("td", {}, fmt(job.metrics["train/loss"])),
      el("td", {}, fmt(job.metrics["val/loss"])),
      el("td", {}, fmtEta(job.eta_seconds)),
      el("td", {}, job.launcher + (job.slurm ? ` #${job.slurm.job_id}` : "")));
    return row;
  }));
  if (selected) {
    const job = jobs.find((j) => j.job_id === selected);
    if (job) showStatus(job);
  }
}

// --- one job -------------------------------------------------------------------------------------------

function selectJob(jobId) {
  if (selected === jobId) return;
  selected = jobId;
  points = { train: [], val: [] };
  document.getElementById("job-section").hidden = false;
  document.getElementById("job-id").textContent = jobId;
  document.getElementById("action-result").textContent = "";
  for (const row of document.querySelectorAll("#jobs tbody tr")) row.classList.toggle("selected", row.dataset.job === jobId);
  follow(jobId);
  refreshJob();
}

function follow(jobId) {
  if (stream) stream.close();
  stream = new EventSource(`/api/training/jobs/${jobId}/metrics/stream`);
  stream.addEventListener("metrics", (event) => {
    const row = JSON.parse(event.data);
    if (row["train/loss"] !== undefined) points.train.push([row.step, row["train/loss"]]);
    if (row["val/loss"] !== undefined) points.val.push([row.step, row["val/loss"]]);
    drawChart();
  });
  stream.addEventListener("end", () => { stream.close(); stream = null; refreshJobs(); refreshJob(); });
}

function showStatus(job) {
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = "status " + job.status;
  const running = job.status === "RUNNING";
  document.getElementById("stop-button").disabled = TERMINAL.includes(job.status);
  document.getElementById("save-button").disabled = !running;
  document.getElementById("profile-button").disabled = !running;
  document.getElementById("resume-button").disabled = !TERMINAL.includes(job.status);
  const m = job.metrics || {};
  const perf = [];  // the newest log interval's speed: tokens/s, step time, achieved TFLOP/s and MFU when known
  if (m["perf/tokens_per_s"] != null) perf.push(`${Math.round(m["perf/tokens_per_s"]).toLocaleString()} tok/s`);
  if (m["perf/step_ms"] != null) perf.push(`step ${m["perf/step_ms"].toFixed(1)} ms`);
  if (m["perf/tflops"] != null) perf.push(`${m["perf/tflops"].toPrecision(3)} TFLOP/s per device`);
  if (m["perf/mfu"] != null) perf.push(`MFU ${(100 * m["perf/mfu"]).toFixed(1)}%`);
  document.getElementById("job-perf").textContent = perf.join(" · ");
}

async function refreshJob() {
  if (!selected) return;
  const jobId = selected;
  try {
    const [job, checkpoints, logs, evaluations] = await Promise.all([
      api(`/api/training/jobs/${jobId}/status`),
      api(`/api/training/jobs/${jobId}/checkpoints`),
      api(`/api/training/jobs/${jobId}/logs?tail_bytes=6000`),
      api(`/api/training/jobs/${jobId}/evaluations`),
    ]);
    if (jobId !== selected) return;
    showStatus(job);
    showEvaluations(evaluations, checkpoints.length > 0);
    document.querySelector("#checkpoints tbody").replaceChildren(...checkpoints.map((c) =>
      el("tr", { "data-step": c.step },
        el("td", {}, String(c.step)),
        el("td", {}, fmtBytes(c.size)),
        el("td", {}, c.best ? "best" : ""),
        el("td", {}, el("code", {}, (c.files["model.safetensors"] || {}).sha256?.slice(0, 16) ?? "")),
        el("td", {}, el("a", { href: `/api/training/checkpoints/${c.id}/download`, download: `${c.id}.tar` }, "download"), " ",
          el("button", { class: "small", disabled: TERMINAL.includes(job.status) ? null : "", onclick: () => act("resume", c.step) }, "resume from here")))));
    const log = document.getElementById("log");
    log.textContent = logs.text;
    log.scrollTop = log.scrollHeight;
  } catch (e) {
    document.getElementById("action-result").textContent = e.message;
  }
}

// downstream scores: one row per task and step (eval=lm_eval in the loop, python -m exp.eval, "Evaluate now")
function showEvaluations(evaluations, hasCheckpoint) {
  const rows = [];
  for (const { step, tasks } of evaluations.steps) {
    for (const [task, metrics] of Object.entries(tasks)) {
      const shown = Object.entries(metrics).filter(([name]) => !name.endsWith("_stderr"));
      const num = (v) => (Math.abs(v) >= 1e5 ? v.toExponential(3) : fmt(v));  // perplexities of words run large
      const text = shown.map(([name, value]) => `${name} ${num(value)}` + (metrics[`${name}_stderr`] != null ? ` ± ${num(metrics[`${name}_stderr`])}` : "")).join(" · ");
      rows.push(el("tr", { "data-step": step, "data-task": task }, el("td", {}, String(step)), el("td", {}, task), el("td", {}, text)));
    }
  }
  if (!rows.length) rows.push(el("tr", {}, el("td", { colspan: "3", class: "muted" }, "no downstream evaluation yet")));
  document.querySelector("#evaluations tbody").replaceChildren(...rows);
  document.getElementById("evaluate-button").disabled = evaluations.running || !hasCheckpoint;
  document.getElementById("evaluate-state").textContent = evaluations.running ? "evaluating the newest checkpoint…" : "";
}

async function evaluateNow() {
  const state = document.getElementById("evaluate-state");
  try {
    const answer = await api(`/api/training/jobs/${selected}/evaluate`, { method: "POST", body: "{}" });
    state.textContent = `evaluating ${answer.tasks.join(", ")}…`;
  } catch (e) {
    state.textContent = e.message;
  }
  setTimeout(refreshJob, 700);
}

async function act(what, step) {
  const result = document.getElementById("action-result");
  const body = step === undefined ? {} : { step };
  if (what === "resume") {
    const steps = document.getElementById("resume-steps").value;
    if (steps) Object.assign(body, { overrides: [`stage.num_steps=${steps}`], allow_config_change: true });
  }
  if (what === "profile") body.steps = Number(document.getElementById("profile-steps").value) || 5;
  try {
    await api(`/api/training/jobs/${selected}/${what}`, { method: "POST", body: JSON.stringify(body) });
    result.textContent = { stop: "stop requested", checkpoint: "checkpoint requested", resume: "resumed",
      profile: `profiling the next ${body.steps} steps: RUN_DIR/profile/` }[what];
    if (what === "resume") { points = { train: [], val: [] }; follow(selected); }
  } catch (e) {
    result.textContent = e.message;
  }
  setTimeout(() => { refreshJobs(); refreshJob(); }, 700);
}

function drawChart() {
  const canvas = document.getElementById("loss-chart");
  const ctx = canvas.getContext("2d");
  const { width, height } = canvas;
  const pad = { left: 50, right: 12, top: 10, bottom: 24 };
  ctx.clearRect(0, 0, width, height);
  const all = [...points.train, ...points.val];
  document.getElementById("points").textContent = `${points.train.length} train points, ${points.val.length} val points`;
  if (!all.length) return;
  const xs = all.map((p) => p[0]), ys = all.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-6);
  const X = (x) => pad.left + ((x - x0) / (x1 - x0)) * (width - pad.left - pad.right);
  const Y = (y) => height - pad.bottom - ((y - y0) / (y1 - y0)) * (height - pad.top - pad.bottom);
  ctx.strokeStyle = "#dde1ea"; ctx.fillStyle = "#6b7385"; ctx.font = "11px sans-serif";
  for (let i = 0; i <= 4; i++) {
    const y = y0 + ((y1 - y0) * i) / 4;
    ctx.beginPath(); ctx.moveTo(pad.left, Y(y)); ctx.lineTo(width - pad.right, Y(y)); ctx.stroke();
    ctx.fillText(y.toFixed(2), 4, Y(y) + 4);
  }
  ctx.fillText(`step ${x0}`, pad.left, height - 6);
  ctx.fillText(`${x1}`, width - pad.right - 30, height - 6);
  for (const [series, color] of [[points.train, "#2f6fde"], [points.val, "#d35400"]]) {
    ctx.strokeStyle = color; ctx.fillStyle = color; ctx.lineWidth = 2;
    ctx.beginPath();
    series.forEach(([x, y], i) => (i ? ctx.lineTo(X(x), Y(y)) : ctx.moveTo(X(x), Y(y))));
    ctx.stroke();
    for (const [x, y] of series) { ctx.beginPath(); ctx.arc(X(x), Y(y), 2.5, 0, 7); ctx.fill(); }
  }
}

// --- sweeps --------------------------------------------------------------------------------------------

let selectedSweep = null;
const shortPath = (path) => { const parts = path.split("/"); return parts.length > 4 ? "…/" + parts.slice(-3).join("/") : path; };

async function refreshSweeps() {
  let sweeps;
  try { sweeps = await api("/api/training/sweeps"); } catch (e) { return; }
  const relaunch = (event, s, mode) => {
    event.stopPropagation();
    api(`/api/training/sweeps/${s.sweep_id}/${mode}`, { method: "POST" }).then(refreshSweeps);
  };
  document.querySelector("#sweeps tbody").replaceChildren(...sweeps.map((s) =>
    el("tr", { class: "job" + (s.sweep_id === selectedSweep ? " selected" : ""), "data-sweep": s.sweep_id, onclick: () => selectSweep(s.sweep_id) },
      el("td", { title: s.sweep_dir }, el("code", {}, shortPath(s.sweep_dir))),
      el("td", {}, Object.entries(s.counts).map(([k, v]) => `${k} ${v}`).join(", ")),
      el("td", {},
        el("button", { class: "small", onclick: (e) => relaunch(e, s, "resume") }, "resume"), " ",
        el("button", { class: "small", onclick: (e) => relaunch(e, s, "rerun-failed") }, "rerun failed")))));
  if (selectedSweep) refreshSweep();
}

function selectSweep(sweepId) {
  selectedSweep = sweepId;
  for (const row of document.querySelectorAll("#sweeps tbody tr")) row.classList.toggle("selected", row.dataset.sweep === sweepId);
  refreshSweep();
}

async function refreshSweep() {
  const sweepId = selectedSweep;
  let sweep;
  try { sweep = await api(`/api/training/sweeps/${sweepId}`); } catch (e) { return; }
  if (sweepId !== selectedSweep) return;
  document.getElementById("sweep-detail").hidden = false;
  document.getElementById("sweep-dir").textContent = shortPath(sweep.sweep_dir);
  document.getElementById("sweep-dir").title = sweep.sweep_dir;
  // the point: the overrides that differ between trials (the rest is the same for all)
  const all = sweep.trials.map((t) => t.overrides || []);
  const shared = all.length > 1 ? all[0].filter((o) => all.every((os) => os.includes(o))) : [];
  document.querySelector("#trials tbody").replaceChildren(...sweep.trials.map((t) =>
    el("tr", { "data-trial": t.num, class: t.num === sweep.best ? "best" : null },
      el("td", {}, String(t.num) + (t.num === sweep.best ? " ★" : "")),
      el("td", { class: "status " + t.status }, t.status),
      el("td", {}, el("code", {}, (t.overrides || []).filter((o) => !shared.includes(o) && !o.startsWith("+callbacks.optuna")).join(" "))),
      el("td", {}, fmt(t.val_loss)),
      el("td", {}, t.step == null ? "" : `${t.step}/${t.num_steps ?? "?"}`),
      el("td", {}, t.slurm_job_id ?? ""),
      el("td", {}, el("code", {}, (t.mlflow_run_id || "").slice(0, 12))))));
}

async function startSweep(event) {
  event.preventDefault();
  const error = document.getElementById("sweep-error");
  error.textContent = "";
  const value = (id) => document.getElementById(id).value;
  const overrides = value("sweep-overrides").split("\n").map((l) => l.trim()).filter(Boolean);
  const body = { overrides, launcher: value("sweep-launcher") };
  if (value("sweep-kind") === "optuna") {
    body.search = { n_trials: Number(value("sweep-trials")), parallelism: Number(value("sweep-parallelism")), sampler: value("sweep-sampler"), pruner: value("sweep-pruner") };
  }
  const button = document.getElementById("sweep-button");
  button.disabled = true;
  try {
    const started = await api("/api/training/sweeps/start", { method: "POST", body: JSON.stringify(body) });
    selectedSweep = started.sweep_id;
    setTimeout(refreshSweeps, 1500);
  } catch (e) {
    error.textContent = e.message;
  } finally {
    button.disabled = false;
  }
}

function showSweepKind() {
  const optuna = document.getElementById("sweep-kind").value === "optuna";
  for (const label of document.querySelectorAll("#sweep-form label.optuna")) label.hidden = !optuna;
}

document.getElementById("sweep-form").addEventListener("submit", startSweep);
document.getElementById("sweep-kind").addEventListener("change", showSweepKind);
showSweepKind();
document.getElementById("start-form").addEventListener("submit", startRun);
document.getElementById("stop-button").addEventListener("click", () => act("stop"));
document.getElementById("save-button").addEventListener("click", () => act("checkpoint"));
document.getElementById("profile-button").addEventListener("click", () => act("profile"));
document.getElementById("resume-button").addEventListener("click", () => act("resume"));
document.getElementById("evaluate-button").addEventListener("click", evaluateNow);
loadOptions().catch((e) => { document.getElementById("start-error").textContent = e.message; });
refreshJobs();
refreshSweeps();
setInterval(refreshJobs, 2000);
setInterval(refreshJob, 3000);
setInterval(refreshSweeps, 5000);
