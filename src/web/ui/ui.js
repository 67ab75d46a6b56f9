// strata web UI: the overview (/) and the job page (/job/{id}).
//
// No framework and nothing fetched from elsewhere: this file, ui.css and the
// two pages are embedded in the JobManager's binary. Each page polls the
// JSON endpoints once a second and redraws; the job graph's layout and the
// throughput chart are drawn here as SVG.
"use strict";

const POLL_MS = 1000;
const $ = (selector) => document.querySelector(selector);

// ---- formatting -------------------------------------------------------

const fmt = (n) => Math.round(Number(n) || 0).toLocaleString("en-US");
const esc = (s) => String(s ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", "\"": "&quot;", "'": "&#39;" }[c]));

function bytes(n) {
  n = Number(n) || 0;
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 1 : 0)) + " " + units[i];
}

function duration(ms) {
  const s = Math.floor((Number(ms) || 0) / 1000);
  if (s < 60) return ((Number(ms) || 0) / 1000).toFixed(1) + " s";
  if (s < 3600) return `${Math.floor(s / 60)} min ${s % 60} s`;
  return `${Math.floor(s / 3600)} h ${Math.floor((s % 3600) / 60)} min`;
}

const percent = (part, whole) => (whole > 0 ? (100 * part) / whole : 0);

// A usage bar with its numbers; amber over 70 %, red over 90 %.
function bar(used, total, label) {
  const p = Math.min(100, percent(used, total));
  const level = p > 90 ? "high" : p > 70 ? "warn" : "";
  return `<span class="bar ${level}"><span style="width:${p.toFixed(1)}%"></span></span>` +
    `<span class="mono">${esc(label)}</span>`;
}

const permille = (m) => bar(m, 1000, (m / 10).toFixed(0) + " %");

function stateBadge(state) {
  const s = String(state ?? "").toUpperCase();
  return `<span class="state ${esc(s)}">${esc(s)}</span>`;
}

function card(label, value, sub) {
  return `<div class="card"><div class="label">${esc(label)}</div>` +
    `<div class="value">${value}</div><div class="sub">${sub ?? ""}</div></div>`;
}

async function getJSON(path) {
  const response = await fetch(path, { cache: "no-store" });
  const text = await response.text();
  if (!response.ok) {
    let message = text;
    try { message = JSON.parse(text).error ?? text; } catch (_) { /* plain text */ }
    const error = new Error(`${path}: ${response.status} ${message}`);
    error.status = response.status;
    throw error;
  }
  return JSON.parse(text);
}

function setStatus(text, isError) {
  const status = $("#status");
  status.textContent = text;
  status.className = isError ? "error" : "muted";
}

function checkpointLine(job) {
  if (!job.checkpointing) return "off";
  const c = job.checkpoints || { history: [] };
  const last = c.history.filter((h) => h.status === "Completed").pop();
  return `${c.completed} done, ${c.failed} failed` +
    (last ? ` (chk-${last.id}: ${bytes(last.size_bytes)}, ${last.duration_ms} ms)` : "");
}

// ---- the overview ----------------------------------------------------------

