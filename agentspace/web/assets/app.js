// The agentspace web app: sign-in, chat, usage and clients pages over the gateway's own HTTP API.
import { ApiError, FALLBACK_NOTE, forgetKey, getJSON, getKey, request, setKey } from "./api.js";
import { applyChunk, fromStored, newAssistantMessage, readChunks } from "./stream.js";
import { el, plainText, renderMarkdown, safeUrl } from "./markdown.js";
import { usagePage } from "./usage.js";
import { clientsPage } from "./clients.js";
import { deploymentsPage } from "./deployments.js";

const root = document.getElementById("app");
const state = {
  admin: false, // signed in with the gateway token (the clients API answers)
  hasClients: false, // the gateway has /api/clients
  models: [],
  model: null,
  sessions: [],
  chat: null, // {id, messages, stored, streaming, stopping}
  sidebarOpen: false,
  contextOpen: false, // on a phone: the inspector's details (legend, cache line, export) shown
  search: "", // the sidebar's search text ("" lists every session)
};

// --- formatting ------------------------------------------------------------------------------------

export function money(value) {
  const n = Number(value || 0);
  if (n === 0) return "$0";
  return n >= 0.01 ? `$${n.toFixed(2)}` : `$${n.toPrecision(2)}`;
}

export function count(value) {
  return Number(value || 0).toLocaleString("en-US");
}

function perMTok(value) {
  return value === undefined || value === null ? "?" : `$${Number(value).toFixed(2).replace(/\.00$/, "")}`;
}

export function newId() {
  return crypto.randomUUID().replaceAll("-", "");
}

// --- sign-in ---------------------------------------------------------------------------------------

function signInPage(message) {
  const input = el("input", { id: "key", name: "key", type: "password", autocomplete: "current-password", required: true, "aria-describedby": "key-help" });
  const error = el("p", { class: "error", role: "alert", id: "signin-error" }, message || "");
  const form = el("form", { class: "signin card", "aria-labelledby": "signin-title" },
    el("h1", { id: "signin-title" }, "agentspace"),
    el("label", { for: "key" }, "Gateway token or client key"),
    input,
    el("p", { class: "muted", id: "key-help" }, "Run ", el("code", {}, "agentspace token"), " to see the gateway token. It is kept in this tab only."),
    el("button", { type: "submit", class: "primary" }, "Sign in"),
    error);
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = input.value.trim();
    error.textContent = "";
    try {
      await request("/api/sessions", { key });
    } catch (e) {
      error.textContent = e instanceof ApiError && e.status === 401
        ? "That key is not valid: check the gateway token (agentspace token) or the client key."
        : `Could not sign in: ${e.message}`;
      input.focus();
      return;
    }
    setKey(key);
    await start();
  });
  root.replaceChildren(el("main", { class: "signin-page" }, form));
  input.focus();
}

function signOut() {
  forgetKey();
  state.chat = null;
  location.hash = "";
  signInPage("Signed out.");
}

async function detectRole() {
  // Whether this gateway has the clients API, from its own OpenAPI document (no failing probe request).
  try {
    const doc = await getJSON("/api/openapi.json");
    state.hasClients = Boolean(doc.paths && doc.paths["/api/clients"]);
  } catch {
    state.hasClients = false;
  }
  state.admin = false;
  // A client key (its "as-" prefix, as the gateway tells them apart) is never the admin: no probe, so no
  // 403 in the console; the gateway token is the admin when /api/clients answers.
  if (state.hasClients && !getKey().startsWith("as-")) {
    try {
      await request("/api/clients");
      state.admin = true;
    } catch {
      state.admin = false; // a client key: 403
    }
  }
}

async function start() {
  try {
    await detectRole();
    const [models] = await Promise.all([getJSON("/api/models"), loadSessions()]);
    state.models = models.models || [];
  } catch (e) {
    if (e instanceof ApiError && e.status === 401) {
      forgetKey();
      return signInPage("Your key is no longer valid; sign in again.");
    }
    throw e;
  }
  window.onhashchange = route;
  await route();
}

// --- layout ----------------------------------------------------------------------------------------

