// The dashboard: plain JavaScript over the job service's API (no build step, nothing fetched from elsewhere).
"use strict";

// With a token set, the session cookie that `/?token=` set carries it: no token in any address here.
const TERMINAL = ["FINISHED", "FAILED", "KILLED"];
let selected = null;      // the job shown below the table
let stream = null;        // its EventSource
let rows = [];            // its metrics.jsonl rows, as the stream delivers them
let jobsCache = [];       // the newest /api/training/jobs answer
let configNames = {};     // saved config id -> name
let sort = { key: "created", dir: -1 };

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
const fmtStarted = (t) => new Date(t * 1000).toLocaleString([], { month: "short", day: "numeric", hour: "2-digit", minute: "2-digit", hourCycle: "h23" });
const fmtDuration = (s) => (s == null ? "" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${Math.round(s / 60)} min` : `${(s / 3600).toFixed(1)} h`);
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
    const body = { overrides, launcher };
    const runName = document.getElementById("run-name").value.trim();
    if (runName) body.run_name = runName;
    const started = await api("/api/training/jobs/start", { method: "POST", body: JSON.stringify(body) });
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
  try {
    jobsCache = await api("/api/training/jobs");
    document.getElementById("service-state").textContent = `${jobsCache.length} jobs · updated ${new Date().toLocaleTimeString()}`;
  } catch (e) {
    document.getElementById("service-state").textContent = "service unreachable: " + e.message;
    return;
  }
  showJobs();
  if (compared.size >= 2 && !compareChart) showCompare();  // one that could not be drawn yet (no metrics then)
  if (selected) {
    const job = jobsCache.find((j) => j.job_id === selected);
    if (job) showStatus(job);
  }
}

function duration(job) {  // since it was started (a resumed job's too), to its end or now
  if (job.ended != null) return Math.max(0, job.ended - job.created);
  return job.status === "RUNNING" ? Date.now() / 1000 - job.created : null;
}

const jobName = (job) => (job.trial != null ? `#${job.trial} ` : "") + (job.run_name || job.job_id);  // a trial: its number in its sweep first
const configLabel = (job) => (job.config_id ? configNames[job.config_id] || job.config_id : "");

function sortValue(job, key) {
  if (key === "loss") return job.metrics["train/loss"];
  if (key === "val_loss") return job.metrics["val/loss"];
  if (key === "duration") return duration(job);
  if (key === "config") return configLabel(job);
  return job[key];
}

function showJobs() {
  const wanted = document.getElementById("jobs-status").value;
  const text = document.getElementById("jobs-filter").value.trim().toLowerCase();
  const sweep = document.getElementById("jobs-sweep").value;  // "": all, "none": not in a sweep, else a sweep's id
  const inSweep = (job) => (!sweep || (sweep === "none" ? !job.sweep_id : job.sweep_id === sweep));
  const shown = jobsCache.filter((job) => (!wanted || job.status === wanted) && inSweep(job) && (!text ||
    [job.run_name, job.job_id, configLabel(job), ...(job.overrides || [])].some((v) => (v || "").toLowerCase().includes(text))));
  shown.sort((a, b) => {
    const x = sortValue(a, sort.key), y = sortValue(b, sort.key);
    if (x == null || y == null) return x == null ? (y == null ? 0 : 1) : -1;  // unknowns last
    return (x < y ? -1 : x > y ? 1 : 0) * sort.dir;
  });
  for (const th of document.querySelectorAll("#jobs th[data-sort]")) {
    const on = th.dataset.sort === sort.key;
    th.classList.toggle("sorted-asc", on && sort.dir > 0);
    th.classList.toggle("sorted-desc", on && sort.dir < 0);
    th.setAttribute("aria-sort", on ? (sort.dir > 0 ? "ascending" : "descending") : "none");
  }
  const body = document.querySelector("#jobs tbody");
  body.replaceChildren(...shown.map((job) => {
    const pct = job.num_steps ? Math.min(100, (100 * job.step) / job.num_steps) : 0;
    return el("tr", { class: "job" + (job.job_id === selected ? " selected" : ""), "data-job": job.job_id, onclick: () => { location.hash = `#/jobs/${job.job_id}`; } },
      el("td", { class: "name" }, el("a", { href: `#/jobs/${job.job_id}`, title: `${jobName(job)} (${job.job_id})` }, jobName(job))),
      el("td", { class: "name", title: configLabel(job) || null }, configLabel(job)),
      el("td", { class: "status " + job.status }, job.status),
      el("td", { title: `step ${job.step} of ${job.num_steps ?? "?"}` }, el("span", { class: "bar" }, el("span", { style: `width:${pct}%` })), ` ${job.step}/${job.num_steps ?? "?"}`),
      el("td", {}, fmt(job.metrics["train/loss"], 3)),
      el("td", {}, fmt(job.metrics["val/loss"], 3)),
      el("td", { title: new Date(job.created * 1000).toISOString() }, fmtStarted(job.created)),
      el("td", {}, fmtDuration(duration(job))),
      el("td", {}, fmtEta(job.eta_seconds)),
      el("td", { class: "name short", title: job.launcher + (job.slurm ? ` #${job.slurm.job_id}` : "") + (job.sweep_id ? `, a trial of sweep ${job.sweep_id}` : "") }, job.launcher + (job.slurm ? ` #${job.slurm.job_id}` : "")),
      el("td", { onclick: (e) => e.stopPropagation() }, el("input", { type: "checkbox", class: "compare", "aria-label": `compare ${job.run_name || job.job_id}`,
        checked: compared.has(job.job_id) ? "" : null, onchange: (e) => toggleCompare(job.job_id, e.target.checked) })));
  }));
}

// --- runs side by side: one metric of the picked jobs overlaid, and where their overrides differ ----------------

const compared = new Set();
let compareChart = null;

function toggleCompare(jobId, on) {
  if (on) compared.add(jobId); else compared.delete(jobId);
  showCompare();
}

async function metricHistory(jobId, key) {
  const out = [];
  for (let offset = 0; offset != null;) {
    const page = await api(`/api/training/jobs/${jobId}/metrics/history?key=${encodeURIComponent(key)}&limit=10000&offset=${offset}`);
    out.push(...page.rows);
    offset = page.next_offset;
  }
  return out;
}

async function showCompare() {
  const section = document.getElementById("compare-section");
  const jobs = jobsCache.filter((j) => compared.has(j.job_id));
  section.hidden = jobs.length < 2;
  if (section.hidden) {
    if (compareChart) compareChart.destroy();
    compareChart = null;
    return;
  }
  document.getElementById("compare-count").textContent = `${jobs.length} jobs`;
  const select = document.getElementById("compare-metric");
  const keys = [...new Set(jobs.flatMap((j) => Object.keys(j.metrics || {})))].sort();
  const current = select.value || "train/loss";
  select.replaceChildren(...keys.map((k) => el("option", { value: k, selected: k === current ? "" : null }, k)));
  const key = select.value || current;
  const names = jobs.map((j) => j.run_name || j.job_id);
  const name = (j) => {  // its run name, and its id's end where two runs share a name
    const n = j.run_name || j.job_id;
    return names.filter((m) => m === n).length > 1 ? `${n} …${j.job_id.slice(-6)}` : n;
  };
  // where the overrides differ: a key set in one job and not another, or set to different values
  const parse = (o) => { const i = o.indexOf("="); return [o.slice(0, i).replace(/^[+~]+/, ""), o.slice(i + 1)]; };
  const maps = jobs.map((j) => new Map((j.overrides || []).filter((o) => o.includes("=")).map(parse)));
  const overrideKeys = [...new Set(maps.flatMap((m) => [...m.keys()]))].sort();
  const differ = overrideKeys.filter((k) => new Set(maps.map((m) => m.get(k) ?? "(default)")).size > 1);
  document.querySelector("#compare-diff thead").replaceChildren(el("tr", {}, el("th", {}, "key"), ...jobs.map((j) => el("th", {}, name(j)))));
  document.querySelector("#compare-diff tbody").replaceChildren(...(differ.length ? differ.map((k) =>
    el("tr", { "data-key": k }, el("td", {}, el("code", {}, k)), ...maps.map((m) => el("td", {}, el("code", {}, m.get(k) ?? "(default)")))))
    : [el("tr", {}, el("td", { colspan: String(jobs.length + 1), class: "muted" }, "the same overrides"))]));
  const curves = await Promise.all(jobs.map((j) => metricHistory(j.job_id, key)));
  const steps = [...new Set(curves.flatMap((rows) => rows.map((r) => r.step)))].sort((a, b) => a - b);
  const data = [steps, ...curves.map((rows) => { const at = new Map(rows.map((r) => [r.step, r[key]])); return steps.map((s) => at.get(s) ?? null); })];
  const box = document.getElementById("compare-chart");
  if (compareChart) compareChart.destroy();
  box.replaceChildren();
  compareChart = new uPlot({
    title: key, width: Math.max(300, box.clientWidth - 8), height: 260, scales: { x: { time: false } },
    axes: [{ label: "step" }, { size: 60 }],
    series: [{ label: "step" }, ...jobs.map((j, i) => ({ label: name(j), stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true }))],
    cursor: { drag: { x: true, y: false } },
  }, data, box);
}
window.expCompare = () => compareChart;

// --- saved configs: list, start, edit as overrides, save (checked as train.py would), delete ------------------

let savedConfigs = [];

async function refreshConfigs() {
  try { savedConfigs = await api("/api/training/configs"); } catch (e) { return; }
  configNames = Object.fromEntries(savedConfigs.map((c) => [c.id, c.name]));
  document.querySelector("#configs tbody").replaceChildren(...savedConfigs.map((c) =>
    el("tr", { "data-config": c.id },
      el("td", {}, c.name),
      el("td", {}, el("code", {}, c.overrides.join(" ") || "(defaults)")),
      el("td", {},
        el("button", { class: "small start-config", onclick: () => startConfig(c.id) }, "start"), " ",
        el("button", { class: "small", onclick: () => editConfig(c) }, "edit"), " ",
        el("button", { class: "small", onclick: () => api(`/api/training/configs/${c.id}`, { method: "DELETE" }).then(refreshConfigs) }, "delete")))));
}

async function startConfig(configId) {
  const error = document.getElementById("config-error");
  error.textContent = "";
  try {
    const started = await api("/api/training/jobs/start", { method: "POST", body: JSON.stringify({ config_id: configId }) });
    await refreshJobs();
    location.hash = `#/jobs/${started.job_id}`;
  } catch (e) {
    error.textContent = e.message;
    document.getElementById("config-edit").open = true;
  }
}

function editConfig(c) {
  document.getElementById("config-edit").open = true;
  document.getElementById("config-name").value = c.name;
  document.getElementById("config-overrides").value = c.overrides.join("\n");
}

async function saveConfig(event) {
  event.preventDefault();
  const error = document.getElementById("config-error");
  error.textContent = "";
  const overrides = document.getElementById("config-overrides").value.split("\n").map((l) => l.trim()).filter(Boolean);
  try {
    await api("/api/training/configs", { method: "POST", body: JSON.stringify({ name: document.getElementById("config-name").value.trim(), overrides }) });
    await refreshConfigs();
  } catch (e) {
    error.textContent = e.message;
  }
}

function sortBy(key) {
  sort = { key, dir: sort.key === key ? -sort.dir : key === "created" ? -1 : 1 };
  showJobs();
}

// --- one job -------------------------------------------------------------------------------------------

function selectJob(jobId) {
  if (selected === jobId) return;
  selected = jobId;
  rows = [];
  for (const chart of Object.values(charts)) chart.destroy();
  charts = {};
  document.getElementById("charts").replaceChildren();
  document.getElementById("job-section").hidden = false;
  document.getElementById("job-id").textContent = jobId;
  document.getElementById("job-link").setAttribute("href", `#/jobs/${jobId}`);
  document.getElementById("job-name").textContent = "";
  document.getElementById("job-config-text").textContent = "";
  document.getElementById("action-result").textContent = "";
  for (const row of document.querySelectorAll("#jobs tbody tr")) row.classList.toggle("selected", row.dataset.job === jobId);
  follow(jobId);
  refreshJob();
  loadConfig(jobId);
}

async function loadConfig(jobId) {
  try {
    const answer = await api(`/api/training/jobs/${jobId}/config`);
    if (jobId !== selected) return;
    document.getElementById("job-overrides").textContent = answer.overrides.join(" ") || "(none)";
    document.getElementById("job-config-text").textContent = answer.config ?? "(not written yet)";
    if (answer.config == null) setTimeout(() => jobId === selected && loadConfig(jobId), 3000);
  } catch (e) {
    document.getElementById("job-config-text").textContent = e.message;
  }
}

function follow(jobId) {
  if (stream) stream.close();
  stream = new EventSource(`/api/training/jobs/${jobId}/metrics/stream`);
  stream.addEventListener("metrics", (event) => {
    rows.push(JSON.parse(event.data));
    scheduleCharts();
  });
  stream.addEventListener("end", () => { stream.close(); stream = null; refreshJobs(); refreshJob(); });
}

function showStatus(job) {
  document.getElementById("job-name").textContent = job.run_name || "Job";
  const mlflow = document.getElementById("job-mlflow");
  const link = job.mlflow_url && /^https?:\/\//.test(job.mlflow_url) ? el("a", { href: job.mlflow_url, target: "_blank", rel: "noopener" }, job.mlflow_run_id) : null;
  if (link) mlflow.replaceChildren(link); else mlflow.textContent = job.mlflow_run_id || "(none)";
  const status = document.getElementById("job-status");
  status.textContent = job.status;
  status.className = "status " + job.status;
  const running = job.status === "RUNNING";
  document.getElementById("stop-button").disabled = TERMINAL.includes(job.status);
  document.getElementById("save-button").disabled = !running;
  document.getElementById("profile-button").disabled = !running;
  const resume = document.getElementById("resume-button");  // a sweep's trial resumes with its sweep
  resume.disabled = !TERMINAL.includes(job.status) || !!job.sweep_id;
  resume.title = job.sweep_id ? `a trial of sweep ${job.sweep_id}: resume the sweep` : "";
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
    if (what === "resume") { rows = []; scheduleCharts(); follow(selected); }
  } catch (e) {
    result.textContent = e.message;
  }
  setTimeout(() => { refreshJobs(); refreshJob(); }, 700);
}

