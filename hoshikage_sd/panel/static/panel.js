// 星影パネル: plain JavaScript, no library, no build step. Every text from the server goes
// into the page through textContent: nothing it sends is read as HTML.
"use strict";

const KEY_ITEM = "hoshikage-panel-key";
const PHASE_LABEL = {
  "not-loaded": "not loaded", kept: "copy kept", staging: "staging", loading: "loading",
  serving: "serving", stopping: "stopping", failed: "failed",
};
// the records are read when a model's phase changes, else this often: each read is a
// process of hoshikage-journal@.service (README "Panel")
const EVENTS_EVERY_MS = 10000;

const view = {
  key: sessionStorage.getItem(KEY_ITEM) || "",
  data: null,
  phases: "",            // the models' phases at the last journal read
  journalAt: 0,
  copying: {},           // model -> [time, bytes] of the last poll, for a staging rate
  rates: {},
  busy: new Set(),       // models with an action under way from this page
  settling: new Map(),   // model -> when its action ended: its buttons wait for a newer state
  loading: null,         // the model a Load from this page left loading: its end is told
};

const $ = (id) => document.getElementById(id);

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") node.className = v;
    else if (k === "text") node.textContent = v;
    else if (k === "width") node.style.width = v;  // CSSOM: the page's CSP allows no style attributes
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children) if (c !== null && c !== undefined) node.append(c);
  return node;
}