function taskManagerRow(tm) {
  const slots = tm.slots || [];
  const used = (tm.allocated || []).filter((a) => a !== null).length;
  const gpuSlots = slots.filter((s) => s.profile.gpu).length;
  const managedBudget = slots.reduce((a, s) => a + s.profile.managed_memory_bytes, 0);
  const gpuBudget = slots.reduce((a, s) => a + (s.profile.gpu ? s.profile.gpu[1] : 0), 0);
  const u = tm.usage;
  const managed = u
    ? bar(u.managed_used_bytes.reduce((a, b) => a + b, 0), managedBudget,
      `${bytes(u.managed_used_bytes.reduce((a, b) => a + b, 0))} / ${bytes(managedBudget)}`)
    : `<span class="muted">— / ${bytes(managedBudget)}</span>`;
  const network = u
    ? bar(u.network_segments_used, u.network_segment_count,
      `${fmt(u.network_segments_used)} / ${fmt(u.network_segment_count)} × ${bytes(u.network_segment_size_bytes)}`)
    : `<span class="muted">—</span>`;
  let gpu = `<span class="muted" title="${esc(tm.gpu)}">none</span>`;
  if (gpuBudget > 0) {
    const gpuUsed = u ? u.gpu_used_bytes.reduce((a, b) => a + b, 0) : 0;
    gpu = bar(gpuUsed, gpuBudget, `${bytes(gpuUsed)} / ${bytes(gpuBudget)}`) +
      ` <span class="muted" title="${esc(tm.gpu)}">(${gpuSlots} slot${gpuSlots === 1 ? "" : "s"})</span>`;
  }
  return `<tr data-tm="${esc(tm.id)}"><td>${esc(tm.id)}</td><td><code>${esc(tm.data_addr)}</code></td>` +
    `<td class="num">${used} / ${slots.length}</td><td>${managed}</td><td>${network}</td>` +
    `<td class="num">${bytes(tm.spill_bytes_written)}</td><td>${gpu}</td>` +
    `<td class="num">${(tm.last_heartbeat_ms / 1000).toFixed(1)} s ago</td>` +
    `<td class="muted" title="${esc(tm.transport)}\n${esc(tm.io)}">${esc(String(tm.transport).split(" (")[0])} · ${esc(String(tm.io).split(" (")[0])}</td></tr>`;
}

function jobRow(job, ended) {
  const rate = job.wall_ms > 0 ? fmt(job.rows_in / (job.wall_ms / 1000)) : "";
  const cause = ended ? `<td>${esc(job.reason || job.last_failure)}</td>` : "";
  return `<tr data-job="${esc(job.job)}"><td><a href="/job/${esc(job.job)}"><code>${esc(job.job)}</code></a></td>` +
    `<td><a href="/job/${esc(job.job)}">${esc(job.name)}</a></td><td>${stateBadge(job.state)}</td>` +
    `<td class="num">${duration(job.wall_ms)}</td><td class="num">${fmt(job.rows_in)}</td>` +
    `<td class="num">${fmt(job.rows_out)}</td><td class="num">${rate}</td>` +
    `<td>${esc(checkpointLine(job))}</td><td class="num">${job.restarts || 0}</td>${cause}</tr>`;
}

async function refreshOverview() {
  const [overview, tms, jobs] = await Promise.all(
    [getJSON("/overview"), getJSON("/taskmanagers"), getJSON("/jobs")]);
  $("#cards").innerHTML =
    card("TaskManagers", fmt(overview.taskmanagers), "registered") +
    card("Task slots", `${fmt(overview.slots_used)} / ${fmt(overview.slots_total)}`,
      `${fmt(overview.slots_free)} free`) +
    card("Running jobs", fmt(overview.jobs_running), "") +
    card("Completed jobs", fmt(overview.jobs_finished + overview.jobs_failed + overview.jobs_canceled),
      `${overview.jobs_finished} finished, ${overview.jobs_failed} failed, ${overview.jobs_canceled} canceled`);
  $("#taskmanagers tbody").innerHTML = tms.map(taskManagerRow).join("") ||
    `<tr><td colspan="9" class="muted">no TaskManager registered</td></tr>`;
  $("#running tbody").innerHTML = jobs.running.map((j) => jobRow(j, false)).join("") ||
    `<tr><td colspan="9" class="muted">no job running</td></tr>`;
  $("#completed tbody").innerHTML = jobs.completed.slice().reverse().map((j) => jobRow(j, true)).join("") ||
    `<tr><td colspan="10" class="muted">none yet</td></tr>`;
}

// ---- the job graph -------------------------------------------------------

const BOX_W = 270, BOX_H = 92, GAP_X = 110, GAP_Y = 28, PAD = 20;

