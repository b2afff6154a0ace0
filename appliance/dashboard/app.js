// The appliance dashboard: node install progress, backends, leases and CSR decisions.
// Plain DOM, no framework, no build step. Data from /api/v1; node events arrive live
// over Server-Sent Events (/api/v1/events), each one refreshes the node timelines.
// Everything shown is set as text (event details come from the network: never HTML).
"use strict";

const STAGE_LABELS = {  // short: thirteen stages share one row (the full name is in the tooltip)
  "dhcp-offer": "DHCP offer", "dhcp-ack": "DHCP ack", "bootloader": "boot loader",
  "kernel": "kernel", "initramfs": "initramfs", "ignition": "ignition",
  "machine-config": "MCS fetch", "csr-client": "client CSR", "csr-serving": "serving CSR",
  "node-ready": "node Ready", "bootstrap-complete": "bootstrap done",
  "gpu-discovered": "GPU found", "gpu-operator-ready": "operator", "gpu-validated": "validated",
  "boot-error": "boot error",
};
const MAX_EVENTS = 60;
const SLOW_REFRESH_MS = 5000;

const state = {
  token: sessionStorage.getItem("appliance-token") || "",
  skew: 0,            // server time - local time (seconds): "waiting for" counts on the server's clock
  nodes: [],
  lastEventId: null,
  source: null,
  refreshTimer: null,
};

// --- small helpers --------------------------------------------------------------------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "style") el.style.cssText = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

function $(id) { return document.getElementById(id); }

function now() { return Date.now() / 1000 + state.skew; }

function clock(t) {
  if (t === null || t === undefined) return "";
  return new Date(t * 1000).toLocaleTimeString([], { hour12: false });
}

function stamp(t) {
  if (t === null || t === undefined) return "";
  return new Date(t * 1000).toLocaleString([], { hour12: false });
}

function span(seconds) {
  if (seconds === null || seconds === undefined || !isFinite(seconds)) return "";
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 60) return `${seconds}s`;
  const m = Math.floor(seconds / 60), s = seconds % 60;
  if (m < 60) return `${m}m ${String(s).padStart(2, "0")}s`;
  const hr = Math.floor(m / 60);
  if (hr < 48) return `${hr}h ${String(m % 60).padStart(2, "0")}m`;
  return `${Math.floor(hr / 24)}d ${hr % 24}h`;
}

function ago(t) { return t ? `${span(now() - t)} ago` : ""; }

function label(stage) { return STAGE_LABELS[stage] || stage; }

function replace(container, ...children) {
  container.replaceChildren(...children.flat());
}

async function api(path) {
  const headers = state.token ? { Authorization: `Bearer ${state.token}` } : {};
  const resp = await fetch(path, { headers, cache: "no-store" });
  if (resp.status === 401) {
    $("auth").hidden = false;
    throw new Error("unauthorized");
  }
  if (!resp.ok) throw new Error(`${path}: ${resp.status}`);
  return resp.json();
}

// Synchronous, for the first paint only: the page holds its first data before its load
// event, so a headless `chromium --screenshot` (taken at load) shows it, not "offline".
function apiNow(path) {
  const xhr = new XMLHttpRequest();
  xhr.open("GET", path, false);
  if (state.token) xhr.setRequestHeader("Authorization", `Bearer ${state.token}`);
  xhr.send();
  if (xhr.status === 401) throw new Error("unauthorized");
  if (xhr.status !== 200) throw new Error(`${path}: ${xhr.status}`);
  return JSON.parse(xhr.responseText);
}

function firstPaint() {
  try {
    const nodes = apiNow("/api/v1/nodes");
    state.skew = nodes.time - Date.now() / 1000;
    state.lastEventId = nodes.last_event_id;
    renderNodes(nodes, []);
    renderStatus(apiNow("/api/v1/status"));
    renderBackends(apiNow("/api/v1/backends"));
    renderLeases(apiNow("/api/v1/leases"));
    renderCsr(apiNow("/api/v1/csr-decisions?limit=50"));
    renderCluster(apiNow("/api/v1/cluster"));
    renderUnknown(apiNow("/api/v1/unknown-machines?limit=20"));
  } catch (e) {
    return false;  // start() tries again the usual way and says why (locked, offline)
  }
  $("auth").hidden = true;
  // The daemon just answered every read: live. The event stream that connect() opens
  // next says "reconnecting…" if it cannot hold on. (Saying "connecting…" here made a
  // screenshot taken before the stream opened, as on a busy machine, look offline.)
  setLive("on", "live");
  return true;
}