function shell(page, content) {
  const link = (href, name, label) =>
    el("a", { href, "aria-current": page === name ? "page" : undefined }, label);
  const nav = el("nav", { "aria-label": "Pages" },
    link("#/chat", "chat", "Chat"),
    link("#/usage", "usage", "Usage"),
    state.admin && state.hasClients ? link("#/clients", "clients", "Clients") : null,
    state.admin && hasGroups() ? link("#/deployments", "deployments", "Deployments") : null);
  const header = el("header", { class: "topbar" },
    el("span", { class: "brand" }, "agentspace"),
    nav,
    el("button", { type: "button", class: "ghost", onclick: signOut }, "Sign out"));
  root.replaceChildren(header, el("main", { id: "main", class: `page page-${page}` }, content));
}

// Model groups ([models.groups]) are listed among the models with provider "group".
function hasGroups() {
  return (state.models || []).some((m) => m.provider === "group");
}

async function route() {
  if (!getKey()) return signInPage();
  const [, page = "chat", arg] = location.hash.replace(/^#\/?/, "#/").split("/");
  if (page !== "chat") state.chat = null; // a chat still streaming goes on, off screen
  if (page === "usage") {
    shell("usage", el("p", { class: "muted" }, "Loading usage…"));
    return usagePage(document.getElementById("main"), { sessions: state.sessions });
  }
  if (page === "deployments" && state.admin && hasGroups()) {
    shell("deployments", el("p", { class: "muted" }, "Loading deployments…"));
    return deploymentsPage(document.getElementById("main"));
  }
  if (page === "clients" && state.admin && state.hasClients) {
    shell("clients", el("p", { class: "muted" }, "Loading clients…"));
    return clientsPage(document.getElementById("main"));
  }
  return chatPage(arg ? decodeURIComponent(arg) : null);
}

// --- chat ------------------------------------------------------------------------------------------

async function loadSessions() {
  state.sessions = (await getJSON("/api/sessions")).sessions || [];
}

function sessionItem(s) {
  const current = state.chat && state.chat.id === s.id;
  const title = plainText(s.title) || "New chat";
  const item = el("li", { class: current ? "current" : undefined, "data-session": s.id });
  const open = el("a", { href: `#/chat/${encodeURIComponent(s.id)}`, "aria-current": current ? "page" : undefined, class: "session-link" }, title);
  const rename = el("button", { type: "button", class: "icon", "aria-label": `Rename ${title}`, title: "Rename" }, "✎");
  const remove = el("button", { type: "button", class: "icon", "aria-label": `Delete ${title}`, title: "Delete" }, "✕");
  rename.addEventListener("click", () => {
    const input = el("input", { value: title, "aria-label": "New title", class: "rename" });
    const save = async () => {
      const value = input.value.trim();
      if (value && value !== title) {
        try {
          await request(`/api/sessions/${encodeURIComponent(s.id)}`, { method: "PATCH", body: { title: value } });
        } catch (e) {
          notify(`Rename failed: ${e.message}`);
        }
      }
      await loadSessions();
      renderSidebar();
    };
    input.addEventListener("keydown", (event) => {
      if (event.key === "Enter") save();
      if (event.key === "Escape") renderSidebar();
    });
    input.addEventListener("blur", save, { once: true });
    open.replaceWith(input);
    input.focus();
    input.select();
  });
  remove.addEventListener("click", async () => {
    if (remove.dataset.confirm !== "1") {
      remove.dataset.confirm = "1";
      remove.textContent = "Delete?";
      remove.setAttribute("aria-label", `Confirm: delete ${title}`);
      return;
    }
    try {
      await request(`/api/sessions/${encodeURIComponent(s.id)}`, { method: "DELETE" });
    } catch (e) {
      notify(`Delete failed: ${e.message}`);
    }
    await loadSessions();
    if (current) location.hash = "#/chat";
    else renderSidebar();
  });
  // A new chat is stored with its first message: until then there is nothing to rename or delete.
  item.append(open, s.createdAt ? el("span", { class: "actions" }, rename, remove) : "");
  return item;
}

function renderSidebar() {
  const list = document.getElementById("sessions");
  if (!list) return;
  if (state.search) return renderSearch(list);
  const shown = [...state.sessions];
  if (state.chat && !shown.some((s) => s.id === state.chat.id)) shown.unshift({ id: state.chat.id, title: null });
  list.replaceChildren(...shown.map(sessionItem));
}

// Sessions whose title or messages contain the search box's text (GET /api/sessions?q=), with the match.
async function renderSearch(list) {
  const query = state.search;
  let found, more;
  try {
    const result = await getJSON(`/api/sessions?q=${encodeURIComponent(query)}`);
    found = result.sessions || [];
    more = result.more;
  } catch (e) {
    list.replaceChildren(el("li", { class: "muted" }, `Search failed: ${e.message}`));
    return;
  }
  if (state.search !== query) return; // a newer search is on its way
  if (!found.length) {
    list.replaceChildren(el("li", { class: "muted", role: "status" }, `No chat contains “${query}”.`));
    return;
  }
  list.replaceChildren(...found.map((s) => {
    const item = sessionItem(s);
    item.classList.add("found");
    item.append(el("span", { class: "match muted" }, s.match));
    return item;
  }), ...(more ? [el("li", { class: "muted", id: "search-more", role: "status" }, `More chats contain “${query}”: these are the ${found.length} most recent. Search for more words to narrow it.`)] : []));
}

function searchBox() {
  const input = el("input", { type: "search", id: "session-search", placeholder: "Search chats", "aria-label": "Search chats", value: state.search || "" });
  let timer = null;
  input.addEventListener("input", () => {
    clearTimeout(timer);
    timer = setTimeout(() => {
      state.search = input.value.trim();
      renderSidebar();
    }, 200);
  });
  return input;
}

function notify(text) {
  const box = document.getElementById("notice");
  if (box) box.textContent = text;
}

function modelLabel(m) {
  const badges = [m.supportsReasoning ? "reasoning" : null, m.supportsTools ? "tools" : null].filter(Boolean);
  return `${m.id} · ${perMTok(m.inputPerMTok)} in / ${perMTok(m.outputPerMTok)} out per MTok${badges.length ? ` · ${badges.join(", ")}` : ""}`;
}

function modelPicker() {
  const select = el("select", { id: "model", name: "model" });
  for (const m of state.models) {
    select.append(el("option", { value: m.id, selected: m.id === state.model }, modelLabel(m)));
  }
  const badges = el("span", { class: "badges", id: "model-badges" });
  const showBadges = () => {
    const m = state.models.find((x) => x.id === select.value);
    badges.replaceChildren(
      ...(m ? [
        el("span", { class: "badge" }, `${perMTok(m.inputPerMTok)} / ${perMTok(m.outputPerMTok)} per MTok`),
        m.supportsReasoning ? el("span", { class: "badge" }, "reasoning") : null,
        m.supportsTools ? el("span", { class: "badge" }, "tools") : null,
      ] : []).filter(Boolean));
  };
  select.addEventListener("change", () => {
    state.model = select.value;
    showBadges();
    loadContext();
  });
  showBadges();
  return el("div", { class: "model-picker" }, el("label", { for: "model" }, "Model"), select, badges);
}

async function chatPage(sessionId) {
  if (!sessionId) {
    // The newest session, or a new chat when there is none.
    sessionId = state.sessions.length ? state.sessions[0].id : newId();
    history.replaceState(null, "", `#/chat/${encodeURIComponent(sessionId)}`);
  }
  const stored = state.sessions.find((s) => s.id === sessionId);
  state.chat = { id: sessionId, messages: [], stored: Boolean(stored), streaming: null };
  const chat = state.chat;
  const defaultModel = (state.models.find((m) => m.default) || state.models[0] || {}).id || null;
  state.model = (stored && stored.model) || state.model || defaultModel;

  const textarea = el("textarea", { id: "prompt", name: "prompt", rows: 3, placeholder: "Message (Enter sends, Shift+Enter adds a line; paste or drop images and PDFs)" });
  const sendButton = el("button", { type: "submit", class: "primary", id: "send" }, "Send");
  const stopButton = el("button", { type: "button", id: "stop", hidden: true }, "Stop");
  // Images and PDFs go with the next message (docs/attachments.md): the attach button, paste, or a drop.
  chat.attachments = [];
  chat.reading = new Set(); // the files' reads not ended yet
  const fileInput = el("input", { type: "file", id: "attach-input", multiple: true, accept: ATTACHABLE.join(","), hidden: true, "aria-label": "Attach files" });
  const attachButton = el("button", { type: "button", id: "attach", class: "ghost", title: "Attach images or PDFs" }, "Attach");
  attachButton.addEventListener("click", () => fileInput.click());
  fileInput.addEventListener("change", () => {
    addAttachments(chat, [...fileInput.files]);
    fileInput.value = "";
  });
  textarea.addEventListener("paste", (event) => {
    const files = [...(event.clipboardData ? event.clipboardData.files : [])];
    if (!files.length) return;
    event.preventDefault();
    addAttachments(chat, files);
  });
  const composer = el("form", { class: "composer", "aria-label": "Send a message" },
    el("label", { for: "prompt", class: "visually-hidden" }, "Message"),
    el("div", { class: "composer-input" }, el("ul", { id: "attachments", class: "attachments", "aria-label": "Attachments" }), textarea),
    el("div", { class: "composer-buttons" }, fileInput, attachButton, stopButton, sendButton));
  textarea.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      composer.requestSubmit();
    }
  });
  composer.addEventListener("submit", async (event) => {
    event.preventDefault();
    if (chat.reading.size) {
      // Files still being read (one pasted or dropped just now) go with this message, not the next.
      if (chat.waitingForFiles) return;
      chat.waitingForFiles = true;
      await Promise.all([...chat.reading]);
      chat.waitingForFiles = false;
      if (state.chat !== chat) return;
    }
    const text = textarea.value;
    if ((!text.trim() && !chat.attachments.length) || chat.streaming) return;
    textarea.value = "";
    const files = chat.attachments;
    chat.attachments = [];
    renderAttachments(chat);
    send(chat, text, files);
  });
  stopButton.addEventListener("click", () => stop(chat));

  const toggle = el("button", { type: "button", class: "ghost sidebar-toggle", "aria-controls": "sidebar", "aria-expanded": String(state.sidebarOpen) }, "Chats");
  const sidebar = el("aside", { id: "sidebar", class: `sidebar${state.sidebarOpen ? " open" : ""}`, "aria-label": "Sessions" },
    el("button", { type: "button", class: "primary new-chat", onclick: () => { state.sidebarOpen = false; location.hash = `#/chat/${newId()}`; } }, "New chat"),
    searchBox(),
    el("ul", { id: "sessions", class: "sessions" }));
  toggle.addEventListener("click", () => {
    state.sidebarOpen = !state.sidebarOpen;
    sidebar.classList.toggle("open", state.sidebarOpen);
    toggle.setAttribute("aria-expanded", String(state.sidebarOpen));
  });
  const pane = el("section", { class: "chat", "aria-label": "Chat" },
    el("div", { class: "chat-head" }, toggle, modelPicker()),
    el("section", { id: "context", class: "context", "aria-label": "Context inspector" }),
    el("p", { id: "notice", class: "notice", role: "status" }),
    el("ol", { id: "messages", class: "messages", "aria-label": "Messages" }),
    composer);
  // A file dropped anywhere on the chat (the messages are the larger target) goes with the next message.
  pane.addEventListener("dragover", (event) => {
    if (!carriesFiles(event)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
    composer.classList.add("dropping");
  });
  pane.addEventListener("dragleave", (event) => {
    if (!pane.contains(event.relatedTarget)) composer.classList.remove("dropping");
  });
  pane.addEventListener("drop", (event) => {
    composer.classList.remove("dropping");
    if (!event.dataTransfer || !event.dataTransfer.files.length) return;
    event.preventDefault();
    addAttachments(chat, [...event.dataTransfer.files]);
  });
  const content = el("div", { class: "chat-layout" }, sidebar, pane);
  shell("chat", content);
  renderSidebar();

  if (chat.stored) {
    let session;
    try {
      session = (await getJSON(`/api/sessions/${encodeURIComponent(sessionId)}`)).session;
    } catch (e) {
      notify(`Could not open the session: ${e.message}`);
      return;
    }
    if (state.chat !== chat) return;
    chat.messages = session.messages.map(fromStored);
    renderMessages(chat);
    loadContext();
    const last = session.messages[session.messages.length - 1];
    if (last && last.role === "user" && !last.error) await resume(chat);
  } else {
    renderMessages(chat);
    document.getElementById("context").replaceChildren(el("p", { class: "muted" }, "The context inspector shows the next call's sections once the chat has a first message."));
  }
  textarea.focus();
}

