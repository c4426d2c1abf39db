// edgellm's chat page: streams answers from /v1/chat/completions (fetch + a ReadableStream of server-sent events),
// picks the model or adapter from /v1/models, and draws the deployment (/v1/deployment) and what each token cost,
// node by node and link by link, from the `edgellm.timing` of every streamed chunk.
"use strict";

const KEY_STORE = "edgellm.apiKey";
const COLORS = ["#2f6fde", "#e07b39", "#3a9d5d", "#9c4dcc", "#c9a227", "#d04a6e", "#4aa8c0", "#7a7a7a"];
const $ = (id) => document.getElementById(id);
const state = {
  messages: [], // the conversation: {role, content}
  busy: false,
  parts: new Map(), // breakdown part ("compute edge1", "wire device->edge1") -> {last, sum, n, color}
  links: new Map(), // link name -> {bytes, wire, n} over the decode tokens of the last answer
  deployment: null,
  polling: null, // the deployment view's refresh timer
};

// -- the API ------------------------------------------------------------------------------------------------------

function headers() {
  const key = localStorage.getItem(KEY_STORE);
  const out = { "Content-Type": "application/json" };
  if (key) out.Authorization = `Bearer ${key}`;
  return out;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (response.status === 401) {
    $("key-form").hidden = false;
    throw new Error("this server needs an API key: enter it above");
  }
  if (!response.ok) throw new Error(await errorText(response));
  return response;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return `${response.status}: ${body.error ? body.error.message : JSON.stringify(body)}`;
  } catch (_) {
    return `${response.status} ${response.statusText}`;
  }
}

function setStatus(text, error = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", error);
}

// -- models and deployment ------------------------------------------------------------------------------------------

async function loadModels(preferred) {
  const body = await (await api("/v1/models")).json();
  const select = $("model");
  select.replaceChildren();
  for (const model of body.data) {
    const option = document.createElement("option");
    option.value = model.id;
    const kind = model.owned_by === "edgellm" ? "base model" : model.loaded ? "adapter, loaded" : "adapter";
    option.textContent = `${model.id} (${kind})`;
    select.append(option);
  }
  if (preferred && body.data.some((m) => m.id === preferred)) select.value = preferred;
}

async function loadDeployment() {
  const body = await (await api("/v1/deployment")).json();
  state.deployment = body;
  const info = body.info || {};
  $("deployment-mode").textContent = [info.mode, info.engine, info.quant && `quant ${info.quant}`]
    .filter(Boolean).join(", ");
  const stats = body.stats || {};
  const perNode = { ...(stats.stages || {}), ...(stats.nodes || {}) };
  const byNode = new Map(); // a node may hold several stages (the device: its first layers and the head)
  for (const row of info.layout || []) {
    if (!byNode.has(row.node)) byNode.set(row.node, []);
    byNode.get(row.node).push(row);
  }
  const rows = [...byNode].map(([name, stages]) => {
    const layers = stages.map((s) => {
      const extras = [s.embed && "embed", s.head && "head"].filter(Boolean).join("+");
      const range = s.layers[1] > s.layers[0] ? `${s.layers[0]}-${s.layers[1]}` : "";
      return [range, extras].filter(Boolean).join(" +");
    }).join(", ");
    const hosts = perNode[name] ? [perNode[name]] : stagesOf(perNode, name);
    const sessions = hosts.length ? Math.max(...hosts.map((h) => h.sessions || 0)) : "";
    const batches = Object.entries((hosts[0] || {}).batch_sizes || {}).map(([size, n]) => `${size}: ${n}`).join(", ");
    return [name, layers, String(sessions), batches];
  });
  fillTable("nodes", rows);
  const links = (info.link_emulation || []).map((link) => {
    const name = `${info.name || "device"}->${link.to}`;
    const seen = state.links.get(name) || findLink(link.to);
    return [name, profileText(link.profile), seen ? fmt(seen.bytes / seen.n, 0) : "", seen ? fmt(seen.wire / seen.n) : ""];
  });
  for (const [name, seen] of state.links) {
    if (!links.some((row) => row[0] === name)) links.push([name, "", fmt(seen.bytes / seen.n, 0), fmt(seen.wire / seen.n)]);
  }
  for (const row of links) row[0] = row[0].replace("->", " → ");
  fillTable("links", links.length ? links : [["(no network links: every layer runs here)", "", "", ""]]);
  const memory = info.memory || {};
  $("server-stats").textContent = `context ${body.context_tokens} tokens; ${body.in_flight} of ${body.max_concurrent} ` +
    `generations in flight` + (memory.rss_mb ? `; device RSS ${fmt(memory.rss_mb, 0)} MB` : "");
}

