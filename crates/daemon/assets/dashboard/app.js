// The Testground dashboard: a task list, a run page and a plan's metric history, built on the
// daemon's read-only API (/api/v1, see crates/daemon/API.md). No framework: a small element
// helper and uPlot (vendored) for the charts. Every text from the server goes through
// textContent, never innerHTML: plan output is untrusted.
"use strict";

const app = document.getElementById("app");
let view = null; // the current view: { refresh(), stop() }

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "class") el.className = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

async function api(path) {
  const r = await fetch(path, { credentials: "same-origin" });
  if (!r.ok) throw new Error(`${path}: ${r.status} ${(await r.text()).trim()}`);
  return r.json();
}

function fmtTook(ms) {
  if (ms === null || ms === undefined) return "";
  if (ms < 1000) return `${ms} ms`;
  const s = ms / 1000;
  if (s < 120) return `${s.toFixed(1)} s`;
  return `${Math.floor(s / 60)} min ${Math.round(s % 60)} s`;
}

function fmtTime(iso) {
  if (!iso) return "";
  const d = new Date(iso);
  return d.toLocaleString();
}

function outcomeText(t) {
  const groups = Object.entries(t.outcomes || {}).map(([g, o]) => `${g} ${o.ok}/${o.total}`);
  return groups.length ? groups.join(", ") : "";
}

// replaceChildren without the null/false placeholders of conditional parts (which it would
// print as text).
function set(el, ...children) {
  el.replaceChildren(...children.flat().filter((c) => c !== null && c !== undefined && c !== false));
}

function badge(cls, text) {
  return h("span", { class: `badge ${cls}` }, text);
}

function showError(where, e) {
  where.replaceChildren(h("p", { class: "err" }, String(e.message || e)));
}

// ---- live updates -------------------------------------------------------------------------

let refreshTimer = null;
function scheduleRefresh() {
  clearTimeout(refreshTimer);
  refreshTimer = setTimeout(() => view && view.refresh(), 200);
}

function connectEvents() {
  const live = document.getElementById("live");
  const es = new EventSource("/api/v1/events");
  es.addEventListener("open", () => { live.textContent = "● live"; live.className = "on"; });
  es.addEventListener("error", () => { live.textContent = "○ offline"; live.className = ""; });
  es.addEventListener("tasks", scheduleRefresh);
}

// ---- task list ----------------------------------------------------------------------------

function listView() {
  const filters = { text: "", state: "", type: "" };
  const body = h("tbody", { id: "tasks" });
  const count = h("span", { class: "muted" });
  const text = h("input", { type: "search", placeholder: "filter: id, plan, case, runner", size: 36,
    oninput: (e) => { filters.text = e.target.value.toLowerCase(); render(); } });
  const state = h("select", { onchange: (e) => { filters.state = e.target.value; render(); } },
    ["", "scheduled", "processing", "complete", "canceled"].map((s) => h("option", { value: s }, s || "any state")));
  const outcome = h("select", { onchange: (e) => { filters.type = e.target.value; render(); } },
    ["", "success", "failure", "canceled", "unknown"].map((s) => h("option", { value: s }, s || "any outcome")));
  app.replaceChildren(
    h("h1", {}, "Tasks"),
    h("div", { class: "filters" }, text, state, outcome, count),
    h("table", {},
      h("thead", {}, h("tr", {}, ["id", "plan:case", "runner", "state", "outcome", "groups ok/total", "took", "created"].map((c) => h("th", {}, c)))),
      body));
  let rows = [];
  function render() {
    const shown = rows.filter((t) =>
      (!filters.state || t.state === filters.state) &&
      (!filters.type || t.outcome === filters.type) &&
      (!filters.text || [t.id, t.plan, t.case, t.runner, t.type].join(" ").toLowerCase().includes(filters.text)));
    count.textContent = `${shown.length} of ${rows.length}`;
    body.replaceChildren(...shown.map((t) => h("tr", { "data-id": t.id, class: "clickable",
      onclick: () => { location.hash = `#/task/${t.id}`; } },
      h("td", { class: "mono" }, h("a", { href: `#/task/${t.id}` }, t.id)),
      h("td", {}, t.type === "build" ? `build ${t.plan}` : h("a", { href: `#/plan/${encodeURIComponent(t.plan)}/${encodeURIComponent(t.case)}`,
        onclick: (e) => e.stopPropagation() }, `${t.plan}:${t.case}`)),
      h("td", {}, t.runner),
      h("td", {}, badge(t.state, t.state)),
      h("td", { class: "outcome" }, badge(t.outcome, t.outcome)),
      h("td", { class: "groups" }, outcomeText(t)),
      h("td", {}, fmtTook(t.took_ms)),
      h("td", {}, fmtTime(t.created)))));
  }
  async function refresh() {
    try {
      rows = await api("/api/v1/tasks?limit=1000");
      render();
    } catch (e) { count.textContent = String(e.message || e); }
  }
  refresh();
  return { refresh, stop() {} };
}

