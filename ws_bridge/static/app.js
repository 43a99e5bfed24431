// flowscope live view: an executions list and an execution page, both fed by the
// WebSocket protocol (docs/live-protocol.md). Framework-free so nothing is built at install time.
// Event names and states come from /static/contract.js (`CONTRACT`, generated from contract/).
"use strict";

const params = new URLSearchParams(location.search);
const TOKEN = params.get("token");
const E = CONTRACT.events, RS = CONTRACT.runStatuses, NS = CONTRACT.nodeStates, CT = CONTRACT.control;
const TERMINAL = new Set(CONTRACT.terminalEvents);
// A node's state after one of its events: the event's name, unless its result says more.
const nodeStateOf = (type, d) => {
  const byResult = CONTRACT.nodeStateByResult[type];
  return byResult && Object.hasOwn(byResult, d.result) ? byResult[d.result] : CONTRACT.nodeStateOf[type];
};
const app = document.getElementById("app");
const conn = document.getElementById("conn");

function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === null || v === undefined) continue;
    if (k === "class") el.className = v; else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) el.append(c.nodeType ? c : String(c));
  return el;
}
const svg = (tag, attrs = {}) => {
  const el = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  return el;
};
function api(path) {
  const headers = TOKEN ? { Authorization: `Bearer ${TOKEN}` } : {};
  return fetch(path, { headers }).then(async (r) => ({ status: r.status, body: await r.json() }));
}
// Commands (docs/control.md): JSON bodies, since the server refuses any other type with 415.
function post(path, body) {
  const headers = { "Content-Type": "application/json" };
  if (TOKEN) headers.Authorization = `Bearer ${TOKEN}`;
  return fetch(path, { method: "POST", headers, body: JSON.stringify(body ?? {}) })
    .then(async (r) => ({ status: r.status, body: await r.json().catch(() => ({})) }))
    .catch((err) => ({ status: 0, body: { error: `the stack could not be reached (${err.message})` } }));
}
const ok = (answer) => answer.status >= 200 && answer.status < 300;
const failedText = (what, answer) => `${what} refused${answer.status ? ` (HTTP ${answer.status})` : ""}: ${answer.body.error || "no reason given"}`;
const pageHref = (path) => `${path}${TOKEN ? `?token=${encodeURIComponent(TOKEN)}` : ""}`;
const executionHref = (eid) => pageHref(`/executions/${encodeURIComponent(eid)}`);
// What `GET /api/v1/me` says the token may steer: ["*"], workflow ids, or nothing.
const maySteer = (controls, workflowId) => controls.includes("*") || controls.includes(workflowId);
// A token without control grants gets none of this: the elements are never built.
const ME = api("/api/v1/me");
const steering = ME.then(({ status, body }) => status === 200 && Array.isArray(body.control) ? body.control : []);

function wsUrl(path) {
  const url = new URL(path, location.href);
  url.protocol = location.protocol === "https:" ? "wss:" : "ws:";
  if (TOKEN) url.searchParams.set("token", TOKEN);
  return url.toString();
}
const fmtMs = (ms) => ms === null || ms === undefined ? "—" : ms < 1000 ? `${Math.round(ms)} ms` : `${(ms / 1000).toFixed(ms < 10000 ? 2 : 1)} s`;
const fmtTime = (iso) => iso ? new Date(iso).toLocaleTimeString() : "—";
const statusClass = (s) => `badge s-${s}`;

// A WebSocket that reconnects with backoff; `onOpen` re-subscribes (with fromSeq where it applies).
function liveSocket(path, onOpen, onMessage) {
  let delay = 250, socket = null, stopped = false;
  const connect = () => {
    socket = new WebSocket(wsUrl(typeof path === "function" ? path() : path));
    socket.onopen = () => { delay = 250; conn.textContent = "live"; conn.className = "conn live"; onOpen(socket); };
    socket.onmessage = (m) => {
      const msg = JSON.parse(m.data);
      if (msg.type === CT.HEARTBEAT) { socket.send('{"op":"ping"}'); return; }
      onMessage(msg, socket);
    };
    socket.onclose = (e) => {
      conn.textContent = e.code === 4401 ? "unauthorised" : "reconnecting…"; conn.className = "conn down";
      if (!stopped && e.code !== 4401) setTimeout(connect, delay);
      delay = Math.min(delay * 2, 8000);
    };
  };
  connect();
  return { stop: () => { stopped = true; socket && socket.close(); } };
}

