// Replika dashboard: live queue table, queue pages and message timelines, fed by server-sent events from
// /api/events and the JSON API.
// Plain JavaScript, no build step: the broker ships this file as is.
"use strict";

const state = {
  token: sessionStorage.getItem("replika-token") || "",
  queues: new Map(), // name -> latest row
  history: new Map(), // name -> [[t, ready, in_flight, delayed, publish/s, ack/s], ...]
  source: null,
  current: null, // queue shown on the queue page
  message: null, // {queue, id} shown on the message page
};
const HISTORY = 120;

const $ = (sel) => document.querySelector(sel);
const fmt = new Intl.NumberFormat();
const num = (n) => fmt.format(Math.round(n));
const rate = (n) => (n >= 100 ? num(n) : (Math.round(n * 10) / 10).toString());

function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return `${i ? n.toFixed(1) : n} ${units[i]}`;
}

function duration(s) {
  if (s < 60) return `${Math.floor(s)}s`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
  return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
}

function headers() {
  return state.token ? { Authorization: `Bearer ${state.token}` } : {};
}

async function api(method, path) {
  const response = await fetch(path, { method, headers: headers() });
  const body = await response.json().catch(() => ({}));
  if (response.status === 401) showLogin(body.message);
  if (!response.ok) throw new Error(`${body.code || response.status}: ${body.message || response.statusText}`);
  return body;
}

// ------------------------------------------------------------------------------------------- live feed
function connect() {
  if (state.source) state.source.close();
  const url = state.token ? `/api/events?token=${encodeURIComponent(state.token)}` : "/api/events";
  const source = new EventSource(url);
  state.source = source;
  source.addEventListener("history", (e) => {
    const data = JSON.parse(e.data);
    state.history = new Map(Object.entries(data.history));
    renderInfo(data.info);
  });
  source.addEventListener("sample", (e) => onSample(JSON.parse(e.data)));
  source.onopen = () => setLive(true);
  source.onerror = async () => {
    setLive(false);
    // EventSource retries by itself; if the token was refused it never will succeed: ask for one.
    const probe = await fetch("/api/info", { headers: headers() });
    if (probe.status === 401) { source.close(); showLogin(); }
  };
}

function setLive(on) {
  const live = $("#live");
  live.classList.toggle("on", on);
  live.classList.toggle("off", !on);
  live.querySelector("span").textContent = on ? "live" : "reconnecting";
}

function onSample(sample) {
  // When the page last got a sample (seconds since the epoch): what screenshots and tests wait for.
  document.body.dataset.sampled = String(sample.t);
  renderInfo(sample.info);
  const seen = new Set();
  for (const row of sample.queues) {
    seen.add(row.queue);
    state.queues.set(row.queue, row);
    const h = state.history.get(row.queue) || [];
    h.push([sample.t, row.ready, row.in_flight, row.delayed, row.rates.publish, row.rates.ack]);
    if (h.length > HISTORY) h.splice(0, h.length - HISTORY);
    state.history.set(row.queue, h);
  }
  for (const name of [...state.queues.keys()]) {
    if (!seen.has(name)) { state.queues.delete(name); state.history.delete(name); }
  }
  renderOverview();
  if (state.current) renderQueue(false);
}

// ------------------------------------------------------------------------------------------- rendering
function renderInfo(info) {
  if (!info) return;
  const set = (key, value) => { for (const el of document.querySelectorAll(`[data-info="${key}"]`)) el.textContent = value; };
  set("version", `replika ${info.version}`);
  set("connections", num(info.connections));
  set("uptime", duration(info.uptime_seconds));
  set("store", bytes(info.store_bytes));
  set("durability", info.durability);
}