function setStreaming(chat, streaming) {
  const stopButton = document.getElementById("stop");
  if (state.chat !== chat || !stopButton) return;
  stopButton.hidden = !streaming;
  document.getElementById("send").disabled = streaming;
}

// --- messages --------------------------------------------------------------------------------------

function json(value) {
  return typeof value === "string" ? value : JSON.stringify(value, null, 1);
}

function renderPart(part) {
  if (part.type === "text") return el("div", { class: "md" }, renderMarkdown(part.text));
  if (part.type === "reasoning") {
    return el("details", { class: "reasoning" }, el("summary", {}, part.state === "streaming" ? "Reasoning…" : "Reasoning"),
      el("div", { class: "md" }, renderMarkdown(part.text)));
  }
  if (part.type === "tool") {
    const status = { "input-available": "running", "output-available": "done", "output-error": "error" }[part.state];
    return el("div", { class: `tool-card tool-${status}` },
      el("div", { class: "tool-head" }, el("span", { class: "tool-name" }, part.toolName), el("span", { class: "tool-status" }, status)),
      el("div", { class: "tool-io" }, el("span", { class: "muted" }, "input "), el("code", {}, json(part.input))),
      part.output !== undefined ? el("div", { class: "tool-io" }, el("span", { class: "muted" }, "output "), el("code", {}, json(part.output))) : null);
  }
  return null;
}

