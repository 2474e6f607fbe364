// loraswitch routing trace page: streams a chat answer from /v1/chat/completions with the
// per-token trace on, and colours every token by the adapter that produced it.
// Query parameters pre-fill the form: ?prompt=...&model=...&route=...&max_tokens=...&temperature=...&key=...&run=1
"use strict";

const PALETTE = ["#fde68a", "#bfdbfe", "#bbf7d0", "#fbcfe8", "#ddd6fe", "#fed7aa", "#a5f3fc", "#fecaca",
  "#d9f99d", "#e9d5ff", "#c7d2fe", "#99f6e4"];
const BASE_COLOR = "#e5e7eb";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);
const colors = new Map();
const counts = new Map();
let controller = null;
let lastIndex = null;
let lastTop = null;
let lastSpan = null;
let nTokens = 0;

function colorOf(name) {
  if (!name || name === "base") return BASE_COLOR;
  if (!colors.has(name)) colors.set(name, PALETTE[colors.size % PALETTE.length]);
  return colors.get(name);
}

function apiKey() {
  const key = $("api-key").value.trim();
  if (key) localStorage.setItem("loraswitch-key", key);
  return key;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = apiKey();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function setStatus(text, state) {
  const s = $("status");
  s.textContent = text;
  s.dataset.state = state;
}

function el(tag, props, text) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  if (text !== undefined) node.textContent = text;
  return node;
}

function renderLegend() {
  const ul = $("legend");
  ul.replaceChildren();
  const names = ["base", ...colors.keys()];
  for (const name of names) {
    const li = el("li");
    li.dataset.adapter = name;
    const sw = el("span", { className: "swatch" });
    sw.style.background = colorOf(name);
    li.append(sw, el("span", {}, name === "base" ? "base (no adapter)" : name),
      el("span", { className: "count" }, counts.has(name) ? `${counts.get(name)} ${counts.get(name) === 1 ? "token" : "tokens"}` : ""));
    ul.append(li);
  }
}

async function loadModels() {
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    const body = await resp.json();
    if (!resp.ok) throw new Error(body.error ? body.error.message : resp.statusText);
    const select = $("model");
    select.replaceChildren();
    for (const m of body.data) {
      select.append(el("option", { value: m.id }, m.kind === "adapter" ? `${m.id} (adapter)` : m.id));
      if (m.kind === "adapter") colorOf(m.id);
    }
    renderLegend();
  } catch (err) {
    setStatus("could not list models: " + err.message, "error");
  }
}

function topAdapter(adapters) {
  let best = null;
  let w = 0;
  for (const [name, weight] of Object.entries(adapters || {})) {
    if (weight > w) { best = name; w = weight; }
  }
  return best || "base";
}

function paint(span, adapters) {
  const entries = Object.entries(adapters || {}).filter(([, w]) => w > 0);
  if (entries.length <= 1) {
    span.style.background = colorOf(topAdapter(adapters));
    return;
  }
  const total = entries.reduce((a, [, w]) => a + w, 0);
  let at = 0;
  const stops = entries.map(([name, w]) => {
    const from = at;
    at += (100 * w) / total;
    return `${colorOf(name)} ${from.toFixed(1)}% ${at.toFixed(1)}%`;
  });
  span.style.background = `linear-gradient(90deg, ${stops.join(", ")})`;
}

function addPiece(text, adapters, index, extra) {
  const answer = $("answer");
  if (index !== null && index === lastIndex && lastSpan) {
    lastSpan.textContent += text; // one token's text can arrive in two pieces
    return;
  }
  const top = topAdapter(adapters);
  if (lastTop !== null && top !== lastTop) {
    answer.append(el("span", { className: "switch", title: `switch: ${lastTop} → ${top}` }, "▸"));
  }
  const span = el("span", { className: "tok" }, text);
  span.dataset.adapter = top;
  if (index !== null) span.dataset.index = String(index);
  const weights = Object.entries(adapters || {}).map(([n, w]) => `${n} ${w}`).join(", ") || "no adapter";
  span.title = `token ${index}: ${weights}` + (extra && extra.part ? ` (part ${extra.part})` : "");
  paint(span, adapters);
  answer.append(span);
  counts.set(top, (counts.get(top) || 0) + 1);
  if (top !== "base") colorOf(top);
  lastIndex = index;
  lastTop = top;
  lastSpan = span;
  nTokens += 1;
  renderLegend();
}