function renderOverview() {
  const rows = [...state.queues.values()].sort((a, b) => a.queue.localeCompare(b.queue));
  const body = $("#queue-rows");
  const existing = new Map([...body.children].map((tr) => [tr.dataset.queue, tr]));
  const totals = { queues: rows.length, ready: 0, in_flight: 0, dead: 0, publish: 0, ack: 0 };
  rows.forEach((row, i) => {
    totals.ready += row.ready; totals.in_flight += row.in_flight;
    totals.publish += row.rates.publish; totals.ack += row.rates.ack;
    if (!row.queue.endsWith(".dlq")) totals.dead += row.dead;
    let tr = existing.get(row.queue);
    if (!tr) {
      tr = document.createElement("tr");
      tr.dataset.queue = row.queue;
      tr.innerHTML = `<td class="name"></td><td class="num" data-field="ready"></td><td class="num" data-field="in_flight"></td>
        <td class="num" data-field="delayed"></td><td class="num" data-field="dead"></td><td class="num" data-field="consumers"></td>
        <td class="num" data-field="publish"></td><td class="num" data-field="ack"></td><td class="spark"></td>`;
      tr.querySelector(".name").textContent = row.queue;
      tr.addEventListener("click", () => { location.hash = `#/queues/${encodeURIComponent(row.queue)}`; });
    }
    existing.delete(row.queue);
    const cell = (f) => tr.querySelector(`[data-field="${f}"]`);
    cell("ready").textContent = num(row.ready);
    cell("in_flight").textContent = num(row.in_flight);
    cell("delayed").textContent = num(row.delayed);
    cell("dead").innerHTML = row.dead ? `<span class="dead">${num(row.dead)}</span>` : "0";
    cell("consumers").textContent = num(row.consumers);
    cell("publish").textContent = rate(row.rates.publish);
    cell("ack").textContent = rate(row.rates.ack);
    tr.querySelector(".spark").innerHTML = sparkline(state.history.get(row.queue) || []);
    if (body.children[i] !== tr) body.insertBefore(tr, body.children[i] || null);
  });
  for (const tr of existing.values()) tr.remove();
  for (const [key, value] of Object.entries(totals)) {
    const el = document.querySelector(`[data-total="${key}"]`);
    if (el) el.textContent = key === "publish" || key === "ack" ? rate(value) : num(value);
  }
  $("#no-queues").classList.toggle("hidden", rows.length > 0);
}

function sparkline(h) {
  if (h.length < 2) return '<svg class="spark" viewBox="0 0 160 28"></svg>';
  const depth = h.map((p) => p[1] + p[2] + p[3]);
  const max = Math.max(1, ...depth);
  const pts = depth.map((d, i) => `${(i / (HISTORY - 1)) * 160 + (160 - ((h.length - 1) / (HISTORY - 1)) * 160)},${26 - (d / max) * 24}`);
  const first = pts[0].split(",")[0];
  return `<svg class="spark" viewBox="0 0 160 28" preserveAspectRatio="none">
    <polygon points="${first},28 ${pts.join(" ")} 160,28" fill="rgba(110,168,255,.18)"/>
    <polyline points="${pts.join(" ")}" stroke="var(--ready)"/></svg>`;
}

function chart(svg, h, series) {
  const W = 600, H = 180, pad = 4;
  if (h.length < 2) { svg.innerHTML = ""; return; }
  const t0 = h[0][0], t1 = h[h.length - 1][0];
  let max = 1;
  for (const [index] of series) for (const p of h) max = Math.max(max, p[index]);
  const x = (t) => ((t - t0) / Math.max(1e-9, t1 - t0)) * (W - 2 * pad) + pad;
  const y = (v) => H - pad - (v / max) * (H - 2 * pad - 14);
  let out = '<g class="grid">';
  for (let i = 1; i <= 3; i++) out += `<line x1="0" x2="${W}" y1="${(H / 4) * i}" y2="${(H / 4) * i}"/>`;
  out += `</g><text class="axis" x="${pad}" y="12">${num(max)}</text>`;
  for (const [index, color] of series) {
    out += `<polyline stroke="${color}" points="${h.map((p) => `${x(p[0]).toFixed(1)},${y(p[index]).toFixed(1)}`).join(" ")}"/>`;
  }
  svg.innerHTML = out;
}