function stagesOf(perNode, node) {
  // the engine's local stage hosts are named NODE/[start:end)...
  return Object.keys(perNode).filter((name) => name.startsWith(`${node}/`)).map((name) => perNode[name]);
}

function findLink(to) {
  for (const [name, seen] of state.links) if (name.endsWith(`->${to}`)) return seen;
  return null;
}

function profileText(profile) {
  if (!profile) return "";
  const rate = (mbps) => (mbps == null ? "unlimited" : `${mbps} Mb/s`);
  const parts = [`up ${rate(profile.up_mbps)}`, `down ${rate(profile.down_mbps)}`];
  if (profile.rtt_ms) parts.push(`RTT ${profile.rtt_ms} ms`);
  if (profile.jitter_ms) parts.push(`jitter ${profile.jitter_ms} ms`);
  if (profile.loss_pct) parts.push(`loss ${profile.loss_pct}%`);
  return parts.join(", ");
}

function fillTable(id, rows) {
  const body = $(id).tBodies[0];
  body.replaceChildren();
  for (const row of rows) {
    const tr = document.createElement("tr");
    row.forEach((cell, i) => {
      const td = document.createElement("td");
      if (cell instanceof Node) td.append(cell);
      else td.textContent = cell;
      if (i > 0 && typeof cell === "string" && /^[\d.]+$/.test(cell)) td.className = "num";
      tr.append(td);
    });
    body.append(tr);
  }
}

function fmt(value, digits = 1) {
  return value == null || Number.isNaN(value) ? "" : Number(value).toFixed(digits);
}

// -- the per-token breakdown --------------------------------------------------------------------------------------

function resetBreakdown() {
  state.parts.clear();
  state.links.clear();
  drawBreakdown();
}

function recordTiming(timing, index) {
  // index 0 is the prompt (prefill): shown as the last token, kept out of the per-token means
  const device = (state.deployment && state.deployment.info && state.deployment.info.name) || "device";
  const parts = [];
  const local = (timing.local || []).reduce((sum, stage) => sum + (stage.compute_ms || 0), 0);
  if ((timing.local || []).length) parts.push([`compute ${device}`, local]);
  for (const hop of timing.hops || []) {
    parts.push([`compute ${hop.node}`, hop.compute_ms || 0]);
    parts.push([`wire ${String(hop.link).replace("->", " → ")}`, hop.wire_ms || 0]);
    if (index > 0) {
      const seen = state.links.get(hop.link) || { bytes: 0, wire: 0, n: 0 };
      seen.bytes += (hop.bytes_up || 0) + (hop.bytes_down || 0);
      seen.wire += hop.wire_ms || 0;
      seen.n += 1;
      state.links.set(hop.link, seen);
    }
  }
  const accounted = parts.reduce((sum, [, ms]) => sum + ms, 0);
  if (timing.ms != null) parts.push(["other (sampling, queueing)", Math.max(timing.ms - accounted, 0)]);
  for (const part of state.parts.values()) part.last = 0;
  for (const [name, ms] of parts) {
    const part = state.parts.get(name) || { last: 0, sum: 0, n: 0, color: COLORS[state.parts.size % COLORS.length] };
    part.last += ms;
    if (index > 0) {
      part.sum += ms;
      part.n += 1;
    }
    state.parts.set(name, part);
  }
  drawBreakdown();
}

function drawBreakdown() {
  const bar = $("breakdown-bar");
  bar.replaceChildren();
  const total = [...state.parts.values()].reduce((sum, part) => sum + part.last, 0);
  const rows = [];
  for (const [name, part] of state.parts) {
    const segment = document.createElement("span");
    segment.style.width = `${total ? (100 * part.last) / total : 0}%`;
    segment.style.background = part.color;
    segment.title = `${name}: ${fmt(part.last, 2)} ms`;
    bar.append(segment);
    const label = document.createElement("span");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = part.color;
    label.append(swatch, name);
    rows.push([label, fmt(part.last, 2), part.n ? fmt(part.sum / part.n, 2) : ""]);
  }
  fillTable("breakdown", rows);
}