// Lays the vertices out left to right by topological depth (a source at 0,
// any other vertex one column right of its deepest input), stacked within a
// column in vertex order and centered vertically.
function layoutGraph(vertices) {
  const depth = new Array(vertices.length).fill(-1);
  const visiting = new Set();
  const depthOf = (i) => {
    if (depth[i] >= 0) return depth[i];
    if (visiting.has(i)) return 0; // a cycle cannot happen; never loop on one
    visiting.add(i);
    const inputs = (vertices[i].inputs || []).filter((e) => e.source < vertices.length);
    depth[i] = inputs.length ? 1 + Math.max(...inputs.map((e) => depthOf(e.source))) : 0;
    visiting.delete(i);
    return depth[i];
  };
  vertices.forEach((_, i) => depthOf(i));
  const columns = [];
  vertices.forEach((_, i) => (columns[depth[i]] = columns[depth[i]] || []).push(i));
  const tallest = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  const height = PAD * 2 + tallest * BOX_H + (tallest - 1) * GAP_Y;
  const nodes = new Array(vertices.length);
  columns.forEach((column, d) => {
    if (!column) return;
    const used = column.length * BOX_H + (column.length - 1) * GAP_Y;
    const top = (height - used) / 2;
    column.forEach((i, row) => {
      nodes[i] = { x: PAD + d * (BOX_W + GAP_X), y: top + row * (BOX_H + GAP_Y), depth: d };
    });
  });
  const width = PAD * 2 + columns.length * BOX_W + Math.max(0, columns.length - 1) * GAP_X;
  return { nodes, width, height };
}

function clip(text, chars) {
  text = String(text ?? "");
  return text.length > chars ? text.slice(0, chars - 1) + "…" : text;
}

function renderGraph(job, vertexRates) {
  const vertices = job.vertices || [];
  const { nodes, width, height } = layoutGraph(vertices);
  const parts = [];
  parts.push(`<svg id="job-graph" width="${width}" height="${height}" viewBox="0 0 ${width} ${height}" role="img" aria-label="job graph">`);
  parts.push(`<defs><marker id="arrow" viewBox="0 0 10 10" refX="9" refY="5" markerWidth="7" markerHeight="7" orient="auto-start-reverse">` +
    `<path d="M 0 0 L 10 5 L 0 10 z" fill="#8592a6"/></marker></defs>`);
  const labels = [];
  vertices.forEach((v, target) => {
    (v.inputs || []).forEach((edge) => {
      const from = nodes[edge.source], to = nodes[target];
      if (!from || !to) return;
      const x1 = from.x + BOX_W, y1 = from.y + BOX_H / 2, x2 = to.x, y2 = to.y + BOX_H / 2;
      const dx = Math.max(30, (x2 - x1) / 2);
      parts.push(`<path class="edge" data-source="${edge.source}" data-target="${target}" marker-end="url(#arrow)" ` +
        `d="M ${x1} ${y1} C ${x1 + dx} ${y1}, ${x2 - dx} ${y2}, ${x2} ${y2}"/>`);
      labels.push(`<text class="edge-label" data-source="${edge.source}" data-target="${target}" x="${(x1 + x2) / 2}" ` +
        `y="${(y1 + y2) / 2 - 6}" text-anchor="middle">${esc(String(edge.exchange).toUpperCase())} · ${esc(edge.transport || "")}</text>`);
    });
  });
  vertices.forEach((v, i) => {
    const n = nodes[i], m = v.metrics || {};
    const tier = v.tier === "CPU" || v.tier === "GPU" ? v.tier : "mixed";
    const transports = [...new Set((v.inputs || []).map((e) => e.transport))];
    const transport = transports.length ? "in: " + transports.join("/") : "source";
    const rate = vertexRates && vertexRates[i] !== undefined ? vertexRates[i] : 0;
    const bp = (m.backpressured_ms_per_second_max || 0) / 1000;
    const bpColor = bp > 0.5 ? "#b00020" : bp > 0.1 ? "#b26a00" : "#17702a";
    parts.push(`<g class="vertex" data-vertex="${i}" data-rows-in="${m.rows_in || 0}" transform="translate(${n.x},${n.y})">` +
      `<title>${esc(v.name)}\n${(v.operators || []).map((o) => `${o.name} (${o.kind})`).join("\n")}</title>` +
      `<rect class="box tier-${tier}" width="${BOX_W}" height="${BOX_H}" rx="7"/>` +
      `<rect x="0" y="${BOX_H - 5}" width="${(BOX_W * Math.min(1, bp)).toFixed(1)}" height="5" fill="${bpColor}" opacity="0.85"/>` +
      `<text class="v-name" x="10" y="20">${esc(clip(v.name, 32))}</text>` +
      `<text class="v-meta" x="10" y="39"><tspan class="v-par">p=${v.parallelism}</tspan> · <tspan class="v-tier">${esc(v.tier)}</tspan> · <tspan class="v-transport">${esc(transport)}</tspan></text>` +
      `<text class="v-rate" x="10" y="59">${fmt(rate)} rows/s</text>` +
      `<text class="v-rows" x="${BOX_W - 10}" y="59" text-anchor="end" fill="#6b7483">${fmt(m.rows_in)} rows</text>` +
      `<text class="v-bp" x="10" y="77">back-pressure ${(bp * 100).toFixed(0)}% · pool in ${((m.in_pool_usage_permille_max || 0) / 10).toFixed(0)}%, out ${((m.out_pool_usage_permille_max || 0) / 10).toFixed(0)}%</text>` +
      `</g>`);
  });
  parts.push(...labels, "</svg>");
  return parts.join("");
}