// ---- run page -----------------------------------------------------------------------------

// Follows a growing file through ?offset= reads, appending to a <pre>. The first read asks for
// the last 256 KiB only, and the <pre> keeps the last 1 MiB: a run's log can be tens of MiB, and
// the whole file is a link away.
const TAIL = 256 * 1024;
const KEEP = 1024 * 1024;
function tail(url, pre) {
  let offset = 0, first = true, done = false, timer = null, stopped = false;
  async function step() {
    if (stopped) return;
    try {
      const q = first ? `offset=0&tail=${TAIL}` : `offset=${offset}`;
      const r = await fetch(`${url}${url.includes("?") ? "&" : "?"}${q}`, { credentials: "same-origin" });
      if (r.status === 404) { if (!pre.textContent) pre.textContent = "(no such file yet)"; }
      else if (!r.ok) { pre.textContent += `\n[${r.status}] ${await r.text()}`; done = true; }
      else {
        const text = await r.text();
        const next = Number(r.headers.get("x-next-offset") || offset);
        if (first) {
          pre.textContent = Number(r.headers.get("x-start-offset") || 0) > 0 ? "… (earlier lines not shown)\n" : "";
          first = false;
        }
        const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
        let all = pre.textContent + text;
        if (all.length > KEEP) all = "… (earlier lines not shown)\n" + all.slice(all.length - KEEP);
        pre.textContent = all;
        if (atBottom) pre.scrollTop = pre.scrollHeight;
        offset = next;
        done = r.headers.get("x-done") === "true";
        if (text.length > 0 && !done) { timer = setTimeout(step, 0); return; }
      }
    } catch (e) { pre.textContent += `\n${e}`; }
    if (!done) timer = setTimeout(step, 1000);
  }
  step();
  return () => { stopped = true; clearTimeout(timer); };
}

function instanceKey(i) { return `${i.group}[${String(i.index).padStart(3, "0")}]`; }