const ATTACHABLE = ["image/png", "image/jpeg", "image/gif", "image/webp", "application/pdf"];

function carriesFiles(event) {
  return Boolean(event.dataTransfer) && [...event.dataTransfer.types].includes("Files");
}

// Elsewhere (the sidebar, the other pages) a dropped file is refused: the browser would open it in place of the app.
window.addEventListener("dragover", (event) => {
  if (!carriesFiles(event) || event.defaultPrevented) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "none";
});
window.addEventListener("drop", (event) => {
  if (carriesFiles(event)) event.preventDefault();
});

// Files read as data: URLs, the AI SDK's file parts; the gateway checks types and sizes.
function addAttachments(chat, files) {
  for (const file of files) {
    const read = new Promise((resolve) => {
      const reader = new FileReader();
      reader.addEventListener("load", () => {
        resolve();
        if (state.chat !== chat) return;
        chat.attachments.push({ type: "file", mediaType: file.type || "application/octet-stream", filename: file.name, size: file.size, url: reader.result });
        renderAttachments(chat);
      });
      reader.addEventListener("error", () => {
        resolve();
        notify(`Could not read ${file.name}.`);
      });
      reader.readAsDataURL(file);
    });
    chat.reading.add(read);
    read.then(() => chat.reading.delete(read));
  }
}