// --- charts: every metric the run logs, grouped, drawn with the vendored uPlot -------------------------------

let charts = {};          // chart name -> its uPlot
let zoomed = {};          // chart name -> true while the user's zoom holds
let chartsPending = false;
window.expCharts = () => charts;  // for the browser tests

const GROUPS = ["loss", "optimisation", "throughput", "eval", "data", "other"];
const COLORS = ["#2f6fde", "#d35400", "#1b7f3b", "#7d3c98", "#b9770e", "#17a2b8", "#c0392b", "#5d6d7e"];

function groupOf(key) {
  if (/(^|\/)(lr|grad_norm|clip)/.test(key) || key.startsWith("optim")) return "optimisation";
  if (key.startsWith("perf/")) return "throughput";
  if (key.startsWith("eval/")) return "eval";
  if (key.startsWith("data/") || key.startsWith("progress/")) return "data";
  if (key.startsWith("train/") || key.startsWith("val/")) return "loss";
  return "other";
}

// one chart per metric, but train/loss with val/loss (and each source's val loss) in the chart "loss"
const chartOf = (key) => (key === "train/loss" || key.startsWith("val/loss") ? "loss" : key);

function scheduleCharts() {
  if (chartsPending) return;
  chartsPending = true;
  setTimeout(() => { chartsPending = false; drawCharts(); }, 250);
}