function runView(id) {
  let stops = [];
  let detail = null;
  let selected = null;
  const head = h("div");
  const groups = h("div");
  const instances = h("tbody", { id: "instances" });
  const instPanel = h("div", { id: "instance" });
  const metricsBox = h("div", { id: "metrics" });
  const filesBox = h("div", { id: "files" });
  const logPre = h("pre", { id: "tasklog" });
  app.replaceChildren(
    head, groups,
    h("h2", {}, "Instances"),
    h("table", {}, h("thead", {}, h("tr", {}, ["instance", "state", "exit", "ended", "events", "network configs"].map((c) => h("th", {}, c)))), instances),
    instPanel,
    h("h2", {}, "Metrics"), metricsBox,
    h("h2", {}, "Outputs"), filesBox,
    h("h2", {}, "Task log"), logPre);
  stops.push(tail(`/api/v1/tasks/${id}/log`, logPre));

  function renderHead(d) {
    const t = d.task;
    const j = d.journal || {};
    const dl = h("dl", { class: "grid" },
      h("dt", {}, "task"), h("dd", { class: "mono" }, t.id),
      h("dt", {}, "plan:case"), h("dd", {}, t.type === "run" ? h("a", { href: `#/plan/${encodeURIComponent(t.plan)}/${encodeURIComponent(t.case)}` }, `${t.plan}:${t.case}`) : t.plan),
      h("dt", {}, "runner"), h("dd", {}, t.runner),
      h("dt", {}, "state"), h("dd", {}, badge(t.state, t.state)),
      h("dt", {}, "outcome"), h("dd", { id: "outcome" }, badge(t.outcome, t.outcome), " ", outcomeText(t)),
      h("dt", {}, "created"), h("dd", {}, fmtTime(t.created)),
      h("dt", {}, "took"), h("dd", {}, fmtTook(t.took_ms)),
      j.network ? [h("dt", {}, "data network"), h("dd", { class: "mono" }, j.network.subnet)] : null,
      j.network ? [h("dt", {}, "seed"), h("dd", { class: "mono", id: "seed" }, String(j.network.seed), h("span", { class: "muted" }, `  (repeat with --run-cfg seed=${j.network.seed})`))] : null,
      t.created_by && t.created_by.commit ? [h("dt", {}, "commit"), h("dd", { class: "mono" }, `${t.created_by.repo} ${t.created_by.branch} ${t.created_by.commit}`)] : null,
      t.error ? [h("dt", {}, "error"), h("dd", { class: "err" }, t.error)] : null,
      h("dt", {}, "downloads"), h("dd", {}, d.has_outputs ? h("a", { href: `/outputs?run_id=${t.id}` }, "outputs archive (.tgz)") : h("span", { class: "muted" }, "no outputs"),
        " · ", h("a", { href: `/logs?task_id=${t.id}` }, "task log")));
    head.replaceChildren(h("h1", {}, `${t.type === "run" ? "Run" : "Build"} ${t.plan}:${t.case}`), dl);
  }

  function renderGroups(d) {
    const outcomes = d.task.outcomes || {};
    groups.replaceChildren(h("h2", {}, "Groups"), h("table", { id: "groups" },
      h("thead", {}, h("tr", {}, ["group", "instances", "ok/total", "builder", "artifact"].map((c) => h("th", {}, c)))),
      h("tbody", {}, d.groups.map((g) => {
        const o = outcomes[g.id];
        const cls = !o ? "" : o.ok === o.total ? "success" : "failure";
        return h("tr", {}, h("td", {}, g.id), h("td", {}, g.instances),
          h("td", { class: cls }, o ? `${o.ok}/${o.total}` : ""), h("td", {}, g.builder), h("td", { class: "mono" }, g.artifact));
      }))));
  }

  // Every instance of the composition, with what the journal knows of it.
  function instanceList(d) {
    const known = new Map(((d.journal || {}).instances || []).map((i) => [instanceKey(i), i]));
    const all = [];
    for (const g of d.groups) {
      for (let i = 0; i < g.instances; i++) {
        const k = instanceKey({ group: g.id, index: i });
        all.push(known.get(k) || { group: g.id, index: i, state: d.task.state === "complete" || d.task.state === "canceled" ? "unknown" : "pending", events: [], network: [] });
        known.delete(k);
      }
    }
    return all.concat([...known.values()]);
  }

  function renderInstances(d) {
    const list = instanceList(d);
    instances.replaceChildren(...list.map((i) => {
      const k = instanceKey(i);
      return h("tr", { class: `clickable${selected === k ? " selected" : ""}`, "data-instance": k, "data-state": i.state,
        onclick: () => { selected = k; renderInstances(detail); renderInstance(i); } },
        h("td", { class: "mono" }, k, i.tag ? ` (${i.tag})` : ""),
        h("td", {}, badge(i.state, i.state)),
        h("td", { class: i.ok === false ? "failure" : "" }, i.status || ""),
        h("td", {}, i.ended !== undefined && i.ended !== null ? `${i.ended.toFixed(2)} s` : ""),
        h("td", {}, i.events.length + (i.events_dropped || 0)),
        h("td", {}, i.network.length + (i.network_dropped || 0)));
    }));
    if (selected) {
      const cur = list.find((i) => instanceKey(i) === selected);
      if (cur) updateInstance(cur);
    }
  }

  let instStops = [];
  let instTimeline = null;
  let instNet = null;
  function renderInstance(i) {
    instStops.forEach((s) => s());
    instStops = [];
    const dir = `${i.group}/${i.index}`;
    const out = h("pre", { id: "run-out" });
    const err = h("pre", { id: "run-err" });
    instTimeline = h("div");
    instNet = h("div");
    instPanel.replaceChildren(h("div", { class: "panel" },
      h("h2", {}, `Instance ${instanceKey(i)}`),
      instTimeline,
      h("h2", {}, "Network configs applied"), instNet,
      h("h2", {}, "run.out"), out,
      h("h2", {}, "run.err"), err));
    updateInstance(i);
    instStops.push(tail(`/api/v1/runs/${id}/file?path=${encodeURIComponent(dir + "/run.out")}`, out));
    instStops.push(tail(`/api/v1/runs/${id}/file?path=${encodeURIComponent(dir + "/run.err")}`, err));
  }

  function updateInstance(i) {
    if (!instTimeline) return;
    const end = Math.max(0.001, i.ended || 0, ...i.events.map((e) => e.t));
    set(instTimeline, 
      h("div", { class: "timeline", title: "events over the run's time" },
        i.events.map((e) => h("span", { class: e.kind, style: `left: calc(${(100 * e.t / end).toFixed(2)}% - .3em)`, title: `${e.t.toFixed(3)} s ${e.kind} ${e.text.slice(0, 200)}` }))),
      h("table", { class: "events" },
        h("thead", {}, h("tr", {}, ["t", "event", "text"].map((c) => h("th", {}, c)))),
        h("tbody", {}, i.events.map((e) => h("tr", {}, h("td", {}, `${e.t.toFixed(3)} s`), h("td", { class: e.kind.toLowerCase() }, e.kind), h("td", { class: "mono" }, e.text))))),
      i.events_dropped ? h("p", { class: "muted" }, `${i.events_dropped} more events not kept (see run.out)`) : null);
    instNet.replaceChildren(i.network.length === 0 ? h("p", { class: "muted" }, "none") :
      h("div", {}, i.network.map((n) => h("div", {}, h("div", { class: "muted" }, fmtTime(n.at)), h("pre", {}, JSON.stringify(n.config, null, 2))))));
  }

  async function renderFiles() {
    try {
      const files = await api(`/api/v1/runs/${id}/files`);
      if (files.length === 0) { filesBox.replaceChildren(h("p", { class: "muted" }, "no files")); return; }
      const shown = files.slice(0, 2000);
      set(filesBox, h("table", {}, h("thead", {}, h("tr", {}, ["file", "size"].map((c) => h("th", {}, c)))),
        h("tbody", {}, shown.map((f) => h("tr", {},
          h("td", { class: "mono" }, h("a", { href: `/api/v1/runs/${id}/file?path=${encodeURIComponent(f.path)}&download=true` }, f.path), f.path.endsWith(".pcap") ? " (pcap)" : ""),
          h("td", {}, `${f.size} B`))))),
        files.length > shown.length ? h("p", { class: "muted" }, `${files.length - shown.length} more files in the archive`) : null);
    } catch (e) { showError(filesBox, e); }
  }

  let metricsLoaded = false;
  async function renderMetrics() {
    try {
      const list = await api(`/api/v1/runs/${id}/metrics`);
      if (list.length === 0) { metricsBox.replaceChildren(h("p", { class: "muted" }, "no metrics (results.out, diagnostics.out)")); return; }
      metricsLoaded = true;
      metricPicker(metricsBox, list, (m, measure) => `/api/v1/runs/${id}/metrics/series?${metricQuery(m, measure)}&instances=${MAX_DRAWN}`, drawRunSeries);
    } catch (e) { showError(metricsBox, e); }
  }

  async function refresh() {
    try {
      detail = await api(`/api/v1/tasks/${id}`);
    } catch (e) { showError(head, e); return; }
    renderHead(detail);
    renderGroups(detail);
    renderInstances(detail);
    const final = detail.task.state === "complete" || detail.task.state === "canceled";
    if (final && !metricsLoaded) { renderMetrics(); renderFiles(); }
    if (!final) {
      if (!metricsLoaded) metricsBox.replaceChildren(h("p", { class: "muted" }, "shown when the run ends"));
      clearTimeout(pollTimer);
      pollTimer = setTimeout(refresh, 1000);
    }
  }
  let pollTimer = null;
  refresh();
  return { refresh, stop() { clearTimeout(pollTimer); stops.forEach((s) => s()); instStops.forEach((s) => s()); } };
}