function renderAttachments(chat) {
  const list = document.getElementById("attachments");
  if (state.chat !== chat || !list) return;
  list.replaceChildren(...chat.attachments.map((file, i) =>
    el("li", { class: "attachment" }, filePreview(file),
      el("button", { type: "button", class: "ghost remove", "aria-label": `Remove ${file.filename}`, onclick: () => {
        chat.attachments.splice(i, 1);
        renderAttachments(chat);
      } }, "×"))));
}

// An image as a thumbnail, a document as its name and size.
function filePreview(part) {
  const name = part.filename || part.mediaType;
  if (part.mediaType && part.mediaType.startsWith("image/") && part.url && part.url.startsWith("data:")) {
    return el("img", { class: "file-preview", src: part.url, alt: name, title: name });
  }
  const kind = part.mediaType === "application/pdf" ? "PDF" : "File";
  return el("span", { class: "file-chip", title: part.mediaType }, el("strong", {}, kind), ` ${name}${part.size ? ` (${count(Math.ceil(part.size / 1024))} KB)` : ""}`);
}

function renderSources(parts) {
  const sources = parts.filter((p) => p.type === "source-url");
  if (!sources.length) return null;
  return el("div", { class: "sources" }, el("span", { class: "muted" }, "Sources: "),
    el("ul", {}, ...sources.map((s) => {
      const href = safeUrl(s.url);
      return el("li", {}, href ? el("a", { href, target: "_blank", rel: "noopener noreferrer" }, s.title || s.url) : s.url);
    })));
}