// ---- the throughput chart ------------------------------------------------

const CHART_W = 1300, CHART_H = 220, CHART_L = 70, CHART_R = 20, CHART_T = 16, CHART_B = 30;

function niceCeil(x) {
  if (x <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(x)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= x) return m * p;
  return 10 * p;
}

function renderChart(samples) {
  const w = CHART_W - CHART_L - CHART_R, h = CHART_H - CHART_T - CHART_B;
  const parts = [`<svg id="throughput-chart" data-points="${samples.length}" width="100%" viewBox="0 0 ${CHART_W} ${CHART_H}">`];
  const top = niceCeil(Math.max(0, ...samples.map((s) => Math.max(s.rows_in_per_second, s.rows_out_per_second))));
  for (let k = 0; k <= 4; k++) {
    const y = CHART_T + h - (h * k) / 4;
    parts.push(`<line class="grid" x1="${CHART_L}" x2="${CHART_L + w}" y1="${y}" y2="${y}"/>`,
      `<text x="${CHART_L - 6}" y="${y + 4}" text-anchor="end">${fmt((top * k) / 4)}</text>`);
  }
  parts.push(`<line class="axis" x1="${CHART_L}" x2="${CHART_L + w}" y1="${CHART_T + h}" y2="${CHART_T + h}"/>`);
  if (samples.length === 0) {
    parts.push(`<text x="${CHART_L + w / 2}" y="${CHART_T + h / 2}" text-anchor="middle" fill="#6b7483">waiting for the first sample…</text></svg>`);
    return parts.join("");
  }
  const t0 = samples[0].wall_ms, t1 = Math.max(t0 + 1, samples[samples.length - 1].wall_ms);
  const x = (t) => CHART_L + (w * (t - t0)) / (t1 - t0);
  const y = (v) => CHART_T + h - (h * v) / top;
  const line = (key) => samples.map((s) => `${x(s.wall_ms).toFixed(1)},${y(s[key]).toFixed(1)}`).join(" ");
  parts.push(`<polygon class="area-in" points="${x(t0)},${y(0)} ${line("rows_in_per_second")} ${x(t1)},${y(0)}"/>`,
    `<polyline class="line-in" points="${line("rows_in_per_second")}"/>`,
    `<polyline class="line-out" points="${line("rows_out_per_second")}"/>`,
    `<text x="${CHART_L}" y="${CHART_H - 8}">${duration(t0)}</text>`,
    `<text x="${CHART_L + w}" y="${CHART_H - 8}" text-anchor="end">job age ${duration(t1)}</text>`,
    `<rect x="${CHART_L + w / 2 - 110}" y="${CHART_H - 19}" width="10" height="3" fill="#0b5cad"/>`,
    `<text x="${CHART_L + w / 2 - 96}" y="${CHART_H - 14}">rows in/s</text>`,
    `<rect x="${CHART_L + w / 2 + 10}" y="${CHART_H - 19}" width="10" height="3" fill="#17702a"/>`,
    `<text x="${CHART_L + w / 2 + 24}" y="${CHART_H - 14}">rows out/s</text></svg>`);
  return parts.join("");
}