// ---------------------------------------------------------------- executions list
function listView() {
  const rows = new Map();
  const tbody = h("tbody");
  const workflowFilter = h("input", { placeholder: "workflow id", "aria-label": "Filter by workflow", id: "f-workflow" });
  const statusFilter = h("select", { "aria-label": "Filter by status", id: "f-status" },
    ["", ...CONTRACT.storedRunStatuses].map((s) => h("option", { value: s }, s || "any status")));
  const matches = (e) => (!workflowFilter.value || e.workflowId === workflowFilter.value) &&
    (!statusFilter.value || e.status === statusFilter.value);
  const render = () => {
    const items = [...rows.values()].filter(matches).sort((a, b) => (b.startTime || "").localeCompare(a.startTime || ""));
    tbody.replaceChildren(...(items.length ? items.map((e) => h("tr", { "data-execution": e.executionId, "data-status": e.status },
      h("td", {}, h("a", { href: `/executions/${e.executionId}${TOKEN ? `?token=${TOKEN}` : ""}` }, e.executionId.slice(0, 12))),
      h("td", {}, e.workflowName || e.workflowId),
      h("td", {}, h("span", { class: statusClass(e.status) }, e.status)),
      h("td", {}, e.progress !== undefined && e.status === RS.RUNNING ? `${Math.round(e.progress * 100)}%` : `${e.completedNodes ?? 0}/${e.totalNodes ?? "?"}`),
      h("td", {}, fmtMs(e.durationMs)),
      h("td", {}, fmtTime(e.startTime)),
      h("td", {}, e.trigger || ""), h("td", {}, e.userId || ""),
    )) : [h("tr", {}, h("td", { colspan: 8, class: "empty" }, "No executions yet — run `flowscope demo` or `flowscope run FILE`."))]));
  };
  workflowFilter.addEventListener("input", render);
  statusFilter.addEventListener("change", render);
  const startSlot = h("div", { id: "start-slot" });
  app.replaceChildren(
    h("h1", {}, "Executions"),
    startSlot,
    h("div", { class: "filters" }, workflowFilter, statusFilter),
    h("table", { id: "executions" }, h("thead", {}, h("tr", {}, ["Execution", "Workflow", "Status", "Nodes", "Duration", "Started", "Trigger", "User"].map((t) => h("th", {}, t)))), tbody),
  );
  steering.then((controls) => { if (controls.length) startSlot.replaceWith(startPanel(controls)); });
  // Live rows win over the history API's (which lags the store), field by field.
  const merge = (base, over) => { for (const [k, v] of Object.entries(over)) if (v !== undefined) base[k] = v; return base; };
  api("/api/v1/executions?limit=100").then(({ status, body }) => {
    if (status !== 200) { app.append(h("p", { class: "error-box" }, body.error || `HTTP ${status}`)); return; }
    for (const e of body.items) rows.set(e.executionId, rows.has(e.executionId) ? merge(e, rows.get(e.executionId)) : e);
    render();
  });
  // A run that ended just before the page loaded may be past the live stream and not yet in the
  // store (whose lag is seconds): replay the last 30 s of run events (the bridge keeps recent
  // executions' events in memory too), and after a reconnect everything since the last event seen.
  // Progress is live only: replaying it would crowd run events out of a replay's 10,000-event cap.
  let since = new Date(Date.now() - 30_000).toISOString();
  const runTypes = CONTRACT.runEvents;
  // An unrestricted token watches `all`; a restricted one the rooms of its grants, 16 to a
  // subscription, two subscriptions (runs, progress) per 16 rooms within the 16 a connection may hold.
  ME.then(({ status, body }) => {
    if (status !== 200) return;  // the list request above shows what was wrong
    const groups = [];
    for (let i = 0; i < body.rooms.length && groups.length < 8; i += 16) groups.push(body.rooms.slice(i, i + 16));
    if (groups.length) liveSocket("/ws", (s) => groups.forEach((rooms, i) => {
      s.send(JSON.stringify({ op: "subscribe", id: `runs-${i}`, rooms, since, types: runTypes }));
      s.send(JSON.stringify({ op: "subscribe", id: `progress-${i}`, rooms, types: [E.EXECUTION_PROGRESS] }));
    }), onEvent);
  });
  function onEvent(msg) {
    if (!msg.executionId) return;
    if (msg.ts && msg.ts > since) since = msg.ts;
    const row = rows.get(msg.executionId) || { executionId: msg.executionId, workflowId: msg.workflowId, workflowName: msg.workflowName, status: RS.RUNNING };
    // A lost run has not ended: it may recover or finish.
    const ended = row.status !== RS.RUNNING && row.status !== RS.PAUSED && row.status !== RS.LOST;
    if (TERMINAL.has(msg.type)) merge(row, { status: msg.data.result || msg.type.split(".")[1], durationMs: msg.data.durationMs, completedNodes: msg.data.completedNodes });
    else if (ended) return;  // a replayed event older than the end the row already shows
    // A replayed start does not undo a loss the row already shows; a replayed loss and recovery do, in order.
    else if (msg.type === E.WORKFLOW_STARTED) merge(row, { startTime: msg.ts, totalNodes: msg.data.totalNodes, trigger: msg.data.trigger, userId: msg.data.userId, status: row.status === RS.LOST ? RS.LOST : RS.RUNNING });
    else if (msg.type === E.WORKFLOW_LOST) merge(row, { status: RS.LOST });
    else if (msg.type === E.WORKFLOW_RECOVERED) merge(row, { status: RS.RUNNING });
    else if (msg.type === E.EXECUTION_PROGRESS) merge(row, { progress: msg.data.progress, completedNodes: msg.data.completedNodes, totalNodes: msg.data.totalNodes });
    rows.set(msg.executionId, row);
    render();
  }
}