// --- install progress -------------------------------------------------------------------

function nodeRow(node) {
  const steps = node.timeline.map((entry) => {
    const title = entry.state === "error"
      ? `${entry.stage}: boot error at ${stamp(entry.error_time)}\n${entry.error}`
      : entry.first
      ? `${entry.stage}\n${stamp(entry.last)}${entry.detail ? "\n" + entry.detail : ""}` +
        (entry.state === "previous" ? "\n(previous install)" : "")
      : `${entry.stage}: ${entry.state === "next" ? "waiting for it" : entry.state}`;
    return h("div", { class: `step ${entry.state}`, title, "data-stage": entry.stage, "data-state": entry.state },
      h("div", { class: "pin" }),
      h("div", { class: "label" }, label(entry.stage)),
      h("div", { class: "when" }, entry.state === "done" ? clock(entry.last)
        : entry.state === "error" ? clock(entry.error_time) : "\u00a0"));
  });
  const current = node.current
    ? `${label(node.current)}`
    : "not seen yet";
  const detail = node.current && node.stages[node.current] ? node.stages[node.current].detail : "";
  const waiting = node.complete
    ? "complete"
    : `waiting for ${label(node.waiting_for)}` + (node.since ? ` · ${span(now() - node.since)}` : "");
  // A refused boot file (403/404, a TFTP error): red until the node gets past that stage.
  const error = node.boot_error
    ? h("div", { class: "boot-error", "data-role": "boot-error", title: `${stamp(node.boot_error.last)}\n${node.boot_error.detail}` },
      h("b", {}, "boot error "), node.boot_error.detail)
    : null;
  const cls = ["node", node.complete ? "complete" : "", node.boot_error ? "failed" : ""].filter(Boolean).join(" ");
  return h("div", { class: cls, id: `node-${node.name}`, "data-node": node.name, "data-boot-error": node.boot_error ? "1" : null },
    h("div", {},
      h("div", { class: "node-name" }, node.name,
        h("span", { class: `badge role-${node.role}` }, node.role),
        node.gpu ? h("span", { class: "badge gpu" }, "GPU") : null),
      h("div", { class: "node-meta mono" }, `${node.ip} · ${node.mac}`),
      h("div", { class: "node-meta" }, `next boot: ${node.next_boot === "local" ? "local disk" : "install"}`)),
    h("div", { class: "track" }, steps),
    h("div", { class: "state" },
      h("div", { class: "now", "data-role": "current" }, current),
      h("div", { class: "wait", "data-role": "waiting", "data-since": node.since || "", "data-complete": node.complete ? "1" : "" },
        waiting),
      detail && !error ? h("div", { class: "wait mono", title: detail }, detail.length > 34 ? detail.slice(0, 33) + "…" : detail) : null,
      error,
      h("div", { class: "bar", title: `${Math.round(node.progress * 100)}%` },
        h("div", { style: `width:${(node.progress * 100).toFixed(1)}%` }))));
}

function renderNodes(body, changed) {
  state.nodes = body.nodes;
  const rows = body.nodes.map(nodeRow);
  if (!rows.length) replace($("nodes"), h("div", { class: "empty" }, "no nodes in the inventory"));
  else replace($("nodes"), rows);
  for (const name of changed || []) {
    const row = document.getElementById(`node-${name}`);
    if (row) row.classList.add("flash");
  }
  const installed = body.nodes.filter((n) => n.timeline.some((e) => e.stage === "ignition" && e.state === "done"));
  const members = body.nodes.filter((n) => n.role !== "bootstrap");
  const ready = members.filter((n) => n.timeline.some((e) => e.stage === "node-ready" && e.state === "done"));
  $("c-installed").textContent = `${installed.length} / ${body.nodes.length}`;
  $("c-installed-foot").textContent = `${body.nodes.filter((n) => n.complete).length} complete`;
  $("c-ready").textContent = `${ready.length} / ${members.length}`;
  $("c-ready-foot").textContent = "nodes Ready in the cluster";
}

function tickWaiting() {
  for (const el of document.querySelectorAll('[data-role="waiting"]')) {
    if (el.dataset.complete) continue;
    const since = parseFloat(el.dataset.since);
    if (!isFinite(since)) continue;
    el.textContent = el.textContent.replace(/ · .*$/, "") + ` · ${span(now() - since)}`;
  }
  const up = $("uptime");
  if (up.dataset.started) up.textContent = `up ${span(now() - parseFloat(up.dataset.started))}`;
}