// ---- the job page ----------------------------------------------------------

const jobId = () => decodeURIComponent(location.pathname.split("/").filter(Boolean).pop() || "");

function vertexRow(v, i, rate) {
  const m = v.metrics || {};
  const input = (v.inputs || []).map((e) => `${String(e.exchange).toUpperCase()} from #${e.source} (${e.transport})`).join(", ") || "source";
  return `<tr data-vertex="${i}"><td>${i}</td><td>${esc(v.name)}</td><td class="num">${v.parallelism}</td>` +
    `<td>${esc(v.tier)}</td><td>${esc(input)}</td><td class="num">${fmt(m.rows_in)}</td>` +
    `<td class="num">${fmt(m.rows_out)}</td><td class="num">${fmt(rate)}</td>` +
    `<td class="num">${m.subtasks_running || 0} / ${v.parallelism}</td>` +
    `<td>${permille(m.backpressured_ms_per_second_max || 0)}</td>` +
    `<td>${permille(m.in_pool_usage_permille_max || 0)}</td><td>${permille(m.out_pool_usage_permille_max || 0)}</td></tr>`;
}

function renderJob(job, throughput, overview) {
  document.title = `strata — ${job.name}`;
  $("#job-name").textContent = `${job.name} (${job.job})`;
  $("#job-state").outerHTML = `<span id="job-state" class="state ${esc(String(job.state).toUpperCase())}">${esc(String(job.state).toUpperCase())}</span>`;
  $("#cancel").hidden = !(overview.cancel_enabled && job.state === "Running");
  const samples = throughput.samples || [];
  const last = samples[samples.length - 1];
  $("#cards").innerHTML =
    card("Rows in", fmt(job.rows_in), last ? `<span id="rate-in">${fmt(last.rows_in_per_second)}</span> rows/s now` : "") +
    card("Rows out", fmt(job.rows_out), last ? `${fmt(last.rows_out_per_second)} rows/s now` : "") +
    card(job.state === "Running" ? "Running for" : "Ran for", duration(job.wall_ms),
      job.wall_ms > 0 ? `${fmt(job.rows_in / (job.wall_ms / 1000))} rows/s on average` : "") +
    card("Slots", fmt((job.vertices || []).reduce((a, v) => Math.max(a, v.parallelism), 0)),
      `of ${job.slots} on ${job.taskmanagers} TaskManager(s)`) +
    card("Remote bytes", bytes(job.remote_bytes), esc(String(job.transport).split(" (")[0])) +
    card("Managed memory peak", bytes(job.managed_peak_bytes), "largest task (reported at its end)") +
    card("Spill", bytes(job.spill_bytes_written), `${fmt(job.spill_file_count)} files, ${bytes(job.spill_bytes_read)} read`) +
    card("Restarts", fmt(job.restarts || 0), esc(clip(job.last_failure || "", 60)));
  $("#graph").innerHTML = renderGraph(job, throughput.vertex_rows_per_second);
  $("#chart").innerHTML = renderChart(samples);
  $("#vertices tbody").innerHTML = (job.vertices || [])
    .map((v, i) => vertexRow(v, i, (throughput.vertex_rows_per_second || [])[i] || 0)).join("");

  const c = job.checkpoints || { history: [] };
  $("#checkpoint-summary").textContent = !job.checkpointing
    ? "Checkpointing is off (execution.checkpointing.interval)."
    : `${c.completed} completed, ${c.failed} failed` +
      (c.restored_from !== null && c.restored_from !== undefined ? `; the latest restart restored chk-${c.restored_from}` : "") +
      `; the last ${c.history.length} below, newest first.`;
  $("#checkpoints tbody").innerHTML = c.history.slice().reverse().map((h) =>
    `<tr><td class="num">${h.id}</td><td><span class="state ${h.status === "Completed" ? "FINISHED" : "FAILED"}">${esc(h.status)}</span></td>` +
    `<td class="num">${fmt(h.duration_ms)} ms</td><td class="num">${h.status === "Completed" ? bytes(h.size_bytes) : ""}</td>` +
    `<td class="num">${fmt(h.alignment_ms)} ms</td><td>${esc(h.reason)}</td></tr>`).join("") ||
    `<tr><td colspan="6" class="muted">none</td></tr>`;

  const failures = [
    ["restarts", fmt(job.restarts || 0)],
    ["latest failure", esc(job.last_failure || "none")],
  ];
  if (job.reason) failures.push(["end", esc(job.reason)]);
  $("#failures tbody").innerHTML = failures.map(([k, v]) => `<tr><th style="width:12em">${k}</th><td>${v}</td></tr>`).join("");

  const names = (job.vertices || []).map((v) => v.name);
  $("#tasks tbody").innerHTML = (job.tasks || []).map((t) => {
    const where = ((job.vertices[t.vertex] || {}).placement || [])[t.subtask] || t.taskmanager;
    return `<tr><td>${esc(names[t.vertex])}</td><td class="num">${t.subtask}</td><td>${esc(where)}</td>` +
      `<td>${permille(t.backpressured_ms_per_second)}</td><td>${permille(t.in_pool_usage_permille)}</td>` +
      `<td>${permille(t.out_pool_usage_permille)}</td><td class="num">${bytes(t.remote_bytes_out)}</td>` +
      `<td class="num">${bytes(t.remote_bytes_in)}</td></tr>`;
  }).join("") || `<tr><td colspan="8" class="muted">no task reports (the job ended, or has not deployed yet)</td></tr>`;

  const p = job.placement;
  $("#placement-summary").textContent = p
    ? `placement.mode ${p.mode}; calibration: ${p.calibration_origin}; GPU tier: ${p.gpu_tier}. GPU: ${(job.gpu || []).join("; ") || "—"}. I/O: ${(job.io || []).join("; ") || "—"}.`
    : "";
  $("#placement tbody").innerHTML = (p ? p.operators : []).map((o) =>
    `<tr><td>${esc(o.name)}</td><td>${esc(o.kind)}</td><td class="num">${o.parallelism}</td>` +
    `<td>${esc(String(o.tier).toUpperCase())}</td><td>${esc(o.reason)}</td></tr>`).join("");
}

