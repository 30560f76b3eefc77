// The chat page: streams answers from /v1/chat/completions, keeps the conversation in localStorage.
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = "llama3.chat";
const KEY_STORE = "llama3.apiKey";
let state = load();
let modelName = null;
let controller = null;  // the running answer's AbortController

function load() {
  try {
    const saved = JSON.parse(localStorage.getItem(STORE) || "null");
    if (saved && Array.isArray(saved.messages)) return saved;
  } catch (e) { /* a damaged entry starts a new chat */ }
  return { messages: [], settings: {} };
}

function save() { localStorage.setItem(STORE, JSON.stringify(state)); }

function settings() {
  return {
    system: $("system").value.trim(),
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Math.max(1, Math.floor(Number($("max-tokens").value) || 512)),
  };
}

function restoreSettings() {
  const s = state.settings || {};
  if (s.system !== undefined) $("system").value = s.system;
  if (s.temperature !== undefined) $("temperature").value = s.temperature;
  if (s.top_p !== undefined) $("top-p").value = s.top_p;
  if (s.max_tokens !== undefined) $("max-tokens").value = s.max_tokens;
}

function showError(text) {
  $("error").textContent = text;
  $("error").hidden = !text;
}

function bubble(message) {
  const div = document.createElement("div");
  div.className = "msg " + message.role;
  fill(div, message);
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function fill(div, message) {
  if (message.role === "assistant") {
    div.replaceChildren(renderMarkdown(message.content));
  } else {
    div.textContent = message.content;  // the user's own text, shown as typed
  }
}

function renderAll() {
  $("messages").replaceChildren();
  state.messages.forEach(bubble);
  const last = state.messages[state.messages.length - 1];
  $("regenerate").hidden = !(last && last.role === "assistant");
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = localStorage.getItem(KEY_STORE);
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

// fetch with the stored key; on a 401 ask for the key once and retry.
async function call(path, init) {
  let response = await fetch(path, { ...init, headers: headers() });
  if (response.status === 401) {
    const key = window.prompt("This server needs an API key (llama3 serve --api-key):");
    if (!key) throw new Error("an API key is needed");
    localStorage.setItem(KEY_STORE, key.trim());
    response = await fetch(path, { ...init, headers: headers() });
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message || message; } catch (e) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

async function loadModel() {
  try {
    const models = await (await call("/v1/models", { method: "GET" })).json();
    modelName = models.data[0].id;
    $("model").textContent = modelName;
  } catch (e) {
    showError("Could not reach the model: " + e.message);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("regenerate").hidden = true;
  $("input").disabled = false;
}

async function answer() {
  const s = settings();
  state.settings = s;
  save();
  const history = state.messages.map((m) => ({ role: m.role, content: m.content }));
  const messages = s.system ? [{ role: "system", content: s.system }, ...history] : history;
  const reply = { role: "assistant", content: "" };
  const div = bubble(reply);
  div.classList.add("streaming");
  showError("");
  setBusy(true);
  controller = new AbortController();
  let first = null, tokens = 0;
  try {
    const response = await call("/v1/chat/completions", {
      method: "POST", signal: controller.signal,
      body: JSON.stringify({ model: modelName || "default", messages, stream: true,
                             stream_options: { include_usage: true }, temperature: s.temperature,
                             top_p: s.top_p, max_tokens: s.max_tokens }),
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let cut;
      while ((cut = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, cut);
        buffer = buffer.slice(cut + 2);
        if (!event.startsWith("data: ")) continue;
        const data = event.slice(6);
        if (data === "[DONE]") continue;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message);
        if (chunk.usage) tokens = chunk.usage.completion_tokens;
        const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
        if (delta && delta.content) {
          if (first === null) first = performance.now();
          reply.content += delta.content;
          fill(div, reply);
          div.scrollIntoView({ block: "end" });
        }
      }
    }
  } catch (e) {
    if (e.name !== "AbortError") showError(e.message);
  } finally {
    controller = null;
    div.classList.remove("streaming");
    if (reply.content) {
      state.messages.push(reply);
      save();
    } else {
      div.remove();
    }
    if (first !== null && tokens > 1) {
      const seconds = (performance.now() - first) / 1000;
      state.speed = tokens + " tokens, " + ((tokens - 1) / Math.max(seconds, 1e-3)).toFixed(1) + " tok/s";
      $("speed").textContent = state.speed;
      save();
    }
    setBusy(false);
    const last = state.messages[state.messages.length - 1];
    $("regenerate").hidden = !(last && last.role === "assistant");
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  const message = { role: "user", content: text };
  state.messages.push(message);
  save();
  bubble(message);
  answer();
});

$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => { if (controller) controller.abort(); });

$("regenerate").addEventListener("click", () => {
  if (controller) return;
  if (state.messages.length && state.messages[state.messages.length - 1].role === "assistant") {
    state.messages.pop();
    save();
    renderAll();
  }
  answer();
});

$("new-chat").addEventListener("click", () => {
  if (controller) controller.abort();
  state.messages = [];
  state.speed = "";
  save();
  renderAll();
  $("speed").textContent = "";
});

$("toggle-settings").addEventListener("click", () => {
  const panel = $("settings");
  panel.hidden = !panel.hidden;
  $("toggle-settings").setAttribute("aria-expanded", String(!panel.hidden));
});

$("forget-key").addEventListener("click", () => { localStorage.removeItem(KEY_STORE); });

for (const id of ["system", "temperature", "top-p", "max-tokens"]) {
  $(id).addEventListener("change", () => { state.settings = settings(); save(); });
}

restoreSettings();
renderAll();
$("speed").textContent = state.speed || "";
loadModel();