function metricQuery(m, measure) {
  return new URLSearchParams({ set: m.set, name: m.name, type: m.type, measure }).toString();
}

// A metric and measure picker; calls draw(box, data, metric) with what url(metric, measure) answers.
function metricPicker(box, list, url, draw) {
  const chartBox = h("div");
  const metricSel = h("select", { id: "metric" }, list.map((m, i) => h("option", { value: i }, `${m.set}: ${m.name} (${m.type}${m.points !== undefined ? `, ${m.points} points` : ""})`)));
  const measureSel = h("select", { id: "measure" });
  async function load() {
    const m = list[Number(metricSel.value)];
    const measure = measureSel.value || m.measures[0];
    try { draw(chartBox, await api(url(m, measure)), m, measure); } catch (e) { showError(chartBox, e); }
  }
  function fillMeasures() {
    const m = list[Number(metricSel.value)];
    measureSel.replaceChildren(...m.measures.map((x) => h("option", { value: x }, x)));
  }
  metricSel.addEventListener("change", () => { fillMeasures(); load(); });
  measureSel.addEventListener("change", load);
  fillMeasures();
  box.replaceChildren(h("div", { class: "row" }, "metric ", metricSel, " measure ", measureSel), chartBox);
  load();
}

const COLORS = ["#2563eb", "#dc2626", "#16a34a", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d"];

function plot(box, title, xLabel, names, data, opts) {
  const width = Math.max(400, Math.min(1100, box.clientWidth || 900));
  const series = [{ label: xLabel }].concat(names.map((n, i) => ({
    label: n, stroke: COLORS[i % COLORS.length], width: 1.5, spanGaps: true,
    points: { show: true, size: 5 },
  })));
  const u = new uPlot({ title, width, height: 280, series, scales: { x: { time: false } }, ...(opts || {}) }, data, box);
  return u;
}

// Per-instance series (at most 50 drawn) and per-group means.
const MAX_DRAWN = 50;
function drawRunSeries(box, s, m) {
  box.replaceChildren();
  const inst = h("div", { class: "chart", id: "chart-instances" });
  const grp = h("div", { class: "chart", id: "chart-groups" });
  const drawn = s.instances.slice(0, MAX_DRAWN);
  box.append(h("p", { class: "muted" }, `${s.points} points from ${s.instances_total} instances; time in seconds since the first point`), inst, grp);
  if (drawn.length) {
    const data = uPlot.join(drawn.map((x) => [x.t, x.v]));
    const plotted = data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null && y !== undefined).length, 0);
    inst.setAttribute("data-points", String(plotted));
    plot(inst, `${m.name}.${s.measure} per instance${s.instances_total > drawn.length ? ` (first ${drawn.length} of ${s.instances_total})` : ""}`, "t (s)",
      drawn.map((x) => `${x.group}[${x.index}]`), data);
  }
  if (s.groups.length) {
    const data = uPlot.join(s.groups.map((g) => [g.t, g.v]));
    grp.setAttribute("data-points", String(data.slice(1).reduce((n, ys) => n + ys.filter((y) => y !== null && y !== undefined).length, 0)));
    plot(grp, `${m.name}.${s.measure}: group mean per second`, "t (s)", s.groups.map((g) => g.group), data);
  }
}