function size(n) {
  if (n === null || n === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  while (Math.abs(n) >= 1024 && i < units.length - 1) { n /= 1024; i++; }
  return (i === 0 ? n.toFixed(0) : n.toFixed(n < 10 ? 2 : 1)) + " " + units[i];
}

function ago(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  seconds = Math.max(0, seconds);
  if (seconds < 60) return Math.round(seconds) + " s";
  if (seconds < 3600) return Math.floor(seconds / 60) + " min " + Math.round(seconds % 60) + " s";
  if (seconds < 86400) return Math.floor(seconds / 3600) + " h " + Math.floor(seconds % 3600 / 60) + " min";
  return Math.floor(seconds / 86400) + " d";
}

function headers(extra) {
  const h = Object.assign({}, extra || {});
  if (view.key) h.Authorization = "Bearer " + view.key;
  return h;
}

async function errorText(response) {
  try {
    const body = await response.json();
    const e = body.error;
    return (e && (e.message || e)) || response.statusText;
  } catch (_) { return response.status + " " + response.statusText; }
}

function notice(text) {
  const p = $("notice");
  p.hidden = !text;
  p.textContent = text || "";
}

function setLive(on, text) {
  const live = $("live");
  live.className = "live " + (on ? "on" : "off");
  live.textContent = text;
}

// --- the state, every poll_ms (none while the page is hidden: a panel left in a background
// tab asks nothing) ---------------------------------------------------------------------
let timer = null;
let polling = false;

function schedule(ms) {
  clearTimeout(timer);
  timer = setTimeout(poll, ms);
}

async function poll() {
  if (document.hidden || polling) return;  // visibilitychange starts it again
  polling = true;
  const began = performance.now();
  let wait = 1000;
  try {
    const r = await fetch("api/state", { headers: headers(), cache: "no-store" });
    if (r.ok) {
      const data = await r.json();
      // an action that ended before this state was asked for shows in it
      for (const [model, ended] of view.settling) if (ended <= began) view.settling.delete(model);
      wait = data.panel.poll_ms || wait;
      notice("");
      render(data);
      setLive(true, "live");
    } else {
      setLive(false, r.status === 401 ? "key needed" : "error " + r.status);
      notice(await errorText(r) + (r.status === 401 ? " — type the API key above." : ""));
      if (r.status === 401 || r.status === 403) { wait = 5000; clearModels(); }
    }
  } catch (_) {
    setLive(false, "offline");
    wait = 2000;
  }
  polling = false;
  // a poll every `wait` from start to start: a change shows within one period and one
  // answer, however long the answer took
  schedule(Math.max(0, wait - (performance.now() - began)));
}

function clearModels() {
  view.data = null;
  $("model-rows").replaceChildren();
  $("chat-model").replaceChildren();
  $("journal").replaceChildren();  // nothing a refused key may not see stays on screen
  for (const id of ["ramdisk-bar", "ramdisk-legend", "memory-bar", "devices"]) $(id).replaceChildren();
  for (const id of ["ramdisk-text", "memory-text"]) $(id).textContent = "";
}

function render(data) {
  view.data = data;
  $("version").textContent = data.panel.version;
  renderMemory(data);
  renderModels(data);
  renderChoices(data);
  const loaded = data.models.find((m) => m.name === view.loading);
  if (loaded && (loaded.phase === "serving" || loaded.phase === "failed")) {
    $("action-status").textContent = loaded.name + (loaded.phase === "serving" ? ": serving"
      : ": failed" + (loaded.error ? ": " + loaded.error : ""));
    view.loading = null;
  }
  const phases = data.models.map((m) => m.name + ":" + m.phase).join(",");
  if (phases !== view.phases || Date.now() - view.journalAt > EVENTS_EVERY_MS) {
    view.phases = phases;
    readJournal();
  }
}

function segment(cls, bytes, total, title) {
  const width = total > 0 ? Math.min(100, 100 * bytes / total) : 0;
  return el("span", { class: cls, width: width.toFixed(3) + "%", title });
}

function renderMemory(data) {
  renderRamdisk(data);
  renderHost(data);  // MemAvailable, GPUs, workers: whether the RAM disk is mounted or not
}

function renderRamdisk(data) {
  const disk = data.ramdisk;
  $("ramdisk-path").textContent = "RAM disk " + disk.path;
  const bar = $("ramdisk-bar");
  const legend = $("ramdisk-legend");
  if (!disk.mounted) {
    $("ramdisk-text").textContent = "not mounted (mounted on the first load)";
    bar.replaceChildren();
    legend.replaceChildren();
    bar.dataset.usedBytes = "";
    bar.dataset.sizeBytes = "";
    return;
  }
  const used = disk.used_bytes, total = disk.size_bytes;
  const pct = total ? 100 * used / total : 0;
  $("ramdisk-text").textContent = size(used) + " used of " + size(total) + " (" + pct.toFixed(1) + "%)";
  bar.dataset.usedBytes = used;
  bar.dataset.sizeBytes = total;
  bar.setAttribute("aria-valuenow", pct.toFixed(1));
  bar.setAttribute("aria-valuetext", size(used) + " of " + size(total));
  const parts = { serving: 0, kept: 0, copying: 0 };
  const segs = [];
  for (const m of data.models) {
    const staged = m.staged_bytes || 0;
    if (staged) {
      const kind = m.phase === "kept" || m.phase === "not-loaded" || m.phase === "failed" ? "kept" : "serving";
      parts[kind] += staged;
      segs.push(segment("seg-" + kind, staged, total, m.name + ": " + size(staged) + (kind === "kept" ? " (copy kept)" : "")));
    }
    if (m.copying_bytes) {
      parts.copying += m.copying_bytes;
      segs.push(segment("seg-copying", m.copying_bytes, total, m.name + ": copy being made, " + size(m.copying_bytes)));
    }
  }
  const other = Math.max(0, used - parts.serving - parts.kept - parts.copying);
  if (other > 0) segs.push(segment("seg-other", other, total, "other files: " + size(other)));
  bar.replaceChildren(...segs);
  const item = (cls, text) => el("li", {}, el("i", { class: cls, "aria-hidden": "true" }), text);
  legend.replaceChildren(
    item("seg-serving", "loaded models' copies " + size(parts.serving)),
    item("seg-kept", "kept copies " + size(parts.kept)),
    item("seg-copying", "copies being made " + size(parts.copying)),
    item("seg-other", "other " + size(other)),
  );
}

function renderHost(data) {
  const mem = data.memory;
  const usedMem = mem.total_bytes - mem.available_bytes;
  $("memory-text").textContent = size(mem.available_bytes) + " available of " + size(mem.total_bytes);
  const mbar = $("memory-bar");
  mbar.replaceChildren(segment("seg-used", usedMem, mem.total_bytes, "in use: " + size(usedMem)));
  mbar.setAttribute("aria-valuenow", (100 * usedMem / mem.total_bytes).toFixed(1));
  mbar.setAttribute("aria-valuetext", size(mem.available_bytes) + " available");
  $("devices").replaceChildren(...(data.devices || []).map((d) => el("div", { class: "meter-block" },
    el("div", { class: "meter-label" }, el("span", { text: d.name }),
      el("span", { text: size(d.used_bytes) + " of " + size(d.total_bytes) + " held by hoshikage's models (estimated)" })),
    el("div", { class: "bar", role: "meter", "aria-label": d.name, "aria-valuemin": 0, "aria-valuemax": 100,
                "aria-valuenow": (100 * d.used_bytes / Math.max(1, d.total_bytes)).toFixed(1) },
      segment("seg-serving", d.used_bytes, d.total_bytes, d.name)))),
    // RPC workers (README "Several machines"): the models split over each, what each holds
    ...(data.workers || []).map((w) => el("div", { class: "meter-block" },
      el("div", { class: "meter-label" }, el("span", { text: "worker " + w.name + " (" + w.address + ")" }),
        el("span", { text: Object.keys(w.held_bytes).length
          ? "serving " + Object.entries(w.held_bytes).map(([m, n]) => m + " " + size(n)).join(", ")
          : "idle; for " + w.models.join(", ") })))));
}

function stateCell(m) {
  // one box in the cell: at phone width a cell is a flex row (its label, then this), where a
  // badge beside its reason would stretch to the reason's height
  const cell = el("div", { class: "state" },
    el("span", { class: "badge " + m.phase, text: PHASE_LABEL[m.phase] || m.phase }));
  let detail = "";
  if (m.phase === "serving") {
    detail = m.busy ? "answering" : "idle, stops in " + ago(m.ttl_left_seconds);
  } else if (m.phase === "kept") {
    detail = "not loaded; its RAM-disk copy stays";
  }
  if (m.copying_bytes !== null && m.copying_bytes !== undefined) {
    const total = m.source_bytes || 0;
    const pct = total ? Math.min(100, 100 * m.copying_bytes / total) : 0;
    const rate = view.rates[m.name];
    detail = (m.phase === "serving" ? "serving; " : "") + "copying to the RAM disk " + size(m.copying_bytes) +
      (total ? " of " + size(total) + " (" + pct.toFixed(0) + "%)" : "") + (rate ? ", " + size(rate) + "/s" : "");
    cell.append(el("div", { class: "progress", role: "progressbar", "aria-valuemin": 0, "aria-valuemax": 100,
                            "aria-valuenow": pct.toFixed(0), "aria-label": "copy of " + m.name },
      el("span", { width: pct.toFixed(1) + "%" })));
  }
  if (m.phase === "failed" && m.error) cell.append(el("div", { class: "detail error", text: m.error }));
  else if (detail) cell.append(el("div", { class: "detail", text: detail }));
  return el("td", { "data-label": "State" }, cell);
}

function trackRates(data) {
  const t = data.time;
  for (const m of data.models) {
    const last = view.copying[m.name];
    if (m.copying_bytes !== null && m.copying_bytes !== undefined) {
      if (last && t > last[0] && m.copying_bytes >= last[1]) {
        view.rates[m.name] = (m.copying_bytes - last[1]) / (t - last[0]);
      }
      view.copying[m.name] = [t, m.copying_bytes];
    } else {
      delete view.copying[m.name];
      delete view.rates[m.name];
    }
  }
}

function renderModels(data) {
  trackRates(data);
  const now = data.time;
  const rows = data.models.map((m) => {
    const copies = [];
    if (m.source_bytes !== null) copies.push("source " + size(m.source_bytes));
    if (m.cached) copies.push("SSD cache");
    if (m.staged_bytes) copies.push("RAM disk " + size(m.staged_bytes));
    const chips = el("div", { class: "chips" },
      ...m.aliases.map((a) => el("span", { class: "chip", title: "alias", text: a })),
      ...m.tags.map((t) => el("span", { class: "chip", title: "tag", text: "#" + t })),
      m.pinned ? el("span", { class: "chip pin", text: "pinned" }) : null);
    const measured = m.memory_bytes !== null ? size(m.memory_bytes) + " measured" : "";
    const upNow = ["staging", "loading", "serving"].includes(m.phase);
    const acting = view.busy.has(m.name) || view.settling.has(m.name);
    const canAct = view.data.panel.may_act;
    const button = (text, cls, onclick, disabled, label) => el("button", {
      type: "button", class: cls, onclick, disabled: disabled || acting || !canAct,
      "aria-label": label + " " + m.name, text });
    return el("tr", { "data-model": m.name, "data-phase": m.phase },
      el("td", { class: "model-cell", "data-label": "Model" }, el("div", { class: "name", text: m.name }), chips),
      stateCell(m),
      el("td", { "data-label": "Copies", text: copies.join(" · ") || "–" }),
      el("td", { "data-label": "Memory" },
        el("div", { text: "estimate " + size(m.estimate_bytes) }),
        measured ? el("div", { class: "detail", text: measured + (m.resident_bytes ? ", RSS " + size(m.resident_bytes) : "") }) : null),
      el("td", { "data-label": "Last request", text: m.last_request_end ? ago(now - m.last_request_end) + " ago" : "never" }),
      el("td", { "data-label": "In flight", text: m.in_flight === null ? "–" : String(m.in_flight) }),
      el("td", { "data-label": "Rank", text: m.rank.toFixed(1) }),
      el("td", { class: "actions-cell" }, el("div", { class: "actions" },
        button("Load", "primary", () => act("load", m.name), upNow, "load"),
        button("Unload", "", () => act("unload", m.name), !upNow && m.phase !== "stopping", "unload"),
        button(m.pinned ? "Unpin" : "Pin", "", () => act("pin", m.name, { pinned: !m.pinned }), false,
               m.pinned ? "unpin" : "pin"),
        el("button", { type: "button", onclick: () => showLogs(m.name), "aria-label": "journal of " + m.name, text: "Logs" }))));
  });
  $("model-rows").replaceChildren(...rows);
  $("models-empty").hidden = data.models.length > 0;
}

function renderChoices(data) {
  for (const [id, first] of [["chat-model", null], ["journal-model", "every model"]]) {
    const select = $(id);
    const names = data.models.map((m) => m.name);
    const have = Array.from(select.options).map((o) => o.value).filter((v) => v !== "");
    if (have.join("\n") === names.join("\n")) continue;
    const keep = select.value;
    const options = names.map((n) => el("option", { value: n, text: n }));
    if (first) options.unshift(el("option", { value: "", text: first }));
    select.replaceChildren(...options);
    if (keep && (names.includes(keep) || keep === "")) select.value = keep;
  }
}

// --- actions --------------------------------------------------------------------------
async function act(kind, model, extra) {
  // a double click's second click comes before the rows are drawn again with the buttons off
  if (view.busy.has(model) || view.settling.has(model)) return;
  const status = $("action-status");
  view.busy.add(model);
  status.textContent = kind + " " + model + "…";
  try {
    const r = await fetch("api/" + kind, {
      method: "POST", cache: "no-store",
      headers: headers({ "Content-Type": "application/json", "X-Hoshikage-Panel": "1" }),
      body: JSON.stringify(Object.assign({ model }, extra || {})),
    });
    if (r.ok) {
      const body = await r.json();
      view.loading = kind === "load" && body.loading ? model : view.loading;
      status.textContent = kind === "load" ? (body.loading ? model + ": loading" : model + " is loaded already")
        : kind === "unload" ? (body.unloaded ? model + " unloaded" : model + " was not loaded")
        : model + (body.pinned ? " pinned" : " unpinned");
    } else {
      status.textContent = kind + " " + model + ": " + await errorText(r);
    }
  } catch (e) {
    status.textContent = kind + " " + model + ": " + e;
  } finally {
    view.busy.delete(model);
    // until a state asked for after this shows it: a double click's second click, or one
    // on a row drawn before the action, must not act again
    view.settling.set(model, performance.now());
  }
}

// --- the journal ----------------------------------------------------------------------
function showLogs(model) {
  $("journal-model").value = model;
  readJournal();
  $("journal").focus();
}

async function readJournal() {
  view.journalAt = Date.now();
  const model = $("journal-model").value;
  const unit = $("journal-unit").checked && model;
  const q = new URLSearchParams({ lines: unit ? "100" : "40" });
  if (model) q.set("model", model);
  try {
    const r = await fetch("api/" + (unit ? "logs" : "journal") + "?" + q, { headers: headers(), cache: "no-store" });
    if (!r.ok) return;
    const body = await r.json();
    const problem = $("journal-problem");
    problem.hidden = !body.problem;
    problem.textContent = body.problem || "";
    $("journal").replaceChildren(...body.records.map((rec) => {
      const when = new Date(rec.time * 1000);
      return el("li", { class: "p" + rec.priority },
        el("time", { datetime: when.toISOString(), title: when.toLocaleString(), text: when.toLocaleTimeString([], { hour12: false }) }),
        el("span", {}, rec.event ? el("span", { class: "ev", text: rec.event }) : null, rec.message));
    }));
  } catch (_) { /* the next poll tries again */ }
}

// --- chat -----------------------------------------------------------------------------
async function chat(event) {
  event.preventDefault();
  if ($("chat-send").disabled) return;  // one reply at a time (Ctrl+Enter too)
  const model = $("chat-model").value;
  const input = $("chat-input");
  const text = input.value.trim();
  if (!model || !text) return;
  input.value = "";
  const log = $("chat-log");
  log.append(el("div", { class: "msg user", text }));
  const reply = el("div", { class: "msg assistant", "data-model": model });
  log.append(reply);
  log.scrollTop = log.scrollHeight;  // the question in view, then its answer or error
  $("chat-send").disabled = true;
  const stop = new AbortController();
  const stopButton = $("chat-stop");
  stopButton.onclick = () => stop.abort();
  stopButton.hidden = false;
  try {
    const r = await fetch("/v1/chat/completions", {
      method: "POST", signal: stop.signal,
      headers: headers({ "Content-Type": "application/json" }),
      body: JSON.stringify({ model, stream: true, max_tokens: 128,
                             messages: [{ role: "user", content: text }] }),
    });
    if (!r.ok) throw new Error(await errorText(r));
    const reader = r.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, cut).trim();
        buffer = buffer.slice(cut + 1);
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") continue;
        try {
          const delta = JSON.parse(payload).choices[0].delta;
          if (delta && delta.content) reply.textContent += delta.content;
        } catch (_) { /* a line that is not a chunk */ }
      }
      log.scrollTop = log.scrollHeight;
    }
    reply.dataset.done = "1";
  } catch (e) {
    if (stop.signal.aborted) {  // the reader's own choice: what came so far stays
      reply.append(el("span", { class: "stopped", text: " (stopped)" }));
    } else {
      reply.classList.add("error");
      reply.textContent = String(e.message || e);
    }
    reply.dataset.done = "1";
  } finally {
    stopButton.hidden = true;
    stopButton.onclick = null;
    $("chat-send").disabled = false;
    log.scrollTop = log.scrollHeight;
  }
}

// --- start ----------------------------------------------------------------------------
function start() {
  $("key").value = view.key ? "••••••••" : "";
  $("key-form").addEventListener("submit", (e) => {
    e.preventDefault();
    const typed = $("key").value.trim();
    if (typed && typed !== "••••••••") {
      view.key = typed;
      sessionStorage.setItem(KEY_ITEM, typed);
      $("key").value = "••••••••";
      schedule(0);  // what the key may see, now: not after the 5 s wait of a refusal
    }
  });
  $("key-forget").addEventListener("click", () => {
    view.key = "";
    sessionStorage.removeItem(KEY_ITEM);
    $("key").value = "";
    schedule(0);
  });
  $("chat-form").addEventListener("submit", chat);
  $("chat-input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) $("chat-form").requestSubmit();
  });
  $("journal-model").addEventListener("change", readJournal);
  $("journal-unit").addEventListener("change", readJournal);
  $("journal").tabIndex = -1;
  document.addEventListener("visibilitychange", () => {
    if (document.hidden) setLive(false, "paused (tab hidden)");
    else schedule(0);
  });
  poll();
}

document.addEventListener("DOMContentLoaded", start);