function xValues(kind) {
  // step; tokens (progress/tokens_seen, carried to the eval rows of the same step); training time: the sum of
  // perf/step_ms over the steps each log interval covers (evaluation excluded)
  const byStep = new Map();
  let tokens = 0, seconds = 0, last = 0;
  for (const row of rows) {
    if (row["perf/step_ms"] != null) { seconds += (row["perf/step_ms"] * (row.step - last)) / 1000; last = row.step; }
    if (row["progress/tokens_seen"] != null) tokens = row["progress/tokens_seen"];
    byStep.set(row.step, { tokens, seconds });
  }
  return rows.map((row) => (kind === "tokens" ? byStep.get(row.step).tokens : kind === "time" ? byStep.get(row.step).seconds : row.step));
}

function smooth(values, alpha) {
  if (!alpha) return values;
  let s = null;
  return values.map((v) => (v == null ? null : (s = s == null ? v : alpha * s + (1 - alpha) * v)));
}

function drawCharts() {
  const box = document.getElementById("charts");
  const trainPoints = rows.filter((r) => r["train/loss"] != null).length, valPoints = rows.filter((r) => r["val/loss"] != null).length;
  document.getElementById("points").textContent = `${trainPoints} train points, ${valPoints} val points`;
  const kind = document.getElementById("chart-x").value;
  const log = document.getElementById("chart-log").checked;
  const alpha = Number(document.getElementById("chart-smooth").value);
  const xs = xValues(kind);
  const series = {};  // chart -> keys
  for (const row of rows) for (const [k, v] of Object.entries(row)) {
    if (k === "step" || typeof v !== "number") continue;
    const name = chartOf(k);
    (series[name] ||= new Set()).add(k);
  }
  for (const [name, keySet] of Object.entries(series)) {
    const keys = [...keySet].sort((a, b) => (a === "train/loss" ? -1 : b === "train/loss" ? 1 : a.localeCompare(b)));
    // one x per step that has any of the keys (a step's train and eval rows merged); a key's missing values are
    // gaps the line spans
    const at = new Map();
    rows.forEach((row, i) => {
      if (!keys.some((k) => row[k] != null)) return;
      const point = at.get(xs[i]) || {};
      for (const k of keys) if (row[k] != null) point[k] = row[k];
      at.set(xs[i], point);
    });
    const xsOf = [...at.keys()].sort((a, b) => a - b);
    const data = [xsOf, ...keys.map((k) => {
      const ys = xsOf.map((x) => at.get(x)[k] ?? null);
      return smooth(log ? ys.map((y) => (y != null && y > 0 ? y : null)) : ys, k.startsWith("val/") || k.startsWith("eval/") ? 0 : alpha);
    })];
    let chart = charts[name];
    const shape = `${keys.join(",")}|${log}|${kind}`;
    if (chart && chart.shape !== shape) { chart.destroy(); delete charts[name]; chart = null; delete zoomed[name]; }
    if (!chart) {
      const group = groupOf(keys[0]);
      let section = box.querySelector(`[data-group="${group}"]`);
      if (!section) {
        section = el("div", { "data-group": group }, el("h3", {}, group), el("div", { class: "chart-group" }));
        const after = [...box.children].find((c) => GROUPS.indexOf(c.dataset.group) > GROUPS.indexOf(group));
        box.insertBefore(section, after || null);
      }
      let holder = section.querySelector(`[data-chart="${CSS.escape(name)}"]`);
      if (!holder) { holder = el("div", { class: "chart", "data-chart": name, role: "img", "aria-label": `chart of ${keys.join(", ")}` }); section.lastChild.append(holder); }
      holder.replaceChildren();
      const width = Math.max(300, holder.clientWidth - 8 || 420);
      chart = new uPlot({
        title: name, width, height: 200,
        scales: { x: { time: false }, y: log ? { distr: 3, log: 10 } : {} },
        axes: [{ label: kind === "time" ? "training time (s)" : kind, size: 40 }, { size: 60 }],
        series: [{ label: kind }, ...keys.map((k, i) => ({ label: k, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
          points: { show: k.startsWith("val/") || k.startsWith("eval/") } }))],
        cursor: { drag: { x: true, y: false } },
        hooks: { setSelect: [(u) => { if (u.select.width > 2) zoomed[name] = true; }] },
      }, data, holder);
      chart.over.addEventListener("dblclick", () => { delete zoomed[name]; });
      chart.shape = shape;
      charts[name] = chart;
    } else {
      chart.setData(data, !zoomed[name]);
    }
  }
}