function showRouting(msg) {
  const r = msg.routing || {};
  const b = msg.batch || {};
  const dl = $("routing");
  dl.replaceChildren();
  const rows = [
    ["requested", r.requested],
    ["router", r.router || "(explicit)"],
    ["answered by", msg.model],
    ["confidence", r.confidence !== undefined ? Number(r.confidence).toFixed(3) : ""],
    ["reason", r.reason || ""],
    ["finish", msg.choices && msg.choices[0] ? msg.choices[0].finish_reason : ""],
    ["batch", b.id !== undefined ? `#${b.id} (${b.size} ${b.size === 1 ? "row" : "rows"}${b.dynamic ? ", per-layer routing" : ""})` : ""],
    ["latency", b.generate_ms !== undefined ? `${Math.round(b.queue_ms + b.generate_ms)} ms` : ""],
  ];
  for (const [k, v] of rows) {
    if (v === undefined || v === "") continue;
    dl.append(el("dt", {}, k), el("dd", {}, String(v)));
  }
  const ol = $("events");
  ol.replaceChildren();
  for (const ev of r.events || []) {
    const what = `${ev.event} → ${ev.adapter || "base"}` + (ev.confidence !== undefined ? ` (${ev.confidence})` : "")
      + (ev.part ? `, part ${ev.part}` : "") + (ev.reason ? `: ${ev.reason}` : "");
    const li = el("li", {}, `token ${ev.token_index}: ${what}`);
    li.dataset.event = ev.event;
    ol.append(li);
    const span = document.querySelector(`#answer .tok[data-index="${ev.token_index}"]`);
    if (span) {
      span.classList.add("event");
      span.dataset.event = ev.event;
      span.title += ` | ${what}`;
    }
  }
}

function handle(msg) {
  if (msg.error) throw new Error(msg.error.message || "server error");
  const choice = msg.choices && msg.choices[0];
  const tokens = msg.routing && msg.routing.tokens;
  if (tokens) {
    for (const t of tokens) addPiece(t.text, t.adapters, t.index, t);
  } else if (choice && choice.delta && choice.delta.content) {
    addPiece(choice.delta.content, {}, null, null);
  }
  if (choice && choice.finish_reason) {
    showRouting(msg);
    setStatus(`done: ${nTokens} tokens, answered by ${msg.model}`, "done");
  }
}

async function run(event) {
  if (event) event.preventDefault();
  if (controller) controller.abort();
  $("answer").replaceChildren();
  $("routing").replaceChildren();
  $("events").replaceChildren();
  counts.clear();
  lastIndex = lastTop = lastSpan = null;
  nTokens = 0;
  renderLegend();
  const model = $("model").value;
  const body = {
    model,
    messages: [{ role: "user", content: $("prompt").value }],
    stream: true,
    max_tokens: Number($("max-tokens").value) || 64,
    temperature: Number($("temperature").value) || 0,
    loraswitch: { trace: true },
  };
  if (model === "auto" && $("route").value) body.loraswitch.route = $("route").value;
  controller = new AbortController();
  $("run").disabled = true;
  $("stop").disabled = false;
  setStatus("waiting for the server…", "running");
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!resp.ok) {
      const err = await resp.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : `HTTP ${resp.status}`);
    }
    setStatus("streaming…", "running");
    const reader = resp.body.getReader();
    const decoder = new TextDecoder();
    let buf = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buf += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const block = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        for (const line of block.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") continue;
          handle(JSON.parse(data));
        }
      }
    }
    if ($("status").dataset.state === "running") setStatus("stream ended", "done");
  } catch (err) {
    if (err.name === "AbortError") setStatus("stopped", "idle");
    else setStatus("error: " + err.message, "error");
  } finally {
    controller = null;
    $("run").disabled = false;
    $("stop").disabled = true;
  }
}

// The task-shift panel: GET /v1/routing/shifts (clusters of unrouted prompts, largest first).
async function loadShifts() {
  const body = $("shifts").tBodies[0];
  try {
    const resp = await fetch("/v1/routing/shifts", { headers: headers() });
    const report = await resp.json();
    if (!resp.ok) throw new Error(report.error ? report.error.message : resp.statusText);
    $("shifts-summary").textContent = `${report.unrouted} prompts no adapter took, in ${report.clusters} clusters; ` +
      `${report.data.length} reach ${report.min_size} prompts` + (report.keep_prompts ? "." : " (prompt texts are not kept: --keep-prompts).");
    body.replaceChildren();
    for (const c of report.data) {
      const tr = el("tr");
      tr.dataset.cluster = c.id;
      const examples = el("td");
      for (const p of c.examples) examples.append(el("div", { className: "example" }, p));
      tr.append(el("td", {}, c.id), el("td", {}, String(c.size)), el("td", {}, c.first_seen), el("td", {}, c.last_seen), examples);
      body.append(tr);
    }
  } catch (err) {
    $("shifts-summary").textContent = "could not load task shifts: " + err.message;
  }
}

function syncRoute() {
  $("route-label").style.visibility = $("model").value === "auto" ? "visible" : "hidden";
}

async function init() {
  $("api-key").value = params.get("key") || localStorage.getItem("loraswitch-key") || "";
  if (params.has("prompt")) $("prompt").value = params.get("prompt");
  if (params.has("max_tokens")) $("max-tokens").value = params.get("max_tokens");
  if (params.has("temperature")) $("temperature").value = params.get("temperature");
  await loadModels();
  if (params.has("model")) $("model").value = params.get("model");
  if (params.has("route")) $("route").value = params.get("route");
  syncRoute();
  $("model").addEventListener("change", syncRoute);
  $("api-key").addEventListener("change", loadModels); // a new key: remember it, list what it may use
  $("form").addEventListener("submit", run);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("shifts-refresh").addEventListener("click", loadShifts);
  await loadShifts();
  if (params.get("run") === "1" && $("prompt").value) await run();
}

init();