// ------------------------------------------------------------------------------------------- queue page
function renderQueue(full) {
  const name = state.current;
  const row = state.queues.get(name);
  $("#q-name").textContent = name;
  if (row) {
    for (const el of document.querySelectorAll("[data-q]")) {
      const key = el.dataset.q;
      el.textContent = key === "bytes" ? bytes(row.bytes || 0) : num(row[key] || 0);
    }
    const opts = [`dead-letter queue ${row.dead_letter}`];
    opts.push(row.max_attempts ? `max ${row.max_attempts} attempts` : "unlimited attempts");
    if (row.max_length) opts.push(`max ${num(row.max_length)} messages`);
    if (row.max_bytes) opts.push(`max ${bytes(row.max_bytes)}`);
    const h = row.history;
    opts.push(h ? `history kept ${duration(h.retention)} after the end, up to ${num(h.max_messages)} messages` +
      (h.payloads ? ", with payloads" : "") : "no history");
    $("#q-options").textContent = opts.join(" · ");
    $("#btn-redrive").textContent = row.dead ? `Redrive ${num(row.dead)} dead letters` : "Redrive dead letters";
    $("#btn-redrive").disabled = !row.dead;
    $("#dlq-name").textContent = `(in ${row.dead_letter})`;
  }
  const h = state.history.get(name) || [];
  chart($("#chart-depth"), h, [[1, "var(--ready)"], [2, "var(--flight)"], [3, "var(--delayed)"]]);
  chart($("#chart-rates"), h, [[4, "var(--pub)"], [5, "var(--ack)"]]);
  if (full) loadMessages();
}

let peeking = false;
async function loadMessages() {
  const name = state.current;
  if (!name || peeking) return;
  peeking = true;
  try {
    const q = encodeURIComponent(name);
    const [ready, dead, history] = await Promise.all([
      api("GET", `/api/queues/${q}/messages?max=20`).catch(() => ({ messages: [] })),
      api("GET", `/api/queues/${q}/dead-letters?max=20`).catch(() => ({ messages: [] })),
      api("GET", `/api/queues/${q}/history?max=20`).catch(() => ({ messages: [] })),
    ]);
    if (name !== state.current) return; // the page moved on while this was loading
    fillMessages($("#peek-rows"), ready.messages, (m) => m.attempts);
    fillMessages($("#dead-rows"), dead.messages, (m) => m.headers["replika-dead-letter-reason"] || "");
    fillHistory(name, history.messages);
  } finally {
    peeking = false;
  }
}

function fillMessages(body, msgs, second) {
  body.innerHTML = "";
  if (!msgs.length) {
    body.innerHTML = '<tr><td colspan="5" class="empty">none</td></tr>';
    return;
  }
  for (const m of msgs) {
    const tr = document.createElement("tr");
    const cells = [m.id, second(m), new Date(m.published_at * 1000).toLocaleString(),
      m.encoding === "base64" ? `base64:${m.payload}` : m.payload, JSON.stringify(m.headers)];
    for (const c of cells) { const td = document.createElement("td"); td.textContent = c; td.title = c; tr.appendChild(td); }
    body.appendChild(tr);
  }
}

function messageHash(queue, id) {
  return `#/queues/${encodeURIComponent(queue)}/messages/${id}`;
}

function fillHistory(queue, msgs) {
  const body = $("#history-rows");
  // Refreshed every few seconds: leave the rows alone while nothing changed (a link being clicked stays put).
  const digest = JSON.stringify([queue, msgs.map((m) => [m.id, m.state, m.events.length])]);
  if (body.dataset.digest === digest) return;
  body.dataset.digest = digest;
  body.innerHTML = "";
  if (!msgs.length) {
    const row = state.queues.get(queue);
    const why = row && !row.history ? `none: ${queue} records no history (declare it with history on)` : "none yet";
    body.innerHTML = `<tr><td colspan="5" class="empty"></td></tr>`;
    body.querySelector("td").textContent = why;
    return;
  }
  for (const m of msgs) {
    const tr = document.createElement("tr");
    tr.dataset.id = String(m.id);
    const link = document.createElement("a");
    link.href = messageHash(queue, m.id);
    link.textContent = String(m.id);
    const cells = [link, m.state, new Date(m.published_at * 1000).toLocaleString(),
      m.events.map((e) => e.kind).join(", "), JSON.stringify(m.headers)];
    for (const c of cells) {
      const td = document.createElement("td");
      if (typeof c === "string") { td.textContent = c; td.title = c; } else td.appendChild(c);
      tr.appendChild(td);
    }
    body.appendChild(tr);
  }
}