// ---------------------------------------------------------------- starting runs
// One Start form per workflow the token may steer and a connected engine serves. Engines come
// and go, so the list is refreshed; a form keeps what was typed in it across refreshes.
function startPanel(controls) {
  const section = h("section", { id: "start", class: "start", "aria-labelledby": "start-title" });
  const forms = new Map();
  const list = h("div", { class: "start-list" });
  const note = h("p", { class: "empty", id: "no-engines" }, "No connected engine serves a workflow you may start.");
  section.append(h("h2", { id: "start-title" }, "Start a workflow"), note, list);
  const refresh = () => api("/api/v1/engines").then(({ status, body }) => {
    if (status !== 200) return;
    const served = new Map();
    for (const engine of body.items) for (const w of engine.workflows) {
      if (maySteer(controls, w.workflowId) && !served.has(w.workflowId)) served.set(w.workflowId, w);
    }
    for (const [wid, form] of forms) if (!served.has(wid) && !form.busy) { form.el.remove(); forms.delete(wid); }
    for (const [wid, w] of [...served].sort((a, b) => a[0].localeCompare(b[0]))) {
      if (!forms.has(wid)) { const form = startForm(w); forms.set(wid, form); list.append(form.el); }
    }
    note.hidden = forms.size > 0;
  });
  refresh();
  setInterval(refresh, 15_000);
  return section;
}

function startForm(w) {
  const name = w.name && w.name !== w.workflowId ? `${w.name} (${w.workflowId})` : w.workflowId;
  const input = h("textarea", { class: "start-input", rows: 2, spellcheck: "false", "aria-label": `Input for ${name}, as JSON` }, "{}");
  const error = h("p", { class: "control-error", role: "alert", "aria-live": "assertive" });
  const button = h("button", { type: "submit", class: "control" }, "Start");
  const form = { busy: false, el: null };
  const submit = async (ev) => {
    ev.preventDefault();
    error.textContent = "";
    const text = input.value.trim();
    let value = null;
    try { value = text ? JSON.parse(text) : null; } catch (err) {
      input.setAttribute("aria-invalid", "true");
      error.textContent = `The input is not valid JSON: ${err.message}`;
      return;
    }
    input.removeAttribute("aria-invalid");
    form.busy = true; button.disabled = true; button.setAttribute("aria-busy", "true");
    const answer = await post("/api/v1/executions", value === null ? { workflowId: w.workflowId } : { workflowId: w.workflowId, input: value });
    if (ok(answer)) { location.assign(executionHref(answer.body.executionId)); return; }
    form.busy = false; button.disabled = false; button.removeAttribute("aria-busy");
    error.textContent = failedText("Start", answer);
  };
  form.el = h("form", { class: "start-form", "data-workflow": w.workflowId, onsubmit: submit },
    h("div", { class: "start-name" }, h("b", {}, name), w.version ? h("span", { class: "muted" }, ` v${w.version}`) : null),
    input, button, error);
  return form;
}