function renderFooter(message) {
  const m = message.metadata || {};
  const bits = [];
  if (m.usage) {
    bits.push(`${count(m.usage.inputTokens)} in / ${count(m.usage.outputTokens)} out tokens`, money(m.usage.totalCost));
  }
  // A model without a known price is costed at the configured fallback price: the cost is an estimate.
  const estimated = m.usage && m.usage.priceKnown === false;
  if (m.ttftMs !== undefined && m.ttftMs !== null) bits.push(`TTFT ${Math.round(m.ttftMs)} ms`);
  const out = el("div", { class: "meta" }, bits.join(" · "));
  if (estimated) {
    out.append(el("abbr", { class: "estimate", title: FALLBACK_NOTE, "aria-label": FALLBACK_NOTE }, "*"));
  }
  if (m.stopped) out.prepend(el("span", { class: "stopped" }, "stopped"), bits.length ? " · " : "");
  return out;
}

function renderMessage(message) {
  // The stream's start renames a pending answer (its messageId): scheduleRender finds its li by this id.
  message.renderedId = message.id;
  const li = el("li", { class: `message ${message.role}`, "data-id": message.id, "data-state": message.state });
  if (message.role === "user") {
    const files = message.parts.filter((p) => p.type === "file");
    if (files.length) li.append(el("div", { class: "files" }, ...files.map(filePreview)));
    const text = message.parts.filter((p) => p.type === "text").map((p) => p.text).join("");
    if (text || !files.length) li.append(el("div", { class: "bubble" }, text));
    if (message.metadata && message.metadata.error) li.append(el("p", { class: "error" }, message.metadata.error));
    return li;
  }
  const body = el("div", { class: "answer" }, ...message.parts.map(renderPart).filter(Boolean));
  if (message.state === "streaming" && !message.parts.length) body.append(el("span", { class: "muted typing" }, "…"));
  li.append(body);
  const sources = renderSources(message.parts);
  if (sources) li.append(sources);
  if (message.metadata.error) li.append(el("p", { class: "error", role: "alert" }, message.metadata.error));
  if (message.state === "done") li.append(renderFooter(message));
  return li;
}

function renderMessages(chat) {
  const list = document.getElementById("messages");
  if (state.chat !== chat || !list) return;
  const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
  list.replaceChildren(...chat.messages.map(renderMessage));
  if (nearBottom) list.scrollTop = list.scrollHeight;
}

// Re-renders the streaming message at most once a frame; folded reasoning stays as the reader left it.
function scheduleRender(chat, message) {
  if (message.pending) return;
  message.pending = true;
  requestAnimationFrame(() => {
    message.pending = false;
    const list = document.getElementById("messages");
    // A reload of the stored session may have replaced the chat's messages meanwhile (a slow frame): the stored
    // copy is on screen already, and appending this one would show the answer twice.
    if (state.chat !== chat || !list || !chat.messages.includes(message)) return;
    const old = list.querySelector(`li[data-id="${CSS.escape(message.renderedId || message.id)}"]`);
    const open = old ? [...old.querySelectorAll("details")].map((d) => d.open) : [];
    const fresh = renderMessage(message);
    fresh.querySelectorAll("details").forEach((d, i) => (d.open = open[i] || false));
    const nearBottom = list.scrollHeight - list.scrollTop - list.clientHeight < 80;
    if (old) old.replaceWith(fresh);
    else list.append(fresh);
    if (nearBottom) list.scrollTop = list.scrollHeight;
  });
}

// Earlier messages go as text (the gateway keeps the session, files included); the new one with its files.
function toUIMessage(message, withFiles) {
  const parts = message.parts.filter((p) => p.type === "text").map((p) => ({ type: "text", text: p.text }));
  if (withFiles) {
    for (const p of message.parts) if (p.type === "file") parts.push({ type: "file", mediaType: p.mediaType, filename: p.filename, url: p.url });
  }
  return { id: message.id, role: message.role, parts };
}

async function send(chat, text, files = []) {
  const parts = text ? [{ type: "text", text }] : [];
  const user = { id: `msg_${newId()}`, role: "user", parts: [...parts, ...files], metadata: {}, state: "done" };
  chat.messages.push(user);
  renderMessages(chat);
  notify("");
  // The body of the AI SDK's default transport (DefaultChatTransport), plus the model picked.
  const messages = chat.messages.map((m) => toUIMessage(m, m === user));
  const body = { id: chat.id, messages, trigger: "submit-message", model: state.model || undefined };
  const message = newAssistantMessage(`pending_${newId()}`);
  chat.messages.push(message);
  chat.streaming = message;
  setStreaming(chat, true);
  renderMessages(chat);
  let response;
  try {
    response = await request("/api/chat", { method: "POST", body });
  } catch (e) {
    // Refused before the answer began (a file's type or size, the budget): the stored session may not hold this
    // message, and reloading it would wipe the message and its error from the screen.
    message.state = "done";
    message.metadata.error = e.message;
    renderMessages(chat);
    await finish(chat, false);
    return;
  }
  try {
    await consume(chat, message, response);
  } catch {
    // The connection broke mid-answer (a phone changing networks, the proxy, the replica streaming it stopped):
    // the answer may still run on the gateway, or be stored, or have stopped with its replica. Ask for it again.
    chat.messages = chat.messages.filter((m) => m !== message);
    chat.streaming = null;
    setStreaming(chat, false);
    await resume(chat);
    return;
  }
  await finish(chat);
}