// ---- a plan's metric history ---------------------------------------------------------------

function planView(plan, testcase) {
  const box = h("div");
  const runsBox = h("div");
  app.replaceChildren(h("h1", {}, `${plan}:${testcase} across runs`),
    h("p", { class: "muted" }, "One value per completed run: the mean over instances of each one's last value. A change between two commits shows as a step."),
    box, h("h2", {}, "Runs"), runsBox);
  const base = `/api/v1/plans/${encodeURIComponent(plan)}/${encodeURIComponent(testcase)}/metrics`;
  function drawHistory(chartBox, hist, m, measure) {
    chartBox.replaceChildren();
    const xs = hist.runs.map((_, i) => i);
    const ys = hist.runs.map((r) => (r.value === null || r.value === undefined ? null : r.value));
    const c = h("div", { class: "chart", id: "chart-history", "data-points": String(ys.filter((y) => y !== null).length) });
    chartBox.append(c);
    plot(c, `${m.name}.${measure}`, "run", [`${m.name}.${measure}`], [xs, ys], {
      axes: [{ values: (u, vals) => vals.map((v) => (Number.isInteger(v) && hist.runs[v] ? hist.runs[v].id.slice(-6) : "")) }, {}],
    });
    renderRuns(hist.runs);
  }
  function renderRuns(runs) {
    runsBox.replaceChildren(h("table", {}, h("thead", {}, h("tr", {}, ["#", "run", "created", "commit", "outcome", "value"].map((c) => h("th", {}, c)))),
      h("tbody", {}, runs.map((r, i) => h("tr", {}, h("td", {}, i), h("td", { class: "mono" }, h("a", { href: `#/task/${r.id}` }, r.id)),
        h("td", {}, fmtTime(r.created)), h("td", { class: "mono" }, (r.created_by && r.created_by.commit) || ""),
        h("td", {}, badge(r.outcome, r.outcome)), h("td", {}, r.value === null || r.value === undefined ? "" : String(r.value)))))));
  }
  async function refresh() {
    try {
      const hist = await api(base);
      renderRuns(hist.runs);
      if (hist.metrics.length === 0) { box.replaceChildren(h("p", { class: "muted" }, "no metrics in the latest runs")); return; }
      metricPicker(box, hist.metrics, (m, measure) => `${base}?${metricQuery(m, measure)}`, drawHistory);
    } catch (e) { showError(box, e); }
  }
  refresh();
  return { refresh() {}, stop() {} };
}

// ---- routing -------------------------------------------------------------------------------

function route() {
  if (view) view.stop();
  const parts = location.hash.replace(/^#\/?/, "").split("/").map(decodeURIComponent);
  if (parts[0] === "task" && parts[1]) view = runView(parts[1]);
  else if (parts[0] === "plan" && parts[1] && parts[2] !== undefined) view = planView(parts[1], parts[2]);
  else view = listView();
}

window.addEventListener("hashchange", route);
connectEvents();
route();