// ---------------------------------------------------------------- one execution
function executionView(id) {
  const state = { lastSeq: 0, nodes: new Map(), order: [], status: RS.PENDING, progress: 0, eta: null, meta: {}, warnings: [], finished: false };
  const metaEl = h("div", { class: "meta", id: "meta" });
  const bar = h("div", { style: "width:0%" });
  const progressText = h("div", { class: "meta", id: "progress-text" });
  const dagEl = h("div", { class: "dag", id: "dag" });
  const warnEl = h("ul", { class: "warnings", id: "warnings" });
  const noWarnings = h("p", { class: "empty", id: "no-warnings" }, "No node has passed its time threshold.");
  const errorEl = h("div", { id: "error" });
  const linksEl = h("div", { class: "links", id: "links" });
  const logEl = h("div", { class: "log", id: "log", role: "log" });
  const controlsSlot = h("div", { id: "controls-slot" });
  app.replaceChildren(h("p", {}, h("a", { href: `/${TOKEN ? `?token=${TOKEN}` : ""}` }, "← all executions")),
    h("h1", { id: "title" }, `Execution ${id}`), metaEl, h("div", { class: "progress", role: "progressbar", "aria-label": "progress" }, bar), progressText,
    controlsSlot, linksEl, errorEl, h("h2", {}, "Graph"), dagEl, h("h2", {}, "Performance"), noWarnings, warnEl, h("h2", {}, "Event log"), logEl);

  const node = (nid) => {
    if (!state.nodes.has(nid)) { state.nodes.set(nid, { id: nid, label: nid, type: "", dependsOn: [], state: NS.PENDING, attempts: 0, durationMs: null, error: null }); state.order.push(nid); }
    return state.nodes.get(nid);
  };
  const renderMeta = () => {
    const m = state.meta;
    metaEl.replaceChildren(...[
      h("span", {}, "Status ", h("span", { class: statusClass(state.status), id: "status", "data-status": state.status }, state.status)),
      h("span", {}, "Workflow ", h("b", {}, m.workflowName || m.workflowId || "…")),
      m.trigger ? h("span", {}, "Trigger ", h("b", {}, m.trigger)) : null,
      m.userId ? h("span", {}, "User ", h("b", {}, m.userId)) : null,
      h("span", {}, "Duration ", h("b", {}, fmtMs(m.durationMs))),
    ].filter(Boolean));
    bar.style.width = `${Math.round(state.progress * 100)}%`;
    const parts = [h("span", {}, `${Math.round(state.progress * 100)}% done`)];
    if (state.eta !== null && !state.finished) parts.push(h("span", { id: "eta" }, `ETA ${fmtMs(state.eta)}`));
    progressText.replaceChildren(...parts);
  };
  const renderDag = () => {
    const depth = new Map();
    const depthOf = (nid, seen = new Set()) => {
      if (depth.has(nid)) return depth.get(nid);
      if (seen.has(nid)) return 0; seen.add(nid);
      const deps = (state.nodes.get(nid)?.dependsOn || []).filter((d) => state.nodes.has(d));
      const d = deps.length ? 1 + Math.max(...deps.map((x) => depthOf(x, seen))) : 0;
      depth.set(nid, d); return d;
    };
    const layers = [];
    for (const nid of state.order) { const d = depthOf(nid); (layers[d] = layers[d] || []).push(nid); }
    const W = 190, H = 56, GX = 60, GY = 18;
    const pos = new Map();
    layers.forEach((layer, x) => layer.forEach((nid, y) => pos.set(nid, { x: 10 + x * (W + GX), y: 10 + y * (H + GY) })));
    const width = 20 + layers.length * (W + GX), height = 20 + Math.max(1, ...layers.map((l) => l.length)) * (H + GY);
    const root = svg("svg", { width, height, role: "img", "aria-label": "workflow graph" });
    const defs = svg("defs"); const marker = svg("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5, markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" });
    marker.append(svg("path", { d: "M 0 0 L 10 5 L 0 10 z", fill: "#9ca3af" })); defs.append(marker); root.append(defs);
    for (const n of state.nodes.values()) for (const d of n.dependsOn) {
      const a = pos.get(d), b = pos.get(n.id); if (!a || !b) continue;
      root.append(svg("path", { class: "edge", d: `M ${a.x + W} ${a.y + H / 2} C ${a.x + W + GX / 2} ${a.y + H / 2}, ${b.x - GX / 2} ${b.y + H / 2}, ${b.x} ${b.y + H / 2}` }));
    }
    for (const n of state.nodes.values()) {
      const p = pos.get(n.id);
      const g = svg("g", { class: `node s-${n.state}`, "data-node": n.id, "data-state": n.state, transform: `translate(${p.x},${p.y})` });
      const title = svg("title"); title.textContent = n.error ? `${n.label}: ${n.error}` : `${n.label} (${n.state})`;
      const rect = svg("rect", { width: W, height: H, fill: `var(--${n.state})` });
      const t1 = svg("text", { x: 10, y: 22 }); t1.textContent = n.label.length > 24 ? n.label.slice(0, 23) + "…" : n.label;
      const t2 = svg("text", { x: 10, y: 42, class: "sub" });
      t2.textContent = `${n.type || ""} · ${n.state}${n.durationMs !== null ? " · " + fmtMs(n.durationMs) : ""}${n.attempts > 1 ? " · try " + n.attempts : ""}`;
      g.append(title, rect, t1, t2); root.append(g);
    }
    dagEl.replaceChildren(root);
  };
  const log = (msg) => {
    const d = msg.data || {};
    let text = msg.type, cls = "";
    if (msg.nodeId) text += ` ${msg.nodeId}`;
    if (msg.type === E.EXECUTION_LOG) { text = `[${d.level}] ${msg.nodeId || ""}: ${d.message}`; cls = d.level === "error" ? "err" : d.level === "warning" ? "warn" : ""; }
    else if (msg.type.endsWith(".failed")) { text += ` — ${d.error || ""}`; cls = "err"; }
    else if (msg.type === E.NODE_RETRYING) { text += ` in ${fmtMs(d.delayMs)} (${d.error || ""})`; cls = "warn"; }
    else if (msg.type === E.NODE_SKIPPED) { text += ` — ${d.reason || ""}`; cls = "dim"; }
    else if (msg.type === E.WORKFLOW_LOST) { text += ` — engine ${d.engineName || d.engineId || "?"} ${d.reason || ""}`; cls = "engine-lost"; }
    else if (d.durationMs !== undefined) text += ` (${fmtMs(d.durationMs)})`;
    if (msg.type === E.EXECUTION_PROGRESS) return;
    logEl.append(h("div", { class: cls, "data-seq": msg.seq, "data-type": msg.type }, `${fmtTime(msg.ts)}  #${msg.seq}  ${text}`));
    logEl.scrollTop = logEl.scrollHeight;
  };
  const apply = (msg) => {
    const d = msg.data || {};
    if (msg.derived) {
      if (msg.type.startsWith("performance.")) {
        const level = msg.type.split(".")[1];
        noWarnings.remove();
        warnEl.append(h("li", { class: level, "data-node": msg.nodeId },
          `${level === "critical" ? "Critical" : "Slow"}: ${msg.nodeId} ${d.running ? "has been running" : "took"} ${fmtMs(d.actualMs)} (threshold ${fmtMs(d.thresholdMs)})`));
      }
      return;
    }
    if (msg.seq <= state.lastSeq) return;
    state.lastSeq = msg.seq;
    Object.assign(state.meta, { workflowId: msg.workflowId, workflowName: msg.workflowName });
    if (msg.type === E.WORKFLOW_STARTED) {
      state.status = RS.RUNNING;
      Object.assign(state.meta, { trigger: d.trigger, userId: d.userId });
      for (const spec of d.nodes || []) Object.assign(node(spec.id), { label: spec.label || spec.id, type: spec.type, dependsOn: spec.dependsOn || [] });
    } else if (msg.nodeId && msg.type.startsWith("node.")) {
      const n = node(msg.nodeId);
      n.type = msg.nodeType || n.type;
      const next = nodeStateOf(msg.type, d);
      if (next) n.state = next;
      if (d.attempt) n.attempts = Math.max(n.attempts, d.attempt);
      if (d.durationMs !== undefined) n.durationMs = d.durationMs;
      if (next === NS.FAILED) n.error = d.error;
    } else if (msg.type === E.EXECUTION_PROGRESS) {
      state.progress = d.progress ?? state.progress; state.eta = d.etaMs ?? null;
    } else if (msg.type === E.WORKFLOW_PAUSED) state.status = RS.PAUSED;
    else if (msg.type === E.WORKFLOW_RESUMED) state.status = RS.RUNNING;
    else if (msg.type === E.WORKFLOW_LOST) state.status = RS.LOST;
    else if (msg.type === E.WORKFLOW_RECOVERED) state.status = RS.RUNNING;
    else if (TERMINAL.has(msg.type)) {
      state.finished = true; state.status = d.result || msg.type.split(".")[1]; state.meta.durationMs = d.durationMs;
      if (msg.type === E.WORKFLOW_COMPLETED) state.progress = 1;
      if (d.error) errorEl.replaceChildren(h("div", { class: "error-box" }, d.error));
    }
    log(msg);
  };
  const steer = runControls(id, state, () => schedule());
  steering.then((controls) => { steer.grant(controls, controlsSlot); schedule(); });
  let pending = false;
  const schedule = () => { if (!pending) { pending = true; requestAnimationFrame(() => { pending = false; renderMeta(); renderDag(); steer.render(); }); } };
  api(`/api/v1/executions/${encodeURIComponent(id)}`).then(({ status, body }) => {
    if (status !== 200) return;
    Object.assign(state.meta, { trigger: body.trigger, userId: body.userId, durationMs: body.durationMs });
    state.meta.workflowId = state.meta.workflowId || body.workflowId;
    const l = body.links || {};
    linksEl.replaceChildren(...[l.jaeger && h("a", { href: l.jaeger, target: "_blank", rel: "noopener" }, "Trace in Jaeger"),
      l.grafana && h("a", { href: l.grafana, target: "_blank", rel: "noopener" }, "Grafana")].filter(Boolean));
    schedule();
  });
  liveSocket(() => `/ws/executions/${encodeURIComponent(id)}?fromSeq=${state.lastSeq + 1}`, () => {}, (msg) => {
    if (msg.type === CT.ERROR) { errorEl.replaceChildren(h("div", { class: "error-box" }, msg.message)); return; }
    if (msg.executionId === id) { apply(msg); schedule(); }
  });
  renderMeta();
}