async function resume(chat) {
  let response;
  try {
    response = await request(`/api/chat/${encodeURIComponent(chat.id)}/stream`);
  } catch (e) {
    notify(`Could not resume the answer: ${e.message}`);
    return;
  }
  if (response.status === 204) {
    // The answer ended between reading the session (or the broken connection) and asking for its stream:
    // read the stored one (a new chat's first answer: the session is stored now).
    return finish(chat);
  }
  const message = newAssistantMessage(`pending_${newId()}`);
  chat.messages.push(message);
  chat.streaming = message;
  setStreaming(chat, true);
  renderMessages(chat);
  try {
    await consume(chat, message, response);
  } catch (e) {
    message.state = "done";
    message.metadata.error = `The connection to the gateway broke before the answer ended (${e.message}).`;
  }
  await finish(chat);
}

async function consume(chat, message, response) {
  for await (const chunk of readChunks(response)) {
    if (chunk.type === "start" && chunk.messageId) {
      // A resumed answer replays from its start: drop a stored copy of it, so no text shows twice.
      chat.messages = chat.messages.filter((m) => m === message || m.id !== chunk.messageId);
    }
    if (applyChunk(message, chunk)) scheduleRender(chat, message);
  }
  if (message.state === "streaming") message.state = "done";
  scheduleRender(chat, message);
}

async function finish(chat, reload = true) {
  chat.streaming = null;
  chat.stopping = false;
  setStreaming(chat, false);
  // The stored session is the record (tokens, cost, time to first token, stopped): show what it says.
  await loadSessions().catch(() => {});
  chat.stored = state.sessions.some((s) => s.id === chat.id);
  if (reload) await reloadChat(chat);
  renderSidebar();
}

async function reloadChat(chat) {
  if (state.chat !== chat || !chat.stored) return;
  try {
    const session = (await getJSON(`/api/sessions/${encodeURIComponent(chat.id)}`)).session;
    if (state.chat !== chat || chat.streaming) return;
    const shown = chat.messages[chat.messages.length - 1];
    chat.messages = session.messages.map(fromStored);
    // An answer that ended in an error and was not stored (its replica stopped mid-answer) keeps its error on
    // screen: without it the question would just stand there unanswered.
    if (shown && shown.role === "assistant" && shown.metadata.error && !chat.messages.some((m) => m.id === shown.id)) {
      chat.messages.push(shown);
    }
    renderMessages(chat);
    loadContext();
  } catch (e) {
    notify(`Could not read the session: ${e.message}`);
  }
}

async function stop(chat) {
  if (!chat.streaming || chat.stopping) return;
  chat.stopping = true;
  try {
    // chat.abort semantics: the gateway stops generating, keeps and bills what was generated; the stream
    // we are reading then ends with an abort chunk.
    await request(`/api/chat/${encodeURIComponent(chat.id)}/stream`, { method: "DELETE" });
  } catch (e) {
    if (!(e instanceof ApiError && e.status === 404)) notify(`Could not stop: ${e.message}`);
  }
}

// --- context inspector -----------------------------------------------------------------------------

