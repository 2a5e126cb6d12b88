// The chat page: keeps the conversation, streams each reply from /v1/chat/completions (server-sent events) into the
// page as it comes, and stops it on "Stop" (aborting the request frees its slot on the server).
"use strict";

const $ = (id) => document.getElementById(id);
const turns = [];  // {role, content} of the finished turns
let controller = null;  // the AbortController of the reply being streamed

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

function bubble(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;
  $("log").appendChild(div);
  $("log").scrollTop = $("log").scrollHeight;
  return div;
}

async function errorText(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return response.status + " " + response.statusText;
  }
}

async function loadModels() {
  const response = await fetch("/v1/models", { headers: headers() });
  if (!response.ok) {
    bubble("error", "Could not list the models: " + (await errorText(response)));
    return;
  }
  const select = $("model");
  select.replaceChildren(...(await response.json()).data.map((m) => new Option(m.id, m.id)));
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

// Reads server-sent events from `response` and calls onData(parsed JSON) for each until [DONE].
async function readEvents(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

function request(messages) {
  const body = { model: $("model").value, messages, stream: true, temperature: Number($("temperature").value) };
  if ($("max-tokens").value) body.max_tokens = Number($("max-tokens").value);
  return body;
}

async function send(text) {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...turns, { role: "user", content: text });
  bubble("user", text);
  const reply = bubble("assistant", "");
  reply.dataset.state = "streaming";
  controller = new AbortController();
  setBusy(true);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), signal: controller.signal,
      body: JSON.stringify(request(messages)),
    });
    if (!response.ok) throw new Error(await errorText(response));
    await readEvents(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const delta = chunk.choices[0]?.delta?.content;
      if (delta) {
        reply.textContent += delta;
        $("log").scrollTop = $("log").scrollHeight;
      }
    });
    reply.dataset.state = "done";
  } catch (err) {
    if (err.name === "AbortError") {
      reply.dataset.state = "stopped";
    } else {
      reply.dataset.state = "error";
      if (!reply.textContent) reply.remove();
      bubble("error", "Error: " + err.message);
    }
  } finally {
    controller = null;
    setBusy(false);
  }
  if (reply.dataset.state !== "error") {  // a failed turn stays out of the conversation sent next time
    turns.push({ role: "user", content: text }, { role: "assistant", content: reply.textContent });
  }
}

$("form").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("form").requestSubmit();
  }
});
$("stop").addEventListener("click", () => controller?.abort());
$("clear").addEventListener("click", () => {
  turns.length = 0;
  $("log").replaceChildren();
});
$("api-key").addEventListener("change", () => {
  localStorage.setItem("lmforge-api-key", $("api-key").value);
  loadModels();
});
$("api-key").value = localStorage.getItem("lmforge-api-key") || "";
loadModels();