// ---------------------------------------------------------------- steering one run
// Buttons follow the run's live status: Pause or Resume and Stop while it runs; Retry (from its
// first failed node, the server's default) or Retry from a chosen node once it failed, was
// cancelled or was lost. One command at a time: every button waits for the answer.
const RETRYABLE = new Set([RS.FAILURE, RS.ERROR, RS.TIMEOUT, RS.CANCELLATION, RS.LOST]);

function runControls(id, state, changed) {
  let slot = null, section = null, controls = [], busy = false, stopping = false, drawn = "", fromNode = null, refocus = false;
  const buttons = h("div", { class: "control-buttons" });
  const error = h("p", { id: "control-error", class: "control-error", role: "alert", "aria-live": "assertive" });
  const note = h("p", { id: "control-note", class: "muted", "aria-live": "polite" });
  // Built once the run's workflow is known to be one the token may steer: else never.
  const allowed = () => {
    if (section === null && slot !== null && state.meta.workflowId && maySteer(controls, state.meta.workflowId)) {
      section = h("section", { id: "controls", class: "controls", "aria-label": "Steer this run", hidden: "" }, buttons, note, error);
      slot.replaceWith(section);
    }
    return section !== null;
  };
  const button = (label, path, body = () => ({})) => h("button", {
    type: "button", class: "control", "data-command": path, onclick: () => send(label, path, body()),
  }, label);
  const stateOf = (nid) => state.nodes.get(nid).state;
  const firstFailed = () => state.order.find((nid) => stateOf(nid) === NS.FAILED) ||
    state.order.find((nid) => stateOf(nid) !== NS.SUCCESS && stateOf(nid) !== NS.SKIPPED) || state.order[0];
  const retryFrom = () => {
    const chosen = fromNode !== null && state.nodes.has(fromNode) ? fromNode : firstFailed();
    const select = h("select", { id: "retry-node", onchange: (ev) => { fromNode = ev.target.value; } },
      state.order.map((nid) => h("option", { value: nid, selected: nid === chosen ? "" : null }, `${state.nodes.get(nid).label} (${state.nodes.get(nid).state})`)));
    return h("span", { class: "retry-from" }, h("label", { for: "retry-node" }, "From node"), select,
      button("Retry from this node", "retry", () => ({ fromNode: select.value })));
  };
  const render = () => {
    if (!allowed()) return;
    const status = state.status;
    const live = status === RS.RUNNING || status === RS.PAUSED;
    const retryable = RETRYABLE.has(status) && state.order.length > 0;
    // Rebuilt only when what is offered changed, so focus and a chosen node stay put.
    const key = JSON.stringify([status, stopping, retryable && state.order.map((nid) => state.nodes.get(nid).state)]);
    if (key !== drawn) draw(key, status, live, retryable);
    for (const el of section.querySelectorAll("button, select")) {
      el.disabled = busy;
      if (busy) el.setAttribute("aria-busy", "true"); else el.removeAttribute("aria-busy");
    }
    // After Pause, keyboard focus lands on Resume (and back), not on the page's start.
    if (refocus) { refocus = false; buttons.querySelector("button")?.focus(); }
  };
  const draw = (key, status, live, retryable) => {
    drawn = key;
    section.hidden = !live && !retryable;
    if (live && stopping) {
      buttons.replaceChildren();
      note.textContent = "Stop requested: waiting for the run to end.";
    } else if (live) {
      buttons.replaceChildren(status === RS.PAUSED ? button("Resume", "resume") : button("Pause", "pause"), button("Stop", "cancel"));
      note.textContent = "";
    } else if (retryable) {
      buttons.replaceChildren(button("Retry", "retry"), retryFrom());
      note.textContent = "Retry reruns the first failed node and everything after it; Retry from this node, the chosen one. Nodes before it reuse their outputs.";
    } else {
      buttons.replaceChildren();
      note.textContent = "";
    }
  };
  const send = async (label, path, body) => {
    const clicked = document.activeElement;
    busy = true; error.textContent = ""; render();
    const answer = await post(`/api/v1/executions/${encodeURIComponent(id)}/${path}`, body);
    // The new run's page; the buttons stay disabled until it loads.
    if (ok(answer) && path === "retry") { location.assign(executionHref(answer.body.executionId)); return; }
    busy = false;
    if (!ok(answer)) error.textContent = failedText(label, answer);
    // The engine applied it: shown now, its lifecycle event follows through the pipeline.
    else if (path === "pause") state.status = RS.PAUSED;
    else if (path === "resume") state.status = RS.RUNNING;
    else if (path === "cancel") stopping = true;
    refocus = ok(answer);
    render();
    // A disabled button loses focus: give it back to the one that was refused.
    if (!ok(answer) && clicked?.isConnected) clicked.focus();
    changed();
  };
  return {
    grant(granted, where) { controls = granted; slot = where; },
    render,
  };
}

const match = location.pathname.match(/^\/executions\/([^/]+)$/);
if (match) executionView(decodeURIComponent(match[1])); else listView();