// -- the chat -----------------------------------------------------------------------------------------------------

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  const content = document.createElement("span");
  content.className = "content";
  content.textContent = text;
  div.append(content);
  $("messages").append(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

async function send(text) {
  if (state.busy || !text.trim()) return;
  state.busy = true;
  document.body.dataset.state = "streaming";
  $("send").disabled = true;
  state.messages.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const content = bubble.querySelector(".content");
  resetBreakdown();
  const started = performance.now();
  const result = { text: "", tokens: 0, finish: null, usage: null, report: null, firstMs: null };
  try {
    const response = await api("/v1/chat/completions", {
      method: "POST",
      body: JSON.stringify(request()),
    });
    await readEvents(response, (chunk) => onChunk(chunk, result, content, started));
    state.messages.push({ role: "assistant", content: result.text });
    bubble.append(meta(result, performance.now() - started));
    setStatus("");
    document.body.dataset.state = "done";
  } catch (error) {
    bubble.classList.add("error");
    content.textContent = result.text + (result.text ? "\n" : "") + error.message;
    state.messages.pop(); // the user's turn was not answered: let it be sent again
    setStatus(error.message, true);
    document.body.dataset.state = "error";
  } finally {
    state.busy = false;
    $("send").disabled = false;
    loadDeployment().catch(() => {});
  }
}

function request() {
  const body = {
    model: $("model").value,
    messages: state.messages,
    stream: true,
    stream_options: { include_usage: true },
    max_tokens: Number($("max-tokens").value) || 256,
  };
  const temperature = Number($("temperature").value);
  body.temperature = Number.isFinite(temperature) ? temperature : 0;
  return body;
}

function onChunk(chunk, result, content, started) {
  if (chunk.error) throw new Error(chunk.error.message);
  const choice = (chunk.choices || [])[0];
  if (choice) {
    const delta = choice.delta || {};
    if (delta.content) {
      result.text += delta.content;
      content.textContent = result.text;
      content.parentElement.scrollIntoView({ block: "end" });
    }
    if (choice.finish_reason) result.finish = choice.finish_reason;
  }
  const extra = chunk.edgellm || {};
  if (extra.timing) {
    if (result.firstMs == null) result.firstMs = performance.now() - started;
    recordTiming(extra.timing, result.tokens);
    result.tokens += 1;
    $("token-stats").textContent = `token ${result.tokens}: ${fmt(extra.timing.ms, 1)} ms`;
  } else if (extra.token_ms != null) {
    result.tokens += 1;
  }
  if (extra.report) result.report = extra.report;
  if (chunk.usage) result.usage = chunk.usage;
}

function meta(result, totalMs) {
  const span = document.createElement("span");
  span.className = "meta";
  const report = result.report || {};
  const parts = [];
  if (result.usage) parts.push(`${result.usage.completion_tokens} tokens`);
  if (result.firstMs != null) parts.push(`first token ${fmt(result.firstMs, 0)} ms`);
  if (report.decode_tok_per_s) parts.push(`${fmt(report.decode_tok_per_s, 1)} tok/s`);
  parts.push(`${fmt(totalMs / 1000, 1)} s`);
  if (result.finish) parts.push(`finish: ${result.finish}`);
  span.textContent = parts.join(" · ");
  return span;
}

// Server-sent events from a fetch response: `data: {...}` blocks separated by a blank line, then `data: [DONE]`.
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    buffer += decoder.decode(value || new Uint8Array(), { stream: !done });
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      onData(JSON.parse(data));
    }
    if (done) throw new Error("the stream ended before [DONE]");
  }
}

// -- start --------------------------------------------------------------------------------------------------------

async function start() {
  const params = new URLSearchParams(location.search);
  if (params.has("temperature")) $("temperature").value = params.get("temperature");
  if (params.has("max_tokens")) $("max-tokens").value = params.get("max_tokens");
  $("api-key").value = localStorage.getItem(KEY_STORE) || "";
  $("key-form").addEventListener("submit", (event) => {
    event.preventDefault();
    localStorage.setItem(KEY_STORE, $("api-key").value.trim());
    $("key-form").hidden = true;
    init(params).catch((error) => setStatus(error.message, true));
  });
  $("send-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("send-form").requestSubmit();
    }
  });
  $("reset").addEventListener("click", () => {
    state.messages = [];
    $("messages").replaceChildren();
    resetBreakdown();
  });
  await init(params);
}

async function init(params) {
  setStatus("connecting...");
  await loadModels(params.get("model"));
  await loadDeployment();
  setStatus("");
  document.body.dataset.state = "ready";
  if (!state.polling) state.polling = setInterval(() => loadDeployment().catch(() => {}), 3000);
  if (params.get("prompt")) {
    $("prompt").value = params.get("prompt");
    if (params.get("send") === "1") $("send-form").requestSubmit();
  }
}

start().catch((error) => {
  setStatus(error.message, true);
  document.body.dataset.state = "error";
});