async function refreshJob() {
  const id = jobId();
  try {
    const [job, throughput, overview] = await Promise.all(
      [getJSON(`/jobs/${id}`), getJSON(`/jobs/${id}/throughput`), getJSON("/overview")]);
    renderJob(job, throughput, overview);
  } catch (e) {
    if (e.status === 404 || e.status === 400) {
      $("#job-name").textContent = `job ${id}`;
      $("#message").innerHTML = `<p class="error">${esc(e.message)}</p>`;
    }
    throw e;
  }
}

async function cancelJob() {
  const stored = sessionStorage.getItem("strata-cancel-token") || "";
  const token = prompt(
    "Cancel token: HMAC-SHA256(cluster secret, \"strata-rest-cancel-v1\") in hex", stored);
  if (token === null) return;
  sessionStorage.setItem("strata-cancel-token", token.trim());
  const response = await fetch(`/jobs/${jobId()}/cancel`, {
    method: "POST", headers: { Authorization: `Bearer ${token.trim()}` },
  });
  const body = await response.json().catch(() => ({}));
  $("#message").innerHTML = response.ok
    ? `<p>Job canceled.</p>`
    : `<p class="error">Cancel refused (${response.status}): ${esc(body.error)}</p>`;
}

// ---- polling -----------------------------------------------------------------

async function poll(refresh) {
  try {
    await refresh();
    setStatus(`updated ${new Date().toLocaleTimeString()}`, false);
  } catch (e) {
    setStatus(e.status ? String(e.message) : `cannot reach the JobManager: ${e.message}`, true);
  }
  setTimeout(() => poll(refresh), POLL_MS);
}

if (document.body.dataset.page === "job") {
  $("#cancel").addEventListener("click", () => cancelJob());
  poll(refreshJob);
} else {
  poll(refreshOverview);
}