window.addEventListener("resize", () => {
  for (const chart of Object.values(charts)) chart.setSize({ width: Math.max(300, chart.root.parentNode.clientWidth - 8), height: 200 });
});

function resetZoom() {
  zoomed = {};
  drawCharts();
  for (const chart of Object.values(charts)) chart.setData(chart.data, true);
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
    el("tr", { class: "job" + (s.sweep_id === selectedSweep ? " selected" : ""), "data-sweep": s.sweep_id, onclick: () => { location.hash = `#/sweeps/${s.sweep_id}`; } },
      el("td", { title: s.sweep_dir }, el("code", {}, shortPath(s.sweep_dir))),
      el("td", {}, Object.entries(s.counts).map(([k, v]) => `${k} ${v}`).join(", ")),
      el("td", {},
        el("button", { class: "small", onclick: (e) => relaunch(e, s, "resume") }, "resume"), " ",
        el("button", { class: "small", onclick: (e) => relaunch(e, s, "rerun-failed") }, "rerun failed")))));
  const choice = document.getElementById("jobs-sweep");
  const keep = choice.value;
  choice.replaceChildren(el("option", { value: "" }, "all"), el("option", { value: "none" }, "not in a sweep"),
    ...sweeps.map((s) => el("option", { value: s.sweep_id, title: s.sweep_dir }, shortPath(s.sweep_dir))));
  choice.value = [...choice.options].some((o) => o.value === keep) ? keep : "";
  if (choice.value !== keep) showJobs();
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
  sweepPictures(sweep, shared);
}