async function refreshNodes(changed) {
  const body = await api("/api/v1/nodes");
  state.skew = body.time - Date.now() / 1000;
  if (state.lastEventId === null) state.lastEventId = body.last_event_id;
  renderNodes(body, changed);
}

// --- live events ----------------------------------------------------------------------

function setLive(mode, text) {
  $("live").className = `live ${mode}`;
  $("live-text").textContent = text;
}

function addEvent(ev, fresh) {
  const list = $("events");
  // ok === false: a refused attempt (a CSR left pending or denied), not a stage reached.
  const cls = [fresh ? "new" : "", ev.ok === false ? "refused" : "",
    ev.stage === "boot-error" ? "error" : ""].filter(Boolean).join(" ");
  const item = h("li", { class: cls, "data-id": ev.id, "data-ok": String(ev.ok !== false) },
    h("span", { class: "t mono" }, clock(ev.time)),
    h("span", {}, ev.node),
    h("span", {}, label(ev.stage)),
    h("span", { class: "d mono", title: ev.detail }, ev.detail || ev.source));
  list.prepend(item);
  while (list.children.length > MAX_EVENTS) list.lastElementChild.remove();
  $("events-note").textContent = `last: ${ev.node} ${label(ev.stage)}`;
}

function connect() {
  if (state.source) state.source.close();
  const params = new URLSearchParams({ backlog: "30" });
  if (state.lastEventId !== null) params.set("after", String(Math.max(0, state.lastEventId - 30)));
  if (state.token) params.set("access_token", state.token);
  const source = new EventSource(`/api/v1/events?${params}`);
  state.source = source;
  let pending = new Set();
  source.onopen = () => setLive("on", "live");
  source.onerror = () => setLive("wait", "reconnecting…");
  source.addEventListener("stage", (msg) => {
    let ev;
    try { ev = JSON.parse(msg.data); } catch (e) { return; }
    const fresh = state.lastEventId === null || ev.id > state.lastEventId;
    addEvent(ev, fresh);
    if (!fresh) return;
    state.lastEventId = ev.id;
    pending.add(ev.node);
    // A burst of events (a boot storm) becomes one refresh.
    clearTimeout(state.refreshTimer);
    state.refreshTimer = setTimeout(() => {
      const changed = pending;
      pending = new Set();
      refreshNodes(changed).catch(() => {});
      refreshSide().catch(() => {});
    }, 150);
  });
}

// --- side panels ----------------------------------------------------------------------

function pill(value) { return h("span", { class: `pill ${value}` }, value); }

function table(headers, rows, empty) {
  if (!rows.length) return h("div", { class: "empty" }, empty);
  return h("table", {}, h("thead", {}, h("tr", {}, headers.map((x) => h("th", {}, x)))),
    h("tbody", {}, rows.map((r) => h("tr", {}, r.map((c) => h("td", {}, c))))));
}

// Where a backend's health check goes, beside its address: the ingress is probed on the
// router's :1936, not on the port that carries the traffic.
function checkTarget(check) {
  if (!check || check.port === null || check.port === undefined) return null;
  return h("span", { class: "muted check", title: `${check.kind} check every ${check.interval} s` },
    ` · check :${check.port}${check.path || ""}`);
}

function renderBackends(body) {
  const frontends = Object.entries(body.frontends || {});
  let up = 0, total = 0;
  const blocks = frontends.map(([name, fe]) => {
    const rows = fe.backends.map((b) => {
      total += 1;
      if (b.health === "up" && b.admin === "enabled") up += 1;
      const last = b.checks && b.checks.length ? b.checks[b.checks.length - 1] : null;
      return [h("span", {}, b.name), h("span", { class: "mono" }, b.address, checkTarget(fe.check)), pill(b.health), pill(b.admin),
        `${b.active} / ${b.total}`, last ? h("span", { class: "muted", title: last.detail }, ago(last.time)) : "–"];
    });
    return h("div", { class: "fe" },
      h("div", { class: "fe-head" }, h("b", {}, name),
        h("span", { class: "muted mono" }, `${fe.listen || "off"} · ${fe.balance} · ${fe.active} open`)),
      table(["backend", "address", "health", "admin", "conns", "checked"], rows, "no backends"));
  });
  replace($("backends"), blocks.length ? blocks : [h("div", { class: "empty" }, body.running ? "no frontends" : "the load balancer is off (no frontend listens)")]);
  $("c-backends").textContent = total ? `${up} / ${total}` : "–";
  $("c-backends-foot").textContent = `${frontends.length} frontends`;
  $("lb-note").textContent = body.running ? (body.splice ? "splice() pump" : "buffered pump") : "";
}

