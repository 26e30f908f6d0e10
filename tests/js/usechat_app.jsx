// A React app on the AI SDK's useChat (default transport) against agentspace's POST /api/chat: it attaches
// files as useChat does (sendMessage({ text, files })), and starts from GET /api/sessions/{id}, so a reload
// shows the stored conversation, files included. Bundled with esbuild and driven in Chromium by
// tests/test_ai_sdk_react.py; ?gateway=URL&token=T&chat=ID say where to talk.
import { useChat } from "@ai-sdk/react";
import { DefaultChatTransport } from "ai";
import { useRef, useState } from "react";
import { createRoot } from "react-dom/client";

const params = new URLSearchParams(location.search);
const gateway = params.get("gateway");
const token = params.get("token");
const chatId = params.get("chat");

// A stored message (agentspace's shape) as a UIMessage: text and file parts (file parts carry a data: URL).
function toUIMessage(stored) {
  const parts = [];
  for (const p of stored.parts || []) {
    if (p.type === "text") parts.push({ type: "text", text: p.text });
    else if (p.type === "file") parts.push({ type: "file", mediaType: p.mediaType, filename: p.filename, url: p.url });
  }
  return { id: stored.id, role: stored.role, parts };
}

function Part({ part }) {
  if (part.type === "text") return <span className="text">{part.text}</span>;
  if (part.type === "file" && part.mediaType.startsWith("image/")) return <img src={part.url} alt={part.filename || "image"} />;
  return null;
}

function App({ initial }) {
  const { messages, sendMessage, status, error } = useChat({
    id: chatId,
    messages: initial,
    transport: new DefaultChatTransport({ api: `${gateway}/api/chat`, headers: { Authorization: `Bearer ${token}` } }),
  });
  const [input, setInput] = useState("");
  const [files, setFiles] = useState(undefined);
  const fileInput = useRef(null);
  const submit = (event) => {
    event.preventDefault();
    sendMessage({ text: input, files });
    setInput("");
    setFiles(undefined);
    fileInput.current.value = "";
  };
  return (
    <main>
      <ul id="messages">
        {messages.map((m) => (
          <li key={m.id} className={m.role}>
            {m.parts.map((p, i) => <Part key={i} part={p} />)}
          </li>
        ))}
      </ul>
      <form onSubmit={submit}>
        <input id="file" type="file" ref={fileInput} onChange={(e) => setFiles(e.target.files || undefined)} />
        <input id="text" value={input} onChange={(e) => setInput(e.target.value)} />
        <button type="submit">Send</button>
      </form>
      <p id="status">{status}</p>
      {error ? <p id="error">{error.message}</p> : null}
    </main>
  );
}

async function main() {
  let initial = [];
  const response = await fetch(`${gateway}/api/sessions/${encodeURIComponent(chatId)}`, {
    headers: { Authorization: `Bearer ${token}` },
  });
  if (response.ok) initial = (await response.json()).session.messages.map(toUIMessage);
  createRoot(document.getElementById("root")).render(<App initial={initial} />);
}

main();