// --- sweeps as pictures: parallel coordinates, val loss against each parameter, the trials' curves --------------

let sweepCharts = [];
window.expSweepCharts = () => sweepCharts;

function sweepParams(sweep, shared) {
  // the parameters: the override keys whose values differ between trials; numeric where every value is a number
  const points = sweep.trials.map((t) => Object.fromEntries((t.overrides || []).filter((o) => o.includes("=") && !shared.includes(o) &&
    !o.startsWith("+callbacks.optuna")).map((o) => { const i = o.indexOf("="); return [o.slice(0, i).replace(/^[+~]+/, ""), o.slice(i + 1)]; })));
  const keys = [...new Set(points.flatMap((p) => Object.keys(p)))].sort();
  return keys.map((key) => {
    const values = points.map((p) => p[key]);
    const numeric = values.every((v) => v == null || Number.isFinite(Number(v)));
    const levels = numeric ? null : [...new Set(values.filter((v) => v != null))].sort();
    return { key, numeric, levels, of: (i) => (values[i] == null ? null : numeric ? Number(values[i]) : levels.indexOf(values[i])) };
  });
}

let sweepDrawn = "";

function sweepPictures(sweep, shared) {
  const state = JSON.stringify([sweep.sweep_dir, sweep.trials.map((t) => [t.status, t.val_loss, t.step])]);
  if (state === sweepDrawn) return;  // redrawn when a trial moved, not at every poll
  sweepDrawn = state;
  for (const chart of sweepCharts) chart.destroy();
  sweepCharts = [];
  const params = sweepParams(sweep, shared);
  const finished = sweep.trials.map((t, i) => [t, i]).filter(([t]) => t.status === "FINISHED" && t.val_loss != null);
  parallelCoordinates(params, finished);
  const scatter = document.getElementById("sweep-scatter");
  scatter.replaceChildren();
  for (const param of params) {
    const pts = finished.map(([t, i]) => [param.of(i), t.val_loss]).filter(([x]) => x != null).sort((a, b) => a[0] - b[0]);
    const holder = el("div", { class: "chart", "data-param": param.key });
    scatter.append(holder);
    sweepCharts.push(new uPlot({
      title: param.key, width: Math.max(300, holder.clientWidth - 8), height: 180,
      scales: { x: { time: false, distr: param.numeric && pts.every(([x]) => x > 0) && pts.length > 1 && pts.at(-1)[0] / pts[0][0] >= 100 ? 3 : 1 } },
      axes: [{ values: param.numeric ? undefined : (u, ticks) => ticks.map((v) => param.levels[v] ?? "") }, { size: 50 }],
      series: [{ label: param.key }, { label: "val loss", stroke: "#2f6fde", paths: () => null, points: { show: true, size: 7, fill: "#2f6fde" } }],
    }, [pts.map((p) => p[0]), pts.map((p) => p[1])], holder));
  }
  trialCurves(sweep);
  studyPictures(sweep);
}