function renderLeases(body) {
  const rows = body.leases.map((l) => [
    l.node || h("span", { class: "muted" }, "(pool)"), h("span", { class: "mono" }, l.ip),
    h("span", { class: "mono" }, l.mac), pill(l.state), span(l.expires_in)]);
  replace($("leases"), table(["node", "address", "MAC", "state", "expires in"], rows, "no active leases"));
  $("c-leases").textContent = String(body.leases.filter((l) => l.state === "bound").length);
  $("c-leases-foot").textContent = `${body.leases.length} in the table`;
  $("leases-note").textContent = `updated ${clock(body.time)}`;
}

function renderCsr(body) {
  const rows = body.decisions.slice(0, 12).map((d) => [
    h("span", { class: "muted" }, clock(d.time)), d.node || "–", d.kind, pill(d.decision),
    h("span", { class: "muted", title: `${d.csr}\n${d.requestor}` }, d.reason)]);
  replace($("csr"), table(["time", "node", "kind", "decision", "reason"], rows, "no CSR reviewed yet"));
  const counts = body.counts || {};
  $("c-csr").textContent = String(Object.values(counts).reduce((a, b) => a + b, 0));
  $("c-csr-foot").textContent = `${counts.approve || 0} approved · ${counts.deny || 0} denied · ${counts.pending || 0} pending`;
}

function compact(value) {
  if (value === null || value === undefined || value === "") return "–";
  if (Array.isArray(value)) return value.length ? value.join(", ") : "–";
  if (typeof value === "object") {
    const text = JSON.stringify(value);
    return text === "{}" ? "–" : h("span", { class: "mono", title: JSON.stringify(value, null, 2) }, text.length > 140 ? text.slice(0, 139) + "…" : text);
  }
  return String(value);
}

// The connection states of the cluster loop (services/cluster/service.py), in words.
function apiWords(conn) {
  const d = conn.detail ? ` ${conn.detail}` : "";
  switch (conn.state) {
    case undefined: case null: case "": return "–";
    case "connected": return `connected to${d}`;
    case "waiting-for-kubeconfig": return `waiting for the kubeconfig${d}`;
    case "kubeconfig-error": return `cannot use the kubeconfig:${d}`;
    case "connecting": return `connecting to${d}`;
    case "reconnecting": return `reconnecting (${conn.detail || "kubeconfig changed"})`;
    case "unauthorized": return `credentials refused:${d}`;
    default: return `${conn.state.replace(/-/g, " ")}${conn.detail ? ": " + conn.detail : ""}`;
  }
}

// What the GPU bring-up really waits for: nothing happens before the cluster loop has a
// kubeconfig and reaches the API, whatever step the store last recorded.
function gpuStatus(conn, live, gpu) {
  if (typeof live.status === "string" && live.status.startsWith("off")) return live.status;
  if (conn.state === "waiting-for-kubeconfig") return `waiting for the kubeconfig${conn.detail ? " " + conn.detail : ""}`;
  if (conn.state === "kubeconfig-error") return `waiting for a usable kubeconfig (${conn.detail || "unreadable"})`;
  if (conn.state && conn.state !== "connected") {
    return `waiting for the Kubernetes API (${apiWords(conn)})`;
  }
  return live.status || (gpu.waiting ? `waiting for ${gpu.waiting}` : "nothing recorded yet");
}

function bootstrapWords(boot, conn) {
  if (boot.complete) {
    const when = boot.time ? ` at ${stamp(boot.time)}` : "";
    const drained = boot.drained === undefined ? ""
      : boot.drained ? "; the bootstrap node is out of the load balancer" : "; still in the load balancer";
    return `complete${when}${drained}`;
  }
  const what = boot.waiting_for || "ConfigMap kube-system/bootstrap status complete";
  if (conn.state && conn.state !== "connected") return `not complete: the API comes first, then ${what}`;
  return `not complete: waiting for ${what}`;
}