async function loadContext() {
  const chat = state.chat;
  const box = document.getElementById("context");
  if (!chat || !box || !chat.stored) return;
  let inspection;
  try {
    const query = state.model ? `?model=${encodeURIComponent(state.model)}` : "";
    inspection = await getJSON(`/api/sessions/${encodeURIComponent(chat.id)}/context${query}`);
  } catch (e) {
    box.replaceChildren(el("p", { class: "muted" }, `Context unavailable: ${e.message}`));
    return;
  }
  if (state.chat !== chat) return;
  const total = inspection.totals || {};
  const cacheNote = { read: "read from the cache", write: "written to the cache", "read+write": "partly read from, partly written to the cache" };
  const describe = (s) => `${s.name}: ${count(s.byteCount)} bytes, ${count(s.tokenEstimate)} tokens, ${money(s.costEstimate)}${cacheNote[s.cache] ? `, ${cacheNote[s.cache]}` : ""}`;
  const sections = (inspection.sections || []).filter((s) => s.byteCount > 0 || s.tokenEstimate > 0);
  const bar = el("div", { class: "stack", role: "list", "aria-label": "Sections of the next call" },
    ...sections.map((s, i) => {
      const seg = el("div", { class: `seg seg-${i % 8}`, role: "listitem", tabindex: "0", title: describe(s), "aria-label": describe(s), "data-section": s.name, "data-cache": s.cache || "none" });
      seg.style.flexGrow = String(Math.max(s.tokenEstimate, 1));
      return seg;
    }));
  const mark = { read: " ↺", write: " ✎", "read+write": " ↺✎" };
  const legend = el("ul", { class: "legend" }, ...sections.map((s, i) =>
    el("li", { title: describe(s) }, el("span", { class: `swatch seg-${i % 8}`, "aria-hidden": "true" }), `${s.name} ${count(s.tokenEstimate)}${mark[s.cache] || ""}`)));
  const cache = total.costWithCache === undefined ? null : el("p", { class: "cache-line", id: "cache-line" },
    total.promptCache === "off"
      ? `Prompt cache off: ${money(total.costWithoutCache)} input.`
      : `Prompt cache: ${count(total.cacheReadTokens)} tokens read ↺, ${count(total.cacheWriteTokens)} written ✎ · ` +
        `${money(total.costWithCache)} input with the cache, ${money(total.costWithoutCache)} without.`);
  const compact = el("button", { type: "button", class: "ghost small", id: "compact" }, "Compact");
  compact.addEventListener("click", () => compactChat(chat, compact));
  // A phone shows the bar and its total only (the header stays short); "Details" shows the rest there.
  const details = el("button", { type: "button", class: "ghost small context-toggle", "aria-controls": "context", "aria-expanded": String(state.contextOpen) }, "Details");
  details.addEventListener("click", () => {
    state.contextOpen = !state.contextOpen;
    box.classList.toggle("open", state.contextOpen);
    details.setAttribute("aria-expanded", String(state.contextOpen));
  });
  box.classList.toggle("open", state.contextOpen);
  const actions = el("span", { class: "context-actions" }, details, compact,
    el("button", { type: "button", class: "ghost small export", onclick: () => exportChat(chat, "md") }, "Export Markdown"),
    el("button", { type: "button", class: "ghost small export", onclick: () => exportChat(chat, "json") }, "Export JSON"));
  box.replaceChildren(
    el("div", { class: "context-head" }, el("strong", {}, "Next call"),
      el("span", { class: "muted" }, ` ${count(total.tokenEstimate)} tokens · ${money(total.costEstimate)}`),
      el("span", { class: "muted context-detail" }, ` · ${count(total.byteCount)} bytes (${inspection.model})`),
      actions),
    bar, legend, cache);
}

// Summarise every turn but the latest into the session's summary (POST /api/sessions/{id}/compact).
async function compactChat(chat, button) {
  if (chat.streaming) return;
  button.disabled = true;
  button.textContent = "Compacting…";
  try {
    const result = await (await request(`/api/sessions/${encodeURIComponent(chat.id)}/compact`, { method: "POST" })).json();
    notify(result.compacted ? `Compacted: ${result.summarizedMessages} messages summarised.` : "Nothing to compact yet.");
  } catch (e) {
    notify(`Compact failed: ${e.message}`);
  }
  if (state.chat === chat) loadContext();
}

// The session as a file: fetched with the key (a plain link would carry none), saved through a blob URL.
async function exportChat(chat, format) {
  let response;
  try {
    response = await request(`/api/sessions/${encodeURIComponent(chat.id)}/export?format=${format}`);
  } catch (e) {
    notify(`Export failed: ${e.message}`);
    return;
  }
  const url = URL.createObjectURL(await response.blob());
  const link = el("a", { href: url, download: `${chat.id}.${format}`, hidden: true });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

// --- start -----------------------------------------------------------------------------------------

if (getKey()) start();
else signInPage();