// Parallel coordinates drawn as SVG by hand: uPlot (the charting library vendored here) has no such plot, and the
// page's one is a few dozen lines: an axis per parameter and one for val loss, a polyline per finished trial.

// add(tag, attrs, text): an SVG element appended to svg, with its attributes and text
function svgAdder(svg) {
  return (tag, attrs, text) => {
    const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text != null) node.textContent = text;
    svg.append(node);
    return node;
  };
}

function parallelCoordinates(params, finished) {
  const box = document.getElementById("sweep-parallel");
  const NS = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(NS, "svg");
  const W = 900, H = 260, pad = { x: 70, top: 24, bottom: 30 };
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const axes = [...params.map((p) => ({ label: p.key, p })), { label: "val loss", loss: true }];
  const values = (axis) => finished.map(([t, i]) => (axis.loss ? t.val_loss : axis.p.of(i)));
  const X = (k) => pad.x + (axes.length === 1 ? 0 : (k * (W - 2 * pad.x)) / (axes.length - 1));
  const scales = axes.map((axis) => {
    const vs = values(axis).filter((v) => v != null);
    const lo = Math.min(...vs), hi = Math.max(...vs);
    return (v) => H - pad.bottom - (hi > lo ? ((v - lo) / (hi - lo)) * (H - pad.top - pad.bottom) : (H - pad.top - pad.bottom) / 2);
  });
  const add = svgAdder(svg);
  const losses = finished.map(([t]) => t.val_loss);
  const best = Math.min(...losses), worst = Math.max(...losses);
  for (const [t, i] of finished) {
    const shade = worst > best ? (t.val_loss - best) / (worst - best) : 0;  // 0: the best
    const pts = axes.map((axis, k) => { const v = axis.loss ? t.val_loss : axis.p.of(i); return v == null ? null : `${X(k)},${scales[k](v)}`; });
    add("polyline", { points: pts.filter(Boolean).join(" "), stroke: `hsl(220, 70%, ${25 + 45 * shade}%)`, "data-trial": t.num },
    ).append(Object.assign(document.createElementNS(NS, "title"), { textContent: `trial ${t.num}: val loss ${fmt(t.val_loss)}` }));
  }
  axes.forEach((axis, k) => {
    add("line", { x1: X(k), x2: X(k), y1: pad.top, y2: H - pad.bottom, class: "axis" });
    add("text", { x: X(k), y: 14, "text-anchor": "middle" }, axis.label);
    const vs = values(axis).filter((v) => v != null);
    if (!vs.length) return;
    const label = (v) => (axis.p && !axis.p.numeric ? axis.p.levels[v] : Number(v.toPrecision(3)));
    add("text", { x: X(k) + 4, y: scales[k](Math.max(...vs)) + 4 }, label(Math.max(...vs)));
    add("text", { x: X(k) + 4, y: scales[k](Math.min(...vs)) + 4 }, label(Math.min(...vs)));
  });
  box.replaceChildren(svg);
}