// ------------------------------------------------------------------------------------------- message page
// A message dead-lettered or redriven lives on as a new message in another queue; its timeline follows those
// moves both ways (as far as those queues record history), at most this many messages.
const MAX_HOPS = 16;
const MOVES = new Set(["dead_lettered", "redriven"]);
const EVENT_FIELDS = new Set(["at", "kind", "attempt", "connection"]);

async function lifeOf(queue, id) {
  const get = (q, i) => api("GET", `/api/queues/${encodeURIComponent(q)}/messages/${i}`);
  const chain = [await get(queue, id)];
  while (chain.length < MAX_HOPS) {
    const first = chain[0].events[0];
    if (!first || first.kind !== "published" || first.from == null || first.from_id == null) break;
    const earlier = await get(first.from, first.from_id).catch(() => null);
    if (!earlier) break;
    chain.unshift(earlier);
  }
  while (chain.length < MAX_HOPS) {
    const events = chain[chain.length - 1].events;
    const last = events[events.length - 1];
    if (!last || !MOVES.has(last.kind) || last.to == null || last.id == null) break;
    const later = await get(last.to, last.id).catch(() => null);
    if (!later) break;
    chain.push(later);
  }
  return chain;
}

let tracing = false;
async function loadTimeline() {
  const shown = state.message;
  if (!shown || tracing) return;
  tracing = true;
  try {
    const chain = await lifeOf(shown.queue, shown.id);
    if (shown === state.message) renderTimeline(shown, chain);
  } catch (err) {
    if (shown === state.message) $("#m-error").textContent = err.message;
  } finally {
    tracing = false;
  }
}

function renderTimeline(shown, chain) {
  const m = chain.find((x) => x.queue === shown.queue && x.id === shown.id);
  const events = chain.flatMap((x) => x.events.map((e) => [x, e]));
  $("#m-error").textContent = "";
  $("#m-state").textContent = chain[chain.length - 1].state;
  $("#m-published").textContent = new Date(chain[0].published_at * 1000).toLocaleString();
  $("#m-deliveries").textContent = num(events.filter(([, e]) => e.kind === "delivered").length);
  $("#m-count").textContent = num(events.length);
  const body = $("#timeline-rows");
  body.innerHTML = "";
  for (const [x, e] of events) {
    const tr = document.createElement("tr");
    tr.dataset.kind = e.kind;
    tr.dataset.queue = x.queue;
    tr.dataset.id = String(x.id);
    if (x === m) tr.classList.add("this");
    const where = link(x.queue, x.id, `${x.queue} #${x.id}`);
    const cells = [new Date(e.at * 1000).toISOString(), e.kind, e.attempt ? String(e.attempt) : "",
      e.connection ? String(e.connection) : "", where, details(e)];
    for (const c of cells) {
      const td = document.createElement("td");
      if (typeof c === "string") td.textContent = c; else td.appendChild(c);
      tr.appendChild(td);
    }
    tr.children[1].classList.add("kind");
    body.appendChild(tr);
  }
  fillHeaders(m.headers);
  const note = $("#m-payload-note");
  if (m.payload == null) {
    $("#m-payload").textContent = "";
    note.textContent = `(not kept: ${m.queue}'s history keeps headers only)`;
  } else {
    $("#m-payload").textContent = m.encoding === "base64" ? `base64:${m.payload}` : m.payload;
    note.textContent = "(kept by the history)";
  }
}

function link(queue, id, text) {
  const a = document.createElement("a");
  a.href = messageHash(queue, id);
  a.textContent = text;
  return a;
}

function details(e) {
  const span = document.createElement("span");
  const parts = [];
  for (const [key, value] of Object.entries(e)) {
    if (EVENT_FIELDS.has(key) || value == null) continue;
    if (key === "to" && e.id != null) parts.push(["to ", link(value, e.id, `${value} #${e.id}`)]);
    else if (key === "from" && e.from_id != null) parts.push(["from ", link(value, e.from_id, `${value} #${e.from_id}`)]);
    else if (!((key === "id" && e.to != null) || (key === "from_id" && e.from != null))) {
      parts.push([`${key}=${typeof value === "string" ? value : JSON.stringify(value)}`]);
    }
  }
  parts.forEach((part, i) => {
    if (i) span.append(" · ");
    span.append(...part);
  });
  return span;
}