function renderCluster(body) {
  const svc = body.service || {};
  const gpu = body.gpu && typeof body.gpu === "object" ? body.gpu : {};
  const live = svc.gpu || {};
  const conn = svc.connection || {};
  const waitingForApi = conn.state && conn.state !== "connected";
  const rows = [
    ["cluster loop", body.running ? "running" : "not running"],
    ["Kubernetes API", apiWords(conn)],
    ["GPU step", waitingForApi ? `${live.step || gpu.step || "–"} (not started: no API yet)` : live.step || gpu.step || "–"],
    ["status", gpuStatus(conn, live, gpu)],
    ["GPUs discovered on", compact(gpu.discovered)],
    // {node: when}: the node names, the times in the tooltip (words, not JSON)
    ["validated", gpu.validated && typeof gpu.validated === "object" && !Array.isArray(gpu.validated)
      ? h("span", { title: Object.entries(gpu.validated).map(([n, t]) => `${n} ${stamp(t)}`).join("\n") },
        compact(Object.keys(gpu.validated)))
      : compact(gpu.validated)],
  ];
  if (gpu.failed) rows.push(["last failure", String(gpu.failed)]);
  // A worker in trouble (forbidden: the rule it misses; backing off: why) gets a row.
  for (const [name, w] of Object.entries(svc.workers || {})) {
    if (w.state !== "ok" && w.state !== "off") rows.push([`${name} worker`, `${w.state} · ${w.detail || ""}`]);
  }
  const boot = svc.bootstrap || body.bootstrap;
  if (boot && typeof boot === "object") rows.push(["bootstrap", bootstrapWords(boot, conn)]);
  replace($("gpu"), h("div", { class: "gpu-grid" }, rows.flatMap(([k, v]) => [h("div", { class: "muted" }, k), h("div", {}, v)])));
  $("gpu-note").textContent = gpu.since && !waitingForApi ? `step since ${clock(gpu.since)}` : "";
}

function renderUnknown(body) {
  // Machines that PXE-booted here and got no answer; a MAC a digit or two from a node's
  // is most likely a typo in the inventory.
  const rows = body.machines.map((m) => [
    h("span", { class: "mono" }, m.mac), m.arch_name || m.arch || "–",
    h("span", { class: "muted", title: stamp(m.first_seen) }, ago(m.first_seen)),
    h("span", { class: "muted", title: stamp(m.last_seen) }, ago(m.last_seen)),
    String(m.seen),
    (m.closest || []).length
      ? h("span", { class: "hint" }, "did you mean " + m.closest.map((c) => `${c.key} ${c.name} ${c.mac}`).join(" or ") + "?")
      : ""]);
  replace($("unknown"), table(["MAC", "arch", "first seen", "last seen", "seen", ""], rows, "none: every machine that booted is in the inventory"));
  $("unknown-note").textContent = body.total
    ? `${body.total} machine${body.total === 1 ? "" : "s"}${body.evicted ? ` · ${body.evicted} forgotten` : ""}`
    : "";
}

function renderStatus(body) {
  $("cluster").textContent = `${body.cluster || "?"} · ${body.plan.nodes} nodes · ${Object.values(body.services).filter((s) => s.state === "running").length} services running`;
  $("version").textContent = `v${body.version}`;
  $("uptime").dataset.started = String(body.time - body.uptime);
  const ha = body.ha;
  $("ha").hidden = !ha;
  if (ha) {
    const eps = Object.values(ha.etcd.endpoints || {});
    const healthy = eps.filter((e) => e.healthy).length;
    const role = ha.leading
      ? `${ha.member} leads since ${stamp(ha.since)}`
      : `${ha.member} follows ${ha.leader || "(no leader)"}`;
    $("ha").textContent = `HA: ${role} · etcd ${healthy}/${eps.length} healthy`;
    $("ha").className = `ha ${ha.etcd.ok && healthy === eps.length ? "" : "warn"}`;
  }
}

async function refreshSide() {
  const [status, backends, leases, csr, cluster, unknown] = await Promise.all([
    api("/api/v1/status"), api("/api/v1/backends"), api("/api/v1/leases"),
    api("/api/v1/csr-decisions?limit=50"), api("/api/v1/cluster"),
    api("/api/v1/unknown-machines?limit=20")]);
  renderStatus(status);
  renderBackends(backends);
  renderLeases(leases);
  renderCsr(csr);
  renderCluster(cluster);
  renderUnknown(unknown);
}

// --- start ----------------------------------------------------------------------------

async function start() {
  try {
    await refreshNodes([]);
    await refreshSide();
    $("auth").hidden = true;
  } catch (e) {
    setLive("off", e.message === "unauthorized" ? "locked" : "offline");
    return false;
  }
  connect();
  return true;
}

document.addEventListener("DOMContentLoaded", () => {
  $("auth-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    state.token = $("token").value.trim();
    sessionStorage.setItem("appliance-token", state.token);
    start();
  });
  if (firstPaint()) connect();
  else start();
  setInterval(tickWaiting, 1000);
  setInterval(() => { refreshSide().catch(() => {}); }, SLOW_REFRESH_MS);
});