async function trialCurves(sweep) {
  const box = document.getElementById("sweep-curves");
  let answer;
  try { answer = await api(`/api/training/sweeps/${sweep.sweep_id}/curves?key=train/loss`); } catch (e) { return; }
  const trials = answer.trials.filter((t) => t.points.length);
  box.replaceChildren();
  if (!trials.length) { box.append(el("p", { class: "muted" }, "no curves: none of the trials has logged train/loss yet")); return; }
  const steps = [...new Set(trials.flatMap((t) => t.points.map((p) => p[0])))].sort((a, b) => a - b);
  const data = [steps, ...trials.map((t) => { const at = new Map(t.points); return steps.map((s) => at.get(s) ?? null); })];
  sweepCharts.push(new uPlot({
    title: "train/loss", width: Math.max(300, box.clientWidth - 8), height: 240, scales: { x: { time: false } },
    series: [{ label: "step" }, ...trials.map((t, i) => ({ label: `#${t.num}`, spanGaps: true, width: 1.5,
      stroke: t.status === "PRUNED" ? "rgba(125, 60, 152, 0.3)" : COLORS[i % COLORS.length] }))],
  }, data, box));
}

// --- an Optuna sweep's study: each parameter's importance, the Pareto front of a multi-objective one -------------

let paretoChart = null;
window.expPareto = () => paretoChart;

async function studyPictures(sweep) {
  const box = document.getElementById("sweep-study");
  let answer, front;
  try {
    [answer, front] = await Promise.all(["importances", "pareto"].map((what) => api(`/api/training/sweeps/${sweep.sweep_id}/${what}`)));
  } catch (e) {  // a grid has no study (404): nothing to show; anything else, its line
    box.hidden = e.message.startsWith("404");
    document.getElementById("sweep-importances").replaceChildren(el("p", { class: "muted" }, e.message));
    document.getElementById("sweep-pareto-box").hidden = true;
    return;
  }
  if (sweep.sweep_id !== selectedSweep) return;
  box.hidden = false;
  importanceBars(answer);
  paretoFront(front);
}