function fillHeaders(h) {
  const body = $("#m-headers");
  body.innerHTML = "";
  const entries = Object.entries(h || {});
  if (!entries.length) {
    body.innerHTML = '<tr><td colspan="2" class="empty">none</td></tr>';
    return;
  }
  for (const [key, value] of entries) {
    const tr = document.createElement("tr");
    for (const c of [key, value]) { const td = document.createElement("td"); td.textContent = c; tr.appendChild(td); }
    body.appendChild(tr);
  }
}

async function act(button, method, path, confirmText, done) {
  if (confirmText && !confirm(confirmText)) return;
  const status = $("#action-status");
  button.disabled = true;
  try {
    const result = await api(method, path);
    status.textContent = done(result);
    loadMessages();
  } catch (err) {
    status.textContent = err.message;
  } finally {
    button.disabled = false;
  }
}

function route() {
  const msg = location.hash.match(/^#\/queues\/([^/]+)\/messages\/(\d+)$/);
  const m = msg ? null : location.hash.match(/^#\/queues\/(.+)$/);
  state.message = msg ? { queue: decodeURIComponent(msg[1]), id: Number(msg[2]) } : null;
  state.current = m ? decodeURIComponent(m[1]) : null;
  $("#overview").classList.toggle("hidden", !!(state.current || state.message));
  $("#queue-view").classList.toggle("hidden", !state.current);
  $("#message-view").classList.toggle("hidden", !state.message);
  $("#action-status").textContent = "";
  if (state.current) renderQueue(true);
  if (state.message) showMessage(state.message);
}

function showMessage(shown) {
  const back = $("#m-queue");
  back.textContent = shown.queue;
  back.href = `#/queues/${encodeURIComponent(shown.queue)}`;
  $("#m-id").textContent = String(shown.id);
  for (const id of ["#timeline-rows", "#m-headers"]) $(id).innerHTML = "";
  $("#m-payload").textContent = "";
  $("#m-payload-note").textContent = "";
  $("#m-error").textContent = "";
  loadTimeline();
}

function showLogin(message) {
  $("#login").classList.remove("hidden");
  $("#overview").classList.add("hidden");
  $("#queue-view").classList.add("hidden");
  $("#message-view").classList.add("hidden");
  if (message && state.token) $("#login-error").textContent = message;
}

// ------------------------------------------------------------------------------------------- wiring
$("#login-form").addEventListener("submit", (e) => {
  e.preventDefault();
  state.token = $("#token").value.trim();
  sessionStorage.setItem("replika-token", state.token);
  $("#login").classList.add("hidden");
  $("#login-error").textContent = "";
  route();
  connect();
});
$("#btn-purge").addEventListener("click", (e) => act(e.target, "POST", `/api/queues/${encodeURIComponent(state.current)}/purge`,
  `Delete every message of ${state.current} that is not leased?`, (r) => `purged ${num(r.purged)} messages`));
$("#btn-redrive").addEventListener("click", (e) => act(e.target, "POST", `/api/queues/${encodeURIComponent(state.current)}/redrive`,
  null, (r) => `moved ${num(r.moved)} messages back`));
$("#btn-delete").addEventListener("click", (e) => act(e.target, "DELETE", `/api/queues/${encodeURIComponent(state.current)}`,
  `Delete queue ${state.current} and all its messages?`, () => { location.hash = "#/"; return "deleted"; }));
window.addEventListener("hashchange", route);
setInterval(() => {
  if (document.hidden) return;
  if (state.current) loadMessages();
  // A life still going on (waiting or in flight) gets new events: keep its timeline current.
  const ongoing = ["waiting", "in_flight"].includes($("#m-state").textContent);
  if (state.message && ongoing) loadTimeline();
}, 3000);

route();
connect();