// Horizontal bars drawn as SVG by hand (uPlot draws no bar chart): a row per parameter, most important first, one
// group per objective.
function importanceBars(answer) {
  const box = document.getElementById("sweep-importances");
  if (!answer.objectives.length) { box.replaceChildren(el("p", { class: "muted" }, answer.message || "no importances")); return; }
  const NS = "http://www.w3.org/2000/svg";
  box.replaceChildren(...answer.objectives.map((objective) => {
    const entries = Object.entries(objective.importances).sort((a, b) => b[1] - a[1]);
    const row = 22, W = 900, label = 220, H = row * entries.length + 26;
    const svg = document.createElementNS(NS, "svg");
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.setAttribute("data-objective", objective.name);
    const add = svgAdder(svg);
    add("text", { x: 4, y: 14, class: "title" }, `${objective.name} (${objective.direction})`);
    entries.forEach(([param, value], k) => {
      const y = 22 + k * row;
      add("text", { x: label - 8, y: y + 14, "text-anchor": "end" }, param);
      add("rect", { x: label, y: y + 3, width: Math.max(1, value * (W - label - 60)), height: row - 6, class: "importance", "data-param": param })
        .append(Object.assign(document.createElementNS(NS, "title"), { textContent: `${param}: ${value.toFixed(3)}` }));
      add("text", { x: label + Math.max(1, value * (W - label - 60)) + 6, y: y + 14 }, value.toFixed(3));
    });
    svg.style.height = `${H}px`;
    return svg;
  }), ...(answer.message ? [el("p", { class: "muted" }, answer.message)] : []));
}

function paretoFront(front) {
  const box = document.getElementById("sweep-pareto-box");
  box.hidden = !front.multi_objective;
  if (paretoChart) paretoChart.destroy();
  paretoChart = null;
  if (!front.multi_objective) return;
  const holder = document.getElementById("sweep-pareto");
  holder.replaceChildren();
  if (!front.trials.length) { holder.append(el("p", { class: "muted" }, front.message || "no finished trial yet")); return; }
  const trials = [...front.trials].sort((a, b) => a.values[0] - b.values[0] || a.values[1] - b.values[1]);
  const [xName, yName] = front.objectives;
  paretoChart = new uPlot({
    title: `${yName} against ${xName}`, width: Math.max(300, holder.clientWidth - 8), height: 260, scales: { x: { time: false } },
    axes: [{ label: `${xName} (${front.directions[0]})` }, { label: `${yName} (${front.directions[1]})`, size: 60 }],
    series: [{ label: xName },
      { label: "trial", stroke: "#9aa3b5", paths: () => null, points: { show: true, size: 7, fill: "#9aa3b5" } },
      { label: "Pareto front", stroke: "#d35400", width: 1.5, spanGaps: true, points: { show: true, size: 10, fill: "#d35400" } }],
  }, [trials.map((t) => t.values[0]), trials.map((t) => (t.front ? null : t.values[1])), trials.map((t) => (t.front ? t.values[1] : null))], holder);
  paretoChart.trials = trials.map((t) => t.num);
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
for (const th of document.querySelectorAll("#jobs th[data-sort]")) th.querySelector("button").addEventListener("click", () => sortBy(th.dataset.sort));
document.getElementById("jobs-status").addEventListener("change", showJobs);
document.getElementById("jobs-filter").addEventListener("input", showJobs);
document.getElementById("jobs-sweep").addEventListener("change", showJobs);
for (const id of ["chart-x", "chart-log", "chart-smooth"]) document.getElementById(id).addEventListener("input", drawCharts);
document.getElementById("chart-reset").addEventListener("click", resetZoom);

// each job and sweep has its address: #/jobs/ID, #/sweeps/ID (shared, reloaded, the browser's back button)
function route() {
  const [, kind, id] = location.hash.match(/^#\/(jobs|sweeps)\/([A-Za-z0-9_-]+)$/) || [];
  if (kind === "jobs") selectJob(id);
  if (kind === "sweeps") selectSweep(id);
}
window.addEventListener("hashchange", route);
route();
refreshConfigs();
document.getElementById("config-form").addEventListener("submit", saveConfig);
document.getElementById("compare-metric").addEventListener("change", showCompare);
loadOptions().catch((e) => { document.getElementById("start-error").textContent = e.message; });
refreshJobs();
refreshSweeps();
setInterval(refreshJobs, 2000);
setInterval(refreshJob, 3000);
setInterval(refreshSweeps, 5000);
